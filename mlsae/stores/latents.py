"""The latent store `data/latents.zarr` (Zarr v3, sharded): layout, writing, reading.

Layout (written by the dump stage, read by aggregate and report):
  indices  (tokens, layers, k) int32    latent ids of each eval token's top-k at each SAE layer
  values   (tokens, layers, k) float16  their activations (0: not active)
  tokens (tokens,) int32   context (tokens,) int32   position (tokens,) int16   special (tokens,) bool
  document (tokens,) int64
           copies of the activation store's eval metadata, so analysis needs only this store
Every chunk of every array is zstd-compressed and carries a CRC32C checksum, so a garbled shard
raises on read (one error line, see store.guard) instead of silently changing the statistics, and
a finished store records each array's chunk count (`arrays`, see `activations.seal`), checked on
every open, so a missing chunk is an error instead of zeros.
Root attrs: schema, layers (SAE block indices, the layer axis's order), n_latents, k, model,
sae_hash, lens, source_revision, n_tokens, source, skip_first (copied from the activation store:
position 0 is left out of the analysis), fingerprint (SAE + lens weights), done (shards
written), `arrays` (the completion record) and `complete`, set last. `indices`/`values` are written one whole shard
(``SHARD_TOKENS`` tokens) at a time, so an interrupted dump resumes from its last finished shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from mlsae.core.errors import MlsaeError
from mlsae.core.io import remove
from mlsae.core.params import is_int
from mlsae.core.paths import CONTEXT, DOCUMENT, INDICES, POSITION, SPECIAL, TOKENS, VALUES
from mlsae.stores.activations import CHECKSUM, META_CODECS, ActivationStore, exists, open_root, verify

SHARD_TOKENS = 8192
"""Tokens per shard (the unit of writing and resuming)."""
CHUNK_TOKENS = 1024
"""Tokens per chunk inside a shard (the unit of reading)."""


def open_for_writing(path: str, attrs: dict, reader: ActivationStore) -> tuple[zarr.Group, int]:
    """(group, shards already done): resume a matching incomplete latent store, else create a new
    one holding the eval split's token metadata (copied from the activation store `reader`)."""
    if exists(path):
        root = open_root(path, mode="r+")
        old = dict(root.attrs)
        if not old.get("complete") and all(old.get(k) == v for k, v in attrs.items()):
            return root, int(old.get("done", 0))
        remove(path)
    n, L, k = attrs["n_tokens"], len(attrs["layers"]), attrs["k"]
    root = zarr.open_group(path, mode="w")
    root.attrs.update({**attrs, "done": 0, "complete": False})
    shape, chunks, shards = (n, L, k), (CHUNK_TOKENS, L, k), (SHARD_TOKENS, L, k)
    codecs = {"compressors": [ZstdCodec(), CHECKSUM], "fill_value": 0}  # checksummed: garbling raises on read
    root.create_array(INDICES, shape=shape, dtype=np.int32, chunks=chunks, shards=shards, **codecs)
    root.create_array(VALUES, shape=shape, dtype=np.float16, chunks=chunks, shards=shards, **codecs)
    for key in (TOKENS, CONTEXT, POSITION, SPECIAL, DOCUMENT):
        root.create_array(key, data=reader.meta("eval", key), chunks=(SHARD_TOKENS,), compressors=META_CODECS)
    return root, 0


# Entries (tokens x layers x k) read per chunk by default: large enough to amortise per-chunk work,
# small enough to keep the working set to tens of MiB.
_TARGET_CHUNK_ENTRIES = 1 << 20


@dataclass(frozen=True)
class LatentChunk:
    """The analysed tokens of one run of the store (see :meth:`LatentStore.read`)."""

    token: np.ndarray
    """(c,) int64: store index of each analysed token."""
    indices: np.ndarray
    """(c, L, k) latent ids, each in 0..n_latents-1."""
    values: np.ndarray
    """(c, L, k) float32 activations, >= 0 (0: not active; float16 stores convert exactly)."""


