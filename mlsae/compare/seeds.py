"""Training-seed variance: experiments that differ only in `train.seed`, set beside the document
resampling's uncertainty.

For each group of finished experiments whose params agree except for ``train.seed`` (two seeds at
least), and each headline figure ``k`` with values ``k_s`` (the reported, bias-corrected values) over
the group's seeds ``s = 1 .. S``:

    mean = (1/S) sum_s k_s      sd = sqrt(sum_s (k_s - mean)^2 / (S - 1))      range = [min_s k_s, max_s k_s]

beside the document interval of the group's lowest seed (``k ± t_{U-1} se``, U its eval documents;
the experiments table has no list-valued metrics, so the interval is rebuilt from the scalar
``k_se`` as the aggregate and evaluate stages build it) and ``sd / se``: how the seeds' spread
compares with the sampling spread of one run. The table goes to ``reports/compare/seeds.md`` (and
``.csv``), outside every stage's outputs.

Run as ``mlsae seeds [--out reports/compare/seeds.md] [--json-file rows.json]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from mlsae.compare.experiments import Experiment, exp_show_rows, experiments_from_rows, read_rows
from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_text
from mlsae.core.paths import REPORTS
from mlsae.report import markdown_table
from mlsae.stats.estimate import t_quantile

SEEDS_TABLE = REPORTS / "compare" / "seeds.md"
"""Default output (the CSV goes beside it)."""

FIGURES: dict[str, str] = {
    "fvu": "eval",
    "delta_ce": "eval",
    "loss_recovered": "eval",
    "dead_fraction": "eval",
    "within_share": "analysis",
    "within_share_mass": "analysis",
    "within_share_peak": "analysis",
    "effective_layers": "analysis",
    "multi_layer_fraction": "analysis",
    "var_ratio_paper": "analysis",
}
"""The headline figures of the table, with the metrics file (stage) that holds each."""

_IGNORED = {
    "train.seed",
    "train.device",
    "train.checkpoint_every",
    "evaluate.device",
    "dump.device",
    "extract.device",
    "lens_fit.device",
}
"""Params that do not make two runs different experiments (where they ran, how often they saved)."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _seed_text(seed: Any) -> str:
    """A seed as written in params.yaml (DVC's rows may carry an int as a float)."""
    return str(int(seed)) if isinstance(seed, float) and seed.is_integer() else str(seed)


def _seed_order(seed: Any) -> tuple[int, float | str]:
    """Seeds in numeric order (DVC's rows carry them as floats, hand-written rows as ints)."""
    number = _number(seed)
    return (0, number) if number is not None else (1, str(seed))


def seed_groups(experiments: Sequence[Experiment]) -> list[list[Experiment]]:
    """Finished experiments grouped by every param but the seed (and where they ran); groups with
    at least two distinct `train.seed` values, in first-appearance order, each ordered by seed."""
    groups: dict[str, list[Experiment]] = {}
    for exp in experiments:
        if exp.status not in ("done", "workspace", "baseline") or not exp.metrics:
            continue
        key = json.dumps({k: v for k, v in exp.params.items() if k not in _IGNORED}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(exp)
    out = []
    for members in groups.values():
        by_seed: dict[Any, Experiment] = {}
        for exp in members:
            by_seed.setdefault(exp.params.get("train.seed"), exp)  # one run per seed
        if len(by_seed) >= 2:  # the lowest seed first: the run whose document interval is shown
            out.append([by_seed[s] for s in sorted(by_seed, key=_seed_order)])
    return out


def seed_table(experiments: Sequence[Experiment]) -> pl.DataFrame:
    """One row per (group, figure): the seeds' mean, SD and range, and the document interval and
    SE of the group's lowest seed (module docstring)."""
    rows: list[dict[str, Any]] = []
    for g, group in enumerate(seed_groups(experiments)):
        first = group[0]
        units = _number(first.metrics.get("extract", {}).get("eval_documents"))
        for key, stage in FIGURES.items():
            found = [_number(e.metrics.get(stage, {}).get(key)) for e in group]
            values = [v for v in found if v is not None]
            if len(values) < 2:
                continue
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            value = _number(first.metrics.get(stage, {}).get(key))
            se = _number(first.metrics.get(stage, {}).get(f"{key}_se"))
            half = t_quantile(int(units)) * se if se is not None and units else None
            rows.append(
                {
                    "group": g,
                    "model": first.params.get("model"),
                    "lens": first.params.get("lens"),
                    "seeds": ", ".join(_seed_text(e.params.get("train.seed")) for e in group),
                    "figure": key,
                    "seed_mean": mean,
                    "seed_sd": sd,
                    "seed_min": min(values),
                    "seed_max": max(values),
                    "first_value": value,
                    "document_se": se,
                    "document_lo": None if half is None or value is None else value - half,
                    "document_hi": None if half is None or value is None else value + half,
                    "sd_over_se": sd / se if se else None,
                }
            )
    if not rows:
        raise MlsaeError(
            "no two finished experiments differ only in train.seed; run them first (e.g. "
            "`dvc exp run --queue -S train.seed=1`, the same with 2, then `dvc queue start`), or add "
            "--all-commits for experiments queued before the last commit"
        )
    return pl.DataFrame(rows)


def seeds(
    out_path: str | Path = SEEDS_TABLE,
    rows: Sequence[dict] | None = None,
    repo_dir: str | Path = ".",
    all_commits: bool = False,
) -> pl.DataFrame:
    """Write the seed table (Markdown at `out_path`, CSV beside it) from the DVC experiments of
    HEAD (of every ancestor commit too with `all_commits`; a run met twice counts once, the newest)
    or saved `rows` of dvc.api.exp_show, and return it."""
    experiments = experiments_from_rows(list(rows) if rows is not None else exp_show_rows(repo_dir, all_commits))
    table = seed_table(experiments)
    out_path = Path(out_path)
    intro = (
        "# Training-seed variance\n\n"
        "Experiments that differ only in `train.seed`: per headline figure the seeds' mean, SD and range "
        "(reported, bias-corrected values), beside the lowest seed's 95 % document interval and its SE "
        "(docs/statistics.md). `sd_over_se` compares the spread over seeds with one run's sampling error. "
        "Regenerate with `mlsae seeds`.\n\n"
    )
    write_text(out_path, intro + markdown_table(table))
    write_text(out_path.with_suffix(".csv"), table.write_csv())
    return table


def main(out: Path | None = None, json_file: Path | None = None, all_commits: bool = False) -> None:
    """Write the seed-variance table from the DVC experiments (mlsae/compare/seeds.py); with
    --all-commits, those of HEAD's ancestors too (experiments queued before the last commits)."""
    from mlsae.core.paths import inside_outputs
    from mlsae.core.stage import stage

    with stage("seeds"):
        out = out or SEEDS_TABLE
        if inside_outputs(out) is not None:
            raise MlsaeError(
                f"--out {out}: lies in the pipeline output {inside_outputs(out)}; write under reports/compare/"
            )
        table = seeds(out, read_rows(json_file) if json_file is not None else None, all_commits=all_commits)
        print(f"{out}: {table.height} rows (CSV: {Path(out).with_suffix('.csv')})")
