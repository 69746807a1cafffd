"""The extract stage: stored residuals against independent HF forwards, token metadata, the
seeded split, resuming, store layout, metrics, storage dtypes and one-line failures."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, ascii_docs, document_runs, route_documents, split_arrays, stage_command, stage_env, tiny_raw
from conftest import run_extract as extract_params
from mlsae.core import paths as C
from mlsae.core.errors import MlsaeError
from mlsae.core.params import parse_params
from mlsae.data import extract as extract_mod
from mlsae.data.corpus import ordered_documents
from mlsae.models.tiny import EOS, build_tiny, tiny_tokenizer
from mlsae.stores import activations as store

ARRAYS = (C.RESID, C.TOKENS, C.CONTEXT, C.POSITION, C.SPECIAL, C.DOCUMENT)
SHRINK_SHARDS = "import mlsae.stores.activations as s; s.SHARD_TARGET_BYTES = 1"  # 8 contexts per shard


def run_extract(raw: dict, out: Path, **kwargs: Any) -> dict:
    return extract_params(parse_params(raw), out, **kwargs)


def arrays(path: Path) -> dict[tuple[str, str], np.ndarray]:
    root = store.open_root(str(path))
    return {(s, k): root[s][k][:] for s in C.SPLITS for k in ARRAYS}


def assert_same_arrays(a: Path, b: Path) -> None:
    x, y = arrays(a), arrays(b)
    assert x.keys() == y.keys()
    for key in x:
        assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), key


def attrs(path: Path) -> dict:
    return dict(store.open_root(str(path)).attrs)


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def hf_blocks(name: str, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.nn.Module]:
    """From an independent, unwrapped HF copy: (hidden_states as (B, T, L+1, d), the last
    block's raw output via a forward hook on it, the copy's final norm)."""
    hf = build_tiny(name)[0].eval()
    grabbed: list[torch.Tensor] = []
    last = hf.base_model.layers[-1]
    handle = last.register_forward_hook(lambda m, a, out: grabbed.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            hs = hf(ids, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    base = hf.base_model
    norm = base.norm if hasattr(base, "norm") else base.final_layer_norm
    return torch.stack(hs, dim=2), grabbed, norm


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# --- a reference store, written by the stage entry point ------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, text_corpus: Path) -> dict:
    """tiny-neox, ~20k tokens (context 64, 16384 train + 4096 eval), default shard sizes, run
    through `stages/extract.py`'s main in-process (writing data/ and reports/ in a tmp dir)."""
    import runpy

    work = tmp_path_factory.mktemp("reference")
    raw = tiny_raw(text_corpus, data__train_tokens=16384, data__eval_tokens=4096, extract__batch_size=16)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    main = runpy.run_path(str(ROOT / "stages" / "extract.py"))["main"]
    cwd = os.getcwd()
    os.chdir(work)
    try:
        main("params.yaml")
    finally:
        os.chdir(cwd)
    return {
        "raw": raw,
        "work": work,
        "store": work / C.ACTIVATIONS,
        "metrics": json.loads((work / C.EXTRACT_METRICS).read_text()),
    }


