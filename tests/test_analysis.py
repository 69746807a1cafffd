"""The aggregate stage's library: streaming layer-distribution statistics of the latent store.

Every expected number comes from an independent computation: hand arithmetic on a small hand-built
latent set, or plain numpy on the dense ``(tokens, layers, latents)`` array rebuilt from the store's
top-k lists (never from mlsae.analysis.aggregate).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import zarr
from polars.testing import assert_frame_equal
from test_layer_stats import _batches, _seed_metric, brute_headline, brute_latent

from mlsae.analysis.aggregate import aggregate
from mlsae.core.errors import MlsaeError
from mlsae.core.params import AnalysisParams
from mlsae.core.paths import (
    DOCUMENT,
    INDICES,
    LATENT_LAYER,
    LATENT_STATS,
    LAYER_STATS,
    SPECIAL,
    TOKEN_STATS,
    TOP_TOKENS,
    VALUES,
)
from mlsae.stores.activations import seal

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def make_store(
    path: Path,
    indices: np.ndarray,
    values: np.ndarray,
    special: np.ndarray | None = None,
    *,
    n_latents: int,
    blocks: list[int] | None = None,
    chunk: int = 4,
    attrs: dict[str, Any] | None = None,
    document: np.ndarray | None = None,
) -> Path:
    """Write a latent store (Zarr v3 group) from numpy arrays, chunked along tokens; documents of
    two tokens each unless `document` says otherwise."""
    n_tokens, n_layers, k = indices.shape
    special = np.zeros(n_tokens, dtype=bool) if special is None else np.asarray(special, dtype=bool)
    document = np.arange(n_tokens) // 2 if document is None else np.asarray(document)
    group = zarr.create_group(str(path), overwrite=True)
    group.create_array(INDICES, data=np.asarray(indices, dtype=np.int32), chunks=(chunk, n_layers, k))
    group.create_array(VALUES, data=np.asarray(values), chunks=(chunk, n_layers, k))
    group.create_array("tokens", data=np.arange(n_tokens, dtype=np.int32) + 100, chunks=(chunk,))
    group.create_array("context", data=np.zeros(n_tokens, dtype=np.int32), chunks=(chunk,))
    group.create_array("position", data=np.arange(n_tokens, dtype=np.int16), chunks=(chunk,))
    group.create_array(SPECIAL, data=special, chunks=(chunk,))
    group.create_array(DOCUMENT, data=document.astype(np.int64), chunks=(chunk,))
    seal(group, path, "dump")  # the completion record every reader checks (every chunk present)
    meta = {"layers": blocks or list(range(n_layers)), "n_latents": n_latents, "k": k, "complete": True}
    meta.update(attrs or {})
    group.attrs.update(meta)
    return path


def run(
    store: Path, tmp_path: Path, name: str = "run", chunk_tokens: int | None = None, **kwargs: Any
) -> tuple[dict[str, Any], Path]:
    """aggregate() into tmp_path/name with `analysis` params `kwargs` (no resampling unless
    `bootstrap` is given: the figures are then the plug-in values); returns (metrics, analysis dir)."""
    out = tmp_path / name / "analysis"
    analysis = AnalysisParams(**{"bootstrap": 0, "min_count": 1, "min_documents": 1, **kwargs})
    metrics = aggregate(store, out, tmp_path / name / "analysis.json", analysis, chunk_tokens=chunk_tokens)
    return metrics, out


def dense(indices: np.ndarray, values: np.ndarray, special: np.ndarray, n_latents: int) -> np.ndarray:
    """The dense (non-special tokens, layers, latents) activations, by looping over the entries."""
    n_tokens, n_layers, k = indices.shape
    a = np.zeros((n_tokens, n_layers, n_latents))
    for t, layer, j in np.ndindex(n_tokens, n_layers, k):
        a[t, layer, indices[t, layer, j]] += float(values[t, layer, j])
    return a[~np.asarray(special, dtype=bool)]


def moments(p: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of layer position under (normalised) weights ``p`` along ``axis``."""
    shape = [1] * p.ndim
    shape[axis] = p.shape[axis]
    ell = np.arange(p.shape[axis], dtype=np.float64).reshape(shape)
    mean = (p * ell).sum(axis=axis)
    var = (p * (ell - np.expand_dims(mean, axis)) ** 2).sum(axis=axis)
    return mean, var


