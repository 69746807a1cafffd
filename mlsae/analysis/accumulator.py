"""The aggregate stage's streaming state: chunks of the latent store with their (latent, layer) cell
sums, their entries grouped by (token, latent) into pairs, and the running per-latent sums and top
tokens those pairs fold into.

`aggregate.py` drives them (its docstring says how it streams and why); they live apart so the
entry point and the statistics' definitions read in one sitting.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from mlsae.analysis.decomposition import LayerStats
from mlsae.analysis.kernels import group_pairs, update_top
from mlsae.analysis.schemas import TOKEN_LATENT_ARROW, TOP_TOKENS_SCHEMA
from mlsae.stores.latents import LatentStore

# Entries (tokens x layers x k) read per chunk by default: large enough to amortise the per-chunk
# work on the n_latents x L tables, small enough to keep the working set to tens of MiB.
_TARGET_CHUNK_ENTRIES = 1 << 20


@dataclass
class Chunk:
    """The analysed tokens of one chunk of the store (`LatentStore.read`), with its cell sums."""

    token: np.ndarray  # (c,) int64 global eval index of each token kept
    indices: np.ndarray  # (c, L, k) latent ids
    values: np.ndarray  # (c, L, k) float32 activations (float16 stores convert exactly)
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


def read_chunk(store: LatentStore, start: int, stop: int) -> Chunk:
    """Read tokens ``start:stop`` (the analysed ones, checked: `LatentStore.read`) and sum the
    chunk's (latent, layer) cells (this runs in the reader thread, alongside the grouping)."""
    chunk = store.read(start, stop)
    inactive = chunk.values == 0  # (no NaN or negative values by now)
    n_active = inactive.size - int(np.count_nonzero(inactive))
    cells = _cell_sums(chunk.indices, chunk.values, inactive, store.n_latents)
    return Chunk(chunk.token, chunk.indices, chunk.values, n_active, *cells)


def iter_chunks(store: LatentStore, chunk_tokens: int, pool: ThreadPoolExecutor) -> Iterator[Chunk]:
    """Yield the store's chunks in token order, reading the next one in ``pool`` meanwhile."""
    n_tokens = store.n_tokens

    def read(start: int) -> Future[Chunk]:
        return pool.submit(read_chunk, store, start, min(start + chunk_tokens, n_tokens))

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


@dataclass
class Pairs:
    """Per active ``(token, latent)`` pair of one chunk, ordered by token (then by first appearance,
    see :func:`mlsae.analysis.kernels.group_pairs`)."""

    token: np.ndarray  # int64 global eval index
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
    def empty(cls, capacity: int) -> Pairs:
        """Uninitialised columns for up to ``capacity`` pairs."""
        i64, f64 = np.int64, np.float64
        dtypes = (i64, i64, i64, f64, f64, f64, f64, np.float32, i64, f64, f64)
        return cls(*(np.empty(capacity, dtype) for dtype in dtypes))

    def __len__(self) -> int:
        return self.token.size

    def slice(self, start: int, stop: int) -> Pairs:
        """Views of pairs ``start:stop``."""
        return Pairs(*(column[start:stop] for column in vars(self).values()))


class Grouper:
    """Groups each chunk's active entries by (token, latent) (:func:`mlsae.analysis.kernels.group_pairs`).

    Each call returns fresh pair columns, so a chunk's pairs can still be written out by another
    thread while the next chunk is grouped.
    """

    def __init__(self, n_latents: int) -> None:
        self.seen = np.zeros(n_latents, dtype=np.bool_)
        self.slot = np.empty(n_latents, dtype=np.int64)

    def pairs(self, chunk: Chunk) -> Pairs:
        out = Pairs.empty(chunk.n_active)  # a pair holds >= 1 active entry
        if chunk.token.size == 0:
            return out
        n = group_pairs(chunk.indices, chunk.values, chunk.token, self.seen, self.slot, *vars(out).values())
        return out.slice(0, n)


# --------------------------------------------------------------------------------------------
# Streaming accumulation
# --------------------------------------------------------------------------------------------


