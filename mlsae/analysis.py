"""Streaming analysis of the latent store: each latent's distribution over layers.

Notation (DESIGN.md, "Analysis"): ``a[t, l, f] >= 0`` is latent ``f``'s activation at eval token
``t`` and layer *position* ``l = 0 .. L-1`` (the position in the store's ``layers`` attr, not the
block index). An entry of the top-k lists with value 0 is not active. Special tokens are excluded
from every statistic.

* Per-token distribution, for every *active pair* ``(t, f)`` (``f`` active at >= 1 layer of ``t``):
  ``p_tf(l) = a[t,l,f] / sum_l a[t,l,f]``, mean ``mu_tf = sum_l l p_tf(l)`` and variance
  ``var_tf = sum_l l^2 p_tf(l) - mu_tf^2``.
* Aggregate distribution of latent ``f``: ``P_f(l) = sum_t a[t,l,f] / sum_{t,l} a[t,l,f]``, with
  mean ``mu_f`` and variance ``var_f``.

:func:`aggregate` streams over token chunks of the sparse store. For each chunk it builds a Polars
frame of the active ``(t, l, f, a)`` entries and runs two hash group-bys on integer keys: one on
``(t, f)`` (the per-token statistics, written straight to ``token_latent.parquet`` and folded into
per-latent sums) and one on ``(f, l)`` (folded into an ``n_latents x L`` table). Nothing of size
``tokens x layers x latents`` is ever built, and no per-token table outlives its chunk, so memory is
bounded by the chunk size and ``n_latents x L``, whatever the number of tokens.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import zarr

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

__all__ = ["aggregate", "paper_variances_dense"]

# A chunk of about this many sparse entries (tokens x layers x k) amortises the per-chunk overhead
# of the Polars queries while keeping the working set to a few tens of MiB.
_TARGET_CHUNK_ROWS = 1 << 21

# Share of a latent's mass that makes a layer count in ``n_layers_5pct``.
_LAYER_SHARE = 0.05

# The per-pair maximum is taken on one int64 that packs the activation's float32 bits (exact for
# non-negative floats: their bit patterns order like the values) above ``_LAYER_CODE - l``, so that
# a single ``max`` yields both the largest activation and, among ties, the lowest layer.
_LAYER_BITS = 16
_LAYER_CODE = (1 << _LAYER_BITS) - 1

TOKEN_LATENT_SCHEMA: dict[str, pl.DataType] = {
    "token": pl.Int64(),
    "latent": pl.Int32(),
    "n_layers": pl.Int32(),
    "mass": pl.Float32(),
    "mean_layer": pl.Float32(),
    "var_layer": pl.Float32(),
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
    """The seed paper's all-pairs layer variances on a dense ``(T, L, F)`` activation array.

    Re-implements the definition in tim-lawson/mlsae ``mlsae/analysis/variances.py``
    (``Metric.update``) for one batch holding all ``T`` tokens:

    * ``p[t, :, f] = a[t, :, f] / sum_l a[t, l, f]``, and ``p[t, :, f] = 0`` where the latent is
      inactive at every layer (the original turns the 0/0 NaNs into zeros);
    * ``v(x) = sum_l l^2 x(l) - (sum_l l x(l))^2`` for a vector ``x`` over layers, *not* normalised;
    * ``var_token_paper = mean over all T*F pairs (t, f) of v(p[t, :, f])``: inactive pairs count as
      variance 0 (the original's ``exp_var_l_tf``);
    * ``var_aggregate_paper = mean over all F latents of v(q_f)`` with
      ``q_f(l) = mean over all T tokens of p[t, l, f]`` (the original's ``exp_var_l_f``). ``q_f``
      sums to the fraction of tokens at which ``f`` is active, not to 1, so this is not the variance
      of a distribution; never-active latents count as 0.

    Unlike :func:`aggregate`'s ``var_token`` / ``var_aggregate`` these weight every token equally
    (not by activation mass), dilute both figures by inactive pairs and latents, and apply no
    ``min_count`` filter. The original also averaged these per-batch figures over batches of
    ``batch_size * max_length`` tokens; here (and in the streaming version) the whole input is one
    batch, which differs for ``var_aggregate_paper`` because ``v`` is not linear in ``q_f``.

    Args:
        a: non-negative activations, shape ``(T, L, F)``, ``T >= 1``.

    Returns:
        ``{"var_token_paper": ..., "var_aggregate_paper": ...}``.
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 3 or a.shape[0] == 0:
        raise MlsaeError(f"paper_variances_dense: expected a (T, L, F) array with T >= 1, got {a.shape}")
    ell = np.arange(a.shape[1], dtype=np.float64)[None, :, None]
    total = a.sum(axis=1, keepdims=True)
    p = np.divide(a, total, out=np.zeros_like(a), where=total > 0)

    def v(x: np.ndarray) -> np.ndarray:
        """Unnormalised second moment minus squared first moment over axis 1 (layers)."""
        return (ell**2 * x).sum(axis=1) - ((ell * x).sum(axis=1)) ** 2

    q = p.mean(axis=0, keepdims=True)
    return {
        "var_token_paper": float(v(p).mean()),
        "var_aggregate_paper": float(v(q).mean()),
    }


# --------------------------------------------------------------------------------------------
# The latent store
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Store:
    """A validated, complete latent store."""

    path: Path
    indices: Any  # zarr array (T, L, k) int
    values: Any  # zarr array (T, L, k) float
    special: Any  # zarr array (T,) bool
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
        raise MlsaeError(f"{path}: not a readable Zarr group ({exc})") from exc
    attrs = dict(group.attrs)
    if attrs.get("complete") is not True:
        raise MlsaeError(f"{path}: incomplete latent store (attr complete is not true); rerun the dump stage")
    arrays = {}
    for name in (INDICES, VALUES, SPECIAL):
        try:
            arrays[name] = group[name]
        except KeyError:
            raise MlsaeError(f"{path}: latent store has no '{name}' array") from None
    indices, values, special = arrays[INDICES], arrays[VALUES], arrays[SPECIAL]
    if indices.ndim != 3 or values.shape != indices.shape:
        raise MlsaeError(
            f"{path}: '{INDICES}' {indices.shape} and '{VALUES}' {values.shape} must share one (tokens, layers, k) shape"
        )
    if special.shape != indices.shape[:1]:
        raise MlsaeError(f"{path}: '{SPECIAL}' has shape {special.shape}, expected ({indices.shape[0]},)")
    if not np.issubdtype(indices.dtype, np.integer):
        raise MlsaeError(f"{path}: '{INDICES}' must be integer, got {indices.dtype}")
    if not np.issubdtype(values.dtype, np.floating):
        raise MlsaeError(f"{path}: '{VALUES}' must be floating point, got {values.dtype}")
    blocks = attrs.get("layers")
    if not isinstance(blocks, list) or not all(isinstance(b, int) for b in blocks) or len(blocks) != indices.shape[1]:
        raise MlsaeError(
            f"{path}: attr 'layers' must list the {indices.shape[1]} selected block indices, got {blocks!r}"
        )
    n_latents = attrs.get("n_latents")
    if not isinstance(n_latents, int) or n_latents < 1:
        raise MlsaeError(f"{path}: attr 'n_latents' must be a positive integer, got {n_latents!r}")
    k = attrs.get("k")
    if k != indices.shape[2]:
        raise MlsaeError(f"{path}: attr 'k' is {k!r} but the arrays hold {indices.shape[2]} latents per layer")
    if indices.shape[1] > _LAYER_CODE:
        raise MlsaeError(f"{path}: {indices.shape[1]} layers; at most {_LAYER_CODE} are supported")
    if indices.shape[0] == 0:
        raise MlsaeError(f"{path}: latent store holds no tokens")
    return _Store(path, indices, values, special, list(blocks), n_latents, int(k))


def _default_chunk_tokens(store: _Store) -> int:
    """Whole storage shards (or chunks) along tokens, enough for about ``_TARGET_CHUNK_ROWS`` entries."""
    shards = getattr(store.indices, "shards", None)
    unit = int((shards or store.indices.chunks)[0])
    per_token = max(1, store.n_layers * store.k)
    return unit * max(1, _TARGET_CHUNK_ROWS // (unit * per_token))


@dataclass
class _Chunk:
    """One chunk of non-special tokens: flat sparse entries and their global token indices."""

    token_index: np.ndarray  # (c,) int64 global eval index of each kept token
    latent: np.ndarray  # (c * L * k,) int32
    value: np.ndarray  # (c * L * k,) float32, 0 = inactive


def _iter_chunks(store: _Store, chunk_tokens: int) -> Iterator[_Chunk]:
    """Read the store chunk by chunk, dropping special tokens and checking values and ids."""
    for start in range(0, store.n_tokens, chunk_tokens):
        stop = min(start + chunk_tokens, store.n_tokens)
        keep = ~np.asarray(store.special[start:stop], dtype=bool)
        indices = np.asarray(store.indices[start:stop])
        values = np.asarray(store.values[start:stop])
        token_index = np.arange(start, stop, dtype=np.int64)
        if not keep.all():
            indices, values, token_index = indices[keep], values[keep], token_index[keep]
        if token_index.size == 0:
            continue
        latent = indices.reshape(-1).astype(np.int32, copy=False)
        value = values.reshape(-1).astype(np.float32, copy=False)
        if not (value >= 0).all():  # also catches NaN
            raise MlsaeError(f"{store.path}: '{VALUES}' has negative or NaN entries in tokens {start}..{stop - 1}")
        lo, hi = int(latent.min()), int(latent.max())
        if lo < 0 or hi >= store.n_latents:
            raise MlsaeError(
                f"{store.path}: '{INDICES}' holds latent id {lo if lo < 0 else hi} outside 0..{store.n_latents - 1}"
            )
        yield _Chunk(token_index, latent, value)


# --------------------------------------------------------------------------------------------
# Streaming accumulation
# --------------------------------------------------------------------------------------------


@dataclass
class _Accumulator:
    """Running sums over chunks: ``n_latents x L`` and per-latent tables plus global scalars."""

    n_latents: int
    n_layers: int
    k: int
    top_n: int
    layer_count: np.ndarray = field(init=False)  # (F, L) active entries
    layer_mass: np.ndarray = field(init=False)  # (F, L) sum of activations
    pair_count: np.ndarray = field(init=False)  # (F,) active tokens
    pair_multi: np.ndarray = field(init=False)  # (F,) active tokens with > 1 layer
    pair_var: np.ndarray = field(init=False)  # (F,) sum of var_tf
    pair_mean: np.ndarray = field(init=False)  # (F,) sum of mu_tf (paper formula)
    pair_second: np.ndarray = field(init=False)  # (F,) sum of sum_l l^2 p_tf(l) (paper formula)
    threshold: np.ndarray = field(init=False)  # (F,) value a token must beat to enter the top list
    top: pl.DataFrame = field(init=False)
    n_tokens: int = 0
    n_pairs: int = 0
    n_multi: int = 0
    var_sum: float = 0.0
    mass_sum: float = 0.0
    mass_var_sum: float = 0.0

    def __post_init__(self) -> None:
        f, n_layers = self.n_latents, self.n_layers
        self.layer_count = np.zeros((f, n_layers), np.int64)
        self.layer_mass = np.zeros((f, n_layers), np.float64)
        self.pair_count = np.zeros(f, np.int64)
        self.pair_multi = np.zeros(f, np.int64)
        self.pair_var = np.zeros(f, np.float64)
        self.pair_mean = np.zeros(f, np.float64)
        self.pair_second = np.zeros(f, np.float64)
        self.threshold = np.full(f, -np.inf, np.float32)
        self.top = pl.DataFrame(schema={k: v for k, v in TOP_TOKENS_SCHEMA.items() if k != "rank"})

    def add(self, chunk: _Chunk, writer: pq.ParquetWriter) -> None:
        """Fold one chunk into the sums and append its per-pair rows to ``writer``."""
        n_layers, k, f_total = self.n_layers, self.k, self.n_latents
        entries = (
            pl.DataFrame(
                {"f": chunk.latent, "a": chunk.value, "bits": chunk.value.view(np.int32)},
            )
            .lazy()
            .with_row_index("r")
            .filter(pl.col("a") > 0)
            .with_columns(
                t=(pl.col("r") // (n_layers * k)).cast(pl.Int64),
                l=((pl.col("r") // k) % n_layers).cast(pl.Int64),
                a=pl.col("a").cast(pl.Float64),
            )
        )
        a, ell = pl.col("a"), pl.col("l")
        pairs_q = entries.group_by(key=pl.col("t") * f_total + pl.col("f")).agg(
            n_layers=pl.len(),
            mass=a.sum(),
            s1=(a * ell).sum(),
            s2=(a * ell * ell).sum(),
            peak=(pl.col("bits").cast(pl.Int64) * (1 << _LAYER_BITS) + (_LAYER_CODE - ell)).max(),
        )
        cells_q = entries.group_by(cell=pl.col("f") * n_layers + pl.col("l")).agg(
            count=pl.len(),
            mass=a.sum(),
        )
        pairs, cells = pl.collect_all([pairs_q, cells_q])

        cell = cells["cell"].to_numpy()
        self.layer_count.reshape(-1)[cell] += cells["count"].to_numpy()
        self.layer_mass.reshape(-1)[cell] += cells["mass"].to_numpy()

        key = pairs["key"].to_numpy()
        latent = key % f_total
        token = chunk.token_index[key // f_total]
        n = pairs["n_layers"].to_numpy().astype(np.int32)
        mass = pairs["mass"].to_numpy()
        mean = pairs["s1"].to_numpy() / mass
        second = pairs["s2"].to_numpy() / mass
        var = np.where(n > 1, np.maximum(second - mean * mean, 0.0), 0.0)

        self.n_tokens += chunk.token_index.size
        self.n_pairs += key.size
        self.n_multi += int((n > 1).sum())
        self.var_sum += float(var.sum())
        self.mass_sum += float(mass.sum())
        self.mass_var_sum += float((mass * var).sum())
        self.pair_count += np.bincount(latent, minlength=f_total)
        self.pair_multi += np.bincount(latent, weights=n > 1, minlength=f_total).astype(np.int64)
        self.pair_var += np.bincount(latent, weights=var, minlength=f_total)
        self.pair_mean += np.bincount(latent, weights=mean, minlength=f_total)
        self.pair_second += np.bincount(latent, weights=second, minlength=f_total)

        writer.write_table(
            pl.DataFrame(
                {
                    "token": token,
                    "latent": latent.astype(np.int32),
                    "n_layers": n,
                    "mass": mass.astype(np.float32),
                    "mean_layer": mean.astype(np.float32),
                    "var_layer": var.astype(np.float32),
                },
                schema=TOKEN_LATENT_SCHEMA,
            ).to_arrow()
        )

        peak = pairs["peak"].to_numpy()
        value = (peak >> _LAYER_BITS).astype(np.int32).view(np.float32)
        self._update_top(latent, token, value, _LAYER_CODE - (peak & _LAYER_CODE))

    def _update_top(self, latent: np.ndarray, token: np.ndarray, value: np.ndarray, layer: np.ndarray) -> None:
        """Merge this chunk's candidates into the running per-latent top list.

        Order: value descending, then token ascending. Chunks arrive in token order, so a later
        token that only ties the current last entry never displaces it, which keeps the result
        independent of the chunking.
        """
        if self.top_n == 0:
            return
        beats = value > self.threshold[latent]
        if not beats.any():
            return
        candidates = pl.DataFrame(
            {
                "latent": latent[beats].astype(np.int32),
                "token": token[beats],
                "value": value[beats],
                "layer": layer[beats].astype(np.int32),
            },
            schema=self.top.schema,
        )
        self.top = (
            pl.concat([self.top, candidates])
            .sort(["latent", "value", "token"], descending=[False, True, False])
            .group_by("latent", maintain_order=True)
            .head(self.top_n)
        )
        full = self.top.group_by("latent").agg(n=pl.len(), low=pl.col("value").min()).filter(pl.col("n") == self.top_n)
        self.threshold[full["latent"].to_numpy()] = full["low"].to_numpy()


# --------------------------------------------------------------------------------------------
# Final tables and headline figures
# --------------------------------------------------------------------------------------------


def _mean_or_none(total: float, count: float) -> float | None:
    return total / count if count > 0 else None


def _ratio_or_none(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    ratio = num / den
    return ratio if math.isfinite(ratio) else None


def _finish(acc: _Accumulator, blocks: list[int], min_count: int) -> tuple[dict[str, pl.DataFrame], dict[str, Any]]:
    """Build the per-latent, per-layer and top-token tables and the headline metrics."""
    n_latents, n_layers = acc.n_latents, acc.n_layers
    ell = np.arange(n_layers, dtype=np.float64)
    mass = acc.layer_mass.sum(axis=1)
    active = acc.pair_count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        dist = acc.layer_mass / mass[:, None]  # NaN rows for never-active latents
        mean = dist @ ell
        var = np.maximum(((ell[None, :] - mean[:, None]) ** 2 * dist).sum(axis=1), 0.0)
        plogp = np.where(dist > 0, dist * np.log(np.where(dist > 0, dist, 1.0)), 0.0)
        entropy = -plogp.sum(axis=1) / math.log(n_layers) if n_layers > 1 else np.zeros(n_latents)
        var_token_mean = acc.pair_var / acc.pair_count
        multi_fraction = acc.pair_multi / acc.pair_count
    std = np.sqrt(var)
    latent_ids = np.arange(n_latents, dtype=np.int32)

    def masked(x: np.ndarray) -> pl.Series:
        return pl.Series(np.where(active, x, np.nan)).fill_nan(None)

    latents = pl.DataFrame(
        {
            "latent": latent_ids,
            "count": acc.pair_count,
            "n_entries": acc.layer_count.sum(axis=1),
            "mass": mass,
            "mean_layer": masked(mean),
            "var_layer": masked(var),
            "std_layer": masked(std),
            "entropy": masked(entropy),
            "n_layers_5pct": (np.nan_to_num(dist) >= _LAYER_SHARE).sum(axis=1).astype(np.int32),
            "var_token_mean": masked(var_token_mean),
            "multi_layer_fraction": masked(multi_fraction),
            "layer_dist": pl.Series(np.nan_to_num(dist), dtype=pl.Array(pl.Float64, n_layers)).cast(pl.List(pl.Float64)),
        }
    ).with_columns(
        layer_dist=pl.when(pl.col("count") > 0).then(pl.col("layer_dist"))
    )

    blocks_arr = np.asarray(blocks, dtype=np.int32)
    active_ids = np.flatnonzero(active)
    latent_layer = pl.DataFrame(
        {
            "latent": np.repeat(active_ids.astype(np.int32), n_layers),
            "layer": np.tile(np.arange(n_layers, dtype=np.int32), active_ids.size),
            "block": np.tile(blocks_arr, active_ids.size),
            "mass": acc.layer_mass[active_ids].reshape(-1),
            "count": acc.layer_count[active_ids].reshape(-1),
            "p": dist[active_ids].reshape(-1),
        }
    )

    layer_entries = acc.layer_count.sum(axis=0)
    layer_mass = acc.layer_mass.sum(axis=0)
    layers = pl.DataFrame(
        {
            "layer": np.arange(n_layers, dtype=np.int32),
            "block": blocks_arr,
            "n_entries": layer_entries,
            "n_latents_active": (acc.layer_count > 0).sum(axis=0).astype(np.int64),
            "mass": layer_mass,
            "mean_activation": pl.Series(
                np.divide(layer_mass, layer_entries, out=np.full(n_layers, np.nan), where=layer_entries > 0)
            ).fill_nan(None),
        }
    )

    top = acc.top.with_columns(rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over("latent")).select(
        list(TOP_TOKENS_SCHEMA)
    )

    counted = acc.pair_count >= min_count
    n_counted = int(counted.sum())
    var_token = _mean_or_none(acc.var_sum, acc.n_pairs)
    var_aggregate = float(var[counted].mean()) if n_counted else None
    var_token_weighted = _mean_or_none(acc.mass_var_sum, acc.mass_sum)
    counted_mass = float(mass[counted].sum())
    var_aggregate_weighted = (
        float((mass[counted] * var[counted]).sum() / counted_mass) if n_counted and counted_mass > 0 else None
    )
    # The paper's all-pairs formula (see paper_variances_dense): T counts the non-special tokens.
    n_pairs_all = float(acc.n_tokens) * n_latents
    q_mean = acc.pair_mean / acc.n_tokens
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
        "var_token_paper": acc.var_sum / n_pairs_all,
        "var_aggregate_paper": float((q_second - q_mean * q_mean).sum() / n_latents),
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
    """Write ``metrics`` to ``path`` atomically (temp file + rename), strict JSON (no NaN)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def aggregate(
    latents_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    metrics_path: str | os.PathLike[str],
    min_count: int = 10,
    top_tokens: int = 5,
    chunk_tokens: int | None = None,
) -> dict[str, Any]:
    """Stream the latent store and write the analysis tables and headline metrics.

    Args:
        latents_path: the latent store (``data/latents.zarr``), which must carry ``complete: true``.
        out_dir: the analysis directory; its parquet files (names from :mod:`mlsae.constants`) are
            written to a temporary sibling directory that replaces ``out_dir`` when whole.
        metrics_path: JSON file for the headline metrics, written atomically.
        min_count: latents active at fewer tokens are left out of ``var_aggregate`` and friends.
        top_tokens: highest-activation tokens kept per latent.
        chunk_tokens: tokens read per step; default whole storage shards, about 2M entries.

    Returns:
        The headline metrics (also written to ``metrics_path``): ``var_token``, ``var_aggregate``,
        ``var_ratio``, ``multi_layer_fraction``, ``mean_layer_std``, the mass-weighted
        ``var_token_weighted``, ``var_aggregate_weighted``, ``var_ratio_weighted``, the paper's
        ``var_token_paper``, ``var_aggregate_paper`` (:func:`paper_variances_dense`), and the counts
        ``n_tokens``, ``n_active_pairs``, ``n_entries``, ``n_latents_active``,
        ``n_latents_counted``, ``n_layers``. Undefined figures (an empty mean, a ratio over 0)
        are ``None``.

    Raises:
        MlsaeError: a missing, malformed or incomplete store, or a bad argument.
    """
    min_count = _check_int("analysis.min_count", min_count, 0)
    top_tokens = _check_int("analysis.top_tokens", top_tokens, 0)
    if chunk_tokens is not None:
        chunk_tokens = _check_int("chunk_tokens", chunk_tokens, 1)
    store = _open_store(Path(latents_path))
    chunk_tokens = chunk_tokens or _default_chunk_tokens(store)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        acc = _Accumulator(store.n_latents, store.n_layers, store.k, top_tokens)
        arrow_schema = pl.DataFrame(schema=TOKEN_LATENT_SCHEMA).to_arrow().schema
        with pq.ParquetWriter(tmp / TOKEN_STATS.name, arrow_schema, compression="zstd") as writer:
            for chunk in _iter_chunks(store, chunk_tokens):
                acc.add(chunk, writer)
        if acc.n_tokens == 0:
            raise MlsaeError(f"{store.path}: every token is special; nothing to analyse")
        tables, metrics = _finish(acc, store.blocks, min_count)
        for name, table in tables.items():
            table.write_parquet(tmp / name)
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _write_json(metrics, Path(metrics_path))
    return metrics
