"""`mlsae seeds` (mlsae/compare/seeds.py): experiments that differ only in `train.seed`, their spread
over seeds beside the lowest seed's document interval, checked against direct recomputations
(numpy for the moments, scipy for Student's t) on synthetic `dvc.api.exp_show` rows."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from scipy import stats
from typer.testing import CliRunner

from mlsae.cli import app
from mlsae.compare.experiments import experiments_from_rows
from mlsae.compare.seeds import FIGURES, seed_groups, seed_table, seeds
from mlsae.core.errors import MlsaeError

# --------------------------------------------------------------------------------------------
# Synthetic exp_show rows, in DVC's form (see tests/test_report.py's EXP_SHOW_ROWS, captured from
# DVC 3.67.1): numbers as floats, lists as Python text, a name prefixed by its file only where two
# files share it (`lens`: params.yaml and lens.json; `fvu`: train.json and eval.json).
# --------------------------------------------------------------------------------------------

BASE_PARAMS: dict[str, Any] = {
    "model": "smollm2-135m",
    "data.train_tokens": 65536.0,
    "params.yaml:lens": "none",
    "sae.layers": "all",
    "sae.expansion": 16.0,
    "sae.k": 64.0,
    "train.seed": 0.0,
    "train.device": "cuda",
    "evaluate.baselines": "['mean']",
    "make.py": "55a8b24282d658ac9033ea952a538859",  # a dependency's hash: not a param
}

FIT: dict[str, Any] = {"params.yaml:lens": "fit"}  # the lens param: prefixed, lens.json has `lens` too

RNG = np.random.default_rng(20240611)


def _figures(missing: tuple[str, ...] = (), nan: tuple[str, ...] = ()) -> dict[str, float | None]:
    """Random values and SEs for every headline figure; `missing` ones null (as DVC shows a key a
    run's metrics file lacks), `nan` ones not finite."""
    out: dict[str, float | None] = {}
    for key in FIGURES:
        value: float | None = float(RNG.uniform(0.05, 0.95))
        se: float | None = float(RNG.uniform(0.001, 0.02))
        if key in missing:
            value, se = None, None
        elif key in nan:
            value = math.nan
        out[key], out[f"{key}_se"] = value, se
    return out


def _row(
    name: str | None,
    rev: str,
    typ: str,
    figures: dict[str, float | None],
    *,
    state: str | None = None,
    eval_documents: float | None = 40.0,
    **params: Any,
) -> dict[str, Any]:
    """One exp_show row: identity, the metrics of `figures` (fvu in eval.json, beside a different
    train.json fvu) and BASE_PARAMS updated by `params` (dotted names as keyword `train__seed`)."""
    row: dict[str, Any] = {
        "Experiment": name,
        "rev": rev,
        "typ": typ,
        "Created": None if rev == "workspace" else "01:25 PM",
        "parent": None,
        "State": state,
        "Executor": None,
        "reports/metrics/extract.json:n_layers": 30.0,
        "eval_documents": eval_documents,
        "reports/metrics/lens.json:lens": None,
        "reports/metrics/train.json:fvu": 0.5,  # not the figure: the eval stage's fvu is
    }
    for key, value in figures.items():
        row["reports/metrics/eval.json:fvu" if key == "fvu" else key] = value
    row.update(BASE_PARAMS)
    row.update({key.replace("__", "."): value for key, value in params.items()})
    row["reports/metrics/lens.json:lens"] = row["params.yaml:lens"]
    return row


# group A: params as BASE_PARAMS, seeds 0 (workspace and baseline), 2, 1 (out of order)
A0 = _figures(missing=("within_share_peak",))  # the lowest seed lacks a figure: computed over seeds 1, 2
A2 = _figures(missing=("dead_fraction",))  # missing in one seed: computed over seeds 0, 1
A1 = _figures(nan=("var_ratio_paper",))  # not finite: as if missing
A2_ELSEWHERE = _figures()  # seed 2 again, run on another device: not a new seed, and not used
# group B: lens fit, seeds 4 then 1 (the lowest appears last), with their own document counts
B4 = _figures()
B1 = _figures(missing=("effective_layers",))  # one seed left: the figure is not in the table
LONE = _figures()  # sae.k 32: no other seed
FAILED = _figures()  # a failed queue run keeps the workspace's metrics in its row: ignored anyway

ROWS: list[dict[str, Any]] = [
    _row(None, "workspace", "baseline", A0),
    _row(None, "master", "baseline", A0),
    _row("seed2", "1a2b3c4d5e6f", "branch_commit", A2, eval_documents=60.0, train__seed=2.0),
    _row(
        "lensfit-seed4",
        "2b3c4d5e6f70",
        "branch_commit",
        B4,
        eval_documents=70.0,
        train__seed=4.0,
        **FIT,
    ),
    _row("seed1", "3c4d5e6f7081", "branch_commit", A1, eval_documents=50.0, train__seed=1.0),
    _row("k32", "4d5e6f708192", "branch_commit", LONE, sae__k=32.0, train__seed=1.0),
    _row("seed2-cpu", "5e6f708192a3", "branch_commit", A2_ELSEWHERE, train__seed=2.0, train__device="cpu"),
    _row("broken", "6f708192a3b4", "branch_base", FAILED, state="Failed", train__seed=3.0),
    _row(
        "pending",
        "708192a3b4c5",
        "branch_commit",
        dict.fromkeys(FAILED),
        state="Queued",
        eval_documents=None,
        train__seed=5.0,
        **FIT,
    ),
    _row(
        "lensfit-seed1",
        "8192a3b4c5d6",
        "branch_commit",
        B1,
        state="Success",
        eval_documents=30.0,
        train__seed=1.0,
        **FIT,
    ),
]

# each group's seeds (lowest first) with their figures, and the lowest seed's eval documents
EXPECTED: list[tuple[str, str, list[dict[str, float | None]], float]] = [
    ("none", "0, 1, 2", [A0, A1, A2], 40.0),
    ("fit", "1, 4", [B1, B4], 30.0),
]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _v(figures: dict[str, float | None], key: str) -> float:
    value = figures[key]
    assert value is not None
    return value


def _expected_rows() -> list[dict[str, Any]]:
    """The table recomputed directly: numpy for mean/SD/range, scipy for the t quantile."""
    rows = []
    for group, (lens, seed_text, runs, units) in enumerate(EXPECTED):
        first = runs[0]
        t = float(stats.t.ppf(0.975, units - 1))
        for key in FIGURES:
            values = np.array([r[key] for r in runs if _finite(r[key])], dtype=float)
            if values.size < 2:
                continue
            sd = float(values.std(ddof=1))
            value, se = first[key], first[f"{key}_se"]
            rows.append(
                {
                    "group": group,
                    "model": "smollm2-135m",
                    "lens": lens,
                    "seeds": seed_text,
                    "figure": key,
                    "seed_mean": float(values.mean()),
                    "seed_sd": sd,
                    "seed_min": float(values.min()),
                    "seed_max": float(values.max()),
                    "first_value": value,
                    "document_se": se,
                    "document_lo": None if value is None or se is None else value - t * se,
                    "document_hi": None if value is None or se is None else value + t * se,
                    "sd_over_se": None if se is None else sd / se,
                }
            )
    return rows


def _assert_rows_match(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [(r["group"], r["figure"]) for r in got] == [(r["group"], r["figure"]) for r in expected]
    for g, e in zip(got, expected):
        assert set(g) == set(e)
        for column, want in e.items():
            if isinstance(want, float):
                assert g[column] == pytest.approx(want, rel=1e-12, abs=1e-15), (e["group"], e["figure"], column)
            else:
                assert g[column] == want, (e["group"], e["figure"], column)


# --------------------------------------------------------------------------------------------
# groups
# --------------------------------------------------------------------------------------------


def test_groups_are_the_experiments_differing_only_in_the_seed() -> None:
    experiments = experiments_from_rows(ROWS)
    groups = seed_groups(experiments)
    # A (first seen: the workspace) then B; the lone k32 run, the failed and the queued run form none
    assert [[e.params["train.seed"] for e in group] for group in groups] == [[0.0, 1.0, 2.0], [1.0, 4.0]]
    assert [[e.name for e in group] for group in groups] == [
        ["workspace", "seed1", "seed2"],  # the baseline repeats seed 0, seed2-cpu seed 2: once each
        ["lensfit-seed1", "lensfit-seed4"],
    ]
    assert [group[0].params["lens"] for group in groups] == ["none", "fit"]
    names = {e.name for group in groups for e in group}
    assert names.isdisjoint({"k32", "broken", "pending", "seed2-cpu"})


def test_a_device_or_a_failed_run_adds_no_seed() -> None:
    """Only finished runs count; a param in _IGNORED (where it ran) does not split a group, and a
    seed met again keeps the first run's figures."""
    assert seed_groups(experiments_from_rows([ROWS[1], ROWS[7]])) == []  # seed 3 failed
    assert seed_groups(experiments_from_rows([ROWS[1], ROWS[8]])) == []  # seed 5 queued (and lens fit)
    assert seed_groups(experiments_from_rows([ROWS[2], ROWS[6]])) == []  # seed 2 twice, devices apart
    lone = experiments_from_rows([ROWS[1], ROWS[5]])  # sae.k 64 seed 0 and sae.k 32 seed 1
    assert seed_groups(lone) == []
    with_cpu = seed_groups(experiments_from_rows([ROWS[1], ROWS[6]]))  # seed 0 on cuda, seed 2 on cpu
    assert [[e.name for e in group] for group in with_cpu] == [["master", "seed2-cpu"]]


# --------------------------------------------------------------------------------------------
# the table against a direct recomputation
# --------------------------------------------------------------------------------------------


def test_seed_table_matches_a_direct_recomputation() -> None:
    table = seed_table(experiments_from_rows(ROWS))
    _assert_rows_match(table.to_dicts(), _expected_rows())


def test_missing_figures_are_computed_over_the_others_or_skipped() -> None:
    got = {(r["group"], r["figure"]): r for r in seed_table(experiments_from_rows(ROWS)).to_dicts()}
    # missing in seed 2: over seeds 0 and 1
    dead = got[(0, "dead_fraction")]
    assert dead["seed_mean"] == pytest.approx((_v(A0, "dead_fraction") + _v(A1, "dead_fraction")) / 2)
    # not finite in seed 1: over seeds 0 and 2
    paper = got[(0, "var_ratio_paper")]
    pair = sorted([_v(A0, "var_ratio_paper"), _v(A2, "var_ratio_paper")])
    assert (paper["seed_min"], paper["seed_max"]) == pytest.approx(pair)
    # missing in the lowest seed: the spread over seeds 1 and 2, and no document interval
    peak = got[(0, "within_share_peak")]
    assert peak["seed_sd"] == pytest.approx(
        abs(_v(A1, "within_share_peak") - _v(A2, "within_share_peak")) / math.sqrt(2)
    )
    assert all(peak[k] is None for k in ("first_value", "document_se", "document_lo", "document_hi", "sd_over_se"))
    # one seed left of two: not in the table
    assert (1, "effective_layers") not in got and (0, "effective_layers") in got
    assert len(got) == 2 * len(FIGURES) - 1


def test_the_document_interval_is_the_lowest_seeds() -> None:
    """Group B's lowest seed (1) comes last in the rows: its value, SE and eval documents (30, not
    seed 4's 70) give the interval; the other run's never do."""
    got = {r["figure"]: r for r in seed_table(experiments_from_rows(ROWS)).to_dicts() if r["group"] == 1}
    t = stats.t.ppf(0.975, 30 - 1)
    for key, row in got.items():
        value, se = _v(B1, key), _v(B1, f"{key}_se")
        assert row["first_value"] == value and row["document_se"] == se
        assert row["document_lo"] == pytest.approx(value - t * se) and row["document_hi"] == pytest.approx(
            value + t * se
        )
        assert row["sd_over_se"] == pytest.approx(np.std([_v(B1, key), _v(B4, key)], ddof=1) / se)
        assert row["seeds"] == "1, 4"


def test_no_eval_documents_leaves_the_interval_empty() -> None:
    rows = [{**ROWS[1], "eval_documents": None}, ROWS[4]]
    table = seed_table(experiments_from_rows(rows))
    assert table.height == len(FIGURES) - 2  # seed 0 lacks within_share_peak, seed 1 var_ratio_paper
    assert table["document_lo"].null_count() == table.height and table["document_hi"].null_count() == table.height
    assert table["document_se"].null_count() == 0 and table["sd_over_se"].null_count() == 0


# --------------------------------------------------------------------------------------------
# seeds(): the files; no group: one line
# --------------------------------------------------------------------------------------------


def test_seeds_writes_the_markdown_and_the_csv_beside_it(tmp_path: Path) -> None:
    out = tmp_path / "compare" / "seeds.md"
    table = seeds(out, rows=ROWS)
    _assert_rows_match(table.to_dicts(), _expected_rows())
    md = out.read_text().splitlines()
    assert md[0] == "# Training-seed variance"
    table_lines = [line for line in md if line.startswith("| ")]
    assert len(table_lines) == 1 + table.height
    assert table_lines[0] == "| " + " | ".join(table.columns) + " |"
    assert table_lines[1].startswith("| 0 | smollm2-135m | none | 0, 1, 2 | fvu |")
    with out.with_suffix(".csv").open(newline="") as f:
        written = list(csv.DictReader(f))
    assert len(written) == table.height and list(written[0]) == table.columns
    for line, row in zip(written, table.iter_rows(named=True)):
        for column, value in row.items():
            if isinstance(value, float):
                assert float(line[column]) == pytest.approx(value, rel=1e-12)
            else:
                assert line[column] == ("" if value is None else str(value))


@pytest.mark.parametrize(
    "rows",
    [
        [],
        [ROWS[1], ROWS[5]],  # different sae.k
        [ROWS[2], ROWS[6]],  # one seed on two devices
        [ROWS[1], ROWS[7], ROWS[8]],  # the other seeds failed or queued
        [ROWS[3], _row("bare", "9a3b4c5d6e7f", "branch_commit", dict.fromkeys(B1), train__seed=1.0, **FIT)],
    ],
    ids=["no rows", "k differs", "same seed", "not finished", "no figure twice"],
)
def test_no_group_is_one_line_and_writes_nothing(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    out = tmp_path / "seeds.md"
    with pytest.raises(MlsaeError, match=r"^no two finished experiments differ only in train\.seed") as e:
        seeds(out, rows=rows)
    assert "\n" not in str(e.value)
    assert not out.exists() and not out.with_suffix(".csv").exists()


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------


def test_cli_writes_the_table_and_refuses_a_pipeline_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    runner = CliRunner()
    out = tmp_path / "reports" / "compare" / "seeds.md"
    result = runner.invoke(app, ["seeds", "--json-file", "rows.json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    height = len(_expected_rows())
    assert f"{out}: {height} rows (CSV: {out.with_suffix('.csv')})" in result.output
    assert pl.read_csv(out.with_suffix(".csv")).height == height and out.read_text().startswith("# Training-seed")
    # the default: reports/compare/seeds.md under the working directory (the file just written)
    out.unlink()
    out.with_suffix(".csv").unlink()
    result = runner.invoke(app, ["seeds", "--json-file", "rows.json"])
    assert result.exit_code == 0, result.output
    assert out.exists() and out.with_suffix(".csv").exists()
    # into a stage's output: refused in one line, nothing written
    result = runner.invoke(app, ["seeds", "--json-file", "rows.json", "--out", "reports/tables/seeds.md"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: seeds: --out reports/tables/seeds.md: lies in the pipeline output reports/tables; "
        "write under reports/compare/"
    ]
    assert not (tmp_path / "reports" / "tables").exists()
    # no group: the same one line, exit 1
    (tmp_path / "lone.json").write_text(json.dumps([ROWS[1], ROWS[5]]))
    result = runner.invoke(app, ["seeds", "--json-file", "lone.json", "--out", str(tmp_path / "lone.md")])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("error: seeds: ")
    assert "no two finished experiments differ only in train.seed" in result.output
    assert not (tmp_path / "lone.md").exists()
