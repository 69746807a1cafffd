"""benchmarks/coverage.py, the coverage study of the aggregate stage's intervals, at a tiny size.

Checks the machinery, not the coverage: the generator's float16 rounding, that the latent store it
writes analyses (by the real aggregate stage) to the plug-in values computed independently from
the generator's own per-firing records, that the counted set is read back correctly, that the
population truth agrees with a direct Monte-Carlo estimate from a large sample, and that the
result JSON has every field.
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


def plugin_from_firings(sample: dict, min_count: int, min_documents: int) -> dict:
    """The headline plug-in values from the generator's per-firing records, in plain numpy."""
    fire = sample["firing"]
    latent, doc = sample["firing_latent"], sample["firing_document"]
    m, mu, v = fire[:, 0], fire[:, 1], fire[:, 3]
    n = np.bincount(latent, minlength=F)
    docs = np.array([np.unique(doc[latent == f]).size for f in range(F)])
    counted = (n >= min_count) & (docs >= min_documents)
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
    return {
        "counted": counted,
        "within_share": within[counted].sum() / total[counted].sum(),
        "within_share_mass": terms["_mass"][0][counted].sum() / terms["_mass"][1][counted].sum(),
        "within_share_peak": terms["_peak"][0][counted].sum() / terms["_peak"][1][counted].sum(),
        "within_share_pooled": (n * within)[counted].sum() / (n * total)[counted].sum(),
        "effective_layers": np.exp(fire[:, 4]).mean(),
        "multi_layer_fraction": (fire[:, 5] >= 0.1).mean(),
        "n_tokens": int((~sample["special"]).sum()),
    }


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
    for key in ("within_share", "within_share_mass", "within_share_peak", "within_share_pooled"):
        assert run["figures"][key]["plugin"] == pytest.approx(expected[key], rel=1e-8), key
    for key in ("effective_layers", "multi_layer_fraction"):
        assert run["figures"][key]["plugin"] == pytest.approx(expected[key], rel=1e-10), key
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


def test_study_writes_every_field(cov: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "coverage.json"
    argv = ["--reps", "3", "--documents", str(D), "--latents", str(F), "--layers", str(L), "--bootstrap", "20"]
    argv += ["--truth-pairs", "2000", "--min-count", "5", "--min-documents", "3", "--k", "4", "--out", str(out)]
    cov.main(argv)
    result = json.loads(out.read_text())
    assert {"command", "settings", "population", "truth_seconds", "wall_seconds", "cpu_seconds"} <= set(result)
    assert f"D{D}" in result and len(result["load_average"]) == 3
    part = result[f"D{D}"]
    assert part["reps"] == 3 and part["k_max"] >= 4 and part["seconds"] > 0 and part["cpu_seconds"] > 0
    fields = {"interval", "n", "coverage", "coverage_mc_se", "reaches_target", "width", "truth_mean", "bias"}
    fields |= {"bias_se", "plugin_bias_se", "se_mean", "error_sd", "se_over_error_sd", "bias_flag_rate"}
    for key in cov.STATISTICS:
        assert set(part[key]) == fields, key
        assert part[key]["n"] == 3 and 0 <= part[key]["coverage"] <= 1 and part[key]["width"] > 0, key
        assert part[key]["interval"] == (key not in NO_INTERVAL), key
    assert "| within_share |" in cov.table(result)
