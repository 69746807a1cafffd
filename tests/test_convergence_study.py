"""The convergence study's bookkeeping (mlsae/studies/convergence.py): which points it trains, and
the split of a share's change into a fixed-set and a composition part, against a direct recompute
from per-latent records."""

from __future__ import annotations

import numpy as np
import polars as pl

from mlsae.studies.convergence import decompose, points


def test_points_constant_every_budget_decayed_at_the_ends() -> None:
    got = points([65536, 16384, 32768, 131072], ["constant", "cosine"], [0, 1])
    assert got == [
        ("constant", 0, 16384),
        ("constant", 0, 32768),
        ("constant", 0, 65536),
        ("constant", 0, 131072),
        ("constant", 1, 16384),
        ("constant", 1, 131072),
        ("cosine", 0, 16384),
        ("cosine", 0, 131072),
    ]
    # two seeds at the smallest and the largest budget (the minimum), one decayed schedule
    ends = [p for p in got if p[2] in (16384, 131072) and p[0] == "constant"]
    assert {p[1] for p in ends} == {0, 1}


def _table(rng: np.random.Generator, ids: np.ndarray) -> pl.DataFrame:
    n = len(ids)
    total = rng.uniform(1, 5, n)
    return pl.DataFrame(
        {
            "latent": ids,
            "count": rng.integers(0, 40, n),
            "n_documents": rng.integers(0, 12, n),
            "var_within": total * rng.uniform(0, 0.5, n),
            "var_total": total,
            "var_within_mass": total * rng.uniform(0, 0.9, n),
            "var_total_mass": total,
        }
    )


def test_decompose_equals_a_direct_recompute() -> None:
    rng = np.random.default_rng(3)
    a = _table(rng, np.arange(0, 300))
    b = _table(rng, np.arange(100, 420))
    for key, within, total in (
        ("within_share", "var_within", "var_total"),
        ("within_share_mass", "var_within_mass", "var_total_mass"),
    ):
        d = decompose(a, b, key, min_count=10, min_documents=5)
        # brute force, latent by latent
        ka = {int(r["latent"]) for r in a.iter_rows(named=True) if r["count"] >= 10 and r["n_documents"] >= 5}
        kb = {int(r["latent"]) for r in b.iter_rows(named=True) if r["count"] >= 10 and r["n_documents"] >= 5}

        def share(t: pl.DataFrame, ids: set[int], within: str = within, total: str = total) -> float:
            rows = [r for r in t.iter_rows(named=True) if int(r["latent"]) in ids]
            return sum(r[within] for r in rows) / sum(r[total] for r in rows)

        both = ka & kb
        change = share(b, kb) - share(a, ka)
        fixed = share(b, both) - share(a, both)
        assert d["k_a"] == len(ka) and d["k_b"] == len(kb) and d["fixed_latents"] == len(both) > 0
        np.testing.assert_allclose([d["change"], d["fixed_set"], d["composition"]], [change, fixed, change - fixed])