@dataclass
class Accumulator:
    """Running sums over chunks: ``n_latents x L`` and per-latent tables, scalars, top tokens."""

    n_latents: int
    n_layers: int
    top_n: int
    layer_count: np.ndarray = field(init=False)  # (F, L) active entries
    layer_mass: np.ndarray = field(init=False)  # (F, L) sum of activations
    pair_count: np.ndarray = field(init=False)  # (F,) active tokens
    top_value: np.ndarray = field(init=False)  # (F, top_n) float32 top activations (mlsae.analysis.kernels.update_top)
    top_token: np.ndarray = field(init=False)  # (F, top_n) int64 their tokens
    top_layer: np.ndarray = field(init=False)  # (F, top_n) int64 their peak layers
    top_len: np.ndarray = field(init=False)  # (F,) entries held per latent
    stats: LayerStats | None = None
    """The variance decomposition and its bootstrap (mlsae.analysis.decomposition), fed every chunk's pairs."""
    unit_index: np.ndarray | None = None
    """(T,) resampling unit 0..U-1 (the eval document) of every token of the store."""
    n_tokens: int = 0
    n_pairs: int = 0

    def __post_init__(self) -> None:
        n_latents, n_layers = self.n_latents, self.n_layers
        self.layer_count = np.zeros((n_latents, n_layers), np.int64)
        self.layer_mass = np.zeros((n_latents, n_layers), np.float64)
        self.pair_count = np.zeros(n_latents, np.int64)
        self.top_value = np.zeros((n_latents, self.top_n), np.float32)
        self.top_token = np.zeros((n_latents, self.top_n), np.int64)
        self.top_layer = np.zeros((n_latents, self.top_n), np.int64)
        self.top_len = np.zeros(n_latents, np.int64)

    def add_cells(self, chunk: Chunk) -> None:
        """Fold the chunk's ``(latent, layer)`` sums into the running tables."""
        self.layer_count += chunk.cell_count
        self.layer_mass += chunk.cell_mass

    def add_pairs(self, pairs: Pairs, token: np.ndarray) -> None:
        """Fold one chunk's pairs into the per-latent sums, scalars and top tokens."""
        self.n_tokens += token.size
        self.n_pairs += pairs.latent.size
        if self.stats is not None and self.unit_index is not None:
            self.stats.add_tokens(self.unit_index[token])
            self.stats.add(
                pairs.latent,
                self.unit_index[pairs.token],
                pairs.mass,
                pairs.mean,
                pairs.second,
                pairs.entropy,
                pairs.share2,
                pairs.peak_value,
            )
        self.pair_count += np.bincount(pairs.latent, minlength=self.n_latents)
        if self.top_n:
            update_top(
                pairs.latent,
                pairs.token,
                pairs.peak_value,
                pairs.peak_layer,
                self.top_value,
                self.top_token,
                self.top_layer,
                self.top_len,
            )

    @property
    def top(self) -> pl.DataFrame:
        """The top tokens so far: ``latent, token, value, layer``, by latent, then rank."""
        rank = np.arange(self.top_n)[None, :] < self.top_len[:, None]
        latent = np.broadcast_to(np.arange(self.n_latents, dtype=np.int32)[:, None], rank.shape)
        return pl.DataFrame(
            {
                "latent": latent[rank],
                "token": self.top_token[rank],
                "value": self.top_value[rank],
                "layer": self.top_layer[rank].astype(np.int32),
            },
            schema={name: dtype for name, dtype in TOP_TOKENS_SCHEMA.items() if name != "rank"},
        )


def token_latent_table(pairs: Pairs) -> pa.Table:
    """The chunk's rows of ``token_latent.parquet``."""
    columns = {
        "token": pairs.token,
        "latent": pairs.latent.astype(np.int32),
        "n_layers": pairs.n_layers.astype(np.int32),
        "mass": pairs.mass.astype(np.float32),
        "mean_layer": pairs.mean.astype(np.float32),
        "var_layer": pairs.var.astype(np.float32),
    }
    return pa.table(columns, schema=TOKEN_LATENT_ARROW)
