"""Tests for mlsae.data.corpus and mlsae.data.contexts: document sources, context building, split and sizing."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import document_runs, route_documents, split_arrays
from mlsae.core.errors import MlsaeError
from mlsae.data import contexts
from mlsae.data.contexts import Contexts, DocumentSplit, build_contexts, build_splits, plan, train_documents
from mlsae.data.corpus import (
    EMBEDDED_DOCUMENT_TOKENS,
    EMBEDDED_PYTHON_DOCS,
    MIN_DOC_CHARS,
    SKIPPED_STDLIB_DIRS,
    _shuffled,
    file_docstrings,
    iter_documents,
    iter_python_docs,
    ordered_documents,
    resolve_document_tokens,
    resolve_shuffle,
    stdlib_source_files,
)

EOT = "<|endoftext|>"
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Return a new list containing all items from the iterable in ascending order.",
    "Sparse autoencoders decompose residual stream activations into latents.",
] * 20


def make_tokenizer(eos: bool = True, bos: bool = False) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer (exact decode round trip) with `<|endoftext|>`."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    kwargs = {}
    if eos:
        kwargs["eos_token"] = EOT
    if bos:
        kwargs["bos_token"] = EOT
    if not eos and not bos:
        kwargs["additional_special_tokens"] = [EOT]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def python_docs() -> list[str]:
    """The whole embedded corpus, read once."""
    return list(iter_documents(EMBEDDED_PYTHON_DOCS))


def error_line(excinfo: pytest.ExceptionInfo[MlsaeError]) -> str:
    """The message of a raised MlsaeError, checked to be one non-empty line."""
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def decode(tokenizer: PreTrainedTokenizerFast, ids: np.ndarray) -> str:
    return tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------------------------
# embedded:python-docs
# --------------------------------------------------------------------------------------------


def test_embedded_corpus_is_deterministic_and_lazy() -> None:
    first = iter_documents(EMBEDDED_PYTHON_DOCS)
    second = iter_documents(EMBEDDED_PYTHON_DOCS)
    head = [next(first) for _ in range(300)]
    assert head == [next(second) for _ in range(300)]
    assert len(set(head)) > 250


def test_embedded_corpus_same_in_a_fresh_process(python_docs: list[str]) -> None:
    """Independent of hash randomisation and of what was imported before."""
    script = (
        "import hashlib, sys\n"
        "from mlsae.data.corpus import iter_documents\n"
        "h = hashlib.sha256()\n"
        "for doc in iter_documents('embedded:python-docs'):\n"
        "    h.update(doc.encode() + b'\\0')\n"
        "print(h.hexdigest())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    expected = hashlib.sha256()
    for doc in python_docs:
        expected.update(doc.encode() + b"\0")
    assert result.stdout.strip() == expected.hexdigest()


def test_embedded_corpus_content_and_order(python_docs: list[str]) -> None:
    from pydoc_data.topics import topics

    expected_topics = [topics[k].strip() for k in sorted(topics)]
    expected_topics = [t for t in expected_topics if len(t) >= MIN_DOC_CHARS]
    assert python_docs[: len(expected_topics)] == expected_topics
    assert python_docs[0].startswith('The "assert" statement')

    rest = python_docs[len(expected_topics) :]
    json_doc = next(d for d in rest if d.startswith("JSON (JavaScript Object Notation)"))
    assert "lightweight data\ninterchange format" in json_doc  # cleandoc'd, original lines kept
    assert any(d.startswith("Deserialize ``fp``") for d in rest)  # json.load's docstring
    assert all(len(d) >= MIN_DOC_CHARS and d == d.strip() for d in python_docs)
    assert len(python_docs) > 2000
    assert sum(map(len, python_docs)) > 500_000  # far more text than the default run needs


def test_embedded_corpus_never_imports_stdlib_modules(python_docs: list[str]) -> None:
    # antigravity opens a web browser on import; its geohash docstring is in the corpus.
    assert "antigravity" not in sys.modules
    again = list(iter_documents(EMBEDDED_PYTHON_DOCS))
    assert any(d.startswith("Compute geohash() using the Munroe algorithm") for d in again)
    assert "antigravity" not in sys.modules


def test_stdlib_source_files_sorted_and_skipping() -> None:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_source_files(root)
    relative = [f.relative_to(root).parts for f in files]
    assert relative == sorted(relative)
    assert ("json", "__init__.py") in relative
    assert ("antigravity.py",) in relative
    assert not any(SKIPPED_STDLIB_DIRS & set(parts[:-1]) for parts in relative)
    assert all(f.suffix == ".py" for f in files)


def test_docstrings_in_source_order_never_importing(tmp_path: Path) -> None:
    marker = tmp_path / "imported.marker"
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    source = f'''
        """Module docstring: long enough to be kept as a document."""
        open({str(marker)!r}, "w").close()

        class Alpha:
            """Class Alpha docstring, also long enough to be kept.

                Indented continuation.
            Margin line.
            """

            def method(self):
                """Method docstring of Alpha, kept since long enough."""

                def inner():
                    """Inner function docstring, kept since long enough."""

        def short():
            """Too short."""

        if True:
            async def beta():
                """Async function under an if, long enough to be kept."""
        '''
    (lib / "pkg" / "mod.py").write_text(textwrap.dedent(source))
    (lib / "a_first.py").write_text('"""First file by sorted path order, long enough."""\n')
    broken = '"""A docstring in a file that does not parse at all."""\ndef (:\n'
    (lib / "broken.py").write_text(broken)
    for skipped in ("test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"):
        (lib / skipped).mkdir()
        docstring = f'"""Docstring inside {skipped}, must be skipped."""\n'
        (lib / skipped / "x.py").write_text(docstring)

    assert list(file_docstrings(lib / "broken.py")) == []
    docs = list(file_docstrings(lib / "pkg" / "mod.py"))
    assert docs == [
        "Module docstring: long enough to be kept as a document.",
        "Class Alpha docstring, also long enough to be kept.\n\n    Indented continuation.\nMargin line.",
        "Method docstring of Alpha, kept since long enough.",
        "Inner function docstring, kept since long enough.",
        "Async function under an if, long enough to be kept.",
    ]
    from pydoc_data.topics import topics

    all_docs = list(iter_python_docs(stdlib=lib))
    n_topics = sum(len(t.strip()) >= MIN_DOC_CHARS for t in topics.values())
    assert all_docs[n_topics:] == ["First file by sorted path order, long enough.", *docs]
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------


def test_txt_jsonl_parquet_and_glob(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("Second file,\nwhole file is one document.\n")
    (tmp_path / "a.txt").write_text("First file.")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "json one", "id": 1}) + "\n\n" + json.dumps({"text": "json two"}) + "\n"
    )
    table = pa.table({"text": ["pq one", None, "", "pq two"], "n": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "d.parquet")

    assert list(iter_documents(str(tmp_path / "b.txt"))) == ["Second file,\nwhole file is one document.\n"]
    assert list(iter_documents(str(tmp_path / "c.jsonl"))) == ["json one", "json two"]
    assert list(iter_documents(str(tmp_path / "d.parquet"))) == ["pq one", "pq two"]
    assert list(iter_documents(str(tmp_path / "*.txt"))) == [
        "First file.",
        "Second file,\nwhole file is one document.\n",
    ]
    everything = [
        "First file.",
        "Second file,\nwhole file is one document.\n",
        "json one",
        "json two",
        "pq one",
        "pq two",
    ]
    assert list(iter_documents(str(tmp_path / "*"))) == everything
    assert list(iter_documents(str(tmp_path))) == everything  # a directory: its files, sorted


def test_missing_path_and_empty_glob(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(MlsaeError) as excinfo:
        iter_documents(str(missing))
    assert str(missing) in error_line(excinfo) and "data.source" in error_line(excinfo)
    with pytest.raises(MlsaeError) as excinfo:
        iter_documents(str(tmp_path / "*.jsonl"))
    assert "*.jsonl" in error_line(excinfo) and "no file matches" in error_line(excinfo)


def test_unsupported_extension_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.csv").write_text("text\nnot supported\n")
    with pytest.raises(MlsaeError) as excinfo:
        iter_documents(str(tmp_path / "*"))
    assert str(tmp_path / "b.csv") in error_line(excinfo) and ".csv" in error_line(excinfo)


def test_missing_text_field_names_the_file(tmp_path: Path) -> None:
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(MlsaeError) as excinfo:
        list(iter_documents(str(bad_jsonl)))
    assert f"{bad_jsonl}:2" in error_line(excinfo) and "'text'" in error_line(excinfo)

    bad_parquet = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["x"]}), bad_parquet)
    with pytest.raises(MlsaeError) as excinfo:
        list(iter_documents(str(bad_parquet)))
    assert str(bad_parquet) in error_line(excinfo) and "'text'" in error_line(excinfo)

    not_json = tmp_path / "notjson.jsonl"
    not_json.write_text("{oops\n")
    with pytest.raises(MlsaeError) as excinfo:
        list(iter_documents(str(not_json)))
    assert f"{not_json}:1" in error_line(excinfo)


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("  \n\n")
    blank_column = pa.array([None, ""], type=pa.string())
    pq.write_table(pa.table({"text": blank_column}), tmp_path / "e.parquet")
    with pytest.raises(MlsaeError) as excinfo:
        list(iter_documents(str(tmp_path / "*")))
    assert "corpus is empty" in error_line(excinfo) and "data.source" in error_line(excinfo)


def test_unknown_embedded_corpus() -> None:
    with pytest.raises(MlsaeError) as excinfo:
        iter_documents("embedded:nope")
    assert EMBEDDED_PYTHON_DOCS in error_line(excinfo)


# --------------------------------------------------------------------------------------------
# hf:NAME[:CONFIG]
# --------------------------------------------------------------------------------------------


def test_hf_offline_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MlsaeError) as excinfo:
        iter_documents("hf:someone/some-corpus-that-is-not-cached")
    message = error_line(excinfo)
    assert "could not be reached" in message
    assert "hf:someone/some-corpus-that-is-not-cached" in message
    assert EMBEDDED_PYTHON_DOCS in message and "local path" in message


def test_hf_streams_text_with_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple] = []

    def fake_load_dataset(name: str, config: str | None, **kwargs: object) -> list[dict]:
        calls.append((name, config, kwargs))
        return [{"text": "row one", "meta": 1}, {"text": None}, {"text": "row two"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert list(iter_documents("hf:org/name:cfg")) == ["row one", "row two"]
    assert calls == [("org/name", "cfg", {"split": "train", "streaming": True})]
    list(iter_documents("hf:org/name"))
    assert calls[-1][1] is None

    def no_network(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'org/name' on the Hub\n(second line)")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(MlsaeError) as excinfo:
        iter_documents("hf:org/name")
    assert "could not be reached" in error_line(excinfo)

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"content": "x"}])
    with pytest.raises(MlsaeError) as excinfo:
        list(iter_documents("hf:org/name"))
    assert "'text'" in error_line(excinfo)


# --------------------------------------------------------------------------------------------
# build_contexts
# --------------------------------------------------------------------------------------------

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Return a new list containing all items from the iterable.",
    "Sparse autoencoders decompose activations.",
    "A fourth document, with some more words in it to fill contexts.",
] * 5


def split_stream(stream: np.ndarray, sep: int) -> list[np.ndarray]:
    """The runs of tokens between separators (the stream starts with one)."""
    assert stream[0] == sep
    cuts = np.flatnonzero(stream == sep)
    return np.split(stream, cuts)[1:]


def test_contexts_decode_back_to_the_corpus(tokenizer: PreTrainedTokenizerFast) -> None:
    sep = tokenizer.eos_token_id
    total = sum(1 + len(tokenizer.encode(d, add_special_tokens=False)) for d in DOCS)
    context = 16
    n_contexts = (total - 20) // context  # leaves the last document partly unused
    result = build_contexts(iter(DOCS), tokenizer, context, n_contexts)

    assert isinstance(result, Contexts)
    assert result.tokens.shape == (n_contexts, context) == result.special.shape == result.document.shape
    assert result.tokens.dtype == np.int32 and result.special.dtype == np.bool_
    # every token's document id is its document's index in the corpus order
    runs = document_runs(tokenizer, DOCS)
    tokens, document = split_arrays(runs, list(range(len(DOCS))), n_contexts, context)
    assert np.array_equal(result.tokens, tokens) and np.array_equal(result.document, document)
    runs = split_stream(result.tokens.ravel(), sep)
    texts = [decode(tokenizer, run[1:]) for run in runs]
    assert texts[:-1] == DOCS[: len(texts) - 1]
    assert DOCS[len(texts) - 1].startswith(texts[-1]) and texts[-1] != DOCS[len(texts) - 1]
    whole = decode(tokenizer, result.tokens.ravel())
    assert (EOT + EOT.join(DOCS)).startswith(whole) and len(whole) > 0.8 * len(EOT.join(DOCS))


def test_special_mask_is_exactly_the_separators(tokenizer: PreTrainedTokenizerFast) -> None:
    result = build_contexts(iter(DOCS), tokenizer, 8, 20)
    sep = tokenizer.eos_token_id
    assert np.array_equal(result.special, result.tokens == sep)
    assert result.special.sum() >= 5
    # a special token typed inside a document is flagged too
    doc = f"text with {EOT} inside"
    ids = tokenizer.encode(doc, add_special_tokens=False)
    result = build_contexts(iter([doc] * 2), tokenizer, 1 + len(ids), 1)
    assert np.flatnonzero(result.special[0]).tolist() == [0, 1 + ids.index(sep)]


def test_bos_separator_and_none(tokenizer: PreTrainedTokenizerFast) -> None:
    bos_only = make_tokenizer(eos=False, bos=True)
    result = build_contexts(iter(DOCS), bos_only, 8, 2)
    assert result.tokens[0, 0] == bos_only.bos_token_id and result.special[0, 0]
    neither = make_tokenizer(eos=False, bos=False)
    with pytest.raises(MlsaeError) as excinfo:
        build_contexts(iter(DOCS), neither, 8, 2)
    assert "EOS" in error_line(excinfo) and "BOS" in error_line(excinfo)


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """Like Gemma's: EOS separates documents and the tokenizer puts its own BOS before every text."""
    from tokenizers.processors import TemplateProcessing

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOT, "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    backend.post_processor = TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", backend.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOT, bos_token="<bos>")


