"""The experiments table: one row per DVC experiment, its key params and its summary metrics.

:func:`compare` runs ``dvc exp show --json`` (or parses text captured from it) and writes a
Markdown table with a CSV beside it. The JSON layout of DVC 3.x is a list of baseline entries::

    [{"rev": "workspace" | <sha>, "name": <branch or null>,
      "data": {"params": {"params.yaml": {"data": {...}}},
               "metrics": {"reports/metrics/eval.json": {"data": {...}} | {"error": {...}}, ...}},
      "error": null | {"msg": ..., "type": ...},
      "experiments": null | [{"name": ..., "executor": null | {"state": "queued" | "running" |
                                                                   "success" | "failed", ...},
                             "revs": [<an entry like the baseline's, with "experiments": null>]}]}]

The first entry is the workspace, the others are baseline commits (one without ``-A``), each with
its experiments. Metrics files are recognised by file name (``extract.json`` ... ``analysis.json``),
so paths relative to a sub-directory also match; list-valued metrics never appear in this output.
A queued, running or failed experiment shows its params but no metrics: DVC reports the files
left in its workspace, which are not that experiment's.

The table goes to ``reports/compare/`` by default: outside every stage's outputs (a file in
``reports/tables/`` would make DVC see the report stage changed and delete it on the next run), and
``--out`` may not point into them either. Input that is not DVC's JSON layout (malformed JSON, not
UTF-8, another structure) is one line naming the file.

Run as ``python -m mlsae.compare.experiments [--out reports/compare/experiments.md] [--json-file show.json]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import typer

from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_text
from mlsae.core.metrics import STAGE_METRICS
from mlsae.core.paths import (
    ANALYSIS_METRICS,
    EVAL_METRICS,
    EXTRACT_METRICS,
    LENS_METRICS,
    REPORTS,
    TRAIN_METRICS,
    inside_outputs,
)
from mlsae.report import SUMMARY_COLUMNS, format_layers, markdown_table, summary_row

__all__ = ["EXPERIMENTS_TABLE", "Experiment", "compare", "experiment_rows", "main", "parse_exp_show"]

EXPERIMENTS_TABLE = REPORTS / "compare" / "experiments.md"
"""Default output, outside every stage's outputs; the CSV goes beside it (``experiments.csv``)."""

PARAM_COLUMNS = ("model", "lens", "sae.layers", "sae.k", "sae.expansion", "seed")
"""Params always shown; any other param whose value differs between rows is added after them."""

METRICS_FILES = {
    path.name: path.stem for path in (EXTRACT_METRICS, LENS_METRICS, TRAIN_METRICS, EVAL_METRICS, ANALYSIS_METRICS)
}
"""Metrics file name -> stage key of :func:`mlsae.report.summary_row`."""

_NO_METRICS = {"queued", "running", "failed"}


@dataclass
class Experiment:
    """One row of ``dvc exp show``: the workspace, a baseline commit or an experiment."""

    name: str
    rev: str
    baseline: str
    status: str  # workspace | baseline | done | queued | running | failed
    params: dict[str, Any]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"sae": {"k": 32}}`` -> ``{"sae.k": 32}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _entry(raw: Mapping[str, Any], name: str, baseline: str, status: str) -> Experiment:
    """Build an :class:`Experiment` from one rev entry (its ``data`` and ``error``)."""
    data = raw.get("data") or {}
    rev = str(raw.get("rev") or data.get("rev") or "")
    params: dict[str, Any] = {}
    for file_params in (data.get("params") or {}).values():  # params.yaml and any other params file
        params.update(_flatten((file_params or {}).get("data") or {}))
    notes = []
    if raw.get("error"):
        error = raw["error"]
        notes.append(str(error.get("msg") if isinstance(error, Mapping) else error))
        if status not in ("workspace", "baseline"):
            status = "failed"
    metrics: dict[str, dict[str, Any]] = {}
    if status in _NO_METRICS:
        if status == "failed":
            notes.append("no metrics (failed)")
    else:
        for path, content in (data.get("metrics") or {}).items():
            stage = METRICS_FILES.get(Path(path).name)
            if stage is None:
                continue
            if isinstance(content, Mapping) and content.get("error"):
                error = content["error"]
                kind = error.get("type") if isinstance(error, Mapping) else None
                notes.append(f"{Path(path).name}: {kind or 'unreadable'}")
            elif isinstance(content, Mapping):
                try:
                    record = STAGE_METRICS[stage].from_dict(dict(content.get("data") or {}), path, partial=True)
                except MlsaeError as e:
                    notes.append(str(e))
                    continue
                metrics[stage] = record.to_dict()
    short = rev if rev == "workspace" else rev[:7]
    return Experiment(name or short, short, baseline, status, params, metrics, notes)


