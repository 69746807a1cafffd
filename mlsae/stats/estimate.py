"""From a statistic's plug-in value and its resampled values to what the reports print.

Given the plug-in value ``θ̂`` (every unit once), ``R`` bootstrap replicas ``θ*_r`` and ``U``
delete-one-unit jackknife replicas ``θ_(i)`` (:mod:`mlsae.stats.bootstrap`), for a statistic
defined in a replica (undefined replicas, e.g. a ratio over 0, are left out):

    bias_boot = mean_r θ*_r − θ̂                          (reported as a diagnostic)
    bias_jack = (U − 1) (mean_i θ_(i) − θ̂)
    se        = sqrt((U − 1) / U · Σ_i (θ_(i) − mean_i θ_(i))²)      (the jackknife's)
    value     = θ̂ − bias_jack                           (the bias-corrected value, the headline)
    ci        = value ± t_{0.975, U − 1} · se

The interval is centred on the reported value, so it always contains it; the t quantile with
U − 1 degrees of freedom widens it for few units (it is the normal quantile for many). The scheme
is the one whose intervals covered a known truth in the coverage study (benchmarks/coverage.py,
docs/statistics.md): the jackknife's bias estimate removed nearly all of the plug-in bias of the
decomposition's shares, the bootstrap's only part of it, and percentile, basic and BCa intervals,
which sit around the biased plug-in, almost never covered. Figures the study found no valid
interval for are reported without one (`interval=False`).

`summary` returns, for a key ``k``: ``k`` (the value), ``k_plugin``, ``k_bias_boot``,
``k_bias_jack``, ``k_se`` and ``k_ci = [lo, hi]``; `None` where a figure is undefined.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

from mlsae.stats.bootstrap import resampled

if TYPE_CHECKING:
    from mlsae.core.metrics import Figures

LEVEL = 0.95


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    return x[np.isfinite(x)]


def _scalar(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def t_quantile(units: int, level: float = LEVEL) -> float:
    """The two-sided `level` quantile of Student's t with ``units - 1`` degrees of freedom."""
    return float(stats.t.ppf((1 + level) / 2, max(units - 1, 1)))


def summary(
    key: str,
    plugin: float,
    boot: np.ndarray | None,
    jack: np.ndarray | None,
    level: float = LEVEL,
    interval: bool = True,
) -> dict[str, Any]:
    """The reported figures of statistic `key` (module docstring): plug-in, both bias estimates,
    the bias-corrected value, its standard error and (unless not `interval`) its interval. Without
    replicas (`boot` and `jack` None: resampling switched off) only ``key`` (the plug-in)."""
    if boot is None or jack is None:
        return {key: _scalar(float(plugin))}
    out: dict[str, Any] = {
        key: None,
        f"{key}_plugin": _scalar(float(plugin)),
        f"{key}_bias_boot": None,
        f"{key}_bias_jack": None,
        f"{key}_se": None,
        **({f"{key}_ci": None} if interval else {}),
    }
    if not math.isfinite(plugin):
        return out
    b, j = _finite(boot), _finite(jack)
    n_units = np.asarray(jack).size
    if b.size >= 2:
        out[f"{key}_bias_boot"] = float(b.mean() - plugin)
    if j.size < 2:
        out[key] = float(plugin)
        return out
    bias_jack = (n_units - 1) * (j.mean() - plugin)
    se = math.sqrt((n_units - 1) / n_units * ((j - j.mean()) ** 2).sum())
    value = plugin - bias_jack
    out.update({key: float(value), f"{key}_bias_jack": float(bias_jack), f"{key}_se": float(se)})
    if interval:
        half = t_quantile(n_units, level) * se
        out[f"{key}_ci"] = [float(value - half), float(value + half)]
    return out


def bias_flag(figures: Figures, key: str, threshold: float = 0.25) -> bool:
    """Whether the bias correction of `key` is large against its standard error
    (``|bias_jack| / se > threshold``): the reports flag such figures."""
    bias, se = figures.get(f"{key}_bias_jack"), figures.get(f"{key}_se")
    return bias is not None and bool(se) and abs(bias) / se > threshold


def figures(
    key: str,
    per_unit: dict[str, np.ndarray],
    statistic: Callable[..., np.ndarray],
    counts: np.ndarray | None,
    by_layer: bool = False,
) -> dict[str, Any]:
    """The reported figures of a statistic of per-unit sums (:func:`mlsae.stats.bootstrap.resampled`).

    With `by_layer`, `statistic` returns one value per layer (shape ``(B, L)``): the figures are
    then ``key`` = their mean over layers (with its :func:`summary`), ``key_by_layer`` (the
    per-layer values) and, with resampling, ``key_by_layer_ci`` (their intervals)."""
    point, boot, jack = resampled(per_unit, statistic, counts)
    if not by_layer:
        return summary(key, float(point), boot, jack)
    mean_boot = None if boot is None else boot.mean(axis=1)
    mean_jack = None if jack is None else jack.mean(axis=1)
    out = summary(key, float(point.mean()), mean_boot, mean_jack)
    layers = [
        summary(key, float(point[j]), None if boot is None else boot[:, j], None if jack is None else jack[:, j])
        for j in range(point.shape[0])
    ]
    out[f"{key}_by_layer"] = [s[key] for s in layers]
    if boot is not None:
        out[f"{key}_by_layer_ci"] = [s[f"{key}_ci"] for s in layers]
    return out
