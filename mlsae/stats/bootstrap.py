"""Resampling eval documents: the unit ids, the bootstrap count matrix and the jackknife.

Contract. The resampling unit is the eval *document* (a document's tokens share a topic and attend
to each other; documents are split whole between train and eval, mlsae/data/contexts.py). Every
statistic of the evaluate and aggregate stages is a function of *sums over units* of per-unit
sums ``s_u``, so a resampled statistic is the same function of reweighted sums
``S_w = sum_u w_u s_u``:

* the point estimate (plug-in) takes ``w_u = 1``;
* bootstrap replica ``r`` takes ``w_u = W[u, r]``, the number of times unit ``u`` is drawn when
  ``U`` units are drawn with replacement (:func:`resample_counts`: each column of the ``(U, R)``
  matrix is Multinomial(U, uniform));
* jackknife replica ``i`` (delete one unit) takes ``w_u = 1 - [u == i]``, i.e. ``S - s_i``.

:mod:`mlsae.stats.estimate` turns the three into a bias-corrected value, a standard error and an
interval.

Why: drawing ``W`` up front from ``numpy.random.default_rng(seed)`` (`analysis.seed`) makes the
replicas a pure function of (seed, U, R): they do not depend on how the data is chunked or in which
order it is streamed, and the per-unit sums are the only state a streaming stage keeps.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mlsae.core.errors import MlsaeError


def resample_counts(n_units: int, n_resamples: int, seed: int) -> np.ndarray:
    """The ``(n_units, n_resamples)`` int64 matrix ``W``: column ``r`` counts how often each unit
    is drawn in replica ``r`` (a multinomial draw of ``n_units`` units, uniform, from
    ``numpy.random.default_rng(seed)``; every column sums to ``n_units``)."""
    if n_units < 1 or n_resamples < 1:
        raise MlsaeError(f"bootstrap: need >= 1 unit and >= 1 resample, got {n_units} and {n_resamples}")
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_resamples)
    return np.ascontiguousarray(draws.T, dtype=np.int64)


def unit_index(ids: np.ndarray, max_units: int | None = None) -> tuple[np.ndarray, int]:
    """``(unit of each entry, number of units)`` for the document ids of a split's tokens: units
    are the distinct ids in ascending order (corpus order). With `max_units` and more documents
    than that, units are `max_units` groups of consecutive documents (equal counts up to one):
    groups of independent documents are still independent units, and the state per unit stays
    bounded on very large eval splits."""
    ids = np.asarray(ids)
    if ids.size == 0:
        raise MlsaeError("bootstrap: no tokens, so no documents to resample")
    distinct, unit = np.unique(ids, return_inverse=True)
    n = len(distinct)
    if max_units is not None and n > max_units:
        unit = unit * max_units // n
        n = max_units
    return unit.astype(np.int64), n


def resampled(
    per_unit: dict[str, np.ndarray],
    statistic: Callable[..., np.ndarray],
    counts: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(plug-in, bootstrap replicas, jackknife replicas)`` of `statistic` on per-unit sums.

    Args:
        per_unit: named per-unit sums, each of shape ``(U, ...)``.
        statistic: called with the same names as keyword arguments, each a sum with a leading
            replica axis (``(1, ...)`` for the plug-in, ``(R, ...)`` or ``(U, ...)`` for the
            replicas); vectorised over that axis.
        counts: the ``(U, R)`` bootstrap counts (:func:`resample_counts`), or None for the plug-in
            alone.

    Returns:
        the plug-in (leading axis dropped), and with `counts` the ``(R, ...)`` bootstrap and
        ``(U, ...)`` delete-one-unit replicas (NaN where the statistic is undefined).
    """
    sums = {name: np.asarray(s, dtype=np.float64) for name, s in per_unit.items()}
    totals = {name: s.sum(axis=0)[None] for name, s in sums.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        point = np.asarray(statistic(**totals))[0]
        if counts is None:
            return point, None, None
        weights = counts.T.astype(np.float64)
        boot = np.asarray(
            statistic(**{k: (weights @ s.reshape(len(s), -1)).reshape(-1, *s.shape[1:]) for k, s in sums.items()})
        )
        jack = np.asarray(statistic(**{k: totals[k] - s for k, s in sums.items()}))
    return point, boot, jack
