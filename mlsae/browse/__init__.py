"""The static latent browser: ``reports/browser/index.html``, one self-contained page.

`build_browser` reads a finished run (the latent store, ``latents.parquet``, the SAE, the model's
final norm and unembedding, its tokenizer), collects what the page shows (`mlsae.browse.data`,
definitions there) and writes the page (`mlsae.browse.page`). The page opens from the file system
and makes no request: its data, script and style are inline, its charts plain SVG.

Why static: a cached run already holds every number a latent's page needs, so the browser is one
more cached stage output, readable offline, with no model server.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

from mlsae.browse import page
from mlsae.browse.data import collect
from mlsae.core.params import BrowseParams

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["build_browser"]


def build_browser(
    model: str,
    latents_path: str | Path,
    analysis_dir: str | Path,
    sae_dir: str | Path,
    out_dir: str | Path,
    p: BrowseParams,
    progress: bool = False,
) -> dict:
    """Write ``out_dir/index.html`` for a run; returns ``{"path", "bytes", "latents", "prompts"}``."""
    from mlsae.models.registry import load_model
    from mlsae.sae.model import MLSAE

    sae = MLSAE.load(sae_dir)
    loaded = load_model(model)
    tok = loaded.tokenizer
    vocab = min(loaded.vocab_size, len(tok))
    payload = collect(
        latents_path,
        analysis_dir,
        sae,
        loaded.final_norm,
        cast("Tensor", loaded.unembed.weight),  # the output embedding's weight parameter
        lambda t: tok.decode([t]),
        vocab,
        p,
        model=model,
        progress=progress,
    )
    path = page.write(payload, out_dir)
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "latents": len(payload["latents"]),
        "prompts": len(payload["prompts"]),
    }