def test_reference_store_layout_and_attrs(reference: dict) -> None:
    path, m = reference["store"], reference["metrics"]
    a = attrs(path)
    assert a["complete"] is True and a["model"] == "tiny-neox" and a["hook"] == C.HOOK_NAME
    assert (a["n_layers"], a["d_model"], a["context"], a["dtype"]) == (4, 64, 64, "float16")
    assert a["done"] == {"train": 1, "eval": 1}  # ~20k tokens of a tiny model: one shard each
    root = store.open_root(str(path))
    assert root["train"][C.RESID].shape == (16384, 4, 64) and root["eval"][C.RESID].shape == (4096, 4, 64)
    assert root["train"][C.RESID].dtype == np.float16
    assert root["train"][C.TOKENS].dtype == np.int32 and root["train"][C.CONTEXT].dtype == np.int32
    assert root["train"][C.POSITION].dtype == np.int16 and root["train"][C.SPECIAL].dtype == bool
    assert root["train"][C.DOCUMENT].dtype == np.int64 and root["eval"][C.DOCUMENT].shape == (4096,)
    assert a["schema"] == C.STORE_SCHEMA
    assert (a["data_seed"], a["shuffle_documents"], a["document_tokens"]) == (0, False, 0)  # a local corpus: auto
    assert set(a["split"]) == {"seed", "share", "eval_until"} and a["split"]["seed"] == 0
    assert a["split"]["share"] == pytest.approx(64 / 320)
    assert (m["tokens"], m["train_tokens"], m["eval_tokens"]) == (20480, 16384, 4096)
    # the documents counted in extract.json: those with an analysed token, counted here directly
    for split in C.SPLITS:
        g = root[split]
        kept = ~g[C.SPECIAL][:] & ~((g[C.POSITION][:] == 0) & bool(a["skip_first"]))
        assert m[f"{split}_documents"] == len(set(g[C.DOCUMENT][:][kept].tolist())) >= 1
    assert m["train_documents"] > m["eval_documents"]
    assert m["resumed"] is False and m["tokens_per_s"] > 0
    # no residual left at the fill value: every token was written
    for split in C.SPLITS:
        assert np.all(np.abs(root[split][C.RESID][:].astype(np.float32)).sum(axis=(1, 2)) > 0)


def test_store_has_few_files(reference: dict) -> None:
    files = [p for p in reference["store"].rglob("*") if p.is_file()]
    assert 5 <= len(files) <= 40, [str(f) for f in files]


def test_tokens_decode_back_to_the_corpus(reference: dict) -> None:
    """Each split is its documents' runs (separator + text) joined, cut into contexts, with the
    documents routed by the documented seeded rule (restated in conftest.route_documents)."""
    root = store.open_root(str(reference["store"]))
    tok = tiny_tokenizer()
    docs = ascii_docs()
    runs = document_runs(tok, docs)
    train_ids, eval_ids, eval_until = route_documents([len(r) for r in runs], 256, 64, 64, seed=0)
    assert store.open_root(str(reference["store"])).attrs["split"]["eval_until"] == eval_until
    for split, ids, n in (("train", train_ids, 256), ("eval", eval_ids, 64)):
        tokens, document = split_arrays(runs, ids, n, 64)
        assert np.array_equal(root[split][C.TOKENS][:], tokens.reshape(-1))
        assert np.array_equal(root[split][C.DOCUMENT][:], document.reshape(-1))
        text = tok.decode(root[split][C.TOKENS][:].tolist(), skip_special_tokens=False)
        expected = "".join(EOS + docs[i] for i in ids)
        assert len(text) > 0.9 * n * 64 and text == expected[: len(text)]
    assert not set(train_ids) & set(eval_ids) and len(eval_ids) >= 1


def test_context_position_and_special(reference: dict) -> None:
    root = store.open_root(str(reference["store"]))
    eos = tiny_tokenizer().convert_tokens_to_ids(EOS)
    documents = []
    for split, n in (("train", 256), ("eval", 64)):
        g = root[split]
        tokens, context, position, special, document = (
            g[k][:] for k in (C.TOKENS, C.CONTEXT, C.POSITION, C.SPECIAL, C.DOCUMENT)
        )
        assert tokens.shape[0] == n * 64
        # a context's index is its place in its own split's stream
        assert np.array_equal(context, np.repeat(np.arange(n, dtype=np.int32), 64))
        assert np.array_equal(position, np.tile(np.arange(64, dtype=np.int16), n))
        assert np.array_equal(special, tokens == eos) and special.any()
        # each split's stream starts with a separator; a document id changes only at a separator
        assert special[0] and position[0] == 0
        changes = np.flatnonzero(np.diff(document)) + 1
        assert (np.diff(document) >= 0).all() and special[changes].all()
        documents.append(set(document.tolist()))
    assert not documents[0] & documents[1]  # no document in both splits


