"""The text corpus: the documents of `data.source`.

`data.source` is one of

- ``embedded:python-docs``: the English prose every Python installation ships (the
  ``pydoc_data`` topics, then the standard library's docstrings read with :mod:`ast`);
- ``hf:NAME[:CONFIG]``: a Hugging Face dataset streamed with :mod:`datasets` (``text`` field);
- a local path, directory or glob of ``.txt`` (a whole file is one document), ``.jsonl`` (one
  JSON object per line with a ``text`` key) or ``.parquet`` (a ``text`` column) files.

Documents are read lazily, one at a time, in the source's order or, with `data.shuffle_documents`
(on by default for the embedded corpus, whose files come grouped by topic), in a seeded shuffled
order (:func:`ordered_documents`); a document's index in that order is its id. `mlsae/data/contexts.py`
splits them into train and eval documents, tokenises them and cuts the token streams into contexts.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import inspect
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mlsae.core.errors import MlsaeError
from mlsae.core.io import file_sha256

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


SHUFFLE_BUFFER = 16384
"""Documents held by the shuffle: a corpus of at most this many documents (the embedded one has
about 6,500) is shuffled exactly; a larger one by a sliding buffer of this many (each document
leaves the buffer at a uniformly chosen step after it enters), as streamed datasets are."""
EMBEDDED_DOCUMENT_TOKENS = 64
"""`data.document_tokens: auto` for the embedded corpus: the first 64 tokens of each document (a
docstring has 33 tokens at the median and a pydoc topic thousands), so that the default run's
token budget spans some 2,000 documents instead of some 800."""


_OFFLINE_HINT = "offline, use data.source=embedded:python-docs or a local path/glob of .txt, .jsonl or .parquet files"


# --------------------------------------------------------------------------------------------
# Content identity
# --------------------------------------------------------------------------------------------


def _display(path: Path) -> str:
    """A path relative to the working directory when inside it (so manifests move with the repo)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def manifest(source: str) -> dict[str, Any]:
    """What decides the corpus's content, deterministically (the check stage writes it to
    `data/corpus.json`): for local files the sorted files with their size and sha256; for
    `embedded:python-docs` the Python version, the sha256 of the pydoc topics and of the standard
    library's `.py` file list with sizes; for `hf:` sources the spec string alone."""
    if source.startswith(HF_PREFIX):
        return {"source": source}
    if source == EMBEDDED_PYTHON_DOCS:
        from pydoc_data.topics import topics

        root = Path(sysconfig.get_paths()["stdlib"])
        listing = "".join(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}\n" for p in stdlib_source_files(root))
        return {
            "source": source,
            "python": sys.version.split()[0],
            "topics_sha256": hashlib.sha256(json.dumps(topics, sort_keys=True).encode()).hexdigest(),
            "stdlib_files_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        }
    if source.startswith(EMBEDDED_PREFIX):
        raise MlsaeError(f"data.source {source!r}: unknown embedded corpus (known: {EMBEDDED_PYTHON_DOCS})")
    files = _resolve_files(source)
    return {
        "source": source,
        "files": [{"path": _display(f), "size": f.stat().st_size, "sha256": file_sha256(f)} for f in files],
    }


def content_sha256(source: str) -> str:
    """The sha256 of the corpus's content, as resume identities record it (extract's store, train's
    checkpoint in stream mode): `manifest(source)` without the file paths, so the bytes of the
    files, in document order, decide it (a renamed file that keeps its place changes nothing; any
    edit changes it). `hf:` sources are identified by their spec only."""
    record = manifest(source)
    if "files" in record:
        record = {**record, "files": [[f["size"], f["sha256"]] for f in record["files"]]}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


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
            raise MlsaeError(f"data.source {source!r}: unknown embedded corpus (known: {EMBEDDED_PYTHON_DOCS})")
        documents = iter_python_docs()
    elif source.startswith(HF_PREFIX):
        documents = _iter_hf(source)
    else:
        documents = _iter_files(_resolve_files(source))
    return _non_empty(documents, source)


def ordered_documents(source: str, shuffle: bool | str, seed: int) -> Iterator[str]:
    """The documents of `source` in the order the contexts are cut from: the source's own order, or
    with `shuffle` a seeded shuffle of it (``numpy.random.default_rng([seed, 0])``; see
    ``SHUFFLE_BUFFER``). `shuffle` is `data.shuffle_documents`: true, false or ``"auto"`` (shuffle
    the embedded corpus only)."""
    docs = iter_documents(source)
    if resolve_shuffle(source, shuffle):
        return _shuffled(docs, seed)
    return docs


def resolve_shuffle(source: str, shuffle: bool | str) -> bool:
    """`data.shuffle_documents` as a bool: ``auto`` shuffles the embedded corpus only."""
    return source.startswith(EMBEDDED_PREFIX) if shuffle == "auto" else bool(shuffle)


def resolve_document_tokens(source: str, document_tokens: int | str) -> int:
    """`data.document_tokens` as an int (0: whole documents): ``auto`` is
    ``EMBEDDED_DOCUMENT_TOKENS`` for the embedded corpus, whole documents otherwise."""
    if document_tokens == "auto":
        return EMBEDDED_DOCUMENT_TOKENS if source.startswith(EMBEDDED_PREFIX) else 0
    return int(document_tokens)


def _shuffled(docs: Iterator[str], seed: int, buffer: int = SHUFFLE_BUFFER) -> Iterator[str]:
    rng = np.random.default_rng([seed, 0])
    pool: list[str] = []
    for doc in docs:
        if len(pool) < buffer:
            pool.append(doc)
            continue
        i = int(rng.integers(buffer))
        yield pool[i]
        pool[i] = doc
    rng.shuffle(pool)
    yield from pool


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
            f"data.source {source!r}: the Hugging Face dataset could not be reached ({_one_line(exc)}); {_OFFLINE_HINT}"
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
                f"data.source {source!r}: reading the Hugging Face dataset failed ({_one_line(exc)}); {_OFFLINE_HINT}"
            ) from exc
        if "text" not in row:
            raise MlsaeError(f"data.source {source!r}: rows have no 'text' field (fields: {sorted(row)})")
        text = row["text"]
        if text is not None:
            yield _unicode(str(text), f"data.source {source!r}")


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """`exc` as ``Type: first line of message``, shortened to `limit` characters."""
    message = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unicode(text: str, where: str) -> str:
    """`text` if it is valid Unicode; a JSON string can hold a lone surrogate (``"\\ud800"``), which
    no tokenizer can encode: one line naming where it is, instead of the tokenizer's traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MlsaeError(
            f"{where}: 'text' holds an unpaired surrogate {text[exc.start]!r} at character {exc.start}, which is not "
            f"valid Unicode text (fix or drop that document)"
        ) from None
    return text


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
            paths = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES)
            if not paths:
                raise MlsaeError(f"data.source {source!r}: directory has no {'/'.join(SUPPORTED_SUFFIXES)} file")
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
                    raise MlsaeError(f"{path}:{number}: 'text' must be a string, got {type(text).__name__}")
                yield _unicode(text, f"{path}:{number}")
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
    batches = parquet.iter_batches(batch_size=1024, columns=["text"])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as exc:  # a damaged row group or page
            raise MlsaeError(f"{path}: cannot read as Parquet ({_one_line(exc)})") from exc
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text
