"""Comparing models: one column per model, one row per figure, each model's training seeds
summarised, and the paper's figure of multi-layer activity against adjacent-layer cosine similarity.

A run is a directory holding a pipeline run's ``metrics/`` (``extract.json``, ``eval.json``,
``analysis.json``, as the stages write them) and ``tables/summary.csv`` (for the model's name), and
optionally ``params.yaml`` (for ``train.seed``; for a workspace's ``reports/``, the workspace's own): ``reports/`` of any workspace, or a copy kept under
``reports/models/<name>/``. ``dvc exp show`` drops list-valued metrics, so the figures are read from
the files themselves. For a figure ``k`` the files hold ``k`` (the value, bias-corrected by the
jackknife over eval documents), ``k_se`` and ``k_ci = [lo, hi]`` (the 95 % t interval around the
value; :mod:`mlsae.stats.estimate`, docs/statistics.md); figures without a valid interval
(``adjacent_cos``, ``*_any_docs``, ...) have no ``k_ci`` and are shown without one.

Runs are grouped by model name (first appearance first); the runs of one model are its training
seeds. For a group of runs ``s = 1 .. S`` and a figure with values ``k_s``:

    shown      = k_1 with its interval          (the first run given)
    seed_mean  = (1/S) sum_s k_s
    seed_sd    = sqrt(sum_s (k_s - seed_mean)^2 / (S - 1))      (S >= 2; none for one run)

(``S`` counts the runs holding the figure; extract's figures do not depend on ``train.seed``, so
the Markdown shows their seed summary only where the runs disagree.) Depth normalisation, with
``L`` the SAE's number of layers (``n_layers`` of ``analysis.json``, else of ``extract.json``):

    effective_layers_depth = (effective_layers - 1) / (L - 1)

with interval and SE the same affine image of ``effective_layers``'s (the jackknife's bias
correction commutes with an affine map, so this is also the bias-corrected value); undefined for
``L = 1``. An ``effective_layers_depth`` already in ``analysis.json`` is taken as it is.

Outputs: Markdown (``reports/compare/models.md`` by default: a ``runs`` row, then one row per
figure of :data:`FIGURES`, cells ``value (lo–hi); seeds mean ± sd, n=S``), the CSV beside it in long
form (one row per model and figure: :data:`CSV_COLUMNS`) and the PNG figure (multi-layer fraction,
effective layers and their depth normalisation against ``adjacent_cos``; error bars the first
run's interval, small markers the other seeds' values). Every run is read and checked, and the
figure rendered, before the first file is written; each file is written atomically.

Why: models of different families are not a size series, so the comparison is a table of
like-for-like figures rather than a trend. ``effective_layers`` is 1 for a firing at one layer and
``L`` for one spread evenly over all layers, so ``effective_layers / L`` has a floor of ``1/L``
that makes a shallow model look more multi-layer; ``(eff - 1)/(L - 1)`` runs from 0 to 1 for every
depth. The document interval of one run says nothing about how much a figure moves with the SAE's
training seed, hence the seed summary beside it.

Run as ``mlsae compare --run reports --run reports/models/gemma3-270m [--run seed1/reports ...]``.
"""

from __future__ import annotations

import io
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from mlsae.core.errors import MlsaeError
from mlsae.core.io import read_json, write_bytes, write_text
from mlsae.report import markdown_table

MODELS_TABLE = Path("reports/compare/models.md")
"""Default output; the CSV and the figure (``models.csv``, ``models.png``) go beside it."""

DEPTH = "effective_layers_depth"

FIGURES: dict[str, tuple[str, bool]] = {
    # key -> (the metrics file holding it, required); rows of the table in this order
    "n_layers": ("extract", True),
    "d_model": ("extract", True),
    "adjacent_cos": ("extract", True),
    "fvu": ("eval", True),
    "delta_ce": ("eval", True),
    "loss_recovered": ("eval", False),
    "dead_fraction": ("eval", True),
    "within_share": ("analysis", True),
    "within_share_mass": ("analysis", True),
    "within_share_peak": ("analysis", False),
    "var_ratio_paper": ("analysis", True),
    "effective_layers": ("analysis", True),
    DEPTH: ("analysis", False),  # derived from effective_layers when the file lacks it
    "multi_layer_fraction": ("analysis", True),
    "n_latents_counted": ("analysis", False),
    "eval_documents": ("extract", False),
}

STAGES = ("extract", "eval", "analysis")

CSV_COLUMNS = ("model", "figure", "value", "lo", "hi", "se", "seed_mean", "seed_sd", "seed_n", "runs")


@dataclass(frozen=True)
class Estimate:
    """One figure of one run: its value, its interval and standard error where the file has them."""

    value: float
    ci: tuple[float, float] | None = None
    se: float | None = None


@dataclass
class Run:
    """One finished run: its model, directory, training seed (None if unknown) and figures."""

    model: str
    path: Path
    seed: int | None
    figures: dict[str, Estimate]


