"""The report stage's library: human-readable tables and figures from the earlier stages' outputs.

:func:`build_report` reads the metrics JSON files, the training curve, the SAE config and the
analysis parquet files (never the large ``token_latent.parquet``), and writes

* tables, Markdown + CSV each (``tables_dir``): ``summary`` (the one-row run summary that stacks
  across experiments; see :func:`summary_row`), ``layers`` (one row per SAE layer) and
  ``top_latents`` (latents by activation mass, with their layer distribution and max-activating
  contexts);
* figures, PNG (``figures_dir``): the P_f heatmap, histograms of mu_f and sigma_f, FVU and delta CE by
  layer, adjacent-layer cosine similarity, the training curve, and the lens KL by layer (only when a
  lens is used);
* the figures' series as CSV for ``dvc plots`` (``plots_dir``), except the training curve and the
  per-layer eval metrics, whose CSVs (``train.csv``, ``eval_by_layer.csv``) other stages write.

Everything is read and validated, and every table and figure is rendered in memory, before the
first file is written; each file is then written atomically (temporary name, then rename).

Layer units: the analysis numbers layers by *position* ``l = 0 .. L-1`` among the SAE's selected
layers (``config.json`` ``layers``), so mu_f and sigma_f are in positions; tables and figure axes
that name a transformer block say "block".
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mlsae import constants as C
from mlsae.constants import (
    ADJ_COS_PLOT,
    ANALYSIS_METRICS,
    EVAL_METRICS,
    EXTRACT_METRICS,
    LATENT_STATS,
    LAYER_STATS,
    LENS_METRICS,
    LENS_PLOT,
    TOP_TOKENS,
    TRAIN_METRICS,
    TRAIN_PLOT,
)
from mlsae.errors import MlsaeError
from mlsae.io import read_json, write_bytes, write_text

__all__ = [
    "FIGURES",
    "PLOTS",
    "SUMMARY_COLUMNS",
    "TABLES",
    "build_report",
    "format_layers",
    "format_value",
    "markdown_table",
    "layer_sparkline",
    "render_summary",
    "summary_row",
    "summary_text",
    "token_context",
]

# --------------------------------------------------------------------------------------------
# Output names (file names only; the directories are build_report's arguments)
# --------------------------------------------------------------------------------------------

SUMMARY_TABLE = "summary"
LAYERS_TABLE = "layers"
TOP_LATENTS_TABLE = "top_latents"
TABLES = (SUMMARY_TABLE, LAYERS_TABLE, TOP_LATENTS_TABLE)
"""Table stems; each is written as ``<stem>.md`` and ``<stem>.csv``."""

HEATMAP_FIG = "latent_layer_heatmap.png"
LATENT_HIST_FIG = "latent_layer_hist.png"
EVAL_BY_LAYER_FIG = "fvu_delta_ce_by_layer.png"
ADJ_COS_FIG = "adjacent_cos.png"
TRAIN_FIG = "train_curve.png"
LENS_FIG = "lens_kl_by_layer.png"
FIGURES = (HEATMAP_FIG, LATENT_HIST_FIG, EVAL_BY_LAYER_FIG, ADJ_COS_FIG, TRAIN_FIG, LENS_FIG)
"""Every figure; :data:`LENS_FIG` only when a lens is used."""

MEAN_HIST_PLOT = C.MEAN_HIST_PLOT.name
STD_HIST_PLOT = C.STD_HIST_PLOT.name
LAYER_ACTIVITY_PLOT = C.LAYER_ACTIVITY_PLOT.name
PLOTS = (MEAN_HIST_PLOT, STD_HIST_PLOT, LAYER_ACTIVITY_PLOT, ADJ_COS_PLOT.name, LENS_PLOT.name)
"""Every plot CSV (:data:`LENS_PLOT` has a header and no rows when no lens is used, so DVC always
finds the declared plot)."""

# --------------------------------------------------------------------------------------------
# The summary row
# --------------------------------------------------------------------------------------------

SUMMARY_COLUMNS: dict[str, str] = {
    "model": "model name",
    "n_layers": "transformer blocks in the model",
    "layers": "blocks the SAE is trained on",
    "d_model": "residual width",
    "n_latents": "SAE latents",
    "k": "active latents per vector (TopK)",
    "lens": "space the SAE works in (none = model basis)",
    "fvu": "fraction of variance unexplained, eval split, mean over layers",
    "delta_ce": "CE increase when one layer is spliced with its reconstruction (nats/token)",
    "delta_ce_zero": "CE increase when one layer is zero-ablated (nats/token), for scale",
    "kl": "KL(clean || spliced) per token (nats)",
    "ce_clean": "clean next-token CE (nats/token)",
    "l0": "active latents per vector, eval",
    "dead_fraction": "latents never active on the eval split",
    "var_token": "mean per-token variance of a latent's layer distribution",
    "var_aggregate": "mean variance of a latent's aggregate layer distribution",
    "var_ratio": "var_aggregate / var_token (seed paper: about 100)",
    "var_ratio_weighted": "the same ratio with activation-mass weights",
    "multi_layer_fraction": "active (token, latent) pairs active at more than one layer",
    "mean_layer_std": "mean std of the aggregate layer distributions (layers)",
    "adjacent_cos": "mean cosine similarity of adjacent blocks' centred residuals",
}
"""The run summary's columns, in order, with a one-line meaning each."""


