"""Compiled (numba) loops of the aggregate stage: group a chunk's top-k entries into active
(token, latent) pairs, fold pairs into per-latent and per-(unit, latent) sums, count a latent's
documents per bootstrap replica, and keep each latent's top tokens.

Why compiled. Each job is a scatter over a small table per element (a token's pair slots; a
latent's sums; a latent's short top list). In numpy each became a dozen whole-array passes (a sort
of packed keys per token, one ``bincount`` per sum, a Polars sort per chunk for the top lists):
several times slower on the benchmark store (``benchmarks/aggregate.py`` measures the rates), where in a loop each element is read once and every sum it feeds is updated while it is in
registers. The loops release the GIL, so the stage's reader and writer threads run
alongside.

Definitions are those of :mod:`mlsae.analysis.aggregate` and :mod:`mlsae.analysis.decomposition`; the tests compare
the loops' results with dense numpy computations. Compiled code is cached next to this file
(``__pycache__``), so only the first run on a machine pays the compile (a few seconds).
"""

from __future__ import annotations

import numba
import numpy as np

# Per-(unit, latent) sums, in this order along the stats axis (mlsae.analysis.decomposition).
N_STATS = 14


@numba.njit(cache=True, nogil=True)
def group_pairs(
    indices,
    values,
    token,
    seen,
    slot,
    out_token,
    out_latent,
    out_n_layers,
    out_mass,
    out_mean,
    out_second,
    out_var,
    out_peak_value,
    out_peak_layer,
    out_entropy,
    out_share2,
):
    """Group ``(c, L, k)`` entries by (token, latent); write one row per active pair.

    Args:
        indices: ``(c, L, k)`` latent ids in ``0 .. F-1``.
        values: ``(c, L, k)`` float32 activations ``>= 0``; 0 is an inactive entry.
        token: ``(c,)`` global token index of each row.
        seen, slot: ``(F,)`` scratch; ``seen`` must be all False on entry and is on exit.
        out_*: per-pair outputs, each at least as long as the number of active entries.

    Rows come out by token, then by the (layer, slot) at which the latent first appears in the
    token. Per pair: ``n_layers`` active entries, ``mass = sum_l a``, ``mean = sum_l l a / mass``,
    ``second = sum_l l^2 a / mass``, ``var = max(second - mean^2, 0)``, the peak activation and
    its lowest layer, ``entropy = max(ln mass - sum_l a ln a / mass, 0)`` and ``share2`` = the
    second-largest activation / mass; ``var``, ``entropy`` and ``share2`` are exactly 0 for a pair
    active at one layer. Sums run in float64 over layers in increasing order.

    Returns:
        The number of pairs written.
    """
    n_tokens, n_layers, k = indices.shape
    width = n_layers * k
    members = np.empty(width, np.int64)  # the token's latents, in order of first appearance
    count = np.empty(width, np.int64)
    sums = np.empty((width, 4))  # per slot: sum a, sum l a, sum l^2 a, sum a ln a
    top = np.empty((width, 2), np.float32)  # per slot: largest and second-largest activation
    top_layer = np.empty(width, np.int64)
    a_log_a = np.empty(width)
    pos = 0
    for t in range(n_tokens):
        for layer in range(n_layers):  # a tight loop, so the logs pipeline
            for j in range(k):
                a = np.float64(values[t, layer, j])
                a_log_a[layer * k + j] = a * np.log(a) if a > 0 else 0.0
        n_pairs = 0
        for layer in range(n_layers):
            for j in range(k):
                a32 = values[t, layer, j]
                if a32 == 0:
                    continue
                f = indices[t, layer, j]
                if seen[f]:
                    s = slot[f]
                else:
                    seen[f] = True
                    s = n_pairs
                    slot[f] = s
                    members[s] = f
                    n_pairs += 1
                    count[s] = 0
                    sums[s, 0] = sums[s, 1] = sums[s, 2] = sums[s, 3] = 0.0
                    top[s, 0] = top[s, 1] = 0.0
                    top_layer[s] = layer
                a = np.float64(a32)
                count[s] += 1
                sums[s, 0] += a
                sums[s, 1] += a * layer
                sums[s, 2] += a * (layer * layer)
                sums[s, 3] += a_log_a[layer * k + j]
                if a32 > top[s, 0]:  # strict: the lowest layer keeps a tied peak
                    top[s, 1] = top[s, 0]
                    top[s, 0] = a32
                    top_layer[s] = layer
                elif a32 > top[s, 1]:
                    top[s, 1] = a32
        for s in range(n_pairs):
            f = members[s]
            seen[f] = False
            c, mass = count[s], sums[s, 0]
            mean, second = sums[s, 1] / mass, sums[s, 2] / mass
            out_token[pos] = token[t]
            out_latent[pos] = f
            out_n_layers[pos] = c
            out_mass[pos] = mass
            out_mean[pos] = mean
            out_second[pos] = second
            out_peak_value[pos] = top[s, 0]
            out_peak_layer[pos] = top_layer[s]
            if c == 1:
                out_var[pos] = 0.0
                out_entropy[pos] = 0.0
                out_share2[pos] = 0.0
            else:
                out_var[pos] = max(second - mean * mean, 0.0)
                out_entropy[pos] = max(np.log(mass) - sums[s, 3] / mass, 0.0)
                out_share2[pos] = top[s, 1] / mass
            pos += 1
    return pos


