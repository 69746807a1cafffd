"""Export an MLSAE (`data/sae`) to SAELens >= 6's on-disk layout: one folder per layer hook.

Layout written under OUT:
  blocks.{i}.hook_resid_post/cfg.json                 (one per block i of the SAE)
  blocks.{i}.hook_resid_post/sae_weights.safetensors  W_enc (d_in, d_sae), W_dec (d_sae, d_in),
                                                      b_enc (d_sae,), b_dec (d_in,), float32
The weights are the same for every layer (a multi-layer SAE is one dictionary), so every folder's
weights file is a hardlink to one file. `cfg.json` holds `architecture: "topk"`, `k`, `d_in`,
`d_sae`, `normalize_activations: "layer_norm"`, `apply_b_dec_to_input: true` and `metadata` with
`sae_lens_version` (6.0.0), `model_name` and `hook_name`; SAELens 6.x loads it with
`SAE.load_from_disk(folder)`.

SAELens's TopK encode and decode (v6, `normalize_activations: layer_norm`), for x with d entries:
  m = mean(x), σ = sqrt(Σ(x − m)² / (d − 1)), u = (x − m) / (σ + 1e-5)
  f = ReLU(TopK_k((u − b_dec) · W_enc + b_enc)),   x_rec = (f · W_dec + b_dec) · σ + m
* `normalisation: seed` (an imported seed SAE) is exactly this with W_enc = W_encᵀ, W_dec = W_decᵀ,
  b_dec = b_pre, b_enc = 0.
* `normalisation: vector` standardises by s = sqrt(σ_b² + 1e-6) with the biased σ_b = σ / c,
  c = sqrt(d / (d − 1)). Up to the epsilons, x̂ = c·u, so the export folds c into the weights:
  W_enc = c·W_encᵀ, b_dec = b_pre / c, W_dec = W_decᵀ / c, which gives the same pre-activations
  W_enc(x̂ − b_pre) and the reconstruction (W_dec f + b_pre)·σ_b + m (here: ·s). The epsilons differ
  (1e-6 inside the sqrt here, 1e-5 outside it there): SAELens's input to the encoder is x̂·s / s',
  s' = σ_b + 1e-5 / c, so each pre-activation z_j differs by at most
    |Δz_j| <= |s / s' − 1| · ‖W_enc[j]‖ · ‖x̂‖ <= (1e-5 + 5e-7 / σ_b) / σ_b · ‖W_enc[j]‖ · sqrt(d)
  (‖x̂‖ <= sqrt(d)), i.e. relative 1e-5 / σ_b: negligible for residual streams (σ_b >~ 0.1).
An SAE in tuned-lens space is refused: SAELens has no per-layer lens, and the standardisation
between the lens and the encoder keeps it from being folded into the weights.

OUT must be absent or empty. `--force` replaces only a folder that an earlier export wrote (it
holds the marker file `MARKER`), and never the working directory or one above it, a git
repository, a DVC project, or a pipeline output (`mlsae.core.paths.PIPELINE_OUTPUTS`: one of
them, inside one or holding one). The new folder is written beside OUT and renamed into place;
a failure leaves OUT as it was and no temporary folder behind.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from mlsae.core.errors import MlsaeError
from mlsae.core.io import atomic_dir
from mlsae.core.paths import HOOK_NAME, inside_outputs
from mlsae.sae.model import MLSAE

SAELENS_VERSION = "6.0.0"
"""The SAELens version written to `metadata.sae_lens_version` (the layout is that of 6.x)."""
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
LAYER_NORM_EPS = 1e-5
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MARKER = ".mlsae-export"
"""The file an export writes into OUT: only a folder holding it is replaced by `--force`."""


def fold_factor(sae: MLSAE) -> float:
    """c with x̂ = c·u (see the module docstring): sqrt(d / (d − 1)) for `vector`, 1 for `seed`."""
    norm, d = sae.cfg.normalisation, sae.cfg.d_model
    if norm == "seed":
        return 1.0
    if norm == "vector":
        if d < 2:
            raise MlsaeError("sae.normalisation vector with d_model 1 has no SAELens layer_norm equivalent")
        return math.sqrt(d / (d - 1))
    raise MlsaeError(f"sae.normalisation {norm!r} has no SAELens equivalent; use vector or seed")


def saelens_weights(sae: MLSAE) -> dict[str, torch.Tensor]:
    """SAELens's four tensors (float32, contiguous) for this SAE."""
    c = fold_factor(sae)
    with torch.no_grad():
        w_enc, w_dec, b_pre = (t.detach().cpu().double() for t in (sae.W_enc, sae.W_dec, sae.b_pre))
        out = {
            "W_enc": c * w_enc.T,
            "W_dec": w_dec.T / c,
            "b_enc": torch.zeros(sae.cfg.n_latents, dtype=torch.float64),
            "b_dec": b_pre / c,
        }
    return {k: v.float().contiguous() for k, v in out.items()}


