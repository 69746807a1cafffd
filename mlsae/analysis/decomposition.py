"""Per-latent layer-variance decomposition under three token weightings, with document resampling.

Notation (docs/statistics.md has every definition as a formula). ``a[t, l, f] >= 0`` is latent
``f``'s activation at eval token ``t`` and layer position ``l = 0 .. L-1``. The pair ``(t, f)`` is
*active* when ``m_tf = sum_l a[t,l,f] > 0``; ``T_f`` is the set of active tokens of ``f`` and
``n_f = |T_f|``. Per active pair: ``p_tf(l) = a[t,l,f] / m_tf``; ``mu_tf``, ``v_tf`` the mean and
variance of ``l`` under ``p_tf``; ``H_tf`` its entropy (nats); ``s2_tf`` its second-largest share;
``pk_tf = max_l a[t,l,f]`` its peak.

Per latent and token weighting ``w_tf`` (``sum_t w_tf = 1`` over ``T_f``): ``within_f = sum_t w_tf
v_tf``, ``between_f = sum_t w_tf (mu_tf - mubar_f)^2``, ``total_f = within_f + between_f`` (the law
of total variance: the variance of the mixture ``sum_t w_tf p_tf``). Weightings: equal (``w = 1 /
n_f``), mass (``w ∝ m_tf``, suffix ``_mass``) and peak (``w ∝ pk_tf``, suffix ``_peak``: a strong
firing counts more, but not more for spreading over more layers, as mass does).

Headline figures over the counted latents ``K``: latents active on at least `min_count` tokens and in
at least `min_documents` documents, fixed by the plug-in and held in every replica. Latents weighted
equally: ``var_within = mean_{K} within_f`` (likewise between, total), ``within_share =
var_within / var_total``, ``var_ratio = 1 / within_share``, per weighting; ``within_share_pooled =
sum_K n_f within_f / sum_K n_f total_f`` (firings pooled: latents weighted by firing count); the
median and quartiles of ``within_share_f`` over ``K``; ``effective_layers`` and
``multi_layer_fraction`` over all active pairs. Dense latents (firing rate ``r_f = n_f / T`` at or
above 0.5 and 0.9): their count and share of the activation mass, and the share of ``sum_K
within_f`` that latents with ``r_f >= max_rate`` hold. Variants of the main figures: ``_sparse``
(``K`` without the latents with ``r_f >= max_rate``), ``_any_docs`` (latents with `min_count`
tokens in any number of documents: this project's earlier ``K``), ``_k_resampled`` (``K`` recomputed
in every replica). Why ``K`` needs documents and stays fixed: a latent seen in one document shows
no variation between documents in the sample or in any replica, so no resampling scheme sees its
bias, and a ``K`` that changes between replicas makes latents dropping out look like bias; the
coverage study (docs/statistics.md) measured both. The seed paper's estimator, per batch of
consecutive documents, is :func:`paper_batches`.

Uncertainty (mlsae/stats/estimate.py): every figure is a function of per-latent sums over
documents. The plug-in uses every document once; bootstrap replica ``r`` weights document ``u`` by
``W[u, r]`` (mlsae/stats/bootstrap.py), the jackknife deletes one document at a time.

How it streams, and memory. :meth:`LayerStats.add` takes one chunk's per-pair arrays and, in one
compiled pass (:func:`mlsae.analysis.kernels.fold_pairs`), adds per pair the fourteen stats
``(1, d, d^2, v, m, m d, m d^2, m v, pk, pk d, pk d^2, pk v, exp(H), [s2 >= theta])`` with ``d =
mu_tf - c_f`` (``c_f`` a per-latent shift fixed when ``f`` is first seen, so the ``sum d^2 - (sum
d)^2 / n`` variance formula does not cancel) to the point sums and to per-(document, latent) sums
buffered for up to 128 documents. A full buffer is folded into the bootstrap replicas with those
documents' rows of the count matrix (one ``(R x documents) @ (documents x 14F)`` product, in column
blocks), and its non-zero (document, latent) rows are appended, as float32, to a spill file on disk:
the jackknife and the per-batch paper estimator read them back at the end, one block of documents
at a time. Held in memory: the replicas, ``14 R F`` float64, the buffer, at most ``128 x 14F``
float64, one block of ``25 x 14F``, and ``O(F R + U)`` more: nothing grows with the tokens but the
spill on disk.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mlsae.analysis.kernels import N_STATS, check_pairs, count_documents, fold_pairs, scatter_stats
from mlsae.core.errors import MlsaeError
from mlsae.stats.bootstrap import resample_counts
from mlsae.stats.estimate import summary

__all__ = ["HEADLINE_KEYS", "LATENT_COLUMNS", "LayerStats", "pair_entropy"]

# Per-(unit, latent) sums, in this order along the stats axis (mlsae.analysis.kernels.fold_pairs).
_N, _D, _D2, _V, _M, _MD, _MD2, _MV, _P, _PD, _PD2, _PV, _E, _U = range(N_STATS)
_WEIGHTINGS = {"": (_N, _D, _D2, _V), "_mass": (_M, _MD, _MD2, _MV), "_peak": (_P, _PD, _PD2, _PV)}
# Units whose sums wait in a buffer before one matrix product folds them into the replicas.
_PENDING_UNITS = 128
# Columns of the replica array updated per product in _flush (R x 4096 doubles: 6.4 MB at R = 200).
_FLUSH_COLUMNS = 4096
# Replicas (bootstrap or jackknife) evaluated at once (bounds the (replicas x F) temporaries).
_REPLICA_BLOCK = 25
_DENSE_RATES = (0.5, 0.9)

_VAR_KEYS = ("var_within", "var_between", "var_total", "within_share", "var_ratio")
_MAIN_KEYS = ("within_share", "within_share_mass", "within_share_peak", "var_ratio", "within_share_pooled")
_VARIANTS = ("_sparse", "_any_docs", "_k_resampled")
NO_INTERVAL: frozenset[str] = frozenset(
    {f"{k}{v}" for v in ("_any_docs", "_k_resampled") for k in _MAIN_KEYS}
    | {"within_share_median", "within_share_q25", "within_share_q75"}
    | {"var_total_mass", "var_between_mass", "var_ratio_mass", "var_between_peak", "var_total_peak", "var_ratio_peak"}
    | {"dense_mass_share_50", "dense_mass_share_90", "var_aggregate_paper_spread"}
)
"""Figures whose intervals did not cover a known truth in the coverage study (benchmarks/coverage.py,
benchmarks/results/coverage.json, docs/statistics.md; below 90 % at 64 or 256 documents): their
bias-corrected value and standard error are reported, no interval. Why (the figures are in
docs/statistics.md): latents seen in few documents, whose bias no resampling sees (``_any_docs``);
a latent set recomputed per replica (``_k_resampled``); a quantile's jackknife SE, known to be
inconsistent; the between-token and total variances and ratios under mass and peak weighting, whose
SE comes out too small; the dense latents' mass shares, whose latent set jumps when a latent's rate
sits near the cut, which the delete-one jackknife does not see; the paper estimator's spread part,
whose per-batch bias (latents seen in one document of a batch) the jackknife leaves."""
HEADLINE_KEYS: tuple[str, ...] = (
    *(f"{k}{w}" for w in _WEIGHTINGS for k in _VAR_KEYS),
    "var_within_norm",
    "var_total_norm",
    "within_share_pooled",
    "var_ratio_pooled",
    "within_share_median",
    "within_share_q25",
    "within_share_q75",
    "effective_layers",
    "multi_layer_fraction",
    *(f"{k}{v}" for v in _VARIANTS for k in _MAIN_KEYS),
    "effective_layers_sparse",
    "multi_layer_fraction_sparse",
    "dense_mass_share_50",
    "dense_mass_share_90",
    "dense_within_share",
)
"""Every figure of :meth:`LayerStats.finish` that gets resampled figures (module docstring)."""

LATENT_COLUMNS: dict[str, pl.DataType] = {
    "latent": pl.Int32(),
    "count": pl.Int64(),
    "mass": pl.Float64(),
    "rate": pl.Float64(),
    "n_documents": pl.Int64(),
    **{
        f"{k}{w}": pl.Float64() for w in _WEIGHTINGS for k in ("var_within", "var_between", "var_total", "within_share")
    },
    "effective_layers": pl.Float64(),
    "multi_layer_fraction": pl.Float64(),
}


def pair_entropy(mass: np.ndarray, a_log_a: np.ndarray) -> np.ndarray:
    """``H_tf`` from per-pair sums: ``H = ln m - (sum_l a ln a) / m`` (``0 ln 0 = 0``), clipped at
    0 (a one-layer pair gives 0 up to rounding). ``mass`` = ``sum_l a`` > 0, ``a_log_a`` =
    ``sum_l a ln a`` over the pair's active entries."""
    mass = np.asarray(mass, dtype=np.float64)
    return np.maximum(np.log(mass) - np.asarray(a_log_a, dtype=np.float64) / mass, 0.0)


def _div(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """``num / den``, NaN where ``den == 0``."""
    num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den != 0)


def _decompose(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Per-latent terms from ``(..., 14, F)`` sums, per weighting; NaN where a latent is never active."""
    out: dict[str, np.ndarray] = {}
    for suffix, (w, d, d2, v) in _WEIGHTINGS.items():
        mean_d = _div(sums[..., d, :], sums[..., w, :])
        within = _div(sums[..., v, :], sums[..., w, :])
        between = np.maximum(_div(sums[..., d2, :], sums[..., w, :]) - mean_d * mean_d, 0.0)
        out[f"var_within{suffix}"] = within
        out[f"var_between{suffix}"] = between
        out[f"var_total{suffix}"] = within + between
    return out


def _set_mean(x: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Mean of ``x`` (B, F) over the latents in ``member`` (B, F) that are defined; NaN if none."""
    keep = member & np.isfinite(x)
    return _div(np.where(keep, x, 0.0).sum(axis=1), keep.sum(axis=1))


class _Settings:
    def __init__(self, min_count: int, threshold: float, max_rate: float, min_documents: int, n_layers: int):
        self.min_count, self.threshold, self.max_rate = min_count, threshold, max_rate
        self.min_documents, self.n_layers = min_documents, n_layers


class _Sets:
    """The plug-in's latent sets, held fixed in every replica (the scheme the coverage study
    measured, benchmarks/coverage.py): ``counted`` (at least `min_count` active tokens and
    `min_documents` documents: K), ``any_docs`` (at least `min_count` tokens, any number of
    documents), ``dense`` (firing rate at least `max_rate`)."""

    def __init__(self, n: np.ndarray, tokens: float, documents: np.ndarray, s: _Settings):
        many = n >= max(s.min_count, 1)
        self.any_docs = many
        self.counted = many & (documents >= s.min_documents)
        self.dense = _div(n, tokens) >= s.max_rate


def _headline(
    sums: np.ndarray, tokens: np.ndarray, documents: np.ndarray, fixed: _Sets, s: _Settings
) -> dict[str, np.ndarray]:
    """Every figure of :data:`HEADLINE_KEYS` for ``(B, 14, F)`` sums over ``(B,)`` analysed tokens:
    each an array of shape ``(B,)``, NaN where undefined. The latent sets are the plug-in's (`fixed`),
    except for the ``_k_resampled`` figures, whose K is recomputed from the replica's counts and its
    ``(B, F)`` per-latent document counts."""
    terms = _decompose(sums)
    n = sums[:, _N, :]
    rate = _div(n, tokens[:, None])
    present = n > 0
    counted = fixed.counted[None] & present
    sparse = ~fixed.dense[None]
    sets = {
        "": counted,
        "_sparse": counted & sparse,
        "_any_docs": fixed.any_docs[None] & present,
        "_k_resampled": (n >= max(s.min_count, 1)) & (documents >= s.min_documents),
    }
    out: dict[str, np.ndarray] = {}
    within_sum = np.where(counted, np.nan_to_num(terms["var_within"]), 0.0).sum(axis=1)
    for name, member in sets.items():
        for w in _WEIGHTINGS:
            within = _set_mean(terms[f"var_within{w}"], member)
            total = _set_mean(terms[f"var_total{w}"], member)
            if name == "":
                out[f"var_within{w}"] = within
                out[f"var_between{w}"] = _set_mean(terms[f"var_between{w}"], member)
                out[f"var_total{w}"] = total
                out[f"var_ratio{w}"] = _div(total, within)
            elif w == "":
                out[f"var_ratio{name}"] = _div(total, within)
            out[f"within_share{w}{name}"] = _div(within, total)
        weight = np.where(member, n, 0.0)
        pooled_within = (weight * np.nan_to_num(terms["var_within"])).sum(axis=1)
        pooled_total = (weight * np.nan_to_num(terms["var_total"])).sum(axis=1)
        out[f"within_share_pooled{name}"] = _div(pooled_within, pooled_total)
    out["var_ratio_pooled"] = _div(1.0, out["within_share_pooled"])
    scale = float(max(s.n_layers - 1, 1) ** 2)
    out["var_within_norm"] = out["var_within"] / scale
    out["var_total_norm"] = out["var_total"] / scale
    share = _div(terms["var_within"], terms["var_total"])
    share = np.where(counted, share, np.nan)
    with np.errstate(all="ignore"):
        defined = np.isfinite(share).any(axis=1)
        quartiles = np.full((3, share.shape[0]), np.nan)
        if defined.any():
            quartiles[:, defined] = np.nanpercentile(share[defined], [25, 50, 75], axis=1)
    out["within_share_q25"], out["within_share_median"], out["within_share_q75"] = quartiles
    pairs = n.sum(axis=1)
    out["effective_layers"] = _div(sums[:, _E, :].sum(axis=1), pairs)
    out["multi_layer_fraction"] = _div(sums[:, _U, :].sum(axis=1), pairs)
    sparse_pairs = np.where(sparse, n, 0.0).sum(axis=1)
    out["effective_layers_sparse"] = _div(np.where(sparse, sums[:, _E, :], 0.0).sum(axis=1), sparse_pairs)
    out["multi_layer_fraction_sparse"] = _div(np.where(sparse, sums[:, _U, :], 0.0).sum(axis=1), sparse_pairs)
    mass = sums[:, _M, :]
    for cut in _DENSE_RATES:
        dense = rate >= cut
        out[f"dense_latents_{round(cut * 100)}"] = dense.sum(axis=1).astype(np.float64)
        out[f"dense_mass_share_{round(cut * 100)}"] = _div(np.where(dense, mass, 0.0).sum(axis=1), mass.sum(axis=1))
    heavy = counted & ~sparse
    out["dense_within_share"] = _div(np.where(heavy, np.nan_to_num(terms["var_within"]), 0.0).sum(axis=1), within_sum)
    return out


class _Spill:
    """The non-zero per-(unit, latent) sums of every folded buffer, appended to files on disk as
    float32, read back in blocks of units (module docstring). Float32 is exact enough for what reads
    them: a leave-one-out sum is the float64 total minus one document's share, so the rounding
    (a relative 6e-8 of that share) moves a jackknife value by far less than its own deviation."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="mlsae-spill-")
        root = Path(self._dir.name)
        self._paths = {"unit": root / "unit.i4", "latent": root / "latent.i4", "stats": root / "stats.f4"}
        self._files = {k: open(p, "ab") for k, p in self._paths.items()}  # noqa: SIM115 (closed in read)
        self.n = 0
        self.last_unit = -1
        self.sorted = True

    def append(self, unit: np.ndarray, latent: np.ndarray, stats: np.ndarray) -> None:
        if unit.size == 0:
            return
        order = np.argsort(unit, kind="stable")
        unit, latent, stats = unit[order], latent[order], stats[order]
        if unit[0] < self.last_unit:
            self.sorted = False
        self.last_unit = int(unit[-1])
        unit.astype(np.int32).tofile(self._files["unit"])
        latent.astype(np.int32).tofile(self._files["latent"])
        np.ascontiguousarray(stats, dtype=np.float32).tofile(self._files["stats"])
        self.n += unit.size

    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit, latent, stats) of every entry, sorted by unit (memory-mapped when written so)."""
        for f in self._files.values():
            f.close()
        if self.n == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros((0, N_STATS), np.float32)
        unit = np.memmap(self._paths["unit"], np.int32, mode="r", shape=(self.n,))
        latent = np.memmap(self._paths["latent"], np.int32, mode="r", shape=(self.n,))
        stats = np.memmap(self._paths["stats"], np.float32, mode="r", shape=(self.n, N_STATS))
        if not self.sorted:  # units came out of order (a hand-made store): sort in memory
            order = np.argsort(unit, kind="stable")
            return np.asarray(unit)[order], np.asarray(latent)[order], np.asarray(stats)[order]
        return unit, latent, stats

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._dir.cleanup()


class LayerStats:
    """Streaming accumulator of the decomposition above, with document-resampling replicas.

    Args:
        n_latents: ``F``; latent ids are ``0 .. F-1``.
        n_layers: ``L``, the number of layer positions.
        n_units: ``U``, the number of eval documents (the resampling unit); unit ids ``0 .. U-1``,
            in corpus order (the paper estimator's batches are runs of consecutive units). Units
            with no active pair still count in the resampling.
        min_count: latents with fewer active tokens are left out of the headline ``var_*``.
        multi_layer_threshold: ``theta`` in (0, 0.5]: a pair is multi-layer when ``s2_tf >= theta``.
        n_resamples: bootstrap replicas ``R``.
        seed: seed of the ``(U, R)`` count matrix (:func:`mlsae.stats.bootstrap.resample_counts`).
        max_rate: firing rate from which a latent counts as dense (the ``_sparse`` figures leave
            them out).
        min_documents: documents a latent must be active in to count in K (besides `min_count` tokens).
        paper_batch_tokens: analysed tokens per batch of the paper's estimator (:func:`paper_batches`).
    """

    def __init__(
        self,
        n_latents: int,
        n_layers: int,
        n_units: int,
        min_count: int,
        multi_layer_threshold: float = 0.1,
        n_resamples: int = 200,
        seed: int = 0,
        max_rate: float = 0.5,
        min_documents: int = 5,
        paper_batch_tokens: int = 2048,
    ) -> None:
        for name, value, low in (
            ("n_latents", n_latents, 1),
            ("n_layers", n_layers, 1),
            ("n_units", n_units, 1),
            ("analysis.min_count", min_count, 0),
            ("analysis.bootstrap", n_resamples, 0),
            ("analysis.min_documents", min_documents, 1),
            ("analysis.paper_batch_tokens", paper_batch_tokens, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise MlsaeError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 < multi_layer_threshold <= 0.5:
            raise MlsaeError(
                f"analysis.multi_layer_threshold must be in (0, 0.5] (a second-largest layer share is "
                f"at most 0.5), got {multi_layer_threshold!r}"
            )
        self.n_latents, self.n_layers, self.n_units = int(n_latents), int(n_layers), int(n_units)
        self.settings = _Settings(
            int(min_count), float(multi_layer_threshold), float(max_rate), int(min_documents), self.n_layers
        )
        self.paper_batch_tokens = int(paper_batch_tokens)
        self.resample = n_resamples > 0  # 0: plug-in values only
        self.counts = (
            resample_counts(self.n_units, int(n_resamples), seed)
            if self.resample
            else np.zeros((self.n_units, 0), np.int64)
        )
        self.counts_f64 = self.counts.astype(np.float64)
        f, r = self.n_latents, int(n_resamples)
        self.shift = np.full(f, np.nan)  # c_f, fixed when f is first seen
        # Latent-major, (F, 14), so that one pair's stats share cache lines in fold_pairs; `sums`
        # (14, F) and `replicas` (R, 14, F) are transposed views.
        self._sums = np.zeros((f, N_STATS))
        self.sums = self._sums.T
        self._replicas = np.zeros((r, f, N_STATS))
        self._pending = np.zeros((min(_PENDING_UNITS, self.n_units), f, N_STATS))
        self._pending_row = np.full(self.n_units, -1, dtype=np.int64)  # row of a unit in _pending
        self._pending_units: list[int] = []  # the unit of each used row
        self.tokens = np.zeros(self.n_units)  # analysed tokens per unit
        self._spill = _Spill()

    # -- streaming -----------------------------------------------------------------------------

    def add(
        self,
        latent: np.ndarray,
        unit: np.ndarray,
        mass: np.ndarray,
        mean: np.ndarray,
        second: np.ndarray,
        entropy: np.ndarray,
        share2: np.ndarray,
        peak: np.ndarray,
    ) -> None:
        """Fold one chunk of active pairs in (any order; one unit may span several chunks).

        Args (1-D, one entry per active pair):
            latent: ``f``; unit: the token's document; mass: ``m_tf > 0``; mean: ``mu_tf``;
            second: ``sum_l l^2 p_tf(l)``; entropy: ``H_tf`` (nats, :func:`pair_entropy`); share2:
            ``s2_tf``; peak: ``pk_tf = max_l a > 0``.
        """
        latent = np.ascontiguousarray(latent, dtype=np.int64)
        unit = np.ascontiguousarray(unit, dtype=np.int64)
        floats = [np.ascontiguousarray(x, dtype=np.float64) for x in (mass, mean, second, entropy, share2, peak)]
        if latent.ndim != 1 or any(x.shape != latent.shape for x in (unit, *floats)):
            raise MlsaeError("layer_stats: per-pair arrays must be 1-D and of one length")
        if latent.size == 0:
            return
        bad = check_pairs(latent, unit, *floats, self.n_latents, self.n_units)
        if bad == 1:
            raise MlsaeError(f"layer_stats: latent ids must be in 0..{self.n_latents - 1}")
        if bad == 2:
            raise MlsaeError(f"layer_stats: unit ids must be in 0..{self.n_units - 1}")
        if bad == 3:
            raise MlsaeError("layer_stats: per-pair values must be finite, with mass and peak > 0")
        mass, mean, second, entropy, share2, peak = floats
        exp_entropy = np.exp(entropy)
        used = np.flatnonzero(np.bincount(unit, minlength=self.n_units))
        cap = self._pending.shape[0]
        for start in range(0, used.size, cap):
            block = used[start : start + cap]
            new_units = block[self._pending_row[block] < 0]
            if len(self._pending_units) + new_units.size > cap:
                self._flush()
                new_units = block
            rows_now = np.arange(len(self._pending_units), len(self._pending_units) + new_units.size)
            self._pending_row[new_units] = rows_now
            self._pending_units += new_units.tolist()
            rows = np.full(self.n_units, -1, dtype=np.int64)  # only this block's units
            rows[block] = self._pending_row[block]
            fold_pairs(
                latent,
                unit,
                mass,
                mean,
                second,
                exp_entropy,
                share2,
                peak,
                self.settings.threshold,
                self.shift,
                start == 0,
                self._sums,
                self._pending,
                rows,
            )

    def add_tokens(self, unit: np.ndarray) -> None:
        """Count analysed tokens (active pairs or not): the unit of every analysed token of a chunk."""
        unit = np.asarray(unit).astype(np.int64, copy=False).reshape(-1)
        if unit.size and (unit.min() < 0 or unit.max() >= self.n_units):
            raise MlsaeError(f"layer_stats: unit ids must be in 0..{self.n_units - 1}")
        self.tokens += np.bincount(unit, minlength=self.n_units)

    def _flush(self) -> None:
        """Fold the buffered per-unit sums into the replicas (``replicas[r] += sum_u W[u, r] S_u``)
        and append their non-zero rows to the spill."""
        n = len(self._pending_units)
        if n == 0:
            return
        units = np.asarray(self._pending_units)
        weights = np.ascontiguousarray(self.counts_f64[units].T)  # (R, n)
        dense = self._pending[:n].reshape(n, -1)
        if self.resample:
            replicas = self._replicas.reshape(weights.shape[0], -1)
            for start in range(0, dense.shape[1], _FLUSH_COLUMNS):
                block = slice(start, start + _FLUSH_COLUMNS)
                replicas[:, block] += weights @ dense[:, block]
        row, latent = np.nonzero(self._pending[:n, :, _N])
        self._spill.append(units[row], latent, self._pending[row, latent])
        self._pending[:n] = 0.0
        self._pending_row[units] = -1
        self._pending_units = []

    @property
    def replicas(self) -> np.ndarray:
        """``(R, 14, F)``: the sums of every bootstrap replica."""
        self._flush()
        return self._replicas.transpose(0, 2, 1)

    # -- the end -------------------------------------------------------------------------------

    def _documents(self, unit: np.ndarray, latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(point (F,), bootstrap (R, F)) count of documents each latent is active in (the spill is
        sorted by unit)."""
        point = np.zeros(self.n_latents, np.int64)
        boot = np.zeros((self.n_latents, self.counts.shape[1]), np.int64)
        last = np.full(self.n_latents, -1, np.int64)
        count_documents(unit, latent, self.counts, last, point, boot)
        return point.astype(np.float64), boot.T.astype(np.float64)

    def _jackknife(
        self, unit: np.ndarray, latent: np.ndarray, stats: np.ndarray, documents: np.ndarray, fixed: _Sets
    ) -> dict[str, np.ndarray]:
        """Every figure with each unit deleted in turn: ``key -> (U,)``."""
        parts: list[dict[str, np.ndarray]] = []
        bounds = np.searchsorted(unit, np.arange(0, self.n_units + _REPLICA_BLOCK, _REPLICA_BLOCK))
        for b, u0 in enumerate(range(0, self.n_units, _REPLICA_BLOCK)):
            u1 = min(self.n_units, u0 + _REPLICA_BLOCK)
            lo, hi = bounds[b], bounds[b + 1]
            own = np.zeros((u1 - u0, N_STATS, self.n_latents))
            scatter_stats(unit[lo:hi] - u0, latent[lo:hi], stats[lo:hi], np.arange(N_STATS), own)
            present = np.zeros((u1 - u0, self.n_latents))
            present[unit[lo:hi] - u0, latent[lo:hi]] = 1.0
            sums = self.sums[None] - own
            tokens = self.tokens.sum() - self.tokens[u0:u1]
            parts.append(_headline(sums, tokens, documents[None] - present, fixed, self.settings))
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def _bootstrap(self, documents: np.ndarray, fixed: _Sets) -> dict[str, np.ndarray]:
        """Every figure in every bootstrap replica: ``key -> (R,)``."""
        replicas = self.replicas
        tokens = self.counts_f64.T @ self.tokens
        parts = [
            _headline(
                replicas[i : i + _REPLICA_BLOCK],
                tokens[i : i + _REPLICA_BLOCK],
                documents[i : i + _REPLICA_BLOCK],
                fixed,
                self.settings,
            )
            for i in range(0, replicas.shape[0], _REPLICA_BLOCK)
        ]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def finish(self) -> tuple[pl.DataFrame, dict[str, Any]]:
        """The per-latent table (schema :data:`LATENT_COLUMNS`, rows: latents with >= 1 active
        token, by id) and the figures: for every key of :data:`HEADLINE_KEYS` its value and
        resampled figures (:func:`mlsae.stats.estimate.summary`), the paper's estimator
        (:func:`paper_batches`), ``n_latents_counted`` and ``n_units``."""
        try:
            self._flush()
            unit, latent, stats = self._spill.read()
            documents, documents_boot = self._documents(np.asarray(unit), np.asarray(latent))
            tokens = np.array([self.tokens.sum()])
            fixed = _Sets(self.sums[_N], float(self.tokens.sum()), documents, self.settings)
            point = _headline(self.sums[None], tokens, documents[None], fixed, self.settings)
            metrics: dict[str, Any] = {}
            if self.resample:
                boot = self._bootstrap(documents_boot, fixed)
                jack = self._jackknife(np.asarray(unit), np.asarray(latent), stats, documents, fixed)
                for key in HEADLINE_KEYS:
                    metrics.update(
                        summary(key, float(point[key][0]), boot[key], jack[key], interval=key not in NO_INTERVAL)
                    )
            else:
                for key in HEADLINE_KEYS:
                    metrics.update(summary(key, float(point[key][0]), None, None))
            for cut in _DENSE_RATES:  # counts of the sample's latents, not estimates
                key = f"dense_latents_{round(cut * 100)}"
                metrics[key] = int(point[key][0])
            metrics["n_latents_counted"] = int(fixed.counted.sum())
            metrics["n_latents_few_documents"] = int((fixed.any_docs & ~fixed.counted).sum())
            metrics["n_units"] = self.n_units
            metrics.update(
                paper_batches(
                    unit,
                    latent,
                    stats,
                    self.tokens,
                    self.shift,
                    self.counts if self.resample else None,
                    self.n_latents,
                    self.paper_batch_tokens,
                )
            )
            table = self._table(documents)
        finally:
            self._spill.close()
        return table, metrics

    def _table(self, documents: np.ndarray) -> pl.DataFrame:
        count = self.sums[_N]
        active = np.flatnonzero(count > 0)
        terms = {k: v[active] for k, v in _decompose(self.sums).items()}
        n = count[active]
        columns: dict[str, Any] = {
            "latent": active.astype(np.int32),
            "count": np.rint(n).astype(np.int64),
            "mass": self.sums[_M, active],
            "rate": n / max(self.tokens.sum(), 1.0),
            "n_documents": documents[active].astype(np.int64),
        }
        for w in _WEIGHTINGS:
            for k in ("var_within", "var_between", "var_total"):
                columns[f"{k}{w}"] = terms[f"{k}{w}"]
            columns[f"within_share{w}"] = _div(terms[f"var_within{w}"], terms[f"var_total{w}"])
        columns["effective_layers"] = self.sums[_E, active] / n
        columns["multi_layer_fraction"] = self.sums[_U, active] / n
        return pl.DataFrame(columns, schema=LATENT_COLUMNS).fill_nan(None)


# --------------------------------------------------------------------------------------------
# The seed paper's estimator, per batch
# --------------------------------------------------------------------------------------------


def paper_batches(
    unit: np.ndarray,
    latent: np.ndarray,
    stats: np.ndarray,
    tokens: np.ndarray,
    shift: np.ndarray,
    counts: np.ndarray | None,
    n_latents: int,
    batch_tokens: int,
) -> dict[str, Any]:
    """The seed paper's estimator as the seed computes it: per batch, then averaged over batches.

    Batches are runs of consecutive units (documents, in corpus order) holding at least
    `batch_tokens` analysed tokens (the last run, if shorter, joins the one before). In a batch
    ``b`` of ``T_b`` tokens, with ``p_tf = 0`` for inactive pairs, ``q_bf = (1/T_b) sum_t p_tf``,
    ``r_bf = n_bf / T_b`` and ``v(x) = sum_l l^2 x(l) - (sum_l l x(l))^2``:

        var_token_b     = (1 / (T_b F)) sum_{t,f} v(p_tf)
        var_aggregate_b = (1 / F) sum_f v(q_bf)
                        = (1 / F) sum_f r_bf total_bf + (1 / F) sum_f r_bf (1 - r_bf) mu_bf^2
                          (spread part)                   (depth part)

    with ``total_bf``, ``mu_bf`` the variance and mean of the batch's equal-weighting mixture.
    Reported: ``var_token_paper``, ``var_aggregate_paper`` and its two parts
    (``var_aggregate_paper_spread``, ``var_aggregate_paper_depth``) as means over batches, and
    ``var_ratio_paper`` = mean var_aggregate / mean var_token (the seed's two means), with the
    resampled figures: a replica reweights each document inside its batch (batches fixed); the
    jackknife deletes one document from its batch. Figures in :data:`NO_INTERVAL` get no interval.
    Without `counts`, plug-in values only.
    """
    unit = np.asarray(unit)
    starts = _batch_starts(tokens, batch_tokens)
    n_batches = len(starts) - 1
    bounds = np.searchsorted(unit, starts)
    c = np.nan_to_num(shift)
    parts: dict[str, list[tuple[float, np.ndarray, np.ndarray]]]
    parts = {"token": [], "aggregate": [], "spread": [], "depth": []}  # per batch: (point, boot (R,), jack (n_b,))
    for b in range(n_batches):
        u0, u1 = starts[b], starts[b + 1]
        lo, hi = bounds[b], bounds[b + 1]
        own = np.zeros((u1 - u0, 4, n_latents))  # n, sum d, sum d^2, sum v per (unit, latent)
        scatter_stats(unit[lo:hi] - u0, latent[lo:hi], stats[lo:hi], np.array([_N, _D, _D2, _V]), own)
        flat = own.reshape(u1 - u0, -1)
        t = tokens[u0:u1]
        batch_point = _paper_values(flat.sum(axis=0)[None], np.array([t.sum()]), c, n_latents)
        w = (counts if counts is not None else np.zeros((len(tokens), 0)))[u0:u1].T.astype(np.float64)  # (R, n_b)
        batch_boot = _paper_values(w @ flat, w @ t, c, n_latents)
        batch_jack = _paper_values(flat.sum(axis=0)[None] - flat, t.sum() - t, c, n_latents)
        for key in parts:
            parts[key].append((batch_point[key][0], batch_boot[key], batch_jack[key]))
    if n_batches == 0:
        return {}
    out: dict[str, Any] = {"paper_batches": n_batches}
    means: dict[str, tuple[float, np.ndarray, np.ndarray]] = {}
    for key, per_batch in parts.items():
        mean_point = np.mean([p for p, _, _ in per_batch])
        boot = np.nanmean(np.stack([b for _, b, _ in per_batch]), axis=0)
        total = np.sum([p for p, _, _ in per_batch])
        jack = np.concatenate([(total - p + j) / n_batches for p, _, j in per_batch])
        means[key] = (float(mean_point), boot, jack)
    names = {
        "token": "var_token_paper",
        "aggregate": "var_aggregate_paper",
        "spread": "var_aggregate_paper_spread",
        "depth": "var_aggregate_paper_depth",
    }
    resample = counts is not None
    for key, name in names.items():
        point, boot, jack = means[key]
        interval = name not in NO_INTERVAL
        out.update(summary(name, point, boot if resample else None, jack if resample else None, interval=interval))
    (pa, ba, ja), (pt, bt, jt) = means["aggregate"], means["token"]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = pa / pt if pt else math.nan
        ratio_boot, ratio_jack = (ba / bt, ja / jt) if resample else (None, None)
        interval = "var_ratio_paper" not in NO_INTERVAL
        out.update(summary("var_ratio_paper", ratio, ratio_boot, ratio_jack, interval=interval))
    return out


def _batch_starts(tokens: np.ndarray, batch_tokens: int) -> np.ndarray:
    """First unit of each batch, and one past the last unit (module function docstring)."""
    starts, filled = [0], 0.0
    for u, t in enumerate(tokens):
        filled += t
        if filled >= batch_tokens and u + 1 < len(tokens):
            starts.append(u + 1)
            filled = 0.0
    if len(starts) > 1 and tokens[starts[-1] :].sum() < batch_tokens:
        starts.pop()  # a short last run joins the batch before
    return np.asarray([*starts, len(tokens)])


def _paper_values(flat: np.ndarray, tokens: np.ndarray, c: np.ndarray, n_latents: int) -> dict[str, np.ndarray]:
    """The per-batch figures for ``(B, 4F)`` sums (n, sum d, sum d^2, sum v) over ``(B,)`` tokens."""
    sums = flat.reshape(flat.shape[0], 4, n_latents)
    n, sd, sd2, sv = sums[:, 0], sums[:, 1], sums[:, 2], sums[:, 3]
    t = tokens[:, None]
    first = _div(sd + n * c, t)  # r mu
    second = _div(sv + sd2 + 2 * c * sd + n * c * c, t)  # r E[l^2]
    rate = _div(n, t)
    depth = np.where(n > 0, _div(first * first, rate) - first * first, 0.0)  # r (1 - r) mu^2
    aggregate = second - first * first
    return {
        "token": _div(sv.sum(axis=1), tokens * n_latents),
        "aggregate": aggregate.mean(axis=1),
        "spread": (aggregate - depth).mean(axis=1),
        "depth": depth.mean(axis=1),
    }
