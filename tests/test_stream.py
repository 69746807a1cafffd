"""Stream mode (`train.source: stream`, mlsae/data/stream.py): the context stream and its position,
the equivalence with store mode, resume, NaN, extract's sample-only store, DDP under torchrun.

Everything runs on the tiny random Llama over the shared test corpus (conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import (
    TRAIN_RAW,
    WRAPPER,
    assert_same_weights,
    identity,
    merge,
    read_csv,
    run_stage_in_process,
    stage_dir,
    stage_env,
)

from conftest import document_runs, route_documents, run_extract, split_arrays
from conftest import run_train as train
from mlsae.core import paths as C
from mlsae.core.errors import MlsaeError
from mlsae.core.params import Params, parse_params
from mlsae.data import contexts, corpus
from mlsae.models.registry import load_model
from mlsae.sae.model import MLSAE
from mlsae.stores.activations import ActivationStore

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def stream_raw(store: tuple[Path, dict], **over: dict) -> dict:
    """TRAIN_RAW in stream mode; sample_tokens = train_tokens makes the split store mode's."""
    raw = merge(
        merge(store[1], TRAIN_RAW),
        {"train": {"source": "stream"}, "data": {"sample_tokens": store[1]["data"]["train_tokens"]}},
    )
    return merge(raw, over)


