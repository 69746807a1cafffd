"""The seed paper's published MLSAEs (tim-lawson/mlsae on the hub): their files, read into an MLSAE.

Layout (huggingface_hub's PyTorchModelHubMixin), a local directory or a hub repo with:
  config.json        the init kwargs of the seed's autoencoder: n_inputs, n_latents, k,
                     dead_steps_threshold, dead_threshold, auxk, standardize; for a `-tfm` repo, those
                     of its Lightning module instead: model_name, layers, expansion_factor, k, auxk,
                     auxk_coef, dead_tokens_threshold, dead_threshold, lr, standardize,
                     skip_special_tokens, max_length, batch_size, accumulate_grad_batches, tuned_lens,
                     dead_steps_threshold
  model.safetensors  encoder.weight (n_latents, n_inputs), decoder.weight (n_inputs, n_latents),
                     pre_encoder_bias (n_inputs,) [and the buffer last_nonzero]; a `-tfm` file holds
                     them under `autoencoder.` beside the transformer's weights, which are not read.

The seed's forward on one residual vector x of d = n_inputs entries:
  m = mean(x),  σ = sqrt(Σ(x − m)² / (d − 1))  (unbiased),  x̂ = (x − m) / (σ + 1e-5)
  z = encoder.weight · (x̂ − pre_encoder_bias),  latents = ReLU(TopK_k(z))
  reconstruction = (decoder.weight · latents + pre_encoder_bias) · σ + m
which is this project's MLSAE with W_enc = encoder.weight, W_dec = decoder.weight,
b_pre = pre_encoder_bias and ``normalisation: seed``, exactly. A variant that this does not
cover (standardize: false, an encoder or decoder bias, an unknown config key) is refused by name
rather than approximated. The layers, the model and the tuned lens are what the config or the
hub name records (`mlsae-{model}-x{expansion}-k{k}[-lens][-tfm]`); None where neither says.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from mlsae.core.errors import MlsaeError

SEED_CONFIG = "config.json"
SEED_WEIGHTS = "model.safetensors"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
NAME = re.compile(r"mlsae-(?P<model>.+?)-x(?P<expansion>\d+)-k(?P<k>\d+)(?P<lens>-lens)?(?P<tfm>-tfm)?$")

AUTOENCODER_KEYS = {"n_inputs", "n_latents", "k", "dead_steps_threshold", "dead_threshold", "auxk", "standardize"}
TFM_KEYS = {
    "model_name",
    "layers",
    "expansion_factor",
    "k",
    "auxk",
    "auxk_coef",
    "dead_tokens_threshold",
    "dead_threshold",
    "lr",
    "standardize",
    "skip_special_tokens",
    "max_length",
    "batch_size",
    "accumulate_grad_batches",
    "tuned_lens",
    "dead_steps_threshold",
}
TENSORS = ("encoder.weight", "decoder.weight", "pre_encoder_bias")
IGNORED_TENSORS = ("last_nonzero",)


@dataclass
class SeedSAE:
    """One seed MLSAE as read from its files."""

    w_enc: torch.Tensor
    """(n_latents, d_model) float32: the seed's encoder.weight."""
    w_dec: torch.Tensor
    """(d_model, n_latents) float32: the seed's decoder.weight."""
    b_pre: torch.Tensor
    """(d_model,) float32: the seed's pre_encoder_bias."""
    k: int
    auxk: int
    tfm: bool
    """True for a `-tfm` (Lightning module) checkpoint."""
    lens: bool
    """True when the SAE was trained on tuned-lens outputs (`tuned_lens`, or `-lens` in the name)."""
    model: str | None
    """The model's name (`model_name`, or the hub name's model part); None when unknown."""
    layers: list[int] | None
    """The block indices it was trained on; None when the files do not say (`layers: null` is all)."""


