"""The experiments table: one row per DVC experiment, its key params and its summary metrics.

:func:`compare` takes the rows of :func:`dvc.api.exp_show` (the workspace, the baseline commit(s)
and their experiments, each a flat mapping) and writes a Markdown table with a CSV beside it. In a
row, a param or metric is keyed by its name, prefixed by its file (``params.yaml:`` or
``reports/metrics/eval.json:``) only where two files share that name; a bare name is a param when
it is a params.yaml leaf (``sae.k``), else a metric of whichever metrics file holds it. Metrics
files are recognised by file name (``extract.json`` ... ``analysis.json``); list-valued metrics
(intervals) do not appear in these rows. A queued, running or failed experiment shows its params
but no metrics.

The table goes to ``reports/compare/`` by default: outside every stage's outputs (a file in
``reports/tables/`` would make DVC see the report stage changed and delete it on the next run), and
``--out`` may not point into them either. Rows read from a file (``--json-file``, a JSON list of
such mappings) that are not in that form are one line naming the file.

Run as ``mlsae compare [--out reports/compare/experiments.md] [--json-file rows.json]``; ``mlsae
seeds`` (:mod:`mlsae.compare.seeds`) summarises experiments that differ only in ``train.seed``.
"""

from __future__ import annotations

import ast
import json
import os
from collections import ChainMap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import typer
from pydantic import BaseModel

from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_text
from mlsae.core.params import Params
from mlsae.core.paths import METRICS_DIR, REPORTS, inside_outputs
from mlsae.report import SUMMARY_COLUMNS, format_layers, markdown_table, summary_row

__all__ = [
    "EXPERIMENTS_TABLE",
    "Experiment",
    "compare",
    "exp_show_rows",
    "experiment_rows",
    "experiments_from_rows",
    "main",
    "read_rows",
]

EXPERIMENTS_TABLE = REPORTS / "compare" / "experiments.md"
"""Default output, outside every stage's outputs; the CSV goes beside it (``experiments.csv``)."""

PARAM_COLUMNS = ("model", "lens", "sae.layers", "sae.k", "sae.expansion", "train.seed")
"""Params always shown; any other param whose value differs between rows is added after them."""

_STATES = {None: "done", "Success": "done", "Queued": "queued", "Running": "running", "Failed": "failed"}
_NO_METRICS = {"queued", "running", "failed"}


