"""The text corpus: documents from `data.source`, cut into fixed-length token contexts.

`data.source` is one of

- ``embedded:python-docs``: the English prose every Python installation ships (the
  ``pydoc_data`` topics, then the standard library's docstrings read with :mod:`ast`);
- ``hf:NAME[:CONFIG]``: a Hugging Face dataset streamed with :mod:`datasets` (``text`` field);
- a local path, directory or glob of ``.txt`` (a whole file is one document), ``.jsonl`` (one
  JSON object per line with a ``text`` key) or ``.parquet`` (a ``text`` column) files.

Documents are joined into one token stream, each preceded by a separator (the tokenizer's EOS
token, else its BOS token), and the stream is cut into non-overlapping contexts of
`data.context` tokens. Everything is lazy: only as much of the corpus is read and tokenised as
the requested number of contexts needs.
"""

from __future__ import annotations

import ast
import glob
import inspect
import json
import math
import os
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mlsae.errors import MlsaeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_PYTHON_DOCS = "embedded:python-docs"
HF_PREFIX = "hf:"
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")

# Docstrings (and pydoc topics) shorter than this, after cleaning, are not documents.
MIN_DOC_CHARS = 40
# Directories of the standard library whose files are not read for docstrings.
SKIPPED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)

# Tokenisation batching: a batch holds about as many characters as the remaining tokens need
# (by a running chars-per-token estimate), within these bounds.
_INITIAL_CHARS_PER_TOKEN = 4.0
_MAX_BATCH_CHARS = 1 << 20
_MAX_BATCH_DOCS = 1024
# Documents longer than this are tokenised piece by piece (pieces end at a newline where
# possible), so one huge file never has to be tokenised whole when few tokens are needed.
_MAX_PIECE_CHARS = 1 << 20

_OFFLINE_HINT = (
    "offline, use data.source=embedded:python-docs or a local path/glob of .txt, .jsonl or "
    ".parquet files"
)


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------


def iter_documents(source: str) -> Iterator[str]:
    """Return the documents of `source` (the `data.source` param), lazily and in a fixed order.

    The source is checked when this is called (unknown scheme, missing or unsupported files,
    an unreachable dataset); problems found while reading (a bad line, a missing ``text``
    field) are raised while iterating. Empty and whitespace-only documents are skipped; a
    source without any other document raises :class:`MlsaeError` once exhausted.

    Raises:
        MlsaeError: one line naming `data.source` or the offending file.
    """
    if not isinstance(source, str) or not source.strip():
        raise MlsaeError(f"data.source must be a non-empty string, got {source!r}")
    if source.startswith(EMBEDDED_PREFIX):
        if source != EMBEDDED_PYTHON_DOCS:
            raise MlsaeError(
                f"data.source {source!r}: unknown embedded corpus (known: {EMBEDDED_PYTHON_DOCS})"
            )
        documents = iter_python_docs()
    elif source.startswith(HF_PREFIX):
        documents = _iter_hf(source)
    else:
        documents = _iter_files(_resolve_files(source))
    return _non_empty(documents, source)


def _non_empty(documents: Iterator[str], source: str) -> Iterator[str]:
    """Yield the documents that are not blank; raise once exhausted if there were none."""
    found = False
    for document in documents:
        if document.strip():
            found = True
            yield document
    if not found:
        raise MlsaeError(f"data.source {source!r}: corpus is empty (no non-empty document)")


# --- embedded:python-docs -------------------------------------------------------------------


def iter_python_docs(stdlib: Path | None = None) -> Iterator[str]:
    """Yield the prose that ships with Python: pydoc topics, then standard-library docstrings.

    Order: the ``pydoc_data.topics.topics`` values sorted by key, then, for each ``.py`` file
    under `stdlib` (default ``sysconfig.get_paths()["stdlib"]``) in sorted path order, its
    module, class and function docstrings in source order. Files are parsed with :mod:`ast`,
    never imported. Docstrings are cleaned with :func:`inspect.cleandoc` and stripped; texts
    shorter than ``MIN_DOC_CHARS`` are skipped. Deterministic for a given Python installation.
    """
    from pydoc_data.topics import topics  # data only: a module holding one dict

    for key in sorted(topics):
        text = topics[key].strip()
        if len(text) >= MIN_DOC_CHARS:
            yield text
    root = Path(stdlib) if stdlib is not None else Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_source_files(root):
        yield from file_docstrings(path)


