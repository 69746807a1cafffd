"""Streaming analysis of the latent store: each latent's distribution over layers.

Notation (docs/statistics.md): ``a[t, l, f] >= 0`` is latent ``f``'s activation at eval token
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
* the ``(t, f)`` grouping exploits the store's token-major layout: a compiled loop
  (:func:`mlsae.analysis.kernels.group_pairs`) walks each token's ``L * k`` entries in layer order,
  gives each latent a slot in a small per-token table on its first entry, and sums into the slot
  (count, mass, ``sum l a``, ``sum l^2 a``, ``sum a ln a``, largest and second-largest
  activation). Two earlier versions were slower on the benchmark store: a Polars hash
  ``group_by`` on ``t * n_latents + f`` (most pairs hold 1-3 entries, so the hash table is as large
  as the input), and numpy sorts of packed per-token keys with one ``bincount`` per sum;
* the per-pair rows are folded into the decomposition's sums (:class:`mlsae.analysis.decomposition.LayerStats`,
  also compiled) and into the running per-latent top tokens (:func:`mlsae.analysis.kernels.update_top`,
  an insertion into each latent's short sorted list), and converted and appended to
  ``token_latent.parquet`` as one row group by the writer thread, then dropped.

Nothing of size ``tokens x layers x latents`` (or ``tokens x latents``) is built and no per-token
table outlives its chunk, so memory is bounded by the chunk size and ``n_latents x L``.

The chunk reader and the accumulator are in ``mlsae/analysis/accumulator.py``, the compiled loops
in ``mlsae/analysis/kernels.py``, the tables' schemas in ``mlsae/analysis/schemas.py``; the latent
store's format is ``mlsae/stores/latents.py``.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from mlsae.analysis.accumulator import Accumulator, Grouper, Pairs, iter_chunks, token_latent_table
from mlsae.analysis.decomposition import LayerStats
from mlsae.analysis.schemas import (
    LATENT_LAYER_SCHEMA,
    LATENTS_SCHEMA,
    LAYERS_SCHEMA,
    TOKEN_LATENT_ARROW,
    TOP_TOKENS_SCHEMA,
)
from mlsae.core.errors import MlsaeError
from mlsae.core.io import atomic_dir
from mlsae.core.metrics import AnalysisMetrics, write_metrics
from mlsae.core.params import AnalysisParams, is_int
from mlsae.core.paths import DOCUMENT, LATENT_LAYER, LATENT_STATS, LAYER_STATS, TOKEN_STATS, TOP_TOKENS
from mlsae.stats.bootstrap import unit_index
from mlsae.stores.latents import LatentStore, open_latents

__all__ = ["aggregate"]

# Share of a latent's mass that makes a layer count in ``n_layers_5pct``.
_LAYER_SHARE = 0.05

# --------------------------------------------------------------------------------------------
# Final tables and headline figures
# --------------------------------------------------------------------------------------------


def _nullable(x: np.ndarray, defined: np.ndarray) -> pl.Series:
    """``x`` as a Float64 series, null where not ``defined``."""
    return pl.Series(np.where(defined, x, np.nan), dtype=pl.Float64).fill_nan(None)


def _finish(
    acc: Accumulator, blocks: list[int], min_count: int, min_documents: int
) -> tuple[dict[str, pl.DataFrame], dict[str, Any]]:
    """Build the per-latent, per-layer and top-token tables and the headline metrics. Raises
    MlsaeError naming `analysis.min_count` when it leaves no latent in the headline averages."""
    most = int(acc.pair_count.max()) if acc.pair_count.size else 0
    if most > 0 and most < max(min_count, 1):
        raise MlsaeError(
            f"analysis.min_count: {min_count} leaves no latent in the per-latent averages (the most active latent "
            f"is active on {most} tokens of {acc.n_tokens}), so every headline figure would be empty; lower "
            f"analysis.min_count to at most {most}, or raise data.eval_tokens"
        )
    n_latents, n_layers = acc.n_latents, acc.n_layers
    ell = np.arange(n_layers, dtype=np.float64)
    mass = acc.layer_mass.sum(axis=1)
    active = acc.pair_count > 0
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
            "layer_dist": pl.Series(dist, dtype=pl.Array(pl.Float64, n_layers)).cast(pl.List(pl.Float64)),
        },
        schema=LATENTS_SCHEMA,
    ).with_columns(layer_dist=pl.when(pl.col("count") > 0).then(pl.col("layer_dist")))
    assert acc.stats is not None  # aggregate always gives its Accumulator a LayerStats
    per_latent, headline = acc.stats.finish()
    latents = latents.join(per_latent.drop("count", "mass"), on="latent", how="left")

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

    documents = np.zeros(n_latents, dtype=np.int64)
    documents[per_latent["latent"].to_numpy()] = per_latent["n_documents"].to_numpy()
    counted = (acc.pair_count >= max(min_count, 1)) & (documents >= min_documents)  # K, as the headline's
    metrics: dict[str, Any] = {
        **headline,
        "mean_layer_std": float(std[counted].mean()) if counted.any() else None,
        "n_tokens": acc.n_tokens,
        "n_active_pairs": acc.n_pairs,
        "n_entries": int(acc.layer_count.sum()),
        "n_latents_active": int(active.sum()),
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


def _units(store: LatentStore) -> tuple[np.ndarray, int]:
    """(unit of every token, number of units): the resampling unit is the eval document, counted
    when it holds an analysed token (others would enter the jackknife as empty units)."""
    kept = store.kept(0, store.n_tokens)
    if not kept.any():
        raise MlsaeError(f"{store.path}: every token is special; nothing to analyse")
    units = np.zeros(store.n_tokens, dtype=np.int64)
    units[kept], n_units = unit_index(store.meta(DOCUMENT)[kept])
    return units, n_units


def _check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int, or MlsaeError naming the param."""
    if not is_int(value) or value < minimum:
        raise MlsaeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _stream(
    store: LatentStore, chunk_tokens: int, acc: Accumulator, out_dir: Path, progress: bool = False
) -> Accumulator:
    """Fold every chunk of ``store`` into ``acc``, writing ``token_latent.parquet`` to ``out_dir``."""
    grouper = Grouper(store.n_latents)
    writer = pq.ParquetWriter(
        out_dir / TOKEN_STATS.name,
        TOKEN_LATENT_ARROW,
        compression="lz4",
        use_dictionary=["latent", "n_layers"],
        write_statistics=["token", "latent"],
    )

    def write(pairs: Pairs) -> None:
        writer.write_table(token_latent_table(pairs))

    # One thread reads (and bins) the next chunk, one converts and writes the previous chunk's rows,
    # while this one groups the current chunk; the compiled kernels, numpy, zarr's codecs and
    # parquet release the GIL.
    with writer, ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writing:
        written: Future[None] | None = None
        bar = tqdm(total=store.n_tokens, desc="aggregate", unit="tok", disable=not progress)
        for chunk in iter_chunks(store, chunk_tokens, reader):
            bar.update(chunk.token.size)
            acc.add_cells(chunk)
            pairs = grouper.pairs(chunk)
            if written is not None:
                written.result()
            written = writing.submit(write, pairs)
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
    analysis: AnalysisParams,
    chunk_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Stream the latent store and write the analysis tables and headline metrics.

    Args:
        latents_path: the latent store (``data/latents.zarr``); it must carry ``complete: true``.
        out_dir: the analysis directory. Its parquet files (names from :mod:`mlsae.core.paths`,
            schemas in mlsae/analysis/schemas.py) are written to a temporary sibling directory
            that replaces ``out_dir`` when whole.
        metrics_path: JSON file for the headline metrics, written atomically after ``out_dir``.
        analysis: the `analysis` params: `min_count` (latents active at fewer tokens are left out
            of the per-latent averages and ``mean_layer_std``; leaving none is an error),
            `top_tokens`, `multi_layer_threshold`, `bootstrap` (replicas; 0: plug-in values only),
            `seed`, `max_rate`, `min_documents`, `paper_batch_tokens`.
        chunk_tokens: tokens read per step; default whole storage chunks, about 1M entries.
            The results do not depend on it (up to float rounding in the sums).

    Returns:
        The headline metrics (also written to ``metrics_path``): every figure of
        mlsae.analysis.decomposition (its ``HEADLINE_KEYS``, each with its plug-in value, both bias
        estimates, the bias-corrected value, its standard error and interval), the seed paper's
        estimator per batch, ``mean_layer_std`` and the counts ``n_tokens``, ``n_active_pairs``,
        ``n_entries``, ``n_latents_active``, ``n_latents_counted``, ``n_units`` (eval documents),
        ``n_layers``. Undefined figures (an empty mean, a ratio over 0) are ``None``.

    Raises:
        MlsaeError: a missing, malformed or incomplete store, a store whose tokens are all special,
            an `analysis.min_count` that leaves no latent, or a bad argument.
    """
    min_count, n_resamples = analysis.min_count, analysis.bootstrap
    min_count = _check_int("analysis.min_count", min_count, 0)
    top_tokens = analysis.top_tokens
    if chunk_tokens is not None:
        chunk_tokens = _check_int("chunk_tokens", chunk_tokens, 1)
    store = open_latents(Path(latents_path))
    chunk_tokens = chunk_tokens or store.chunk_tokens()

    out_dir = Path(out_dir)
    made = [p for p in (out_dir.parent, *out_dir.parent.parents) if not p.exists()]
    try:
        with atomic_dir(out_dir) as tmp:
            units, n_units = _units(store)
            stats = LayerStats(
                store.n_latents,
                store.n_layers,
                n_units,
                min_count,
                analysis.multi_layer_threshold,
                n_resamples,
                analysis.seed,
                analysis.max_rate,
                analysis.min_documents,
                analysis.paper_batch_tokens,
            )
            acc = Accumulator(store.n_latents, store.n_layers, top_tokens, stats=stats, unit_index=units)
            acc = _stream(store, chunk_tokens, acc, tmp, progress)
            tables, metrics = _finish(acc, store.blocks, min_count, analysis.min_documents)
            if metrics["n_latents_counted"] == 0:
                raise MlsaeError(
                    f"analysis.min_documents: {analysis.min_documents} leaves no latent to average over (no latent "
                    f"with {min_count} active tokens is active in that many of the {metrics['n_units']} eval "
                    "documents); lower analysis.min_documents or raise data.eval_tokens"
                )
            for name, table in tables.items():
                table.write_parquet(tmp / name)
    except BaseException:
        for path in made:  # innermost first: leave no directory this call created
            if path.exists() and not any(path.iterdir()):
                path.rmdir()
        raise
    write_metrics(metrics_path, AnalysisMetrics.from_dict(metrics, "aggregate"))
    return metrics
