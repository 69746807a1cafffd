"""The dump stage: sparse latents that decode to the SAE's reconstruction, aligned with the
activation store's eval tokens, and an interrupted dump that resumes to identical arrays."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

import mlsae.stores.latents as latents_mod
from conftest import run_train as train
from mlsae.core import paths as C
from mlsae.core.params import parse_params
from mlsae.lens.build import run_lens_stage
from mlsae.lens.tuned import Lens
from mlsae.sae.dump import dump
from mlsae.sae.model import MLSAE
from mlsae.stores.activations import ActivationStore

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures `store`, `reader`: conftest.py


SAE_RAW = {
    "sae": {"layers": [0, 2, 3], "expansion": 4, "k": 8, "auxk": 32, "dead_tokens": 256},
    "train": {
        "batch_tokens": 128,
        "lr": 1e-3,
        "epochs": 1,
        "shuffle_buffer_tokens": 512,
        "geometric_median_sample": 256,
        "device": "cpu",
    },
}


def tuned_lens() -> Lens:
    g = torch.Generator().manual_seed(1)
    return Lens(4, 64, 0.2 * torch.randn(4, 64, 64, generator=g) / 8, 0.5 * torch.randn(4, 64, generator=g))


@pytest.fixture(scope="module")
def sae(store: tuple[Path, dict], reader: ActivationStore, tmp_path_factory: pytest.TempPathFactory) -> MLSAE:
    """A briefly trained MLSAE on blocks 0, 2, 3, in the space of a random tuned lens."""
    tmp = tmp_path_factory.mktemp("sae")
    p = parse_params({**store[1], **SAE_RAW})
    train(p, reader, tuned_lens(), tmp / "sae", tmp / "ckpt", progress=False)
    return MLSAE.load(tmp / "sae").eval()


@pytest.fixture(scope="module")
def dumped(sae: MLSAE, reader: ActivationStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted dump with the module's default shard sizes."""
    path = tmp_path_factory.mktemp("dump") / "latents.zarr"
    assert dump(sae, tuned_lens(), reader, str(path), progress=False) == {
        "tokens": reader.n_tokens("eval"),
        "layers": 3,
        "k": 8,
    }
    return path