def format_layers(layers: Any) -> str:
    """Block indices as a short string: ``[0, 1, 2, 3, 5]`` -> ``"0-3,5"``; ``"all"`` stays ``"all"``."""
    if layers is None:
        return ""
    if isinstance(layers, str):
        return layers
    if isinstance(layers, (int, np.integer)):
        return str(int(layers))
    values = [int(v) for v in layers]
    parts: list[str] = []
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and values[stop + 1] == values[stop] + 1:
            stop += 1
        if stop - start >= 2:
            parts.append(f"{values[start]}-{values[stop]}")
        else:
            parts.extend(str(v) for v in values[start : stop + 1])
        start = stop + 1
    return ",".join(parts)


def _number(value: Any) -> float | int | None:
    """A finite number as itself, anything else (None, NaN, a string, a bool) as None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    return float(value) if math.isfinite(value) else None


def summary_row(metrics: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any]) -> dict[str, Any]:
    """The one-row run summary (keys and order: :data:`SUMMARY_COLUMNS`).

    Args:
        metrics: metrics by stage, keyed by the metrics file's stem (``extract``, ``lens``,
            ``train``, ``eval``, ``analysis``); a missing stage or key gives ``None``.
        config: the run's settings: ``model``, ``lens``, ``k``, ``layers`` (a list of blocks or a
            string such as ``"all"``), and optionally ``n_latents``, ``d_model``, ``expansion``.

    Returns:
        A flat dict of scalars (numbers, strings or ``None``), the same for one run's report and
        for :mod:`mlsae.compare`'s rows.
    """

    def get(stage: str, key: str) -> Any:
        return _number((metrics.get(stage) or {}).get(key))

    d_model = _number(config.get("d_model")) or get("extract", "d_model")
    n_latents = _number(config.get("n_latents")) or get("train", "n_latents")
    expansion = _number(config.get("expansion"))
    if n_latents is None and d_model is not None and expansion is not None:
        n_latents = int(d_model * expansion)
    lens = config.get("lens")
    if lens is None:
        lens = (metrics.get("lens") or {}).get("lens")
    return {
        "model": None if config.get("model") is None else str(config.get("model")),
        "n_layers": get("extract", "n_layers"),
        "layers": format_layers(config.get("layers")),
        "d_model": d_model,
        "n_latents": n_latents,
        "k": _number(config.get("k")),
        "lens": None if lens is None else str(lens),
        "fvu": get("eval", "fvu"),
        "delta_ce": get("eval", "delta_ce"),
        "delta_ce_zero": get("eval", "delta_ce_zero"),
        "kl": get("eval", "kl"),
        "ce_clean": get("eval", "ce_clean"),
        "l0": get("eval", "l0"),
        "dead_fraction": get("eval", "dead_fraction"),
        "var_token": get("analysis", "var_token"),
        "var_aggregate": get("analysis", "var_aggregate"),
        "var_ratio": get("analysis", "var_ratio"),
        "var_ratio_weighted": get("analysis", "var_ratio_weighted"),
        "multi_layer_fraction": get("analysis", "multi_layer_fraction"),
        "mean_layer_std": get("analysis", "mean_layer_std"),
        "adjacent_cos": get("extract", "adjacent_cos"),
    }


# --------------------------------------------------------------------------------------------
# The text summary
# --------------------------------------------------------------------------------------------


def format_value(value: Any, digits: int = 4) -> str:
    """A table cell: ``-`` for missing, integers as they are, floats to ``digits`` significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}g}"
    return str(value)


def variance_verdict(var_token: float | None, var_aggregate: float | None) -> str:
    """One plain-language sentence comparing per-token and aggregate layer variance."""
    if var_token is None or var_aggregate is None:
        return "Per-token vs aggregate layer variance: undefined (no latent was active often enough to count)."
    if var_token <= 0:
        if var_aggregate > 0:
            return (
                "Every latent fires at a single layer per token (per-token variance 0) while its aggregate "
                "distribution spreads over layers: the paper's finding in its extreme form."
            )
        return "Both variances are 0: every latent is confined to one layer, per token and in aggregate."
    ratio = var_aggregate / var_token
    if ratio <= 1:
        return (
            f"Per-token layer variance is NOT below the aggregate variance (ratio {ratio:.3g}): "
            "unlike the seed paper (about two orders of magnitude)."
        )
    orders = math.log10(ratio)
    if orders >= 1.5:
        return (
            f"Per-token layer variance is {ratio:.3g}x ({orders:.1f} orders of magnitude) below the aggregate: "
            "consistent with the seed paper (about two orders of magnitude); a latent is active at one or two "
            "adjacent layers per token, but at different layers for different tokens."
        )
    if orders >= 0.5:
        return (
            f"Per-token layer variance is {ratio:.3g}x ({orders:.1f} orders of magnitude) below the aggregate: "
            "the same direction as the seed paper, but weaker than its about two orders of magnitude."
        )
    return (
        f"Per-token layer variance is only {ratio:.3g}x below the aggregate: much of a latent's spread over "
        "layers happens within single tokens, unlike the seed paper (about two orders of magnitude)."
    )


