"""mlsae.analysis.decomposition against brute-force dense computations on small random dumps a[T, L, F].

The reference recomputes every figure from the dense array with plain numpy: per latent from the
mixture of its per-token layer distributions, per replica from a dump in which each document's
tokens are repeated as often as the replica draws it (or dropped, for the jackknife).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlsae.analysis.decomposition import HEADLINE_KEYS, LATENT_COLUMNS, NO_INTERVAL, LayerStats, _Sets, pair_entropy
from mlsae.core.errors import MlsaeError
from mlsae.stats.bootstrap import resample_counts

SETTINGS = {"min_count": 3, "threshold": 0.1, "max_rate": 0.3, "min_documents": 3}


# --------------------------------------------------------------------------------------------
# Reference path: dense dump -> per-pair arrays, and brute-force statistics
# --------------------------------------------------------------------------------------------


def random_dump(seed: int, T: int = 90, L: int = 6, F: int = 14, n_units: int = 9, density: float = 0.12):
    """Non-negative sparse ``a[T, L, F]`` and a unit (document) id per token (contiguous, unequal
    sizes), with a dense latent (active on most tokens), a one-layer latent and a rare one."""
    rng = np.random.default_rng(seed)
    a = np.where(rng.random((T, L, F)) < density, rng.exponential(1.0, (T, L, F)), 0.0)
    a[:, :, 0] = 0.0
    a[rng.random(T) < 0.3, rng.integers(0, L), 0] = 2.0  # one layer only
    a[:, :, 1] *= rng.random((T, 1)) < 0.1  # rare
    late = min(L, 2)
    a[:, -late:, 2] = np.where(rng.random((T, late)) < 0.8, rng.exponential(1.0, (T, late)), 0.0)  # dense, late
    cuts = np.sort(rng.choice(np.arange(1, T), n_units - 1, replace=False))
    unit = np.searchsorted(cuts, np.arange(T), side="right")
    return a, unit


def dense_to_pairs(a: np.ndarray, unit: np.ndarray) -> dict[str, np.ndarray]:
    """Per active pair (token-major, then latent), with plain loops: the inputs LayerStats takes."""
    T, L, F = a.shape
    keys = ("latent", "unit", "mass", "mean", "second", "entropy", "share2", "peak")
    rows: dict[str, list[float]] = {k: [] for k in keys}
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
            rows["unit"].append(unit[t])
            rows["mass"].append(m)
            rows["mean"].append(float((ell * p).sum()))
            rows["second"].append(float((ell**2 * p).sum()))
            rows["entropy"].append(float(-(nz * np.log(nz)).sum()))
            rows["share2"].append(float(np.sort(p)[-2]) if L > 1 else 0.0)
            rows["peak"].append(float(col.max()))
    return {k: np.asarray(v, dtype=np.int64 if k in ("latent", "unit") else np.float64) for k, v in rows.items()}


def _var(dist: np.ndarray) -> float:
    """Variance of a distribution over layer positions 0..L-1."""
    ell = np.arange(dist.size)
    mu = (ell * dist).sum()
    return float(((ell - mu) ** 2 * dist).sum())


def brute_latent(a: np.ndarray, f: int) -> dict:
    """Per-latent terms; totals computed as variances of the weighted mixtures (independent of
    within + between)."""
    L = a.shape[1]
    ell = np.arange(L)
    col = a[:, :, f]
    m = col.sum(axis=1)
    act = m > 0
    p = col[act] / m[act, None]
    mu = p @ ell
    v = p @ ell**2 - mu**2
    out: dict = {"count": int(act.sum()), "mass": float(m.sum())}
    for sfx, w in (("", np.ones(act.sum())), ("_mass", m[act]), ("_peak", col[act].max(axis=1))):
        w = w / w.sum()
        mu_w = (w * mu).sum()
        out[f"var_within{sfx}"] = float((w * v).sum())
        out[f"var_between{sfx}"] = float((w * (mu - mu_w) ** 2).sum())
        out[f"var_total{sfx}"] = _var((w[:, None] * p).sum(axis=0))  # the weighted mixture
        tot = out[f"var_total{sfx}"]
        out[f"within_share{sfx}"] = out[f"var_within{sfx}"] / tot if tot > 1e-12 else None  # 0 up to rounding
    nz = np.where(p > 0, p, 1.0)
    out["exp_h"] = np.exp(-(p * np.log(nz)).sum(axis=1))
    out["s2"] = np.sort(p, axis=1)[:, -2] if L > 1 else np.zeros(act.sum())
    return out


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def brute_sets(a: np.ndarray, unit: np.ndarray, settings: dict | None = None) -> dict[str, set[int]]:
    """The plug-in's latent sets (held fixed in replicas): K (min_count tokens and min_documents
    documents), any_docs (min_count tokens) and dense (rate >= max_rate)."""
    s = {**SETTINGS, **(settings or {})}
    count = (a.sum(axis=1) > 0).sum(axis=0)
    docs = [len(np.unique(unit[a[:, :, f].sum(axis=1) > 0])) for f in range(a.shape[2])]
    any_docs = {f for f in range(a.shape[2]) if count[f] >= max(s["min_count"], 1)}
    return {
        "counted": {f for f in any_docs if docs[f] >= s["min_documents"]},
        "any_docs": any_docs,
        "dense": {f for f in range(a.shape[2]) if count[f] / a.shape[0] >= s["max_rate"]},
    }


def brute_headline(
    a: np.ndarray, unit: np.ndarray, fixed: dict[str, set[int]] | None = None, settings: dict | None = None
) -> dict:
    """Every figure of HEADLINE_KEYS from the dense array; `fixed`: the plug-in's latent sets
    (brute_sets of the sample), when `a` is a replica."""
    s = {**SETTINGS, **(settings or {})}
    fixed = fixed or brute_sets(a, unit, settings)
    T, L, F = a.shape
    per = {f: brute_latent(a, f) for f in range(F) if (a[:, :, f].sum(axis=1) > 0).any()}
    docs = {f: len(np.unique(unit[a[:, :, f].sum(axis=1) > 0])) for f in per}
    rate = {f: per[f]["count"] / T for f in per}
    counted = fixed["counted"] & set(per)
    sparse = set(per) - fixed["dense"]
    sets = {
        "": counted,
        "_sparse": counted & sparse,
        "_any_docs": fixed["any_docs"] & set(per),
        "_k_resampled": {f for f in per if per[f]["count"] >= max(s["min_count"], 1) and docs[f] >= s["min_documents"]},
    }
    out: dict = {}
    for name, members in sets.items():
        for sfx in ("", "_mass", "_peak"):
            within = _mean([per[f][f"var_within{sfx}"] for f in members])
            total = _mean([per[f][f"var_total{sfx}"] for f in members])
            if name == "":
                out[f"var_within{sfx}"] = within
                out[f"var_between{sfx}"] = _mean([per[f][f"var_between{sfx}"] for f in members])
                out[f"var_total{sfx}"] = total
                out[f"var_ratio{sfx}"] = _ratio(total, within)
            elif sfx == "":
                out[f"var_ratio{name}"] = _ratio(total, within)
            out[f"within_share{sfx}{name}"] = _ratio(within, total)
        n_within = sum(per[f]["count"] * per[f]["var_within"] for f in members)
        n_total = sum(per[f]["count"] * per[f]["var_total"] for f in members)
        out[f"within_share_pooled{name}"] = _ratio(n_within, n_total)
    out["var_ratio_pooled"] = _ratio(1.0, out["within_share_pooled"])
    scale = max(L - 1, 1) ** 2
    out["var_within_norm"] = None if out["var_within"] is None else out["var_within"] / scale
    out["var_total_norm"] = None if out["var_total"] is None else out["var_total"] / scale
    shares = [per[f]["within_share"] for f in counted if per[f]["within_share"] is not None]
    quartiles = np.percentile(shares, [25, 50, 75]) if shares else [None] * 3
    out["within_share_q25"], out["within_share_median"], out["within_share_q75"] = quartiles
    for name, members in (("", set(per)), ("_sparse", sparse)):
        exp_h = np.concatenate([per[f]["exp_h"] for f in members] or [np.zeros(0)])
        s2 = np.concatenate([per[f]["s2"] for f in members] or [np.zeros(0)])
        out[f"effective_layers{name}"] = float(exp_h.mean()) if exp_h.size else None
        out[f"multi_layer_fraction{name}"] = float((s2 >= s["threshold"]).mean()) if s2.size else None
    total_mass = sum(d["mass"] for d in per.values())
    for cut in (50, 90):
        dense = [f for f in per if rate[f] >= cut / 100]
        out[f"dense_latents_{cut}"] = len(dense)
        out[f"dense_mass_share_{cut}"] = sum(per[f]["mass"] for f in dense) / total_mass
    out["dense_within_share"] = _ratio(
        sum(per[f]["var_within"] for f in counted - sparse), sum(per[f]["var_within"] for f in counted)
    )
    out["n_latents_counted"] = len(fixed["counted"])
    return out


def repeat_units(a: np.ndarray, unit: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The dump with unit u's tokens repeated weights[u] times (0: dropped), each copy a new unit."""
    rows, units = [], []
    for u, w in enumerate(weights):
        for _ in range(int(w)):
            rows.append(a[unit == u])
            units.append(np.full((unit == u).sum(), len(units)))
    return np.concatenate(rows), np.concatenate(units)