@dataclass
class Group:
    """The runs of one model (its training seeds), first run first."""

    model: str
    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    def values(self, key: str) -> list[float]:
        """The figure's value in each run that has it."""
        return [r.figures[key].value for r in self.runs if key in r.figures]

    def seed_stats(self, key: str) -> tuple[float | None, float | None, int]:
        """Mean, SD (``n - 1`` denominator; None for fewer than two runs) and number of runs."""
        values = self.values(key)
        if not values:
            return None, None, 0
        sd = statistics.stdev(values) if len(values) >= 2 else None
        return statistics.fmean(values), sd, len(values)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _interval(value: Any) -> tuple[float, float] | None:
    if not isinstance(value, list) or len(value) != 2:
        return None
    lo, hi = _number(value[0]), _number(value[1])
    return None if lo is None or hi is None else (lo, hi)


def _estimate(data: dict[str, Any], key: str) -> Estimate | None:
    value = _number(data.get(key))
    if value is None:
        return None
    return Estimate(value, _interval(data.get(f"{key}_ci")), _number(data.get(f"{key}_se")))


def depth_normalised(effective_layers: Estimate, n_layers: float) -> Estimate | None:
    """``(effective_layers - 1) / (L - 1)`` with its interval and SE mapped the same way; None for
    ``L < 2``."""
    if n_layers < 2:
        return None
    scale = n_layers - 1
    ci = effective_layers.ci
    return Estimate(
        (effective_layers.value - 1) / scale,
        None if ci is None else ((ci[0] - 1) / scale, (ci[1] - 1) / scale),
        None if effective_layers.se is None else effective_layers.se / scale,
    )


def _train_seed(path: Path) -> int | None:
    """``train.seed`` of the run's ``params.yaml``; None when the file or the key is absent."""
    if not path.is_file():
        return None
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MlsaeError(f"{path}: not valid YAML ({' '.join(str(e).split())[:160]})") from None
    train = params.get("train") if isinstance(params, dict) else None
    seed = train.get("seed") if isinstance(train, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read one run directory; a missing file or required key fails naming it."""
    root = Path(path)
    summary = root / "tables" / "summary.csv"
    if not summary.is_file():
        raise MlsaeError(f"{summary}: not found (a run directory holds metrics/ and tables/summary.csv)")
    try:
        model = str(pl.read_csv(summary)["model"][0])
    except Exception as e:  # polars' own error types for a file that is not the summary table
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        raise MlsaeError(f"{summary}: not a summary table with a 'model' column ({reason})") from None
    files: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        data = read_json(root / "metrics" / f"{stage}.json")
        if not isinstance(data, dict):
            raise MlsaeError(f"{root / 'metrics' / (stage + '.json')}: expected a JSON object of metrics")
        files[stage] = data
    figures: dict[str, Estimate] = {}
    for key, (stage, required) in FIGURES.items():
        found = _estimate(files[stage], key)
        if found is not None:
            figures[key] = found
        elif required:
            raise MlsaeError(f"{root / 'metrics' / (stage + '.json')}: no number under {key!r}")
    if DEPTH not in figures:
        sae_layers = _number(files["analysis"].get("n_layers"))
        n_layers = figures["n_layers"].value if sae_layers is None else sae_layers
        depth = depth_normalised(figures["effective_layers"], n_layers)
        if depth is not None:
            figures[DEPTH] = depth
    params = root / "params.yaml"
    if not params.is_file() and root.name == "reports":  # a workspace's own reports/: the workspace's params
        params = root.parent / "params.yaml"
    return Run(model, root, _train_seed(params), figures)


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs grouped by model name, groups and runs in the order given."""
    groups: dict[str, Group] = {}
    for run in runs:
        groups.setdefault(run.model, Group(run.model, [])).runs.append(run)
    return list(groups.values())


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _format(value: float, digits: int) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.{digits}g}"


def cell(group: Group, key: str) -> str:
    """One Markdown cell: the first run's value (interval), then the seeds' summary where it says
    something (module docstring)."""
    first = group.first.figures.get(key)
    text = "-" if first is None else _format(first.value, 4)
    if first is not None and first.ci is not None:
        text += f" ({first.ci[0]:.3g}–{first.ci[1]:.3g})"
    mean, sd, n = group.seed_stats(key)
    if mean is None or sd is None or (FIGURES[key][0] == "extract" and len(set(group.values(key))) == 1):
        return text
    return f"{text}; seeds {_format(mean, 4)} ± {sd:.2g}, n={n}"


def _runs_cell(group: Group) -> str:
    seeds = ", ".join("?" if r.seed is None else str(r.seed) for r in group.runs)
    return f"{len(group.runs)} (train.seed {seeds})"


def wide_table(groups: list[Group]) -> pl.DataFrame:
    """The Markdown table: a ``runs`` row, then one row per figure of :data:`FIGURES` that some
    run has; one column per model."""
    keys = [k for k in FIGURES if any(k in r.figures for g in groups for r in g.runs)]
    columns: dict[str, list[str]] = {"figure": ["runs", *keys]}
    for group in groups:
        columns[group.model] = [_runs_cell(group), *(cell(group, k) for k in keys)]
    return pl.DataFrame(columns)


