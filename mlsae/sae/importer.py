"""Importing an existing SAE in the train stage, when `sae.source` is not `train`.

Sources: a directory in this project's own format (`sae.safetensors` + `config.json`, e.g. another
experiment's `data/sae`), or a local directory or hub id in the seed paper's format
(:mod:`mlsae.sae.seed`). The SAE is checked against the activation store (d_model, model name,
layer count) and the params (lens), then written to `data/sae` in this project's format, so
evaluate, dump, aggregate and report run on it unchanged. A weight that is NaN or infinite is
refused with one line (such an SAE would reach dvc.lock and only fail downstream). The stage's
metrics say
`imported: true` with the source, a hash of the imported weights (`sae_sha256`) and no training
metrics; its training curve has the header and no rows.

An imported SAE keeps its own n_latents and k. Its layers are its own; a seed SAE whose files
record none (the plain autoencoder) takes `sae.layers`, a `-tfm` one with `layers: null` all blocks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from mlsae.core.errors import MlsaeError
from mlsae.core.io import atomic_dir, short_hash
from mlsae.core.params import SAEParams, select_layers
from mlsae.core.paths import SAE_CONFIG, SAE_WEIGHTS
from mlsae.sae.model import MLSAE, SAEConfig
from mlsae.sae.seed import HUB_ID, fetch, is_seed_dir, read_seed
from mlsae.stores.activations import ActivationStore

TRAIN_CURVE_HEADER = "step,loss,fvu,auxk,l0,dead_fraction\n"
"""The train stage's CSV columns; an imported SAE has no steps, so its curve is this header alone."""


def import_sae(sae_params: SAEParams, lens_mode: str, reader: ActivationStore, out_dir: Path) -> dict:
    """Import `sae_params.source` into `out_dir` (checked against the `lens` param, `lens_mode`); returns
    the train stage's metrics."""
    source = sae_params.source
    directory = fetch(source)
    if directory.resolve() == Path(out_dir).resolve():
        raise MlsaeError(f"sae.source: {source!r} is this stage's own output {out_dir}; copy it elsewhere first")
    store_model = str(reader.attrs.get("model"))
    if (directory / SAE_WEIGHTS).is_file() and (directory / SAE_CONFIG).is_file():
        sae, fmt = MLSAE.load(directory), "mlsae"
        _check_model(source, sae.cfg.model, store_model, reader)
    elif is_seed_dir(directory):
        sae, fmt = _from_seed(sae_params, lens_mode, reader, directory, source, store_model)
    else:
        raise MlsaeError(
            f"sae.source: {directory} holds neither this project's {SAE_WEIGHTS} + {SAE_CONFIG} "
            f"nor the seed's config.json + model.safetensors"
        )
    for name, tensor in sae.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            n_bad = int((~torch.isfinite(tensor)).sum())
            raise MlsaeError(
                f"sae.source: {source!r}: tensor {name!r} holds {n_bad} NaN or infinite value(s); refusing to import "
                f"it (re-export the SAE from a finite checkpoint, or train one: sae.source: train)"
            )
    cfg = sae.cfg
    if cfg.d_model != reader.d_model:
        raise MlsaeError(
            f"sae.source: {source!r} has d_model {cfg.d_model}, but the store {reader.path} holds "
            f"d_model {reader.d_model} (model {store_model!r})"
        )
    bad = [i for i in cfg.layers if i >= reader.n_layers]
    if bad:
        raise MlsaeError(
            f"sae.source: {source!r} uses blocks {cfg.layers}, but the store {reader.path} holds "
            f"{reader.n_layers} layers (model {store_model!r})"
        )
    if cfg.lens == "fit":
        raise MlsaeError(
            f"sae.source: {source!r} works in a fitted tuned lens's space (lens=fit), which belongs "
            f"to the run that fitted it; import an SAE with lens none or pretrained"
        )
    if cfg.lens != lens_mode:
        raise MlsaeError(
            f"lens: sae.source {source!r} works in lens={cfg.lens} space, but params say "
            f"lens={lens_mode}; set -S lens={cfg.lens}"
        )
    with atomic_dir(out_dir) as tmp:
        sae.save(tmp)
        digest = hashlib.sha256((tmp / SAE_WEIGHTS).read_bytes()).hexdigest()[:16]
    return {
        "imported": True,
        "source": source,
        "format": fmt,
        "sae_sha256": digest,
        "normalisation": cfg.normalisation,
        "d_model": cfg.d_model,
        "n_latents": cfg.n_latents,
        "k": cfg.k,
        "layers": cfg.layers,
        "lens": cfg.lens,
        "steps": 0,
        "tokens": 0,
    }


def _from_seed(
    sae_params: SAEParams, lens_mode: str, reader: ActivationStore, directory: Path, source: str, store_model: str
) -> tuple[MLSAE, str]:
    seed = read_seed(directory, source)
    if seed.model is not None:
        _check_model(source, seed.model, store_model, reader)
    if seed.layers is not None:
        layers = seed.layers
    elif seed.tfm:
        layers = list(range(reader.n_layers))
    else:
        layers = select_layers(sae_params, reader.n_layers)
    cfg = SAEConfig(
        d_model=seed.w_enc.shape[1],
        n_latents=seed.w_enc.shape[0],
        k=seed.k,
        layers=layers,
        auxk=seed.auxk,
        normalisation="seed",
        lens="pretrained" if seed.lens else "none",
        model=store_model,
        params_hash=short_hash({"sae": sae_params.model_dump(), "lens": lens_mode}),
    )
    sae = MLSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(seed.w_enc)
        sae.W_dec.copy_(seed.w_dec)  # as stored: the seed's columns are not renormalised here
        sae.b_pre.copy_(seed.b_pre)
    return sae, "seed-tfm" if seed.tfm else "seed"


def model_key(name: str) -> str:
    """A model name compared across naming schemes: registry names resolve to their hub id, then
    the last path part, lower-cased (`pythia-70m-deduped` = `EleutherAI/pythia-70m-deduped`)."""
    from mlsae.models.registry import REGISTRY

    target = REGISTRY.get(name, name)
    resolved = target if HUB_ID.match(target) else name  # not the embedded/tiny markers
    return resolved.rstrip("/").split("/")[-1].lower()


def _check_model(source: str, sae_model: str, store_model: str, reader: ActivationStore) -> None:
    if sae_model and model_key(sae_model) != model_key(store_model):
        raise MlsaeError(
            f"model: sae.source {source!r} was trained on model {sae_model!r}, but the store "
            f"{reader.path} holds model {store_model!r}; set -S model=... to match"
        )
