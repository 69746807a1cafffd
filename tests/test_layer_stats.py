"""mlsae.analysis.decomposition against brute-force dense computations on small random dumps a[T, L, F]."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlsae.stats.bootstrap import context_counts
from mlsae.core.errors import MlsaeError
from mlsae.analysis.decomposition import HEADLINE_KEYS, LATENT_COLUMNS, LayerStats, pair_entropy

FLOAT_KEYS = [k for k in HEADLINE_KEYS if k != "n_latents_counted"]


# --------------------------------------------------------------------------------------------
# Reference path: dense dump -> per-pair arrays, and brute-force statistics
# --------------------------------------------------------------------------------------------


def random_dump(seed: int, T: int = 90, L: int = 6, F: int = 14, n_contexts: int = 9, density: float = 0.12):
    """Non-negative sparse ``a[T, L, F]`` and a context id per token (contiguous, unequal sizes)."""
    rng = np.random.default_rng(seed)
    a = np.where(rng.random((T, L, F)) < density, rng.exponential(1.0, (T, L, F)), 0.0)
    # Some pairs at exactly one layer, some latents rare (so min_count bites).
    a[:, :, 0] = 0.0
    a[rng.random(T) < 0.3, rng.integers(0, L), 0] = 2.0
    a[:, :, 1] *= rng.random((T, 1)) < 0.1
    cuts = np.sort(rng.choice(np.arange(1, T), n_contexts - 1, replace=False))
    context = np.searchsorted(cuts, np.arange(T), side="right")
    return a, context


def dense_to_pairs(a: np.ndarray, context: np.ndarray) -> dict[str, np.ndarray]:
    """Per active pair (token-major, then latent), with plain loops: the inputs LayerStats takes."""
    T, L, F = a.shape
    rows: dict[str, list[float]] = {k: [] for k in ("latent", "context", "mass", "mean", "second", "entropy", "share2")}
    for t in range(T):
        for f in range(F):
            col = a[t, :, f]
            m = col.sum()
            if m <= 0:
                continue
            p = col / m
            ell = np.arange(L)
            nz = p[p > 0]
            rows["latent"].append(f)
            rows["context"].append(context[t])
            rows["mass"].append(m)
            rows["mean"].append(float((ell * p).sum()))
            rows["second"].append(float((ell**2 * p).sum()))
            rows["entropy"].append(float(-(nz * np.log(nz)).sum()))
            rows["share2"].append(float(np.sort(p)[-2]) if L > 1 else 0.0)
    return {k: np.asarray(v, dtype=np.int64 if k in ("latent", "context") else np.float64) for k, v in rows.items()}


def _var(dist: np.ndarray) -> float:
    """Variance of a distribution over layer positions 0..L-1."""
    ell = np.arange(dist.size)
    mu = (ell * dist).sum()
    return float(((ell - mu) ** 2 * dist).sum())


def brute_latent(a: np.ndarray, f: int) -> dict[str, float]:
    """Per-latent terms from the dense array; totals computed as mixture variances (independent
    of within + between)."""
    T, L, _ = a.shape
    ell = np.arange(L)
    col = a[:, :, f]
    m = col.sum(axis=1)
    act = m > 0
    p = col[act] / m[act, None]
    mu = p @ ell
    v = p @ ell**2 - mu**2
    w = m[act] / m[act].sum()
    mu_w = (w * mu).sum()
    nz = np.where(p > 0, p, 1.0)
    h = -(p * np.log(nz)).sum(axis=1)
    s2 = np.sort(p, axis=1)[:, -2] if L > 1 else np.zeros(act.sum())
    out = {
        "count": int(act.sum()),
        "mass": float(m.sum()),
        "var_within": float(v.mean()),
        "var_between": float(((mu - mu.mean()) ** 2).mean()),
        "var_total": _var(p.mean(axis=0)),  # the mixture mean_t p_tf
        "var_within_mass": float((w * v).sum()),
        "var_between_mass": float((w * (mu - mu_w) ** 2).sum()),
        "var_total_mass": _var(col.sum(axis=0) / col.sum()),  # P_f
        "exp_h": np.exp(h),
        "s2": s2,
    }
    out["within_share"] = out["var_within"] / out["var_total"] if out["var_total"] > 0 else None
    out["within_share_mass"] = out["var_within_mass"] / out["var_total_mass"] if out["var_total_mass"] > 0 else None
    return out


def brute_headline(a: np.ndarray, min_count: int, threshold: float) -> dict[str, float | None]:
    """Headline figures from the dense array."""
    T, L, F = a.shape
    per = {f: brute_latent(a, f) for f in range(F) if (a[:, :, f].sum(axis=1) > 0).any()}
    counted = [f for f, d in per.items() if d["count"] >= max(min_count, 1)]
    out: dict[str, float | None] = {"n_latents_counted": len(counted)}
    for sfx in ("", "_mass"):
        for part in ("within", "between", "total"):
            vals = [per[f][f"var_{part}{sfx}"] for f in counted]
            out[f"var_{part}{sfx}"] = float(np.mean(vals)) if vals else None
        w, tot = out[f"var_within{sfx}"], out[f"var_total{sfx}"]
        out[f"within_share{sfx}"] = w / tot if w is not None and tot else None
        out[f"var_ratio{sfx}"] = tot / w if w else None
    scale = max(L - 1, 1) ** 2
    out["var_within_norm"] = None if out["var_within"] is None else out["var_within"] / scale
    out["var_total_norm"] = None if out["var_total"] is None else out["var_total"] / scale
    exp_h = np.concatenate([d["exp_h"] for d in per.values()])
    s2 = np.concatenate([d["s2"] for d in per.values()])
    out["effective_layers"] = float(exp_h.mean())
    out["multi_layer_fraction"] = float((s2 >= threshold).mean())
    return out


def run(pairs: dict[str, np.ndarray], chunks: list[np.ndarray] | None = None, **kwargs) -> LayerStats:
    acc = LayerStats(**kwargs)
    for idx in chunks if chunks is not None else [np.arange(pairs["latent"].size)]:
        acc.add(*(pairs[k][idx] for k in ("latent", "context", "mass", "mean", "second", "entropy", "share2")))
    return acc


def assert_close(got, want, rtol=1e-9, atol=1e-12):
    if want is None:
        assert got is None
    else:
        assert got is not None and math.isclose(got, want, rel_tol=rtol, abs_tol=atol), (got, want)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_latent_columns_match_brute_force(seed):
    a, context = random_dump(seed)
    pairs = dense_to_pairs(a, context)
    table, _ = run(pairs, n_latents=a.shape[2], n_layers=a.shape[1], n_contexts=9, min_count=3).finish()
    assert table.schema == LATENT_COLUMNS
    active = [f for f in range(a.shape[2]) if (a[:, :, f].sum(axis=1) > 0).any()]
    assert table["latent"].to_list() == active
    for row in table.iter_rows(named=True):
        ref = brute_latent(a, row["latent"])
        assert row["count"] == ref["count"]
        for key in LATENT_COLUMNS:
            if key in ("latent", "count"):
                continue
            if key == "effective_layers":
                want = float(ref["exp_h"].mean())
            elif key == "multi_layer_fraction":
                want = float((ref["s2"] >= 0.1).mean())
            else:
                want = ref[key]
            assert_close(row[key], want)
        # The law of total variance, both weightings: within + between == the mixture variance.
        assert math.isclose(row["var_within"] + row["var_between"], ref["var_total"], rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(
            row["var_within_mass"] + row["var_between_mass"], ref["var_total_mass"], rel_tol=1e-9, abs_tol=1e-12
        )


@pytest.mark.parametrize("min_count", [0, 1, 4, 9, 10_000])
def test_headline_matches_brute_force_and_min_count_filters(min_count):
    a, context = random_dump(3)
    pairs = dense_to_pairs(a, context)
    _, got = run(pairs, n_latents=a.shape[2], n_layers=a.shape[1], n_contexts=9, min_count=min_count).finish()
    want = brute_headline(a, min_count, 0.1)
    assert set(got) == set(HEADLINE_KEYS) | {f"{k}_ci" for k in FLOAT_KEYS}
    for key in HEADLINE_KEYS:
        assert_close(got[key], want[key])
    counts = [brute_latent(a, f)["count"] for f in range(a.shape[2]) if a[:, :, f].any()]
    assert got["n_latents_counted"] == sum(c >= max(min_count, 1) for c in counts)
    if min_count == 9:  # the filter is exercised: some latents in, some out
        assert 0 < got["n_latents_counted"] < len(counts)
    if min_count == 10_000:
        assert got["var_within"] is None and got["within_share"] is None and got["var_ratio_mass"] is None
        assert got["effective_layers"] is not None  # pooled over all pairs, not only counted latents


def test_chunking_and_order_do_not_matter():
    a, context = random_dump(4)
    pairs = dense_to_pairs(a, context)
    kw = dict(n_latents=a.shape[2], n_layers=a.shape[1], n_contexts=9, min_count=3)
    table1, head1 = run(pairs, **kw).finish()
    perm = np.random.default_rng(0).permutation(pairs["latent"].size)
    chunks = np.array_split(perm, 7)  # each context's pairs spread over several chunks
    assert max(len(set(pairs["context"][c])) for c in chunks) > 1
    acc2 = run(pairs, chunks, **kw)
    table2, head2 = acc2.finish()
    assert table1["latent"].to_list() == table2["latent"].to_list()
    for col in LATENT_COLUMNS:
        x, y = table1[col].to_numpy(), table2[col].to_numpy()
        np.testing.assert_allclose(x.astype(float), y.astype(float), rtol=1e-10, atol=1e-12)
    for key in FLOAT_KEYS:
        assert_close(head2[key], head1[key], rtol=1e-10)
        np.testing.assert_allclose(head2[f"{key}_ci"], head1[f"{key}_ci"], rtol=1e-9, atol=1e-12)
    # An empty chunk is a no-op.
    acc2.add(*(np.empty(0),) * 7)
    assert acc2.finish()[1] == head2


def test_bootstrap_replicas_equal_recomputation_on_resampled_dump():
    a, context = random_dump(5)
    pairs = dense_to_pairs(a, context)
    min_count, threshold, R, seed = 5, 0.15, 30, 11
    acc = run(
        pairs, n_latents=a.shape[2], n_layers=a.shape[1], n_contexts=9, min_count=min_count,
        multi_layer_threshold=threshold, n_resamples=R, seed=seed,
    )
    replicas = acc.replica_metrics()
    counts = context_counts(9, R, seed)
    n_counted_seen = set()
    for r in range(R):
        # The resampled dump: every token of context c, repeated counts[c, r] times.
        tokens = np.concatenate([np.repeat(np.flatnonzero(context == c), counts[c, r]) for c in range(9)])
        want = brute_headline(a[tokens], min_count, threshold)
        n_counted_seen.add(want["n_latents_counted"])
        for key in FLOAT_KEYS:
            got = replicas[key][r]
            assert_close(None if np.isnan(got) else float(got), want[key], rtol=1e-8, atol=1e-10)
    assert len(n_counted_seen) > 1  # the counted set really is recomputed per replica


def test_replicas_do_not_depend_on_the_context_buffer(monkeypatch: pytest.MonkeyPatch):
    """The per-context sums wait in a buffer of _PENDING_CONTEXTS contexts before they are folded
    into the replicas. With a 2-context buffer (9 contexts, chunks in random order, so contexts
    come back after their row was flushed and one chunk spans more contexts than the buffer) the
    replicas equal those of the default buffer, which holds all 9 at once (the brute-force check
    above)."""
    import mlsae.analysis.decomposition as ls

    a, context = random_dump(6)
    pairs = dense_to_pairs(a, context)
    perm = np.random.default_rng(1).permutation(pairs["latent"].size)
    chunks = np.array_split(perm, 5)
    assert max(len(set(pairs["context"][c])) for c in chunks) > 2
    kw = dict(n_latents=a.shape[2], n_layers=a.shape[1], n_contexts=9, min_count=3, n_resamples=20, seed=3)
    whole = run(pairs, chunks, **kw)
    assert whole._pending.shape[0] == 9
    monkeypatch.setattr(ls, "_PENDING_CONTEXTS", 2)
    small = run(pairs, chunks, **kw)
    assert small._pending.shape[0] == 2
    np.testing.assert_allclose(small.replicas, whole.replicas, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(small.pair_replicas, whole.pair_replicas, rtol=1e-12)


def test_intervals_seeded_and_cover_the_point_estimate():
    a, context = random_dump(6, T=600, F=10, n_contexts=40, density=0.2)
    pairs = dense_to_pairs(a, context)
    kw = dict(n_latents=10, n_layers=a.shape[1], n_contexts=40, min_count=5, n_resamples=200)
    _, h0 = run(pairs, seed=0, **kw).finish()
    _, h0b = run(pairs, seed=0, **kw).finish()
    _, h1 = run(pairs, seed=1, **kw).finish()
    for key in ("within_share", "within_share_mass", "var_ratio", "effective_layers", "multi_layer_fraction"):
        lo, hi = h0[f"{key}_ci"]
        assert lo < h0[key] < hi, key
        assert h0[f"{key}_ci"] == h0b[f"{key}_ci"]
        assert h0[f"{key}_ci"] != h1[f"{key}_ci"]
        assert h0[key] == h1[key]  # the point estimate does not depend on the seed


def test_multi_layer_threshold_edges_and_effective_layers():
    L = 4
    a = np.zeros((4, L, 1))
    a[0, :, 0] = [3, 1, 0, 0]  # shares 0.75, 0.25: s2 = 0.25 exactly
    a[1, :, 0] = [0, 0, 5, 0]  # one layer: s2 = 0, H = 0
    a[2, :, 0] = [0, 2, 2, 0]  # s2 = 0.5
    a[3, :, 0] = [1, 1, 1, 1]  # s2 = 0.25, H = ln 4
    pairs = dense_to_pairs(a, np.zeros(4, dtype=np.int64))
    for threshold, want in ((0.25, 3 / 4), (0.2500001, 1 / 4), (0.5, 1 / 4), (1e-9, 3 / 4)):
        table, head = run(pairs, n_latents=1, n_layers=L, n_contexts=1, min_count=0,
                          multi_layer_threshold=threshold).finish()
        assert head["multi_layer_fraction"] == pytest.approx(want)
        assert table["multi_layer_fraction"][0] == pytest.approx(want)
    h = [-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), 0.0, math.log(2), math.log(4)]
    assert head["effective_layers"] == pytest.approx(np.mean(np.exp(h)))
    assert head["effective_layers_ci"] is not None
    for bad in (0.0, -0.1, 0.51):
        with pytest.raises(MlsaeError, match="analysis.multi_layer_threshold"):
            LayerStats(1, L, 1, 0, multi_layer_threshold=bad)


def test_pair_entropy_from_sums():
    a, _ = random_dump(7)
    m = a.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        alog = np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0).sum(axis=1)
    act = m > 0
    p = a.transpose(0, 2, 1)[act] / m[act][:, None]
    want = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(axis=1)
    np.testing.assert_allclose(pair_entropy(m[act], alog[act]), want, atol=1e-12)
    assert pair_entropy(np.array([2.5]), np.array([2.5 * math.log(2.5)]))[0] == 0.0


def test_one_layer_model():
    a = np.zeros((6, 1, 2))
    a[:4, 0, 0] = 1.0
    a[5, 0, 1] = 2.0
    pairs = dense_to_pairs(a, np.array([0, 0, 1, 1, 2, 2]))
    _, head = run(pairs, n_latents=2, n_layers=1, n_contexts=3, min_count=1).finish()
    assert head["var_within_norm"] == 0.0 and head["var_total_norm"] == 0.0
    assert head["within_share"] is None and head["var_ratio"] is None
    assert head["effective_layers"] == 1.0 and head["multi_layer_fraction"] == 0.0
    assert head["within_share_ci"] == [None, None]


def test_paper_estimator_is_rate_times_variance_plus_depth_term():
    """The identity docs/statistics.md derives: v(q_f) = r total_f + r (1 - r) mu_f^2 for the seed's
    q_f = mean over ALL tokens of p_tf, with total_f our equal-weighting total."""
    a, context = random_dump(8)
    T, L, F = a.shape
    table, _ = run(dense_to_pairs(a, context), n_latents=F, n_layers=L, n_contexts=9, min_count=0).finish()
    ell = np.arange(L)
    m = a.sum(axis=1, keepdims=True)
    p = np.divide(a, m, out=np.zeros_like(a), where=m > 0)
    q = p.mean(axis=0)  # (L, F)
    v_paper = (ell**2) @ q - (ell @ q) ** 2
    for row in table.iter_rows(named=True):
        f = row["latent"]
        r = row["count"] / T
        mu = (ell @ p[:, :, f].sum(axis=0)) / row["count"]
        assert v_paper[f] == pytest.approx(r * row["var_total"] + r * (1 - r) * mu**2, rel=1e-9)


def test_bad_inputs_are_one_clear_error():
    acc = LayerStats(3, 4, 2, 0)
    ok = dict(latent=[0], context=[0], mass=[1.0], mean=[1.0], second=[1.0], entropy=[0.0], share2=[0.0])
    for key, value, match in (
        ("latent", [3], "latent ids"),
        ("context", [2], "context ids"),
        ("mass", [0.0], "mass > 0"),
        ("mean", [np.nan], "finite"),
        ("share2", [0.0, 0.0], "one length"),
    ):
        with pytest.raises(MlsaeError, match=match):
            acc.add(**{**ok, key: value})
    with pytest.raises(MlsaeError, match="analysis.min_count"):
        LayerStats(3, 4, 2, -1)
    with pytest.raises(MlsaeError, match="n_contexts"):
        LayerStats(3, 4, 0, 0)


def _paper_dense(a: np.ndarray) -> tuple[float, float]:
    """The seed's formula on a dense array (all T tokens one batch, p = 0 at inactive pairs)."""
    L = a.shape[1]
    ell = np.arange(L, dtype=np.float64)[None, :, None]
    m = a.sum(axis=1, keepdims=True)
    p = np.divide(a, m, out=np.zeros_like(a), where=m > 0)

    def v(x):
        return (ell**2 * x).sum(axis=1) - ((ell * x).sum(axis=1)) ** 2

    return float(v(p).mean()), float(v(p.mean(axis=0, keepdims=True)).mean())


