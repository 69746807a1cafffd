"""The aggregate stage's streaming kernels: read latent-store chunks, group their entries by
(token, latent), and fold them into running per-latent sums and top tokens.

`aggregate.py` drives them (the module docstring there says how it streams and why); they live
apart so the entry point and the statistics' definitions read in one sitting.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from mlsae.constants import INDICES, VALUES
from mlsae.errors import MlsaeError
from mlsae.latents import LatentStore
from mlsae.layer_stats import LayerStats

# Entries (tokens x layers x k) read per chunk by default: large enough to amortise the per-chunk
# work on the n_latents x L tables, small enough to keep the working set to tens of MiB.
_TARGET_CHUNK_ENTRIES = 1 << 20
# Entries grouped per tile of rows (one row-sort each): small enough for the temporaries to stay in cache.
_TARGET_TILE_ENTRIES = 1 << 15
# Candidate rows above which the running top-token merge is split in two.
_TOP_MERGE_ROWS = 1 << 15

# The analysis tables' columns (data/analysis/*.parquet), re-exported by mlsae.aggregate.
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
    "layer_dist": pl.List(pl.Float64()),
}
"""Then the per-latent decomposition columns of mlsae.layer_stats.LATENT_COLUMNS (null for latents
never active): var_within, var_between, var_total, within_share, their _mass versions,
effective_layers, multi_layer_fraction."""
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


def _default_chunk_tokens(store: LatentStore) -> int:
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


def _read_chunk(store: LatentStore, start: int, stop: int) -> _Chunk:
    """Read tokens ``start:stop``, drop special tokens, check values and latent ids, and sum the
    chunk's (latent, layer) cells (this runs in the reader thread, alongside the grouping)."""
    keep = store.kept(start, stop)
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


def _iter_chunks(store: LatentStore, chunk_tokens: int, pool: ThreadPoolExecutor) -> Iterator[_Chunk]:
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
    entropy: np.ndarray  # float64 H_tf = -sum_l p ln p (nats)
    share2: np.ndarray  # float64 second-largest p_tf(l) (0 for a pair active at one layer)

    @classmethod
    def empty(cls, capacity: int) -> _Pairs:
        """Uninitialised columns for up to ``capacity`` pairs."""
        i64, f64 = np.int64, np.float64
        dtypes = (i64, i64, i64, f64, f64, f64, f64, np.float32, i64, f64, f64)
        return cls(*(np.empty(capacity, dtype) for dtype in dtypes))

    def __len__(self) -> int:
        return self.row.size

    def slice(self, start: int, stop: int) -> _Pairs:
        """Views of pairs ``start:stop``."""
        return _Pairs(*(column[start:stop] for column in vars(self).values()))


def _tile_pairs(
    indices: np.ndarray, values: np.ndarray, inactive: np.ndarray, pack: _Packing, out: _Pairs, pos: int
) -> int:
    """Group one tile of ``(b, L, k)`` entries by (token, latent) with per-token sorts.

    Writes the tile's active pairs, ordered by row then latent, to ``out`` from ``pos`` on (rows
    relative to the tile) and returns the position after them.
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
    a_log_a = np.bincount(run, weights=a * np.log(np.where(a > 0, a, 1.0)))[1:]
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
    # H = ln m - (sum_l a ln a) / m; one active layer gives exactly 0
    entropy = out.entropy[pos:end]
    np.subtract(np.log(mass), a_log_a[real] / mass, out=entropy)
    np.maximum(entropy, 0.0, out=entropy)
    entropy[size == 1] = 0.0
    # the run is sorted by activation: its second-to-last key holds the second-largest one
    runner_up = key[first_entry + np.maximum(size - 2, 0)]
    share2 = out.share2[pos:end]
    np.divide(pack.value(runner_up), mass, out=share2)
    share2[size == 1] = 0.0
    return end


class _Grouper:
    """Groups each chunk's active entries by (token, latent), in cache-sized tiles of tokens.

    The pair columns live in one buffer reused across chunks (which spares the page faults of fresh
    arrays), so the result of :meth:`pairs` is valid until the next call.
    """

    def __init__(self, pack: _Packing) -> None:
        self.pack = pack
        self.buffer = _Pairs.empty(0)

    def pairs(self, chunk: _Chunk) -> _Pairs:
        n_tokens, n_layers, k = chunk.indices.shape
        tile = max(1, _TARGET_TILE_ENTRIES // (n_layers * k))
        capacity = chunk.n_active  # a pair holds >= 1 active entry
        if self.buffer.row.size < capacity:
            self.buffer = _Pairs.empty(capacity)
        out, pos = self.buffer, 0
        for start in range(0, n_tokens, tile):
            stop = start + tile
            tile_entries = (chunk.indices[start:stop], chunk.values[start:stop], chunk.inactive[start:stop])
            end = _tile_pairs(*tile_entries, self.pack, out, pos)
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
    stats: LayerStats | None = None
    """The variance decomposition and its bootstrap (mlsae.layer_stats), fed every chunk's pairs."""
    context_index: np.ndarray | None = None
    """(T,) eval context index 0..C-1 of every token of the store."""
    n_tokens: int = 0
    n_pairs: int = 0

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
        if self.stats is not None and self.context_index is not None:
            self.stats.add_tokens(self.context_index[token])
            self.stats.add(pairs.latent, self.context_index[token[pairs.row]], pairs.mass, pairs.mean,
                           pairs.second, pairs.entropy, pairs.share2)
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