def _param_leaves(model: type[BaseModel] = Params, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            out |= _param_leaves(ann, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


PARAM_LEAVES = _param_leaves()


@dataclass
class Experiment:
    """One row of the table: the workspace, a baseline commit or an experiment."""

    name: str
    rev: str
    baseline: str
    status: str  # workspace | baseline | done | queued | running | failed
    params: dict[str, Any]
    metrics: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _value(value: Any) -> Any:
    """A value as dvc.api.exp_show gives it, back to its type: it renders None, booleans and lists
    as Python text ("None", "True", "['mean']")."""
    if not isinstance(value, str):
        return value
    if value in ("None", "True", "False") or value[:1] in "[{":
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _experiment(row: Mapping[str, Any], baseline: str) -> Experiment:
    rev = str(row.get("rev") or "")
    typ = row.get("typ")
    state = row.get("State")
    if rev == "workspace":
        status = "workspace"
    elif typ == "baseline":  # experiments are "branch_commit" / "branch_base" (their place in DVC's tree)
        status = "baseline"
    else:
        status = _STATES.get(state, str(state).lower())
    params: dict[str, Any] = {}
    by_stage: dict[str, dict[str, Any]] = {}
    shared: dict[str, Any] = {}  # metrics no two files share: DVC shows them without a file prefix
    for key, value in row.items():
        if key in ("Experiment", "rev", "typ", "Created", "parent", "State", "Executor"):
            continue
        value = _value(value)
        file, sep, name = key.rpartition(":")
        if not sep:  # a bare name: a params.yaml leaf, a dependency's path (skipped) or a metric
            if key in PARAM_LEAVES:
                params[key] = value
            elif "/" not in key:
                shared[key] = value
        elif Path(file).name == "params.yaml":
            params[name] = value
        elif Path(file).parent.as_posix().endswith(METRICS_DIR.as_posix()) or file.endswith(".json"):
            by_stage.setdefault(Path(file).stem, {})[name] = value
    metrics: dict[str, Mapping[str, Any]] = {}
    if status not in _NO_METRICS and (by_stage or shared):
        for stage in ("extract", "lens", "train", "baseline", "eval", "analysis"):
            metrics[stage] = ChainMap(by_stage.get(stage, {}), shared)
    notes = ["no metrics (failed)"] if status == "failed" else []
    name = row.get("Experiment") or (rev if rev == "workspace" else rev[:7])
    return Experiment(str(name), rev if rev == "workspace" else rev[:7], baseline, status, params, metrics, notes)


def experiments_from_rows(rows: Sequence[Mapping[str, Any]], source: str = "dvc.api.exp_show") -> list[Experiment]:
    """The experiments of :func:`dvc.api.exp_show` rows, in its order (each experiment after its
    baseline).

    Raises:
        MlsaeError: the rows are not mappings holding a ``rev`` (naming `source`).
    """
    if not isinstance(rows, list) or not all(isinstance(r, Mapping) and "rev" in r for r in rows):
        raise MlsaeError(f"{source}: expected the rows of dvc.api.exp_show (a list of mappings with 'rev')")
    out: list[Experiment] = []
    baseline = ""
    for row in rows:
        if row.get("rev") != "workspace" and row.get("typ") == "baseline":
            baseline = str(row.get("Experiment") or str(row.get("rev"))[:7])
        out.append(_experiment(row, baseline))
    return out


def _param_value(key: str, value: Any) -> Any:
    """A param as a table cell: layer lists compact, other lists as JSON, scalars as they are."""
    if key == "sae.layers":
        return format_layers(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def _column(values: list[Any]) -> pl.Series:
    """Numbers stay numbers; a column mixing types becomes text (DVC params may differ in type)."""
    present = [v for v in values if v is not None]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        kind = pl.Int64 if all(isinstance(v, int) for v in present) else pl.Float64
        return pl.Series(values, dtype=kind)
    if all(isinstance(v, bool) for v in present):
        return pl.Series(values, dtype=pl.Boolean)
    return pl.Series([None if v is None else str(v) for v in values], dtype=pl.String)


def experiment_rows(experiments: Sequence[Experiment]) -> pl.DataFrame:
    """One row per experiment: identity, :data:`PARAM_COLUMNS` (+ other varying params), summary metrics.

    The metric columns are :data:`mlsae.report.SUMMARY_COLUMNS` minus those the params already
    give (model, lens, k, layers), computed by :func:`mlsae.report.summary_row` so that a run's
    ``summary.csv`` and this table agree.
    """
    others: list[str] = []
    for exp in experiments:
        for key in exp.params:
            if key not in PARAM_COLUMNS and key not in others:
                values = {json.dumps(e.params.get(key), sort_keys=True, default=str) for e in experiments}
                if len(values) > 1:
                    others.append(key)
    metric_keys = [k for k in SUMMARY_COLUMNS if k not in ("model", "lens", "k", "layers")]
    rows: list[dict[str, Any]] = []
    for exp in experiments:
        p = exp.params
        config = {
            "model": p.get("model"),
            "lens": p.get("lens"),
            "k": p.get("sae.k"),
            "layers": p.get("sae.layers"),
            "expansion": p.get("sae.expansion"),
        }
        summary = summary_row(exp.metrics, config) if exp.metrics else dict.fromkeys(metric_keys)
        row: dict[str, Any] = {"experiment": exp.name, "rev": exp.rev, "baseline": exp.baseline, "status": exp.status}
        row.update({key: _param_value(key, p.get(key)) for key in (*PARAM_COLUMNS, *others)})
        row.update({key: summary.get(key) for key in metric_keys})
        row["notes"] = "; ".join(exp.notes)
        rows.append(row)
    columns = ["experiment", "rev", "baseline", "status", *PARAM_COLUMNS, *others, *metric_keys, "notes"]
    return pl.DataFrame({c: _column([r[c] for r in rows]) for c in columns})


def exp_show_rows(repo_dir: str | os.PathLike[str], all_commits: bool) -> list[dict[str, Any]]:
    """The rows of :func:`dvc.api.exp_show` for the repository at `repo_dir`."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        return list(dvc.api.exp_show(repo=str(repo_dir), num=1_000_000 if all_commits else 1))
    except (DvcException, OSError) as exc:
        raise MlsaeError(f"dvc exp show: {' '.join(str(exc).split()) or type(exc).__name__}") from None


def compare(
    out_path: str | os.PathLike[str] = EXPERIMENTS_TABLE,
    rows: Sequence[Mapping[str, Any]] | None = None,
    *,
    repo_dir: str | os.PathLike[str] = ".",
    all_commits: bool = False,
    source: str = "dvc.api.exp_show",
) -> pl.DataFrame:
    """Write the experiments table (Markdown at ``out_path``, CSV beside it) and return it.

    Args:
        out_path: the Markdown file; the CSV is ``out_path`` with suffix ``.csv``.
        rows: rows as :func:`dvc.api.exp_show` returns them; ``None`` asks DVC in ``repo_dir``.
        repo_dir: the DVC repository (only when asking DVC).
        all_commits: every ancestor commit of HEAD and its experiments, not just HEAD's.

    Raises:
        MlsaeError: DVC failed or the rows are not in its form.
    """
    if rows is not None and not isinstance(rows, Sequence):
        raise MlsaeError(f"{source}: expected the rows of dvc.api.exp_show (a list of mappings with 'rev')")
    rows = list(rows) if rows is not None else exp_show_rows(repo_dir, all_commits)
    table = experiment_rows(experiments_from_rows(rows, source))
    out_path = Path(out_path)
    intro = (
        "# Experiments\n\n"
        "One row per `dvc exp show` entry: the workspace, the baseline commit(s) and their experiments. "
        "Queued, running and failed experiments have no metrics. "
        "See reports/tables/summary.md for what each metric means.\n\n"
    )
    write_text(out_path, intro + markdown_table(table))
    write_text(out_path.with_suffix(".csv"), table.write_csv())
    return table


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows saved as JSON (a list of dvc.api.exp_show mappings), or one line naming the file."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MlsaeError(f"{path}: not found") from None
    except UnicodeDecodeError as e:
        raise MlsaeError(f"{path}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise MlsaeError(f"{path}: not valid JSON ({e})") from None
    return rows


def main(
    out: Path | None = typer.Option(
        None, help="Output Markdown (default reports/compare/experiments.md, or reports/compare/models.md with --run)."
    ),
    json_file: Path | None = typer.Option(
        None, help="Read dvc.api.exp_show rows saved in this file (a JSON list) instead of asking DVC."
    ),
    all_commits: bool = typer.Option(False, help="Every commit's experiments, not only HEAD's."),
    run: list[Path] | None = typer.Option(
        None,
        "--run",
        help="A finished run's reports directory (metrics/, tables/summary.csv, optionally params.yaml); twice or "
        "more for the model table and figure (runs of one model are its training seeds).",
    ),
) -> None:
    """Write the experiments table from the DVC experiments, or with --run the model comparison
    (table, CSV and the figure of multi-layer activity against adjacent-layer cosine; several runs of
    one model are summarised over their training seeds)."""
    from mlsae.core.stage import stage

    with stage("compare"):
        if out is not None and inside_outputs(out) is not None:
            raise MlsaeError(
                f"--out {out}: is, lies inside or holds the pipeline output {inside_outputs(out)}, which DVC "
                f"owns (the next `dvc repro` would delete or flag it); write under reports/compare/ instead"
            )
        if run:
            from mlsae.compare.models import MODELS_TABLE, compare_models

            target = out or MODELS_TABLE
            models = compare_models(list(run), target)
            print(
                f"{target}: {models.width - 1} model{'s' * (models.width != 2)} from {len(run)} runs "
                f"(CSV, PNG: {target.with_suffix('.csv')}, {target.with_suffix('.png')})"
            )
            return
        out = out or EXPERIMENTS_TABLE
        rows = read_rows(json_file) if json_file is not None else None
        table = compare(out, rows, all_commits=all_commits, source=str(json_file or "dvc.api.exp_show"))
        print(f"{out}: {table.height} experiment rows (CSV: {out.with_suffix('.csv')})")


if __name__ == "__main__":
    typer.run(main)