def stream_contexts(p: Params, n_sample: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Independently of mlsae/data: (the train contexts stream mode trains on, the eval contexts,
    the eval documents) for a store whose head split holds `n_sample` train contexts. The head is
    split by the documented rule (conftest.route_documents); every document that is not an eval
    one is a train document, and the train documents' runs, joined, are cut into the n_train
    train contexts."""
    tok = load_model(p.model).tokenizer
    docs = list(corpus.iter_documents(p.data.source))
    runs = document_runs(tok, docs)
    n_train, n_eval = contexts.plan(p.data.train_tokens, p.data.eval_tokens, p.data.context)
    _, eval_ids, eval_until = route_documents([len(r) for r in runs], n_sample, n_eval, p.data.context, p.data.seed)
    u = np.random.default_rng([p.data.seed, 1]).random(len(docs))
    share = n_eval / (n_sample + n_eval)
    train_ids = [i for i in range(len(docs)) if not (i < eval_until and u[i] < share)]
    assert not set(train_ids) & set(eval_ids) and set(eval_ids) <= set(range(eval_until))
    train_tokens, _ = split_arrays(runs, train_ids, n_train, p.data.context)
    eval_tokens, _ = split_arrays(runs, eval_ids, n_eval, p.data.context)
    return train_tokens, eval_tokens, eval_ids


class CountingTokenizer:
    """The tiny tokenizer, recording every text it is asked to encode."""

    def __init__(self, real):
        self.real, self.texts = real, []

    def __call__(self, texts, **kw):
        self.texts += list(texts)
        return self.real(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_context_stream_gives_build_contexts_rows_and_resumes_where_it_stopped(store: tuple[Path, dict]) -> None:
    source, width = store[1]["data"]["source"], 32
    tok = load_model("tiny-llama").tokenizer
    whole = contexts.build_contexts(corpus.iter_documents(source), tok, width, 70)
    stream = contexts.ContextStream(enumerate(corpus.iter_documents(source)), tok, width, 70)
    parts = [stream.take(n) for n in (1, 5, 3, 11)]
    position = stream.position
    assert position["context"] == 20
    parts.append(stream.take(50))
    got = np.concatenate([c.tokens for c in parts])
    np.testing.assert_array_equal(got, whole.tokens)
    np.testing.assert_array_equal(np.concatenate([c.special for c in parts]), whole.special)
    np.testing.assert_array_equal(np.concatenate([c.document for c in parts]), whole.document)

    counting = CountingTokenizer(tok)
    resumed = contexts.ContextStream(enumerate(corpus.iter_documents(source)), counting, width, 70, position)
    np.testing.assert_array_equal(resumed.take(50).tokens, whole.tokens[20:])
    # the pieces before the position were skipped unread by the tokenizer: the first text it saw
    # is the piece the position points into
    docs = list(corpus.iter_documents(source))
    assert counting.texts[0] == docs[position["piece"]]
    assert not set(counting.texts) & set(docs[: position["piece"]])


def test_stream_equals_store_mode_with_the_same_token_order(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path
) -> None:
    """Float32 store, split made equal (sample_tokens >= train_tokens), store chunks visited in
    order and whole chunks per shuffle buffer: stream mode trains on exactly store mode's batches."""
    raw = stream_raw(store)
    p_stream = parse_params(raw)
    p_store = parse_params(merge(raw, {"train": {"source": "store"}}))
    # whole store chunks per buffer, whole contexts per buffer: the buffers hold the same tokens
    assert reader.dtype == "float32" and p_store.train.shuffle_buffer_tokens % reader.chunk_tokens == 0
    m_store, h_store = train(
        p_store, reader, identity(reader), tmp_path / "store", tmp_path / "c1", progress=False, chunk_order="sequential"
    )
    m_stream, h_stream = train(p_stream, reader, identity(reader), tmp_path / "stream", tmp_path / "c2", progress=False)
    assert m_stream["steps"] == m_store["steps"] > 10
    assert m_stream["train_source"] == "stream" and m_store["train_source"] == "store"
    # every train token through the model once per epoch; the b_pre sample reuses the first buffer
    assert m_stream["model_tokens"] == p_stream.train.epochs * p_stream.data.train_tokens
    np.testing.assert_allclose([h["loss"] for h in h_stream], [h["loss"] for h in h_store], rtol=1e-5)
    assert_same_weights(MLSAE.load(tmp_path / "stream"), MLSAE.load(tmp_path / "store"), atol=1e-5)

    # the default (seeded chunk order) differs from stream mode only in that order: same tokens
    m_shuffled, h_shuffled = train(
        p_store, reader, identity(reader), tmp_path / "shuffled", tmp_path / "c3", progress=False
    )
    assert m_shuffled["steps"] == m_store["steps"]
    assert abs(m_shuffled["fvu"] - m_stream["fvu"]) < 0.05
    assert [h["loss"] for h in h_shuffled] != [h["loss"] for h in h_store]


def test_stream_split_beyond_the_sample(
    store: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a smaller sample, stream mode trains on the train documents of the head's split (the
    stored sample first), then on every later document: never on an eval document, each train
    context once, in corpus order."""
    from mlsae.data.stream import StreamBatches, check_store

    p = parse_params(stream_raw(store, data={"sample_tokens": 256}, train={"epochs": 1}))
    run_extract(p, tmp_path / "s.zarr")
    sample_store = ActivationStore(str(tmp_path / "s.zarr"))
    split = check_store(p.data, "stream", sample_store.attrs)
    expected, expected_eval, eval_ids = stream_contexts(p, n_sample=8)
    assert sample_store.n_tokens("train") == 8 * 32
    np.testing.assert_array_equal(sample_store.meta("train", C.TOKENS), expected[:8].reshape(-1))
    np.testing.assert_array_equal(sample_store.meta("eval", C.TOKENS), expected_eval.reshape(-1))
    assert sorted(set(sample_store.meta("eval", C.DOCUMENT).tolist())) == eval_ids
    assert split.eval_until > max(eval_ids)

    seen: list[np.ndarray] = []
    real = StreamBatches._residuals
    monkeypatch.setattr(
        StreamBatches, "_residuals", lambda self, tokens: (seen.append(tokens.copy()), real(self, tokens))[1]
    )
    source = StreamBatches(
        p.data,
        p.train,
        p.extract,
        split,
        load_model(p.model),
        list(range(sample_store.n_layers)),
        sample_store.skip_first,
    )
    assert (source.n_train, source.n_eval, source.n_sample) == (64, 16, 8)
    assert sum(1 for _ in source.batches()) > 0
    np.testing.assert_array_equal(np.concatenate(seen), expected)  # in corpus order, each once
    # and the documents behind them: the library's own stream of train documents agrees
    docs = corpus.ordered_documents(p.data.source, p.data.shuffle_documents, p.data.seed)
    ctx = contexts.ContextStream(contexts.train_documents(docs, split), load_model(p.model).tokenizer, 32, 64).take(64)
    np.testing.assert_array_equal(ctx.tokens, expected)
    assert not set(ctx.document.ravel().tolist()) & set(eval_ids)
    assert not split.is_eval(ctx.document).any()
    assert ctx.document.max() > split.eval_until  # it reads beyond the head


def test_stream_resume_equals_uninterrupted_and_reads_nothing_twice(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path
) -> None:
    p = parse_params(stream_raw(store))
    full, h_full = train(p, reader, identity(reader), tmp_path / "full", tmp_path / "c0", progress=False)
    out, ckpt = tmp_path / "sae", tmp_path / "ckpt"
    metrics, history = train(p, reader, identity(reader), out, ckpt, progress=False, max_steps=5)
    assert metrics == {} and len(history) == 5 and not out.exists()
    saved = torch.load(ckpt / C.CHECKPOINT, weights_only=True)
    state = saved["stream"]
    # 3 batches per 512-token buffer (separators are left out): step 5 is in buffer 1, 1 batch remains
    assert (state["epoch"], state["buffer"]) == (0, 1)
    assert state["rows"].shape == (1, p.train.batch_tokens, reader.n_layers, reader.d_model)
    assert state["end"]["context"] > 0

    metrics, history = train(p, reader, identity(reader), out, ckpt, progress=False)
    buffer = p.train.shuffle_buffer_tokens
    # the resumed run ran the model only on the buffers after the checkpoint's
    assert metrics["model_tokens"] == full["model_tokens"] - 2 * buffer
    assert metrics["steps"] == full["steps"] and [h["step"] for h in history] == list(range(1, full["steps"] + 1))
    np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in h_full], rtol=1e-5)
    assert_same_weights(MLSAE.load(out), MLSAE.load(tmp_path / "full"), atol=1e-6)
    assert not (ckpt / C.CHECKPOINT).exists()


@pytest.mark.slow  # starts a stage process
def test_stream_kill_9_then_rerun_equals_uninterrupted(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = stream_raw(store, train={"epochs": 3, "checkpoint_every": 1})
    p = parse_params(raw)
    work = stage_dir(tmp_path / "work", store, raw)
    ckpt = work / C.CHECKPOINTS_DIR / "train" / C.CHECKPOINT
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "stages" / "train.py")],
        cwd=work,
        env=stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300  # a loaded machine (pytest -n 2 beside other work) is slow to start
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    # kill at once: on a fast machine the rest of the run can finish (and delete its checkpoint)
    # within a fraction of a second, so any wait here risks killing a finished run
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    killed = torch.load(ckpt, weights_only=True)
    assert killed["step"] >= 1 and "stream" in killed
    assert not (work / C.SAE_DIR).exists()

    assert run_stage_in_process(work, monkeypatch) == 0
    full, history = train(p, reader, identity(reader), tmp_path / "ref", tmp_path / "ref-ckpt", progress=False)
    assert killed["step"] < full["steps"]
    rows = read_csv(work / C.TRAIN_PLOT)
    assert len(rows) == full["steps"]
    # the resumed run streamed only what followed the checkpoint's buffer
    resumed = json.loads((work / C.TRAIN_METRICS).read_text())
    assert resumed["model_tokens"] < full["model_tokens"]
    np.testing.assert_allclose([float(r["loss"]) for r in rows], [h["loss"] for h in history], rtol=1e-5)
    assert_same_weights(MLSAE.load(work / C.SAE_DIR), MLSAE.load(tmp_path / "ref"), atol=1e-5)


def test_stream_nan_keeps_last_good_checkpoint(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlsae.sae.trainer as train_mod

    real, calls = train_mod.train_step, []

    def nan_at_7(model, opt, x, grad_clip=0.0):
        calls.append(1)
        if len(calls) == 7:
            x = x * float("nan")
        return real(model, opt, x, grad_clip)

    monkeypatch.setattr(train_mod, "train_step", nan_at_7)
    p = parse_params(stream_raw(store))
    with pytest.raises(MlsaeError, match="at step 7; last good checkpoint kept"):
        train(p, reader, identity(reader), tmp_path / "sae", tmp_path / "ckpt", progress=False)
    kept = torch.load(tmp_path / "ckpt" / C.CHECKPOINT, weights_only=True)
    assert kept["step"] == 6 and "stream" in kept and not (tmp_path / "sae").exists()


def test_stream_extract_stores_the_sample_whatever_the_train_budget(store: tuple[Path, dict], tmp_path: Path) -> None:
    base = merge(store[1], {"train": {"source": "stream"}, "data": {"sample_tokens": 256}})
    paths = {}
    for train_tokens in (2048, 8192):
        paths[train_tokens] = tmp_path / f"s{train_tokens}.zarr"
        run_extract(parse_params(merge(base, {"data": {"train_tokens": train_tokens}})), paths[train_tokens])
    small, large = (ActivationStore(str(paths[n])) for n in (2048, 8192))
    assert small.n_tokens("train") == large.n_tokens("train") == 256
    assert small.n_tokens("eval") == large.n_tokens("eval") == 512
    assert small.attrs == large.attrs and small.attrs["train_source"] == "stream"
    for split in ("train", "eval"):
        torch.testing.assert_close(small.resid(split, 0, 10**6), large.resid(split, 0, 10**6), rtol=0, atol=0)
    size = {n: sum(f.stat().st_size for f in paths[n].rglob("*") if f.is_file()) for n in paths}
    assert size[2048] == size[8192]
    # the stored sample and eval contexts are the stream's head split
    p = parse_params(merge(base, {"data": {"train_tokens": 8192}}))
    expected, expected_eval, _ = stream_contexts(p, n_sample=8)
    np.testing.assert_array_equal(large.meta("train", "tokens"), expected[:8].reshape(-1))
    np.testing.assert_array_equal(large.meta("eval", "tokens"), expected_eval.reshape(-1))


def test_stream_mode_trains_on_any_store_cut_from_the_same_documents(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path
) -> None:
    """Stream mode trains on the train documents of the store's own split, whatever the store's
    mode and budget: a store-mode store is fine, and no eval document is ever trained on; a store
    cut from other documents is refused, and store mode refuses a stream-mode store."""
    from mlsae.data.stream import check_store

    # a store-mode store, a larger stream budget and another sample size
    p = parse_params(stream_raw(store, data={"sample_tokens": 256, "train_tokens": 4096}))
    split = check_store(p.data, "stream", reader.attrs)
    assert split == contexts.DocumentSplit(**reader.attrs["split"])
    n_train, _ = contexts.plan(p.data.train_tokens, p.data.eval_tokens, p.data.context)
    docs = corpus.ordered_documents(p.data.source, p.data.shuffle_documents, p.data.seed)
    ctx = contexts.ContextStream(
        contexts.train_documents(docs, split), load_model(p.model).tokenizer, p.data.context, n_train
    ).take(n_train)
    eval_docs = set(reader.meta("eval", C.DOCUMENT).tolist())
    assert eval_docs and not set(ctx.document.ravel().tolist()) & eval_docs
    stored = sorted(set(reader.meta("train", C.DOCUMENT).tolist()))
    streamed = list(dict.fromkeys(ctx.document.ravel().tolist()))
    assert streamed[: len(stored)] == stored and len(streamed) > len(stored)  # the store's, then more
    metrics, history = train(p, reader, identity(reader), tmp_path / "a", tmp_path / "c", max_steps=2)
    assert metrics == {} and len(history) == 2
    # a stream-mode store holds only the sample: store mode refuses to train on it
    base = merge(store[1], {"train": {"source": "stream"}, "data": {"sample_tokens": 256}})
    run_extract(parse_params(base), tmp_path / "s.zarr")
    sample_store = ActivationStore(str(tmp_path / "s.zarr"))
    p = parse_params(merge(stream_raw(store), {"train": {"source": "store"}}))
    with pytest.raises(MlsaeError, match="^train.source: store, but the activation store was extracted for stream"):
        train(p, sample_store, identity(sample_store), tmp_path / "b", tmp_path / "c")
    # ... and stream mode refuses a store cut from other documents
    for over in ({"seed": 1}, {"document_tokens": 16}, {"eval_tokens": 256}, {"context": 16}):
        p = parse_params(stream_raw(store, data=over))
        with pytest.raises(
            MlsaeError,
            match="^train.source: stream, but the activation store was cut from other documents .*; rerun extract$",
        ):
            check_store(p.data, "stream", sample_store.attrs)
    p = parse_params(stream_raw(store, data={"seed": 1}))
    with pytest.raises(MlsaeError, match="rerun extract"):
        train(p, sample_store, identity(sample_store), tmp_path / "b", tmp_path / "c")


def test_stream_sample_reads_past_a_buffer_without_batches(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path
) -> None:
    """A buffer that is exactly one batch of tokens holds no whole batch of *usable* tokens (the
    separators are left out): the run has no step at all, and says so in one line."""
    p = parse_params(
        stream_raw(store, train={"batch_tokens": 512, "shuffle_buffer_tokens": 512}, sae={"dead_tokens": 128})
    )
    with pytest.raises(MlsaeError, match="^train.batch_tokens: no shuffle buffer holds a whole batch"):
        train(p, reader, identity(reader), tmp_path / "a", tmp_path / "c", progress=False)


def test_bad_train_source_is_one_clear_error(store: tuple[Path, dict]) -> None:
    with pytest.raises(MlsaeError, match="^train.source: input should be 'store' or 'stream' \\(got 'disk'\\)$"):
        parse_params(merge(store[1], {"train": {"source": "disk"}}))
    with pytest.raises(MlsaeError, match="^data.sample_tokens: input should be greater than or equal to 1"):
        parse_params(merge(store[1], {"data": {"sample_tokens": 0}}))


@pytest.mark.slow  # spawns torchrun
def test_torchrun_stream_ranks_read_disjoint_slices_and_agree(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path
) -> None:
    # float16 buffers: the checkpoint gathers every rank's remaining rows in that dtype
    raw = stream_raw(store, train={"epochs": 1}, extract={"dtype": "float16"})
    work = stage_dir(tmp_path / "work", store, raw)
    (work / "wrapper.py").write_text(WRAPPER)
    run = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "wrapper.py", str(ROOT / "stages" / "train.py")],
        cwd=work,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    logs = [json.loads((work / f"log_rank{r}.json").read_text()) for r in range(2)]
    p = parse_params(raw)
    # disjoint slices that together are every train context once (the first buffer is streamed
    # once: b_pre's sample and the first steps share it)
    seen = [tuple(map(tuple, log["contexts"])) for log in logs]
    assert not set(seen[0]) & set(seen[1])
    n_train, _ = contexts.plan(p.data.train_tokens, p.data.eval_tokens, p.data.context)
    expected, _, _ = stream_contexts(p, n_sample=n_train)  # sample_tokens = train_tokens: store mode's split
    assert sorted(seen[0] + seen[1]) == sorted(tuple(r) for r in expected.tolist())
    # same number of steps, each rank half the global batch, the same dead counters after every step
    steps = json.loads((work / C.TRAIN_METRICS).read_text())["steps"]
    assert logs[0]["batch"] == logs[1]["batch"] == [p.train.batch_tokens // 2] * steps
    assert logs[0]["dead"] == logs[1]["dead"] and steps > 5
    assert json.loads((work / C.TRAIN_METRICS).read_text())["model_tokens"] == p.data.train_tokens