def summary_text(summary: Mapping[str, Any]) -> str:
    """A one-screen plain-text summary of a run (a :func:`summary_row` dict): headline figures and a verdict.

    Plain text without markup, so it can be logged or written anywhere; :func:`render_summary`
    prints it in a rich panel.
    """
    s = summary
    lines = [
        f"model {format_value(s.get('model'))}: {format_value(s.get('n_layers'))} blocks, d_model {format_value(s.get('d_model'))}; "
        f"SAE on blocks {format_value(s.get('layers'))}, {format_value(s.get('n_latents'))} latents, k {format_value(s.get('k'))}, "
        f"lens {format_value(s.get('lens'))}",
        f"reconstruction  FVU {format_value(s.get('fvu'))}   L0 {format_value(s.get('l0'))}   "
        f"dead {format_value(_percent(s.get('dead_fraction')))}%",
        f"downstream      delta CE {format_value(s.get('delta_ce'))} nats/token (zero-ablation {format_value(s.get('delta_ce_zero'))})"
        f"   KL {format_value(s.get('kl'))}",
        f"layer variance  per-token {format_value(s.get('var_token'))}   aggregate {format_value(s.get('var_aggregate'))}   "
        f"ratio {format_value(s.get('var_ratio'))}",
        f"multi-layer     {format_value(_percent(s.get('multi_layer_fraction')))}% of active (token, latent) pairs span "
        f">1 layer; mean sigma_f {format_value(s.get('mean_layer_std'))} layers",
        f"residual stream adjacent-block cosine {format_value(s.get('adjacent_cos'))}",
        "",
        variance_verdict(_number(s.get("var_token")), _number(s.get("var_aggregate"))),
    ]
    return "\n".join(lines)


def _percent(value: Any) -> float | None:
    number = _number(value)
    return None if number is None else 100.0 * number