def fetch(source: str) -> Path:
    """The local directory of `source`: itself if it is a directory, else a hub download of the
    two files this module reads (huggingface_hub's cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not HUB_ID.match(source):
        raise MlsaeError(f"sae.source: {source!r} is neither a local directory nor a hub id owner/name")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=source, allow_patterns=[SEED_CONFIG, SEED_WEIGHTS]))
    except Exception as e:  # offline, unknown repo, gated repo: each its own exception type
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise MlsaeError(
            f"sae.source: cannot download hub repo {source!r} ({reason}); "
            f"offline, download it elsewhere and pass its local directory"
        ) from None


def is_seed_dir(directory: Path) -> bool:
    return (directory / SEED_CONFIG).is_file() and (directory / SEED_WEIGHTS).is_file()


def read_seed(directory: Path, name: str = "") -> SeedSAE:
    """Read and validate a seed MLSAE; `name` (the hub id or directory name) supplies what the
    plain autoencoder's config does not record: model and tuned lens."""
    cfg_path, weights_path = directory / SEED_CONFIG, directory / SEED_WEIGHTS
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise MlsaeError(f"{cfg_path}: unreadable seed config ({' '.join(str(e).split())})") from None
    if not isinstance(cfg, dict):
        raise MlsaeError(f"{cfg_path}: a seed config must be a JSON object")
    tfm = "model_name" in cfg or "expansion_factor" in cfg
    known = TFM_KEYS if tfm else AUTOENCODER_KEYS
    unknown = sorted(set(cfg) - known)
    if unknown:
        kind = "MLSAETransformer (-tfm)" if tfm else "MLSAE autoencoder"
        raise MlsaeError(f"{cfg_path}: unsupported seed variant: unknown {kind} config key {unknown[0]!r}")
    if cfg.get("standardize", True) is not True:
        raise MlsaeError(
            f"{cfg_path}: unsupported seed variant: standardize={cfg['standardize']!r} "
            f"(only standardised seed SAEs are supported)"
        )
    k = cfg.get("k", 32 if tfm else None)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise MlsaeError(f"{cfg_path}: seed config key 'k' must be a positive integer (got {k!r})")
    auxk = cfg.get("auxk", 256)
    auxk = 0 if auxk is None else auxk
    if not isinstance(auxk, int) or isinstance(auxk, bool) or auxk < 0:
        raise MlsaeError(f"{cfg_path}: seed config key 'auxk' must be null or an integer >= 0 (got {auxk!r})")

    prefix = "autoencoder." if tfm else ""
    tensors = _read_tensors(weights_path, prefix)
    w_enc, w_dec, b_pre = (tensors[prefix + key] for key in TENSORS)
    n_latents, d_model = w_enc.shape if w_enc.ndim == 2 else (0, 0)
    expected: dict[str, tuple[int | None, ...]] = {  # None: a key the config lacks
        "encoder.weight": (n_latents, d_model),
        "decoder.weight": (d_model, n_latents),
        "pre_encoder_bias": (d_model,),
    }
    if tfm:
        factor = cfg.get("expansion_factor", 16)
        if n_latents != factor * d_model:
            raise MlsaeError(
                f"{weights_path}: encoder.weight has {n_latents} latents, config expansion_factor "
                f"{factor} x d_model {d_model} = {factor * d_model}"
            )
    else:
        expected["encoder.weight"] = (cfg.get("n_latents"), cfg.get("n_inputs"))
    for key, t in zip(TENSORS, (w_enc, w_dec, b_pre)):
        if tuple(t.shape) != expected[key]:
            raise MlsaeError(
                f"{weights_path}: tensor {prefix + key!r} has shape {tuple(t.shape)}, expected {expected[key]}"
            )
    if k > n_latents:
        raise MlsaeError(f"{cfg_path}: k={k} is more than n_latents={n_latents}")

    match = NAME.search(name.rstrip("/").split("/")[-1]) if name else None
    model = cfg.get("model_name") if tfm else (match["model"] if match else None)
    lens = bool(cfg.get("tuned_lens")) if tfm else bool(match and match["lens"])
    layers = cfg.get("layers") if tfm else None
    if layers is not None and (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
    ):
        raise MlsaeError(
            f"{cfg_path}: seed config key 'layers' must be null or a list of block indices (got {layers!r})"
        )
    return SeedSAE(w_enc.float(), w_dec.float(), b_pre.float(), k, auxk, tfm, lens, model, layers)


def _read_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The autoencoder's tensors only (a `-tfm` file also holds the whole transformer)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            ours = {key for key in keys if key.startswith(prefix)}
            missing = [prefix + key for key in TENSORS if prefix + key not in keys]
            if missing:
                raise MlsaeError(f"{path}: not a seed MLSAE: tensor {missing[0]!r} missing")
            extra = sorted(ours - {prefix + key for key in (*TENSORS, *IGNORED_TENSORS)})
            if extra:
                raise MlsaeError(
                    f"{path}: unsupported seed variant: tensor {extra[0]!r} (e.g. an encoder bias) "
                    f"is not part of the seed's MLSAE"
                )
            return {prefix + key: f.get_tensor(prefix + key) for key in TENSORS}
    except MlsaeError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise MlsaeError(f"{path}: unreadable weights ({' '.join(str(e).split())})") from None