def parse_exp_show(text: str, source: str = "dvc exp show --json") -> list[Experiment]:
    """Parse ``dvc exp show --json`` output (DVC 3.x layout, see the module docstring).

    Returns the workspace, then each baseline commit followed by its experiments, in DVC's order.

    Raises:
        MlsaeError: the text is not JSON or not in the DVC 3.x layout (naming `source`).
    """
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MlsaeError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) and "rev" in e for e in entries):
        raise MlsaeError(f"{source}: expected DVC 3.x output (a list of entries with 'rev'); upgrade DVC")
    try:
        return _rows(entries)
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
        raise MlsaeError(f"{source}: not in the DVC 3.x layout ({reason})") from None


def _rows(entries: list) -> list[Experiment]:
    rows: list[Experiment] = []
    for entry in entries:
        rev = str(entry["rev"])
        if rev == "workspace":
            rows.append(_entry(entry, "workspace", "", "workspace"))
            continue
        baseline = entry.get("name") or rev[:7]
        rows.append(_entry(entry, baseline, baseline, "baseline"))
        for group in entry.get("experiments") or []:
            executor = group.get("executor") or {}
            state = executor.get("state") if isinstance(executor, Mapping) else None
            status = {"success": "done", None: "done"}.get(state, str(state))
            for rev_entry in group.get("revs") or []:
                name = rev_entry.get("name") or group.get("name") or str(rev_entry.get("rev", ""))[:7]
                rows.append(_entry(rev_entry, name, baseline, status))
    return rows


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


def _run_exp_show(repo_dir: str | os.PathLike[str], all_commits: bool) -> str:
    """Run ``dvc exp show --json`` with this interpreter's DVC and return its stdout."""
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
    if all_commits:
        command.append("--all-commits")
    try:
        done = subprocess.run(command, cwd=repo_dir, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise MlsaeError(f"dvc exp show: cannot run ({exc})") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise MlsaeError(f"dvc exp show: {reason}")
    return done.stdout


def compare(
    out_path: str | os.PathLike[str] = EXPERIMENTS_TABLE,
    exp_show_json: str | None = None,
    *,
    repo_dir: str | os.PathLike[str] = ".",
    all_commits: bool = False,
    source: str = "dvc exp show --json",
) -> pl.DataFrame:
    """Write the experiments table (Markdown at ``out_path``, CSV beside it) and return it.

    Args:
        out_path: the Markdown file; the CSV is ``out_path`` with suffix ``.csv``.
        exp_show_json: text captured from ``dvc exp show --json``; ``None`` runs it in ``repo_dir``.
        repo_dir: the DVC repository (only when running DVC).
        all_commits: pass ``--all-commits`` (every commit and its experiments, not just HEAD's).

    Raises:
        MlsaeError: DVC failed or its output is not the DVC 3.x layout.
    """
    text = exp_show_json if exp_show_json is not None else _run_exp_show(repo_dir, all_commits)
    table = experiment_rows(parse_exp_show(text, source))
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


def main(
    out: Path | None = typer.Option(
        None, help="Output Markdown (default reports/compare/experiments.md, or reports/compare/models.md with --run)."
    ),
    json_file: Path | None = typer.Option(
        None, help="Read `dvc exp show --json` output saved in this file instead of running DVC."
    ),
    all_commits: bool = typer.Option(False, help="Every commit's experiments, not only HEAD's."),
    run: list[Path] | None = typer.Option(
        None,
        "--run",
        help="A finished run's reports directory (metrics/ and tables/summary.csv); twice or more for the model table and figure.",
    ),
) -> None:
    """Write the experiments table from `dvc exp show --json`, or with --run the model comparison
    (table, CSV and the figure of multi-layer activity against adjacent-layer cosine)."""
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
                f"{target}: {models.height} models (CSV, PNG: {target.with_suffix('.csv')}, {target.with_suffix('.png')})"
            )
            return
        out = out or EXPERIMENTS_TABLE
        text = None
        if json_file is not None:
            try:
                text = json_file.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise MlsaeError(f"{json_file}: not found") from None
            except UnicodeDecodeError as e:
                raise MlsaeError(
                    f"{json_file}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})"
                ) from None
        table = compare(out, text, all_commits=all_commits, source=str(json_file or "dvc exp show --json"))
        print(f"{out}: {table.height} experiment rows (CSV: {out.with_suffix('.csv')})")


if __name__ == "__main__":
    typer.run(main)
