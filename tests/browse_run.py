"""A tiny finished run for the browser tests, built in-process in a few seconds: a tiny-llama
activation store of a corpus whose every document holds markup (``<script>``, ``&``, quotes), a
randomly initialised SAE (weights seeded), the identity lens, and the real dump and aggregate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_extract
from mlsae.core.params import AnalysisParams, parse_params
from mlsae.lens.tuned import Lens
from mlsae.sae.dump import dump
from mlsae.sae.model import MLSAE, SAEConfig
from mlsae.stores.activations import ActivationStore

try:  # the aggregate stage's module is being renamed (analysis.py -> aggregate.py)
    from mlsae.analysis.aggregate import aggregate
except ImportError:
    from mlsae.analysis import aggregate

MODEL = "tiny-llama"
NASTY = "<script>window.pwned=1</script> a & b \"quoted\" 'single' </textarea><b>bold</b>"


def build_run(root: Path, n_docs: int = 60, skip_first: bool | str = "auto") -> dict[str, Path]:
    """Write corpus, store, SAE, latents and analysis under ``root``; return their paths
    (`skip_first`: `data.skip_first`)."""
    from pydoc_data.topics import topics

    root.mkdir(parents=True, exist_ok=True)
    paras = [p.strip() for key in sorted(topics) for p in topics[key].split("\n\n") if 80 < len(p.strip()) < 300]
    docs = [f"{NASTY} {p}" for p in paras[:n_docs]]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    raw = {
        "model": MODEL,
        "data": {
            "source": str(root / "corpus.jsonl"),
            "seed": 0,
            "context": 32,
            "train_tokens": 256,
            "eval_tokens": 512,
            "skip_first": skip_first,
        },
        "extract": {"dtype": "float32", "batch_size": 16, "device": "cpu"},
    }
    acts, latents, sae_dir, analysis = (
        root / "activations.zarr",
        root / "latents.zarr",
        root / "sae",
        root / "analysis",
    )
    run_extract(parse_params(raw), acts)
    reader = ActivationStore(str(acts))
    torch.manual_seed(0)
    sae = MLSAE(
        SAEConfig(
            d_model=reader.d_model, n_latents=4 * reader.d_model, k=8, layers=list(range(reader.n_layers)), model=MODEL
        )
    )
    sae.save(sae_dir)
    dump(sae, Lens.identity(reader.n_layers, reader.d_model), reader, str(latents), progress=False)
    aggregate(latents, analysis, root / "analysis.json", AnalysisParams(min_count=1, top_tokens=3, min_documents=1))
    return {"latents": latents, "analysis": analysis, "sae": sae_dir, "root": root}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny run per session, shared by test_browse.py and test_browser.py."""
    return build_run(tmp_path_factory.mktemp("browse-run"))


@pytest.fixture(scope="session")
def tiny_run_skip_first(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same run with `data.skip_first: true` (position 0 of every context left out)."""
    return build_run(tmp_path_factory.mktemp("browse-run-skip"), skip_first=True)