def saelens_model_name(model: str) -> str:
    """The model name SAELens (transformer-lens) knows: a registry name's hub id, else as given."""
    from mlsae.models.registry import REGISTRY

    target = REGISTRY.get(model, model)
    return target if HUB_ID.match(target) else model


def saelens_cfg(sae: MLSAE, block: int, model_name: str) -> dict:
    """The `cfg.json` of one layer's folder."""
    cfg = sae.cfg
    return {
        "architecture": "topk",
        "d_in": cfg.d_model,
        "d_sae": cfg.n_latents,
        "k": cfg.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,
            "model_name": model_name,
            "hook_name": HOOK_NAME.format(i=block),
            "hook_head_index": None,
            "model_class_name": "HookedTransformer",
            "model_from_pretrained_kwargs": {},
            "mlsae_layers": cfg.layers,
            "mlsae_normalisation": cfg.normalisation,
            "mlsae_params_hash": cfg.params_hash,
        },
    }


def export_note(sae_dir: str | Path) -> str:
    """One line for the user when the export is not exact (``vector`` normalisation), else ''."""
    cfg = MLSAE.load(sae_dir).cfg
    if cfg.normalisation != "vector":
        return ""
    return (
        "note: sae.normalisation vector is approximate in SAELens's layer_norm: pre-activations differ by "
        "at most about 1e-5/std relative (std: a residual vector's std); train with "
        "sae.normalisation=seed for an exact export"
    )


def check_replaceable(out: Path, force: bool) -> None:
    """Raise MlsaeError unless `out` may be written: absent or empty, or with `force` an earlier
    export; never the working directory or above, a git repository, a DVC project or a pipeline
    output."""
    here = Path.cwd().resolve()
    target = out.absolute().resolve()
    if target == here or target in here.parents:
        raise MlsaeError(f"{out}: is the working directory or a directory above it; export into a new folder")
    touched = inside_outputs(target)
    if touched is not None:
        raise MlsaeError(
            f"{out}: is, lies inside or holds the pipeline output {touched}; export into a folder outside the "
            f"pipeline's outputs"
        )
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise MlsaeError(f"{out}: exists and is not a directory")
    for name, what in ((".git", "a git repository"), ("dvc.yaml", "a DVC project"), (".dvc", "a DVC project")):
        if (out / name).exists():
            raise MlsaeError(f"{out}: is {what} ({name}); never replaced, even with --force")
    if not any(out.iterdir()):
        return
    if not force:
        raise MlsaeError(f"{out}: not empty; pick another folder or pass --force to replace an earlier export")
    if not (out / MARKER).is_file():
        raise MlsaeError(
            f"{out}: not written by `mlsae export` (no {MARKER} in it); --force replaces only an earlier export's "
            f"folder: pick another folder"
        )


def export_saelens(sae_dir: str | Path, out: str | Path, model_name: str = "", force: bool = False) -> list[Path]:
    """Write the SAELens folders of the SAE in `sae_dir` under `out`; returns the folders.

    `out` must be absent or empty, or, with `force`, an earlier export (see the module docstring)."""
    out = Path(out)
    check_replaceable(out, force)
    sae = MLSAE.load(sae_dir)
    if sae.cfg.lens != "none":
        raise MlsaeError(
            f"{sae_dir}: the SAE works in tuned-lens space (lens={sae.cfg.lens}) and SAELens has no "
            f"lens; export an SAE trained with lens=none"
        )
    if sae.cfg.center != "none":
        raise MlsaeError(
            f"{sae_dir}: the SAE subtracts a centre per layer (center={sae.cfg.center}) before its layer norm, which "
            f"SAELens cannot express; export an SAE trained with sae.center: none"
        )
    tensors = saelens_weights(sae)
    name = model_name or saelens_model_name(sae.cfg.model)
    folders = []
    with atomic_dir(out) as tmp:
        (tmp / MARKER).write_text(json.dumps({"format": "saelens", "sae": str(sae_dir)}) + "\n")
        shared: Path | None = None
        for block in sae.cfg.layers:
            folder = tmp / HOOK_NAME.format(i=block)
            folder.mkdir()
            (folder / CFG_FILE).write_text(json.dumps(saelens_cfg(sae, block, name), indent=2) + "\n")
            if shared is None:
                shared = folder / WEIGHTS_FILE
                save_file(tensors, str(shared), metadata={"format": "pt"})
            else:
                os.link(shared, folder / WEIGHTS_FILE)
            folders.append(out / folder.name)
    return folders