def run(
    pairs: dict[str, np.ndarray], n_units: int, chunks: list[np.ndarray] | None = None, unit_tokens=None, **kwargs
) -> LayerStats:
    kwargs = {
        "min_count": SETTINGS["min_count"],
        "multi_layer_threshold": SETTINGS["threshold"],
        "max_rate": SETTINGS["max_rate"],
        "min_documents": SETTINGS["min_documents"],
        **kwargs,
    }
    acc = LayerStats(n_units=n_units, **kwargs)
    for idx in chunks if chunks is not None else [np.arange(pairs["latent"].size)]:
        acc.add(*(pairs[k][idx] for k in ("latent", "unit", "mass", "mean", "second", "entropy", "share2", "peak")))
    if unit_tokens is not None:
        acc.add_tokens(unit_tokens)
    return acc


def assert_close(got, want, rtol=1e-9, atol=1e-12, what=""):
    if want is None:
        assert got is None, what
    else:
        assert got is not None and math.isclose(got, want, rel_tol=rtol, abs_tol=atol), (what, got, want)


def _stats(seed: int, **kw):
    a, unit = random_dump(seed, **kw)
    pairs = dense_to_pairs(a, unit)
    n_units = int(unit.max()) + 1
    return a, unit, pairs, n_units


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_latent_columns_match_brute_force(seed):
    a, unit, pairs, n_units = _stats(seed)
    acc = run(pairs, n_units, n_latents=a.shape[2], n_layers=a.shape[1], unit_tokens=unit, n_resamples=0)
    table, _ = acc.finish()
    assert dict(table.schema) == LATENT_COLUMNS
    for row in table.iter_rows(named=True):
        want = brute_latent(a, row["latent"])
        assert row["count"] == want["count"]
        assert row["n_documents"] == len(np.unique(unit[a[:, :, row["latent"]].sum(axis=1) > 0]))
        assert_close(row["rate"], want["count"] / a.shape[0])
        assert_close(row["mass"], want["mass"])
        for sfx in ("", "_mass", "_peak"):
            for k in ("var_within", "var_between", "var_total", "within_share"):
                assert_close(row[f"{k}{sfx}"], want[f"{k}{sfx}"], rtol=1e-8, atol=1e-10, what=f"{k}{sfx}")
        assert_close(row["effective_layers"], float(want["exp_h"].mean()))
        assert_close(row["multi_layer_fraction"], float((want["s2"] >= SETTINGS["threshold"]).mean()))