def test_contexts_open_with_bos_for_a_tokenizer_that_adds_one(tokenizer: PreTrainedTokenizerFast) -> None:
    tok = bos_tokenizer()
    bos, sep = tok.bos_token_id, tok.eos_token_id
    assert contexts.leading_bos(tok) == bos
    assert contexts.leading_bos(tokenizer) is None  # adds nothing
    assert contexts.leading_bos(make_tokenizer(eos=False, bos=True)) is None  # BOS is the separator
    context, n = 12, 5
    result = build_contexts(iter(DOCS), tok, context, n)
    # independent: the SEP-joined stream, cut into n rows of context - 1, each row behind a BOS
    stream = np.concatenate([[sep, *tok.encode(d, add_special_tokens=False)] for d in DOCS])
    expected = np.concatenate([np.full((n, 1), bos), stream[: n * (context - 1)].reshape(n, context - 1)], axis=1)
    assert result.tokens.shape == (n, context) and np.array_equal(result.tokens, expected)
    assert result.special[:, 0].all() and np.array_equal(result.special, np.isin(expected, [bos, sep]))
    with pytest.raises(MlsaeError, match="at least 2"):
        build_contexts(iter(DOCS), tok, 1, 2)


def test_too_little_text(tokenizer: PreTrainedTokenizerFast) -> None:
    total = sum(1 + len(tokenizer.encode(d, add_special_tokens=False)) for d in DOCS)
    with pytest.raises(MlsaeError) as excinfo:
        build_contexts(iter(DOCS), tokenizer, 32, total // 32 + 1)
    message = error_line(excinfo)
    assert f"need {(total // 32 + 1) * 32} tokens" in message
    assert f"only {total}" in message and "data.train_tokens" in message


def test_empty_corpus_error_surfaces(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    (tmp_path / "blank.txt").write_text("\n")
    with pytest.raises(MlsaeError, match="corpus is empty"):
        build_contexts(iter_documents(str(tmp_path / "blank.txt")), tokenizer, 8, 1)


def test_bad_sizes(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(MlsaeError, match="data.context"):
        build_contexts(iter(DOCS), tokenizer, 0, 4)
    with pytest.raises(MlsaeError, match="contexts"):
        build_contexts(iter(DOCS), tokenizer, 8, 0)


def test_reads_only_as_much_as_needed(tokenizer: PreTrainedTokenizerFast) -> None:
    pulled = 0

    def documents() -> Iterator[str]:
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            if i == 3:
                raise AssertionError("read past what was needed")
            yield DOCS[i % len(DOCS)] * 3

    result = build_contexts(documents(), tokenizer, 8, 2)
    assert result.tokens.shape == (2, 8) and pulled <= 3

    pulled = 0

    def many() -> Iterator[str]:
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield DOCS[i % len(DOCS)]

    per_doc = np.mean([len(tokenizer.encode(d, add_special_tokens=False)) + 1 for d in DOCS])
    n_contexts = 50
    build_contexts(many(), tokenizer, 32, n_contexts)
    needed_docs = n_contexts * 32 / per_doc
    assert needed_docs <= pulled < 1.5 * needed_docs + 5


def test_long_documents_in_pieces(monkeypatch: pytest.MonkeyPatch, tokenizer: PreTrainedTokenizerFast) -> None:
    monkeypatch.setattr(contexts, "_MAX_PIECE_CHARS", 50)
    long_doc = "\n".join(f"line {i}: the quick brown fox" for i in range(40))
    other = "A second, short document."
    total = (
        2
        + len(tokenizer.encode(long_doc, add_special_tokens=False))
        + len(tokenizer.encode(other, add_special_tokens=False))
    )
    result = build_contexts(iter([long_doc, other]), tokenizer, 1, total)
    runs = split_stream(result.tokens.ravel(), tokenizer.eos_token_id)
    assert [decode(tokenizer, run[1:]) for run in runs] == [long_doc, other]


def test_build_from_embedded_corpus(tokenizer: PreTrainedTokenizerFast) -> None:
    result = build_contexts(iter_documents(EMBEDDED_PYTHON_DOCS), tokenizer, 64, 8)
    assert decode(tokenizer, result.tokens[0]).startswith(EOT + 'The "assert" statement')


# --------------------------------------------------------------------------------------------
# split and plan
# --------------------------------------------------------------------------------------------


SPLIT_DOCS = [f"Document {i}: {DOCS[i % len(DOCS)]}" for i in range(300)]


def test_build_splits_routes_whole_documents_by_the_seeded_rule(tokenizer: PreTrainedTokenizerFast) -> None:
    context, n_train, n_eval = 16, 20, 6
    runs = document_runs(tokenizer, SPLIT_DOCS)
    train_ids, eval_ids, eval_until = route_documents([len(r) for r in runs], n_train, n_eval, context, seed=0)
    train, evaluation, split = build_splits(iter(SPLIT_DOCS), tokenizer, context, n_train, n_eval, seed=0)
    assert split == DocumentSplit(seed=0, share=n_eval / (n_train + n_eval), eval_until=eval_until)
    assert split.to_json() == {"seed": 0, "share": n_eval / (n_train + n_eval), "eval_until": eval_until}
    for got, ids, n in ((train, train_ids, n_train), (evaluation, eval_ids, n_eval)):
        tokens, document = split_arrays(runs, ids, n, context)
        assert got.tokens.shape == got.document.shape == (n, context) and got.document.dtype == np.int64
        assert np.array_equal(got.tokens, tokens) and np.array_equal(got.document, document)
        assert np.array_equal(got.special, tokens == tokenizer.eos_token_id)
    # whole documents on one side only; each split's documents in corpus order
    assert not set(train.document.ravel()) & set(evaluation.document.ravel())
    assert (np.diff(train.document.ravel()) >= 0).all() and (np.diff(evaluation.document.ravel()) >= 0).all()
    assert split.is_eval(evaluation.document).all() and not split.is_eval(train.document).any()
    assert len(eval_ids) >= 3 and eval_ids != list(range(len(eval_ids)))  # a random choice, not the head
    assert max(eval_ids) < eval_until <= max(train_ids)  # after eval_until every document trains
    # is_eval is the documented rule on its own draws
    u = np.random.default_rng([0, 1]).random(400)
    assert np.array_equal(split.is_eval(np.arange(400)), (np.arange(400) < eval_until) & (u < split.share))
    # train_documents: every document that is not an eval one, in order; build_splits used a prefix
    listed = list(train_documents(iter(SPLIT_DOCS), split))
    assert [text for _, text in listed] == [SPLIT_DOCS[i] for i, _ in listed]
    assert [i for i, _ in listed] == [i for i in range(len(SPLIT_DOCS)) if not split.is_eval(np.array([i]))[0]]
    assert [i for i, _ in listed][: len(train_ids)] == train_ids


def test_build_splits_is_seeded(tokenizer: PreTrainedTokenizerFast) -> None:
    a = build_splits(iter(SPLIT_DOCS), tokenizer, 16, 20, 6, seed=0)
    b = build_splits(iter(SPLIT_DOCS), tokenizer, 16, 20, 6, seed=0)
    c = build_splits(iter(SPLIT_DOCS), tokenizer, 16, 20, 6, seed=1)
    for x, y in zip(a[:2], b[:2]):
        assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.document, y.document)
    assert a[2] == b[2]
    assert set(a[1].document.ravel()) != set(c[1].document.ravel())
    runs = document_runs(tokenizer, SPLIT_DOCS)
    _, eval_ids, _ = route_documents([len(r) for r in runs], 20, 6, 16, seed=1)
    assert sorted(set(c[1].document.ravel())) == eval_ids


def test_build_splits_cuts_each_document_to_document_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    context, n_train, n_eval, cut = 16, 20, 6, 5
    runs = document_runs(tokenizer, SPLIT_DOCS, cut)
    assert all(len(r) == cut for r in runs)  # every document is longer than the cut
    train_ids, eval_ids, eval_until = route_documents([len(r) for r in runs], n_train, n_eval, context, seed=0)
    train, evaluation, split = build_splits(iter(SPLIT_DOCS), tokenizer, context, n_train, n_eval, 0, cut)
    assert split.eval_until == eval_until
    for got, ids, n in ((train, train_ids, n_train), (evaluation, eval_ids, n_eval)):
        tokens, document = split_arrays(runs, ids, n, context)
        assert np.array_equal(got.tokens, tokens) and np.array_equal(got.document, document)
        _, per_document = np.unique(got.document, return_counts=True)
        assert per_document.max() == cut
    whole, _, _ = build_splits(iter(SPLIT_DOCS), tokenizer, context, n_train, n_eval, 0)
    assert len(np.unique(train.document)) > 2 * len(np.unique(whole.document))


def test_build_splits_too_little_text_and_bad_sizes(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(MlsaeError) as excinfo:
        build_splits(iter(SPLIT_DOCS[:10]), tokenizer, 16, 20, 6, seed=0)
    message = error_line(excinfo)
    assert "need 416 tokens" in message and "data.train_tokens + data.eval_tokens" in message
    with pytest.raises(MlsaeError, match="data.eval_tokens"):
        build_splits(iter(SPLIT_DOCS), tokenizer, 16, 20, 0, seed=0)
    with pytest.raises(MlsaeError, match="data.train_tokens"):
        build_splits(iter(SPLIT_DOCS), tokenizer, 16, 0, 6, seed=0)


def test_ordered_documents_shuffles_by_data_seed(tmp_path: Path) -> None:
    texts = [f"document number {i:02d}, with some words" for i in range(30)]
    for i, text in enumerate(texts):
        (tmp_path / f"d{i:02d}.txt").write_text(text)
    source = str(tmp_path)
    assert list(ordered_documents(source, False, 0)) == texts
    assert list(ordered_documents(source, "auto", 0)) == texts  # a user's corpus keeps its order
    shuffled = list(ordered_documents(source, True, 0))
    assert shuffled == [texts[i] for i in np.random.default_rng([0, 0]).permutation(30)]
    assert shuffled != texts and sorted(shuffled) == texts
    assert list(ordered_documents(source, True, 0)) == shuffled
    other = list(ordered_documents(source, True, 1))
    assert other != shuffled and sorted(other) == texts
    # past the buffer: a seeded sliding shuffle, still a permutation; a document leaves the buffer
    # only after it entered it
    slid = list(_shuffled(iter(texts), 0, buffer=8))
    assert sorted(slid) == texts and slid != texts and slid == list(_shuffled(iter(texts), 0, buffer=8))
    assert all(slid.index(t) >= i - 8 for i, t in enumerate(texts))


def test_auto_shuffle_and_document_tokens() -> None:
    assert resolve_shuffle(EMBEDDED_PYTHON_DOCS, "auto") is True
    assert resolve_shuffle("corpus/*.txt", "auto") is False and resolve_shuffle("hf:org/name", "auto") is False
    assert resolve_shuffle(EMBEDDED_PYTHON_DOCS, False) is False and resolve_shuffle("a.txt", True) is True
    assert resolve_document_tokens(EMBEDDED_PYTHON_DOCS, "auto") == EMBEDDED_DOCUMENT_TOKENS == 64
    assert resolve_document_tokens("corpus/*.txt", "auto") == 0
    assert resolve_document_tokens(EMBEDDED_PYTHON_DOCS, 0) == 0 and resolve_document_tokens("a.txt", 7) == 7
    head = list(itertools.islice(ordered_documents(EMBEDDED_PYTHON_DOCS, "auto", 0), 3))
    assert not head[0].startswith('The "assert" statement')  # shuffled: not the topics in key order


def test_plan() -> None:
    assert plan(65536, 8192, 128) == (512, 64)
    assert plan(100, 1, 128) == (1, 1)
    assert plan(129, 257, 128) == (2, 3)
    cases = [
        ((0, 8, 4), "data.train_tokens"),
        ((8, -1, 4), "data.eval_tokens"),
        ((8, 8, 0), "data.context"),
    ]
    for args, key in cases:
        with pytest.raises(MlsaeError) as excinfo:
            plan(*args)
        assert key in error_line(excinfo)