def long_table(groups: list[Group]) -> pl.DataFrame:
    """The CSV: one row per model and figure (:data:`CSV_COLUMNS`); ``runs`` the group's run
    directories, ``;``-separated."""
    rows: list[dict[str, Any]] = []
    for group in groups:
        runs = "; ".join(str(r.path) for r in group.runs)
        for key in FIGURES:
            mean, sd, n = group.seed_stats(key)
            if n == 0:
                continue
            first = group.first.figures.get(key)
            ci = None if first is None else first.ci
            rows.append(
                {
                    "model": group.model,
                    "figure": key,
                    "value": None if first is None else first.value,
                    "lo": None if ci is None else ci[0],
                    "hi": None if ci is None else ci[1],
                    "se": None if first is None else first.se,
                    "seed_mean": mean,
                    "seed_sd": sd,
                    "seed_n": n,
                    "runs": runs,
                }
            )
    schema: dict[str, type[pl.DataType]] = {
        c: pl.String if c in ("model", "figure", "runs") else pl.Int64 if c == "seed_n" else pl.Float64
        for c in CSV_COLUMNS
    }
    return pl.DataFrame(rows, schema=schema)


# --------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------

PANELS = (
    ("multi_layer_fraction", "multi-layer fraction (2nd layer ≥ θ)"),
    ("effective_layers", "effective layers per active pair"),
    (DEPTH, "(effective layers − 1) / (L − 1)"),
)


def model_figure(groups: list[Group]) -> bytes:
    """The PNG: each panel a figure of :data:`PANELS` against ``adjacent_cos``, one point per model
    (its first run, with its interval) and a small marker per further seed run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8), constrained_layout=True)
    axes = fig.subplots(1, len(PANELS))
    for ax, (key, label) in zip(axes, PANELS):
        for i, group in enumerate(groups):
            color = f"C{i}"
            first = group.first.figures.get(key)
            if first is not None:
                x = group.first.figures["adjacent_cos"].value
                layers = int(group.first.figures["n_layers"].value)
                runs = f"{len(group.runs)} run{'s' * (len(group.runs) > 1)}"
                ax.plot([x], [first.value], "o", color=color, label=f"{group.model} ({layers} layers, {runs})")
                if first.ci is not None:  # drawn as it is: an older file's interval may exclude the value
                    ax.plot([x, x], list(first.ci), "-", color=color)
                    ax.plot([x, x], list(first.ci), "_", color=color, markersize=8)
                ax.annotate(group.model, (x, first.value), textcoords="offset points", xytext=(6, 4), fontsize=8)
            others = [r for r in group.runs[1:] if key in r.figures]
            if others:
                ax.plot(
                    [r.figures["adjacent_cos"].value for r in others],
                    [r.figures[key].value for r in others],
                    linestyle="none",
                    marker=".",
                    markersize=5,
                    color=color,
                    alpha=0.7,
                )
        ax.set_xlabel("mean adjacent-layer cosine similarity")
        ax.set_ylabel(label)
        ax.margins(x=0.3, y=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(
        "Multi-layer activity against adjacent-layer similarity (first run: 95 % document-jackknife "
        "interval; dots: further training seeds)",
        fontsize=9,
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    return buffer.getvalue()


def compare_models(run_dirs: list[str | os.PathLike[str]], out: str | os.PathLike[str] = MODELS_TABLE) -> pl.DataFrame:
    """Write the model table (Markdown at `out`, the long CSV and the PNG figure beside it) and
    return the Markdown's table. Nothing is written unless every run reads.

    Raises:
        MlsaeError: fewer than two runs, the same directory twice, or a run missing a file or a
            required figure (naming the file and key).
    """
    if len(run_dirs) < 2:
        raise MlsaeError(f"--run: give at least two run directories to compare (got {len(run_dirs)})")
    seen: dict[Path, str] = {}
    for d in run_dirs:
        resolved = Path(d).resolve()
        if resolved in seen:
            raise MlsaeError(f"--run {d}: the same directory as --run {seen[resolved]}")
        seen[resolved] = str(d)
    groups = group_runs([load_run(d) for d in run_dirs])
    table = wide_table(groups)
    long = long_table(groups)
    png = model_figure(groups)
    out = Path(out)
    sources = ", ".join(f"`{r.path}`" for g in groups for r in g.runs)
    intro = (
        "# Models\n\n"
        f"One column per model, from {len(run_dirs)} runs ({sources}); runs of the same model are its "
        "training seeds. Each cell is the first run's value with its 95 % document-jackknife interval "
        "(values bias-corrected; docs/statistics.md), then, for two or more runs, the seeds' mean ± SD "
        "and their number. `effective_layers_depth` = (effective_layers − 1) / (L − 1), L the SAE's "
        "layers: 0 for firings at one layer, 1 for firings spread evenly over all (effective_layers / L "
        "would have a floor of 1/L, favouring shallow models); models of different families are not a "
        "size series.\n\n"
    )
    write_text(out, intro + markdown_table(table))
    write_text(out.with_suffix(".csv"), long.write_csv())
    write_bytes(out.with_suffix(".png"), png)
    return table
