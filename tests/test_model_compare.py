"""`mlsae compare --run A --run B ...`: the model table (one column per model, training seeds
summarised), its long CSV and the figure, from runs' metrics files in the jackknife's key layout."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from mlsae.cli import app
from mlsae.compare.models import compare_models, load_run
from mlsae.core.errors import MlsaeError


def figure(key: str, value: float, ci: list[float] | None = None, se: float | None = None) -> dict[str, Any]:
    """A figure as mlsae.stats.estimate.summary writes it; the plug-in is off by 0.5 so that a
    table showing it instead of the bias-corrected value fails."""
    out: dict[str, Any] = {key: value, f"{key}_plugin": value + 0.5, f"{key}_bias_jack": 0.5, f"{key}_bias_boot": 0.3}
    if se is not None:
        out[f"{key}_se"] = se
    if ci is not None:
        out[f"{key}_ci"] = ci
    return out


def fake_run(
    root: Path,
    model: str,
    n_layers: int,
    eff: float,
    eff_ci: list[float],
    cos: float,
    *,
    within: float = 0.146,
    within_ci: tuple[float, float] = (0.139, 0.147),
    sae_layers: int | None = None,
    seed: int | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
) -> Path:
    (root / "metrics").mkdir(parents=True)
    (root / "tables").mkdir()
    (root / "tables" / "summary.csv").write_text(f"model,n_layers\n{model},{n_layers}\n")
    if seed is not None:
        (root / "params.yaml").write_text(f"model: {model}\ntrain:\n  lr: 0.001\n  seed: {seed}\n")
    files: dict[str, dict[str, Any]] = {
        "extract": {"n_layers": n_layers, "d_model": 64, "adjacent_cos": cos, "eval_documents": 128},
        "eval": {
            **figure("fvu", 0.25, [0.24, 0.26], 0.005),
            **figure("delta_ce", 0.3, [0.2, 0.4], 0.05),
            "dead_fraction": 0.01,
        },
        "analysis": {
            **figure("within_share", within, list(within_ci), 0.0012),
            **figure("within_share_mass", 0.3, [0.29, 0.31], 0.005),
            "within_share_any_docs": 0.08,  # no interval: not shown at all
            **figure("var_ratio_paper", 50.0),  # no interval in the file: none shown
            **figure("effective_layers", eff, eff_ci, 0.1),
            **figure("multi_layer_fraction", 0.5, [0.49, 0.51], 0.005),
            "n_latents_counted": 400,
            **({} if sae_layers is None else {"n_layers": sae_layers}),
        },
    }
    for name, data in (extra or {}).items():
        files[name].update(data)
    for name, data in files.items():
        (root / "metrics" / f"{name}.json").write_text(json.dumps(data))
    return root


def seeded_a(tmp_path: Path) -> list[Path]:
    """model-a trained with three seeds: within_share 0.0705, 0.0708, 0.0723 (the first has its interval)."""
    return [
        fake_run(
            tmp_path / f"a{seed}",
            "model-a",
            30,
            3.0 + 0.1 * seed,
            [2.9, 3.3],
            0.9,
            within=w,
            within_ci=(0.0681, 0.0729),
            sae_layers=30,
            seed=seed,
            extra={"analysis": figure("within_share_peak", 0.2, [0.19, 0.21], 0.004)},
        )
        for seed, w in ((0, 0.0705), (1, 0.0708), (2, 0.0723))
    ]


def test_two_models_with_seeds_table_csv_and_figure(tmp_path: Path) -> None:
    a = seeded_a(tmp_path)
    # model-b: 12 blocks, its SAE on 6 of them; no params.yaml (seed unknown), no within_share_peak
    b = fake_run(tmp_path / "b", "model-b", 12, 2.4, [2.3, 2.5], 0.8, sae_layers=6)
    out = tmp_path / "out" / "models.md"
    table = compare_models([*a, b], out)
    assert table.columns == ["figure", "model-a", "model-b"]
    rows = dict(zip(table["figure"], zip(table["model-a"], table["model-b"])))

    # depth normalisation by hand: (eff - 1) / (L - 1), L the SAE's layers (30 and 6, not 12)
    a_depth, a_lo, a_hi = (3.0 - 1) / 29, (2.9 - 1) / 29, (3.3 - 1) / 29
    b_depth, b_lo, b_hi = (2.4 - 1) / 5, (2.3 - 1) / 5, (2.5 - 1) / 5
    assert (round(a_depth, 6), round(b_depth, 6)) == (0.068966, 0.28)
    a_eff = [3.0, 3.1, 3.2]
    a_depths = [(e - 1) / 29 for e in a_eff]
    assert rows["effective_layers_depth"] == (
        f"{a_depth:.4g} ({a_lo:.3g}–{a_hi:.3g}); seeds {statistics.fmean(a_depths):.4g} ± "
        f"{statistics.stdev(a_depths):.2g}, n=3",
        f"{b_depth:.4g} ({b_lo:.3g}–{b_hi:.3g})",
    )
    assert rows["effective_layers_depth"][1] == "0.28 (0.26–0.3)"

    # the seed summary by hand (SD with the n - 1 denominator); the first run's value and interval
    within = [0.0705, 0.0708, 0.0723]
    sd = statistics.stdev(within)
    assert sd == pytest.approx((sum((w - 0.0712) ** 2 for w in within) / 2) ** 0.5)
    assert rows["within_share"] == ("0.0705 (0.0681–0.0729); seeds 0.0712 ± 0.00096, n=3", "0.146 (0.139–0.147)")
    assert f"{sd:.2g}" == "0.00096"
    # bias-corrected values, not the plug-ins (each 0.5 higher in the files)
    assert rows["fvu"] == ("0.25 (0.24–0.26); seeds 0.25 ± 0, n=3", "0.25 (0.24–0.26)")
    assert rows["var_ratio_paper"] == ("50; seeds 50 ± 0, n=3", "50")
    # extract's figures do not depend on the training seed: no seed summary where the runs agree
    assert rows["n_layers"] == ("30", "12")
    assert rows["adjacent_cos"] == ("0.9", "0.8")
    assert rows["runs"] == ("3 (train.seed 0, 1, 2)", "1 (train.seed ?)")
    # optional figures: shown where a run has them; absent everywhere -> no row
    assert rows["within_share_peak"] == ("0.2 (0.19–0.21); seeds 0.2 ± 0, n=3", "-")
    assert "loss_recovered" not in rows and "within_share_any_docs" not in rows
    assert list(rows)[:4] == ["runs", "n_layers", "d_model", "adjacent_cos"]

    md = out.read_text()
    assert "| within_share | 0.0705 (0.0681–0.0729); seeds 0.0712 ± 0.00096, n=3 | 0.146 (0.139–0.147) |" in md
    assert "| effective_layers_depth | 0.06897 (0.0655–0.0793); seeds 0.07241 ± 0.0034, n=3 | 0.28 (0.26–0.3) |" in md
    assert "document-jackknife" in md and "bootstrap" not in md
    assert "models of different families are not a size series" in md
    assert "(effective_layers − 1) / (L − 1)" in md

    csv = pl.read_csv(out.with_suffix(".csv"))
    assert csv.columns == ["model", "figure", "value", "lo", "hi", "se", "seed_mean", "seed_sd", "seed_n", "runs"]
    ws = csv.filter((pl.col("model") == "model-a") & (pl.col("figure") == "within_share")).row(0, named=True)
    assert ws["value"] == 0.0705 and (ws["lo"], ws["hi"], ws["se"]) == (0.0681, 0.0729, 0.0012)
    assert ws["seed_mean"] == pytest.approx(0.0712) and ws["seed_sd"] == pytest.approx(sd) and ws["seed_n"] == 3
    assert ws["runs"] == "; ".join(str(p) for p in a)
    depth = csv.filter((pl.col("model") == "model-b") & (pl.col("figure") == "effective_layers_depth")).row(
        0, named=True
    )
    assert depth["value"] == pytest.approx(0.28) and (depth["lo"], depth["hi"]) == pytest.approx((0.26, 0.3))
    assert depth["se"] == pytest.approx(0.1 / 5) and depth["seed_sd"] is None and depth["seed_n"] == 1
    assert csv.filter(pl.col("model") == "model-b")["figure"].to_list().count("within_share_peak") == 0
    assert (out.with_suffix(".png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_depth_from_the_files(tmp_path: Path) -> None:
    # no n_layers in analysis.json: L falls back to extract's
    run = load_run(fake_run(tmp_path / "a", "m", 11, 3.0, [2.5, 3.5], 0.9))
    depth = run.figures["effective_layers_depth"]
    assert (depth.value, depth.ci) == (pytest.approx(0.2), pytest.approx((0.15, 0.25)))
    # an effective_layers_depth already in analysis.json is taken as it is
    given = figure("effective_layers_depth", 0.42, [0.4, 0.44], 0.01)
    run = load_run(fake_run(tmp_path / "b", "m", 11, 3.0, [2.5, 3.5], 0.9, extra={"analysis": given}))
    depth = run.figures["effective_layers_depth"]
    assert (depth.value, depth.ci, depth.se) == (0.42, (0.4, 0.44), 0.01)
    # one SAE layer: undefined, not shown
    run = load_run(fake_run(tmp_path / "c", "m", 11, 1.0, [1.0, 1.0], 0.9, sae_layers=1))
    assert "effective_layers_depth" not in run.figures


def test_bad_runs_fail_naming_file_and_key_and_write_nothing(tmp_path: Path) -> None:
    a = fake_run(tmp_path / "a", "model-a", 30, 3.0, [2.9, 3.3], 0.9)
    out = tmp_path / "o" / "m.md"
    with pytest.raises(MlsaeError, match=r"at least two run directories to compare \(got 1\)"):
        compare_models([a], out)
    with pytest.raises(MlsaeError, match="the same directory"):
        compare_models([a, tmp_path / "a" / "."], out)
    b = fake_run(tmp_path / "b", "model-b", 12, 2.4, [2.3, 2.5], 0.8)
    data = json.loads((b / "metrics" / "eval.json").read_text())
    del data["fvu"]
    (b / "metrics" / "eval.json").write_text(json.dumps(data))
    with pytest.raises(MlsaeError, match=r"b/metrics/eval\.json: no number under 'fvu'$"):
        compare_models([a, b], out)
    assert not out.parent.exists()  # a is fine, b is not: nothing written
    # a required figure that is null (undefined) is refused the same way
    c = fake_run(tmp_path / "c", "model-c", 12, 2.4, [2.3, 2.5], 0.8, extra={"analysis": {"within_share": None}})
    with pytest.raises(MlsaeError, match=r"c/metrics/analysis\.json: no number under 'within_share'"):
        load_run(c)
    (c / "metrics" / "extract.json").unlink()
    with pytest.raises(MlsaeError, match=r"c/metrics/extract\.json: not found"):
        load_run(c)


def test_cli_one_model_two_seeds(tmp_path: Path) -> None:
    a0, a1 = seeded_a(tmp_path)[:2]
    out = tmp_path / "c" / "models.md"
    result = CliRunner().invoke(app, ["compare", "--run", str(a0), "--run", str(a1), "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "1 model from 2 runs" in result.output
    assert "| runs | 2 (train.seed 0, 1) |" in out.read_text()
    assert out.with_suffix(".png").is_file() and out.with_suffix(".csv").is_file()
    bad = CliRunner().invoke(app, ["compare", "--run", str(a0), "--run", str(tmp_path / "nope")])
    assert bad.exit_code == 1
    assert "nope/tables/summary.csv: not found" in bad.output
