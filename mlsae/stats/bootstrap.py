"""Bootstrap over eval contexts: a seeded count matrix, resampled sums and percentile intervals.

Contract. The resampling unit is the eval *context* (tokens of one context are not independent:
they share a document and attend to each other). A bootstrap replica ``r`` draws ``C`` contexts
with replacement; context ``c`` is drawn ``W[c, r]`` times, where ``W`` is the ``(C, R)`` matrix of
:func:`context_counts` (each column ~ Multinomial(C, uniform)). Every statistic here is a function
of *sums over contexts* of per-context sums ``s_c``, so replica ``r`` sees ``S_r = sum_c W[c, r] s_c``
(:func:`resample_sums`) and the point estimate sees ``S = sum_c s_c``. Interval: the
``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the replicas (percentile bootstrap,
linear interpolation), over the replicas where the statistic is finite.

Why: drawing ``W`` up front from ``numpy.random.default_rng(seed)`` makes the replicas a pure
function of (seed, C, R): they do not depend on how the data is chunked or in which order the
contexts are streamed, and the per-context sums are the only state a streaming stage keeps.

Statistics the evaluate stage uses, with ``n`` the token count of the sums:

* fraction of variance unexplained, per layer: ``fvu = sum err / (sum xx - |sum x|^2 / n)``, with
  ``err = |x - x_hat|^2``, ``xx = |x|^2`` summed over tokens and ``sum x`` the vector sum;
* a mean, ``sum value / n`` (KL, cross-entropy), and the difference of two means over the same
  tokens, ``delta_ce = sum CE_spliced / n - sum CE_clean / n``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mlsae.core.errors import MlsaeError

__all__ = [
    "bootstrap",
    "context_counts",
    "fvu",
    "interval_json",
    "mean",
    "mean_difference",
    "percentile_interval",
    "resample_sums",
]


def context_counts(n_contexts: int, n_resamples: int, seed: int) -> np.ndarray:
    """The ``(n_contexts, n_resamples)`` int64 matrix ``W``: column ``r`` counts how often each
    context is drawn in replica ``r`` (a multinomial draw of ``n_contexts`` contexts, uniform,
    from ``numpy.random.default_rng(seed)``; every column sums to ``n_contexts``)."""
    if n_contexts < 1 or n_resamples < 1:
        raise MlsaeError(f"bootstrap: need >= 1 context and >= 1 resample, got {n_contexts} and {n_resamples}")
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n_contexts, np.full(n_contexts, 1.0 / n_contexts), size=n_resamples)
    return np.ascontiguousarray(draws.T, dtype=np.int64)


def resample_sums(per_context: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``S[r, ...] = sum_c counts[c, r] * per_context[c, ...]``: the replica sums, shape
    ``(R, *per_context.shape[1:])``, float64."""
    per_context = np.asarray(per_context, dtype=np.float64)
    if per_context.shape[:1] != counts.shape[:1]:
        raise MlsaeError(
            f"bootstrap: per-context sums have {per_context.shape[:1]} contexts, the counts {counts.shape[0]}"
        )
    flat = per_context.reshape(per_context.shape[0], -1)
    return (counts.T.astype(np.float64) @ flat).reshape(counts.shape[1], *per_context.shape[1:])


def percentile_interval(replicas: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Percentile interval along axis 0: shape ``(2, *replicas.shape[1:])`` (low, high), NaN where
    no replica is finite. Non-finite replicas (an undefined ratio) are left out."""
    if not 0 < level < 1:
        raise MlsaeError(f"bootstrap: level must be in (0, 1), got {level}")
    x = np.asarray(replicas, dtype=np.float64)
    x = np.where(np.isfinite(x), x, np.nan)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    out = np.full((2, *x.shape[1:]), np.nan)
    defined = np.isfinite(x).any(axis=0)
    if defined.any():
        out[:, defined] = np.nanpercentile(x[:, defined], q, axis=0)
    return out


def bootstrap(
    per_context: Mapping[str, np.ndarray],
    statistic: Callable[..., np.ndarray],
    counts: np.ndarray,
    level: float = 0.95,
) -> tuple[np.ndarray, np.ndarray]:
    """Point estimate and percentile interval of ``statistic`` over resampled contexts.

    Args:
        per_context: named per-context sums, each of shape ``(C, ...)``.
        statistic: called with the same names as keyword arguments, each a sum with a leading
            replica axis (``(1, ...)`` for the point estimate, ``(R, ...)`` for the replicas);
            must be vectorised over that axis.
        counts: the ``(C, R)`` matrix from :func:`context_counts`.
        level: coverage of the interval.

    Returns:
        ``(point, interval)``: the statistic on the plain sums (leading axis dropped) and its
        ``(2, ...)`` interval (NaN where undefined).
    """
    totals = {name: np.asarray(s, dtype=np.float64).sum(axis=0)[None] for name, s in per_context.items()}
    replicas = {name: resample_sums(s, counts) for name, s in per_context.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        point = np.asarray(statistic(**totals))[0]
        resampled = np.asarray(statistic(**replicas))
    return point, percentile_interval(resampled, level)


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den``, NaN where ``den == 0``."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den != 0)


def fvu(err: np.ndarray, xx: np.ndarray, x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``sum err / (sum xx - |sum x|^2 / n)``, vectorised.

    Shapes: ``err`` and ``xx`` ``(..., L)``, ``x`` ``(..., L, d)``, ``n`` ``(...)`` or
    ``(..., L)`` (tokens in the sums). NaN where the centred total is 0.
    """
    x = np.asarray(x, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if n.ndim < np.ndim(err):
        n = n[..., None]
    centred = np.asarray(xx, dtype=np.float64) - _divide((x * x).sum(axis=-1), n)
    return _divide(err, centred)


def mean(value: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``sum value / n`` (NaN where ``n == 0``); ``n`` broadcasts against ``value``'s leading axes."""
    value, n = np.asarray(value, dtype=np.float64), np.asarray(n, dtype=np.float64)
    return _divide(value, n.reshape(n.shape + (1,) * (value.ndim - n.ndim)))


def mean_difference(value: np.ndarray, reference: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``sum value / n - sum reference / n`` (e.g. ``delta_ce``); shapes as in :func:`mean`."""
    return mean(np.asarray(value, dtype=np.float64) - np.asarray(reference, dtype=np.float64), n)


def interval_json(interval: np.ndarray) -> Any:
    """A ``(2, ...)`` interval as nested lists ``[lo, hi]`` (per trailing index), NaN as ``None``,
    ready for a strict JSON metrics file."""
    arr = np.moveaxis(np.asarray(interval, dtype=np.float64), 0, -1)
    obj = np.where(np.isfinite(arr), arr, np.nan).tolist()

    def clean(v: Any) -> Any:
        if isinstance(v, list):
            return [clean(u) for u in v]
        return None if v != v else float(v)

    return clean(obj)
