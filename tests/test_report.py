"""Report stage: tables, figures, plot CSVs and the experiments table.

Inputs are small hand-made metrics, parquet files and token arrays with known values, so every
check compares against a number or a string the test wrote. One test also feeds the real aggregate
stage's output (from a tiny latent store) through the report, pinning the parquet schemas. The
experiments table is parsed from `dvc exp show --json` output captured with DVC 3.67.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from PIL import Image

from mlsae import report
from mlsae.compare.experiments import compare, experiment_rows, experiments_from_rows, read_rows
from mlsae.core.errors import MlsaeError
from mlsae.core.paths import (
    ADJ_COS_PLOT,
    ANALYSIS_METRICS,
    BASELINE_METRICS,
    EVAL_METRICS,
    EXTRACT_METRICS,
    LATENT_STATS,
    LAYER_STATS,
    LENS_METRICS,
    LENS_PLOT,
    SAE_CONFIG,
    TOP_TOKENS,
    TRAIN_METRICS,
    TRAIN_PLOT,
)

BLOCKS = [0, 1, 2, 3]  # the SAE's layers (L = 4); the model has 4 blocks
L = len(BLOCKS)
CONTEXT_LEN = 20
N_TOKENS = 3 * CONTEXT_LEN
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A toy tokenizer: token i decodes to " w<i>", with a pipe, a newline and a leading-space-free
# token in the vocabulary to exercise escaping and the «mark» placement.
VOCAB = [f" w{i}" for i in range(N_TOKENS)]
VOCAB[33] = " a|b"
VOCAB[34] = "\n"
VOCAB[35] = "x"


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids)


TOKENS = np.arange(N_TOKENS, dtype=np.int32)  # token id == global eval index, easy to read back
CONTEXT = np.repeat(np.arange(3, dtype=np.int32), CONTEXT_LEN)
POSITION = np.tile(np.arange(CONTEXT_LEN, dtype=np.int16), 3)

# latent -> (count, mass, layer distribution); latent 5 never fires, latent 4 is rare (count 3)
LATENTS = {
    0: (40, 10.0, [0.7, 0.3, 0.0, 0.0]),
    1: (30, 25.0, [0.0, 0.1, 0.2, 0.7]),
    2: (20, 5.0, [0.25, 0.25, 0.25, 0.25]),
    3: (50, 40.0, [0.0, 1.0, 0.0, 0.0]),
    4: (3, 1.0, [0.0, 0.0, 1.0, 0.0]),
    5: (0, 0.0, None),
}
# latent -> [(token, value, layer position)] by rank
TOP = {
    3: [(35, 9.0, 1), (5, 7.5, 1)],
    1: [(40, 6.0, 3)],
    0: [(2, 3.0, 0), (21, 2.0, 0), (22, 1.0, 1)],
    2: [(59, 1.5, 2)],
    4: [(10, 0.5, 2)],
}

EXTRACT = {
    "tokens": 1000,
    "tokens_per_s": 123.0,
    "n_layers": 4,
    "d_model": 8,
    "adjacent_cos": 0.8,
    "adjacent_cos_by_layer": [0.9, 0.8, 0.7],
}
TRAIN = {
    "fvu": 0.25,
    "fvu_by_layer": [0.2, 0.25, 0.3, 0.25],
    "loss": 0.3,
    "l0": 2.0,
    "dead_fraction": 0.1,
    "vectors_per_s": 1e4,
    "steps": 30,
    "tokens": 960,
    "n_latents": 6,
    "layers": BLOCKS,
}
EVAL = {
    "fvu": 0.3,
    "fvu_by_layer": [0.21, 0.31, 0.41, 0.27],
    "mse": 0.03,
    "mse_by_layer": [0.01, 0.02, 0.04, 0.05],
    "l0": 2.0,
    "l0_by_layer": [2.0, 2.0, 1.5, 2.5],
    "dead_fraction": 1 / 6,
    "ce_clean": 3.5,
    "delta_ce": 0.12,
    "delta_ce_ci": [0.1, 0.14],
    "delta_ce_by_layer": [0.05, 0.1, 0.15, 0.18],
    "delta_ce_by_layer_ci": [[0.04, 0.06], [0.08, 0.12], [0.13, 0.17], [0.16, 0.2]],
    "loss_recovered": 0.95,
    "loss_recovered_ci": [0.93, 0.97],
    "loss_recovered_by_layer": [0.975, 0.95, 0.94, 0.935],
    "kl": 0.11,
    "kl_by_layer": [0.04, 0.09, 0.14, 0.17],
    "layers": BLOCKS,
}
BASELINE = {
    "ce_clean": 3.5,
    "delta_ce_mean": 2.4,
    "delta_ce_mean_by_layer": [2.0, 2.0, 2.5, 3.1],
    "kl_mean": 2.2,
    "kl_mean_by_layer": [1.9, 2.0, 2.3, 2.6],
    "baselines": ["mean"],
    "layers": BLOCKS,
}
ANALYSIS = {
    "var_within": 0.012,
    "var_between": 1.488,
    "var_total": 1.5,
    "within_share": 0.008,
    "within_share_ci": [0.006, 0.011],
    "var_ratio": 125.0,
    "within_share_mass": 0.02,
    "within_share_mass_ci": [0.015, 0.03],
    "effective_layers": 1.3,
    "multi_layer_fraction": 0.2,
    "multi_layer_fraction_ci": [0.15, 0.25],
    "mean_layer_std": 0.9,
    "var_token_paper": 0.001,
    "var_aggregate_paper": 0.1,
    "var_ratio_paper": 100.0,
    "var_ratio_paper_ci": [80.0, 130.0],
    "n_tokens": N_TOKENS,
    "n_active_pairs": 143,
    "n_latents_active": 5,
    "n_latents_counted": 4,
    "n_layers": L,
}
LENS_FIT = {
    "lens": "fit",
    "kl_logit_lens_by_layer": [5.0, 3.0, 1.0, 0.0],
    "kl_tuned_lens_by_layer": [1.0, 0.5, 0.2, 0.0],
    "kl_logit_lens": 2.25,
    "kl_tuned_lens": 0.425,
}
CONFIG = {"d_model": 8, "n_latents": 6, "k": 2, "layers": BLOCKS, "lens": "none", "model": "tiny-llama", "auxk": 4}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _latents_frame() -> pl.DataFrame:
    """latents.parquet with the aggregate stage's columns and moments computed from LATENTS."""
    ell = np.arange(L, dtype=np.float64)
    rows = []
    for latent, (count, mass, dist) in LATENTS.items():
        if dist is None:
            mean = var = entropy = None
        else:
            p = np.asarray(dist)
            mean = float(p @ ell)
            var = float(((ell - mean) ** 2) @ p)
            entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum() / np.log(L))
        rows.append(
            {
                "latent": latent,
                "count": count,
                "n_entries": count * 2,
                "mass": mass,
                "mean_layer": mean,
                "var_layer": var,
                "std_layer": None if var is None else var**0.5,
                "entropy": entropy,
                "n_layers_5pct": 0 if dist is None else sum(v >= 0.05 for v in dist),
                "var_token_mean": None if dist is None else 0.01,
                "multi_layer_fraction": None if dist is None else 0.2,
                "layer_dist": dist,
            }
        )
    return pl.DataFrame(
        rows,
        schema={
            "latent": pl.Int32,
            "count": pl.Int64,
            "n_entries": pl.Int64,
            "mass": pl.Float64,
            "mean_layer": pl.Float64,
            "var_layer": pl.Float64,
            "std_layer": pl.Float64,
            "entropy": pl.Float64,
            "n_layers_5pct": pl.Int32,
            "var_token_mean": pl.Float64,
            "multi_layer_fraction": pl.Float64,
            "layer_dist": pl.List(pl.Float64),
        },
    )