@pytest.mark.parametrize("seed", [0, 3])
def test_headline_plugin_values_match_brute_force(seed):
    a, unit, pairs, n_units = _stats(seed)
    acc = run(pairs, n_units, n_latents=a.shape[2], n_layers=a.shape[1], unit_tokens=unit, n_resamples=0)
    _, got = acc.finish()
    want = brute_headline(a, unit)
    for key in HEADLINE_KEYS:
        assert_close(got[key], want[key], rtol=1e-8, atol=1e-10, what=key)
    for key in ("dense_latents_50", "dense_latents_90", "n_latents_counted"):
        assert got[key] == want[key], key
    assert got["n_units"] == n_units


def test_bootstrap_and_jackknife_replicas_equal_recomputation():
    """Each replica of every figure equals the brute force on the resampled dump (documents repeated
    as drawn; one document dropped), the plug-in's latent sets held fixed except for the
    `_k_resampled` figures, whose K is recomputed in the replica."""
    a, unit, pairs, n_units = _stats(4)
    acc = run(pairs, n_units, n_latents=a.shape[2], n_layers=a.shape[1], unit_tokens=unit, n_resamples=5, seed=7)
    fixed = brute_sets(a, unit)
    acc._flush()
    unit_arr, latent, stats = acc._spill.read()
    documents, documents_boot = acc._documents(np.asarray(unit_arr), np.asarray(latent))
    sets = _Sets(acc.sums[0], float(acc.tokens.sum()), documents, acc.settings)
    boot = acc._bootstrap(documents_boot, sets)
    jack = acc._jackknife(np.asarray(unit_arr), np.asarray(latent), stats, documents, sets)
    counts = resample_counts(n_units, 5, 7)
    checks = [(boot, r, counts[:, r]) for r in range(5)]
    checks += [(jack, u, np.ones(n_units) - np.eye(n_units)[u]) for u in (0, 4, n_units - 1)]
    for replicas, i, weights in checks:
        want = brute_headline(*repeat_units(a, unit, weights), fixed=fixed)
        for key in HEADLINE_KEYS:
            got = replicas[key][i]
            assert_close(None if not math.isfinite(got) else got, want[key], rtol=1e-5, atol=1e-7, what=(key, i))
    acc._spill.close()


