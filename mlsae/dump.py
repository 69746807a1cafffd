"""The dump stage: sparse latent activations of every eval token and layer -> `data/latents.zarr`.

Arrays `indices (tokens, layers, k)` int32 and `values (tokens, layers, k)` float16, in the
activation store's eval order, plus copies of its `tokens`, `context`, `position`, `special`
arrays so analysis needs only this store. Written one whole shard at a time with a `done`
counter, so an interrupted dump resumes; `complete` is set last. `indices` and `values` chunks
carry a CRC32C checksum (`store.CHECKSUM`), so a garbled shard raises on read instead of
changing the statistics.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec
from tqdm.auto import tqdm

from mlsae import store
from mlsae.constants import CONTEXT, INDICES, POSITION, SPECIAL, STORE_SCHEMA, TOKENS, VALUES
from mlsae.errors import MlsaeError
from mlsae.io import remove
from mlsae.lens import Lens
from mlsae.sae import MLSAE

SHARD_TOKENS = 8192
CHUNK_TOKENS = 1024


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
    return {"schema": STORE_SCHEMA, "layers": sae.cfg.layers, "n_latents": sae.cfg.n_latents, "k": sae.cfg.k,
            "model": reader.attrs.get("model"), "sae_hash": sae.cfg.params_hash, "lens": sae.cfg.lens,
            "source_revision": reader.attrs.get("revision"), "n_tokens": reader.n_tokens("eval"),
            "source": {k: reader.attrs.get(k) for k in ("corpus", "seed", "context", "eval_tokens", "dtype")},
            "fingerprint": _fingerprint(sae, lens)}


def _open(path: str, attrs: dict, reader: store.ActivationStore) -> tuple[zarr.Group, int]:
    """(group, shards already done): resume a matching incomplete store, else start afresh."""
    if store.exists(path):
        root = store.open_root(path, mode="r+")
        old = dict(root.attrs)
        if not old.get("complete") and all(old.get(k) == v for k, v in attrs.items()):
            return root, int(old.get("done", 0))
        remove(path)
    n, L, k = attrs["n_tokens"], len(attrs["layers"]), attrs["k"]
    root = zarr.open_group(path, mode="w")
    root.attrs.update({**attrs, "done": 0, "complete": False})
    shape, chunks, shards = (n, L, k), (CHUNK_TOKENS, L, k), (SHARD_TOKENS, L, k)
    codecs = {"compressors": [ZstdCodec(), store.CHECKSUM], "fill_value": 0}  # checksummed: garbling raises
    root.create_array(INDICES, shape=shape, dtype=np.int32, chunks=chunks, shards=shards, **codecs)
    root.create_array(VALUES, shape=shape, dtype=np.float16, chunks=chunks, shards=shards, **codecs)
    for key in (TOKENS, CONTEXT, POSITION, SPECIAL):
        root.create_array(key, data=reader.meta("eval", key), chunks=(SHARD_TOKENS,))
    return root, 0


@torch.no_grad()
def dump(sae: MLSAE, lens: Lens, reader: store.ActivationStore, path: str, progress: bool = True,
         stop_after_shards: int | None = None) -> dict:
    """Encode every eval token at every SAE layer and store its top-k (indices, values)."""
    if reader.n_tokens("eval") == 0:
        raise MlsaeError(f"{reader.path}: the eval split is empty")
    attrs = _attrs(sae, lens, reader)
    root, done = _open(path, attrs, reader)
    n, layers = attrs["n_tokens"], sae.cfg.layers
    sae.eval()
    n_shards = -(-n // SHARD_TOKENS)
    bar = tqdm(total=n, initial=min(n, done * SHARD_TOKENS), desc="dump", unit="tok", disable=not progress)
    for shard in range(done, n_shards):
        lo, hi = shard * SHARD_TOKENS, min(n, (shard + 1) * SHARD_TOKENS)
        idx_parts, val_parts = [], []
        for s in range(lo, hi, CHUNK_TOKENS):
            x = reader.resid("eval", s, min(hi, s + CHUNK_TOKENS), layers)
            xn, _, _ = sae.normalise(lens(x, layers))
            values, indices = sae.encode(xn)
            idx_parts.append(indices.to(torch.int32).numpy())
            val_parts.append(values.to(torch.float16).numpy())
            bar.update(x.shape[0])
        root[INDICES][lo:hi] = np.concatenate(idx_parts)
        root[VALUES][lo:hi] = np.concatenate(val_parts)
        root.attrs["done"] = shard + 1
        if stop_after_shards is not None and shard + 1 - done >= stop_after_shards:
            bar.close()
            return {}
    bar.close()
    root.attrs["complete"] = True
    return {"tokens": n, "layers": len(layers), "k": sae.cfg.k}