@pytest.fixture()
def run(tmp_path: Path) -> dict[str, Path]:
    """A complete set of report inputs with lens none, and output directories."""
    metrics = tmp_path / "reports" / "metrics"
    plots = tmp_path / "reports" / "plots"
    analysis = tmp_path / "data" / "analysis"
    config = tmp_path / "data" / "sae" / SAE_CONFIG
    _write_json(metrics / EXTRACT_METRICS.name, EXTRACT)
    _write_json(metrics / LENS_METRICS.name, {"lens": "none"})
    _write_json(metrics / TRAIN_METRICS.name, TRAIN)
    _write_json(metrics / EVAL_METRICS.name, EVAL)
    _write_json(metrics / BASELINE_METRICS.name, BASELINE)
    _write_json(metrics / ANALYSIS_METRICS.name, ANALYSIS)
    _write_json(config, CONFIG)
    steps = np.arange(1, 31)
    curve = {
        "step": steps,
        "loss": 1.0 / steps,
        "fvu": 0.9 / steps,
        "auxk": 0.01 / steps,
        "l0": np.full(30, 2.0),
        "dead_fraction": np.linspace(0.0, 0.1, 30),
    }
    curve.update({f"fvu_layer_{b}": 0.9 / steps for b in BLOCKS})
    plots.mkdir(parents=True)
    pl.DataFrame(curve).write_csv(plots / TRAIN_PLOT.name)
    analysis.mkdir(parents=True)
    _latents_frame().write_parquet(analysis / LATENT_STATS.name)
    pl.DataFrame(
        {
            "layer": pl.Series(range(L), dtype=pl.Int32),
            "block": pl.Series(BLOCKS, dtype=pl.Int32),
            "n_entries": [60, 80, 40, 50],
            "n_latents_active": [3, 4, 3, 2],
            "mass": [10.0, 50.0, 15.0, 25.0],
            "mean_activation": [1.0, 1.0, 1.0, 1.0],
        }
    ).write_parquet(analysis / LAYER_STATS.name)
    pl.DataFrame(
        [
            {"latent": latent, "rank": rank, "token": token, "value": value, "layer": layer}
            for latent, items in TOP.items()
            for rank, (token, value, layer) in enumerate(items, start=1)
        ],
        schema={"latent": pl.Int32, "rank": pl.Int32, "token": pl.Int64, "value": pl.Float32, "layer": pl.Int32},
    ).write_parquet(analysis / TOP_TOKENS.name)
    return {
        "metrics_dir": metrics,
        "plots_dir": plots,
        "analysis_dir": analysis,
        "sae_config_path": config,
        "tables_dir": tmp_path / "reports" / "tables",
        "figures_dir": tmp_path / "reports" / "figures",
    }


def _build(run: dict[str, Path], **kwargs: Any) -> dict[str, Any]:
    return report.build_report(**run, tokens=TOKENS, context=CONTEXT, position=POSITION, decode=decode, **kwargs)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


# --------------------------------------------------------------------------------------------
# build_report
# --------------------------------------------------------------------------------------------