def test_chunking_and_order_do_not_matter():
    a, unit, pairs, n_units = _stats(5)
    kw = {"n_latents": a.shape[2], "n_layers": a.shape[1], "n_resamples": 20, "seed": 3}
    whole = run(pairs, n_units, unit_tokens=unit, **kw).finish()[1]
    order = np.random.default_rng(0).permutation(pairs["latent"].size)
    chunks = np.array_split(order, 7)
    parts = run(pairs, n_units, chunks=chunks, unit_tokens=unit, **kw).finish()[1]
    for key in HEADLINE_KEYS:
        for suffix in ("", "_plugin", "_bias_jack", "_se"):
            assert_close(parts[f"{key}{suffix}"], whole[f"{key}{suffix}"], rtol=1e-5, atol=1e-8, what=key + suffix)


def test_small_pending_buffer_gives_the_same_replicas(monkeypatch: pytest.MonkeyPatch):
    """Units folded into the replicas and the spill 2 at a time (a unit split across flushes) give
    the figures of one big buffer."""
    import mlsae.analysis.decomposition as dec

    a, unit, pairs, n_units = _stats(6)
    kw = {"n_latents": a.shape[2], "n_layers": a.shape[1], "n_resamples": 10, "seed": 1}
    whole = run(pairs, n_units, unit_tokens=unit, **kw).finish()[1]
    monkeypatch.setattr(dec, "_PENDING_UNITS", 2)
    chunks = np.array_split(np.arange(pairs["latent"].size), 11)
    small = run(pairs, n_units, chunks=chunks, unit_tokens=unit, **kw).finish()[1]
    for key in ("within_share", "within_share_mass", "effective_layers", "within_share_any_docs", "var_ratio_paper"):
        for suffix in ("", "_plugin", "_bias_boot", "_bias_jack", "_se"):
            # the two runs split documents differently between float32 spill entries
            assert_close(small[f"{key}{suffix}"], whole[f"{key}{suffix}"], rtol=1e-5, atol=1e-9, what=key + suffix)


