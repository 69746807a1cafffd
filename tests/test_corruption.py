"""Corruption is reported, never computed on (issue 16): truncated or garbled shards of either
store and a garbage SAE weights file each give one line naming the file and how to rebuild it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlsae.core import paths as C
from mlsae.core.errors import MlsaeError
from mlsae.sae.model import MLSAE, SAEConfig
from mlsae.stores import activations as store
from mlsae.stores import latents

ROOT = Path(__file__).resolve().parents[1]


def latent_store(path: Path, n: int = 4096) -> None:
    """A complete latent store written by dump's own writer (`_open`), with random contents."""
    import mlsae.sae.dump as dump_mod

    class Reader:
        path = "activations"
        attrs = {"model": "tiny-llama"}
        skip_first = False

        def n_tokens(self, split):
            return n

        def meta(self, split, key):
            return {C.SPECIAL: np.zeros(n, bool)}.get(key, np.arange(n, dtype=np.int32))

    sae = MLSAE(SAEConfig(d_model=8, n_latents=32, k=4, layers=[0, 1]))
    attrs = dump_mod._attrs(sae, __import__("mlsae.lens.tuned", fromlist=["Lens"]).Lens.identity(2, 8), Reader())
    root, _ = latents.open_for_writing(str(path), attrs, Reader())
    rng = np.random.default_rng(0)
    root[C.INDICES][:] = rng.integers(0, 32, (n, 2, 4), dtype=np.int32)
    root[C.VALUES][:] = rng.random((n, 2, 4)).astype(np.float16)
    store.seal(root, path, "dump")


def shard_files(array_dir: Path) -> list[Path]:
    return sorted(p for p in (array_dir / "c").rglob("*") if p.is_file())


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 3
    data[mid : mid + 16] = bytes(16)  # same length, some bytes zeroed: only a checksum can tell
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize("damage", [garble, truncate])
@pytest.mark.parametrize("array", [C.VALUES, C.INDICES])
def test_damaged_latent_shard_raises_one_line_naming_store_and_fix(tmp_path, damage, array):
    from mlsae.analysis.aggregate import aggregate
    from mlsae.core.params import AnalysisParams

    path = tmp_path / "latents.zarr"
    latent_store(path)
    damage(shard_files(path / array)[0])
    with pytest.raises(MlsaeError) as e:
        with store.guard(path, "dump"):
            aggregate(path, tmp_path / "analysis", tmp_path / "analysis.json", AnalysisParams())
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{path}: corrupted store")
    assert f"dvc checkout {path}" in line and "dvc repro -f dump" in line
    assert not (tmp_path / "analysis.json").exists()


@pytest.mark.parametrize("damage", [garble, truncate])
def test_damaged_activation_shard_is_reported(tmp_path, damage):
    path = tmp_path / "activations.zarr"
    n, L, d, ctx = 512, 2, 16, 32
    split = store.SplitData(
        tokens=np.zeros((n // ctx, ctx), np.int32),
        special=np.zeros((n // ctx, ctx), bool),
        context_index=np.arange(n // ctx, dtype=np.int32),
        document=np.repeat(np.arange(n // ctx, dtype=np.int64), ctx).reshape(n // ctx, ctx),
    )
    root = store.create(
        str(path), {"n_layers": L, "d_model": d, "context": ctx, "dtype": "float16"}, {"train": split, "eval": split}
    )
    x = np.random.default_rng(0).standard_normal((n, L, d)).astype(np.float16)
    for name in ("train", "eval"):
        root[name][C.RESID][:] = x
    store.seal(root, path, "extract")
    reader = store.ActivationStore(str(path))
    assert torch.equal(reader.resid("eval", 0, n, raw=True), torch.from_numpy(x))
    damage(shard_files(path / "eval" / C.RESID)[0])
    with pytest.raises(MlsaeError, match=r"corrupted store.*dvc repro -f extract"):
        with store.guard(path, "extract"):
            reader.resid("eval", 0, n)
    reader.resid("train", 0, n)  # the undamaged split still reads


def test_guard_passes_other_errors_through(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with store.guard(tmp_path, "dump"):
            1 / 0


def test_aggregate_stage_on_a_garbled_store_prints_one_line(tmp_path):
    latent_store(tmp_path / C.LATENTS)
    garble(shard_files(tmp_path / C.LATENTS / C.VALUES)[0])
    (tmp_path / "params.yaml").write_text("model: tiny-llama\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "aggregate.py")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    # a progress bar cut short leaves no newline: the error line follows the bar's text
    errors = re.findall(r"error: [^\r\n]*", proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error: aggregate: data/latents.zarr: corrupted store"), (
        proc.stderr[-3000:]
    )
    assert not (tmp_path / C.ANALYSIS_METRICS).exists()


def test_sae_with_a_garbage_body_is_refused(tmp_path):
    sae = MLSAE(SAEConfig(d_model=8, n_latents=32, k=4, layers=[0, 1]))
    sae.save(tmp_path)
    weights = tmp_path / C.SAE_WEIGHTS
    assert json.loads((tmp_path / C.SAE_CONFIG).read_text())["weights_sha256"]
    data = bytearray(weights.read_bytes())
    data[-64:] = os.urandom(64)  # tensor bytes: the header still parses, the numbers are garbage
    weights.write_bytes(bytes(data))
    with pytest.raises(MlsaeError, match=r"sae.safetensors: sha256 differs .*dvc repro -f train"):
        MLSAE.load(tmp_path)


def test_sae_with_non_finite_weights_is_refused(tmp_path):
    sae = MLSAE(SAEConfig(d_model=8, n_latents=32, k=4, layers=[0, 1]))
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    sae.save(tmp_path)  # the recorded hash is that of the NaN weights: only the finite check catches them
    with pytest.raises(MlsaeError, match=r"tensor 'W_dec' holds NaN or infinite values"):
        MLSAE.load(tmp_path)


def test_sae_config_without_a_weights_hash_fails_closed(tmp_path):
    """Issue 28 (5): a config.json without weights_sha256 (an older SAE, or an edited one) is refused:
    nothing vouches for the weights, so they are not read at all."""
    MLSAE(SAEConfig(d_model=8, n_latents=32, k=4, layers=[0, 1])).save(tmp_path)
    cfg = json.loads((tmp_path / C.SAE_CONFIG).read_text())
    del cfg["weights_sha256"]
    (tmp_path / C.SAE_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(
        MlsaeError, match=r"config.json: no weights_sha256 recorded for sae.safetensors .*dvc repro -f train"
    ):
        MLSAE.load(tmp_path)