def test_paper_metrics_and_replicas_match_dense_formula():
    a, context = random_dump(9)
    a[5] = 0.0  # a token with no active latent still counts in T
    T, L, F = a.shape
    R, seed = 12, 4
    acc = run(dense_to_pairs(a, context), n_latents=F, n_layers=L, n_contexts=9, min_count=0, n_resamples=R, seed=seed)
    with pytest.raises(MlsaeError, match="add_tokens"):
        acc.paper_metrics()
    for part in np.array_split(np.arange(T), 3):
        acc.add_tokens(context[part])
    got = acc.paper_metrics()
    token, aggregate = _paper_dense(a)
    assert got["var_token_paper"] == pytest.approx(token, rel=1e-10)
    assert got["var_aggregate_paper"] == pytest.approx(aggregate, rel=1e-10)
    assert got["var_ratio_paper"] == pytest.approx(aggregate / token, rel=1e-10)
    counts = context_counts(9, R, seed)
    ratios = []
    for r in range(R):
        tokens = np.concatenate([np.repeat(np.flatnonzero(context == c), counts[c, r]) for c in range(9)])
        tok_r, agg_r = _paper_dense(a[tokens])
        ratios.append(agg_r / tok_r)
    lo, hi = np.percentile(ratios, [2.5, 97.5])  # the basic interval reflects them about the estimate
    point = aggregate / token
    np.testing.assert_allclose(got["var_ratio_paper_ci"], [2 * point - hi, 2 * point - lo], rtol=1e-8)


def test_intervals_are_basic_bootstrap_intervals_of_the_replicas():
    """<key>_ci = [2θ̂ − q97.5, 2θ̂ − q2.5] of the replicas (the bias-correcting basic interval),
    computed here from the replicas with numpy."""
    a, context = random_dump(7, T=400, F=8, n_contexts=30, density=0.2)
    stats = run(dense_to_pairs(a, context), n_latents=8, n_layers=a.shape[1], n_contexts=30, min_count=3,
                n_resamples=200)
    _, head = stats.finish()
    replicas = stats.replica_metrics()
    for key in ("within_share", "var_ratio", "effective_layers"):
        r = replicas[key][np.isfinite(replicas[key])]
        lo, hi = np.percentile(r, [2.5, 97.5])
        assert head[f"{key}_ci"] == pytest.approx([2 * head[key] - hi, 2 * head[key] - lo], rel=1e-9), key