def test_reported_value_is_the_jackknife_corrected_plugin_inside_its_interval():
    a, unit, pairs, n_units = _stats(7)
    _, got = run(
        pairs, n_units, n_latents=a.shape[2], n_layers=a.shape[1], unit_tokens=unit, n_resamples=50, seed=2
    ).finish()
    for key in ("within_share", "within_share_mass", "effective_layers", "multi_layer_fraction"):
        assert_close(got[key], got[f"{key}_plugin"] - got[f"{key}_bias_jack"])
        lo, hi = got[f"{key}_ci"]
        assert lo <= got[key] <= hi and got[f"{key}_se"] > 0
    for key in NO_INTERVAL:  # no valid interval in the coverage study: figures without one
        assert f"{key}_ci" not in got and f"{key}_se" in got


def test_pair_entropy_from_sums():
    a = np.array([0.5, 1.5, 0.0, 2.0])
    m = a.sum()
    nz = a[a > 0]
    want = -((nz / m) * np.log(nz / m)).sum()
    assert math.isclose(float(pair_entropy(m, (nz * np.log(nz)).sum())), want, rel_tol=1e-12)
    assert float(pair_entropy(3.0, 3.0 * math.log(3.0))) == 0.0  # one layer


def test_one_layer_model():
    a, unit = random_dump(8, L=1)
    pairs = dense_to_pairs(a, unit)
    _, got = run(pairs, int(unit.max()) + 1, n_latents=a.shape[2], n_layers=1, unit_tokens=unit, n_resamples=0).finish()
    assert got["var_within"] == 0.0 and got["var_total"] == 0.0 and got["within_share"] is None
    assert got["effective_layers"] == 1.0 and got["multi_layer_fraction"] == 0.0


def _seed_metric(p: np.ndarray) -> tuple[float, float]:
    """The seed's Metric.update on one batch (tokens, layers, latents) of distributions p (0 where
    inactive): (exp_var_l_tf, exp_var_l_f)."""
    ell = np.arange(p.shape[1])[None, :, None]

    def v(x):
        return (ell**2 * x).sum(axis=1) - ((ell * x).sum(axis=1)) ** 2

    return float(v(p).mean()), float(v(p.mean(axis=0, keepdims=True)).mean())


def test_paper_estimator_per_batch_matches_the_seed_formula():
    """var_token_paper, var_aggregate_paper and their ratio equal the seed's formula applied to each
    batch of consecutive documents (>= paper_batch_tokens tokens) and averaged over batches; the
    aggregate's two parts add up to it."""
    a, unit, pairs, n_units = _stats(9, T=120, n_units=12)
    acc = run(
        pairs,
        n_units,
        n_latents=a.shape[2],
        n_layers=a.shape[1],
        unit_tokens=unit,
        n_resamples=0,
        paper_batch_tokens=25,
    )
    _, got = acc.finish()
    total = a.sum(axis=1, keepdims=True)
    p = np.divide(a, total, out=np.zeros_like(a), where=total > 0)
    starts = _batches(unit, 25)
    tok, agg = [], []
    for b in range(len(starts) - 1):
        rows = (unit >= starts[b]) & (unit < starts[b + 1])
        t, g = _seed_metric(p[rows])
        tok.append(t), agg.append(g)
    assert got["paper_batches"] == len(tok) > 2
    assert_close(got["var_token_paper"], float(np.mean(tok)), rtol=1e-6)
    assert_close(got["var_aggregate_paper"], float(np.mean(agg)), rtol=1e-6)
    assert_close(got["var_ratio_paper"], float(np.mean(agg) / np.mean(tok)), rtol=1e-6)
    assert_close(
        got["var_aggregate_paper_spread"] + got["var_aggregate_paper_depth"], got["var_aggregate_paper"], rtol=1e-9
    )