def test_adjacent_cos_metric_matches_numpy(reference: dict) -> None:
    root = store.open_root(str(reference["store"]))
    x = root["eval"][C.RESID][:].astype(np.float64)
    keep = ~root["eval"][C.SPECIAL][:]
    x = x[keep] - x[keep].mean(axis=0)
    cos = [
        np.mean(
            np.sum(x[:, i] * x[:, i + 1], -1)
            / (np.linalg.norm(x[:, i], axis=-1) * np.linalg.norm(x[:, i + 1], axis=-1))
        )
        for i in range(x.shape[1] - 1)
    ]
    m = reference["metrics"]
    np.testing.assert_allclose(m["adjacent_cos_by_layer"], cos, rtol=1e-6)
    assert m["adjacent_cos"] == pytest.approx(np.mean(cos), rel=1e-6)
    assert all(0.2 < c < 1 for c in cos)  # adjacent blocks are similar, not identical


# --- residuals against HF -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-neox", "tiny-llama"])
def test_stored_residuals_are_hf_hidden_states(name: str, tiny_params: Callable, tmp_path: Path) -> None:
    out = tmp_path / "a.zarr"
    run_extract(tiny_params(model=name, data__train_tokens=512, data__eval_tokens=256), out)
    reader = store.ActivationStore(str(out))
    for split in C.SPLITS:
        n = reader.n_tokens(split)
        ids = torch.from_numpy(reader.meta(split, C.TOKENS)).long().reshape(-1, 64)
        resid = reader.resid(split, 0, n).reshape(ids.shape[0], 64, 4, 64)
        hs, grabbed, norm = hf_blocks(name, ids)
        for i in range(3):
            assert rel(resid[:, :, i], hs[:, :, i + 1]) < 1e-3, (split, i)
        last = resid[:, :, 3]
        assert rel(last, grabbed[0]) < 1e-3  # the last block's own output, before the final norm
        assert rel(last, hs[:, :, 4]) > 0.1  # which is not HF's last hidden state ...
        with torch.no_grad():
            assert rel(norm(last), hs[:, :, 4]) < 2e-3  # ... but the final norm of it is


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_storage_dtypes_round_trip(dtype: str, tiny_params: Callable, tmp_path: Path) -> None:
    out = tmp_path / "a.zarr"
    run_extract(
        tiny_params(model="tiny-llama", data__train_tokens=256, data__eval_tokens=128, extract__dtype=dtype), out
    )
    reader = store.ActivationStore(str(out))
    assert reader.dtype == dtype
    ids = torch.from_numpy(reader.meta("eval", C.TOKENS)).long().reshape(-1, 64)
    hs, grabbed, _ = hf_blocks("tiny-llama", ids)
    expected = torch.cat([hs[:, :, 1:4], grabbed[0][:, :, None]], dim=2).reshape(-1, 4, 64)
    raw = reader.resid("eval", 0, reader.n_tokens("eval"), raw=True)
    full = reader.resid("eval", 0, reader.n_tokens("eval"))
    assert raw.dtype == store.TORCH_DTYPES[dtype] and full.dtype == torch.float32
    if dtype == "float32":
        assert store.open_root(str(out))["eval"][C.RESID].dtype == np.float32
        assert rel(full, expected) < 1e-5
    else:
        assert store.open_root(str(out))["eval"][C.RESID].dtype == np.uint16
        assert rel(full, expected) < 8e-3  # bfloat16 keeps 8 significant bits
        # the stored bits are bfloat16's, not float16's: they round-trip to the nearest bfloat16
        same = (raw.view(torch.int16) == expected.to(torch.bfloat16).view(torch.int16)).float().mean()
        assert same > 0.9
    # layer selection reads the same values
    assert torch.equal(reader.resid("eval", 3, 9, layers=[1, 3]), full[3:9][:, [1, 3]])


# --- split ----------------------------------------------------------------------------------