@numba.njit(cache=True, nogil=True)
def check_pairs(latent, unit, mass, mean, second, entropy, share2, peak, n_latents, n_units):
    """0 if every pair is valid, else 1 (latent id out of range), 2 (unit id out of range) or
    3 (a non-finite value, or mass or peak <= 0)."""
    for i in range(latent.size):
        if latent[i] < 0 or latent[i] >= n_latents:
            return 1
        if unit[i] < 0 or unit[i] >= n_units:
            return 2
        m = mass[i]
        if not (
            np.isfinite(m)
            and m > 0
            and np.isfinite(mean[i])
            and np.isfinite(second[i])
            and np.isfinite(entropy[i])
            and np.isfinite(share2[i])
            and np.isfinite(peak[i])
            and peak[i] > 0
        ):
            return 3
    return 0


@numba.njit(cache=True, nogil=True)
def fold_pairs(
    latent, unit, mass, mean, second, exp_entropy, share2, peak, threshold, shift, point, sums, pending, pending_row
):
    """Fold valid pairs (see :func:`check_pairs`) into the sums of :class:`mlsae.analysis.decomposition.LayerStats`.

    Per pair, with ``d = mean - shift[f]``, ``v = max(second - mean^2, 0)``, ``m`` its mass, ``p`` its
    peak activation, ``e = exp(H_tf)`` (computed vectorised by the caller) and ``u = [share2 >=
    threshold]``, the fourteen stats are ``(1, d, d^2, v, m, m d, m d^2, m v, p, p d, p d^2, p v, e,
    u)``. When ``point``: ``shift[f]`` is set to the pair's mean where it is NaN (the first time
    ``f`` is seen) and the stats are added to ``sums[f, :]``. Always: they are added to
    ``pending[pending_row[unit], f, :]`` where that row is ``>= 0``. Both tables are latent-major,
    so a pair's stats share a cache line or two.
    """
    stats = np.empty(N_STATS)
    for i in range(latent.size):
        f, c = latent[i], unit[i]
        m, mu, pk = mass[i], mean[i], peak[i]
        if point and np.isnan(shift[f]):
            shift[f] = mu
        d = mu - shift[f]
        v = max(second[i] - mu * mu, 0.0)
        stats[0], stats[1], stats[2], stats[3] = 1.0, d, d * d, v
        stats[4], stats[5], stats[6], stats[7] = m, m * d, m * d * d, m * v
        stats[8], stats[9], stats[10], stats[11] = pk, pk * d, pk * d * d, pk * v
        stats[12] = exp_entropy[i]
        stats[13] = 1.0 if share2[i] >= threshold else 0.0
        if point:
            for j in range(N_STATS):
                sums[f, j] += stats[j]
        r = pending_row[c]
        if r >= 0:
            for j in range(N_STATS):
                pending[r, f, j] += stats[j]


@numba.njit(cache=True, nogil=True)
def count_documents(unit, latent, counts, last, point, boot):
    """Documents each latent is active in, from spill entries sorted by unit (a (unit, latent) pair
    may repeat: a unit split across two buffer flushes): ``point[f]`` += 1 and ``boot[f, r]`` +=
    ``counts[unit, r] > 0`` the first time ``f`` is met in a unit. ``last`` (F,) must hold -1."""
    for i in range(unit.size):
        f, u = latent[i], unit[i]
        if last[f] == u:
            continue
        last[f] = u
        point[f] += 1
        for r in range(counts.shape[1]):
            if counts[u, r] > 0:
                boot[f, r] += 1


@numba.njit(cache=True, nogil=True)
def scatter_stats(unit, latent, stats, columns, out):
    """``out[unit[i], j, latent[i]] += stats[i, columns[j]]`` for every entry ``i`` and ``j``."""
    for i in range(unit.size):
        u, f = unit[i], latent[i]
        for j in range(columns.size):
            out[u, j, f] += stats[i, columns[j]]


@numba.njit(cache=True, nogil=True)
def update_top(latent, token, peak_value, peak_layer, top_value, top_token, top_layer, top_len):
    """Merge pairs, given in token order, into each latent's running list of top tokens.

    ``top_value``, ``top_token``, ``top_layer`` are ``(F, n)``; the first ``top_len[f]`` entries of
    row ``f`` are latent ``f``'s list, by activation descending, then token ascending. A pair
    enters when the list is not full or its peak beats the last entry strictly; it goes after
    every entry of equal or larger activation (those are earlier tokens), so the lists do not
    depend on how the tokens were chunked.
    """
    n = top_value.shape[1]
    for i in range(latent.size):
        f, a = latent[i], peak_value[i]
        length = top_len[f]
        if length == n and not a > top_value[f, n - 1]:
            continue
        j = min(length, n - 1)  # a full list drops its last entry
        while j > 0 and top_value[f, j - 1] < a:
            top_value[f, j] = top_value[f, j - 1]
            top_token[f, j] = top_token[f, j - 1]
            top_layer[f, j] = top_layer[f, j - 1]
            j -= 1
        top_value[f, j] = a
        top_token[f, j] = token[i]
        top_layer[f, j] = peak_layer[i]
        top_len[f] = min(length + 1, n)