@dataclass(frozen=True)
class LatentStore:
    """A validated, complete latent store: the one reader of `data/latents.zarr` (aggregate, report
    and browse all read it here). Arrays are zarr arrays, read lazily; the per-token metadata is
    read once, on first use."""

    path: Path
    indices: Any  # (T, L, k) integer latent ids
    values: Any  # (T, L, k) float activations
    special: Any  # (T,) bool
    blocks: list[int]
    n_latents: int
    k: int
    position: Any = None  # (T,) int position in its context
    skip_first: bool = False  # position 0 of each context is left out of the analysis
    group: Any = None  # the zarr group (metadata arrays)

    def kept(self, start: int, stop: int) -> np.ndarray:
        """(stop - start,) bool: the tokens analysed: not special, and not position 0 of a context
        when the store says `skip_first` (copied from the activation store by dump)."""
        keep = ~np.asarray(self.special[start:stop], dtype=bool)
        if self.skip_first:
            keep &= np.asarray(self.position[start:stop]) != 0
        return keep

    def meta(self, key: str) -> np.ndarray:
        """A whole per-token metadata array (`tokens`, `context`, `position`, `special`,
        `document`), read once and cached."""
        cache = self.__dict__.setdefault("_meta", {})
        if key not in cache:
            try:
                cache[key] = np.asarray(self.group[key][:])
            except KeyError:
                raise MlsaeError(f"{self.path}: latent store has no '{key}' array; rerun the dump stage") from None
        return cache[key]

    def read(self, start: int, stop: int) -> LatentChunk:
        """The analysed tokens among ``start:stop`` (see :meth:`kept`), their latent ids checked to
        lie in 0..n_latents-1 and their values to be >= 0 (a garbled store fails with one line)."""
        keep = self.kept(start, stop)
        indices = np.asarray(self.indices[start:stop])
        values = np.asarray(self.values[start:stop])
        token = np.arange(start, stop, dtype=np.int64)
        if not keep.all():
            indices, values, token = indices[keep], values[keep], token[keep]
        values = np.ascontiguousarray(values, dtype=np.float32)
        indices = np.ascontiguousarray(indices)
        if token.size:
            if not (values >= 0).all():  # also catches NaN
                raise MlsaeError(f"{self.path}: '{VALUES}' has negative or NaN entries in tokens {start}..{stop - 1}")
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.n_latents:
                bad = low if low < 0 else high
                raise MlsaeError(f"{self.path}: '{INDICES}' holds latent id {bad}, outside 0..{self.n_latents - 1}")
        return LatentChunk(token, indices, values)

    def chunk_tokens(self) -> int:
        """Tokens per read by default: whole storage chunks (inner chunks of a shard), about
        ``_TARGET_CHUNK_ENTRIES`` entries, so memory per step is the same whatever the shard size."""
        unit = int(self.indices.chunks[0])
        per_token = self.n_layers * self.k
        return unit * max(1, _TARGET_CHUNK_ENTRIES // (unit * per_token))

    @property
    def n_tokens(self) -> int:
        return int(self.indices.shape[0])

    @property
    def n_layers(self) -> int:
        return len(self.blocks)


def open_latents(path: Path) -> LatentStore:
    """Open ``path`` as a latent store and check it against the contract, or raise MlsaeError."""
    if not path.exists():
        raise MlsaeError(f"{path}: latent store not found (run the dump stage first)")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for "not a group"
        raise MlsaeError(f"{path}: not a readable Zarr group ({type(exc).__name__}: {exc})") from exc
    attrs = dict(group.attrs)
    if attrs.get("complete") is not True:
        raise MlsaeError(f"{path}: incomplete latent store (attr 'complete' is not true); rerun the dump stage")
    verify(group, path, "dump")
    arrays: dict[str, Any] = {}
    for name in (INDICES, VALUES, SPECIAL):
        try:
            arrays[name] = group[name]
        except KeyError:
            raise MlsaeError(f"{path}: latent store has no '{name}' array") from None
    indices, values, special = arrays[INDICES], arrays[VALUES], arrays[SPECIAL]
    if indices.ndim != 3 or values.shape != indices.shape:
        raise MlsaeError(
            f"{path}: '{INDICES}' {indices.shape} and '{VALUES}' {values.shape} must share one "
            "(tokens, layers, k) shape"
        )
    if special.shape != indices.shape[:1]:
        raise MlsaeError(f"{path}: '{SPECIAL}' has shape {special.shape}, expected ({indices.shape[0]},)")
    if not np.issubdtype(indices.dtype, np.integer):
        raise MlsaeError(f"{path}: '{INDICES}' must hold integers, got {indices.dtype}")
    if values.dtype not in (np.float16, np.float32, np.float64):
        raise MlsaeError(f"{path}: '{VALUES}' must be float16, float32 or float64, got {values.dtype}")
    blocks = attrs.get("layers")
    if not isinstance(blocks, list) or not all(is_int(b) for b in blocks) or len(blocks) != indices.shape[1]:
        raise MlsaeError(
            f"{path}: attr 'layers' must list the {indices.shape[1]} selected block indices, got {blocks!r}"
        )
    n_latents: Any = attrs.get("n_latents")  # a JSON attr, checked here
    if not is_int(n_latents) or n_latents < 1:
        raise MlsaeError(f"{path}: attr 'n_latents' must be a positive integer, got {n_latents!r}")
    k = attrs.get("k")
    if k != indices.shape[2] or indices.shape[2] < 1:
        raise MlsaeError(f"{path}: attr 'k' is {k!r} but the arrays hold {indices.shape[2]} entries per layer")
    if indices.shape[0] == 0 or indices.shape[1] == 0:
        raise MlsaeError(f"{path}: latent store holds no tokens or no layers (shape {indices.shape})")
    skip_first = bool(attrs.get("skip_first", False))
    position = group[POSITION] if skip_first else None
    return LatentStore(path, indices, values, special, list(blocks), n_latents, int(k), position, skip_first, group)