def test_store_writes_refuse_non_finite_values() -> None:
    x = torch.zeros(4, 3, 8)
    x[2, 1, 5] = 7e4  # above float16's 65504
    with pytest.raises(
        MlsaeError,
        match=r"^extract\.dtype: float16 cannot hold the residuals \(\|x\| reaches 7e\+04 "
        r"at block 1; float16 max 6\.55e\+04\); use extract\.dtype: bfloat16 or float32$",
    ):
        store.to_storage(x, "float16")
    back = store.from_storage(store.to_storage(x, "bfloat16"), "bfloat16").float()
    assert torch.isfinite(back).all() and abs(float(back[2, 1, 5]) - 7e4) < 7e4 * 2**-8  # bfloat16 rounding
    y = torch.zeros(4, 3, 8)
    y[0, 2, 0] = float("nan")
    with pytest.raises(MlsaeError, match=r"^model: the residual stream is non-finite at block 2; nothing was written$"):
        store.to_storage(y, "float32")


def test_overflowing_extract_fails_in_one_line_and_leaves_no_store(tiny_params: Callable, workdir: Path) -> None:
    """A model whose residuals float16 cannot hold: the stage exits 1 with one line, no store."""
    (workdir / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    prelude = (
        "import mlsae.models.registry as m; _r = m.LoadedModel.residuals; "
        "m.LoadedModel.residuals = lambda self, ids: _r(self, ids) * 1e6"
    )
    proc = subprocess.run(
        stage_command("extract", prelude), cwd=workdir, env=stage_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert (
        lines[-1].startswith("error: extract: extract.dtype: float16 cannot hold the residuals")
        and "bfloat16" in lines[-1]
    )
    assert not (workdir / C.ACTIVATIONS).exists() and not (workdir / C.EXTRACT_METRICS).exists()


def test_split_is_seeded_deterministic_and_disjoint(tiny_params: Callable, tmp_path: Path) -> None:
    """data.seed picks the document split: the same seed gives the same store, another seed other
    eval documents; a document's tokens are the same whichever split it lands in."""
    sizes = dict(data__context=32, data__train_tokens=1024, data__eval_tokens=256, data__document_tokens=40)
    run_extract(tiny_params(**sizes), tmp_path / "a.zarr")
    run_extract(tiny_params(**sizes), tmp_path / "b.zarr")
    run_extract(tiny_params(data__seed=1, **sizes), tmp_path / "c.zarr")
    assert_same_arrays(tmp_path / "a.zarr", tmp_path / "b.zarr")
    a, c = arrays(tmp_path / "a.zarr"), arrays(tmp_path / "c.zarr")
    assert attrs(tmp_path / "c.zarr")["data_seed"] == 1 and attrs(tmp_path / "c.zarr")["split"]["seed"] == 1
    eval_a, eval_c = set(a["eval", C.DOCUMENT].tolist()), set(c["eval", C.DOCUMENT].tolist())
    assert len(eval_a) >= 3 and eval_a != eval_c
    runs = document_runs(tiny_tokenizer(), ascii_docs(), 40)
    for seed, x in ((0, a), (1, c)):
        train_ids, eval_ids, _ = route_documents([len(r) for r in runs], 32, 8, 32, seed)
        assert sorted(set(x["eval", C.DOCUMENT].tolist())) == eval_ids
        assert sorted(set(x["train", C.DOCUMENT].tolist())) == train_ids
        assert not set(x["train", C.DOCUMENT].tolist()) & set(x["eval", C.DOCUMENT].tolist())
    # a document in a's eval split and c's train split holds the same tokens in both (up to where a
    # split ends inside it)
    moved = sorted(eval_a & set(c["train", C.DOCUMENT].tolist()))
    assert moved
    for d in moved:
        ta, tc = a["eval", C.TOKENS][a["eval", C.DOCUMENT] == d], c["train", C.TOKENS][c["train", C.DOCUMENT] == d]
        n = min(len(ta), len(tc))
        assert n >= 1 and np.array_equal(ta[:n], tc[:n]) and np.array_equal(ta[:n], runs[d][:n])


def test_document_tokens_cuts_each_document(tiny_params: Callable, tmp_path: Path) -> None:
    """data.document_tokens: each document contributes its separator and first tokens, at most that
    many, so the same budget spans more documents."""
    sizes = dict(data__context=16, data__train_tokens=384, data__eval_tokens=96)  # 40 documents of 24: 960
    cut = run_extract(tiny_params(data__document_tokens=24, **sizes), tmp_path / "cut.zarr")
    whole = run_extract(tiny_params(**sizes), tmp_path / "whole.zarr")
    runs = document_runs(tiny_tokenizer(), ascii_docs(), 24)
    x = arrays(tmp_path / "cut.zarr")
    assert attrs(tmp_path / "cut.zarr")["document_tokens"] == 24
    for split in C.SPLITS:
        ids, counts = np.unique(x[split, C.DOCUMENT], return_counts=True)
        assert counts.max() == 24 and (counts[:-1] == 24).all()  # only a split's last one can be shorter
        for d in ids:
            assert np.array_equal(
                x[split, C.TOKENS][x[split, C.DOCUMENT] == d], runs[d][: (x[split, C.DOCUMENT] == d).sum()]
            )
    assert cut["train_documents"] > 2 * whole["train_documents"]
    assert cut["train_documents"] + cut["eval_documents"] == len(
        set(x["train", C.DOCUMENT].tolist()) | set(x["eval", C.DOCUMENT].tolist())
    )


def test_shuffle_documents_takes_the_documents_in_a_seeded_order(tiny_params: Callable, tmp_path: Path) -> None:
    """data.shuffle_documents: document ids number the documents in the seeded shuffled order (a
    permutation of the corpus drawn from data.seed); another seed, another order."""
    sizes = dict(
        data__context=16,
        data__train_tokens=384,
        data__eval_tokens=96,
        data__document_tokens=24,
        data__shuffle_documents=True,
    )
    tok, docs = tiny_tokenizer(), ascii_docs()
    orders = {}
    for seed in (0, 1):
        out = tmp_path / f"s{seed}.zarr"
        run_extract(tiny_params(data__seed=seed, **sizes), out)
        assert attrs(out)["shuffle_documents"] is True
        order = [docs[i] for i in np.random.default_rng([seed, 0]).permutation(len(docs))]
        assert order == list(ordered_documents(str(tiny_params()["data"]["source"]), True, seed))
        runs = document_runs(tok, order, 24)
        x = arrays(out)
        for split in C.SPLITS:
            for d in np.unique(x[split, C.DOCUMENT]):
                got = x[split, C.TOKENS][x[split, C.DOCUMENT] == d]
                assert np.array_equal(got, runs[d][: len(got)])
        orders[seed] = order
    assert orders[0] != orders[1] and orders[0] != docs


def test_store_and_stream_mode_make_the_same_split(tiny_params: Callable, tmp_path: Path) -> None:
    """With data.sample_tokens >= data.train_tokens stream mode splits the same head as store mode:
    the same eval split, the same stored train split, the same split attrs."""
    sizes = dict(data__context=32, data__train_tokens=1024, data__eval_tokens=256, data__document_tokens=40)
    run_extract(tiny_params(**sizes), tmp_path / "store.zarr")
    run_extract(tiny_params(train__source="stream", data__sample_tokens=1024, **sizes), tmp_path / "stream.zarr")
    assert_same_arrays(tmp_path / "store.zarr", tmp_path / "stream.zarr")
    a, b = attrs(tmp_path / "store.zarr"), attrs(tmp_path / "stream.zarr")
    assert a["split"] == b["split"] and b["train_source"] == "stream" and "train_source" not in a


# --- resume ---------------------------------------------------------------------------------

RESUME = dict(data__context=32, data__train_tokens=2048, data__eval_tokens=512)  # 64 + 16 contexts
PACE = "import time; _ts = s.to_storage; s.to_storage = lambda *a: (time.sleep(0.15), _ts(*a))[1]"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, text_corpus: Path) -> dict:
    """The store of one uninterrupted extract (default shard sizes) that resumed ones must equal."""
    raw = tiny_raw(text_corpus, **RESUME)
    out = tmp_path_factory.mktemp("uninterrupted") / "a.zarr"
    return {"raw": raw, "store": out, "metrics": run_extract(raw, out)}


def test_interrupted_extract_resumes_to_the_same_store(
    uninterrupted: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "SHARD_TARGET_BYTES", 1)  # 8 contexts (256 tokens) per shard
    raw, out = uninterrupted["raw"], tmp_path / "a.zarr"
    assert run_extract(raw, out, stop_after_shards=1) == {}
    a = attrs(out)
    assert a["complete"] is False and a["done"] == {"train": 1, "eval": 0} and a["shard_tokens"] == 256
    with pytest.raises(MlsaeError, match="incomplete"):
        store.ActivationStore(str(out))
    ref = store.open_root(str(uninterrupted["store"]))
    part = store.open_root(str(out))["train"][C.RESID]
    assert np.array_equal(part[:256], ref["train"][C.RESID][:256])
    assert not part[256:].any()  # nothing beyond the finished shard

    run_extract(raw, out, stop_after_shards=8)  # the 7 other train shards, then one eval shard
    a = attrs(out)
    assert a["complete"] is False and a["done"] == {"train": 8, "eval": 1}

    metrics = run_extract(raw, out)
    assert metrics["resumed"] is True and attrs(out)["complete"] is True
    assert metrics["tokens"] == uninterrupted["metrics"]["tokens"] == 2560
    assert_same_arrays(out, uninterrupted["store"])
    np.testing.assert_allclose(
        metrics["adjacent_cos_by_layer"], uninterrupted["metrics"]["adjacent_cos_by_layer"], rtol=1e-9
    )


def test_extract_interrupted_while_creating_the_store_is_redone(
    uninterrupted: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interruption before the store's arrays all exist must not leave a store that a rerun
    takes for a resumable one (its token arrays would read back as the fill value)."""
    out = tmp_path / "a.zarr"
    tile = np.tile

    def interrupted(*args: Any) -> np.ndarray:
        if store.exists(str(out)) and "eval" in store.open_root(str(out)):
            raise KeyboardInterrupt  # while writing the eval split's metadata
        return tile(*args)

    monkeypatch.setattr(store.np, "tile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_extract(uninterrupted["raw"], out)
    monkeypatch.setattr(store.np, "tile", tile)
    assert store.exists(str(out)) and not attrs(out).get("complete")
    metrics = run_extract(uninterrupted["raw"], out)
    assert attrs(out)["complete"] is True and metrics["resumed"] is False
    assert_same_arrays(out, uninterrupted["store"])


def test_complete_store_of_another_configuration_is_rebuilt(tiny_params: Callable, tmp_path: Path) -> None:
    out = tmp_path / "a.zarr"
    run_extract(tiny_params(data__context=32, data__train_tokens=256, data__eval_tokens=64), out)
    metrics = run_extract(
        tiny_params(model="tiny-llama", data__context=32, data__train_tokens=256, data__eval_tokens=64), out
    )
    assert metrics["resumed"] is False and attrs(out)["model"] == "tiny-llama" and attrs(out)["complete"]


@pytest.mark.slow  # starts stage processes (a new interpreter each)
def test_kill_9_then_rerun_resumes(uninterrupted: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real `kill -9` of the stage mid-run (its shards shrunk to 8 contexts and its batches
    paced to 0.15 s, so that it is surely killed mid-way); then another model's params are
    refused without touching the store, and the same params resume it to the uninterrupted
    result."""
    raw = uninterrupted["raw"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen(
            stage_command("extract", f"{SHRINK_SHARDS}\n{PACE}"),
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=stage_env(),
        )
    meta = tmp_path / C.ACTIVATIONS / "zarr.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                done = json.loads(meta.read_text())["attributes"]["done"]["train"]
            except (OSError, ValueError, KeyError):
                done = 0
            if done >= 2:
                break
            time.sleep(0.01)
        assert proc.poll() is None, (
            f"the extract ended ({proc.returncode}) before it could be killed: {log.read_text()[-2000:]}"
        )
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    out = tmp_path / C.ACTIVATIONS
    a = attrs(out)
    assert a["complete"] is False and 2 <= a["done"]["train"] < 8 and a["done"]["eval"] == 0

    # another model: refused in one line naming the store, which is left exactly as it was
    before = tree_digest(out)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**raw, "model": "tiny-llama"}))
    result = subprocess.run(
        stage_command("extract"), cwd=tmp_path, capture_output=True, text=True, env=stage_env(), timeout=120
    )
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: extract: "), result.stderr
    assert str(C.ACTIVATIONS) in line and "incomplete" in line and "'tiny-neox'" in line
    assert tree_digest(out) == before
    assert not (tmp_path / C.REPORTS).exists()

    monkeypatch.setattr(store, "SHARD_TARGET_BYTES", 1)
    metrics = run_extract(raw, out)
    assert metrics["resumed"] is True and attrs(out)["complete"] is True
    assert_same_arrays(out, uninterrupted["store"])


