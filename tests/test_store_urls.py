"""Stores on fsspec URLs (object storage in production): extract writes, train and dump read."""

from pathlib import Path

import numpy as np
import zarr

from conftest import run_extract as extract
from conftest import run_train as train
from mlsae.core.params import parse_params
from mlsae.lens.tuned import Lens
from mlsae.sae.dump import dump
from mlsae.sae.model import MLSAE
from mlsae.stores.activations import ActivationStore


def test_memory_url_store_round_trip(tmp_path: Path, text_corpus: Path):
    raw = {
        "model": "tiny-llama",
        "data": {"source": str(text_corpus), "context": 32, "train_tokens": 1024, "eval_tokens": 256},
        "sae": {"expansion": 2, "k": 4, "dead_tokens": 256},
        "train": {"batch_tokens": 128, "shuffle_buffer_tokens": 512},
    }
    p = parse_params(raw)
    url = "memory://mlsae-test/activations.zarr"
    extract(p, url)
    reader = ActivationStore(url)
    assert reader.n_tokens("train") == 1024 and reader.n_tokens("eval") == 256
    # the same bytes as a local store of the same params
    local = tmp_path / "act.zarr"
    extract(p, local)
    np.testing.assert_array_equal(zarr.open_group(url)["eval/resid"][:], zarr.open_group(str(local))["eval/resid"][:])
    # a second extract replaces the complete store at the URL
    extract(p, url)
    metrics, _ = train(p, reader, Lens.identity(4, 64), tmp_path / "sae", tmp_path / "ckpt", progress=False)
    assert metrics["steps"] > 0
    out = "memory://mlsae-test/latents.zarr"
    dump(MLSAE.load(tmp_path / "sae"), Lens.identity(4, 64), reader, out, progress=False)
    latents = zarr.open_group(out)
    assert latents.attrs["complete"] and latents["indices"].shape == (256, 4, 4)
