"""mlsae.stats: the document count matrix, the resampled sums and the reported figures, each
against a direct computation (explicit resampling loops, the textbook formulas)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from mlsae.core.errors import MlsaeError
from mlsae.stats.bootstrap import resample_counts, resampled, unit_index
from mlsae.stats.estimate import bias_flag, figures, summary, t_quantile


def test_resample_counts_are_seeded_multinomial_columns():
    w = resample_counts(7, 50, seed=3)
    assert w.shape == (7, 50) and w.dtype == np.int64
    assert (w.sum(axis=0) == 7).all() and (w >= 0).all()
    np.testing.assert_array_equal(w, resample_counts(7, 50, seed=3))
    assert not np.array_equal(w, resample_counts(7, 50, seed=4))
    # each column is a multinomial draw: a unit's count averages 1 over many columns
    many = resample_counts(5, 20000, seed=0)
    np.testing.assert_allclose(many.mean(axis=1), 1.0, atol=0.03)
    with pytest.raises(MlsaeError, match="need >= 1 unit"):
        resample_counts(0, 5, 0)


def test_unit_index_maps_documents_in_order_and_groups_consecutive_ones():
    unit, n = unit_index(np.array([7, 7, 3, 9, 9, 3]))
    assert n == 3 and unit.tolist() == [1, 1, 0, 2, 2, 0]
    unit, n = unit_index(np.arange(10) * 5, max_units=4)
    assert n == 4 and unit.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]  # consecutive groups, sizes 2-3
    with pytest.raises(MlsaeError, match="no tokens"):
        unit_index(np.array([], dtype=np.int64))


def test_resampled_replicas_equal_explicit_resampling():
    """A ratio of sums: the bootstrap replica r equals the ratio over units drawn W[:, r] times, the
    jackknife replica i the ratio with unit i left out."""
    rng = np.random.default_rng(1)
    num, den = rng.random((6, 3)), rng.random(6) + 0.5
    counts = resample_counts(6, 8, seed=2)
    point, boot, jack = resampled({"num": num, "den": den}, lambda num, den: num / den[:, None], counts)
    np.testing.assert_allclose(point, num.sum(0) / den.sum())
    for r in range(8):
        units = np.repeat(np.arange(6), counts[:, r])
        np.testing.assert_allclose(boot[r], num[units].sum(0) / den[units].sum())
    for i in range(6):
        keep = np.arange(6) != i
        np.testing.assert_allclose(jack[i], num[keep].sum(0) / den[keep].sum())
    assert resampled({"num": num, "den": den}, lambda num, den: num / den[:, None], None)[1] is None


def test_summary_is_the_textbook_jackknife_with_a_t_interval():
    rng = np.random.default_rng(5)
    boot, jack = rng.normal(1.0, 0.1, 200), rng.normal(1.02, 0.01, 30)
    got = summary("x", 1.01, boot, jack)
    u = 30
    bias = (u - 1) * (jack.mean() - 1.01)
    se = math.sqrt((u - 1) / u * ((jack - jack.mean()) ** 2).sum())  # the jackknife's
    assert got["x_plugin"] == 1.01
    assert got["x_bias_boot"] == pytest.approx(boot.mean() - 1.01)
    assert got["x_bias_jack"] == pytest.approx(bias)
    assert got["x_se"] == pytest.approx(se)
    assert got["x"] == pytest.approx(1.01 - bias)
    half = stats.t.ppf(0.975, u - 1) * se
    assert got["x_ci"] == pytest.approx([got["x"] - half, got["x"] + half])
    assert got["x_ci"][0] <= got["x"] <= got["x_ci"][1]
    assert bias_flag(got, "x") == (abs(bias) / se > 0.25)
    without = summary("x", 1.01, boot, jack, interval=False)
    assert "x_ci" not in without and without["x"] == got["x"] and without["x_se"] == got["x_se"]


def test_summary_leaves_out_undefined_replicas_and_handles_no_resampling():
    jack = np.array([1.0, np.nan, 1.2, 1.1])
    got = summary("x", 1.0, np.array([0.9, np.inf, 1.1]), jack)
    assert got["x_bias_boot"] == pytest.approx(0.0)
    assert got["x_bias_jack"] == pytest.approx(3 * (1.1 - 1.0))  # the defined replicas' mean
    assert summary("x", float("nan"), np.ones(3), np.ones(3))["x"] is None
    assert summary("x", 2.0, None, None) == {"x": 2.0}
    assert t_quantile(2) == pytest.approx(stats.t.ppf(0.975, 1))
    assert t_quantile(10_000) == pytest.approx(1.96, abs=1e-3)


def test_figures_by_layer_report_the_mean_over_layers_and_each_layer():
    rng = np.random.default_rng(2)
    per_unit = {"a": rng.random((9, 4)), "n": rng.random(9) + 1}
    counts = resample_counts(9, 20, seed=1)
    got = figures("m", per_unit, lambda a, n: a / n[:, None], counts, by_layer=True)
    _, boot, jack = resampled(per_unit, lambda a, n: a / n[:, None], counts)
    want = summary("m", float((per_unit["a"].sum(0) / per_unit["n"].sum()).mean()), boot.mean(1), jack.mean(1))
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    for j in range(4):
        layer = summary("m", float(per_unit["a"][:, j].sum() / per_unit["n"].sum()), boot[:, j], jack[:, j])
        assert got["m_by_layer"][j] == pytest.approx(layer["m"])
        assert got["m_by_layer_ci"][j] == pytest.approx(layer["m_ci"])
