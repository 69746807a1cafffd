"""Comparing models: one row per finished run, and the paper's figure of multi-layer activity
against adjacent-layer cosine similarity.

A run is a directory holding a pipeline run's ``metrics/`` (``extract.json``, ``eval.json``,
``analysis.json``, as the stages write them, intervals included) and ``tables/summary.csv`` (for
the model's name): ``reports/`` of any workspace, or a copy kept under ``reports/models/<name>/``.
``dvc exp show`` drops list-valued metrics, so the intervals are read from the files themselves.

Depth differs between models, so the table gives the depth-free figures beside the raw ones:
``effective_layers`` (the perplexity of a firing's layer distribution, 1 for a single layer, does
not grow with depth by construction) also divided by the number of layers, ``var_total_norm`` and
``var_within_norm`` (layer variances over ``(L-1)^2``), and ``within_share`` (a ratio). Each point
of the figure is one model with its 95 % context-bootstrap interval on the vertical axis
(extract computes ``adjacent_cos`` without an interval).

Run as ``mlsae compare --run reports --run reports/models/gemma3-270m``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from mlsae.core.errors import MlsaeError
from mlsae.core.io import atomic_file, read_json, write_text
from mlsae.report import markdown_table

MODELS_TABLE = Path("reports/compare/models.md")
"""Default output; the CSV and the figure (``models.csv``, ``models.png``) go beside it."""

FIGURES: dict[str, str] = {
    # key -> the metrics file holding it; a key with a `<key>_ci` list gets its interval shown
    **dict.fromkeys(("n_layers", "d_model", "adjacent_cos"), "extract"),
    **dict.fromkeys(("fvu", "delta_ce", "dead_fraction"), "eval"),
    **dict.fromkeys(
        (
            "within_share",
            "within_share_mass",
            "var_within_norm",
            "var_total_norm",
            "effective_layers",
            "multi_layer_fraction",
            "var_ratio_paper",
        ),
        "analysis",
    ),
}


@dataclass
class Run:
    """One model's finished run."""

    model: str
    path: Path
    values: dict[str, float]
    intervals: dict[str, tuple[float, float]]

    @property
    def depth_normalised_layers(self) -> tuple[float, tuple[float, float] | None]:
        """effective_layers / n_layers and its interval (the divisor is exact)."""
        n = self.values["n_layers"]
        ci = self.intervals.get("effective_layers")
        return self.values["effective_layers"] / n, (ci[0] / n, ci[1] / n) if ci else None


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read one run directory; a missing file or key fails naming it."""
    root = Path(path)
    summary = root / "tables" / "summary.csv"
    if not summary.is_file():
        raise MlsaeError(f"{summary}: not found (a run directory holds metrics/ and tables/summary.csv)")
    try:
        model = str(pl.read_csv(summary)["model"][0])
    except Exception as e:  # polars' own error types for a file that is not the summary table
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        raise MlsaeError(f"{summary}: not a summary table with a 'model' column ({reason})") from None
    files = {stage: read_json(root / "metrics" / f"{stage}.json") for stage in set(FIGURES.values())}
    for stage, data in files.items():
        if not isinstance(data, dict):
            raise MlsaeError(f"{root / 'metrics' / (stage + '.json')}: expected a JSON object of metrics")
    values: dict[str, float] = {}
    intervals: dict[str, tuple[float, float]] = {}
    for key, stage in FIGURES.items():
        data = files[stage]
        if not isinstance(data.get(key), (int, float)):
            raise MlsaeError(f"{root / 'metrics' / (stage + '.json')}: no number under {key!r}")
        values[key] = float(data[key])
        ci = data.get(f"{key}_ci")
        if isinstance(ci, list) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
            intervals[key] = (float(ci[0]), float(ci[1]))
    return Run(model, root, values, intervals)


def _cell(value: float, ci: tuple[float, float] | None) -> str:
    text = f"{value:.4g}"
    return f"{text} ({ci[0]:.3g}–{ci[1]:.3g})" if ci else text


def model_table(runs: list[Run]) -> pl.DataFrame:
    """One row per run: every figure in FIGURES (with its interval where it has one) and the
    depth-normalised effective layers."""
    rows = []
    for run in runs:
        row: dict[str, str] = {"model": run.model}
        for column in FIGURES:
            value = run.values[column]
            row[column] = (
                str(int(value)) if column in ("n_layers", "d_model") else _cell(value, run.intervals.get(column))
            )
        normed, ci = run.depth_normalised_layers
        row["effective_layers / n_layers"] = _cell(normed, ci)
        rows.append(row)
    return pl.DataFrame(rows)


def model_figure(runs: list[Run], path: Path) -> None:
    """Multi-layer activity against adjacent-layer cosine similarity, one point per model with its
    95 % interval: the multi-layer fraction, the effective layers, and the effective layers per
    layer of depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    panels = (
        (
            "multi_layer_fraction",
            "multi-layer fraction (2nd layer ≥ θ)",
            lambda r: (r.values["multi_layer_fraction"], r.intervals.get("multi_layer_fraction")),
        ),
        (
            "effective_layers",
            "effective layers per active pair",
            lambda r: (r.values["effective_layers"], r.intervals.get("effective_layers")),
        ),
        ("effective_layers / n_layers", "effective layers / number of layers", lambda r: r.depth_normalised_layers),
    )
    for ax, (_, label, get) in zip(axes, panels):
        for i, run in enumerate(runs):
            value, ci = get(run)
            err = [[value - ci[0]], [ci[1] - value]] if ci else None
            x = run.values["adjacent_cos"]
            ax.errorbar(
                [x],
                [value],
                yerr=err,
                fmt="o",
                color=f"C{i}",
                capsize=4,
                label=f"{run.model} ({int(run.values['n_layers'])} layers)",
            )
            ax.annotate(run.model, (x, value), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xlabel("mean adjacent-layer cosine similarity")
        ax.set_ylabel(label)
        ax.margins(x=0.3, y=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(
        "Multi-layer activity against adjacent-layer similarity (95 % context-bootstrap intervals)", fontsize=9
    )
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def compare_models(run_dirs: list[str | os.PathLike[str]], out: str | os.PathLike[str] = MODELS_TABLE) -> pl.DataFrame:
    """Write the model table (Markdown at `out`, CSV and PNG figure beside it) and return it."""
    if len(run_dirs) < 2:
        raise MlsaeError(f"--run: give at least two run directories to compare (got {len(run_dirs)})")
    runs = [load_run(d) for d in run_dirs]
    table = model_table(runs)
    out = Path(out)
    sources = ", ".join(f"`{r.path}`" for r in runs)
    intro = (
        "# Models\n\n"
        f"One row per run ({sources}). Intervals are 95 % context-bootstrap intervals; definitions "
        "in docs/statistics.md. `var_*_norm` and `effective_layers / n_layers` are depth-normalised; "
        "models of different families are not a size series.\n\n"
    )
    write_text(out, intro + markdown_table(table))
    write_text(out.with_suffix(".csv"), table.write_csv())
    model_figure(runs, out.with_suffix(".png"))
    return table