def test_summary_row_matches_inputs(run: dict[str, Path]) -> None:
    out = _build(run)
    rows = _read_csv(run["tables_dir"] / "summary.csv")
    assert len(rows) == 1
    row = rows[0]
    assert list(row) == list(report.SUMMARY_COLUMNS)
    assert row["model"] == "tiny-llama" and row["lens"] == "none" and row["layers"] == "0-3"
    expected = {
        "n_layers": 4,
        "d_model": 8,
        "n_latents": 6,
        "k": 2,
        "fvu": EVAL["fvu"],
        "delta_ce": EVAL["delta_ce"],
        "delta_ce_mean": BASELINE["delta_ce_mean"],
        "loss_recovered": EVAL["loss_recovered"],
        "kl": EVAL["kl"],
        "l0": EVAL["l0"],
        "dead_fraction": EVAL["dead_fraction"],
        "within_share": ANALYSIS["within_share"],
        "within_share_mass": ANALYSIS["within_share_mass"],
        "var_ratio": ANALYSIS["var_ratio"],
        "var_ratio_paper": ANALYSIS["var_ratio_paper"],
        "effective_layers": ANALYSIS["effective_layers"],
        "multi_layer_fraction": ANALYSIS["multi_layer_fraction"],
        "adjacent_cos": EXTRACT["adjacent_cos"],
    }
    for key, value in expected.items():
        assert float(row[key]) == pytest.approx(value), key
        assert out["summary"][key] == pytest.approx(value), key
    assert row["delta_ce_ci"] == "0.1–0.14" and row["loss_recovered_ci"] == "0.93–0.97"
    md = (run["tables_dir"] / "summary.md").read_text()
    assert "| var_ratio | 125 |" in md and "| model | tiny-llama |" in md