def _batches(unit: np.ndarray, size: int) -> list[int]:
    sizes = np.bincount(unit)
    starts, filled = [0], 0
    for u, n in enumerate(sizes):
        filled += n
        if filled >= size and u + 1 < len(sizes):
            starts.append(u + 1)
            filled = 0
    if len(starts) > 1 and sizes[starts[-1] :].sum() < size:
        starts.pop()
    return [*starts, len(sizes)]


def test_paper_jackknife_drops_one_document_from_its_batch():
    """The jackknife bias of var_ratio_paper equals (U - 1)(mean_i theta_(i) - theta) with theta_(i)
    the seed's formula recomputed with document i removed from its (otherwise fixed) batch."""
    a, unit, pairs, n_units = _stats(10, T=120, n_units=12)
    _, got = run(
        pairs,
        n_units,
        n_latents=a.shape[2],
        n_layers=a.shape[1],
        unit_tokens=unit,
        n_resamples=4,
        seed=5,
        paper_batch_tokens=25,
    ).finish()
    total = a.sum(axis=1, keepdims=True)
    p = np.divide(a, total, out=np.zeros_like(a), where=total > 0)
    starts = _batches(unit, 25)

    def ratio(drop: int | None) -> float:
        tok, agg = [], []
        for b in range(len(starts) - 1):
            rows = (unit >= starts[b]) & (unit < starts[b + 1]) & (unit != drop)
            t, g = _seed_metric(p[rows])
            tok.append(t), agg.append(g)
        return float(np.mean(agg) / np.mean(tok))

    theta = ratio(None)
    jack = np.array([ratio(u) for u in range(n_units)])
    assert_close(got["var_ratio_paper_plugin"], theta, rtol=1e-6)
    assert_close(got["var_ratio_paper_bias_jack"], (n_units - 1) * (jack.mean() - theta), rtol=1e-4, atol=1e-8)


def test_no_resampling_gives_plugin_values_only():
    a, unit, pairs, n_units = _stats(11)
    _, got = run(pairs, n_units, n_latents=a.shape[2], n_layers=a.shape[1], unit_tokens=unit, n_resamples=0).finish()
    assert "within_share" in got and not any(k.endswith(("_ci", "_se", "_bias_jack")) for k in got)


def test_bad_inputs_are_one_clear_error():
    a, unit, pairs, n_units = _stats(0)
    with pytest.raises(MlsaeError, match="n_units must be an integer >= 1"):
        LayerStats(4, 3, 0, 1)
    with pytest.raises(MlsaeError, match="multi_layer_threshold"):
        LayerStats(4, 3, 2, 1, multi_layer_threshold=0.7)
    acc = LayerStats(a.shape[2], a.shape[1], n_units, 1)
    bad = dict(pairs)
    bad["unit"] = bad["unit"].copy()
    bad["unit"][0] = n_units
    with pytest.raises(MlsaeError, match="unit ids must be in"):
        acc.add(*(bad[k] for k in ("latent", "unit", "mass", "mean", "second", "entropy", "share2", "peak")))
    bad = dict(pairs)
    bad["peak"] = np.zeros_like(bad["peak"])
    with pytest.raises(MlsaeError, match="mass and peak > 0"):
        acc.add(*(bad[k] for k in ("latent", "unit", "mass", "mean", "second", "entropy", "share2", "peak")))
    acc._spill.close()
