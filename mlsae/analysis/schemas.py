"""The analysis tables' columns (`data/analysis/*.parquet`, written by the aggregate stage)."""

from __future__ import annotations

import polars as pl

TOKEN_LATENT_SCHEMA: dict[str, pl.DataType] = {
    "token": pl.Int64(),
    "latent": pl.Int32(),
    "n_layers": pl.Int32(),
    "mass": pl.Float32(),
    "mean_layer": pl.Float32(),
    "var_layer": pl.Float32(),
}
TOKEN_LATENT_ARROW = pl.DataFrame(schema=TOKEN_LATENT_SCHEMA).to_arrow().schema
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
"""Then the per-latent columns of mlsae.analysis.decomposition.LATENT_COLUMNS (null for latents never
active): rate, n_documents, var_within, var_between, var_total, within_share and their _mass and
_peak versions, effective_layers, multi_layer_fraction."""
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