# --- bad inputs: one line, exit 1, nothing written -------------------------------------------


def _bad_cases(root: Path) -> dict[str, tuple[dict, dict, list[str]]]:
    """case -> (params overrides, extra env, substrings the error line must contain)."""
    empty = root / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n\n")
    missing = root / "missing.txt"
    return {
        "unknown model": (
            {"model": "pythia-7000"},
            {},
            ["model:", "'pythia-7000'", "known models", "tiny-neox", "smollm2-135m"],
        ),
        "empty corpus": ({"data": {"source": str(empty)}}, {}, ["data.source", str(empty), "empty"]),
        "missing corpus": ({"data": {"source": str(missing)}}, {}, ["data.source", str(missing), "no such file"]),
        "context too long": ({"data": {"context": 512}}, {}, ["data.context", "512", "256"]),
        "unknown dtype": ({"extract": {"dtype": "float8"}}, {}, ["extract.dtype", "float8", "float16"]),
        "hub offline": (
            {"model": "EleutherAI/pythia-70m"},
            {"HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf-home")},
            ["model:", "EleutherAI/pythia-70m", "offline", "smollm2-135m"],
        ),
    }


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory, text_corpus: Path) -> dict:
    """Every bad-input case run as its own `stages/extract.py` process, all at once."""
    root = tmp_path_factory.mktemp("bad")
    base = {
        "model": "tiny-neox",
        "data": {"source": str(text_corpus), "context": 64, "train_tokens": 1024, "eval_tokens": 256},
        "extract": {"device": "cpu"},
    }
    procs = {}
    for i, (case, (change, env, expected)) in enumerate(_bad_cases(root).items()):
        work = root / f"case{i}"
        work.mkdir()
        raw = {
            **base,
            **{k: v for k, v in change.items() if k not in ("data", "extract")},
            "data": {**base["data"], **change.get("data", {})},
            "extract": {**base["extract"], **change.get("extract", {})},
        }
        (work / "params.yaml").write_text(yaml.safe_dump(raw))
        procs[case] = (
            work,
            expected,
            subprocess.Popen(
                stage_command("extract"),
                cwd=work,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=stage_env(**env),
            ),
        )
    results = {}
    for case, (work, expected, proc) in procs.items():
        out, err = proc.communicate(timeout=180)
        results[case] = (work, expected, proc.returncode, err)
    assert list(results) == BAD_CASES
    return results