def expected_metrics(
    a: np.ndarray, unit: np.ndarray, min_count: int, threshold: float = 0.1, min_documents: int = 1
) -> dict[str, Any]:
    """Every headline figure from the dense array and the analysed tokens' documents: the
    decomposition from the statistics tests' brute force (plain loops over latents and tokens), the
    paper's estimator from the seed's formula per batch, the rest with plain numpy."""
    n_tokens, n_layers, n_latents = a.shape
    pair_mass = a.sum(axis=1)  # (T, F)
    active = pair_mass > 0
    mass_f = a.sum(axis=(0, 1))
    dist = a.sum(axis=0) / np.where(mass_f > 0, mass_f, 1.0)  # (L, F)
    _, var_f = moments(dist, axis=0)
    docs = np.array([len(np.unique(unit[active[:, f]])) for f in range(n_latents)])
    counted = (active.sum(axis=0) >= max(min_count, 1)) & (docs >= min_documents)
    settings = {"min_count": min_count, "threshold": threshold, "max_rate": 0.5, "min_documents": min_documents}
    head = brute_headline(a, unit, settings=settings)
    total = a.sum(axis=1, keepdims=True)
    p = np.divide(a, total, out=np.zeros_like(a), where=total > 0)
    starts = _batches(unit, 2048)
    tok, agg = zip(*(_seed_metric(p[(unit >= starts[b]) & (unit < starts[b + 1])]) for b in range(len(starts) - 1)))
    return {
        **head,
        "mean_layer_std": np.sqrt(var_f[counted]).mean() if counted.any() else None,
        "var_token_paper": float(np.mean(tok)),
        "var_aggregate_paper": float(np.mean(agg)),
        "var_ratio_paper": float(np.mean(agg) / np.mean(tok)) if np.mean(tok) else None,
        "paper_batches": len(tok),
        "n_tokens": n_tokens,
        "n_units": len(np.unique(unit)),
        "n_active_pairs": int(active.sum()),
        "n_entries": int((a > 0).sum()),
        "n_latents_active": int(active.any(axis=0).sum()),
        "n_latents_counted": int(counted.sum()),
        "n_layers": n_layers,
    }


def assert_metrics(actual: dict[str, Any], expected: dict[str, Any], rel: float = 1e-9) -> None:
    """Every expected figure (plug-in values: `run` does not resample); `actual` may hold more
    (the paper estimator's two parts)."""
    for key, value in expected.items():
        if value is None or isinstance(value, int):
            assert actual[key] == value, key
        else:
            # the seed's estimator is summed from the float32 spill of per-document sums
            tol = max(rel, 1e-6) if "paper" in key else rel
            assert actual[key] == pytest.approx(float(value), rel=tol, abs=1e-12), key


def units_of(special: np.ndarray, document: np.ndarray | None = None) -> np.ndarray:
    """The analysed tokens' unit ids for a store made by make_store: 0..U-1 over the documents
    that hold an analysed token, in document order."""
    n = len(special)
    document = np.arange(n) // 2 if document is None else np.asarray(document)
    kept = document[~np.asarray(special, dtype=bool)]
    return np.unique(kept, return_inverse=True)[1]


