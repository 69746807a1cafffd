"""benchmarks/coverage.py, the coverage study of the aggregate stage's intervals, at a tiny size.

Checks the machinery, not the coverage: the generator's float16 rounding, that the latent store it
writes analyses (by the real aggregate stage) to the plug-in values computed independently from
the generator's own per-firing records, that the counted set is read back correctly, that the
population truth agrees with a direct Monte-Carlo estimate from a large sample, that the evaluate
side's synthetic split and sums reach the stages' functions as meant and its truth agrees with a
large sample, and that the result JSON has every field. And the rule the study serves, against the
committed results (benchmarks/results/coverage.json): the stages print an interval for a figure
exactly when the study measured its coverage at >= 90 % at every document count.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from mlsae.analysis.aggregate import aggregate
from mlsae.analysis.decomposition import NO_INTERVAL

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "coverage.py"
F, L, D = 60, 6, 16


@pytest.fixture(scope="module")
def cov() -> Iterator[ModuleType]:
    """The script as a module (under a name that is not the `coverage` package's)."""
    spec = importlib.util.spec_from_file_location("coverage_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["coverage_benchmark"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("coverage_benchmark", None)


@pytest.fixture(scope="module")
def pop(cov: ModuleType) -> dict:
    return cov.make_population(F, L, seed=3)


def test_float16_rounding_is_numpys(cov: ModuleType) -> None:
    x = np.exp(np.random.default_rng(0).uniform(-20, 10, 5000))  # subnormal to large
    x = np.concatenate([x, [0.0, 2.0**-24, 3 * 2.0**-25, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11]])  # and ties
    ours = np.array([cov.to_float16(v) for v in x])
    assert np.array_equal(ours, x.astype(np.float16).astype(np.float64))


def plugin_from_firings(sample: dict, min_count: int, min_documents: int, max_rate: float = 0.5) -> dict:
    """The headline plug-in values from the generator's per-firing records, in plain numpy."""
    fire = sample["firing"]
    latent, doc = sample["firing_latent"], sample["firing_document"]
    m, mu, v = fire[:, 0], fire[:, 1], fire[:, 3]
    n = np.bincount(latent, minlength=F)
    docs = np.array([np.unique(doc[latent == f]).size for f in range(F)])
    counted = (n >= min_count) & (docs >= min_documents)
    tokens = int((~sample["special"]).sum())
    rate = n / tokens
    terms = {}
    for name, w in (("", np.ones_like(m)), ("_mass", m), ("_peak", fire[:, 6])):
        within, total = np.zeros(F), np.zeros(F)
        for f in np.flatnonzero(counted):
            sel = latent == f
            mean = np.average(mu[sel], weights=w[sel])
            within[f] = np.average(v[sel], weights=w[sel])
            total[f] = within[f] + np.average((mu[sel] - mean) ** 2, weights=w[sel])
        terms[name] = (within, total)
    within, total = terms[""]
    out = {
        "counted": counted,
        "within_share_pooled": (n * within)[counted].sum() / (n * total)[counted].sum(),
        "effective_layers": np.exp(fire[:, 4]).mean(),
        "multi_layer_fraction": (fire[:, 5] >= 0.1).mean(),
        "n_tokens": tokens,
    }
    for name, (w_f, t_f) in terms.items():
        out[f"within_share{name}"] = w_f[counted].sum() / t_f[counted].sum()
        out[f"var_ratio{name}"] = t_f[counted].sum() / w_f[counted].sum()
        out[f"var_within{name}"] = w_f[counted].mean()
        out[f"var_between{name}"] = (t_f - w_f)[counted].mean()
        out[f"var_total{name}"] = t_f[counted].mean()
    out["var_ratio_pooled"] = 1 / out["within_share_pooled"]
    out["var_within_norm"] = out["var_within"] / (L - 1) ** 2
    sparse = counted & (rate < max_rate)
    out["within_share_peak_sparse"] = terms["_peak"][0][sparse].sum() / terms["_peak"][1][sparse].sum()
    out["within_share_pooled_sparse"] = (n * within)[sparse].sum() / (n * total)[sparse].sum()
    mass = np.bincount(latent, weights=m, minlength=F)
    for cut in (50, 90):
        out[f"dense_mass_share_{cut}"] = mass[rate >= cut / 100].sum() / mass.sum()
    out["dense_within_share"] = within[counted & (rate >= max_rate)].sum() / within[counted].sum()
    # the seed paper's estimator over one batch (every document): q_f = sum_t p_tf / T
    first = np.bincount(latent, weights=mu, minlength=F) / tokens  # sum_l l q_f(l)
    second = np.bincount(latent, weights=v + mu**2, minlength=F) / tokens  # sum_l l^2 q_f(l)
    depth = np.where(n > 0, first**2 / np.maximum(rate, 1e-300) - first**2, 0.0)
    out["var_token_paper"] = v.sum() / (tokens * F)
    out["var_aggregate_paper"] = (second - first**2).mean()
    out["var_aggregate_paper_depth"] = depth.mean()
    out["var_aggregate_paper_spread"] = (second - first**2 - depth).mean()
    out["var_ratio_paper"] = out["var_aggregate_paper"] / out["var_token_paper"]
    return out


def test_store_analyses_to_the_generators_values(cov: ModuleType, pop: dict, tmp_path: Path) -> None:
    sample = cov.simulate(pop, D, seed=7, k=4)
    assert sample["k"] >= 4 and sample["indices"].shape[2] == sample["k"]
    assert (sample["values"][sample["special"]] > 0).any()  # the special tokens carry activations
    store = cov.write_store(tmp_path / "latents.zarr", sample, pop)
    analysis = cov.analysis_params(20, 0, 5, 3)
    metrics = aggregate(store, tmp_path / "analysis", tmp_path / "analysis.json", analysis)
    run = cov.read_run(metrics, tmp_path / "analysis", analysis)
    expected = plugin_from_firings(sample, 5, 3)
    assert 3 <= expected["counted"].sum() < F
    np.testing.assert_array_equal(run["counted"], expected["counted"])
    assert metrics["n_tokens"] == expected["n_tokens"] and run["n_units"] == D
    assert metrics["paper_batches"] == 1  # fewer tokens than analysis.paper_batch_tokens: one batch
    assert 0 < expected["dense_mass_share_50"] < 1 and 0 < expected["dense_within_share"] < 1
    for key in expected.keys() - {"counted", "n_tokens"}:
        rel = 1e-10 if key in ("effective_layers", "multi_layer_fraction") else 1e-6 if "paper" in key else 1e-8
        assert run["figures"][key]["plugin"] == pytest.approx(expected[key], rel=rel), key
    written = json.loads((tmp_path / "analysis.json").read_text())
    for key, fig in run["figures"].items():
        assert fig["value"] == pytest.approx(written[key], rel=1e-12), key
        assert (fig["ci"] is None) == (key in NO_INTERVAL), key
        if fig["ci"] is not None:
            assert fig["ci"] == pytest.approx(written[f"{key}_ci"], rel=1e-12)
            assert fig["ci"][0] <= fig["value"] <= fig["ci"][1]


def test_truth_matches_a_direct_monte_carlo(cov: ModuleType, pop: dict) -> None:
    """The pair-sampled population truth against the same figures over a large sample (2000
    documents), with document-clustered standard errors."""
    tr = cov.population_truth(pop, npairs=20_000)
    sample = cov.simulate(pop, 2000, seed=11, k=4)
    fire, doc, latent = sample["firing"], sample["firing_document"], sample["firing_latent"]

    def ratio_z(x: np.ndarray, keep: np.ndarray, truth: float, truth_se: float) -> float:
        """(sample mean of x over `keep` - truth) / SE, with the SE of a ratio of document sums."""
        num = np.bincount(doc[keep], weights=x[keep], minlength=2000)
        den = np.bincount(doc[keep], minlength=2000).astype(float)
        mean = num.sum() / den.sum()
        se = np.sqrt(((num - mean * den) ** 2).sum()) / den.sum()
        return (mean - truth) / np.hypot(se, truth_se)

    pooled = cov.pooled_truth(tr)
    everything = np.ones(latent.size, bool)
    for name, x in (("effective_layers", np.exp(fire[:, 4])), ("multi_layer_fraction", fire[:, 5] >= 0.1)):
        assert abs(ratio_z(x.astype(float), everything, pooled[name], pooled[f"{name}_mc_se"])) < 4, name
    for f in np.argsort(-tr["lam"])[:5]:  # the latents with most firings: W_f = E[v], E[exp H]_f
        keep = latent == f
        assert abs(ratio_z(fire[:, 3], keep, tr["within"][f], 0.0)) < 4, f
        assert abs(ratio_z(np.exp(fire[:, 4]), keep, tr["eff"][f], 0.0)) < 4, f
    assert np.all(tr["total"] >= tr["within"]) and np.all(tr["total_mass"] >= tr["within_mass"])

    # The seed paper's figures (one batch of all 2000 documents) and the dense latents' mass
    # share, against the jackknife over documents (bias-corrected value and SE, as the stage's).
    tokens = np.bincount(sample["context"][~sample["special"]], minlength=2000).astype(float)
    mu, v, m = fire[:, 1], fire[:, 3], fire[:, 0]
    cell = doc * F + latent

    def per_doc(x: np.ndarray) -> np.ndarray:  # (documents, F) sums
        return np.bincount(cell, weights=x, minlength=2000 * F).reshape(2000, F)

    sums = {"n": per_doc(np.ones_like(mu)), "mu": per_doc(mu), "sq": per_doc(v + mu**2), "v": per_doc(v)}
    sums["m"] = per_doc(m)

    def paper(t: np.ndarray, n: np.ndarray, mu: np.ndarray, sq: np.ndarray, v: np.ndarray, m: np.ndarray) -> dict:
        first, rate = mu / t[:, None], n / t[:, None]
        aggregate = sq / t[:, None] - first**2
        depth = np.where(n > 0, first**2 / np.where(n > 0, rate, 1.0) - first**2, 0.0)
        dense = tr["rate"] >= 0.5
        return {
            "var_token_paper": v.sum(axis=1) / (t * F),
            "var_aggregate_paper": aggregate.mean(axis=1),
            "var_aggregate_paper_depth": depth.mean(axis=1),
            "var_aggregate_paper_spread": (aggregate - depth).mean(axis=1),
            "dense_mass_share_50": m[:, dense].sum(axis=1) / m.sum(axis=1),
        }

    point = paper(np.array([tokens.sum()]), **{k: x.sum(axis=0)[None] for k, x in sums.items()})
    jack = paper(tokens.sum() - tokens, **{k: x.sum(axis=0)[None] - x for k, x in sums.items()})
    everyone = np.ones(F, bool)
    truth = cov.truths(tr, everyone, everyone, everyone, L)
    assert 0 < truth["dense_mass_share_50"] < 1
    for key, values in jack.items():
        value = point[key][0] - 1999 * (values.mean() - point[key][0])
        se = np.sqrt(1999 / 2000 * ((values - values.mean()) ** 2).sum())
        assert abs(value - truth[key]) < 4 * se, (key, value, truth[key], se)


def test_study_writes_every_field(cov: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "coverage.json"
    argv = ["--reps", "3", "--documents", str(D), "--latents", str(F), "--layers", str(L), "--bootstrap", "20"]
    argv += ["--truth-pairs", "2000", "--min-count", "5", "--min-documents", "3", "--k", "4", "--out", str(out)]
    argv += ["--eval-reps", "3", "--units", "12", "20"]
    cov.main(argv)
    result = json.loads(out.read_text())
    assert {"command", "settings", "population", "truth_seconds", "wall_seconds", "cpu_seconds"} <= set(result)
    assert f"D{D}" in result and len(result["load_average"]) == 3
    part = result[f"D{D}"]
    assert part["reps"] == 3 and part["k_max"] >= 4 and part["seconds"] > 0 and part["cpu_seconds"] > 0
    fields = {"interval", "n", "coverage", "coverage_mc_se", "reaches_target", "width", "truth_mean", "bias"}
    fields |= {"bias_se", "plugin_bias_se", "se_mean", "error_sd", "se_over_error_sd", "bias_flag_rate"}
    for key in cov.STATISTICS:
        assert part[key]["interval"] == (key not in NO_INTERVAL), key
        if key == "dense_mass_share_90" and part[key]["n"] == 0:  # no latent that dense: SE 0, left out
            assert part[key]["coverage"] is None
            continue
        assert set(part[key]) == fields, key
        assert part[key]["n"] == 3 and 0 <= part[key]["coverage"] <= 1 and part[key]["width"] > 0, key
    assert "| within_share |" in cov.table(result) and "| delta_ce_by_layer |" in cov.table(result)
    evaluate = result["evaluate"]
    assert evaluate["settings"]["reps"] == 3 and set(evaluate["truth"]) == set(cov.EVAL_STATISTICS)
    for units in (12, 20):
        part = evaluate[f"U{units}"]
        assert part["reps"] == 3 and part["seconds"] > 0 and part["n_tokens_mean"] > units
        for key in cov.EVAL_STATISTICS:
            assert part[key]["interval"] and 0 <= part[key]["coverage"] <= 1, key
            if key.endswith("_by_layer"):
                assert part[key]["n"] == 3 * 4 and len(part[key]["coverage_by_layer"]) == 4, key
                assert part[key]["coverage_min_layer"] <= part[key]["coverage"], key
            else:
                assert set(part[key]) == fields and part[key]["n"] == 3 and part[key]["width"] > 0, key


# --------------------------------------------------------------------------------------------
# The evaluate side
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ev(cov: ModuleType) -> dict:
    return cov.eval_population()


def test_evaluate_functions_see_the_synthetic_split_and_sums(cov: ModuleType, ev: dict) -> None:
    """The stages' functions on the synthetic data give the plug-in values computed directly."""
    metrics = cov.eval_metrics(ev, 12, seed=5, n_resamples=20)
    split = cov.simulate_tokens(ev, 12, seed=5)
    keep = split.keep("eval")
    assert (~keep).sum() == 12 and metrics["bootstrap_units"] == 12
    x, err = split.x[keep].astype(np.float64), split.err[keep].astype(np.float64)
    fvu = (err**2).sum(axis=(0, 2)) / ((x - x.mean(axis=0)) ** 2).sum(axis=(0, 2))
    np.testing.assert_allclose(metrics["fvu_plugin_by_layer"], fvu, rtol=1e-5)
    assert metrics["fvu_plugin"] == pytest.approx(fvu.mean(), rel=1e-5)
    recon, base = cov.simulate_splice(ev, 12, seed=5)
    n, clean = recon.count.sum(), recon.ce_clean.sum()
    assert metrics["ce_clean_plugin"] == pytest.approx(clean / n, rel=1e-12)
    delta = {v: ce.sum(axis=0) / n - clean / n for v, ce in zip(("recon", *cov.ABLATIONS), (*recon.ce, *base.ce))}
    assert metrics["delta_ce_plugin"] == pytest.approx(delta["recon"].mean(), rel=1e-12)
    assert metrics["delta_ce_mean_plugin"] == pytest.approx(delta["mean"].mean(), rel=1e-12)
    assert metrics["kl_zero_plugin"] == pytest.approx((base.kl[1].sum(axis=0) / n).mean(), rel=1e-12)
    assert metrics["loss_recovered_plugin"] == pytest.approx((1 - delta["recon"] / delta["mean"]).mean(), rel=1e-12)


def test_evaluate_truth_matches_a_large_sample(cov: ModuleType, ev: dict) -> None:
    """Every evaluate figure of 2000 documents, bias-corrected, within 4 SE of its truth."""
    truth = cov.eval_truth(ev)
    metrics = cov.eval_metrics(ev, 2000, seed=9, n_resamples=2)
    t = cov.t_quantile(2000)
    for key in cov.EVAL_STATISTICS:
        if key.endswith("_by_layer"):
            for j, (lo, hi) in enumerate(metrics[f"{key}_ci"]):
                se = (hi - lo) / (2 * t)
                assert abs(metrics[key][j] - truth[key][j]) < 4 * se, (key, j, metrics[key][j], truth[key][j], se)
        else:
            assert abs(metrics[key] - truth[key]) < 4 * metrics[f"{key}_se"], (key, metrics[key], truth[key])


# --------------------------------------------------------------------------------------------
# The rule: an interval is printed exactly where the study measured >= 90 % coverage
# --------------------------------------------------------------------------------------------


def interval_keys(metrics: dict) -> set[str]:
    """The figures a stage's metrics print with an interval (``k_ci``; ``k_by_layer`` for
    ``k_by_layer_ci``)."""
    return {k.removesuffix("_ci") for k in metrics if k.endswith("_ci")}


def test_intervals_are_printed_exactly_where_the_study_measured_coverage(
    cov: ModuleType, pop: dict, ev: dict, tmp_path: Path
) -> None:
    """benchmarks/results/coverage.json against what the stages print now, by the real aggregate
    stage on a tiny store and the real evaluate and baseline functions on tiny sums: every figure
    printed with an interval was measured at >= 90 % at every document count of the study, and
    every figure measured below 90 % at one of them is printed without one."""
    result = json.loads((ROOT / "benchmarks" / "results" / "coverage.json").read_text())
    target = result["settings"]["target"]
    assert target == 0.9 and {64, 256} <= set(result["settings"]["documents"])
    assert {64, 256} <= set(result["evaluate"]["settings"]["units"])
    sample = cov.simulate(pop, D, seed=7, k=4)
    store = cov.write_store(tmp_path / "latents.zarr", sample, pop)
    analysis = cov.analysis_params(20, 0, 5, 3)
    aggregate_keys = interval_keys(aggregate(store, tmp_path / "analysis", tmp_path / "analysis.json", analysis))
    evaluate_keys = interval_keys(cov.eval_metrics(ev, 12, seed=1, n_resamples=20))
    assert {"within_share", "var_token_paper", "effective_layers"} <= aggregate_keys
    assert {"fvu", "delta_ce_by_layer", "ce_clean"} <= evaluate_keys
    parts = (
        (aggregate_keys, [result[f"D{d}"] for d in result["settings"]["documents"]]),
        (evaluate_keys, [result["evaluate"][f"U{u}"] for u in result["evaluate"]["settings"]["units"]]),
    )
    for printed, sizes in parts:
        unmeasured = printed - set.intersection(*(set(s) for s in sizes))
        assert not unmeasured, f"printed with an interval, never measured: {sorted(unmeasured)}"
        for key in set(sizes[0]) & set(cov.STATISTICS + cov.EVAL_STATISTICS):
            coverage = [s[key]["coverage"] for s in sizes]
            valid = all(c is not None and c >= target for c in coverage)
            assert (key in printed) == valid, f"{key}: coverage {coverage}, printed with an interval: {key in printed}"
