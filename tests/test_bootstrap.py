"""mlsae.stats.bootstrap against explicit resampling of per-token data."""

from __future__ import annotations

import numpy as np
import pytest

from mlsae.stats.bootstrap import (
    bootstrap,
    context_counts,
    fvu,
    interval_json,
    mean,
    mean_difference,
    percentile_interval,
    resample_sums,
)
from mlsae.core.errors import MlsaeError


def test_context_counts_are_seeded_multinomial_columns():
    w = context_counts(12, 300, seed=3)
    assert w.shape == (12, 300) and w.dtype == np.int64
    assert (w.sum(axis=0) == 12).all() and (w >= 0).all()
    np.testing.assert_array_equal(w, context_counts(12, 300, seed=3))
    assert not np.array_equal(w, context_counts(12, 300, seed=4))
    assert abs(w.mean() - 1.0) < 1e-12 and 0.8 < w.var() < 1.0  # Multinomial(12, 1/12): var 11/12
    with pytest.raises(MlsaeError, match="context"):
        context_counts(0, 10, 0)


def test_resample_sums_and_percentiles_match_loops():
    rng = np.random.default_rng(0)
    per_context = rng.normal(size=(7, 3, 2))
    w = context_counts(7, 50, seed=1)
    got = resample_sums(per_context, w)
    for r in range(50):
        want = sum(w[c, r] * per_context[c] for c in range(7))
        np.testing.assert_allclose(got[r], want, rtol=1e-12)
    x = rng.normal(size=(50, 4))
    x[3, 1] = np.nan
    x[:, 2] = np.inf
    iv = percentile_interval(x, 0.9)
    np.testing.assert_allclose(iv[:, 0], np.percentile(x[:, 0], [5, 95]))
    np.testing.assert_allclose(iv[:, 1], np.percentile(np.delete(x[:, 1], 3), [5, 95]))
    assert np.isnan(iv[:, 2]).all()
    assert interval_json(iv) == [[iv[0, 0], iv[1, 0]], [iv[0, 1], iv[1, 1]], [None, None], [iv[0, 3], iv[1, 3]]]


def _tokens(seed: int, n_contexts: int = 10):
    """Per-token residuals x, reconstructions, two CE columns, and a context id per token."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 12, n_contexts)
    context = np.repeat(np.arange(n_contexts), sizes)
    T, L, d = context.size, 3, 5
    x = rng.normal(size=(T, L, d)) + rng.normal(size=(1, L, d))
    x_hat = x + 0.3 * rng.normal(size=(T, L, d))
    ce_clean = rng.exponential(2.0, T)
    ce_spliced = ce_clean + rng.exponential(0.5, T)
    return context, x, x_hat, ce_clean, ce_spliced


def _per_context(context, x, x_hat, ce_clean, ce_spliced, n_contexts):
    sums = {k: [] for k in ("err", "xx", "x", "n", "spliced", "clean")}
    for c in range(n_contexts):
        sel = context == c
        sums["err"].append(((x[sel] - x_hat[sel]) ** 2).sum(axis=(0, 2)))
        sums["xx"].append((x[sel] ** 2).sum(axis=(0, 2)))
        sums["x"].append(x[sel].sum(axis=0))
        sums["n"].append(sel.sum())
        sums["spliced"].append(ce_spliced[sel].sum())
        sums["clean"].append(ce_clean[sel].sum())
    return {k: np.asarray(v, dtype=np.float64) for k, v in sums.items()}


def _fvu_direct(x, x_hat):
    """Per layer: squared error over squared deviation from the per-layer mean vector."""
    centred = x - x.mean(axis=0, keepdims=True)
    return ((x - x_hat) ** 2).sum(axis=(0, 2)) / (centred**2).sum(axis=(0, 2))


def test_fvu_and_delta_ce_replicas_equal_explicit_resampling():
    n_contexts, R = 10, 40
    context, x, x_hat, ce_clean, ce_spliced = _tokens(0, n_contexts)
    s = _per_context(context, x, x_hat, ce_clean, ce_spliced, n_contexts)
    w = context_counts(n_contexts, R, seed=2)
    rs = {k: resample_sums(v, w) for k, v in s.items()}
    fvu_rep = fvu(rs["err"], rs["xx"], rs["x"], rs["n"])
    dce_rep = mean_difference(rs["spliced"], rs["clean"], rs["n"])
    ce_rep = mean(rs["clean"], rs["n"])
    assert fvu_rep.shape == (R, 3) and dce_rep.shape == (R,)
    for r in range(R):
        tokens = np.concatenate([np.repeat(np.flatnonzero(context == c), w[c, r]) for c in range(n_contexts)])
        np.testing.assert_allclose(fvu_rep[r], _fvu_direct(x[tokens], x_hat[tokens]), rtol=1e-9)
        assert dce_rep[r] == pytest.approx((ce_spliced[tokens] - ce_clean[tokens]).mean(), rel=1e-12)
        assert ce_rep[r] == pytest.approx(ce_clean[tokens].mean(), rel=1e-12)


def test_bootstrap_helper_point_interval_and_seed():
    n_contexts = 30
    context, x, x_hat, ce_clean, ce_spliced = _tokens(1, n_contexts)
    s = _per_context(context, x, x_hat, ce_clean, ce_spliced, n_contexts)
    sums = {k: s[k] for k in ("err", "xx", "x", "n")}
    point, iv = bootstrap(sums, fvu, context_counts(n_contexts, 200, seed=0))
    np.testing.assert_allclose(point, _fvu_direct(x, x_hat), rtol=1e-10)
    assert iv.shape == (2, 3) and (iv[0] < point).all() and (point < iv[1]).all()
    _, iv_same = bootstrap(sums, fvu, context_counts(n_contexts, 200, seed=0))
    _, iv_other = bootstrap(sums, fvu, context_counts(n_contexts, 200, seed=1))
    np.testing.assert_array_equal(iv, iv_same)
    assert not np.array_equal(iv, iv_other)

    dce, dce_iv = bootstrap(
        {"value": s["spliced"], "reference": s["clean"], "n": s["n"]},
        mean_difference,
        context_counts(n_contexts, 200, 0),
    )
    assert dce == pytest.approx((ce_spliced - ce_clean).mean(), rel=1e-12)
    assert dce_iv[0] < dce < dce_iv[1]


def test_undefined_statistic_is_nan_not_an_error():
    # Every context holds the same single vector: the centred total is 0, so fvu is undefined.
    x = np.ones((4, 1, 2))
    sums = {"err": np.zeros((4, 1)), "xx": (x**2).sum(axis=2), "x": x, "n": np.ones(4)}
    point, iv = bootstrap(sums, fvu, context_counts(4, 20, 0))
    assert np.isnan(point).all() and np.isnan(iv).all()
    assert interval_json(iv) == [[None, None]]