def render_summary(text: str, console: Any = None) -> None:
    """Print :func:`summary_text`'s output in a rich panel (to ``console``, default stdout)."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    (console or Console()).print(Panel(Text(text), title="MLSAE report", expand=False))


# --------------------------------------------------------------------------------------------
# Token contexts and sparklines
# --------------------------------------------------------------------------------------------

_SPARK = "▁▂▃▄▅▆▇█"


def layer_sparkline(dist: Sequence[float] | None) -> str:
    """A layer distribution as one character per layer, scaled to its maximum; ``·`` marks 0."""
    if dist is None or len(dist) == 0:
        return ""
    values = np.nan_to_num(np.asarray(dist, dtype=np.float64))
    top = values.max()
    if top <= 0:
        return "·" * values.size
    levels = np.clip(np.ceil(values / top * len(_SPARK)).astype(int) - 1, 0, len(_SPARK) - 1)
    return "".join("·" if v <= 0 else _SPARK[level] for v, level in zip(values, levels))


def token_context(
    index: int,
    tokens: np.ndarray,
    context: np.ndarray,
    position: np.ndarray,
    decode: Callable[[list[int]], str],
    before: int = 12,
    after: int = 4,
) -> str:
    """The text around eval token ``index``, with that token marked ``«like this»``.

    The window holds up to ``before`` tokens before and ``after`` tokens after ``index``, taken
    from the same context only (same ``context`` id and consecutive ``position``). The text is
    decoded in one piece and split at the token, so tokenizers that drop a leading space when
    decoding a lone token still read naturally; a leading space of the marked token is put
    before the mark. The result is raw text: callers escape it for their format.
    """
    n = len(tokens)
    if not 0 <= index < n:
        raise MlsaeError(f"token index {index} outside the {n} eval tokens")
    context_id, pos = context[index], int(position[index])
    lo = index
    while lo > max(0, index - before) and context[lo - 1] == context_id and int(position[lo - 1]) == pos - (index - lo + 1):
        lo -= 1
    hi = index
    while hi < min(n - 1, index + after) and context[hi + 1] == context_id and int(position[hi + 1]) == pos + (hi + 1 - index):
        hi += 1
    ids = [int(t) for t in tokens[lo : hi + 1]]
    cut = index - lo
    head = decode(ids[:cut]) if cut else ""
    through = decode(ids[: cut + 1])
    full = decode(ids)
    token = through[len(head) :] if through.startswith(head) else decode([ids[cut]])
    tail = full[len(through) :] if full.startswith(through) else decode(ids[cut + 1 :]) if cut + 1 < len(ids) else ""
    stripped = token.lstrip()
    if stripped:
        head, token = head + token[: len(token) - len(stripped)], stripped
    return f"{head}«{token}»{tail}"


def _one_line(text: str) -> str:
    """Newlines, carriage returns and tabs as visible symbols, so a context stays on one line."""
    return text.replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "⏎").replace("\t", "⇥")


_MD_SPECIAL = "\\`*_[]<>|~"


def _md_escape(text: str, full: bool = True) -> str:
    """Text safe inside a Markdown (GFM) table cell: one line, with ``|`` escaped.

    ``full`` also escapes the characters that Markdown or HTML would interpret (for free text such
    as token contexts); names and numbers only need the pipe escaped.
    """
    special = _MD_SPECIAL if full else "|"
    return "".join("\\" + c if c in special else c for c in _one_line(text))


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    """Everything build_report reads, validated."""

    config: dict[str, Any]
    blocks: list[int]  # SAE layers, in layer-position order
    extract: dict[str, Any]
    lens: dict[str, Any]
    train: dict[str, Any]
    eval: dict[str, Any]
    analysis: dict[str, Any]
    train_curve: pl.DataFrame
    latents: pl.DataFrame
    layers: pl.DataFrame
    lens_by_layer: pl.DataFrame | None  # block, kl_logit_lens, kl_tuned_lens; None without a lens
    paths: dict[str, Path]


def _require(data: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in data:
        raise MlsaeError(f"{path}: missing key '{key}'")
    return data[key]


def _series(data: Mapping[str, Any], key: str, length: int, path: Path, required: bool = False) -> list[float | None]:
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

    jsons = {name: read_json(paths[name]) for name in ("extract", "lens", "train", "eval", "analysis")}
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
        raise MlsaeError(f"{path}: 'kl_logit_lens_by_layer' must list one KL per block (> {max(blocks)}), got {logit!r:.80}")
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


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def markdown_table(frame: pl.DataFrame, raw: Sequence[str] = ()) -> str:
    """A GFM table of ``frame``: cells via :func:`format_value`, ``|`` escaped except in ``raw`` columns."""
    header = "| " + " | ".join(_md_escape(c, full=False) for c in frame.columns) + " |"
    align = "|" + "|".join("---" if frame.schema[c] == pl.String else "---:" for c in frame.columns) + "|"
    rows = []
    for row in frame.iter_rows():
        cells = []
        for name, value in zip(frame.columns, row):
            cell = format_value(value)
            cells.append(cell if name in raw or not isinstance(value, str) else _md_escape(cell, full=False))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([header, align, *rows]) + "\n"


def _csv(frame: pl.DataFrame) -> str:
    return frame.write_csv()


def _summary_markdown(row: Mapping[str, Any]) -> str:
    """The summary row as a field / value / meaning table (one row per field reads better than 20 columns)."""
    frame = pl.DataFrame(
        {
            "field": list(row),
            "value": [format_value(v) for v in row.values()],
            "meaning": [SUMMARY_COLUMNS.get(k, "") for k in row],
        }
    )
    return "# Run summary\n\n" + markdown_table(frame)


def _layers_table(inp: _Inputs) -> pl.DataFrame:
    """One row per SAE layer: eval metrics, training FVU, adjacent cosine, latent activity, lens KL."""
    n = len(inp.blocks)
    ev, path = inp.eval, inp.paths["eval"]
    adjacent = inp.extract.get("adjacent_cos_by_layer") or []
    if not isinstance(adjacent, list):
        raise MlsaeError(f"{inp.paths['extract']}: 'adjacent_cos_by_layer' must be a list")
    mass = inp.layers["mass"].cast(pl.Float64).to_numpy()
    total = mass.sum()
    columns: dict[str, list[Any]] = {
        "layer": list(range(n)),
        "block": inp.blocks,
        "fvu": _series(ev, "fvu_by_layer", n, path, required=True),
        "fvu_train": _series(inp.train, "fvu_by_layer", n, inp.paths["train"]),
        "mse": _series(ev, "mse_by_layer", n, path),
        "l0": _series(ev, "l0_by_layer", n, path),
        "delta_ce": _series(ev, "delta_ce_by_layer", n, path, required=True),
        "delta_ce_zero": _series(ev, "delta_ce_zero_by_layer", n, path),
        "kl": _series(ev, "kl_by_layer", n, path),
        "adjacent_cos": [_number(adjacent[b]) if 0 <= b < len(adjacent) else None for b in inp.blocks],
        "n_latents_active": inp.layers["n_latents_active"].to_list(),
        "n_entries": inp.layers["n_entries"].to_list(),
        "mass_share": [float(m / total) if total > 0 else None for m in mass],
    }
    if inp.lens_by_layer is not None:
        for key in ("kl_logit_lens", "kl_tuned_lens"):
            columns[key] = inp.lens_by_layer[key].gather(inp.blocks).to_list()
    return pl.DataFrame(columns, strict=False)


@dataclass(frozen=True)
class _TopLatents:
    csv: pl.DataFrame
    markdown: str


def _top_latents_table(
    inp: _Inputs,
    tokens: np.ndarray,
    context: np.ndarray,
    position: np.ndarray,
    decode: Callable[[list[int]], str],
    top_latents: int,
    contexts_per_latent: int,
) -> _TopLatents:
    """The ``top_latents`` latents by activation mass with their distribution and top contexts."""
    total_mass = float(inp.latents["mass"].sum())
    top = (
        inp.latents.filter(pl.col("count") > 0)
        .sort(["mass", "latent"], descending=[True, False])
        .head(top_latents)
    )
    ids = top["latent"].to_list()
    path = inp.paths["top_tokens"]
    contexts = _read_parquet(path, ("latent", "rank", "token", "value", "layer"), "aggregate")
    contexts = contexts.filter(pl.col("latent").is_in(ids) & (pl.col("rank") <= contexts_per_latent)).sort(
        ["latent", "rank"]
    )
    if contexts.height:
        lo, hi = int(contexts["token"].min()), int(contexts["token"].max())
        if lo < 0 or hi >= len(tokens):
            raise MlsaeError(f"{path}: token index {hi if hi >= 0 else lo} outside the {len(tokens)} eval tokens")
        bad = contexts.filter((pl.col("layer") < 0) | (pl.col("layer") >= len(inp.blocks)))
        if bad.height:
            raise MlsaeError(f"{path}: layer {bad['layer'][0]} outside 0..{len(inp.blocks) - 1}")
    by_latent: dict[int, list[tuple[float, int, str]]] = {}
    for latent, token, value, layer in contexts.select("latent", "token", "value", "layer").iter_rows():
        text = token_context(token, tokens, context, position, decode)
        by_latent.setdefault(latent, []).append((value, inp.blocks[layer], text))

    dists = top["layer_dist"].to_list()
    peaks = [inp.blocks[int(np.argmax(d))] if d else None for d in dists]
    base = pl.DataFrame(
        {
            "rank": list(range(1, top.height + 1)),
            "latent": ids,
            "mass": top["mass"].cast(pl.Float64),
            "mass_share": [m / total_mass if total_mass > 0 else None for m in top["mass"].cast(pl.Float64)],
            "count": top["count"],
            "mean_layer": top["mean_layer"].cast(pl.Float64),
            "std_layer": top["std_layer"].cast(pl.Float64),
            "entropy": top["entropy"].cast(pl.Float64),
            "n_layers_5pct": top["n_layers_5pct"],
            "peak_block": peaks,
            "layer_dist": [layer_sparkline(d) for d in dists],
        },
        strict=False,
    )

    def joined(latent: int, markdown: bool) -> str:
        items = by_latent.get(latent, [])
        if markdown:
            return "<br>".join(f"**{v:.3g}** @{b}: {_md_escape(t)}" for v, b, t in items)
        return "\n".join(f"{v:.4g} @{b}: {_one_line(t)}" for v, b, t in items)

    csv = base.with_columns(
        layer_p=pl.Series([" ".join(f"{p:.4f}" for p in d) if d else "" for d in dists]),
        contexts=pl.Series([joined(i, False) for i in ids], dtype=pl.String),
    )
    md_frame = base.rename({"mean_layer": "μ_f", "std_layer": "σ_f"}).with_columns(
        layer_dist=pl.Series([f"`{s}`" if s else "" for s in base["layer_dist"]], dtype=pl.String),
        contexts=pl.Series([joined(i, True) for i in ids], dtype=pl.String),
    )
    blocks = format_layers(inp.blocks)
    intro = (
        f"# Top {top.height} latents by activation mass\n\n"
        f"μ_f, σ_f: mean and std of the latent's aggregate layer distribution P_f, in layer positions "
        f"0..{len(inp.blocks) - 1} over the SAE's blocks {blocks}; entropy normalised to [0, 1]; "
        f"layer_dist: P_f per layer, one character per layer, scaled to its maximum (· = 0); "
        f"contexts: activation @block: text with the token «marked».\n\n"
    )
    return _TopLatents(csv, intro + markdown_table(md_frame, raw=("layer_dist", "contexts")))


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def _empty(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _block_ticks(ax: Axes, positions: Sequence[float], labels: Sequence[int], axis: str = "x") -> None:
    """At most ~16 block labels, evenly spaced, so 30+ layers stay legible."""
    step = max(1, math.ceil(len(positions) / 16))
    pos, lab = list(positions)[::step], [str(b) for b in list(labels)[::step]]
    if axis == "x":
        ax.set_xticks(pos, lab)
    else:
        ax.set_yticks(pos, lab)


def _counted(inp: _Inputs, min_count: int) -> pl.DataFrame:
    """Latents active at >= min_count tokens, sorted by mu_f (then id)."""
    return inp.latents.filter((pl.col("count") >= max(min_count, 1)) & pl.col("mean_layer").is_not_null()).sort(
        ["mean_layer", "latent"]
    )


def _heatmap(inp: _Inputs, min_count: int, max_rows: int) -> bytes:
    """P_f over layers, one row per latent (sorted by mu_f), evenly subsampled to at most ``max_rows``."""
    counted = _counted(inp, min_count)
    fig = Figure(figsize=(8, 7), layout="constrained")
    ax = fig.add_subplot()
    n = counted.height
    if n == 0:
        _empty(ax, f"no latent active at >= {min_count} tokens")
    else:
        rows = np.unique(np.linspace(0, n - 1, min(n, max_rows)).round().astype(np.int64))
        matrix = np.asarray(counted["layer_dist"].gather(rows).to_list(), dtype=np.float64)
        # Scale to the bulk of the values (not to 1) so that spread-out latents stay visible.
        vmax = max(float(np.quantile(matrix, 0.995)), 1.0 / len(inp.blocks))
        image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0, vmax=vmax)
        cbar = fig.colorbar(image, ax=ax, extend="max" if matrix.max() > vmax else "neither")
        cbar.set_label("P_f(layer): share of the latent's activation mass")
        _block_ticks(ax, range(len(inp.blocks)), inp.blocks)
        ax.set_xlabel("block")
        shown = f"all {n}" if rows.size == n else f"{rows.size} of {n}, evenly spaced"
        ax.set_ylabel(f"latent, sorted by mean layer μ_f ({shown})")
        ax.set_yticks([])
    ax.set_title(f"Layer distribution P_f of latents active at ≥ {min_count} tokens")
    return _png(fig)


@dataclass(frozen=True)
class _Histogram:
    counts: np.ndarray
    edges: np.ndarray

    def frame(self, name: str) -> pl.DataFrame:
        centres = (self.edges[:-1] + self.edges[1:]) / 2
        return pl.DataFrame(
            {name: centres, "count": self.counts.astype(np.int64), "bin_start": self.edges[:-1], "bin_end": self.edges[1:]}
        )


def _histograms(inp: _Inputs, min_count: int) -> tuple[_Histogram, _Histogram]:
    """Histograms of mu_f over [0, L-1] and of sigma_f over [0, a little past the largest sigma_f]."""
    counted = _counted(inp, min_count)
    top = len(inp.blocks) - 1
    bins = int(np.clip(4 * top, 10, 60))
    mean_range = (0.0, float(top)) if top > 0 else (-0.5, 0.5)
    stds = counted["std_layer"].cast(pl.Float64).to_numpy()
    # sigma_f is at most (L-1)/2; the range stops a little past the largest value (or the per-token
    # std, drawn as a reference line) so that the bars are not squeezed against the axis.
    var_token = _number(inp.analysis.get("var_token")) or 0.0
    reach = max(float(stds.max()) if stds.size else 0.0, math.sqrt(max(var_token, 0.0)))
    std_range = (0.0, min(top / 2, 1.1 * reach) if top > 0 and reach > 0 else max(top / 2, 0.5))
    mean = np.histogram(counted["mean_layer"].cast(pl.Float64).to_numpy(), bins=bins, range=mean_range)
    std = np.histogram(stds, bins=bins, range=std_range)
    return _Histogram(*mean), _Histogram(*std)


def _histogram_figure(inp: _Inputs, mean: _Histogram, std: _Histogram, min_count: int) -> bytes:
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.stairs(mean.counts, mean.edges, fill=True, color="tab:blue", alpha=0.8)
    left.set_xlabel(f"mean layer μ_f (layer position 0..{len(inp.blocks) - 1})")
    left.set_ylabel("latents")
    left.set_title("Where latents live: μ_f")
    right.stairs(std.counts, std.edges, fill=True, color="tab:orange", alpha=0.8)
    var_token = _number(inp.analysis.get("var_token"))
    mean_std = _number(inp.analysis.get("mean_layer_std"))
    if mean_std is not None:
        right.axvline(mean_std, color="k", linestyle="-", label=f"mean σ_f = {mean_std:.3g}")
    if var_token is not None and var_token >= 0:
        right.axvline(math.sqrt(var_token), color="tab:red", linestyle="--", label=f"√var_token = {math.sqrt(var_token):.3g}")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    right.set_xlabel("std of layer distribution σ_f (layers)")
    right.set_ylabel("latents")
    right.set_title("How spread out: σ_f")
    fig.suptitle(f"Aggregate layer distributions of {int(mean.counts.sum())} latents active at ≥ {min_count} tokens")
    return _png(fig)


def _eval_figure(layers: pl.DataFrame) -> bytes:
    """FVU (eval, and train where known) and delta CE / KL by block, two panels."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    blocks = layers["block"].to_list()
    left.plot(blocks, layers["fvu"].to_list(), marker="o", label="eval")
    if layers["fvu_train"].null_count() < layers.height:
        left.plot(blocks, layers["fvu_train"].to_list(), marker=".", linestyle="--", label="train (last 10% of steps)")
    left.set_xlabel("block")
    left.set_ylabel("FVU (fraction of variance unexplained)")
    left.set_title("Reconstruction error by layer")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    right.plot(blocks, layers["delta_ce"].to_list(), marker="o", label="ΔCE (spliced − clean)")
    if layers["kl"].null_count() < layers.height:
        right.plot(blocks, layers["kl"].to_list(), marker="s", linestyle="--", label="KL(clean ‖ spliced)")
    right.set_xlabel("block")
    right.set_ylabel("nats per token")
    right.set_title("Downstream loss when one layer is reconstructed")
    right.axhline(0, color="0.6", linewidth=0.8)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _png(fig)


