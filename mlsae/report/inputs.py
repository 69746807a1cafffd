"""The report's inputs: every metrics file, the training curve, the SAE config and the analysis
parquet files, read and cross-checked before anything is written."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from mlsae.core.errors import MlsaeError
from mlsae.core.io import read_json
from mlsae.core.metrics import (
    STAGE_METRICS,
    AnalysisMetrics,
    BaselineMetrics,
    EvalMetrics,
    ExtractMetrics,
    Figures,
    LensMetrics,
    TrainMetrics,
    read_metrics,
)
from mlsae.core.paths import (
    ANALYSIS_METRICS,
    BASELINE_METRICS,
    EVAL_METRICS,
    EXTRACT_METRICS,
    LATENT_STATS,
    LAYER_STATS,
    LENS_METRICS,
    TOP_TOKENS,
    TRAIN_METRICS,
    TRAIN_PLOT,
)
from mlsae.report.summary import _number

# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    """Everything build_report reads, validated."""

    config: dict[str, Any]
    blocks: list[int]  # SAE layers, in layer-position order
    extract: ExtractMetrics
    lens: LensMetrics
    train: TrainMetrics
    eval: EvalMetrics
    baseline: BaselineMetrics
    analysis: AnalysisMetrics
    train_curve: pl.DataFrame
    latents: pl.DataFrame
    layers: pl.DataFrame
    lens_by_layer: pl.DataFrame | None  # block, kl_logit_lens, kl_tuned_lens; None without a lens
    paths: dict[str, Path]


def _require(data: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in data:
        raise MlsaeError(f"{path}: missing key '{key}'")
    return data[key]


def _series(data: Figures, key: str, length: int, path: Path, required: bool = False) -> list[float | None]:
    """The list ``data[key]`` with ``length`` numbers (``None`` for null), or all ``None`` if absent."""
    if key not in data or data[key] is None:
        if required:
            raise MlsaeError(f"{path}: missing key '{key}'")
        return [None] * length
    values = data[key]
    if not isinstance(values, list) or len(values) != length:
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise MlsaeError(f"{path}: '{key}' must be a list of {length} numbers, got {got}")
    return [_number(v) for v in values]


def _read_parquet(path: Path, columns: Sequence[str], what: str) -> pl.DataFrame:
    """Read ``columns`` of a parquet file, or raise MlsaeError naming the file."""
    if not path.is_file():
        raise MlsaeError(f"{path}: not found (run the {what} stage first)")
    try:
        schema = pl.read_parquet_schema(path)
    except Exception as exc:  # polars raises several types for a corrupt file
        raise MlsaeError(f"{path}: not a readable parquet file ({exc})") from None
    missing = [c for c in columns if c not in schema]
    if missing:
        raise MlsaeError(f"{path}: missing column(s) {', '.join(missing)}")
    return pl.read_parquet(path, columns=list(columns))


def _load_inputs(metrics_dir: Path, plots_dir: Path, analysis_dir: Path, sae_config_path: Path) -> _Inputs:
    """Read and cross-check every input, raising MlsaeError on the first bad one."""
    paths = {
        "config": sae_config_path,
        "extract": metrics_dir / EXTRACT_METRICS.name,
        "lens": metrics_dir / LENS_METRICS.name,
        "train": metrics_dir / TRAIN_METRICS.name,
        "eval": metrics_dir / EVAL_METRICS.name,
        "baseline": metrics_dir / BASELINE_METRICS.name,
        "analysis": metrics_dir / ANALYSIS_METRICS.name,
        "train_curve": plots_dir / TRAIN_PLOT.name,
        "latents": analysis_dir / LATENT_STATS.name,
        "layers": analysis_dir / LAYER_STATS.name,
        "top_tokens": analysis_dir / TOP_TOKENS.name,
    }
    config = read_json(paths["config"])
    for key in ("model", "d_model", "n_latents", "k", "layers", "lens"):
        _require(config, key, paths["config"])
    blocks = config["layers"]
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, int) for b in blocks):
        raise MlsaeError(f"{paths['config']}: 'layers' must be a non-empty list of block indices, got {blocks!r}")
    n_layers = len(blocks)

    jsons: dict[str, Any] = {
        name: read_metrics(paths[name], STAGE_METRICS[name], partial=True)
        for name in ("extract", "lens", "train", "eval", "baseline", "analysis")
    }
    eval_blocks = jsons["eval"].get("layers", blocks)
    if eval_blocks != blocks:
        raise MlsaeError(f"{paths['eval']}: layers {eval_blocks} differ from the SAE's {blocks} ({paths['config']})")
    analysis_layers = jsons["analysis"].get("n_layers", n_layers)
    if analysis_layers != n_layers:
        raise MlsaeError(f"{paths['analysis']}: n_layers {analysis_layers} but the SAE has {n_layers} layers")
    _require(jsons["lens"], "lens", paths["lens"])

    train_curve = _read_csv(paths["train_curve"], ("step", "loss", "fvu", "dead_fraction"))
    latents = _read_parquet(
        paths["latents"],
        ("latent", "count", "mass", "mean_layer", "std_layer", "entropy", "n_layers_5pct", "layer_dist"),
        "aggregate",
    )
    layers = _read_parquet(paths["layers"], ("layer", "block", "n_entries", "n_latents_active", "mass"), "aggregate")
    if layers.sort("layer")["block"].to_list() != blocks:
        raise MlsaeError(f"{paths['layers']}: blocks {layers['block'].to_list()} differ from the SAE's {blocks}")
    lengths = latents.filter(pl.col("layer_dist").is_not_null())["layer_dist"].list.len().unique().to_list()
    if any(length != n_layers for length in lengths):
        raise MlsaeError(f"{paths['latents']}: 'layer_dist' lists must have {n_layers} entries, got {lengths}")
    return _Inputs(
        config=config,
        blocks=blocks,
        extract=jsons["extract"],
        lens=jsons["lens"],
        train=jsons["train"],
        eval=jsons["eval"],
        baseline=jsons["baseline"],
        analysis=jsons["analysis"],
        train_curve=train_curve,
        latents=latents,
        layers=layers.sort("layer"),
        lens_by_layer=_lens_by_layer(jsons["lens"], blocks, paths["lens"]),
        paths=paths,
    )


LENS_BY_LAYER_SCHEMA = {"layer": pl.Int64, "kl_logit_lens": pl.Float64, "kl_tuned_lens": pl.Float64}


def _lens_by_layer(lens: Mapping[str, Any], blocks: list[int], path: Path) -> pl.DataFrame | None:
    """The lens KL curves over all the model's blocks, or None when no lens is used."""
    if lens.get("lens", "none") == "none":
        return None
    logit = lens.get("kl_logit_lens_by_layer")
    n_model = len(logit) if isinstance(logit, list) else 0
    if n_model <= max(blocks):
        raise MlsaeError(
            f"{path}: 'kl_logit_lens_by_layer' must list one KL per block (> {max(blocks)}), got {logit!r:.80}"
        )
    return pl.DataFrame(
        {
            "layer": list(range(n_model)),
            "kl_logit_lens": _series(lens, "kl_logit_lens_by_layer", n_model, path, required=True),
            "kl_tuned_lens": _series(lens, "kl_tuned_lens_by_layer", n_model, path, required=True),
        },
        schema=LENS_BY_LAYER_SCHEMA,
    )


def _read_csv(path: Path, columns: Sequence[str]) -> pl.DataFrame:
    """Read the training curve CSV and check it has ``columns`` (a header-only file has no rows)."""
    if not path.is_file():
        raise MlsaeError(f"{path}: not found (run the train stage first)")
    try:
        frame = pl.read_csv(path, infer_schema_length=None)
    except Exception as exc:  # polars raises several types for a malformed CSV
        raise MlsaeError(f"{path}: not a readable CSV file ({exc})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MlsaeError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame
