"""Per-latent layer-variance decomposition, two weightings, with context-bootstrap intervals.

Notation. ``a[t, l, f] >= 0`` is latent ``f``'s activation at eval token ``t`` and layer position
``l = 0 .. L-1``. The pair ``(t, f)`` is *active* when ``m_tf = sum_l a[t,l,f] > 0``; ``T_f`` is the
set of active tokens of ``f`` and ``n_f = |T_f|``. Per active pair:

* ``p_tf(l) = a[t,l,f] / m_tf``;  ``mu_tf = sum_l l p_tf(l)``;  ``v_tf = sum_l l^2 p_tf(l) - mu_tf^2``;
* ``H_tf = -sum_l p_tf(l) ln p_tf(l)`` (nats);  ``s2_tf`` = the second-largest ``p_tf(l)`` (0 if
  only one layer is active).

Per latent, **equal weighting** (each active token counts once):

* ``within_f  = (1/n_f) sum_{t in T_f} v_tf``
* ``between_f = (1/n_f) sum_{t in T_f} (mu_tf - mubar_f)^2``, ``mubar_f = (1/n_f) sum_t mu_tf``
* ``total_f   = within_f + between_f``, which by the law of total variance is the variance of
  the mixture ``Q_f(l) = (1/n_f) sum_t p_tf(l)``.

**Mass weighting** (token weight ``w_tf = m_tf / M_f``, ``M_f = sum_t m_tf``): the same three terms
with weighted means, ``within_mass_f = sum_t w_tf v_tf``, ``between_mass_f = sum_t w_tf (mu_tf -
mubar^m_f)^2``; ``total_mass_f`` is the variance of ``P_f(l) = sum_t a[t,l,f] / sum_{t,l} a[t,l,f]``.

Per latent also ``within_share_f = within_f / total_f`` (and ``_mass``), ``effective_layers_f``
``= mean_{t in T_f} exp(H_tf)`` and ``multi_layer_fraction_f = mean_{t in T_f} [s2_tf >= theta]``.

Headline (``finish``): over the *counted* latents ``K = {f : n_f >= max(min_count, 1)}``,
``var_within = mean_{f in K} within_f``, likewise ``var_between``, ``var_total``;
``within_share = var_within / var_total``, ``var_ratio = var_total / var_within``; the same five
from the mass-weighted terms with suffix ``_mass``; ``var_within_norm = var_within / (L-1)^2`` and
``var_total_norm`` (divisor 1 when ``L = 1``, where every variance is 0); ``effective_layers`` and
``multi_layer_fraction`` pool *all* active pairs (not only counted latents):
``sum_{t,f} exp(H_tf) / N`` and ``#{s2_tf >= theta} / N``, ``N`` the number of active pairs. A figure
that is 0/0 (no counted latent, a zero total) is ``None``.

The seed paper's estimator, with intervals, comes from :meth:`LayerStats.paper_metrics` (see
below). Intervals: ``<key>_ci = [lo, hi]``, the 95 % percentile bootstrap over eval contexts
(:mod:`mlsae.stats.bootstrap`): replica ``r`` weights context ``c`` by ``W[c, r]`` and recomputes every
figure, the counted set ``K`` included, from the reweighted sums.

Why two weightings. Equal weighting asks "for a typical firing of this latent, how spread is it
over layers, and how much does its mean layer move between firings"; mass weighting asks the same
of the latent's activation mass, so strong firings dominate, and its total is the spread of the
aggregate distribution ``P_f`` that the latent tables plot. Either way ``within + between = total``
holds per latent, so ``within_share`` is a proper fraction in [0, 1]. Averaging equally over
latents keeps frequent latents from dominating the headline.

What the seed paper's estimator measures instead (:meth:`LayerStats.paper_metrics`, kept as
``var_token_paper`` / ``var_aggregate_paper`` / ``var_ratio_paper``). It averages the per-token
distributions over *all* ``T`` tokens, inactive ones as zero vectors: ``q_f = (1/T) sum_t p_tf``
sums to the firing rate ``r_f = n_f / T``, not 1, and ``q_f = r_f Q_f``. Its "variance"
``sum_l l^2 q_f(l) - (sum_l l q_f(l))^2 = r_f (total_f + mu_f^2) - r_f^2 mu_f^2
= r_f total_f + r_f (1 - r_f) mu_f^2`` (``mu_f`` the mean of ``Q_f``) is not a variance: for a
sparse latent it is dominated by ``r_f mu_f^2``, i.e. by how deep the latent sits.

How it streams, and memory. :meth:`LayerStats.add` takes one chunk's per-pair arrays and, in one
compiled pass (:func:`mlsae.analysis.kernels.fold_pairs`), adds per pair the eight stats
``n, d, d^2, v, m, m d, m d^2, m v`` with ``d = mu_tf - c_f`` (``c_f`` a per-latent shift fixed the
first time ``f`` is seen, so the ``sum d^2 - (sum d)^2 / n`` variance formula does not cancel
catastrophically), in float64, to the point sums (weight 1) and to per-``(context, latent)`` sums
buffered for up to 64 contexts. A full buffer is folded into the replica sums with those contexts'
rows of the count matrix (one ``(R x contexts) @ (contexts x 8F)`` product, in column blocks).
Nothing grows with tokens: the state is the replica sums, ``8 R F`` float64 (118 MB for ``R = 200``
and ``F = 9216``), the buffer, at most ``64 x 8F`` float64 (37 MB), and ``O(F + C R)`` more
(``C`` contexts). :meth:`finish` evaluates 25 replicas at a time (about 20 ``25 x F`` arrays).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from mlsae.analysis.kernels import N_STATS, check_pairs, fold_pairs
from mlsae.core.errors import MlsaeError
from mlsae.stats.bootstrap import context_counts, interval_json, percentile_interval

__all__ = ["HEADLINE_KEYS", "LATENT_COLUMNS", "LayerStats", "pair_entropy"]

# Per-(context, latent) sums, in this order along the stats axis.
_N, _D, _D2, _V, _M, _MD, _MD2, _MV = range(8)
_N_STATS = N_STATS
# Per-context pooled-pair sums: active pairs, sum exp(H), multi-layer pairs.
_PAIRS, _EFF, _MULTI = range(3)
# Contexts whose dense (8, F) sums wait in a buffer before one matrix product folds them into the
# bootstrap replicas: one (R x B) @ (B x 8F) product per B contexts instead of a skinny one per
# chunk (each product rewrites the whole R x 8F replica array, so fewer is faster; memory stays
# bounded: B x 8F doubles).
_PENDING_CONTEXTS = 64
# Columns of the replica array updated per product in _flush (R x 4096 doubles: 6.4 MB at R = 200).
_FLUSH_COLUMNS = 4096
# Replicas evaluated at once in finish (bounds its (replicas x F) temporaries).
_REPLICA_BLOCK = 25

_VAR_KEYS = ("var_within", "var_between", "var_total", "within_share", "var_ratio")
HEADLINE_KEYS: tuple[str, ...] = (
    *_VAR_KEYS,
    *(f"{k}_mass" for k in _VAR_KEYS),
    "var_within_norm",
    "var_total_norm",
    "effective_layers",
    "multi_layer_fraction",
    "n_latents_counted",
)
LATENT_COLUMNS: dict[str, pl.DataType] = {
    "latent": pl.Int32(),
    "count": pl.Int64(),
    "mass": pl.Float64(),
    "var_within": pl.Float64(),
    "var_between": pl.Float64(),
    "var_total": pl.Float64(),
    "within_share": pl.Float64(),
    "var_within_mass": pl.Float64(),
    "var_between_mass": pl.Float64(),
    "var_total_mass": pl.Float64(),
    "within_share_mass": pl.Float64(),
    "effective_layers": pl.Float64(),
    "multi_layer_fraction": pl.Float64(),
}


def pair_entropy(mass: np.ndarray, a_log_a: np.ndarray) -> np.ndarray:
    """``H_tf`` from per-pair sums: ``H = ln m - (sum_l a ln a) / m`` (``0 ln 0 = 0``), clipped at
    0 (a one-layer pair gives 0 up to rounding). ``mass`` = ``sum_l a`` > 0, ``a_log_a`` =
    ``sum_l a ln a`` over the pair's active entries."""
    mass = np.asarray(mass, dtype=np.float64)
    return np.maximum(np.log(mass) - np.asarray(a_log_a, dtype=np.float64) / mass, 0.0)


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den``, NaN where ``den == 0``."""
    num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den != 0)


def _decompose(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Per-latent terms from ``(..., 8, F)`` sums; NaN where the latent has no active token."""
    n, m = sums[..., _N, :], sums[..., _M, :]
    out: dict[str, np.ndarray] = {}
    for suffix, w, d, d2, v in (("", n, _D, _D2, _V), ("_mass", m, _MD, _MD2, _MV)):
        mean_d = _div(sums[..., d, :], w)
        within = _div(sums[..., v, :], w)
        between = np.maximum(_div(sums[..., d2, :], w) - mean_d * mean_d, 0.0)
        out[f"var_within{suffix}"] = within
        out[f"var_between{suffix}"] = between
        out[f"var_total{suffix}"] = within + between
    return out


def _headline(sums: np.ndarray, pairs: np.ndarray, min_count: int, n_layers: int) -> dict[str, np.ndarray]:
    """Headline figures (all but the count) for ``(B, 8, F)`` sums and ``(B, 3)`` pair sums: each
    an array of shape ``(B,)``, NaN where undefined."""
    terms = _decompose(sums)
    counted = sums[:, _N, :] >= max(min_count, 1)
    n_counted = counted.sum(axis=1)
    out: dict[str, np.ndarray] = {}
    for suffix in ("", "_mass"):
        for part in ("within", "between", "total"):
            key = f"var_{part}{suffix}"
            out[key] = _div(np.where(counted, terms[key], 0.0).sum(axis=1), n_counted)
        within, total = out[f"var_within{suffix}"], out[f"var_total{suffix}"]
        out[f"within_share{suffix}"] = _div(within, total)
        out[f"var_ratio{suffix}"] = _div(total, within)
    scale = float(max(n_layers - 1, 1) ** 2)
    out["var_within_norm"] = out["var_within"] / scale
    out["var_total_norm"] = out["var_total"] / scale
    out["effective_layers"] = _div(pairs[:, _EFF], pairs[:, _PAIRS])
    out["multi_layer_fraction"] = _div(pairs[:, _MULTI], pairs[:, _PAIRS])
    return out


