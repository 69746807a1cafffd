"""The report stage's library: human-readable tables and figures from the earlier stages' outputs.

Package layout: ``inputs`` (read and cross-check every input), ``summary`` (the run-summary row
and its text), ``markdown`` (tables, token contexts), ``figures`` (PNGs); this module holds the
output names and :func:`build_report`, which ties them together.

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

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mlsae.core import paths as C
from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_bytes, write_text
from mlsae.core.params import is_int
from mlsae.core.paths import ADJ_COS_PLOT, LENS_PLOT
from mlsae.report.figures import (
    _adjacent_figure,
    _eval_figure,
    _heatmap,
    _histogram_figure,
    _histograms,
    _lens_figure,
    _train_figure,
)
from mlsae.report.inputs import LENS_BY_LAYER_SCHEMA, _load_inputs
from mlsae.report.markdown import (
    _csv,
    _layers_table,
    _summary_markdown,
    _top_latents_table,
    layer_sparkline,
    markdown_table,
    token_context,
)
from mlsae.report.summary import (
    SUMMARY_COLUMNS,
    _number,
    format_layers,
    format_value,
    render_summary,
    summary_row,
    summary_text,
    variance_verdict,
)

__all__ = [
    "FIGURES",
    "PLOTS",
    "SUMMARY_COLUMNS",
    "TABLES",
    "build_report",
    "format_layers",
    "format_value",
    "layer_sparkline",
    "markdown_table",
    "render_summary",
    "summary_row",
    "summary_text",
    "token_context",
    "variance_verdict",
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
    for name, value in (
        ("top_latents", top_latents),
        ("contexts_per_latent", contexts_per_latent),
        ("min_count", min_count),
    ):
        if not is_int(value) or value < 0:
            raise MlsaeError(f"report: {name} must be an integer >= 0, got {value!r}")
    if not is_int(max_heatmap_rows) or max_heatmap_rows < 1:
        raise MlsaeError(f"report: max_heatmap_rows must be an integer >= 1, got {max_heatmap_rows!r}")
    tokens, context, position = np.asarray(tokens), np.asarray(context), np.asarray(position)
    _check_tokens(tokens, context, position)
    plots_dir, tables_dir, figures_dir = Path(plots_dir), Path(tables_dir), Path(figures_dir)
    inp = _load_inputs(Path(metrics_dir), plots_dir, Path(analysis_dir), Path(sae_config_path))

    # Everything is rendered in memory first, so a bad input leaves no partial report.
    summary = summary_row(
        {
            "extract": inp.extract,
            "lens": inp.lens,
            "train": inp.train,
            "eval": inp.eval,
            "baseline": inp.baseline,
            "analysis": inp.analysis,
        },
        inp.config,
    )
    layers = _layers_table(inp)
    top = _top_latents_table(inp, tokens, context, position, decode, top_latents, contexts_per_latent)
    mean_hist, std_hist = _histograms(inp, min_count)
    adjacent = [_number(v) for v in inp.extract.adjacent_cos_by_layer or []]

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
            pl.DataFrame(
                {"layer": list(range(len(adjacent))), "adjacent_cos": adjacent},
                schema={"layer": pl.Int64, "adjacent_cos": pl.Float64},
            )
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
        images[lens_figure] = _lens_figure(inp.lens_by_layer, str(inp.lens.lens))
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