def test_layers_table_one_row_per_layer(run: dict[str, Path]) -> None:
    _build(run)
    rows = _read_csv(run["tables_dir"] / "layers.csv")
    assert [int(r["block"]) for r in rows] == BLOCKS
    for j, r in enumerate(rows):
        for key in ("fvu", "mse", "l0", "delta_ce", "loss_recovered", "kl"):
            assert float(r[key]) == pytest.approx(EVAL[f"{key}_by_layer"][j]), (key, j)
        assert float(r["delta_ce_mean"]) == pytest.approx(BASELINE["delta_ce_mean_by_layer"][j])
        assert [float(r["delta_ce_lo"]), float(r["delta_ce_hi"])] == pytest.approx(EVAL["delta_ce_by_layer_ci"][j])
        assert "delta_ce_zero" not in r  # the ablations are the baseline stage's
        assert float(r["fvu_train"]) == pytest.approx(TRAIN["fvu_by_layer"][j])
    assert [r["adjacent_cos"] for r in rows] == ["0.9", "0.8", "0.7", ""]  # last block has no next block
    assert [int(r["n_latents_active"]) for r in rows] == [3, 4, 3, 2]
    assert [float(r["mass_share"]) for r in rows] == pytest.approx([0.1, 0.5, 0.15, 0.25])
    assert "kl_tuned_lens" not in rows[0]
    md = (run["tables_dir"] / "layers.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in md) == 1 + L  # header + one row per layer


def test_top_latents_sorted_by_mass_with_marked_contexts(run: dict[str, Path]) -> None:
    _build(run, top_latents=3, contexts_per_latent=2)
    rows = _read_csv(run["tables_dir"] / "top_latents.csv")
    assert [int(r["latent"]) for r in rows] == [3, 1, 0]  # masses 40, 25, 10
    assert [float(r["mass"]) for r in rows] == [40.0, 25.0, 10.0]
    assert float(rows[0]["mass_share"]) == pytest.approx(40 / 81)
    assert int(rows[0]["peak_block"]) == 1 and int(rows[1]["peak_block"]) == 3
    assert float(rows[1]["mean_layer"]) == pytest.approx(0.1 + 0.4 + 2.1)
    assert rows[0]["layer_dist"] == "·█··"
    assert rows[1]["layer_p"] == "0.0000 0.1000 0.2000 0.7000"
    # latent 3, rank 1: token 35 ("x", no leading space) at position 15 of context 1; 12 tokens
    # before it (positions 3..14 = ids 23..34) and 4 after (ids 36..39), same context only.
    first = rows[0]["contexts"].split("\n")
    assert first[0] == "9 @1: " + decode(list(range(23, 35))).replace("\n", "⏎") + "«x»" + decode(list(range(36, 40)))
    # latent 0, rank 1: token 2 is near the start of context 0 (nothing before index 0)
    assert rows[2]["contexts"].split("\n")[0] == "3 @0:  w0 w1« w2»".replace("« w2»", " «w2»") + " w3 w4 w5 w6"
    assert len(rows[2]["contexts"].split("\n")) == 2  # contexts_per_latent
    md = (run["tables_dir"] / "top_latents.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3
    assert "«x»" in table[1] and "a\\|b" in table[1] and "⏎" in table[1]  # pipe escaped, newline visible
    assert all(line.count(" | ") == table[0].count(" | ") for line in table)  # no stray cell breaks


def test_context_window_stays_in_its_context() -> None:
    # token 21 is position 1 of context 1: one token before it in that context, not the 12 of context 0
    text = report.token_context(21, TOKENS, CONTEXT, POSITION, decode)
    assert text == " w20 «w21» w22 w23 w24 w25"
    # token 59 is the last of the store: nothing after it
    assert report.token_context(59, TOKENS, CONTEXT, POSITION, decode, before=2).endswith(" w57 w58 «w59»")


def test_figures_and_plot_csvs(run: dict[str, Path]) -> None:
    out = _build(run)
    figures = sorted(Path(p).name for p in out["figures"])
    assert figures == sorted(set(report.FIGURES) - {report.LENS_FIG})
    for name in figures:
        _assert_png(run["figures_dir"] / name)
    assert not (run["figures_dir"] / report.LENS_FIG).exists()
    # the declared DVC plot always exists: header only when there is no lens
    assert (run["plots_dir"] / LENS_PLOT.name).read_text() == "layer,kl_logit_lens,kl_tuned_lens\n"
    assert set(out["skipped"]) == {report.LENS_FIG}

    mean_hist = _read_csv(run["plots_dir"] / report.MEAN_HIST_PLOT)
    # latents counted (count >= 10): 0, 1, 2, 3 with mu_f 0.3, 2.6, 1.5, 1.0
    assert sum(int(r["count"]) for r in mean_hist) == 4
    centres = [float(r["mean_layer"]) for r in mean_hist if int(r["count"])]
    assert len(centres) == 4 and all(float(r["bin_start"]) <= float(r["bin_end"]) for r in mean_hist)
    std_hist = _read_csv(run["plots_dir"] / report.STD_HIST_PLOT)
    assert sum(int(r["count"]) for r in std_hist) == 4
    largest_std = max(
        float(np.sqrt(((np.arange(L) - np.dot(np.arange(L), d)) ** 2) @ d)) for c, _, d in LATENTS.values() if c >= 10
    )
    assert largest_std < float(std_hist[-1]["bin_end"]) <= (L - 1) / 2  # the range covers every sigma_f
    adjacent = _read_csv(run["plots_dir"] / ADJ_COS_PLOT.name)
    assert [(int(r["layer"]), float(r["adjacent_cos"])) for r in adjacent] == [(0, 0.9), (1, 0.8), (2, 0.7)]
    activity = _read_csv(run["plots_dir"] / report.LAYER_ACTIVITY_PLOT)
    assert [int(r["n_latents_active"]) for r in activity] == [3, 4, 3, 2]
    assert (run["plots_dir"] / TRAIN_PLOT.name).read_text().startswith("step,loss")  # untouched


def test_heatmap_subsamples_many_latents(run: dict[str, Path]) -> None:
    # max_heatmap_rows below the number of counted latents still renders
    out = _build(run, max_heatmap_rows=2)
    _assert_png(Path(out["figures"][0]))


def test_lens_outputs_when_a_lens_is_used(run: dict[str, Path]) -> None:
    # a stale lens figure from an earlier lens: none run is not what we check; write lens outputs
    _write_json(run["metrics_dir"] / LENS_METRICS.name, LENS_FIT)
    _write_json(run["sae_config_path"], {**CONFIG, "lens": "fit"})
    out = _build(run)
    assert out["skipped"] == {}
    _assert_png(run["figures_dir"] / report.LENS_FIG)
    lens_rows = _read_csv(run["plots_dir"] / LENS_PLOT.name)
    assert [float(r["kl_logit_lens"]) for r in lens_rows] == LENS_FIT["kl_logit_lens_by_layer"]
    assert [float(r["kl_tuned_lens"]) for r in lens_rows] == LENS_FIT["kl_tuned_lens_by_layer"]
    layer_rows = _read_csv(run["tables_dir"] / "layers.csv")
    assert [float(r["kl_logit_lens"]) for r in layer_rows] == LENS_FIT["kl_logit_lens_by_layer"]
    assert out["summary"]["lens"] == "fit"

    # back to lens none: the stale lens outputs are removed
    _write_json(run["metrics_dir"] / LENS_METRICS.name, {"lens": "none"})
    _write_json(run["sae_config_path"], CONFIG)
    _build(run)
    assert not (run["figures_dir"] / report.LENS_FIG).exists()
    assert _read_csv(run["plots_dir"] / LENS_PLOT.name) == []


def test_subset_of_layers_maps_blocks(run: dict[str, Path]) -> None:
    # an SAE on blocks [1, 3] of a 4-block model: adjacent cos and lens KL are looked up by block
    blocks = [1, 3]
    _write_json(run["sae_config_path"], {**CONFIG, "layers": blocks, "lens": "fit"})
    _write_json(run["metrics_dir"] / LENS_METRICS.name, LENS_FIT)
    ev = {k: (v[:2] if isinstance(v, list) else v) for k, v in EVAL.items()}
    _write_json(run["metrics_dir"] / EVAL_METRICS.name, {**ev, "layers": blocks})
    _write_json(run["metrics_dir"] / TRAIN_METRICS.name, {**TRAIN, "fvu_by_layer": [0.2, 0.3]})
    _write_json(run["metrics_dir"] / ANALYSIS_METRICS.name, {**ANALYSIS, "n_layers": 2})
    analysis = run["analysis_dir"]
    pl.read_parquet(analysis / LAYER_STATS.name).head(2).with_columns(
        block=pl.Series(blocks, dtype=pl.Int32)
    ).write_parquet(analysis / LAYER_STATS.name)
    latents = pl.read_parquet(analysis / LATENT_STATS.name)
    latents.with_columns(layer_dist=pl.col("layer_dist").list.head(2)).write_parquet(analysis / LATENT_STATS.name)
    top = pl.read_parquet(analysis / TOP_TOKENS.name)
    top.with_columns(layer=pl.col("layer") % 2).write_parquet(analysis / TOP_TOKENS.name)
    out = _build(run)
    rows = _read_csv(run["tables_dir"] / "layers.csv")
    assert [int(r["block"]) for r in rows] == blocks
    assert [r["adjacent_cos"] for r in rows] == ["0.8", ""]
    assert [float(r["kl_logit_lens"]) for r in rows] == [3.0, 0.0]
    # the baseline covers every block: the SAE's are looked up by block
    assert [float(r["delta_ce_mean"]) for r in rows] == [2.0, 3.1]
    assert out["summary"]["layers"] == "1,3"
    # a baseline without one of the SAE's blocks is refused, naming the fix
    _write_json(
        run["metrics_dir"] / BASELINE_METRICS.name, {**BASELINE, "layers": [0, 1], "delta_ce_mean_by_layer": [1.0, 2.0]}
    )
    with pytest.raises(
        MlsaeError,
        match=r"baseline\.json: no delta_ce_mean for some of the SAE's blocks \[1, 3\]; "
        r"rerun the baseline stage",
    ):
        _build(run)


def test_bad_inputs_raise_one_line_naming_the_file(run: dict[str, Path]) -> None:
    (run["metrics_dir"] / BASELINE_METRICS.name).rename(run["metrics_dir"] / "kept.json")
    with pytest.raises(MlsaeError, match=r"baseline\.json: not found \(run the stage that writes it first\)"):
        _build(run)
    (run["metrics_dir"] / "kept.json").rename(run["metrics_dir"] / BASELINE_METRICS.name)
    (run["analysis_dir"] / TOP_TOKENS.name).unlink()
    with pytest.raises(MlsaeError, match="top_tokens.parquet: not found"):
        _build(run)
    assert not run["tables_dir"].exists() and not run["figures_dir"].exists()  # nothing half-written

    _write_json(run["metrics_dir"] / EVAL_METRICS.name, {**EVAL, "fvu_by_layer": [0.1]})
    with pytest.raises(MlsaeError, match=r"eval\.json: 'fvu_by_layer' must be a list of 4"):
        _build(run)
    (run["metrics_dir"] / ANALYSIS_METRICS.name).write_text("{not json")
    with pytest.raises(MlsaeError, match=r"analysis\.json: not valid JSON"):
        _build(run)


def test_top_token_outside_eval_tokens(run: dict[str, Path]) -> None:
    with pytest.raises(MlsaeError, match="top_tokens.parquet: token index"):
        report.build_report(**run, tokens=TOKENS[:30], context=CONTEXT[:30], position=POSITION[:30], decode=decode)


def test_summary_text_verdicts() -> None:
    row = report.summary_row({"analysis": ANALYSIS, "eval": EVAL, "extract": EXTRACT}, CONFIG)
    text = report.summary_text(row)
    assert "tiny-llama" in text and "FVU 0.3" in text and "paper's ratio 100" in text
    assert "2.0 orders of magnitude, close to the paper's about two" in text and "0.008 (0.006–0.011)" in text
    assert row["within_share_ci"] == "0.006–0.011"
    assert "1.0 orders of magnitude, short" in report.variance_verdict({**row, "var_ratio_paper": 10.0})
    assert "less than one order" in report.variance_verdict({**row, "var_ratio_paper": 2.0})
    assert "undefined" in report.variance_verdict({**row, "within_share": None})
    assert len(text.splitlines()) <= 12


def test_helpers() -> None:
    assert report.format_layers([0, 1, 2, 3, 5, 7, 8]) == "0-3,5,7,8"
    assert report.format_layers("all") == "all"
    assert report.format_layers([3]) == "3"
    assert report.layer_sparkline([0.0, 0.5, 1.0]) == "·▄█"


def test_report_reads_the_aggregate_stage_output(run: dict[str, Path], tmp_path: Path) -> None:
    """The real aggregate stage's parquet files go through the report unchanged."""
    zarr = pytest.importorskip("zarr")
    from mlsae.analysis.aggregate import aggregate
    from mlsae.core.params import AnalysisParams
    from mlsae.stores.activations import seal

    rng = np.random.default_rng(0)
    k, n_latents = 2, 6
    indices = np.stack([rng.permutation(n_latents)[:k] for _ in range(N_TOKENS * L)]).reshape(N_TOKENS, L, k)
    values = rng.uniform(0.1, 2.0, size=(N_TOKENS, L, k)).astype(np.float16)
    store = tmp_path / "latents.zarr"
    root = zarr.open_group(str(store), mode="w")
    root.create_array("indices", data=indices.astype(np.int32), chunks=(16, L, k))
    root.create_array("values", data=values, chunks=(16, L, k))
    root.create_array("special", data=np.zeros(N_TOKENS, dtype=bool), chunks=(16,))
    root.create_array("position", data=(np.arange(N_TOKENS) % 8).astype(np.int16), chunks=(16,))
    root.create_array("document", data=np.arange(N_TOKENS, dtype=np.int64) // 10, chunks=(16,))  # 6 documents
    seal(root, store, "dump")
    root.attrs.update({"layers": BLOCKS, "n_latents": n_latents, "k": k, "complete": True})
    metrics = aggregate(
        store,
        run["analysis_dir"],
        run["metrics_dir"] / ANALYSIS_METRICS.name,
        AnalysisParams(min_count=1, min_documents=1),
    )

    out = _build(run, top_latents=4, min_count=1)
    rows = _read_csv(run["tables_dir"] / "top_latents.csv")
    masses = [float(r["mass"]) for r in rows]
    assert len(rows) == 4 and masses == sorted(masses, reverse=True)
    assert all("«" in r["contexts"] and "»" in r["contexts"] for r in rows)
    assert out["summary"]["within_share"] == pytest.approx(metrics["within_share"])
    assert len(_read_csv(run["tables_dir"] / "layers.csv")) == L


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------


def _table_rows(out: Path) -> list[dict[str, str]]:
    return _read_csv(out.with_suffix(".csv"))


def test_compare_rows_from_captured_exp_show(tmp_path: Path) -> None:
    out = tmp_path / "compare" / "experiments.md"
    table = compare(out, EXP_SHOW_ROWS)
    rows = _table_rows(out)
    assert rows == [{k: "" if v is None else str(v) for k, v in r.items()} for r in table.iter_rows(named=True)]
    got = table.to_dicts()
    assert [r["experiment"] for r in got] == ["workspace", "master", "single3", "k64", "pending", "broken"]
    assert [r["rev"] for r in got][:3] == ["workspace", "master", "e7a90d1"]
    assert [r["model"] for r in got] == ["smollm2-135m"] * 4 + ["gpt2", "smollm2-135m"]
    # `lens` is both a param and a metric: DVC prefixes both with their file
    assert [r["lens"] for r in got] == ["none", "none", "fit", "none", "fit", "fit"]
    assert [r["sae.layers"] for r in got] == ["all", "all", "3", "all", "3", "3"]  # "[3]" back to a list
    # DVC gives numbers as floats
    assert [r["sae.k"] for r in got] == [64, 32, 64, 64, 64, 0]
    assert [r["train.seed"] for r in got] == [0, 0, 1, 0, 1, 1]
    assert [r["data.train_tokens"] for r in got] == [65536] * 4 + [1000, 65536]  # a param that varies
    assert "sae.auxk" not in table.columns and "evaluate.baselines" not in table.columns  # constant
    assert "make.py" not in table.columns  # a dependency's hash, not a param
    # metrics, by stage: queued experiments have none
    assert [r["fvu"] for r in got][:5] == [0.0390625, 0.078125, 0.0390625, 0.0390625, None]
    assert [r["delta_ce"] for r in got][:2] == [0.025, 0.05]
    assert [r["loss_recovered"] for r in got][:2] == [0.9875, 0.975] and got[1]["delta_ce_mean"] == 2.0
    assert got[2]["var_ratio"] == 100.0 and got[1]["var_ratio"] == 150.0
    assert got[1]["ce_clean"] == 2.9  # eval.json's (baseline.json has one too)
    assert (got[1]["n_latents"], got[1]["n_layers"], got[1]["d_model"]) == (9216, 30, 576)
    assert got[1]["adjacent_cos"] == 0.85 and got[1]["eval_documents"] == 40 and got[1]["auxk_steps"] == 3
    assert all(got[4][k] is None for k in ("fvu", "var_ratio", "n_latents", "adjacent_cos"))
    md = out.read_text().splitlines()
    table_lines = [line for line in md if line.startswith("| ")]
    assert len(table_lines) == 1 + 6
    assert table_lines[3].startswith("| single3 | e7a90d1 |")


def test_compare_statuses_and_baselines_from_captured_exp_show(tmp_path: Path) -> None:
    got = compare(tmp_path / "experiments.md", EXP_SHOW_ROWS).to_dicts()
    assert [r["status"] for r in got] == ["workspace", "baseline", "done", "done", "queued", "failed"]
    assert [r["baseline"] for r in got] == ["", "master", "master", "master", "master", "master"]
    assert got[5]["fvu"] is None and got[5]["notes"] == "no metrics (failed)"


def test_compare_rejects_rows_not_in_exp_shows_form(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(MlsaeError, match=r"bad\.json: not valid JSON"):
        read_rows(tmp_path / "bad.json")
    with pytest.raises(MlsaeError, match=r"missing\.json: not found"):
        read_rows(tmp_path / "missing.json")
    for rows in ([{"Experiment": "x"}], [1, 2], [{"workspace": {"baseline": {}}}]):  # the last: DVC 2.x's layout
        with pytest.raises(MlsaeError, match=r"^rows\.json: expected the rows of dvc\.api\.exp_show"):
            compare(tmp_path / "x.md", rows, source="rows.json")
    assert not (tmp_path / "x.md").exists()


def test_compare_leaves_missing_metrics_empty() -> None:
    """A metrics file an experiment lacks (its keys null in the rows) leaves its columns empty and
    the other stages' figures in place."""
    row = {**EXP_SHOW_ROWS[1]}
    for key in ("var_ratio", "within_share", "multi_layer_fraction", "reports/metrics/analysis.json:n_layers"):
        row[key] = None
    got = experiment_rows(experiments_from_rows([row])).row(0, named=True)
    assert got["var_ratio"] is None and got["within_share"] is None and got["fvu"] == 0.078125


@pytest.mark.slow
def test_compare_runs_dvc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end with the installed DVC: a toy stage, one experiment, then compare() asking DVC."""
    import subprocess
    import sys

    repo = tmp_path / "repo"
    repo.mkdir()
    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(key, "test")
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, "test@example.com")
    (repo / "params.yaml").write_text("model: tiny-llama\ntrain:\n  seed: 0\nlens: none\nsae:\n  layers: all\n  k: 4\n")
    (repo / "make.py").write_text(
        "import json, os, yaml\n"
        "p = yaml.safe_load(open('params.yaml'))\n"
        "os.makedirs('reports/metrics', exist_ok=True)\n"
        "json.dump({'fvu': 1 / p['sae']['k'], 'fvu_by_layer': [0.5]}, open('reports/metrics/eval.json', 'w'))\n"
    )
    (repo / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: python make.py\n    deps: [make.py]\n    params: [model, train, lens, sae]\n"
        "    metrics:\n      - reports/metrics/eval.json:\n          cache: false\n"
    )
    dvc = [sys.executable, "-m", "dvc"]
    env_path = f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}"
    monkeypatch.setenv("PATH", env_path)
    for command in (
        ["git", "init", "-q"],
        [*dvc, "init", "-q"],
        [*dvc, "repro", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "base"],
        [*dvc, "exp", "run", "-q", "-n", "k8", "-S", "sae.k=8"],
    ):
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    table = compare(tmp_path / "experiments.md", repo_dir=repo)
    rows = {r["experiment"]: r for r in table.iter_rows(named=True)}
    assert set(rows) >= {"workspace", "k8"}
    assert rows["k8"]["sae.k"] == 8 and rows["k8"]["fvu"] == pytest.approx(0.125)
    assert rows["workspace"]["fvu"] == pytest.approx(0.125)  # the experiment's outputs are in the workspace
    base = [r for name, r in rows.items() if name in ("master", "main")]
    assert len(base) == 1 and base[0]["fvu"] == pytest.approx(0.25) and base[0]["sae.k"] == 4
    # (statuses and baselines: test_compare_statuses_and_baselines_from_captured_exp_show)


# dvc.api.exp_show() rows (DVC 3.67.1) of a toy repo with this project's params and metrics files:
# baseline `master` (sae.k 32), two finished experiments (k64; single3: layers [3], lens fit,
# train.seed 1), one queued (pending) and one that failed in the queue (broken, sae.k 0), with k64
# applied to the workspace. Captured as returned; only the timestamps are as they came.
EXP_SHOW_ROWS: list[dict[str, Any]] = [
    {
        "Experiment": None,
        "rev": "workspace",
        "typ": "baseline",
        "Created": None,
        "parent": None,
        "State": None,
        "Executor": None,
        "tokens": 73728.0,
        "reports/metrics/extract.json:n_layers": 30.0,
        "d_model": 576.0,
        "adjacent_cos": 0.85,
        "eval_documents": 40.0,
        "reports/metrics/lens.json:lens": "none",
        "reports/metrics/train.json:fvu": 0.03125,
        "steps": 128.0,
        "n_latents": 9216.0,
        "auxk_steps": 3.0,
        "reports/metrics/baseline.json:ce_clean": 2.9,
        "delta_ce_mean": 2.0,
        "reports/metrics/eval.json:fvu": 0.0390625,
        "delta_ce": 0.025,
        "loss_recovered": 0.9875,
        "kl": 0.02,
        "l0": 64.0,
        "reports/metrics/eval.json:ce_clean": 2.9,
        "var_ratio": 150.0,
        "within_share": 0.006666666666666667,
        "multi_layer_fraction": 0.4,
        "reports/metrics/analysis.json:n_layers": 30.0,
        "model": "smollm2-135m",
        "data.train_tokens": 65536.0,
        "params.yaml:lens": "none",
        "sae.layers": "all",
        "sae.expansion": 16.0,
        "sae.k": 64.0,
        "train.seed": 0.0,
        "evaluate.baselines": "['mean']",
        "make.py": "55a8b24282d658ac9033ea952a538859",
    },
    {
        "Experiment": None,
        "rev": "master",
        "typ": "baseline",
        "Created": "01:25 PM",
        "parent": None,
        "State": None,
        "Executor": None,
        "tokens": 73728.0,
        "reports/metrics/extract.json:n_layers": 30.0,
        "d_model": 576.0,
        "adjacent_cos": 0.85,
        "eval_documents": 40.0,
        "reports/metrics/lens.json:lens": "none",
        "reports/metrics/train.json:fvu": 0.0625,
        "steps": 128.0,
        "n_latents": 9216.0,
        "auxk_steps": 3.0,
        "reports/metrics/baseline.json:ce_clean": 2.9,
        "delta_ce_mean": 2.0,
        "reports/metrics/eval.json:fvu": 0.078125,
        "delta_ce": 0.05,
        "loss_recovered": 0.975,
        "kl": 0.04,
        "l0": 32.0,
        "reports/metrics/eval.json:ce_clean": 2.9,
        "var_ratio": 150.0,
        "within_share": 0.006666666666666667,
        "multi_layer_fraction": 0.4,
        "reports/metrics/analysis.json:n_layers": 30.0,
        "model": "smollm2-135m",
        "data.train_tokens": 65536.0,
        "params.yaml:lens": "none",
        "sae.layers": "all",
        "sae.expansion": 16.0,
        "sae.k": 32.0,
        "train.seed": 0.0,
        "evaluate.baselines": "['mean']",
        "make.py": "55a8b24282d658ac9033ea952a538859",
    },
    {
        "Experiment": "single3",
        "rev": "e7a90d1",
        "typ": "branch_commit",
        "Created": "01:25 PM",
        "parent": None,
        "State": None,
        "Executor": None,
        "tokens": 73728.0,
        "reports/metrics/extract.json:n_layers": 30.0,
        "d_model": 576.0,
        "adjacent_cos": 0.85,
        "eval_documents": 40.0,
        "reports/metrics/lens.json:lens": "fit",
        "reports/metrics/train.json:fvu": 0.03125,
        "steps": 128.0,
        "n_latents": 9216.0,
        "auxk_steps": 3.0,
        "reports/metrics/baseline.json:ce_clean": 2.9,
        "delta_ce_mean": 2.0,
        "reports/metrics/eval.json:fvu": 0.0390625,
        "delta_ce": 0.025,
        "loss_recovered": 0.9875,
        "kl": 0.02,
        "l0": 64.0,
        "reports/metrics/eval.json:ce_clean": 2.9,
        "var_ratio": 100.0,
        "within_share": 0.01,
        "multi_layer_fraction": 0.4,
        "reports/metrics/analysis.json:n_layers": 30.0,
        "model": "smollm2-135m",
        "data.train_tokens": 65536.0,
        "params.yaml:lens": "fit",
        "sae.layers": "[3]",
        "sae.expansion": 16.0,
        "sae.k": 64.0,
        "train.seed": 1.0,
        "evaluate.baselines": "['mean']",
        "make.py": "55a8b24282d658ac9033ea952a538859",
    },
    {
        "Experiment": "k64",
        "rev": "a75005d",
        "typ": "branch_commit",
        "Created": "01:25 PM",
        "parent": None,
        "State": None,
        "Executor": None,
        "tokens": 73728.0,
        "reports/metrics/extract.json:n_layers": 30.0,
        "d_model": 576.0,
        "adjacent_cos": 0.85,
        "eval_documents": 40.0,
        "reports/metrics/lens.json:lens": "none",
        "reports/metrics/train.json:fvu": 0.03125,
        "steps": 128.0,
        "n_latents": 9216.0,
        "auxk_steps": 3.0,
        "reports/metrics/baseline.json:ce_clean": 2.9,
        "delta_ce_mean": 2.0,
        "reports/metrics/eval.json:fvu": 0.0390625,
        "delta_ce": 0.025,
        "loss_recovered": 0.9875,
        "kl": 0.02,
        "l0": 64.0,
        "reports/metrics/eval.json:ce_clean": 2.9,
        "var_ratio": 150.0,
        "within_share": 0.006666666666666667,
        "multi_layer_fraction": 0.4,
        "reports/metrics/analysis.json:n_layers": 30.0,
        "model": "smollm2-135m",
        "data.train_tokens": 65536.0,
        "params.yaml:lens": "none",
        "sae.layers": "all",
        "sae.expansion": 16.0,
        "sae.k": 64.0,
        "train.seed": 0.0,
        "evaluate.baselines": "['mean']",
        "make.py": "55a8b24282d658ac9033ea952a538859",
    },
    {
        "Experiment": "pending",
        "rev": "8a5ea3d",
        "typ": "branch_commit",
        "Created": "01:25 PM",
        "parent": None,
        "State": "Queued",
        "Executor": "Dvc-task",
        "tokens": None,
        "reports/metrics/extract.json:n_layers": None,
        "d_model": None,
        "adjacent_cos": None,
        "eval_documents": None,
        "reports/metrics/lens.json:lens": None,
        "reports/metrics/train.json:fvu": None,
        "steps": None,
        "n_latents": None,
        "auxk_steps": None,
        "reports/metrics/baseline.json:ce_clean": None,
        "delta_ce_mean": None,
        "reports/metrics/eval.json:fvu": None,
        "delta_ce": None,
        "loss_recovered": None,
        "kl": None,
        "l0": None,
        "reports/metrics/eval.json:ce_clean": None,
        "var_ratio": None,
        "within_share": None,
        "multi_layer_fraction": None,
        "reports/metrics/analysis.json:n_layers": None,
        "model": "gpt2",
        "data.train_tokens": 1000.0,
        "params.yaml:lens": "fit",
        "sae.layers": "[3]",
        "sae.expansion": 16.0,
        "sae.k": 64.0,
        "train.seed": 1.0,
        "evaluate.baselines": "['mean']",
        "make.py": "55a8b24282d658ac9033ea952a538859",
    },
    {
        "Experiment": "broken",
        "rev": "d4bebb7",
        "typ": "branch_base",
        "Created": "01:25 PM",
        "parent": None,
        "State": "Failed",
        "Executor": None,
        "tokens": 73728.0,
        "reports/metrics/extract.json:n_layers": 30.0,
        "d_model": 576.0,
        "adjacent_cos": 0.85,
        "eval_documents": 40.0,
        "reports/metrics/lens.json:lens": "fit",
        "reports/metrics/train.json:fvu": 0.03125,
        "steps": 128.0,
        "n_latents": 9216.0,
        "auxk_steps": 3.0,
        "reports/metrics/baseline.json:ce_clean": 2.9,
        "delta_ce_mean": 2.0,
        "reports/metrics/eval.json:fvu": 0.0390625,
        "delta_ce": 0.025,
        "loss_recovered": 0.9875,
        "kl": 0.02,
        "l0": 64.0,
        "reports/metrics/eval.json:ce_clean": 2.9,
        "var_ratio": 100.0,
        "within_share": 0.01,
        "multi_layer_fraction": 0.4,
        "reports/metrics/analysis.json:n_layers": 30.0,
        "model": "smollm2-135m",
        "data.train_tokens": 65536.0,
        "params.yaml:lens": "fit",
        "sae.layers": "[3]",
        "sae.expansion": 16.0,
        "sae.k": 0.0,
        "train.seed": 1.0,
        "evaluate.baselines": "['mean']",
        "make.py": "55a8b24282d658ac9033ea952a538859",
    },
]
EXP_SHOW_JSON = json.dumps(EXP_SHOW_ROWS)