def basic_interval(point: np.ndarray, replicas: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Basic (reverse-percentile) bootstrap interval ``[2 θ̂ − q_hi, 2 θ̂ − q_lo]`` along axis 0.

    The decomposition's plug-in variances are biased (a latent's between-token variance shrinks
    when its few contexts repeat in a replica), so its replicas sit off the estimate; the bootstrap
    estimates that bias (E[θ*] − θ̂ ≈ E[θ̂] − θ) and the basic interval removes it. It can exclude
    the biased point estimate. The evaluate stage's ratios of sums use plain percentile intervals."""
    q = percentile_interval(replicas, level)
    return np.stack([2 * np.asarray(point, dtype=np.float64) - q[1], 2 * np.asarray(point, dtype=np.float64) - q[0]])


def _scalar(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class LayerStats:
    """Streaming accumulator of the decomposition above, with context-bootstrap replicas.

    Args:
        n_latents: ``F``; latent ids are ``0 .. F-1``.
        n_layers: ``L``, the number of layer positions.
        n_contexts: ``C``, the number of eval contexts (the resampling unit); context ids are
            ``0 .. C-1``. Contexts with no active pair still count in the resampling.
        min_count: latents with fewer active tokens are left out of the headline ``var_*``.
        multi_layer_threshold: ``theta`` in (0, 0.5]: a pair is multi-layer when ``s2_tf >= theta``.
        n_resamples: bootstrap replicas ``R``.
        seed: seed of the ``(C, R)`` context count matrix (:func:`mlsae.stats.bootstrap.context_counts`).
        level: coverage of the intervals.
    """

    def __init__(
        self,
        n_latents: int,
        n_layers: int,
        n_contexts: int,
        min_count: int,
        multi_layer_threshold: float = 0.1,
        n_resamples: int = 200,
        seed: int = 0,
        level: float = 0.95,
    ) -> None:
        for name, value, low in (
            ("n_latents", n_latents, 1),
            ("n_layers", n_layers, 1),
            ("n_contexts", n_contexts, 1),
            ("analysis.min_count", min_count, 0),
            ("analysis.n_resamples", n_resamples, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise MlsaeError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 < multi_layer_threshold <= 0.5:
            raise MlsaeError(
                f"analysis.multi_layer_threshold must be in (0, 0.5] (a second-largest layer share is "
                f"at most 0.5), got {multi_layer_threshold!r}"
            )
        self.n_latents, self.n_layers, self.n_contexts = int(n_latents), int(n_layers), int(n_contexts)
        self.min_count = int(min_count)
        self.threshold = float(multi_layer_threshold)
        self.level = level
        self.counts = context_counts(self.n_contexts, int(n_resamples), seed)  # (C, R)
        self.counts_f64 = self.counts.astype(np.float64)
        f, r = self.n_latents, int(n_resamples)
        self.shift = np.full(f, np.nan)  # c_f, fixed when f is first seen
        # Stored latent-major, (F, 8), so that one pair's eight stats share a cache line in
        # fold_pairs; `sums` (8, F) and `replicas` (R, 8, F) are transposed views.
        self._sums = np.zeros((f, _N_STATS))  # point estimate: every context once
        self.sums = self._sums.T
        self.pair_sums = np.zeros(3)
        self.eff = np.zeros(f)  # per latent sum exp(H)
        self.multi = np.zeros(f)  # per latent multi-layer pairs
        self._replicas = np.zeros((r, f, _N_STATS))
        self._pending = np.zeros((min(_PENDING_CONTEXTS, self.n_contexts), f, _N_STATS))
        self._pending_row = np.full(self.n_contexts, -1, dtype=np.int64)  # row of a context in _pending
        self._pending_contexts: list[int] = []  # the context of each used row
        self.pair_replicas = np.zeros((r, 3))
        self.tokens = np.zeros(self.n_contexts)  # non-special tokens per context (paper estimator)

    def add(
        self,
        latent: np.ndarray,
        context: np.ndarray,
        mass: np.ndarray,
        mean: np.ndarray,
        second: np.ndarray,
        entropy: np.ndarray,
        share2: np.ndarray,
    ) -> None:
        """Fold one chunk of active pairs in (any order; one context may span several chunks).

        Args (1-D, one entry per active pair):
            latent: ``f``; context: the token's eval context; mass: ``m_tf > 0``;
            mean: ``mu_tf``; second: ``sum_l l^2 p_tf(l)``; entropy: ``H_tf`` (nats, see
            :func:`pair_entropy`); share2: ``s2_tf`` (second-largest activation / ``m_tf``).
        """
        latent = np.ascontiguousarray(latent, dtype=np.int64)
        context = np.ascontiguousarray(context, dtype=np.int64)
        floats = [np.ascontiguousarray(x, dtype=np.float64) for x in (mass, mean, second, entropy, share2)]
        if latent.ndim != 1 or any(x.shape != latent.shape for x in (context, *floats)):
            raise MlsaeError("layer_stats: per-pair arrays must be 1-D and of one length")
        if latent.size == 0:
            return
        bad = check_pairs(latent, context, *floats, self.n_latents, self.n_contexts)
        if bad == 1:
            raise MlsaeError(f"layer_stats: latent ids must be in 0..{self.n_latents - 1}")
        if bad == 2:
            raise MlsaeError(f"layer_stats: context ids must be in 0..{self.n_contexts - 1}")
        if bad == 3:
            raise MlsaeError("layer_stats: per-pair values must be finite, with mass > 0")

        mass, mean, second, entropy, share2 = floats
        exp_entropy = np.exp(entropy)
        # Assign the chunk's contexts rows of the pending buffer, a block of at most `cap` contexts
        # at a time (usually one block); the first fold also adds the point sums.
        used = np.flatnonzero(np.bincount(context, minlength=self.n_contexts))
        context_pairs = np.zeros((self.n_contexts, 3))
        cap = self._pending.shape[0]
        for start in range(0, used.size, cap):
            block = used[start : start + cap]
            new_contexts = block[self._pending_row[block] < 0]
            if len(self._pending_contexts) + new_contexts.size > cap:
                self._flush()
                new_contexts = block
            self._pending_row[new_contexts] = np.arange(
                len(self._pending_contexts), len(self._pending_contexts) + new_contexts.size
            )
            self._pending_contexts += new_contexts.tolist()
            rows = np.full(self.n_contexts, -1, dtype=np.int64)  # only this block's contexts
            rows[block] = self._pending_row[block]
            fold_pairs(
                latent,
                context,
                mass,
                mean,
                second,
                exp_entropy,
                share2,
                self.threshold,
                self.shift,
                start == 0,
                self._sums,
                self.eff,
                self.multi,
                context_pairs,
                self._pending,
                rows,
            )
        pairs = context_pairs[used]
        self.pair_sums += pairs.sum(axis=0)
        self.pair_replicas += self.counts_f64[used].T @ pairs

    def _flush(self) -> None:
        """Fold the buffered per-context sums into the replicas: replicas[r] += sum_c counts[c, r] S_c."""
        n = len(self._pending_contexts)
        if n == 0:
            return
        contexts = np.asarray(self._pending_contexts)
        weights = np.ascontiguousarray(self.counts_f64[contexts].T)  # (R, n)
        dense = self._pending[:n].reshape(n, -1)
        replicas = self._replicas.reshape(weights.shape[0], -1)
        # In column blocks, so the product's temporary stays in cache and the replica array is
        # read and written once.
        for start in range(0, dense.shape[1], _FLUSH_COLUMNS):
            block = slice(start, start + _FLUSH_COLUMNS)
            replicas[:, block] += weights @ dense[:, block]
        self._pending[:n] = 0.0
        self._pending_row[contexts] = -1
        self._pending_contexts = []

    @property
    def replicas(self) -> np.ndarray:
        """``(R, 8, F)``: the sums of every bootstrap replica (each context counted as often as the
        replica drew it)."""
        self._flush()
        return self._replicas.transpose(0, 2, 1)

    def add_tokens(self, context: np.ndarray) -> None:
        """Count tokens for :meth:`paper_metrics`: the context id of every analysed (non-special)
        token, active pairs or not; call once per chunk of tokens."""
        context = np.asarray(context).astype(np.int64, copy=False).reshape(-1)
        if context.size and (context.min() < 0 or context.max() >= self.n_contexts):
            raise MlsaeError(f"layer_stats: context ids must be in 0..{self.n_contexts - 1}")
        self.tokens += np.bincount(context, minlength=self.n_contexts)

    def paper_metrics(self) -> dict[str, Any]:
        """The seed paper's estimator over the tokens given to :meth:`add_tokens` (one batch), with
        bootstrap intervals: ``var_token_paper = sum_{t,f} v_tf / (T F)``, ``var_aggregate_paper =
        (1/F) sum_f [sum_l l^2 q_f(l) - (sum_l l q_f(l))^2]`` with ``q_f = (1/T) sum_t p_tf`` over
        all ``T`` tokens, ``var_ratio_paper`` = their ratio, and ``<key>_ci``. Built from the same
        sums: ``sum_t mu_tf = S_d + n c_f`` and ``sum_t sum_l l^2 p_tf = S_v + S_d2 + 2 c_f S_d +
        n c_f^2``."""
        if self.tokens.sum() < 1:
            raise MlsaeError("layer_stats: paper_metrics needs the token counts (add_tokens)")
        point = self._paper(self.sums[None], self.tokens.sum()[None])
        replica_tokens = self.counts_f64.T @ self.tokens
        step = _REPLICA_BLOCK
        parts = [
            self._paper(self.replicas[i : i + step], replica_tokens[i : i + step])
            for i in range(0, self.replicas.shape[0], step)
        ]
        out: dict[str, Any] = {key: _scalar(value[0]) for key, value in point.items()}
        for key in point:
            replicas = np.concatenate([part[key] for part in parts])
            out[f"{key}_ci"] = interval_json(basic_interval(point[key][0], replicas, self.level))
        return out

    def _paper(self, sums: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """The paper's figures for ``(B, 8, F)`` sums over ``(B,)`` tokens."""
        c = np.nan_to_num(self.shift)  # unseen latents have n = 0 and all sums 0
        n, sd, sd2, sv = sums[:, _N], sums[:, _D], sums[:, _D2], sums[:, _V]
        first = _div(sd + n * c, tokens[:, None])
        second = _div(sv + sd2 + 2 * c * sd + n * c * c, tokens[:, None])
        token = _div(sv.sum(axis=1), tokens * self.n_latents)
        aggregate = (second - first * first).mean(axis=1)
        return {"var_token_paper": token, "var_aggregate_paper": aggregate, "var_ratio_paper": _div(aggregate, token)}

    def replica_metrics(self) -> dict[str, np.ndarray]:
        """Each headline float figure in every bootstrap replica: ``key -> (R,)`` array, NaN where
        undefined in that replica (the intervals are percentiles of these)."""
        step = _REPLICA_BLOCK
        parts = [
            _headline(self.replicas[i : i + step], self.pair_replicas[i : i + step], self.min_count, self.n_layers)
            for i in range(0, self.replicas.shape[0], step)
        ]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def finish(self) -> tuple[pl.DataFrame, dict[str, Any]]:
        """The per-latent table (schema :data:`LATENT_COLUMNS`, rows: latents with >= 1 active
        token, by id) and the headline dict (:data:`HEADLINE_KEYS` plus ``<key>_ci`` for every
        float key; undefined figures are ``None``)."""
        count = self.sums[_N]
        active = np.flatnonzero(count > 0)
        terms = {k: v[active] for k, v in _decompose(self.sums).items()}
        n = count[active]
        table = pl.DataFrame(
            {
                "latent": active.astype(np.int32),
                "count": np.rint(n).astype(np.int64),
                "mass": self.sums[_M, active],
                **{k: terms[k] for k in ("var_within", "var_between", "var_total")},
                "within_share": _div(terms["var_within"], terms["var_total"]),
                **{k: terms[k] for k in ("var_within_mass", "var_between_mass", "var_total_mass")},
                "within_share_mass": _div(terms["var_within_mass"], terms["var_total_mass"]),
                "effective_layers": self.eff[active] / n,
                "multi_layer_fraction": self.multi[active] / n,
            },
            schema=LATENT_COLUMNS,
        ).fill_nan(None)

        point = _headline(self.sums[None], self.pair_sums[None], self.min_count, self.n_layers)
        replicas = self.replica_metrics()
        metrics: dict[str, Any] = {key: _scalar(point[key][0]) for key in HEADLINE_KEYS[:-1]}
        metrics["n_latents_counted"] = int((count >= max(self.min_count, 1)).sum())
        for key in HEADLINE_KEYS[:-1]:
            metrics[f"{key}_ci"] = interval_json(basic_interval(point[key][0], replicas[key], self.level))
        return table, metrics