BAD_CASES = ["unknown model", "empty corpus", "missing corpus", "context too long", "unknown dtype", "hub offline"]


@pytest.mark.slow  # starts stage processes (a new interpreter each)
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_in_one_line_and_writes_nothing(case: str, bad_runs: dict) -> None:
    work, expected, rc, err = bad_runs[case]
    assert rc == 1, err
    line = err.strip()
    assert "\n" not in line and line.startswith("error: extract: "), err
    for part in expected:
        assert part in line, (part, line)
    assert not (work / C.ACTIVATIONS).exists() and not (work / C.REPORTS).exists()
    assert os.listdir(work) == ["params.yaml"]


@pytest.mark.parametrize("source", ["missing.txt", "empty"])
def test_bad_corpus_fails_before_the_model_loads(
    source: str, workdir: Path, tiny_params: Callable, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import runpy

    (workdir / "empty").mkdir()
    (workdir / "empty" / "a.txt").write_text("\n")
    (workdir / "params.yaml").write_text(yaml.safe_dump(tiny_params(data__source=source)))

    def no_model(*args: Any) -> None:
        raise AssertionError("the model was loaded before the corpus was checked")

    monkeypatch.setattr(extract_mod, "load_model", no_model)
    main = runpy.run_path(str(ROOT / "stages" / "extract.py"))["main"]
    with pytest.raises(SystemExit) as info:
        main("params.yaml")
    assert info.value.code == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: extract: data.source '{source}'") and "\n" not in line
    assert sorted(os.listdir(workdir)) == ["empty", "params.yaml"]


# --- the embedded 30-layer model ------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Any:
    from mlsae.models.registry import load_model

    return load_model("smollm2-135m", "cpu")


@pytest.mark.slow  # loads the embedded 30-layer model
def test_embedded_model_extract(smollm2: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import LlamaForCausalLM

    assert (smollm2.n_layers, smollm2.d_model, smollm2.max_context) == (30, 576, 8192)
    monkeypatch.setattr(extract_mod, "load_model", lambda name, device: smollm2)  # loaded once
    raw = {
        "model": "smollm2-135m",
        "data": {"source": "embedded:python-docs", "seed": 0, "context": 64, "train_tokens": 256, "eval_tokens": 64},
        "extract": {"dtype": "float16", "batch_size": 5, "device": "cpu"},
    }
    out = tmp_path / "a.zarr"
    metrics = run_extract(raw, out)
    assert metrics["tokens"] == 320 and metrics["n_layers"] == 30 and len(metrics["adjacent_cos_by_layer"]) == 29
    reader = store.ActivationStore(str(out))
    arr = reader.split("train")[C.RESID]
    assert arr.shape == (256, 30, 576) and arr.dtype == np.float16 and reader.attrs["dtype"] == "float16"
    eos = smollm2.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokens = np.concatenate([reader.meta(s, C.TOKENS) for s in C.SPLITS])
    special = np.concatenate([reader.meta(s, C.SPECIAL) for s in C.SPLITS])
    assert np.array_equal(special, np.isin(tokens, smollm2.tokenizer.all_special_ids))
    context = np.concatenate([reader.meta(s, C.CONTEXT) for s in C.SPLITS])
    assert tokens[context == 0][0] == eos  # the stream starts with the document separator

    # block 0 against HF hidden_states[1] of an independent 2-layer Llama with the same weights
    config = smollm2.hf_model.config.__class__.from_dict({**smollm2.hf_model.config.to_dict(), "num_hidden_layers": 2})
    two = LlamaForCausalLM(config).eval()
    state = {
        k: v
        for k, v in smollm2.hf_model.state_dict().items()
        if not k.startswith("model.layers.") or k.split(".")[2] in ("0", "1")
    }
    missing, unexpected = two.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    ids = torch.from_numpy(reader.meta("eval", C.TOKENS)).long()[None]
    with torch.no_grad():
        hs1 = two(ids, output_hidden_states=True).hidden_states[1][0]
    stored = reader.resid("eval", 0, 64)[:, 0]
    assert rel(stored, hs1) < 1e-3
