"""Streaming analysis of the latent store: each latent's distribution over layers.

Notation (DESIGN.md, "Analysis"): ``a[t, l, f] >= 0`` is latent ``f``'s activation at eval token
``t`` and layer *position* ``l = 0 .. L-1`` (the position in the store's ``layers`` attr, not the
block index). A top-k entry whose value is 0 is not active. Special tokens are left out of every
statistic (and of ``n_tokens``).

* Per-token distribution, for every *active pair* ``(t, f)`` (``f`` active at >= 1 layer of ``t``):
  ``p_tf(l) = a[t,l,f] / sum_l a[t,l,f]``, mean ``mu_tf = sum_l l p_tf(l)`` and variance
  ``var_tf = sum_l l^2 p_tf(l) - mu_tf^2`` (exactly 0 for a pair active at one layer).
* Aggregate distribution of latent ``f``: ``P_f(l) = sum_t a[t,l,f] / sum_{t,l} a[t,l,f]``, with
  mean ``mu_f`` and variance ``var_f``.

How it streams. :func:`aggregate` reads the store one chunk of tokens at a time (a reader thread
fetches the next chunk meanwhile, a writer thread appends the previous chunk's rows). Per chunk:

* the ``(f, l)`` sums (entries, mass) are one ``bincount`` over the integer key ``f * L + l``, added
  to a running ``n_latents x L`` table;
* the ``(t, f)`` grouping exploits the store's token-major layout: each token's ``L * k`` entries
  are packed into int64 keys ``latent | activation bits | layer`` and sorted *within the token's
  row* (small, cache-resident sorts), so each pair's entries form a run, the run's last key holds
  its peak, and the per-pair sums are ``bincount`` over run numbers. A Polars hash ``group_by`` on
  ``t * n_latents + f`` with the same aggregations was several times slower on the benchmark store
  (most pairs hold 1-3 entries, so the hash table is as large as the input);
* the per-pair rows are folded into per-latent sums and appended to ``token_latent.parquet`` as one
  row group, then dropped; the running top tokens are a small Polars table merged with the chunk's
  candidates (those beating the latent's current last entry).

Nothing of size ``tokens x layers x latents`` (or ``tokens x latents``) is built and no per-token
table outlives its chunk, so memory is bounded by the chunk size and ``n_latents x L``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from tqdm.auto import tqdm

from mlsae.constants import (
    INDICES,
    LATENT_LAYER,
    LATENT_STATS,
    LAYER_STATS,
    SPECIAL,
    TOKEN_STATS,
    TOP_TOKENS,
    VALUES,
)
from mlsae.errors import MlsaeError

__all__ = [
    "LATENTS_SCHEMA",
    "LATENT_LAYER_SCHEMA",
    "LAYERS_SCHEMA",
    "TOKEN_LATENT_SCHEMA",
    "TOP_TOKENS_SCHEMA",
    "aggregate",
    "paper_variances_dense",
]

# Entries (tokens x layers x k) read per chunk by default: large enough to amortise the per-chunk
# work on the n_latents x L tables, small enough to keep the working set to tens of MiB.
_TARGET_CHUNK_ENTRIES = 1 << 20
# Entries grouped per row-sort block: small enough for the temporaries to stay in cache.
_TARGET_BLOCK_ENTRIES = 1 << 15
# Candidate rows above which the running top-token merge is split in two.
_TOP_MERGE_ROWS = 1 << 15
# Share of a latent's mass that makes a layer count in ``n_layers_5pct``.
_LAYER_SHARE = 0.05

TOKEN_LATENT_SCHEMA: dict[str, pl.DataType] = {
    "token": pl.Int64(),
    "latent": pl.Int32(),
    "n_layers": pl.Int32(),
    "mass": pl.Float32(),
    "mean_layer": pl.Float32(),
    "var_layer": pl.Float32(),
}
_TOKEN_LATENT_ARROW = pl.DataFrame(schema=TOKEN_LATENT_SCHEMA).to_arrow().schema
LATENTS_SCHEMA: dict[str, pl.DataType] = {
    "latent": pl.Int32(),
    "count": pl.Int64(),
    "n_entries": pl.Int64(),
    "mass": pl.Float64(),
    "mean_layer": pl.Float64(),
    "var_layer": pl.Float64(),
    "std_layer": pl.Float64(),
    "entropy": pl.Float64(),
    "n_layers_5pct": pl.Int32(),
    "var_token_mean": pl.Float64(),
    "multi_layer_fraction": pl.Float64(),
    "layer_dist": pl.List(pl.Float64()),
}
LATENT_LAYER_SCHEMA: dict[str, pl.DataType] = {
    "latent": pl.Int32(),
    "layer": pl.Int32(),
    "block": pl.Int32(),
    "mass": pl.Float64(),
    "count": pl.Int64(),
    "p": pl.Float64(),
}
LAYERS_SCHEMA: dict[str, pl.DataType] = {
    "layer": pl.Int32(),
    "block": pl.Int32(),
    "n_entries": pl.Int64(),
    "n_latents_active": pl.Int64(),
    "mass": pl.Float64(),
    "mean_activation": pl.Float64(),
}
TOP_TOKENS_SCHEMA: dict[str, pl.DataType] = {
    "latent": pl.Int32(),
    "rank": pl.Int32(),
    "token": pl.Int64(),
    "value": pl.Float32(),
    "layer": pl.Int32(),
}


# --------------------------------------------------------------------------------------------
# The paper's formula, dense reference
# --------------------------------------------------------------------------------------------


def paper_variances_dense(a: np.ndarray) -> dict[str, float]:
    """The seed paper's all-pairs layer variances, on a dense ``(T, L, F)`` activation array.

    Re-implements the definition in tim-lawson/mlsae ``mlsae/analysis/variances.py``
    (``Metric.update``), for one batch holding all ``T`` tokens:

    * ``p[t, :, f] = a[t, :, f] / sum_l a[t, l, f]``, and ``p[t, :, f] = 0`` where the latent is
      inactive at every layer (the original turns those 0/0 NaNs into zeros);
    * ``v(x) = sum_l l^2 x(l) - (sum_l l x(l))^2`` for a vector ``x`` over layer positions;
    * ``var_token_paper`` (the original's ``exp_var_l_tf``) is the mean of ``v(p[t, :, f])`` over
      *all* ``T * F`` pairs, inactive pairs counting as 0. It equals our ``var_token`` times
      ``n_active_pairs / (T * F)``;
    * ``var_aggregate_paper`` (the original's ``exp_var_l_f``) is the mean over *all* ``F`` latents
      of ``v(q_f)``, with ``q_f(l) = mean over all T tokens of p[t, l, f]``. ``q_f`` is the average
      of the per-token distributions, each token weighted equally, and it sums to the fraction of
      tokens at which ``f`` is active rather than to 1, so ``v(q_f)`` is not the variance of a
      distribution (for a latent active at a fraction ``r`` of tokens, always at layer ``l``, it is
      ``r (1 - r) l^2``, not 0); never-active latents count as 0.

    Ours differ: ``var_aggregate`` uses the mass-weighted, normalised ``P_f`` and averages over the
    latents active at >= ``min_count`` tokens only, and ``var_token`` averages over active pairs
    only. The original also averaged its per-batch figures over batches of
    ``batch_size * max_length`` tokens; here (and in :func:`aggregate`) the whole input is one
    batch, which matters for ``var_aggregate_paper`` because ``v`` is not linear in ``q_f``.

    Args:
        a: non-negative activations, shape ``(T, L, F)`` with ``T >= 1``.

    Returns:
        ``{"var_token_paper": float, "var_aggregate_paper": float}``.
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 3 or a.shape[0] == 0:
        raise MlsaeError(f"paper_variances_dense: expected a (T, L, F) array with T >= 1, got shape {a.shape}")
    ell = np.arange(a.shape[1], dtype=np.float64)[None, :, None]
    total = a.sum(axis=1, keepdims=True)
    p = np.divide(a, total, out=np.zeros_like(a), where=total > 0)

    def v(x: np.ndarray) -> np.ndarray:
        """Second moment minus squared first moment over axis 1 (layers), no normalisation."""
        return (ell**2 * x).sum(axis=1) - (ell * x).sum(axis=1) ** 2

    return {
        "var_token_paper": float(v(p).mean()),
        "var_aggregate_paper": float(v(p.mean(axis=0, keepdims=True)).mean()),
    }


# --------------------------------------------------------------------------------------------
# The latent store
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Store:
    """A validated, complete latent store (arrays are zarr arrays, read lazily)."""

    path: Path
    indices: Any  # (T, L, k) integer latent ids
    values: Any  # (T, L, k) float activations
    special: Any  # (T,) bool
    blocks: list[int]
    n_latents: int
    k: int

    @property
    def n_tokens(self) -> int:
        return int(self.indices.shape[0])

    @property
    def n_layers(self) -> int:
        return len(self.blocks)


def _open_store(path: Path) -> _Store:
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
    if (
        not isinstance(blocks, list)
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)
        or len(blocks) != indices.shape[1]
    ):
        raise MlsaeError(
            f"{path}: attr 'layers' must list the {indices.shape[1]} selected block indices, got {blocks!r}"
        )
    n_latents = attrs.get("n_latents")
    if not isinstance(n_latents, int) or isinstance(n_latents, bool) or n_latents < 1:
        raise MlsaeError(f"{path}: attr 'n_latents' must be a positive integer, got {n_latents!r}")
    k = attrs.get("k")
    if k != indices.shape[2] or indices.shape[2] < 1:
        raise MlsaeError(f"{path}: attr 'k' is {k!r} but the arrays hold {indices.shape[2]} entries per layer")
    if indices.shape[0] == 0 or indices.shape[1] == 0:
        raise MlsaeError(f"{path}: latent store holds no tokens or no layers (shape {indices.shape})")
    return _Store(path, indices, values, special, list(blocks), n_latents, int(k))


def _default_chunk_tokens(store: _Store) -> int:
    """Whole storage chunks (inner chunks of a shard) along tokens, about ``_TARGET_CHUNK_ENTRIES``
    entries: memory per step stays the same whatever the store's shard size."""
    unit = int(store.indices.chunks[0])
    per_token = store.n_layers * store.k
    return unit * max(1, _TARGET_CHUNK_ENTRIES // (unit * per_token))


@dataclass
class _Chunk:
    """The non-special tokens of one chunk of the store."""

    token: np.ndarray  # (c,) int64 global eval index of each token kept
    indices: np.ndarray  # (c, L, k) latent ids
    values: np.ndarray  # (c, L, k) float16 or float32 activations
    inactive: np.ndarray  # (c, L, k) bool: values == 0
    n_active: int  # active entries
    cell_count: np.ndarray  # (F, L) active entries per (latent, layer)
    cell_mass: np.ndarray  # (F, L) activation mass per (latent, layer)


def _cell_sums(
    indices: np.ndarray, values: np.ndarray, inactive: np.ndarray, n_latents: int
) -> tuple[np.ndarray, np.ndarray]:
    """Active entries and mass per (latent, layer): one bincount on the key ``f * L + l``."""
    n_layers = indices.shape[1]
    n_cells = n_latents * n_layers
    cell = indices.astype(np.int64)
    cell *= n_layers
    cell += np.arange(n_layers, dtype=np.int64)[None, :, None]
    cell[inactive] = n_cells  # one spare bin for inactive entries
    cell = cell.reshape(-1)
    count = np.bincount(cell, minlength=n_cells + 1)[:n_cells]
    mass = np.bincount(cell, weights=values.reshape(-1).astype(np.float64), minlength=n_cells + 1)[:n_cells]
    return count.reshape(n_latents, n_layers), mass.reshape(n_latents, n_layers)


def _read_chunk(store: _Store, start: int, stop: int) -> _Chunk:
    """Read tokens ``start:stop``, drop special tokens, check values and latent ids, and sum the
    chunk's (latent, layer) cells (this runs in the reader thread, alongside the grouping)."""
    keep = ~np.asarray(store.special[start:stop], dtype=bool)
    indices = np.asarray(store.indices[start:stop])
    values = np.asarray(store.values[start:stop])
    token = np.arange(start, stop, dtype=np.int64)
    if not keep.all():
        indices, values, token = indices[keep], values[keep], token[keep]
    if values.dtype == np.float64:
        values = values.astype(np.float32)
    if token.size:
        if not (values >= 0).all():  # also catches NaN
            raise MlsaeError(f"{store.path}: '{VALUES}' has negative or NaN entries in tokens {start}..{stop - 1}")
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= store.n_latents:
            bad = low if low < 0 else high
            raise MlsaeError(f"{store.path}: '{INDICES}' holds latent id {bad}, outside 0..{store.n_latents - 1}")
    inactive = values == 0  # (no NaN or negative values by now)
    n_active = inactive.size - int(np.count_nonzero(inactive))
    cells = _cell_sums(indices, values, inactive, store.n_latents)
    return _Chunk(token, indices, values, inactive, n_active, *cells)


def _iter_chunks(store: _Store, chunk_tokens: int, pool: ThreadPoolExecutor) -> Iterator[_Chunk]:
    """Yield the store's chunks in token order, reading the next one in ``pool`` meanwhile."""
    n_tokens = store.n_tokens

    def read(start: int) -> Future[_Chunk]:
        return pool.submit(_read_chunk, store, start, min(start + chunk_tokens, n_tokens))

    pending = read(0)
    for start in range(0, n_tokens, chunk_tokens):
        chunk = pending.result()
        if start + chunk_tokens < n_tokens:
            pending = read(start + chunk_tokens)
        if chunk.token.size:
            yield chunk


# --------------------------------------------------------------------------------------------
# Grouping one chunk's entries by (token, latent)
# --------------------------------------------------------------------------------------------


class _Packing:
    """Bit layout of an entry's int64 sort key: ``latent | activation bits | layer_mask - layer``.

    Non-negative IEEE floats order like their bit patterns, so sorting a token's keys groups its
    entries by latent and, within a latent, puts the largest activation last (on ties, the lowest
    layer last). The key alone gives back all three fields. Inactive entries get latent
    ``n_latents`` (the sentinel), which sorts after every real one.
    """

    def __init__(self, n_latents: int, n_layers: int, value_dtype: np.dtype) -> None:
        self.n_latents = n_latents
        self.float_dtype = np.dtype(value_dtype)
        self.bits_dtype = np.dtype(np.uint16 if self.float_dtype == np.float16 else np.uint32)
        self.layer_bits = (n_layers - 1).bit_length()
        self.layer_mask = (1 << self.layer_bits) - 1
        self.value_mask = (1 << (8 * self.bits_dtype.itemsize)) - 1
        self.latent_shift = 8 * self.bits_dtype.itemsize + self.layer_bits
        if n_latents.bit_length() + self.latent_shift > 63:
            raise MlsaeError(
                f"n_latents={n_latents} with {n_layers} layers of {self.float_dtype} values does not fit the "
                "64-bit sort key; store float16 values"
            )
        self.sentinel = n_latents << self.latent_shift
        self.layer_code = (self.layer_mask - np.arange(n_layers, dtype=np.int64))[None, :, None]

    def value(self, key: np.ndarray) -> np.ndarray:
        """The activations (float64) of packed keys."""
        bits = (key >> self.layer_bits) & self.value_mask
        return bits.astype(self.bits_dtype).view(self.float_dtype).astype(np.float64)

    def layer(self, key: np.ndarray) -> np.ndarray:
        """The layer positions of packed keys."""
        return self.layer_mask - (key & self.layer_mask)


@dataclass
class _Pairs:
    """Per active ``(token, latent)`` pair of one chunk, ordered by token then latent."""

    row: np.ndarray  # int64 token position within the chunk
    latent: np.ndarray  # int64
    n_layers: np.ndarray  # int64 active layers
    mass: np.ndarray  # float64 sum_l a
    mean: np.ndarray  # float64 mu_tf
    second: np.ndarray  # float64 sum_l l^2 p_tf(l)
    var: np.ndarray  # float64 var_tf
    peak_value: np.ndarray  # float32 max_l a
    peak_layer: np.ndarray  # int64 lowest layer position holding that max

    @classmethod
    def empty(cls, capacity: int) -> _Pairs:
        """Uninitialised columns for up to ``capacity`` pairs."""
        i64, f64 = np.int64, np.float64
        dtypes = (i64, i64, i64, f64, f64, f64, f64, np.float32, i64)
        return cls(*(np.empty(capacity, dtype) for dtype in dtypes))

    def __len__(self) -> int:
        return self.row.size

    def slice(self, start: int, stop: int) -> _Pairs:
        """Views of pairs ``start:stop``."""
        return _Pairs(*(column[start:stop] for column in vars(self).values()))


def _block_pairs(
    indices: np.ndarray, values: np.ndarray, inactive: np.ndarray, pack: _Packing, out: _Pairs, pos: int
) -> int:
    """Group one block of ``(b, L, k)`` entries by (token, latent) with per-token sorts.

    Writes the block's active pairs, ordered by row then latent, to ``out`` from ``pos`` on (rows
    relative to the block) and returns the position after them.
    """
    b, n_layers, k = indices.shape
    width = n_layers * k
    key = indices.astype(np.int64)
    key <<= pack.latent_shift
    key |= values.view(pack.bits_dtype).astype(np.int64) << pack.layer_bits
    key |= pack.layer_code
    key[inactive] = pack.sentinel
    key = key.reshape(b, width)
    key.sort(axis=1)
    key = key.reshape(-1)

    latent = key >> pack.latent_shift
    first = np.empty(key.size, dtype=bool)
    first[0] = True
    np.not_equal(latent[1:], latent[:-1], out=first[1:])
    first[::width] = True  # a pair never spans two tokens
    starts = np.flatnonzero(first)
    run = np.cumsum(first)  # each entry's run, numbered from 1

    # bincount adds each run's few entries in order: exact, and far cheaper than reduceat per run.
    a = pack.value(key)
    layer = pack.layer(key).astype(np.float64)
    mass = np.bincount(run, weights=a)[1:]
    a *= layer
    s1 = np.bincount(run, weights=a)[1:]
    a *= layer
    s2 = np.bincount(run, weights=a)[1:]
    size = np.diff(starts, append=key.size)
    real = np.flatnonzero(latent[starts] < pack.n_latents)  # drop the runs of inactive entries
    end = pos + real.size
    first_entry = starts[real]
    size = np.take(size, real, out=out.n_layers[pos:end])
    np.floor_divide(first_entry, width, out=out.row[pos:end])
    np.take(latent, first_entry, out=out.latent[pos:end])
    mass = np.take(mass, real, out=out.mass[pos:end])
    mean = np.divide(s1[real], mass, out=out.mean[pos:end])
    second = np.divide(s2[real], mass, out=out.second[pos:end])
    # One active layer gives exactly 0; elsewhere clip the rounding of the difference of moments.
    var = out.var[pos:end]
    np.subtract(second, mean * mean, out=var)
    np.maximum(var, 0.0, out=var)
    var[size == 1] = 0.0
    peak = key[first_entry + size - 1]  # the run's last key: largest activation, lowest layer on ties
    out.peak_value[pos:end] = pack.value(peak)
    out.peak_layer[pos:end] = pack.layer(peak)
    return end


class _Grouper:
    """Groups each chunk's active entries by (token, latent), in cache-sized blocks of tokens.

    The pair columns live in one buffer reused across chunks (which spares the page faults of fresh
    arrays), so the result of :meth:`pairs` is valid until the next call.
    """

    def __init__(self, pack: _Packing) -> None:
        self.pack = pack
        self.buffer = _Pairs.empty(0)

    def pairs(self, chunk: _Chunk) -> _Pairs:
        n_tokens, n_layers, k = chunk.indices.shape
        block = max(1, _TARGET_BLOCK_ENTRIES // (n_layers * k))
        capacity = chunk.n_active  # a pair holds >= 1 active entry
        if self.buffer.row.size < capacity:
            self.buffer = _Pairs.empty(capacity)
        out, pos = self.buffer, 0
        for start in range(0, n_tokens, block):
            stop = start + block
            block_entries = (chunk.indices[start:stop], chunk.values[start:stop], chunk.inactive[start:stop])
            end = _block_pairs(*block_entries, self.pack, out, pos)
            out.row[pos:end] += start
            pos = end
        return out.slice(0, pos)


# --------------------------------------------------------------------------------------------
# Streaming accumulation
# --------------------------------------------------------------------------------------------


@dataclass
class _Accumulator:
    """Running sums over chunks: ``n_latents x L`` and per-latent tables, scalars, top tokens."""

    n_latents: int
    n_layers: int
    top_n: int
    layer_count: np.ndarray = field(init=False)  # (F, L) active entries
    layer_mass: np.ndarray = field(init=False)  # (F, L) sum of activations
    pair_count: np.ndarray = field(init=False)  # (F,) active tokens
    pair_multi: np.ndarray = field(init=False)  # (F,) active tokens with > 1 active layer
    pair_var: np.ndarray = field(init=False)  # (F,) sum of var_tf
    pair_mean: np.ndarray = field(init=False)  # (F,) sum of mu_tf (paper formula)
    pair_second: np.ndarray = field(init=False)  # (F,) sum of sum_l l^2 p_tf(l) (paper formula)
    threshold: np.ndarray = field(init=False)  # (F,) activation a token must beat to enter the top list
    top: pl.DataFrame = field(init=False)
    n_tokens: int = 0
    n_pairs: int = 0
    n_multi: int = 0
    var_sum: float = 0.0
    mass_sum: float = 0.0
    mass_var_sum: float = 0.0

    def __post_init__(self) -> None:
        n_latents, n_layers = self.n_latents, self.n_layers
        self.layer_count = np.zeros((n_latents, n_layers), np.int64)
        self.layer_mass = np.zeros((n_latents, n_layers), np.float64)
        self.pair_count = np.zeros(n_latents, np.int64)
        self.pair_multi = np.zeros(n_latents, np.int64)
        self.pair_var = np.zeros(n_latents, np.float64)
        self.pair_mean = np.zeros(n_latents, np.float64)
        self.pair_second = np.zeros(n_latents, np.float64)
        self.threshold = np.full(n_latents, -np.inf, np.float32)
        self.top = pl.DataFrame(schema={name: dtype for name, dtype in TOP_TOKENS_SCHEMA.items() if name != "rank"})

    def add_cells(self, chunk: _Chunk) -> None:
        """Fold the chunk's ``(latent, layer)`` sums into the running tables."""
        self.layer_count += chunk.cell_count
        self.layer_mass += chunk.cell_mass

    def add_pairs(self, pairs: _Pairs, token: np.ndarray) -> None:
        """Fold one chunk's pairs into the per-latent sums, scalars and top tokens."""
        n = self.n_latents
        multi = pairs.n_layers > 1
        self.n_tokens += token.size
        self.n_pairs += pairs.latent.size
        self.n_multi += int(multi.sum())
        self.var_sum += float(pairs.var.sum())
        self.mass_sum += float(pairs.mass.sum())
        self.mass_var_sum += float(pairs.mass @ pairs.var)
        self.pair_count += np.bincount(pairs.latent, minlength=n)
        self.pair_multi += np.bincount(pairs.latent[multi], minlength=n)
        self.pair_var += np.bincount(pairs.latent, weights=pairs.var, minlength=n)
        self.pair_mean += np.bincount(pairs.latent, weights=pairs.mean, minlength=n)
        self.pair_second += np.bincount(pairs.latent, weights=pairs.second, minlength=n)
        self._update_top(pairs, token)

    def _update_top(self, pairs: _Pairs, token: np.ndarray) -> None:
        """Merge the chunk's candidates into the running per-latent top list.

        Order: activation descending, then token ascending. Chunks arrive in token order, so a later
        token that only ties the current last entry never displaces it: the result does not depend
        on the chunking. Many candidates (the first chunk) are merged half by half, so that the
        first half raises the bar for the second and the sorts stay small.
        """
        if self.top_n == 0:
            return
        beats = pairs.peak_value > self.threshold[pairs.latent]
        n_candidates = int(np.count_nonzero(beats))
        if n_candidates == 0:
            return
        if n_candidates > max(_TOP_MERGE_ROWS, 2 * self.top.height):
            half = len(pairs) // 2
            self._update_top(pairs.slice(0, half), token)
            self._update_top(pairs.slice(half, len(pairs)), token)
            return
        candidates = pl.DataFrame(
            {
                "latent": pairs.latent[beats].astype(np.int32),
                "token": token[pairs.row[beats]],
                "value": pairs.peak_value[beats],
                "layer": pairs.peak_layer[beats].astype(np.int32),
            },
            schema=self.top.schema,
        )
        # Stable sort on (latent, activation descending): the old entries come first and all pairs
        # are in token order, so ties stay in token order. Float bits order like the floats.
        merged = pl.concat([self.top, candidates])
        latent = merged["latent"].to_numpy().astype(np.int64)
        inverted = np.int64(0x7FFFFFFF) - merged["value"].to_numpy().view(np.int32)
        merged = merged.with_columns(key=pl.Series(latent << 31 | inverted)).sort("key", maintain_order=True)
        latent = merged["latent"].to_numpy()
        first = np.empty(latent.size, dtype=bool)
        first[0] = True
        np.not_equal(latent[1:], latent[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        rank = np.arange(latent.size) - np.repeat(starts, np.diff(starts, append=latent.size))
        self.top = merged.filter(pl.Series(rank < self.top_n)).drop("key")
        last = rank == self.top_n - 1  # latents with a full list: raise their bar
        self.threshold[latent[last]] = merged["value"].to_numpy()[last]


def _token_latent_table(pairs: _Pairs, token: np.ndarray) -> pa.Table:
    """The chunk's rows of ``token_latent.parquet``."""
    columns = {
        "token": token[pairs.row],
        "latent": pairs.latent.astype(np.int32),
        "n_layers": pairs.n_layers.astype(np.int32),
        "mass": pairs.mass.astype(np.float32),
        "mean_layer": pairs.mean.astype(np.float32),
        "var_layer": pairs.var.astype(np.float32),
    }
    return pa.table(columns, schema=_TOKEN_LATENT_ARROW)


# --------------------------------------------------------------------------------------------
# Final tables and headline figures
# --------------------------------------------------------------------------------------------


def _mean_or_none(total: float, count: float) -> float | None:
    return float(total / count) if count > 0 else None


def _ratio_or_none(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    ratio = num / den
    return float(ratio) if math.isfinite(ratio) else None


def _nullable(x: np.ndarray, defined: np.ndarray) -> pl.Series:
    """``x`` as a Float64 series, null where not ``defined``."""
    return pl.Series(np.where(defined, x, np.nan), dtype=pl.Float64).fill_nan(None)


def _finish(
    acc: _Accumulator, blocks: list[int], min_count: int
) -> tuple[dict[str, pl.DataFrame], dict[str, Any]]:
    """Build the per-latent, per-layer and top-token tables and the headline metrics."""
    n_latents, n_layers = acc.n_latents, acc.n_layers
    ell = np.arange(n_layers, dtype=np.float64)
    mass = acc.layer_mass.sum(axis=1)
    active = acc.pair_count > 0
    safe_count = np.maximum(acc.pair_count, 1)
    dist = acc.layer_mass / np.where(active, mass, 1.0)[:, None]  # rows of 0 for never-active latents
    mean = dist @ ell
    var = ((ell[None, :] - mean[:, None]) ** 2 * dist).sum(axis=1)
    std = np.sqrt(var)
    plogp = dist * np.log(np.where(dist > 0, dist, 1.0))
    entropy = -plogp.sum(axis=1) / math.log(n_layers) if n_layers > 1 else np.zeros(n_latents)

    latents = pl.DataFrame(
        {
            "latent": np.arange(n_latents, dtype=np.int32),
            "count": acc.pair_count,
            "n_entries": acc.layer_count.sum(axis=1),
            "mass": mass,
            "mean_layer": _nullable(mean, active),
            "var_layer": _nullable(var, active),
            "std_layer": _nullable(std, active),
            "entropy": _nullable(entropy, active),
            "n_layers_5pct": (dist >= _LAYER_SHARE).sum(axis=1).astype(np.int32),
            "var_token_mean": _nullable(acc.pair_var / safe_count, active),
            "multi_layer_fraction": _nullable(acc.pair_multi / safe_count, active),
            "layer_dist": pl.Series(dist, dtype=pl.Array(pl.Float64, n_layers)).cast(pl.List(pl.Float64)),
        },
        schema=LATENTS_SCHEMA,
    ).with_columns(layer_dist=pl.when(pl.col("count") > 0).then(pl.col("layer_dist")))

    blocks_arr = np.asarray(blocks, dtype=np.int32)
    active_ids = np.flatnonzero(active)
    latent_layer = pl.DataFrame(
        {
            "latent": np.repeat(active_ids, n_layers).astype(np.int32),
            "layer": np.tile(np.arange(n_layers, dtype=np.int32), active_ids.size),
            "block": np.tile(blocks_arr, active_ids.size),
            "mass": acc.layer_mass[active_ids].reshape(-1),
            "count": acc.layer_count[active_ids].reshape(-1),
            "p": dist[active_ids].reshape(-1),
        },
        schema=LATENT_LAYER_SCHEMA,
    )

    layer_entries = acc.layer_count.sum(axis=0)
    layer_mass = acc.layer_mass.sum(axis=0)
    layers = pl.DataFrame(
        {
            "layer": np.arange(n_layers, dtype=np.int32),
            "block": blocks_arr,
            "n_entries": layer_entries,
            "n_latents_active": (acc.layer_count > 0).sum(axis=0),
            "mass": layer_mass,
            "mean_activation": _nullable(layer_mass / np.maximum(layer_entries, 1), layer_entries > 0),
        },
        schema=LAYERS_SCHEMA,
    )

    top = acc.top.with_columns(rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over("latent")).select(
        list(TOP_TOKENS_SCHEMA)
    )

    counted = acc.pair_count >= max(min_count, 1)
    n_counted = int(counted.sum())
    var_token = _mean_or_none(acc.var_sum, acc.n_pairs)
    var_aggregate = float(var[counted].mean()) if n_counted else None
    var_token_weighted = _mean_or_none(acc.mass_var_sum, acc.mass_sum)
    var_aggregate_weighted = _mean_or_none(float(mass[counted] @ var[counted]), float(mass[counted].sum()))
    # The paper's all-pairs formula (paper_variances_dense), T = the non-special tokens:
    # q_f(l) = sum_t p_tf(l) / T, so sum_l l q_f(l) = sum_t mu_tf / T and
    # sum_l l^2 q_f(l) = sum_t (sum_l l^2 p_tf(l)) / T.
    q_first = acc.pair_mean / acc.n_tokens
    q_second = acc.pair_second / acc.n_tokens
    metrics: dict[str, Any] = {
        "var_token": var_token,
        "var_aggregate": var_aggregate,
        "var_ratio": _ratio_or_none(var_aggregate, var_token),
        "multi_layer_fraction": _mean_or_none(acc.n_multi, acc.n_pairs),
        "mean_layer_std": float(std[counted].mean()) if n_counted else None,
        "var_token_weighted": var_token_weighted,
        "var_aggregate_weighted": var_aggregate_weighted,
        "var_ratio_weighted": _ratio_or_none(var_aggregate_weighted, var_token_weighted),
        "var_token_paper": acc.var_sum / (float(acc.n_tokens) * n_latents),
        "var_aggregate_paper": float((q_second - q_first * q_first).sum() / n_latents),
        "n_tokens": acc.n_tokens,
        "n_active_pairs": acc.n_pairs,
        "n_entries": int(acc.layer_count.sum()),
        "n_latents_active": int(active.sum()),
        "n_latents_counted": n_counted,
        "n_layers": n_layers,
    }
    tables = {
        LATENT_STATS.name: latents,
        LATENT_LAYER.name: latent_layer,
        LAYER_STATS.name: layers,
        TOP_TOKENS.name: top,
    }
    return tables, metrics


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int, or MlsaeError naming the param."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise MlsaeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` directory to ``target``, replacing any previous output."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(metrics: dict[str, Any], path: Path) -> None:
    """Write ``metrics`` to ``path`` atomically (temp file + rename), as strict JSON (no NaN)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _stream(store: _Store, chunk_tokens: int, acc: _Accumulator, out_dir: Path, progress: bool = False) -> _Accumulator:
    """Fold every chunk of ``store`` into ``acc``, writing ``token_latent.parquet`` to ``out_dir``."""
    value_dtype = np.float16 if store.values.dtype == np.float16 else np.float32
    grouper = _Grouper(_Packing(store.n_latents, store.n_layers, value_dtype))
    writer = pq.ParquetWriter(
        out_dir / TOKEN_STATS.name,
        _TOKEN_LATENT_ARROW,
        compression="lz4",
        use_dictionary=["latent", "n_layers"],
        write_statistics=["token", "latent"],
    )
    # One thread reads (and bins) the next chunk, one writes the previous chunk's rows, while this
    # one groups the current chunk; numpy, zarr's codecs and parquet mostly release the GIL.
    with writer, ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writing:
        written: Future[None] | None = None
        bar = tqdm(total=store.n_tokens, desc="aggregate", unit="tok", disable=not progress)
        for chunk in _iter_chunks(store, chunk_tokens, reader):
            bar.update(chunk.token.size)
            acc.add_cells(chunk)
            pairs = grouper.pairs(chunk)
            table = _token_latent_table(pairs, chunk.token)
            if written is not None:
                written.result()
            written = writing.submit(writer.write_table, table)
            acc.add_pairs(pairs, chunk.token)
        if written is not None:
            written.result()
        bar.close()
    if acc.n_tokens == 0:
        raise MlsaeError(f"{store.path}: every token is special; nothing to analyse")
    return acc


def aggregate(
    latents_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    metrics_path: str | os.PathLike[str],
    min_count: int = 10,
    top_tokens: int = 5,
    chunk_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Stream the latent store and write the analysis tables and headline metrics.

    Args:
        latents_path: the latent store (``data/latents.zarr``); it must carry ``complete: true``.
        out_dir: the analysis directory. Its parquet files (names from :mod:`mlsae.constants`,
            schemas in the ``*_SCHEMA`` dicts) are written to a temporary sibling directory that
            replaces ``out_dir`` when whole.
        metrics_path: JSON file for the headline metrics, written atomically after ``out_dir``.
        min_count: latents active at fewer tokens (and never-active ones) are left out of
            ``var_aggregate``, ``var_aggregate_weighted`` and ``mean_layer_std``.
        top_tokens: highest-activation tokens kept per latent (0: none).
        chunk_tokens: tokens read per step; default whole storage chunks, about 1M entries.
            The results do not depend on it (up to float rounding in the sums).

    Returns:
        The headline metrics (also written to ``metrics_path``): ``var_token`` (mean var_tf over
        active pairs), ``var_aggregate`` (mean var_f over counted latents), ``var_ratio``,
        ``multi_layer_fraction``, ``mean_layer_std``, the mass-weighted ``var_token_weighted``,
        ``var_aggregate_weighted`` and ``var_ratio_weighted``, the paper's ``var_token_paper`` and
        ``var_aggregate_paper`` (see :func:`paper_variances_dense`), and the counts ``n_tokens``,
        ``n_active_pairs``, ``n_entries``, ``n_latents_active``, ``n_latents_counted``,
        ``n_layers``. Undefined figures (an empty mean, a ratio over 0) are ``None``.

    Raises:
        MlsaeError: a missing, malformed or incomplete store, a store whose tokens are all special,
            or a bad argument.
    """
    min_count = _check_int("analysis.min_count", min_count, 0)
    top_tokens = _check_int("analysis.top_tokens", top_tokens, 0)
    if chunk_tokens is not None:
        chunk_tokens = _check_int("chunk_tokens", chunk_tokens, 1)
    store = _open_store(Path(latents_path))
    chunk_tokens = chunk_tokens or _default_chunk_tokens(store)

    out_dir = Path(out_dir)
    made = [p for p in (out_dir.parent, *out_dir.parent.parents) if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        acc = _stream(store, chunk_tokens, _Accumulator(store.n_latents, store.n_layers, top_tokens), tmp, progress)
        tables, metrics = _finish(acc, store.blocks, min_count)
        for name, table in tables.items():
            table.write_parquet(tmp / name)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in made:  # innermost first: leave no directory this call created
            if path.exists() and not any(path.iterdir()):
                path.rmdir()
        raise
    _write_json(metrics, Path(metrics_path))
    return metrics