def _adjacent_figure(adjacent: Sequence[float | None]) -> bytes:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    if not adjacent:
        _empty(ax, "fewer than two blocks: no adjacent pairs")
    else:
        ax.plot(range(len(adjacent)), adjacent, marker="o")
        ax.set_xlabel("block i")
        ax.set_ylabel("cosine similarity, blocks i and i+1")
        ax.grid(alpha=0.3)
    ax.set_title("Residual stream: adjacent-block cosine similarity (centred, eval)")
    return _png(fig)


def _smooth(values: np.ndarray) -> np.ndarray:
    """A centred running mean over ~2% of the steps (at least 1), ignoring NaN."""
    window = max(1, len(values) // 50)
    if window == 1:
        return values
    kernel = np.ones(window)
    finite = np.isfinite(values)
    total = np.convolve(np.where(finite, values, 0.0), kernel, mode="same")
    count = np.convolve(finite.astype(np.float64), kernel, mode="same")
    return np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)


def _train_figure(curve: pl.DataFrame) -> bytes:
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    if curve.height == 0:
        _empty(left, "no training steps recorded")
        _empty(right, "no training steps recorded")
    else:
        step = curve["step"].cast(pl.Float64).to_numpy()
        series = [("loss", "total loss"), ("fvu", "FVU (mean over layers)"), ("auxk", "AuxK loss")]
        positive = []
        for (name, label), color in zip(series, ("tab:blue", "tab:orange", "tab:green")):
            if name not in curve.columns:
                continue
            values = curve[name].cast(pl.Float64).to_numpy()
            left.plot(step, values, color=color, alpha=0.25, linewidth=0.8)
            left.plot(step, _smooth(values), color=color, label=label)
            positive.append(values[np.isfinite(values)])
        finite = np.concatenate(positive) if positive else np.array([])
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
            left.set_yscale("log")
        left.set_xlabel("optimiser step")
        left.set_ylabel("loss (normalised space)")
        left.set_title("Training loss (faint: per step; solid: running mean)")
        left.legend(fontsize=8)
        dead = curve["dead_fraction"].cast(pl.Float64).to_numpy()
        right.plot(step, 100 * dead, color="tab:red")
        right.set_ylim(0, max(5.0, 110 * float(np.nanmax(dead)) if np.isfinite(dead).any() else 5.0))
        right.set_xlabel("optimiser step")
        right.set_ylabel("dead latents (%)")
        right.set_title("Dead latents")
        for ax in (left, right):
            ax.grid(alpha=0.3)
    return _png(fig)