def arrays(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return {k: root[k][:] for k in (C.INDICES, C.VALUES, C.TOKENS, C.CONTEXT, C.POSITION, C.SPECIAL, C.DOCUMENT)}


# ---------------------------------------------------------------------------------------------
# tests


def test_dumped_latents_decode_to_the_sae_reconstruction(sae: MLSAE, reader: ActivationStore, dumped: Path) -> None:
    """Row t of the dump is the SAE's top-k code of eval token t (every token, special ones too);
    decoding it gives the SAE's reconstruction to float16 precision, in lens space and, mapped
    back through the vector's mean/std and the inverse lens, in model space."""
    got = arrays(dumped)
    n, L, k = reader.n_tokens("eval"), 3, sae.cfg.k
    assert got[C.INDICES].shape == got[C.VALUES].shape == (n, L, k)
    assert got[C.INDICES].dtype == np.int32 and got[C.VALUES].dtype == np.float16

    lens = tuned_lens()
    x = reader.resid("eval", 0, n, [0, 2, 3])  # model space, in eval order
    with torch.no_grad():
        out = sae(lens(x, [0, 2, 3]))
        _, mean, std = sae.normalise(lens(x, [0, 2, 3]))
        indices = torch.from_numpy(got[C.INDICES]).long()
        values = torch.from_numpy(got[C.VALUES]).float()
        decoded = sae.decode(values, indices)  # normalised lens space
        model_space = lens.inverse(sae.denormalise(decoded, mean, std), [0, 2, 3])
        reference = lens.inverse(out.recon, [0, 2, 3])

    # the same latents, row by row (order within a row is free)
    order_got, order_ref = indices.sort(-1), out.indices.sort(-1)
    assert torch.equal(order_got.values, order_ref.values)
    ref_vals = out.values.gather(-1, order_ref.indices)
    torch.testing.assert_close(values.gather(-1, order_got.indices), ref_vals, rtol=1e-3, atol=1e-4)
    # decoding: float16 values (relative error <= 2^-11) summed over k unit-norm columns
    bound = 2**-11 * values.abs().sum(-1, keepdim=True) + 1e-5
    assert ((decoded - out.xn_hat).abs() <= bound).all()
    scale = float(reference.abs().max())
    torch.testing.assert_close(model_space, reference, rtol=0, atol=2e-3 * scale)
    assert (decoded - out.xn).pow(2).sum() > 0.01 * out.xn.pow(2).sum()  # an imperfect SAE: a real check


def test_dump_is_aligned_with_the_eval_split(sae: MLSAE, reader: ActivationStore, dumped: Path) -> None:
    got = arrays(dumped)
    for key in (C.TOKENS, C.CONTEXT, C.POSITION, C.SPECIAL, C.DOCUMENT):
        want = reader.meta("eval", key)
        assert got[key].dtype == want.dtype and np.array_equal(got[key], want), key
    assert got[C.SPECIAL].any()
    attrs = dict(zarr.open_group(str(dumped), mode="r").attrs)
    assert attrs["complete"] is True and attrs["layers"] == [0, 2, 3] and attrs["k"] == 8
    assert attrs["n_latents"] == sae.cfg.n_latents and attrs["model"] == "tiny-llama"
    # the eval split's identity, its document split included, travels with the latents
    assert attrs["source"]["split"] == reader.attrs["split"] and attrs["source"]["data_seed"] == 0
    # row t encodes eval token t: encode a few tokens on their own and find them at their rows
    lens = tuned_lens()
    for t in (0, 1, 37, 200, reader.n_tokens("eval") - 1):
        with torch.no_grad():
            xn, _, _ = sae.normalise(lens(reader.resid("eval", t, t + 1, [0, 2, 3]), [0, 2, 3]))
            _, idx = sae.encode(xn)
        assert np.array_equal(np.sort(got[C.INDICES][t], -1), np.sort(idx[0].numpy(), -1)), t


def test_latent_store_reads_the_analysed_tokens_only(reader: ActivationStore, dumped: Path) -> None:
    """LatentStore.read, the one reader of the latent store (aggregate, report, browse): the
    analysed tokens of a range (not special; not position 0 when the run skips it), with their
    store indices, float32 values, and a one-line refusal of garbled entries."""
    import dataclasses

    from mlsae.core.errors import MlsaeError
    from mlsae.stores.latents import open_latents

    latents = open_latents(dumped)
    got = arrays(dumped)
    n = reader.n_tokens("eval")
    assert latents.skip_first == reader.skip_first
    kept = ~got[C.SPECIAL] & ~((got[C.POSITION] == 0) & reader.skip_first)
    assert np.array_equal(latents.kept(0, n), kept) and (~kept).any()
    for key in (C.TOKENS, C.CONTEXT, C.POSITION, C.SPECIAL, C.DOCUMENT):
        assert np.array_equal(latents.meta(key), got[key]), key
    step = latents.chunk_tokens()
    assert step >= 1 and step % int(latents.indices.chunks[0]) == 0
    for start, stop in ((0, n), (37, 200), (n - 5, n)):
        chunk = latents.read(start, stop)
        rows = start + np.flatnonzero(kept[start:stop])
        assert np.array_equal(chunk.token, rows) and chunk.token.dtype == np.int64
        assert np.array_equal(chunk.indices, got[C.INDICES][rows])
        assert chunk.values.dtype == np.float32 and np.array_equal(chunk.values, got[C.VALUES][rows].astype(np.float32))
    t = int(np.flatnonzero(kept)[0])
    values = got[C.VALUES].copy()
    values[t, 0, 0] = -1
    with pytest.raises(MlsaeError, match=rf"'values' has negative or NaN entries in tokens 0\.\.{n - 1}$"):
        dataclasses.replace(latents, values=values).read(0, n)
    indices = got[C.INDICES].copy()
    indices[t, 1, 2] = latents.n_latents
    with pytest.raises(
        MlsaeError, match=rf"'indices' holds latent id {latents.n_latents}, outside 0\.\.{latents.n_latents - 1}$"
    ):
        dataclasses.replace(latents, indices=indices).read(0, n)
    # a garbled entry at a token the analysis leaves out is never read
    values = got[C.VALUES].copy()
    values[int(np.flatnonzero(~kept)[0]), 0, 0] = -1
    dataclasses.replace(latents, values=values).read(0, n)


class RecordingReader:
    """An ActivationStore proxy that records the eval tokens whose residuals are read."""

    def __init__(self, inner: ActivationStore) -> None:
        self.inner, self.starts = inner, []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def resid(self, split: str, start: int, stop: int, *args, **kw) -> torch.Tensor:
        self.starts.append(start)
        return self.inner.resid(split, start, stop, *args, **kw)

    def chunks(self, *args, **kw):  # the store's chunked reader, reading through this proxy
        return ActivationStore.chunks(self, *args, **kw)  # type: ignore[arg-type]


def test_interrupted_dump_resumes_to_identical_arrays(
    sae: MLSAE, reader: ActivationStore, dumped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(latents_mod, "SHARD_TOKENS", 128)
    monkeypatch.setattr(latents_mod, "CHUNK_TOKENS", 64)
    n = reader.n_tokens("eval")
    assert n == 512  # four shards of 128
    path = str(tmp_path / "latents.zarr")
    lens = tuned_lens()

    assert dump(sae, lens, reader, path, progress=False, stop_after_shards=1) == {}
    attrs = dict(zarr.open_group(path, mode="r").attrs)
    assert attrs["complete"] is False and attrs["done"] == 1
    partial = arrays(Path(path))
    assert (partial[C.VALUES][128:] == 0).all()  # nothing past the first shard yet

    rec = RecordingReader(reader)
    assert dump(sae, lens, rec, path, progress=False, stop_after_shards=2) == {}  # type: ignore[arg-type]
    assert sorted(set(rec.starts)) == [128, 192, 256, 320]  # resumed at shard 1: shard 0 not redone
    assert dict(zarr.open_group(path, mode="r").attrs)["complete"] is False

    rec.starts.clear()
    assert dump(sae, lens, rec, path, progress=False)["tokens"] == n  # type: ignore[arg-type]
    assert sorted(set(rec.starts)) == [384, 448]
    attrs = dict(zarr.open_group(path, mode="r").attrs)
    assert attrs["complete"] is True and attrs["done"] == 4

    resumed, whole = arrays(Path(path)), arrays(dumped)
    for key in whole:
        assert np.array_equal(resumed[key], whole[key]), key

    # a partial dump of another SAE is not resumed: it is started over
    assert dump(sae, lens, reader, path, progress=False, stop_after_shards=1) == {}  # complete store: redone
    other = MLSAE(sae.cfg.__class__(**{**sae.cfg.to_dict(), "params_hash": "another"}))
    other.load_state_dict(sae.state_dict())
    rec.starts.clear()
    dump(other, lens, rec, path, progress=False)  # type: ignore[arg-type]
    assert 0 in rec.starts
    assert dict(zarr.open_group(path, mode="r").attrs)["sae_hash"] == "another"


@pytest.mark.parametrize("change", ["sae_weights", "lens"])
def test_partial_dump_from_other_latents_is_started_over(
    sae: MLSAE, reader: ActivationStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """A retrained SAE keeps its params hash (same params, other activations or lens), so the hash
    alone cannot tell a stale partial dump from a resumable one; resuming it would mix latents."""
    monkeypatch.setattr(latents_mod, "SHARD_TOKENS", 128)
    monkeypatch.setattr(latents_mod, "CHUNK_TOKENS", 64)
    lens = tuned_lens()
    new_sae, new_lens = sae, lens
    if change == "sae_weights":
        new_sae = MLSAE(sae.cfg)
        new_sae.load_state_dict(sae.state_dict())
        with torch.no_grad():
            new_sae.W_enc.add_(0.05 * torch.randn(new_sae.W_enc.shape, generator=torch.Generator().manual_seed(3)))
        assert new_sae.cfg.params_hash == sae.cfg.params_hash
    else:
        new_lens = Lens(4, 64, lens.weight * 1.5, lens.bias)
    path = str(tmp_path / "latents.zarr")
    dump(sae, lens, reader, path, progress=False, stop_after_shards=2)
    dump(new_sae, new_lens, reader, path, progress=False)
    dump(new_sae, new_lens, reader, str(tmp_path / "fresh.zarr"), progress=False)
    dump(sae, lens, reader, str(tmp_path / "old.zarr"), progress=False)
    got, fresh, old = arrays(Path(path)), arrays(tmp_path / "fresh.zarr"), arrays(tmp_path / "old.zarr")
    assert not np.array_equal(old[C.INDICES], fresh[C.INDICES])  # the change matters
    for key in fresh:
        assert np.array_equal(got[key], fresh[key]), key


def test_dump_stage(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stages/dump.py` with `lens: none` writes a complete latent store equal to dump() with the identity."""
    raw = {**store[1], **SAE_RAW}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "data").mkdir()
    (tmp_path / C.ACTIVATIONS).symlink_to(store[0])
    p = parse_params(raw)
    run_lens_stage(p.lens, p.lens_path, p.lens_fit, p.model, reader, tmp_path / C.LENS_DIR, progress=False)
    train(p, reader, Lens.identity(4, 64), tmp_path / C.SAE_DIR, tmp_path / "ckpt", progress=False)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "stages" / "dump.py"))["main"]()
    assert dict(zarr.open_group(str(tmp_path / C.LATENTS), mode="r").attrs)["complete"] is True
    dump(MLSAE.load(tmp_path / C.SAE_DIR), Lens.identity(4, 64), reader, str(tmp_path / "ref.zarr"), progress=False)
    got, ref = arrays(tmp_path / C.LATENTS), arrays(tmp_path / "ref.zarr")
    assert all(np.array_equal(got[k], ref[k]) for k in ref)
    assert math.isfinite(float(got[C.VALUES].astype(np.float32).max()))
