"""The dump stage: sparse latent activations of every eval token and layer -> `data/latents.zarr`.

Encodes the activation store's eval split, in its order, one latent-store shard at a time (the
store's layout and resume rules are in `mlsae/stores/latents.py`); `complete` is set last.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from tqdm.auto import tqdm

from mlsae.core.errors import MlsaeError
from mlsae.core.io import exclusive
from mlsae.core.paths import INDICES, STORE_SCHEMA, VALUES
from mlsae.lens.tuned import Lens
from mlsae.sae.model import MLSAE
from mlsae.stores import activations as store
from mlsae.stores import latents


def _fingerprint(sae: MLSAE, lens: Lens) -> str:
    """Hash of the SAE's weights and the lens's translators: the params hash alone does not change
    when the SAE is retrained on other activations (or the lens refit), and a partial dump must
    not be resumed with other latents."""
    h = hashlib.sha256()
    for module in (sae, lens):
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _attrs(sae: MLSAE, lens: Lens, reader: store.ActivationStore) -> dict:
    return {
        "schema": STORE_SCHEMA,
        "layers": sae.cfg.layers,
        "n_latents": sae.cfg.n_latents,
        "k": sae.cfg.k,
        "model": reader.attrs.get("model"),
        "sae_hash": sae.cfg.params_hash,
        "lens": sae.cfg.lens,
        "source_revision": reader.attrs.get("revision"),
        "n_tokens": reader.n_tokens("eval"),
        "source": {k: reader.attrs.get(k) for k in ("corpus", "data_seed", "split", "context", "eval_tokens", "dtype")},
        "skip_first": reader.skip_first,
        "fingerprint": _fingerprint(sae, lens),
    }


@torch.no_grad()
def dump(
    sae: MLSAE,
    lens: Lens,
    reader: store.ActivationStore,
    path: str,
    progress: bool = True,
    stop_after_shards: int | None = None,
) -> dict:
    """Encode every eval token at every SAE layer and store its top-k (indices, values). One
    process at a time writes a latent store (a lock beside it)."""
    if reader.n_tokens("eval") == 0:
        raise MlsaeError(f"{reader.path}: the eval split is empty")
    with exclusive(store.lock_path(path), path):
        return _dump(sae, lens, reader, path, progress, stop_after_shards)


def _dump(
    sae: MLSAE,
    lens: Lens,
    reader: store.ActivationStore,
    path: str,
    progress: bool,
    stop_after_shards: int | None,
) -> dict:
    attrs = _attrs(sae, lens, reader)
    root, done = latents.open_for_writing(path, attrs, reader)
    n, layers = attrs["n_tokens"], sae.cfg.layers
    sae.eval()
    n_shards = -(-n // latents.SHARD_TOKENS)
    bar = tqdm(total=n, initial=min(n, done * latents.SHARD_TOKENS), desc="dump", unit="tok", disable=not progress)
    for shard in range(done, n_shards):
        lo, hi = shard * latents.SHARD_TOKENS, min(n, (shard + 1) * latents.SHARD_TOKENS)
        idx_parts, val_parts = [], []
        for x in reader.chunks("eval", latents.CHUNK_TOKENS, layers, special=True, start=lo, stop=hi):
            xn, _, _ = sae.normalise(lens(x.to(sae.b_pre.device), layers))
            values, indices = sae.encode(xn)
            idx_parts.append(indices.to(torch.int32).cpu().numpy())
            val_parts.append(values.to(torch.float16).cpu().numpy())
            bar.update(x.shape[0])
        root[INDICES][lo:hi] = np.concatenate(idx_parts)
        root[VALUES][lo:hi] = np.concatenate(val_parts)
        root.attrs["done"] = shard + 1
        if stop_after_shards is not None and shard + 1 - done >= stop_after_shards:
            bar.close()
            return {}
    bar.close()
    store.seal(root, path, "dump")
    return {"tokens": n, "layers": len(layers), "k": sae.cfg.k}