def random_store(
    path: Path, rng: np.random.Generator, *, n_tokens: int, n_layers: int, k: int, n_latents: int, dtype: type
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random store: distinct latents per (token, layer) from a small pool (so latents recur over
    layers), a few zero values and special tokens, values on a coarse grid (ties)."""
    pool = rng.permuted(np.tile(np.arange(n_latents), (n_tokens, 1)), axis=1)[:, : k + 3]
    indices = np.stack([rng.permuted(pool, axis=1)[:, :k] for _ in range(n_layers)], axis=1)
    values = (rng.integers(0, 8, size=indices.shape) / 4).astype(dtype)  # 0 (inactive) .. 1.75
    special = rng.random(n_tokens) < 0.1
    make_store(path, indices, values, special, n_latents=n_latents, chunk=8)
    return indices, values, special


# --------------------------------------------------------------------------------------------
# The hand-built latent set
# --------------------------------------------------------------------------------------------
# 3 layers (blocks 2, 5, 7), k = 2, 5 latents; latent 4 is active only at the special token 3,
# token 4 has no active entry at all (all values 0), and value 0 entries are inactive.

BLOCKS = [2, 5, 7]
N_LATENTS = 5
HAND_INDICES = np.array(
    [
        [[0, 1], [0, 2], [0, 3]],  # t0: f2 listed at l1 with value 0
        [[2, 1], [2, 1], [1, 0]],  # t1: f1 listed at l0 with value 0
        [[3, 0], [3, 0], [1, 3]],  # t2
        [[4, 0], [4, 0], [4, 0]],  # t3: special
        [[0, 1], [2, 3], [1, 2]],  # t4: all zero
        [[2, 0], [2, 1], [2, 0]],  # t5: f1 listed at l1 with value 0
    ]
)
HAND_VALUES = np.array(
    [
        [[1.0, 2.0], [1.0, 0.0], [2.0, 1.0]],
        [[3.0, 0.0], [1.0, 1.0], [1.0, 0.5]],
        [[1.5, 0.25], [1.5, 0.0], [4.0, 0.0]],
        [[9.0, 9.0], [9.0, 9.0], [9.0, 9.0]],
        [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
        [[2.0, 1.0], [2.0, 0.0], [2.0, 1.0]],
    ],
    dtype=np.float16,
)
HAND_SPECIAL = np.array([False, False, False, True, False, False])
# (token, latent) -> (n_layers, mass, mu_tf, var_tf), worked out by hand.
HAND_PAIRS = {
    (0, 0): (3, 4.0, 1.25, 0.6875),  # a = 1, 1, 2 at l = 0, 1, 2
    (0, 1): (1, 2.0, 0.0, 0.0),
    (0, 3): (1, 1.0, 2.0, 0.0),
    (1, 0): (1, 0.5, 2.0, 0.0),
    (1, 1): (2, 2.0, 1.5, 0.25),  # a = 1, 1 at l = 1, 2
    (1, 2): (2, 4.0, 0.25, 0.1875),  # a = 3, 1 at l = 0, 1
    (2, 0): (1, 0.25, 0.0, 0.0),
    (2, 1): (1, 4.0, 2.0, 0.0),
    (2, 3): (2, 3.0, 0.5, 0.25),  # a = 1.5, 1.5 at l = 0, 1
    (5, 0): (2, 2.0, 1.0, 1.0),  # a = 1, 1 at l = 0, 2
    (5, 2): (3, 6.0, 1.0, 2.0 / 3.0),  # a = 2, 2, 2
}


@pytest.fixture()
def hand_store(tmp_path: Path) -> Path:
    return make_store(
        tmp_path / "latents.zarr", HAND_INDICES, HAND_VALUES, HAND_SPECIAL, n_latents=N_LATENTS, blocks=BLOCKS, chunk=4
    )


def test_token_latent_rows_match_hand_computation(hand_store: Path, tmp_path: Path) -> None:
    _, out = run(hand_store, tmp_path, min_count=1)
    rows = pl.read_parquet(out / TOKEN_STATS.name).sort("token", "latent")
    assert rows.schema == pl.Schema(
        {
            "token": pl.Int64,
            "latent": pl.Int32,
            "n_layers": pl.Int32,
            "mass": pl.Float32,
            "mean_layer": pl.Float32,
            "var_layer": pl.Float32,
        }
    )
    got = {(r["token"], r["latent"]): r for r in rows.iter_rows(named=True)}
    assert set(got) == set(HAND_PAIRS)  # no special token 3, no all-zero token 4, no zero entries
    for pair, (n_layers, mass, mean, var) in HAND_PAIRS.items():
        row = got[pair]
        assert row["n_layers"] == n_layers, pair
        assert row["mass"] == pytest.approx(mass), pair
        assert row["mean_layer"] == pytest.approx(mean, abs=1e-6), pair
        assert row["var_layer"] == pytest.approx(var, abs=1e-6), pair
        if n_layers == 1:
            assert row["var_layer"] == 0.0, pair  # exactly, not merely close


def test_headline_metrics_match_hand_and_numpy(hand_store: Path, tmp_path: Path) -> None:
    metrics, _ = run(hand_store, tmp_path, min_count=2)
    # By hand: 11 active pairs over the 5 non-special tokens, 6 of them at more than one layer.
    var_sum = sum(v for *_, v in HAND_PAIRS.values())
    assert metrics["n_tokens"] == 5
    assert metrics["n_active_pairs"] == 11
    assert metrics["n_entries"] == 19
    # the pooled per-pair variance, by hand, is the paper estimator's numerator (one batch here)
    assert metrics["var_token_paper"] == pytest.approx(var_sum / (5 * N_LATENTS), rel=1e-6)
    # Latent 4 fires only at the special token: never active. Latents 0..3 are active at
    # 4, 3, 2, 2 tokens, so all four count with min_count=2.
    assert metrics["n_latents_active"] == 4
    assert metrics["n_latents_counted"] == 4
    assert metrics["n_layers"] == 3
    # Latent 3 by hand: mass 1 at l2 (t0) and 1.5 + 1.5 at l0, l1 (t2): P = (.375, .375, .25).
    mean3 = 0.375 + 0.5
    var3 = 0.375 * mean3**2 + 0.375 * (1 - mean3) ** 2 + 0.25 * (2 - mean3) ** 2
    latents = pl.read_parquet(tmp_path / "run" / "analysis" / LATENT_STATS.name)
    assert latents.filter(pl.col("latent") == 3)["var_layer"].item() == pytest.approx(var3)
    a = dense(HAND_INDICES, HAND_VALUES, HAND_SPECIAL, N_LATENTS)
    assert_metrics(metrics, expected_metrics(a, units_of(HAND_SPECIAL), 2))


def test_min_count_filters_the_aggregate_figures(hand_store: Path, tmp_path: Path) -> None:
    metrics, _ = run(hand_store, tmp_path, min_count=3)  # only latents 0 (4 tokens) and 1 (3 tokens)
    a = dense(HAND_INDICES, HAND_VALUES, HAND_SPECIAL, N_LATENTS)
    assert metrics["n_latents_counted"] == 2
    assert_metrics(metrics, expected_metrics(a, units_of(HAND_SPECIAL), 3))
    # pooled over all active pairs: min_count does not filter these
    one, _ = run(hand_store, tmp_path, "one", min_count=4)
    assert one["n_latents_counted"] == 1
    assert one["effective_layers"] == pytest.approx(metrics["effective_layers"])
    assert one["multi_layer_fraction"] == pytest.approx(metrics["multi_layer_fraction"])


def test_min_count_leaving_no_latent_is_an_error_naming_the_param(hand_store: Path, tmp_path: Path) -> None:
    # issue 28: an error naming the param, not empty headlines with exit 0
    with pytest.raises(MlsaeError, match=r"^analysis.min_count: 5 leaves no latent .* active on 4 tokens"):
        run(hand_store, tmp_path, "none", min_count=5)
    assert not (tmp_path / "none").exists()


def test_latent_tables_match_numpy(hand_store: Path, tmp_path: Path) -> None:
    metrics, out = run(hand_store, tmp_path, min_count=2)
    a = dense(HAND_INDICES, HAND_VALUES, HAND_SPECIAL, N_LATENTS)
    pair_mass = a.sum(axis=1)
    active = pair_mass > 0
    _, var_tf = moments(a / np.where(active, pair_mass, 1)[:, None, :], axis=1)
    mass_lf = a.sum(axis=0)  # (L, F)
    mass_f = mass_lf.sum(axis=0)

    latents = pl.read_parquet(out / LATENT_STATS.name).sort("latent")
    assert latents["latent"].to_list() == list(range(N_LATENTS))
    assert latents["count"].to_list() == [4, 3, 2, 2, 0]
    assert latents["n_entries"].to_list() == (a > 0).sum(axis=(0, 1)).tolist()
    np.testing.assert_allclose(latents["mass"].to_numpy(), mass_f)
    for f in range(4):
        row = latents.row(f, named=True)
        p = mass_lf[:, f] / mass_f[f]
        mean, var = moments(p, axis=0)
        entropy = -(p[p > 0] * np.log(p[p > 0])).sum() / np.log(3)
        assert row["mean_layer"] == pytest.approx(mean)
        assert row["var_layer"] == pytest.approx(var)
        assert row["std_layer"] == pytest.approx(np.sqrt(var))
        assert row["entropy"] == pytest.approx(entropy)
        assert row["n_layers_5pct"] == int((p >= 0.05).sum())
        assert row["layer_dist"] == pytest.approx(p.tolist())
        brute = brute_latent(a, f)
        for key in ("var_within", "var_between", "var_total", "var_within_mass", "var_total_mass"):
            assert row[key] == pytest.approx(brute[key], abs=1e-12), key
        assert row["within_share"] == pytest.approx(brute["within_share"])
        assert row["effective_layers"] == pytest.approx(brute["exp_h"].mean())
        assert row["multi_layer_fraction"] == pytest.approx((brute["s2"] >= 0.1).mean())
    never = latents.row(4, named=True)
    assert never["mass"] == 0 and never["n_entries"] == 0 and never["n_layers_5pct"] == 0
    for column in ("mean_layer", "var_layer", "std_layer", "entropy", "within_share", "effective_layers", "layer_dist"):
        assert never[column] is None, column
    # Latent 0 by hand: mass 1+1+2 (t0), .5 (t1), .25 (t2), 1+1 (t5) = 6.75; P = (2.25, 1, 3.5) / 6.75.
    assert latents.row(0, named=True)["layer_dist"] == pytest.approx([2.25 / 6.75, 1 / 6.75, 3.5 / 6.75])

    long = pl.read_parquet(out / LATENT_LAYER.name).sort("latent", "layer")
    assert long.columns == ["latent", "layer", "block", "mass", "count", "p"]
    assert long["latent"].to_list() == [f for f in range(4) for _ in range(3)]  # active latents only
    assert long["block"].to_list() == BLOCKS * 4
    np.testing.assert_allclose(long["mass"].to_numpy(), mass_lf[:, :4].T.reshape(-1))
    assert long["count"].to_list() == (a[:, :, :4] > 0).sum(axis=0).T.reshape(-1).tolist()
    np.testing.assert_allclose(long["p"].to_numpy(), (mass_lf[:, :4] / mass_f[:4]).T.reshape(-1))

    layers = pl.read_parquet(out / LAYER_STATS.name)
    assert layers["layer"].to_list() == [0, 1, 2] and layers["block"].to_list() == BLOCKS
    entries = (a > 0).sum(axis=(0, 2))
    assert layers["n_entries"].to_list() == entries.tolist() == [7, 5, 7]
    assert layers["n_latents_active"].to_list() == (a > 0).any(axis=0).sum(axis=1).tolist()
    np.testing.assert_allclose(layers["mass"].to_numpy(), mass_lf.sum(axis=1))
    np.testing.assert_allclose(layers["mean_activation"].to_numpy(), mass_lf.sum(axis=1) / entries)


def test_top_tokens_by_hand(hand_store: Path, tmp_path: Path) -> None:
    _, out = run(hand_store, tmp_path, top_tokens=2, chunk_tokens=1, min_count=1)
    top = pl.read_parquet(out / TOP_TOKENS.name)
    assert top.schema == pl.Schema(
        {"latent": pl.Int32, "rank": pl.Int32, "token": pl.Int64, "value": pl.Float32, "layer": pl.Int32}
    )
    got = {(r["latent"], r["rank"]): (r["token"], r["value"], r["layer"]) for r in top.iter_rows(named=True)}
    assert got == {
        # latent 0: 2.0 at t0 (l2); t5 peaks at 1.0 at l0 and l2: the lower layer wins; the special
        # token's 9.0 is ignored.
        (0, 1): (0, 2.0, 2),
        (0, 2): (5, 1.0, 0),
        (1, 1): (2, 4.0, 2),
        (1, 2): (0, 2.0, 0),
        (2, 1): (1, 3.0, 0),
        (2, 2): (5, 2.0, 0),
        (3, 1): (2, 1.5, 0),
        (3, 2): (0, 1.0, 2),
    }


def test_top_tokens_match_brute_force_under_any_chunking(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    indices, values, special = random_store(
        tmp_path / "s.zarr", rng, n_tokens=60, n_layers=4, k=3, n_latents=10, dtype=np.float16
    )
    a = dense(indices, values, special, 10)
    tokens = np.flatnonzero(~special)
    expected = []
    for f in range(10):
        peak = a[:, :, f].max(axis=1)
        order = sorted((-peak[i], tokens[i]) for i in range(len(tokens)) if peak[i] > 0)[:4]
        for rank, (neg, token) in enumerate(order, start=1):
            i = int(np.searchsorted(tokens, token))
            expected.append((f, rank, int(token), float(-neg), int(np.argmax(a[i, :, f]))))
    for chunk_tokens in (1, 7, None):
        _, out = run(tmp_path / "s.zarr", tmp_path, f"c{chunk_tokens}", top_tokens=4, chunk_tokens=chunk_tokens)
        top = pl.read_parquet(out / TOP_TOKENS.name).sort("latent", "rank")
        assert [tuple(r) for r in top.iter_rows()] == expected, chunk_tokens


def test_chunking_does_not_change_results(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    store = tmp_path / "s.zarr"
    indices, values, special = random_store(store, rng, n_tokens=45, n_layers=5, k=3, n_latents=12, dtype=np.float32)
    results = {c: run(store, tmp_path, f"c{c}", min_count=3, chunk_tokens=c) for c in (1, 3, None)}
    reference, ref_out = results[None]
    assert_metrics(reference, expected_metrics(dense(indices, values, special, 12), units_of(special), 3))
    for chunk_tokens, (metrics, out) in results.items():
        assert_metrics(metrics, reference, rel=1e-12)
        for name in (TOKEN_STATS.name, LATENT_STATS.name, LATENT_LAYER.name, LAYER_STATS.name, TOP_TOKENS.name):
            actual = pl.read_parquet(out / name)
            expected = pl.read_parquet(ref_out / name)
            keys = [c for c in ("latent", "token", "layer", "rank") if c in actual.columns]
            (
                assert_frame_equal(actual.sort(keys), expected.sort(keys), check_exact=False, rel_tol=1e-12),
                (
                    chunk_tokens,
                    name,
                ),
            )


def test_single_layer_store_has_zero_variances(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    indices = np.stack([rng.permutation(8)[:3] for _ in range(20)])[:, None, :]
    values = rng.uniform(0.5, 2.0, size=indices.shape).astype(np.float16)
    store = make_store(tmp_path / "s.zarr", indices, values, n_latents=8, blocks=[4])
    metrics, out = run(store, tmp_path, min_count=1)
    assert metrics["n_layers"] == 1 and metrics["n_active_pairs"] == 60
    for key in ("var_within", "var_total", "var_within_mass", "var_total_mass", "mean_layer_std"):
        assert metrics[key] == 0.0, key
    assert metrics["multi_layer_fraction"] == 0.0 and metrics["effective_layers"] == 1.0
    assert metrics["var_ratio"] is None and metrics["var_ratio_mass"] is None
    assert metrics["var_token_paper"] == 0.0 and metrics["var_aggregate_paper"] == 0.0
    saved = json.loads((tmp_path / "run" / "analysis.json").read_text())
    assert saved == metrics and saved["var_ratio"] is None
    latents = pl.read_parquet(out / LATENT_STATS.name).filter(pl.col("count") > 0)
    assert (latents["entropy"] == 0).all() and (latents["var_layer"] == 0).all()
    assert latents["layer_dist"].to_list() == [[1.0]] * latents.height
    assert (pl.read_parquet(out / TOKEN_STATS.name)["var_layer"] == 0).all()


def test_ratio_is_null_when_every_pair_is_single_layer(tmp_path: Path) -> None:
    # Latent 0 at layer 0 on even tokens and layer 1 on odd ones: var_tf = 0, var_f = 0.25.
    indices = np.zeros((10, 2, 1), dtype=np.int32)
    values = np.zeros((10, 2, 1), dtype=np.float16)
    values[0::2, 0, 0] = 1.0
    values[1::2, 1, 0] = 1.0
    metrics, _ = run(make_store(tmp_path / "s.zarr", indices, values, n_latents=2), tmp_path)
    assert metrics["var_within"] == 0.0 and metrics["var_total"] == pytest.approx(0.25)
    assert metrics["within_share"] == 0.0
    assert metrics["var_ratio"] is None and metrics["var_ratio_mass"] is None
    assert json.loads((tmp_path / "run" / "analysis.json").read_text())["var_ratio"] is None


def test_same_latent_at_consecutive_tokens_makes_separate_pairs(tmp_path: Path) -> None:
    # Every token: latent 2 at both layers (values 1 and 3), nothing else.
    indices = np.full((7, 2, 1), 2, dtype=np.int32)
    values = np.tile(np.array([1.0, 3.0], dtype=np.float16)[None, :, None], (7, 1, 1))
    metrics, out = run(make_store(tmp_path / "s.zarr", indices, values, n_latents=3), tmp_path, min_count=0)
    rows = pl.read_parquet(out / TOKEN_STATS.name)
    assert rows["token"].to_list() == list(range(7))
    assert rows["n_layers"].to_list() == [2] * 7 and rows["mass"].to_list() == [4.0] * 7
    assert rows["var_layer"].to_list() == [pytest.approx(0.1875)] * 7  # p = (1/4, 3/4)
    # min_count=0 still leaves out the never-active latents 0 and 1 (their variance is undefined).
    assert metrics["n_latents_counted"] == 1 and metrics["var_total"] == pytest.approx(0.1875)
    assert metrics["var_within"] == pytest.approx(0.1875) and metrics["var_between"] == pytest.approx(0.0)


def test_paper_formula_by_hand() -> None:
    # One latent, active at 1 of 2 tokens, at layer 1 only: per-token variance 0, and the
    # unnormalised q = (0, 1/2) gives 1/2 - 1/4 = r (1 - r) l^2 = 1/4.
    a = np.zeros((2, 2, 1))
    a[0, 1, 0] = 3.0
    assert _seed_metric(a / np.where(a.sum(1, keepdims=True) > 0, a.sum(1, keepdims=True), 1)) == (0.0, 0.25)


def test_streaming_paper_formula_matches_the_seed_per_batch(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    n_tokens, n_layers, n_latents, k = 60, 6, 9, 4
    a = rng.exponential(size=(n_tokens, n_layers, n_latents))
    a[rng.random(a.shape) < 0.4] = 0.0
    # Top-k per (token, layer) of the dense toy tensor; the rest are zeroed (as the SAE does).
    indices = np.argsort(-a, axis=2, kind="stable")[:, :, :k]
    values = np.take_along_axis(a, indices, axis=2).astype(np.float32)
    kept = np.zeros_like(a)
    np.put_along_axis(kept, indices, values.astype(np.float64), axis=2)
    document = np.arange(n_tokens) // 4
    store = make_store(tmp_path / "s.zarr", indices, values, n_latents=n_latents, document=document)
    metrics, out = run(store, tmp_path, paper_batch_tokens=12)
    total = kept.sum(axis=1, keepdims=True)
    p = np.divide(kept, total, out=np.zeros_like(kept), where=total > 0)
    starts = _batches(document, 12)
    tok, agg = zip(
        *(_seed_metric(p[(document >= starts[b]) & (document < starts[b + 1])]) for b in range(len(starts) - 1))
    )
    assert metrics["paper_batches"] == len(tok) == 5
    # (summed from the float32 spill of per-document sums: float32 precision)
    assert metrics["var_token_paper"] == pytest.approx(np.mean(tok), rel=1e-6)
    assert metrics["var_aggregate_paper"] == pytest.approx(np.mean(agg), rel=1e-6)
    assert metrics["var_ratio_paper"] == pytest.approx(np.mean(agg) / np.mean(tok), rel=1e-6)
    # ...and they differ from ours in the stated way: var_token_paper is diluted by inactive pairs.
    pair_var = pl.read_parquet(out / TOKEN_STATS.name)["var_layer"].cast(pl.Float64).sum()
    assert np.mean(tok) * n_tokens == pytest.approx(pair_var / n_latents, rel=1e-6)


def test_intervals_resample_documents(hand_store: Path, tmp_path: Path) -> None:
    """With resampling on, every headline figure comes with both bias estimates, its standard error
    and an interval around the reported (jackknife-corrected) value; the unit is the document."""
    rng = np.random.default_rng(2)
    indices, values, special = random_store(
        tmp_path / "s.zarr", rng, n_tokens=60, n_layers=4, k=3, n_latents=10, dtype=np.float32
    )
    metrics, _ = run(tmp_path / "s.zarr", tmp_path, min_count=2, bootstrap=30, seed=4)
    assert metrics["n_units"] == 30  # documents of two tokens
    for key in ("within_share", "within_share_mass", "effective_layers", "multi_layer_fraction", "var_ratio_paper"):
        lo, hi = metrics[f"{key}_ci"]
        assert lo <= metrics[key] <= hi
        assert metrics[key] == pytest.approx(metrics[f"{key}_plugin"] - metrics[f"{key}_bias_jack"])
    again, _ = run(tmp_path / "s.zarr", tmp_path, "again", min_count=2, bootstrap=30, seed=4)
    assert again == metrics


@pytest.mark.parametrize("complete", [None, False, "true"])
def test_incomplete_store_is_rejected_and_nothing_written(tmp_path: Path, complete: Any) -> None:
    store = make_store(
        tmp_path / "s.zarr", HAND_INDICES, HAND_VALUES, HAND_SPECIAL, n_latents=N_LATENTS, attrs={"complete": complete}
    )
    if complete is None:
        del zarr.open_group(str(store), mode="a").attrs["complete"]
    with pytest.raises(MlsaeError, match="incomplete"):
        run(store, tmp_path)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda i, v: (np.where(i == 3, 5, i), v), "latent id 5"),
        (lambda i, v: (np.where(i == 3, -1, i), v), "latent id -1"),
        (lambda i, v: (i, np.where(v == 4.0, -1.0, v).astype(np.float16)), "negative or NaN"),
        (lambda i, v: (i, np.where(v == 4.0, np.nan, v).astype(np.float16)), "negative or NaN"),
    ],
)
def test_bad_entries_are_rejected(tmp_path: Path, change: Any, message: str) -> None:
    indices, values = change(HAND_INDICES, HAND_VALUES)
    store = make_store(tmp_path / "s.zarr", indices, values, HAND_SPECIAL, n_latents=N_LATENTS)
    with pytest.raises(MlsaeError, match=message):
        run(store, tmp_path)
    assert not (tmp_path / "run").exists()


def test_bad_store_and_params_are_rejected(tmp_path: Path, hand_store: Path) -> None:
    with pytest.raises(MlsaeError, match="not found"):
        run(tmp_path / "missing.zarr", tmp_path)
    with pytest.raises(MlsaeError, match="chunk_tokens"):
        run(hand_store, tmp_path, chunk_tokens=0)
    wrong_layers = make_store(tmp_path / "w.zarr", HAND_INDICES, HAND_VALUES, n_latents=5, blocks=[1, 2])
    with pytest.raises(MlsaeError, match="'layers'"):
        run(wrong_layers, tmp_path)
    wrong_k = make_store(tmp_path / "k.zarr", HAND_INDICES, HAND_VALUES, n_latents=5, attrs={"k": 3})
    with pytest.raises(MlsaeError, match="'k'"):
        run(wrong_k, tmp_path)
    all_special = make_store(tmp_path / "a.zarr", HAND_INDICES, HAND_VALUES, np.ones(6), n_latents=5)
    with pytest.raises(MlsaeError, match="special"):
        run(all_special, tmp_path)
    assert not (tmp_path / "run").exists()


def test_rerun_replaces_previous_outputs(hand_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run" / "analysis"
    out.mkdir(parents=True)
    (out / "stale.parquet").write_text("old")
    metrics, _ = run(hand_store, tmp_path, min_count=1)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [TOKEN_STATS.name, LATENT_STATS.name, LATENT_LAYER.name, LAYER_STATS.name, TOP_TOKENS.name]
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["analysis", "analysis.json"]
    assert json.loads((out.parent / "analysis.json").read_text()) == metrics


def test_group_pairs_matches_dense_per_pair_sums() -> None:
    """The compiled grouping against plain numpy on the dense (token, layer, latent) array: every
    per-pair column, the row order (by token, then first appearance) and the tie rules."""
    from mlsae.analysis.accumulator import Pairs
    from mlsae.analysis.kernels import group_pairs

    rng = np.random.default_rng(11)
    n_tokens, n_layers, k, n_latents = 40, 6, 4, 9
    indices = np.stack([[rng.choice(n_latents, k, replace=False) for _ in range(n_layers)] for _ in range(n_tokens)])
    values = rng.choice(np.array([0.0, 0.5, 1.0, 2.0, 3.5], np.float32), size=indices.shape)  # ties and zeros
    token = np.arange(n_tokens, dtype=np.int64) * 3 + 7
    seen, slot = np.zeros(n_latents, np.bool_), np.empty(n_latents, np.int64)
    out = Pairs.empty(int((values > 0).sum()))
    n = group_pairs(indices.astype(np.int32), values, token, seen, slot, *vars(out).values())
    assert not seen.any()  # the scratch is left clean for the next chunk

    dense = np.zeros((n_tokens, n_layers, n_latents))
    for t, l, j in np.ndindex(indices.shape):
        dense[t, l, indices[t, l, j]] += values[t, l, j]
    ell = np.arange(n_layers, dtype=np.float64)
    expected = []
    for t in range(n_tokens):
        firsts = [indices[t, l, j] for l in range(n_layers) for j in range(k) if values[t, l, j] > 0]
        for f in dict.fromkeys(firsts):  # first appearance order
            a = dense[t, :, f]
            m = a.sum()
            p = a / m
            mu = (ell * p).sum()
            second = (ell**2 * p).sum()
            active = a > 0
            nz = p[active]
            ordered = np.sort(a[active])
            expected.append(
                (
                    token[t],
                    f,
                    active.sum(),
                    m,
                    mu,
                    second,
                    0.0 if active.sum() == 1 else second - mu**2,
                    a.max(),
                    int(np.argmax(a)),
                    -(nz * np.log(nz)).sum(),
                    0.0 if active.sum() == 1 else ordered[-2] / m,
                )
            )
    assert n == len(expected)
    got = out.slice(0, n)
    columns = list(zip(*expected))
    assert len(columns) == len(vars(got))  # every column is compared
    for name, want in zip(vars(got), columns):
        np.testing.assert_allclose(
            getattr(got, name), np.asarray(want, dtype=np.float64), rtol=1e-12, atol=1e-12, err_msg=name
        )