def _lens_figure(frame: pl.DataFrame, lens: str) -> bytes:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(frame["layer"].to_list(), frame["kl_logit_lens"].to_list(), marker="o", label="logit lens")
    ax.plot(frame["layer"].to_list(), frame["kl_tuned_lens"].to_list(), marker="s", label=f"tuned lens ({lens})")
    ax.set_xlabel("block")
    ax.set_ylabel("KL(final ‖ lens prediction), nats per token")
    ax.set_title("Lens quality by layer")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _check_tokens(tokens: np.ndarray, context: np.ndarray, position: np.ndarray) -> None:
    if not (tokens.ndim == context.ndim == position.ndim == 1) or not (len(tokens) == len(context) == len(position)):
        raise MlsaeError(
            f"report: tokens, context and position must be 1-D arrays of one length, got shapes "
            f"{tokens.shape}, {context.shape}, {position.shape}"
        )


def build_report(
    metrics_dir: str | os.PathLike[str],
    plots_dir: str | os.PathLike[str],
    analysis_dir: str | os.PathLike[str],
    sae_config_path: str | os.PathLike[str],
    tables_dir: str | os.PathLike[str],
    figures_dir: str | os.PathLike[str],
    tokens: np.ndarray,
    context: np.ndarray,
    position: np.ndarray,
    decode: Callable[[list[int]], str],
    top_latents: int = 20,
    *,
    contexts_per_latent: int = 3,
    min_count: int = 10,
    max_heatmap_rows: int = 2000,
) -> dict[str, Any]:
    """Write the run's tables, figures and plot CSVs; return what was written and the summary.

    Args:
        metrics_dir: holds ``extract.json``, ``lens.json``, ``train.json``, ``eval.json``,
            ``analysis.json`` (``reports/metrics``).
        plots_dir: holds the training curve ``train.csv``; the plot CSVs are written here
            (``reports/plots``).
        analysis_dir: the aggregate stage's parquet files (``data/analysis``); ``latents``,
            ``layers`` and ``top_tokens`` are read, ``token_latent`` is not.
        sae_config_path: the SAE's ``config.json`` (model, d_model, n_latents, k, layers, lens).
        tables_dir: Markdown + CSV tables go here (``reports/tables``).
        figures_dir: PNG figures go here.
        tokens: eval token ids, indexed by global eval token index (``top_tokens.token``).
        context: context id of each eval token.
        position: position of each eval token within its context.
        decode: token ids -> text (the model's tokenizer).
        top_latents: latents in the ``top_latents`` table.
        contexts_per_latent: max-activating contexts shown per latent (at most what the aggregate
            stage kept, ``analysis.top_tokens``).
        min_count: latents active at fewer tokens are left out of the heatmap and histograms (use
            ``analysis.min_count``, as for ``var_aggregate``).
        max_heatmap_rows: the heatmap shows at most this many latents, evenly spaced in mu_f order.

    Returns:
        ``summary`` (the :func:`summary_row` dict), ``text`` (:func:`summary_text`), ``tables``,
        ``figures`` and ``plots`` (lists of written paths), and ``skipped`` (output file name ->
        reason for each optional output not written: the lens figure when ``lens`` is
        ``none``; a stale copy from an earlier run is removed, and the lens CSV has no rows).

    Raises:
        MlsaeError: a missing or malformed input, naming the file. Nothing is written then.
    """
    for name, value in (("top_latents", top_latents), ("contexts_per_latent", contexts_per_latent), ("min_count", min_count)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MlsaeError(f"report: {name} must be an integer >= 0, got {value!r}")
    if isinstance(max_heatmap_rows, bool) or not isinstance(max_heatmap_rows, int) or max_heatmap_rows < 1:
        raise MlsaeError(f"report: max_heatmap_rows must be an integer >= 1, got {max_heatmap_rows!r}")
    tokens, context, position = np.asarray(tokens), np.asarray(context), np.asarray(position)
    _check_tokens(tokens, context, position)
    plots_dir, tables_dir, figures_dir = Path(plots_dir), Path(tables_dir), Path(figures_dir)
    inp = _load_inputs(Path(metrics_dir), plots_dir, Path(analysis_dir), Path(sae_config_path))

    # Everything is rendered in memory first, so a bad input leaves no partial report.
    summary = summary_row(
        {"extract": inp.extract, "lens": inp.lens, "train": inp.train, "eval": inp.eval, "analysis": inp.analysis},
        inp.config,
    )
    layers = _layers_table(inp)
    top = _top_latents_table(inp, tokens, context, position, decode, top_latents, contexts_per_latent)
    mean_hist, std_hist = _histograms(inp, min_count)
    adjacent = [_number(v) for v in inp.extract.get("adjacent_cos_by_layer") or []]

    tables: dict[Path, str] = {
        tables_dir / f"{SUMMARY_TABLE}.md": _summary_markdown(summary),
        tables_dir / f"{SUMMARY_TABLE}.csv": _csv(pl.DataFrame([summary], strict=False)),
        tables_dir / f"{LAYERS_TABLE}.md": "# Per-layer summary\n\n" + markdown_table(layers),
        tables_dir / f"{LAYERS_TABLE}.csv": _csv(layers),
        tables_dir / f"{TOP_LATENTS_TABLE}.md": top.markdown,
        tables_dir / f"{TOP_LATENTS_TABLE}.csv": _csv(top.csv),
    }
    plots: dict[Path, str] = {
        plots_dir / MEAN_HIST_PLOT: _csv(mean_hist.frame("mean_layer")),
        plots_dir / STD_HIST_PLOT: _csv(std_hist.frame("std_layer")),
        plots_dir / LAYER_ACTIVITY_PLOT: _csv(layers.select("block", "n_latents_active", "n_entries", "mass_share")),
        plots_dir / ADJ_COS_PLOT.name: _csv(
            pl.DataFrame({"layer": list(range(len(adjacent))), "adjacent_cos": adjacent}, schema={"layer": pl.Int64, "adjacent_cos": pl.Float64})
        ),
    }
    images: dict[Path, bytes] = {
        figures_dir / HEATMAP_FIG: _heatmap(inp, min_count, max_heatmap_rows),
        figures_dir / LATENT_HIST_FIG: _histogram_figure(inp, mean_hist, std_hist, min_count),
        figures_dir / EVAL_BY_LAYER_FIG: _eval_figure(layers),
        figures_dir / ADJ_COS_FIG: _adjacent_figure(adjacent),
        figures_dir / TRAIN_FIG: _train_figure(inp.train_curve),
    }
    skipped: dict[str, str] = {}
    lens_figure = figures_dir / LENS_FIG
    if inp.lens_by_layer is not None:
        plots[plots_dir / LENS_PLOT.name] = _csv(inp.lens_by_layer)
        images[lens_figure] = _lens_figure(inp.lens_by_layer, str(inp.lens["lens"]))
    else:
        plots[plots_dir / LENS_PLOT.name] = _csv(pl.DataFrame(schema=LENS_BY_LAYER_SCHEMA))
        skipped = {LENS_FIG: "lens is none: no lens KL to plot"}

    for path, text in [*tables.items(), *plots.items()]:
        write_text(path, text)
    for path, data in images.items():
        write_bytes(path, data)
    if skipped:
        lens_figure.unlink(missing_ok=True)
    return {
        "summary": summary,
        "text": summary_text(summary),
        "tables": [str(p) for p in tables],
        "figures": [str(p) for p in images],
        "plots": [str(p) for p in plots],
        "skipped": skipped,
    }