def stdlib_source_files(root: Path) -> list[Path]:
    """The ``.py`` files under `root`, sorted by relative path, minus ``SKIPPED_STDLIB_DIRS``."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_STDLIB_DIRS]
        found.extend(Path(dirpath, name) for name in filenames if name.endswith(".py"))
    return sorted(found, key=lambda path: path.relative_to(root).parts)


def file_docstrings(path: Path) -> Iterator[str]:
    """Yield the module, class and function docstrings of one source file, in source order.

    Files that cannot be read or parsed yield nothing. Nested definitions (methods, inner
    functions, definitions under ``if``/``try``/...) are included; only statements are
    walked, so deeply nested expressions cannot exhaust the recursion limit.
    """
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        return
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring is not None:
                # cleandoc keeps a trailing whitespace-only line when no other line is indented
                text = inspect.cleandoc(docstring).strip()
                if len(text) >= MIN_DOC_CHARS:
                    yield text
        stack.extend(reversed(_child_statements(node)))


def _child_statements(node: ast.AST) -> list[ast.AST]:
    """The statement-level children of `node` in source order (bodies, handlers, cases)."""
    children: list[ast.AST] = []
    for field in ("body", "handlers", "cases", "orelse", "finalbody"):
        value = getattr(node, field, None)
        if isinstance(value, list):
            children.extend(child for child in value if isinstance(child, ast.AST))
    return children


# --- hf:NAME[:CONFIG] -----------------------------------------------------------------------


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """Split ``hf:NAME[:CONFIG]`` into ``(NAME, CONFIG or None)``."""
    name, _, config = source[len(HF_PREFIX) :].partition(":")
    if not name:
        raise MlsaeError(f"data.source {source!r}: expected hf:NAME[:CONFIG]")
    return name, config or None


def _iter_hf(source: str) -> Iterator[str]:
    """Open a streamed Hugging Face dataset now; yield its ``text`` fields when iterated."""
    name, config = parse_hf_source(source)
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split="train", streaming=True)
    except Exception as exc:  # any failure of the hub/datasets stack means "not reachable"
        raise MlsaeError(
            f"data.source {source!r}: the Hugging Face dataset could not be reached "
            f"({_one_line(exc)}); {_OFFLINE_HINT}"
        ) from exc
    return _hf_texts(dataset, source)


def _hf_texts(dataset: Iterable[dict], source: str) -> Iterator[str]:
    """Yield the ``text`` field of each row of a streamed dataset."""
    rows = iter(dataset)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:  # network loss or a bad shard while streaming
            raise MlsaeError(
                f"data.source {source!r}: reading the Hugging Face dataset failed "
                f"({_one_line(exc)}); {_OFFLINE_HINT}"
            ) from exc
        if "text" not in row:
            raise MlsaeError(
                f"data.source {source!r}: rows have no 'text' field (fields: {sorted(row)})"
            )
        text = row["text"]
        if text is not None:
            yield str(text)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """`exc` as ``Type: first line of message``, shortened to `limit` characters."""
    message = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- local files ----------------------------------------------------------------------------


def _resolve_files(source: str) -> list[Path]:
    """The sorted files a local path, directory or glob names; all must be supported types.

    A directory stands for the supported files anywhere under it.
    """
    pattern = os.path.expanduser(source)
    if glob.has_magic(pattern):
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not paths:
            raise MlsaeError(f"data.source {source!r}: no file matches this glob")
    else:
        path = Path(pattern)
        if path.is_dir():
            paths = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES
            )
            if not paths:
                raise MlsaeError(
                    f"data.source {source!r}: directory has no {'/'.join(SUPPORTED_SUFFIXES)} file"
                )
        elif path.is_file():
            paths = [path]
        else:
            raise MlsaeError(
                f"data.source {source!r}: no such file (expected {EMBEDDED_PYTHON_DOCS}, "
                f"hf:NAME[:CONFIG] or a path/glob of .txt, .jsonl or .parquet files)"
            )
    for path in paths:
        if path.suffix not in SUPPORTED_SUFFIXES:
            raise MlsaeError(
                f"{path}: unsupported file type {path.suffix or '(none)'!r} in data.source "
                f"(supported: {', '.join(SUPPORTED_SUFFIXES)})"
            )
    return paths


def _iter_files(paths: list[Path]) -> Iterator[str]:
    """Yield the documents of each file in turn."""
    readers: dict[str, Callable[[Path], Iterator[str]]] = {
        ".txt": _read_txt,
        ".jsonl": _read_jsonl,
        ".parquet": _read_parquet,
    }
    for path in paths:
        yield from readers[path.suffix](path)


def _read_txt(path: Path) -> Iterator[str]:
    """A whole UTF-8 text file is one document."""
    try:
        yield path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MlsaeError(f"{path}: cannot read as UTF-8 text ({_one_line(exc)})") from exc


def _read_jsonl(path: Path) -> Iterator[str]:
    """Each non-blank line is a JSON object whose ``text`` string is one document."""
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MlsaeError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
                if not isinstance(record, dict) or "text" not in record:
                    raise MlsaeError(f"{path}:{number}: expected a JSON object with a 'text' key")
                text = record["text"]
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise MlsaeError(
                        f"{path}:{number}: 'text' must be a string, got {type(text).__name__}"
                    )
                yield text
    except (OSError, UnicodeDecodeError) as exc:
        raise MlsaeError(f"{path}: cannot read as UTF-8 JSON lines ({_one_line(exc)})") from exc


def _read_parquet(path: Path) -> Iterator[str]:
    """Each non-null value of the ``text`` column is one document (read in record batches)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise MlsaeError(f"{path}: cannot read as Parquet ({_one_line(exc)})") from exc
    schema = parquet.schema_arrow
    if "text" not in schema.names:
        raise MlsaeError(f"{path}: no 'text' column (columns: {', '.join(schema.names)})")
    text_type = schema.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise MlsaeError(f"{path}: column 'text' must hold strings, not {text_type}")
    for batch in parquet.iter_batches(batch_size=1024, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


# --------------------------------------------------------------------------------------------
# Contexts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contexts:
    """Fixed-length token contexts cut from the corpus stream.

    Attributes:
        tokens: ``(n_contexts, context)`` int32 token ids.
        special: ``(n_contexts, context)`` bool, True where the id is one of the tokenizer's
            special ids (the document separators among them); masked downstream.
    """

    tokens: np.ndarray
    special: np.ndarray

    @property
    def n_contexts(self) -> int:
        """Number of contexts."""
        return int(self.tokens.shape[0])

    @property
    def context(self) -> int:
        """Tokens per context."""
        return int(self.tokens.shape[1])


def separator_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The document separator: the tokenizer's EOS id, else its BOS id."""
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return int(token_id)
    raise MlsaeError(
        "model: the tokenizer has neither an EOS nor a BOS token to separate documents with"
    )


def build_contexts(
    documents: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    context: int,
    n_contexts: int,
) -> Contexts:
    """Tokenise `documents` into `n_contexts` non-overlapping contexts of `context` tokens.

    The stream is ``SEP doc1 SEP doc2 ...`` (SEP from :func:`separator_id`; the tokenizer adds
    no special tokens of its own). Documents are pulled and tokenised in batches sized to the
    tokens still needed, and reading stops as soon as every context is full, so only about
    as much of the corpus is consumed as needed.

    Raises:
        MlsaeError: bad sizes, no separator token, or too little text for `n_contexts`.
    """
    _check_positive_int("data.context", context)
    _check_positive_int("number of contexts (data.train_tokens + data.eval_tokens)", n_contexts)
    sep = separator_id(tokenizer)
    needed = context * n_contexts
    stream = np.empty(needed, dtype=np.int32)
    filled = 0
    for ids in _token_runs(documents, tokenizer, sep, lambda: needed - filled):
        take = min(len(ids), needed - filled)
        stream[filled : filled + take] = ids[:take]
        filled += take
        if filled == needed:
            break
    if filled < needed:
        raise MlsaeError(
            f"data.train_tokens + data.eval_tokens: need {needed} tokens ({n_contexts} contexts "
            f"of data.context={context}) but the corpus has only {filled}; lower them or use a "
            f"larger data.source"
        )
    tokens = stream.reshape(n_contexts, context)
    special_ids = np.asarray(sorted(set(tokenizer.all_special_ids) | {sep}), dtype=np.int64)
    return Contexts(tokens=tokens, special=np.isin(tokens, special_ids))


def _token_runs(
    documents: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    sep: int,
    remaining: Callable[[], int],
) -> Iterator[list[int]]:
    """Yield the token stream in runs: ``[SEP, *doc]`` for a document's first piece.

    `remaining()` tells how many tokens the consumer still needs; each batch holds about that
    many tokens' worth of characters, by the chars-per-token ratio seen so far.
    """
    pieces = _pieces(documents)
    chars_per_token = _INITIAL_CHARS_PER_TOKEN
    seen_chars = seen_tokens = 0
    while True:
        budget = min(_MAX_BATCH_CHARS, max(1, math.ceil(remaining() * chars_per_token)))
        batch: list[tuple[bool, str]] = []
        batch_chars = 0
        for starts_document, text in pieces:
            batch.append((starts_document, text))
            batch_chars += len(text)
            if batch_chars >= budget or len(batch) >= _MAX_BATCH_DOCS:
                break
        if not batch:
            return
        encoded = tokenizer(
            [text for _, text in batch],
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )["input_ids"]
        for (starts_document, _), ids in zip(batch, encoded, strict=True):
            seen_tokens += len(ids)
            yield [sep, *ids] if starts_document else list(ids)
        seen_chars += batch_chars
        if seen_tokens:
            chars_per_token = max(seen_chars / seen_tokens, 0.25)


def _pieces(documents: Iterable[str]) -> Iterator[tuple[bool, str]]:
    """Yield ``(starts_document, text)``; a long document comes in pieces ending at newlines."""
    for document in documents:
        start = 0
        while len(document) - start > _MAX_PIECE_CHARS:
            cut = document.rfind("\n", start, start + _MAX_PIECE_CHARS) + 1
            if cut <= start:
                cut = start + _MAX_PIECE_CHARS
            yield start == 0, document[start:cut]
            start = cut
        yield start == 0, document[start:]


# --------------------------------------------------------------------------------------------
# Sizes and split
# --------------------------------------------------------------------------------------------


def plan(train_tokens: int, eval_tokens: int, context: int) -> tuple[int, int]:
    """Contexts needed for the train and eval splits: ``ceil(tokens / context)`` each."""
    _check_positive_int("data.context", context)
    _check_positive_int("data.train_tokens", train_tokens)
    _check_positive_int("data.eval_tokens", eval_tokens)
    return -(-train_tokens // context), -(-eval_tokens // context)


def split_contexts(n_contexts: int, n_eval: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Choose `n_eval` of `n_contexts` contexts for eval (seeded), the rest for train.

    Returns ``(train_idx, eval_idx)``: disjoint, each sorted ascending, int64, together
    covering ``range(n_contexts)``. Same arguments, same split (numpy ``default_rng(seed)``).
    """
    _check_positive_int("number of contexts", n_contexts)
    if isinstance(n_eval, bool) or not isinstance(n_eval, (int, np.integer)):
        raise MlsaeError(f"data.eval_tokens: eval context count must be an integer, got {n_eval!r}")
    if not 0 <= n_eval <= n_contexts:
        raise MlsaeError(
            f"data.eval_tokens: {n_eval} eval contexts requested out of {n_contexts} in all"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise MlsaeError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    eval_idx = np.sort(rng.choice(n_contexts, size=n_eval, replace=False)).astype(np.int64)
    is_eval = np.zeros(n_contexts, dtype=bool)
    is_eval[eval_idx] = True
    train_idx = np.flatnonzero(~is_eval).astype(np.int64)
    return train_idx, eval_idx


def _check_positive_int(key: str, value: object) -> None:
    """Raise :class:`MlsaeError` naming `key` unless `value` is an integer > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise MlsaeError(f"{key} must be a positive integer, got {value!r}")
