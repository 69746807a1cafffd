"""Coverage of the 95 % intervals that mlsae prints, against a known truth.

Two parts. (1) The aggregate stage: synthetic latent stores, written in the real store format
(mlsae/stores/latents.py), are analysed by the real aggregate stage code
(:func:`mlsae.analysis.aggregate.aggregate`); every figure of analysis.json with resampled
figures (mlsae.analysis.decomposition.HEADLINE_KEYS and the seed paper's per-batch estimator) is
checked against the population value it estimates. (2) The evaluate and baseline stages: synthetic
per-document sums (:class:`mlsae.evaluation.downstream.SpliceSums`) and a synthetic eval split go
through the stages' own functions (:func:`mlsae.evaluation.reconstruction.reconstruction_metrics`,
:func:`~mlsae.evaluation.reconstruction.splice_figures`,
:func:`mlsae.evaluation.baseline.ablation_figures`); every figure they print with an interval
(``fvu``, ``ce_clean``, ``delta_ce``, ``kl``, ``loss_recovered``, ``delta_ce_mean``, ``kl_mean``,
``delta_ce_zero``, ``kl_zero`` and each one's per-layer intervals) is checked likewise. Run:

    .venv/bin/python benchmarks/coverage.py [--reps 500] [--documents 64 256] [--latents 1000]
        [--layers 30] [--eval-reps 1000] [--units 64 230 256] [--out benchmarks/results/coverage.json]

It runs on one core (this process is pinned to one CPU, niced by 10, with one thread per math
library) and writes the per-statistic results (coverage, mean interval width, bias in SE units,
...) per document count to the JSON file (the evaluate part under ``evaluate``) and markdown tables
to stdout. The results are in docs/statistics.md, section "Coverage of the intervals".

Generative model (ported from the coverage prototype that chose the scheme; every draw is
independent given the latent's parameters). The population ("the SAE") is F latents whose
parameters are fixed once (:func:`make_population`, seed `--population-seed`):

    pi_f     document presence, log-uniform on [0.002, 0.6]; the first 1 % of latents are dense
             (pi = 1, within-document rate rho_f ~ U(0.5, 0.95))
    rho_f    within-document rate, log-uniform on [0.02, 0.5]
    c_f      base depth, (L - 1) Beta(2, 1.6)
    sdoc_f   document depth-shift SD, U(0, 7) L/30
    stok_f   token depth SD, U(1, 7) L/30
    b_f      probability that a firing is broad, Beta(2, 3) scaled by 0.7 .. 1.3 from the densest
             to the rarest latent (rarer latents are broader, so which latents are counted matters)

A sample is D documents drawn i.i.d. (:func:`simulate`). Document d has T_d ~ U{20..100}
analysed tokens after one special (BOS) token. Per document and latent:

    present_df ~ Bernoulli(pi_f)
    rho_df     ~ Beta(3 rho_f, 3 (1 - rho_f))        bursty: the rate varies between documents
    n_df       ~ Binomial(T_d, rho_df)                 the latent fires on n_df distinct tokens
    delta_df   ~ N(0, sdoc_f^2)                        document-level depth shift

Per firing (token t, latent f): broad ~ Bernoulli(b_f); eps ~ N(0, (stok_f (0.7 if broad else
1.5))^2); centre = clip(c_f + delta_df + eps, 0, L - 1); width U(1, 4) L/30 and gain
LogNormal(0.7, 0.5) if broad, else width U(0.2, 0.4) and gain LogNormal(-0.5, 0.5);

    a[l] = gain exp(-(l - centre)^2 / (2 width^2)) Gamma(4, 1/4)      (for |l - centre| <= 4 width)

then a[l] = 0 where it is below 10 % of the firing's largest a[l] (a TopK-like cut), and every
a[l] is rounded to float16, the store's value type, so the store holds the model's activations
exactly. The special token carries large activations of a few latents, which the analysis must
leave out.

The store. Per (token, layer) the active latents sorted by activation, zero-padded to a fixed k
(`--k`, raised for a store whose busiest (token, layer) needs more, so nothing is cut); `document`
is each token's document id (increasing, not contiguous), every document is one context with the
BOS at position 0 (`special`); chunks, shards, codecs and the completion record (`seal`) as the
dump stage writes them.

A repetition r at D documents draws its sample with seed 1_000_003 D + r, writes the store to a
temporary directory, runs `aggregate` with `analysis.bootstrap` 200, `analysis.seed` r,
`analysis.min_count` 10 and `analysis.min_documents` 5 (the other `analysis` params at their
defaults), reads the figures from the returned metrics and K from latents.parquet, and deletes the
directory. The whole study is deterministic: a rerun gives the same figures.

Estimands (docs/statistics.md, "Coverage of the intervals"). For a latent f, with a random
*population* active pair of f (pairs weighted by their expected count; its document shift is
N(0, sdoc_f^2) independently of everything else, so :func:`population_truth` samples pairs
directly, by Monte Carlo): W_f = E[v], B_f = Var(mu), T_f = W_f + B_f, and the same moments
weighted by the pair's mass m (W^m_f, T^m_f) and by its peak activation (W^pk_f, T^pk_f);
lambda_f = E[T_d] pi_f rho_f is the expected active pairs per document. The shares over the
counted latents are conditional on the sample's counted set K (read from the run's
latents.parquet: count >= min_count and n_documents >= min_documents):

    within_share        = sum_K W_f / sum_K T_f           (likewise _mass, _peak)
    within_share_pooled = sum_K lambda_f W_f / sum_K lambda_f T_f
    var_within          = mean_K W_f   (var_between, var_total likewise; var_ratio = 1 / within_share)
    within_share_q25 / _median / _q75: the quantiles of W_f / T_f over K
    effective_layers    = sum_f lambda_f E[exp H]_f / sum_f lambda_f           (all latents)
    multi_layer_fraction = sum_f lambda_f P(s2 >= 0.1)_f / sum_f lambda_f

`_sparse` figures take the sample's dense latents (rate >= analysis.max_rate) out of those sets;
`_any_docs` figures use K_any = {count >= min_count}; `_k_resampled` figures have the truth of the
main figure (their replicas recompute K, the estimand is the same). Further:

    var_ratio_mass, var_ratio_peak, var_ratio_pooled = 1 / the matching within_share
    var_within_norm, var_total_norm = var_within, var_total / (L - 1)^2
    dense_mass_share_c  = sum_{r_f >= c} lambda_f M_f / sum_f lambda_f M_f   (c = 0.5, 0.9; all latents)
    dense_within_share  = sum_{K and dense} W_f / sum_K W_f

with r_f = pi_f rho_f the latent's expected rate (active pairs per analysed token) and M_f = E[m]
its mean pair mass: the dense set of dense_mass_share is the population's (the stage recomputes it
in every replica), that of dense_within_share and the `_sparse` figures the sample's (the stage
holds it fixed). The seed paper's estimator (mlsae.analysis.decomposition.paper_batches) is
estimated per batch of `analysis.paper_batch_tokens` (2048) tokens; its truth is the population's
value, a batch as large as the population (docs/statistics.md, "What the seed paper's estimator
measures"), over all F latents, with mu_f = E[mu] the mean depth of a population pair:

    var_token_paper = mean_f r_f W_f        var_aggregate_paper_spread = mean_f r_f T_f
    var_aggregate_paper_depth = mean_f r_f (1 - r_f) mu_f^2
    var_aggregate_paper = spread + depth    var_ratio_paper = var_aggregate_paper / var_token_paper

The report prints no interval for the figures in NO_INTERVAL: for them the coverage recorded is
that of ``value ± t·se``.

The evaluate side (:func:`eval_population`; every parameter a module constant or there). U
documents are drawn i.i.d. A document's length n (loss positions, or analysed tokens) is a
discretised log-normal (median 48, log-SD 0.8, 4 .. 400); h = n / 50; a_u, b_u, e_u are standard
normal document effects and LN(s z) = exp(s z - s^2 / 2) (mean 1). Per document:

    ce_clean sum       ~ Gamma(1.2 n, 3.0 LN(0.25 a) h^-0.1 / 1.2)
    sensitivity s_vl   = LN(sigma_v z_vl) h^gamma_v,  z_vl = 0.5 a + 0.5 b + sqrt(0.5) N(0, 1)
    ce[v, l] sum       = ce_clean + delta_vl s_vl X + omega_v sqrt(n) N(0, 1)
    kl[v, l] sum       = kappa_vl s_vl X'

for the variants v = recon (evaluate), mean, zero (the baseline stage) and layers l, with X, X'
independent sums over the document's tokens of a per-token factor of mean 1: 0.7 Gamma(0.6) + 0.3
spikes, a spike Bernoulli(0.02) times Pareto(2.5) (heavy-ish tails). The eval split for fvu: per
document a special token (never measured) and n tokens x_t = centre_l + c_ul + tau_u z_t at each
layer (d = 8), c_ul ~ N(0, (doc_effect_l LN(0.3 b))^2 I), tau_u = LN(0.25 a) h^-0.1, with
reconstruction error phi_u sigma_l eta_t, phi_u = LN(0.2 (0.6 a + 0.8 e)) h^0.1 (z, eta Student t
with 5 degrees of freedom per coordinate, unit variance). Every figure is a ratio of expected sums
(documents weighted by length, exactly, over the length distribution: :func:`eval_truth`):

    ce_clean = 3.0 E_n[h^-0.1]      delta_ce_vl = delta_vl E_n[h^gamma_v]     kl_vl likewise
    loss_recovered_l = 1 - delta_ce_recon,l / delta_ce_mean,l      fvu_l = its set value (sigma_l fits it)

and the headline figures are their means over layers. A repetition r at U documents draws its
sample with seed 2_000_003 U + r, which also seeds the stages' bootstrap (`evaluate.bootstrap`
200). A per-layer figure's coverage (``k_by_layer``) is that of all its per-layer intervals; each
layer's is recorded too.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # This file's folder leaves the import path: numba imports the `coverage` package, which would
    # otherwise be this script. And one thread per math library, set before numpy is imported.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
    os.environ.setdefault("POLARS_MAX_THREADS", "1")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")

import argparse
import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numba
import numpy as np
import polars as pl
import torch
import zarr
from zarr.codecs import ZstdCodec

from mlsae.analysis.aggregate import aggregate
from mlsae.analysis.decomposition import NO_INTERVAL
from mlsae.core.params import AnalysisParams
from mlsae.core.paths import CONTEXT, DOCUMENT, INDICES, LATENT_STATS, POSITION, SPECIAL, TOKENS, VALUES
from mlsae.evaluation.baseline import ablation_figures
from mlsae.evaluation.downstream import SpliceSums
from mlsae.evaluation.reconstruction import reconstruction_metrics, splice_figures
from mlsae.stats.estimate import bias_flag, t_quantile
from mlsae.stores.activations import CHECKSUM, META_CODECS, seal
from mlsae.stores.latents import CHUNK_TOKENS, SHARD_TOKENS

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.90
"""Coverage the issue asks of every interval the report prints."""
THETA = 0.1
"""`analysis.multi_layer_threshold` (its default): a pair is multi-layer when s2 >= THETA."""
REQUIRED = ("within_share", "within_share_mass", "effective_layers", "multi_layer_fraction")
"""The statistics the issue requires to reach TARGET."""
PAPER = (
    "var_token_paper",
    "var_aggregate_paper",
    "var_aggregate_paper_spread",
    "var_aggregate_paper_depth",
    "var_ratio_paper",
)
"""The seed paper's estimator, per batch of documents (mlsae.analysis.decomposition.paper_batches)."""
STATISTICS = (
    *REQUIRED,
    "within_share_peak",
    "within_share_pooled",
    "var_within",
    "var_between",
    "var_total",
    "var_ratio",
    "var_within_mass",
    "var_total_mass",
    "within_share_q25",
    "within_share_median",
    "within_share_q75",
    "within_share_sparse",
    "within_share_mass_sparse",
    "effective_layers_sparse",
    "multi_layer_fraction_sparse",
    "within_share_any_docs",
    "within_share_mass_any_docs",
    "within_share_peak_any_docs",
    "within_share_pooled_any_docs",
    "var_ratio_any_docs",
    # measured since the second study (every figure the stage prints with an interval)
    "var_between_mass",
    "var_ratio_mass",
    "var_within_peak",
    "var_between_peak",
    "var_total_peak",
    "var_ratio_peak",
    "var_within_norm",
    "var_total_norm",
    "var_ratio_pooled",
    "within_share_peak_sparse",
    "var_ratio_sparse",
    "within_share_pooled_sparse",
    "dense_mass_share_50",
    "dense_mass_share_90",
    "dense_within_share",
    "within_share_k_resampled",
    "within_share_mass_k_resampled",
    "within_share_peak_k_resampled",
    "var_ratio_k_resampled",
    "within_share_pooled_k_resampled",
    *PAPER,
)
"""Every figure whose coverage is measured: every key of mlsae.analysis.decomposition.HEADLINE_KEYS
and the seed paper's per-batch estimator (:data:`PAPER`)."""
SPECIAL_LATENTS = 4
"""Latents active (with large values) on each document's special token."""
jit = numba.njit(cache=False)
"""Compiled once per process, not cached on disk: the test imports this file under another module
name than a run does, and numba's cache would then look for the other module."""


# --------------------------------------------------------------------------------------------
# The population and the generator
# --------------------------------------------------------------------------------------------


def make_population(
    n_latents: int = 1000,
    n_layers: int = 30,
    seed: int = 1,
    dense_frac: float = 0.01,
    pi_lo: float = 0.002,
    pi_hi: float = 0.6,
    kappa: float = 3.0,
    tmin: int = 20,
    tmax: int = 100,
) -> dict[str, Any]:
    """The latents' fixed parameters (module docstring)."""
    rng = np.random.default_rng(seed)
    scale = n_layers / 30.0
    n_dense = max(1, round(dense_frac * n_latents))
    pi = np.exp(rng.uniform(np.log(pi_lo), np.log(pi_hi), n_latents))
    rho = np.exp(rng.uniform(np.log(0.02), np.log(0.5), n_latents))
    pi[:n_dense] = 1.0
    rho[:n_dense] = rng.uniform(0.5, 0.95, n_dense)
    rare = (np.log(pi_hi) - np.log(np.minimum(pi, pi_hi))) / (np.log(pi_hi) - np.log(pi_lo))  # 0 dense .. 1 rarest
    c = np.clip(rng.beta(2.0, 1.6, n_latents) * (n_layers - 1), 0, n_layers - 1)
    sdoc = rng.uniform(0.0, 7.0, n_latents) * scale
    stok = rng.uniform(1.0, 7.0, n_latents) * scale
    b = np.clip(rng.beta(2.0, 3.0, n_latents) * (0.7 + 0.6 * rare), 0.02, 0.98)
    return {
        "F": n_latents,
        "L": n_layers,
        "pi": pi,
        "rho": rho,
        "kappa": kappa,
        "c": c,
        "sdoc": sdoc,
        "stok": stok,
        "b": b,
        "tmin": tmin,
        "tmax": tmax,
        "seed": seed,
    }


@jit
def to_float16(x):
    """``x >= 0`` rounded to the nearest float16 (ties to even) and returned as float64: what
    ``np.float16(x)`` stores, for x below float16's maximum."""
    if x <= 0.0:
        return 0.0
    _, e = math.frexp(x)  # x = m 2^e, 0.5 <= m < 1
    ulp = math.ldexp(1.0, max(e - 11, -24))  # 10 fraction bits; subnormals below 2^-14
    return np.rint(x / ulp) * ulp


# Per-firing statistics, as the aggregate stage computes them from the store's entries
# (mlsae.analysis.kernels.group_pairs): mass, mean and second moment of the layer, its variance,
# entropy H (nats), second-largest share s2, peak activation, active layers.
_M, _MU, _SECOND, _VAR, _H, _S2, _PK, _NL = range(8)
N_FIRING = 8


@jit
def _fire(n_layers, centre, broad, scale, prof, out):
    """One firing's activations into ``prof`` (L,) and its statistics into ``out`` (N_FIRING,)."""
    if broad:
        w = np.random.uniform(1.0, 4.0) * scale
        g = math.exp(np.random.normal(0.7, 0.5))
    else:
        w = np.random.uniform(0.2, 0.4)
        g = math.exp(np.random.normal(-0.5, 0.5))
    amax = 0.0
    for layer in range(n_layers):
        z = (layer - centre) / w
        if abs(z) > 4.0:
            prof[layer] = 0.0
        else:
            prof[layer] = g * math.exp(-0.5 * z * z) * np.random.gamma(4.0, 0.25)
            amax = max(amax, prof[layer])
    m = s1 = s2 = alog = top1 = top2 = 0.0
    count = 0
    for layer in range(n_layers):
        a = prof[layer]
        a = to_float16(a) if a >= 0.1 * amax else 0.0
        prof[layer] = a
        if a == 0.0:
            continue
        count += 1
        m += a
        s1 += layer * a
        s2 += layer * layer * a
        alog += a * math.log(a)
        if a > top1:
            top2 = top1
            top1 = a
        elif a > top2:
            top2 = a
    mu = s1 / m
    second = s2 / m
    out[_M] = m
    out[_MU] = mu
    out[_SECOND] = second
    out[_PK] = top1
    out[_NL] = count
    if count == 1:
        out[_VAR] = 0.0
        out[_H] = 0.0
        out[_S2] = 0.0
    else:
        out[_VAR] = max(second - mu * mu, 0.0)
        out[_H] = max(math.log(m) - alog / m, 0.0)
        out[_S2] = top2 / m


@jit
def _document(seed, n_tokens, n_layers, pi, rho, kappa, c, sdoc, stok, b, cap):
    """One document of ``n_tokens`` analysed tokens (module docstring), drawn from numba's global
    generator seeded with ``seed``.

    Returns the per-(token, layer) active latents, sorted by activation (largest first), as
    ``idx``, ``val`` (n_tokens, L, cap) and their number ``cnt`` (n_tokens, L), and one record per
    firing: token, latent and its N_FIRING statistics. ``cnt`` is capped at ``cap``; the largest
    count it would have reached is returned last (so a caller can tell that cap was too small)."""
    np.random.seed(seed)
    n_latents = pi.size
    scale = n_layers / 30.0
    fires = np.zeros(n_latents, np.int64)
    shift = np.zeros(n_latents)
    for f in range(n_latents):  # per (document, latent): presence, rate, firings, depth shift
        if np.random.random() >= pi[f]:
            continue
        r = np.random.beta(kappa * rho[f], kappa * (1.0 - rho[f]))
        fires[f] = np.random.binomial(n_tokens, r)
        shift[f] = np.random.normal(0.0, 1.0) * sdoc[f]
    total = fires.sum()
    rec_token = np.empty(total, np.int64)
    rec_latent = np.empty(total, np.int64)
    rec = np.empty((total, N_FIRING))
    idx = np.zeros((n_tokens, n_layers, cap), np.int32)
    val = np.zeros((n_tokens, n_layers, cap), np.float32)
    cnt = np.zeros((n_tokens, n_layers), np.int64)
    perm = np.arange(n_tokens)
    prof = np.zeros(n_layers)
    most = 0
    i = 0
    for f in range(n_latents):
        n = fires[f]
        for j in range(n):  # n distinct tokens: a partial Fisher-Yates shuffle
            swap = j + np.random.randint(0, n_tokens - j)
            perm[j], perm[swap] = perm[swap], perm[j]
        for j in range(n):
            t = perm[j]
            broad = np.random.random() < b[f]
            eps = np.random.normal(0.0, 1.0) * stok[f] * (0.7 if broad else 1.5)
            centre = min(max(c[f] + shift[f] + eps, 0.0), n_layers - 1.0)
            _fire(n_layers, centre, broad, scale, prof, rec[i])
            rec_token[i] = t
            rec_latent[i] = f
            i += 1
            for layer in range(n_layers):
                a = prof[layer]
                if a == 0.0:
                    continue
                k = cnt[t, layer]
                most = max(most, k + 1)
                if k == cap:  # full: keep the largest cap (the caller redraws with a larger cap)
                    if val[t, layer, cap - 1] >= a:
                        continue
                    k = cap - 1
                else:
                    cnt[t, layer] = k + 1
                while k > 0 and val[t, layer, k - 1] < a:  # insertion, largest first
                    val[t, layer, k] = val[t, layer, k - 1]
                    idx[t, layer, k] = idx[t, layer, k - 1]
                    k -= 1
                val[t, layer, k] = a
                idx[t, layer, k] = f
    return idx, val, cnt, rec_token, rec_latent, rec, most


def simulate(pop: dict[str, Any], n_documents: int, seed: int, k: int) -> dict[str, Any]:
    """A sample of ``n_documents`` documents as the latent store's arrays.

    Returns a dict with ``indices``, ``values`` (tokens, L, k') float16, ``document``, ``special``,
    ``position``, ``context``, ``tokens`` (tokens,), ``k`` (k' = max(k, the most latents active at
    one (token, layer)): the store's fixed k) and the generator's own per-firing records
    ``firing_document`` (0 .. D-1), ``firing_token`` (row in the arrays), ``firing_latent`` and
    ``firing`` (n, N_FIRING), which the test compares the stage's plug-in values with."""
    n_latents, n_layers = pop["F"], pop["L"]
    rng = np.random.default_rng([seed, 1])  # document sizes, ids, token ids and the special tokens
    sizes = rng.integers(pop["tmin"], pop["tmax"] + 1, n_documents)
    seeds = np.random.SeedSequence([seed, 2]).generate_state(n_documents)  # one per document
    params = (pop["pi"], pop["rho"], pop["kappa"], pop["c"], pop["sdoc"], pop["stok"], pop["b"])
    docs = []
    for d in range(n_documents):
        cap = max(k, 64)
        while True:
            out = _document(int(seeds[d]), int(sizes[d]), n_layers, *params, cap)
            if out[-1] <= cap:  # else the same draw again with room for every entry
                break
            cap = int(out[-1])
        docs.append(out)
    width = max(k, max(int(o[-1]) for o in docs))
    rows = sizes + 1  # the special token, then the document's tokens
    n_rows = int(rows.sum())
    start = np.concatenate([[0], np.cumsum(rows)[:-1]])
    indices = np.zeros((n_rows, n_layers, width), np.int32)
    values = np.zeros((n_rows, n_layers, width), np.float16)
    for d, (idx, val, _cnt, *_rest) in enumerate(docs):
        w = min(width, idx.shape[2])
        indices[start[d] + 1 : start[d] + rows[d], :, :w] = idx[:, :, :w]
        values[start[d] + 1 : start[d] + rows[d], :, :w] = val[:, :, :w]
    n_bos = min(SPECIAL_LATENTS, n_latents, width)
    bos = np.argsort(rng.random((n_documents, n_latents)), axis=1)[:, :n_bos]  # distinct latents per token
    indices[start, :, : bos.shape[1]] = bos[:, None, :]
    values[start, :, : bos.shape[1]] = np.float16(50.0)  # a BOS-like token: large, never analysed
    ids = np.cumsum(rng.integers(1, 4, n_documents)) + 1000  # increasing corpus ids, not contiguous
    document = np.repeat(ids, rows).astype(np.int64)
    position = np.concatenate([np.arange(r) for r in rows]).astype(np.int16)
    special = position == 0
    return {
        "indices": indices,
        "values": values,
        "document": document,
        "special": special,
        "position": position,
        "context": np.repeat(np.arange(n_documents), rows).astype(np.int32),
        "tokens": rng.integers(0, 49152, n_rows).astype(np.int32),
        "k": width,
        "firing_document": np.concatenate([np.full(o[3].size, d) for d, o in enumerate(docs)]),
        "firing_token": np.concatenate([o[3] + start[d] + 1 for d, o in enumerate(docs)]),
        "firing_latent": np.concatenate([o[4] for o in docs]),
        "firing": np.concatenate([o[5] for o in docs]),
    }


def write_store(path: Path, sample: dict[str, Any], pop: dict[str, Any]) -> Path:
    """The sample as a complete latent store at ``path``: the dump stage's layout
    (mlsae/stores/latents.py: chunks of CHUNK_TOKENS tokens in shards of SHARD_TOKENS, zstd and a
    CRC32C checksum per chunk), attrs and completion record (:func:`mlsae.stores.activations.seal`)."""
    n_rows, n_layers, k = sample["indices"].shape
    root = zarr.open_group(str(path), mode="w")
    root.attrs.update(
        {
            "schema": 1,
            "layers": list(range(n_layers)),
            "n_latents": pop["F"],
            "k": k,
            "model": "synthetic (benchmarks/coverage.py)",
            "sae_hash": "synthetic",
            "lens": None,
            "source_revision": None,
            "n_tokens": n_rows,
            "source": {"generator": "benchmarks/coverage.py", "population_seed": pop["seed"]},
            "skip_first": False,
            "fingerprint": "synthetic",
            "done": 0,
            "complete": False,
        }
    )
    codecs = {"compressors": [ZstdCodec(), CHECKSUM], "fill_value": 0}
    shape, chunks, shards = (n_rows, n_layers, k), (CHUNK_TOKENS, n_layers, k), (SHARD_TOKENS, n_layers, k)
    arrays = {
        INDICES: root.create_array(INDICES, shape=shape, dtype=np.int32, chunks=chunks, shards=shards, **codecs),
        VALUES: root.create_array(VALUES, shape=shape, dtype=np.float16, chunks=chunks, shards=shards, **codecs),
    }
    for key in (TOKENS, CONTEXT, POSITION, SPECIAL, DOCUMENT):
        root.create_array(key, data=sample[key], chunks=(SHARD_TOKENS,), compressors=META_CODECS)
    for shard, lo in enumerate(range(0, n_rows, SHARD_TOKENS)):  # whole shards, as dump writes them
        hi = min(lo + SHARD_TOKENS, n_rows)
        arrays[INDICES][lo:hi] = sample["indices"][lo:hi]
        arrays[VALUES][lo:hi] = sample["values"][lo:hi]
        root.attrs["done"] = shard + 1
    seal(root, path, "dump")
    return path


# --------------------------------------------------------------------------------------------
# The population truth
# --------------------------------------------------------------------------------------------

# Per-latent population moments from _truth, by column.
_TRUTH_COLUMNS = (
    "within",
    "between",
    "within_mass",
    "between_mass",
    "within_peak",
    "between_peak",
    "eff",
    "eff_sq",
    "multi",
    "mass",
    "mean_d",
)


@jit
def _truth(seed, npairs, n_layers, c, sdoc, stok, b, out):
    """Per latent, moments of ``npairs[f]`` random population pairs (module docstring)."""
    np.random.seed(seed)
    n_latents = c.size
    scale = n_layers / 30.0
    prof = np.zeros(n_layers)
    rec = np.zeros(N_FIRING)
    s = np.zeros(15)
    for f in range(n_latents):
        s[:] = 0.0
        for _ in range(npairs[f]):
            delta = np.random.normal(0.0, 1.0) * sdoc[f]
            broad = np.random.random() < b[f]
            eps = np.random.normal(0.0, 1.0) * stok[f] * (0.7 if broad else 1.5)
            centre = min(max(c[f] + delta + eps, 0.0), n_layers - 1.0)
            _fire(n_layers, centre, broad, scale, prof, rec)
            d = rec[_MU] - c[f]
            v, m, pk, e = rec[_VAR], rec[_M], rec[_PK], math.exp(rec[_H])
            s[0] += d
            s[1] += d * d
            s[2] += v
            s[3] += m
            s[4] += m * d
            s[5] += m * d * d
            s[6] += m * v
            s[7] += pk
            s[8] += pk * d
            s[9] += pk * d * d
            s[10] += pk * v
            s[11] += e
            s[12] += e * e
            s[13] += 1.0 if rec[_S2] >= THETA else 0.0
        s /= npairs[f]
        out[f, 0] = s[2]
        out[f, 1] = s[1] - s[0] * s[0]
        out[f, 2] = s[6] / s[3]
        out[f, 3] = s[5] / s[3] - (s[4] / s[3]) ** 2
        out[f, 4] = s[10] / s[7]
        out[f, 5] = s[9] / s[7] - (s[8] / s[7]) ** 2
        out[f, 6] = s[11]
        out[f, 7] = s[12]
        out[f, 8] = s[13]
        out[f, 9] = s[3]
        out[f, 10] = s[0]


def population_truth(pop: dict[str, Any], npairs: int = 100_000, seed: int = 12345) -> dict[str, np.ndarray]:
    """Per-latent population values by Monte Carlo over random population pairs: ``npairs`` per
    latent, and up to 20 x as many for the latents with the most expected pairs per document
    ``lam_f = E[T_d] pi_f rho_f`` (they dominate the pooled figures). Also ``npairs`` (per
    latent), for the Monte-Carlo error of the pooled figures (:func:`pooled_truth`)."""
    lam = 0.5 * (pop["tmin"] + pop["tmax"]) * pop["pi"] * pop["rho"]
    per = np.maximum(npairs, np.rint(20 * npairs * lam / lam.max())).astype(np.int64)
    out = np.zeros((pop["F"], len(_TRUTH_COLUMNS)))
    _truth(seed, per, pop["L"], pop["c"], pop["sdoc"], pop["stok"], pop["b"], out)
    tr = {name: out[:, i] for i, name in enumerate(_TRUTH_COLUMNS)}
    for w in ("", "_mass", "_peak"):
        tr[f"total{w}"] = tr[f"within{w}"] + tr[f"between{w}"]
    tr["lam"] = lam
    tr["rate"] = pop["pi"] * pop["rho"]  # expected active pairs per analysed token
    tr["mean"] = pop["c"] + tr["mean_d"]  # E[mu_tf], the mean depth of a population pair
    tr["npairs"] = per
    return tr


def pooled_truth(tr: dict[str, np.ndarray], keep: np.ndarray | None = None) -> dict[str, float]:
    """``effective_layers`` and ``multi_layer_fraction`` over the latents in ``keep`` (all by
    default), with the Monte-Carlo SE of each (``<name>_mc_se``)."""
    keep = np.ones(tr["lam"].size, bool) if keep is None else keep
    lam, n = tr["lam"][keep], tr["npairs"][keep]
    out: dict[str, float] = {}
    for name, mean, var in (
        ("effective_layers", tr["eff"][keep], tr["eff_sq"][keep] - tr["eff"][keep] ** 2),
        ("multi_layer_fraction", tr["multi"][keep], tr["multi"][keep] * (1 - tr["multi"][keep])),
    ):
        out[name] = float((lam * mean).sum() / lam.sum())
        out[f"{name}_mc_se"] = float(np.sqrt((lam**2 * np.maximum(var, 0) / n).sum()) / lam.sum())
    return out


def truths(
    tr: dict[str, np.ndarray], counted: np.ndarray, any_docs: np.ndarray, dense: np.ndarray, n_layers: int
) -> dict[str, float]:
    """The truth of every figure of STATISTICS for one sample, given its counted set ``counted``
    (K), ``any_docs`` (K_any) and dense latents ``dense`` (rate >= max_rate in the sample), over
    ``n_layers`` layers (module docstring)."""
    out: dict[str, float] = {}
    sets = {"": counted, "_sparse": counted & ~dense, "_any_docs": any_docs}
    for name, member in sets.items():
        for w in ("", "_mass", "_peak"):
            out[f"within_share{w}{name}"] = tr[f"within{w}"][member].sum() / tr[f"total{w}"][member].sum()
        lam = tr["lam"][member]
        out[f"within_share_pooled{name}"] = (lam * tr["within"][member]).sum() / (lam * tr["total"][member]).sum()
        out[f"var_ratio{name}"] = 1.0 / out[f"within_share{name}"]
    for w in ("", "_mass", "_peak"):
        out[f"var_within{w}"] = tr[f"within{w}"][counted].mean()
        out[f"var_between{w}"] = tr[f"between{w}"][counted].mean()
        out[f"var_total{w}"] = tr[f"total{w}"][counted].mean()
        out[f"var_ratio{w}"] = 1.0 / out[f"within_share{w}"]
    out["var_ratio_pooled"] = 1.0 / out["within_share_pooled"]
    scale = float(max(n_layers - 1, 1) ** 2)
    out["var_within_norm"] = out["var_within"] / scale
    out["var_total_norm"] = out["var_total"] / scale
    for key in ("within_share", "within_share_mass", "within_share_peak", "var_ratio", "within_share_pooled"):
        out[f"{key}_k_resampled"] = out[key]  # the same estimand: the replicas recompute K, the truth does not
    q25, q50, q75 = np.percentile(tr["within"][counted] / tr["total"][counted], [25, 50, 75])
    out.update(within_share_q25=q25, within_share_median=q50, within_share_q75=q75)
    pooled, sparse = pooled_truth(tr), pooled_truth(tr, ~dense)
    for name in ("effective_layers", "multi_layer_fraction"):
        out[name] = pooled[name]
        out[f"{name}_sparse"] = sparse[name]
    mass = tr["lam"] * tr["mass"]  # expected activation mass per document
    for cut in (0.5, 0.9):  # the population's dense latents: the replicas recompute the set
        out[f"dense_mass_share_{round(100 * cut)}"] = mass[tr["rate"] >= cut].sum() / mass.sum()
    out["dense_within_share"] = tr["within"][counted & dense].sum() / tr["within"][counted].sum()
    out.update(paper_truth(tr))
    return {k: float(v) for k, v in out.items() if k in STATISTICS}


def paper_truth(tr: dict[str, np.ndarray]) -> dict[str, float]:
    """The seed paper's figures (:data:`PAPER`) of the population, over all F latents: a batch as
    large as the population, so ``r_f`` is the expected rate and ``Q_f`` the population mixture
    (docs/statistics.md, "What the seed paper's estimator measures"):
    ``var_token = mean_f r_f W_f``, ``spread = mean_f r_f T_f``, ``depth = mean_f r_f (1 - r_f)
    mu_f^2``, ``var_aggregate = spread + depth``, ``var_ratio_paper = var_aggregate / var_token``."""
    r, mean = tr["rate"], tr["mean"]
    token = float((r * tr["within"]).mean())
    spread = float((r * tr["total"]).mean())
    depth = float((r * (1 - r) * mean**2).mean())
    return {
        "var_token_paper": token,
        "var_aggregate_paper": spread + depth,
        "var_aggregate_paper_spread": spread,
        "var_aggregate_paper_depth": depth,
        "var_ratio_paper": (spread + depth) / token,
    }


# --------------------------------------------------------------------------------------------
# One repetition, and the summary
# --------------------------------------------------------------------------------------------


def analysis_params(bootstrap: int, seed: int, min_count: int, min_documents: int) -> AnalysisParams:
    return AnalysisParams(bootstrap=bootstrap, seed=seed, min_count=min_count, min_documents=min_documents)


def read_run(metrics: dict[str, Any], analysis_dir: Path, analysis: AnalysisParams) -> dict[str, Any]:
    """From one aggregate run: per statistic its reported value, interval (None for the figures
    the report prints without one), SE, plug-in and jackknife bias; the counted set K, K_any and
    the dense latents from latents.parquet (checked against the metrics' counts)."""
    latents = pl.read_parquet(analysis_dir / LATENT_STATS.name, columns=["latent", "count", "n_documents", "rate"])
    latents = latents.sort("latent")
    count = latents["count"].to_numpy()
    documents = latents["n_documents"].fill_null(0).to_numpy()
    rate = latents["rate"].fill_null(0.0).to_numpy()
    any_docs = count >= max(analysis.min_count, 1)
    counted = any_docs & (documents >= analysis.min_documents)
    if int(counted.sum()) != metrics["n_latents_counted"]:
        raise AssertionError(
            f"K from latents.parquet has {counted.sum()} latents, the metrics {metrics['n_latents_counted']}"
        )
    if int((any_docs & ~counted).sum()) != metrics["n_latents_few_documents"]:
        raise AssertionError("latents with few documents differ between latents.parquet and the metrics")
    figures = {}
    for key in STATISTICS:
        figures[key] = {
            "value": metrics[key],
            "ci": metrics.get(f"{key}_ci"),
            "se": metrics[f"{key}_se"],
            "plugin": metrics[f"{key}_plugin"],
            "bias_jack": metrics[f"{key}_bias_jack"],
            "bias_flag": bias_flag(metrics, key),
        }
        if (key in NO_INTERVAL) == (figures[key]["ci"] is not None):
            raise AssertionError(f"{key}: interval {figures[key]['ci']!r}, but NO_INTERVAL says {key in NO_INTERVAL}")
    return {
        "figures": figures,
        "counted": counted,
        "any_docs": any_docs,
        "dense": rate >= analysis.max_rate,
        "n_units": metrics["n_units"],
        "n_tokens": metrics["n_tokens"],
    }


def repetition(
    pop: dict[str, Any], tr: dict[str, np.ndarray], n_documents: int, rep: int, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """Draw one sample, write its store, run the aggregate stage on it, compare with the truth.
    The store and the stage's outputs are deleted afterwards."""
    seed = 1_000_003 * n_documents + rep
    sample = simulate(pop, n_documents, seed, args.k)
    where = Path(tempfile.mkdtemp(prefix=f"D{n_documents}-rep{rep}-", dir=work))
    try:
        store = write_store(where / "latents.zarr", sample, pop)
        analysis = analysis_params(args.bootstrap, rep, args.min_count, args.min_documents)
        metrics = aggregate(store, where / "analysis", where / "analysis.json", analysis)
        run = read_run(metrics, where / "analysis", analysis)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    if run["n_units"] != n_documents:
        raise AssertionError(f"the stage counted {run['n_units']} documents, the sample has {n_documents}")
    truth = truths(tr, run["counted"], run["any_docs"], run["dense"], pop["L"])
    t = t_quantile(run["n_units"])
    rows = {}
    for key, fig in run["figures"].items():
        value, se, ci = fig["value"], fig["se"], fig["ci"]
        lo, hi = ci if ci is not None else (value - t * se, value + t * se)
        rows[key] = {
            "truth": truth[key],
            "value": value,
            "plugin": fig["plugin"],
            "se": se,
            "bias_jack": fig["bias_jack"],
            "bias_flag": fig["bias_flag"],
            "lo": lo,
            "hi": hi,
            "covered": bool(lo <= truth[key] <= hi),
        }
    return {
        "figures": rows,
        "k": sample["k"],
        "n_tokens": run["n_tokens"],
        "n_counted": int(run["counted"].sum()),
        "n_any_docs": int(run["any_docs"].sum()),
    }


def summarise(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Per statistic over repetitions: coverage, mean interval width, mean bias of the reported
    value and of the plug-in in SE units, ... (:func:`figure_summary`)."""
    out: dict[str, Any] = {
        "reps": len(reps),
        "n_tokens_mean": float(np.mean([r["n_tokens"] for r in reps])),
        "n_latents_counted_mean": float(np.mean([r["n_counted"] for r in reps])),
        "n_latents_any_docs_mean": float(np.mean([r["n_any_docs"] for r in reps])),
        "k_max": int(max(r["k"] for r in reps)),
    }
    for key in STATISTICS:
        out[key] = figure_summary([r["figures"][key] for r in reps], key not in NO_INTERVAL)
    return out


def figure_summary(rows: list[dict[str, Any]], interval: bool) -> dict[str, Any]:
    """One figure over repetitions: whether the stage prints its interval, coverage (of ``value ±
    t·se`` where it prints none) and its Monte-Carlo SE, mean interval width, the reported value's
    and the plug-in's mean error in SE units, mean SE against the SD of the error, the rate of the
    bias flag. Repetitions where the figure is undefined or its SE is 0 are left out (``n``)."""
    ok = [x for x in rows if x["value"] is not None and x["se"] is not None and x["se"] > 0]
    if not ok:
        return {"interval": interval, "n": 0, "coverage": None, "reaches_target": False}
    truth = np.array([x["truth"] for x in ok])
    value = np.array([x["value"] for x in ok])
    se = np.array([x["se"] for x in ok])
    error = value - truth
    coverage = float(np.mean([x["covered"] for x in ok]))
    n = len(ok)
    plugin = [x["plugin"] for x in ok]
    return {
        "interval": interval,
        "n": n,
        "coverage": coverage,
        "coverage_mc_se": math.sqrt(coverage * (1 - coverage) / n),
        "reaches_target": coverage >= TARGET,
        "width": float(np.mean([x["hi"] - x["lo"] for x in ok])),
        "truth_mean": float(truth.mean()),
        "bias": float(error.mean()),
        "bias_se": float(np.mean(error / se)),
        "plugin_bias_se": float(np.mean((np.array(plugin) - truth) / se)) if None not in plugin else None,
        "se_mean": float(se.mean()),
        "error_sd": float(error.std(ddof=1)) if n > 1 else None,
        "se_over_error_sd": float(se.mean() / error.std(ddof=1)) if n > 1 else None,
        "bias_flag_rate": float(np.mean([x["bias_flag"] for x in ok])) if None not in plugin else None,
    }


# --------------------------------------------------------------------------------------------
# The evaluate and baseline stages: ratios of per-document sums
# --------------------------------------------------------------------------------------------

EVAL_BY_LAYER = ("fvu", "delta_ce", "kl", "loss_recovered", "delta_ce_mean", "kl_mean", "delta_ce_zero", "kl_zero")
"""The evaluate and baseline figures with one value per layer (``k_by_layer``, ``k_by_layer_ci``)
and their mean over layers (``k``, ``k_ci``)."""
EVAL_STATISTICS = ("ce_clean", *EVAL_BY_LAYER, *(f"{k}_by_layer" for k in EVAL_BY_LAYER))
"""Every evaluate and baseline figure whose coverage is measured: ``k_by_layer`` stands for the
per-layer intervals of ``k`` (its coverage is that of all of them, every layer's also recorded)."""
ABLATIONS = ("mean", "zero")
"""The baseline stage's ablations (`evaluate.baselines`; the default asks for ``mean`` only)."""
LENGTH_MEDIAN, LENGTH_SD, LENGTH_RANGE = 48.0, 0.8, (4, 400)
"""Document lengths (loss positions, or analysed tokens): a discretised log-normal."""
CE_CLEAN, CE_SHAPE, CE_DOC_SD, CE_LENGTH = 3.0, 1.2, 0.25, -0.1
"""Clean CE per token: Gamma(CE_SHAPE) with mean CE_CLEAN LN(CE_DOC_SD a_u) h_u^CE_LENGTH."""
TOKEN_SHAPE, SPIKE_P, SPIKE_ALPHA, SPIKE_SHARE = 0.6, 0.02, 2.5, 0.3
"""Per-token ΔCE and KL shape: (1 - SPIKE_SHARE) Gamma(TOKEN_SHAPE) + SPIKE_SHARE spikes
(Bernoulli(SPIKE_P) Pareto(SPIKE_ALPHA)), each part of mean 1."""
FVU_DOC_SD, FVU_TOKEN_SD, FVU_ERROR_SD, FVU_DF = 0.3, 0.25, 0.2, 5.0
"""The token vectors: document effect scale LN(FVU_DOC_SD b_u), token spread LN(FVU_TOKEN_SD a_u)
h^-0.1, error scale LN(FVU_ERROR_SD (0.6 a_u + 0.8 e_u)) h^0.1; Student t (FVU_DF) noise."""


def _ln(sd: float, z: np.ndarray) -> np.ndarray:
    """``exp(sd z - sd^2 / 2)``: log-normal of mean 1 for standard normal ``z``."""
    return np.exp(sd * z - sd * sd / 2)


def eval_population(n_layers: int = 4, dim: int = 8, seed: int = 2) -> dict[str, Any]:
    """The evaluate side's fixed parameters (module docstring): the length distribution, per layer
    the mean vector, the document-effect SD and the FVU, per variant and layer the mean ΔCE and KL
    per token, per variant the document-level SD of its sensitivity, the exponent of its length
    dependence and its symmetric per-token CE noise."""
    support = np.arange(LENGTH_RANGE[0], LENGTH_RANGE[1] + 1)
    log_density = -((np.log(support) - np.log(LENGTH_MEDIAN)) ** 2) / (2 * LENGTH_SD**2) - np.log(support)
    pmf = np.exp(log_density - log_density.max())
    frac = np.linspace(0.0, 1.0, n_layers)
    return {
        "L": n_layers,
        "dim": dim,
        "support": support,
        "pmf": pmf / pmf.sum(),
        "centre": np.random.default_rng(seed).normal(0.0, 2.0, (n_layers, dim)),
        "doc_effect": 0.6 - 0.2 * frac,
        "fvu": 0.15 + 0.2 * frac,
        "delta": {"recon": 0.2 + 0.2 * frac, "mean": 3.0 + 3.5 * frac, "zero": 10.0 + 2.0 * frac},
        "kl": {"recon": 0.3 + 0.3 * frac, "mean": 3.2 + 3.6 * frac, "zero": 10.5 + 2.0 * frac},
        "doc_sd": {"recon": 0.55, "mean": 0.2, "zero": 0.12},
        "length_exp": {"recon": 0.1, "mean": -0.05, "zero": 0.0},
        "noise": {"recon": 0.3, "mean": 0.5, "zero": 0.5},
        "seed": seed,
    }


def _token_mean(ev: dict[str, Any], power: float) -> float:
    """``E_n[h^power]``, documents weighted by their length n (a token's document), ``h = n / 50``."""
    n, p = ev["support"], ev["pmf"]
    return float((p * n * (n / 50.0) ** power).sum() / (p * n).sum())


def _error_sd(ev: dict[str, Any]) -> np.ndarray:
    """Per layer the SD of the error noise that makes the population FVU ``ev["fvu"]``."""
    spread = ev["doc_effect"] ** 2 * math.exp(FVU_DOC_SD**2) + math.exp(FVU_TOKEN_SD**2) * _token_mean(ev, -0.2)
    return np.sqrt(ev["fvu"] * spread / (math.exp(FVU_ERROR_SD**2) * _token_mean(ev, 0.2)))


def eval_truth(ev: dict[str, Any]) -> dict[str, Any]:
    """The population value of every figure of EVAL_STATISTICS (per token: a ratio of expected
    sums, ``E[sum_t x_t] / E[n]``); the ``_by_layer`` ones are lists."""
    out: dict[str, Any] = {"ce_clean": CE_CLEAN * _token_mean(ev, CE_LENGTH), "fvu_by_layer": ev["fvu"]}
    for v in ("recon", *ABLATIONS):
        scale = _token_mean(ev, ev["length_exp"][v])
        suffix = "" if v == "recon" else f"_{v}"
        out[f"delta_ce{suffix}_by_layer"] = ev["delta"][v] * scale
        out[f"kl{suffix}_by_layer"] = ev["kl"][v] * scale
    out["loss_recovered_by_layer"] = 1 - out["delta_ce_by_layer"] / out["delta_ce_mean_by_layer"]
    for key in EVAL_BY_LAYER:
        out[key] = float(np.mean(out[f"{key}_by_layer"]))
        out[f"{key}_by_layer"] = [float(x) for x in out[f"{key}_by_layer"]]
    return out


def _lengths(ev: dict[str, Any], n_units: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(ev["support"], n_units, p=ev["pmf"]).astype(np.float64)


def _token_sums(n: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Per (unit, ...) the sum over the unit's ``n`` tokens of a per-token factor of mean 1 (the
    TOKEN_SHAPE Gamma part and the SPIKE_ALPHA Pareto spikes, module docstring)."""
    n = np.broadcast_to(n.reshape(-1, *[1] * (len(shape) - 1)), shape)
    smooth = rng.gamma(TOKEN_SHAPE * n, 1.0 / TOKEN_SHAPE)
    spikes = rng.binomial(n.astype(np.int64), SPIKE_P)
    heights = rng.pareto(SPIKE_ALPHA, int(spikes.sum())) + 1.0  # Pareto, x_m = 1: mean alpha / (alpha - 1)
    where = np.repeat(np.arange(spikes.size), spikes.reshape(-1))
    spike_sum = np.bincount(where, heights, minlength=spikes.size).reshape(shape)
    mean_spike = SPIKE_P * SPIKE_ALPHA / (SPIKE_ALPHA - 1)
    return (1 - SPIKE_SHARE) * smooth + SPIKE_SHARE * spike_sum / mean_spike


def simulate_splice(ev: dict[str, Any], n_units: int, seed: int) -> tuple[SpliceSums, SpliceSums]:
    """The (evaluate's ``recon``, the baseline stage's ``mean`` and ``zero``) per-document sums of
    one sample of ``n_units`` documents (module docstring)."""
    rng = np.random.default_rng([seed, 3])
    n_layers = ev["L"]
    n = _lengths(ev, n_units, rng)
    h = n / 50.0
    a, b = rng.standard_normal(n_units), rng.standard_normal(n_units)
    ce_clean = rng.gamma(CE_SHAPE * n, CE_CLEAN * _ln(CE_DOC_SD, a) * h**CE_LENGTH / CE_SHAPE)
    ce, kl = {}, {}
    for v in ("recon", *ABLATIONS):
        z = 0.5 * a[:, None] + 0.5 * b[:, None] + math.sqrt(0.5) * rng.standard_normal((n_units, n_layers))
        sens = _ln(ev["doc_sd"][v], z) * h[:, None] ** ev["length_exp"][v]
        noise = ev["noise"][v] * np.sqrt(n)[:, None] * rng.standard_normal((n_units, n_layers))
        ce[v] = ce_clean[:, None] + ev["delta"][v] * sens * _token_sums(n, (n_units, n_layers), rng) + noise
        kl[v] = ev["kl"][v] * sens * _token_sums(n, (n_units, n_layers), rng)
    units = np.cumsum(rng.integers(1, 4, n_units)).astype(np.int64) + 1000
    layers = list(range(n_layers))

    def sums(variants: tuple[str, ...]) -> SpliceSums:
        return SpliceSums(
            units=units,
            variants=variants,
            layers=layers,
            ce_clean=ce_clean,
            count=n,
            ce=np.stack([ce[v] for v in variants]),
            kl=np.stack([kl[v] for v in variants]),
            n_tokens=int(n.sum()),
            sample="synthetic (benchmarks/coverage.py)",
        )

    return sums(("recon",)), sums(ABLATIONS)


class EvalSplit:
    """The eval split of an activation store as :func:`reconstruction_metrics` reads it (``n_tokens``,
    ``keep``, ``meta``, ``resid_kept``), holding the synthetic residuals ``x`` (tokens, L, d) and
    the errors ``err`` that :class:`EvalSAE` subtracts from the rows last read."""

    path = "synthetic eval split (benchmarks/coverage.py)"

    def __init__(self, x: np.ndarray, err: np.ndarray, document: np.ndarray, keep: np.ndarray):
        self.x, self.err, self.document, self._keep = x, err, document, keep
        self.last = np.zeros(0, np.int64)

    def n_tokens(self, split: str) -> int:
        return int(self.x.shape[0])

    def keep(self, split: str) -> np.ndarray:
        return self._keep

    def meta(self, split: str, key: str) -> np.ndarray:
        if key != DOCUMENT:
            raise KeyError(key)
        return self.document

    def resid_kept(self, split: str, start: int, stop: int, layers: list[int] | None = None) -> torch.Tensor:
        self.last = start + np.flatnonzero(self._keep[start:stop])
        return torch.from_numpy(self.x[self.last])


class EvalSAE:
    """An SAE for :func:`reconstruction_metrics`: its reconstruction of the rows the split returned
    last is ``x - err`` (its lens, :func:`identity_lens`, is the identity)."""

    def __init__(self, split: EvalSplit):
        n_layers, dim = split.x.shape[1:]
        self.split = split
        self.cfg = SimpleNamespace(layers=list(range(n_layers)), d_model=dim, n_latents=8)
        self.b_pre = torch.zeros(dim)

    def __call__(self, x: torch.Tensor) -> SimpleNamespace:
        err = torch.from_numpy(self.split.err[self.split.last])
        active = torch.ones(x.shape[0], x.shape[1], 1)
        return SimpleNamespace(xn=x, xn_hat=x - err, values=active, indices=torch.zeros(active.shape, dtype=torch.long))


def identity_lens(x: torch.Tensor, layers: list[int]) -> torch.Tensor:
    return x


def simulate_tokens(ev: dict[str, Any], n_units: int, seed: int) -> EvalSplit:
    """One eval split of ``n_units`` documents (module docstring): each a special token (not kept:
    large values the figures must ignore), then its tokens ``x = centre_l + c_ul + tau_u z_t`` with
    errors ``phi_u sigma_l eta_t`` (``z``, ``eta`` Student t per coordinate, unit variance)."""
    rng = np.random.default_rng([seed, 4])
    n_layers, dim = ev["L"], ev["dim"]
    n = _lengths(ev, n_units, rng).astype(np.int64)
    h = n / 50.0
    a, b, e = rng.standard_normal((3, n_units))
    tau = _ln(FVU_TOKEN_SD, a) * h**-0.1
    phi = _ln(FVU_ERROR_SD, 0.6 * a + 0.8 * e) * h**0.1
    effect = (
        ev["doc_effect"][None, :, None]
        * _ln(FVU_DOC_SD, b)[:, None, None]
        * rng.standard_normal((n_units, n_layers, dim))
    )
    rows = n + 1
    doc = np.repeat(np.arange(n_units), rows)
    keep = np.ones(doc.size, bool)
    keep[np.concatenate([[0], np.cumsum(rows)[:-1]])] = False
    t_sd = math.sqrt(FVU_DF / (FVU_DF - 2))
    shape = (doc.size, n_layers, dim)
    x = ev["centre"][None] + effect[doc] + tau[doc, None, None] * rng.standard_t(FVU_DF, shape) / t_sd
    err = _error_sd(ev)[None, :, None] * phi[doc, None, None] * rng.standard_t(FVU_DF, shape) / t_sd
    x[~keep], err[~keep] = 50.0, 30.0  # the special tokens: never measured
    ids = np.cumsum(rng.integers(1, 4, n_units)) + 1000
    return EvalSplit(x.astype(np.float32), err.astype(np.float32), ids[doc].astype(np.int64), keep)


def eval_metrics(ev: dict[str, Any], n_units: int, seed: int, n_resamples: int) -> dict[str, Any]:
    """One sample's evaluate and baseline metrics, by the stages' own functions:
    :func:`reconstruction_metrics` on a synthetic eval split, :func:`splice_figures` on the
    evaluate and baseline sums, :func:`ablation_figures` on the baseline sums; `seed` is both the
    sample's and the bootstrap's (`analysis.seed`)."""
    split = simulate_tokens(ev, n_units, seed)
    metrics = reconstruction_metrics(
        EvalSAE(split),
        identity_lens,
        split,
        progress=False,
        n_resamples=n_resamples,
        seed=seed,
    )
    recon, base = simulate_splice(ev, n_units, seed)
    metrics.update(splice_figures(recon, base, n_resamples, seed))
    metrics.update({k: v for k, v in ablation_figures(base, n_resamples, seed).items() if not k.startswith("ce_clean")})
    metrics.update(downstream_tokens=int(recon.count.sum()), downstream_documents=len(recon.units))
    return metrics


def eval_repetition(ev: dict[str, Any], truth: dict[str, Any], n_units: int, rep: int, n_resamples: int) -> dict:
    """One sample at ``n_units`` documents: every figure of EVAL_STATISTICS against its truth. A
    ``_by_layer`` figure has one row per layer, its SE read off its interval."""
    metrics = eval_metrics(ev, n_units, 2_000_003 * n_units + rep, n_resamples)
    if metrics["bootstrap_units"] != n_units or metrics["downstream_documents"] != n_units:
        raise AssertionError(f"evaluate counted {metrics['bootstrap_units']} documents, the sample has {n_units}")
    t = t_quantile(n_units)
    rows: dict[str, Any] = {}
    for key in EVAL_STATISTICS:
        if key.endswith("_by_layer"):
            rows[key] = []
            for j, (value, ci) in enumerate(zip(metrics[key], metrics[f"{key}_ci"], strict=True)):
                lo, hi = ci
                row = {"truth": truth[key][j], "value": value, "plugin": None, "bias_flag": None}
                rows[key].append({**row, "se": (hi - lo) / (2 * t), "lo": lo, "hi": hi})
                rows[key][-1]["covered"] = bool(lo <= truth[key][j] <= hi)
            continue
        value, se, ci = metrics[key], metrics[f"{key}_se"], metrics.get(f"{key}_ci")
        lo, hi = ci if ci is not None else (value - t * se, value + t * se)
        rows[key] = {
            "truth": truth[key],
            "value": value,
            "plugin": metrics[f"{key}_plugin"],
            "se": se,
            "bias_flag": bias_flag(metrics, key),
            "lo": lo,
            "hi": hi,
            "covered": bool(lo <= truth[key] <= hi),
            "interval": ci is not None,
        }
    return {"figures": rows, "n_tokens": int(metrics["downstream_tokens"])}


def _progress(label: str, reps: list[dict[str, Any]], total: int, times: int, keys: Sequence[str], t0: float) -> None:
    """Print the running coverage of `keys` about `times` times over `total` repetitions."""
    done = len(reps)
    if done % max(1, total // times) and done != total:
        return
    covered = {k: np.mean([r["figures"][k]["covered"] for r in reps]) for k in keys}
    print(
        f"{label} rep {done}/{total} {time.perf_counter() - t0:.0f} s "
        + " ".join(f"{k}={100 * v:.0f}%" for k, v in covered.items()),
        flush=True,
    )


def eval_summarise(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Per evaluate figure over repetitions (:func:`figure_summary`); a ``_by_layer`` figure's
    fields are per layer (``<field>_by_layer``), its ``coverage`` that of every layer's interval
    pooled, and ``coverage_min_layer`` the lowest layer's."""
    out: dict[str, Any] = {"reps": len(reps), "n_tokens_mean": float(np.mean([r["n_tokens"] for r in reps]))}
    for key in EVAL_STATISTICS:
        rows = [r["figures"][key] for r in reps]
        if not key.endswith("_by_layer"):
            out[key] = figure_summary(rows, bool(rows[0]["interval"]))
            continue
        layers = [figure_summary([r[j] for r in rows], True) for j in range(len(rows[0]))]
        pooled = figure_summary([x for r in rows for x in r], True)  # every layer's interval
        fields = ("coverage", "coverage_mc_se", "width", "truth_mean", "bias_se", "se_over_error_sd")
        out[key] = {
            "interval": True,
            "n": pooled["n"],
            "coverage": pooled["coverage"],
            "coverage_mc_se": pooled["coverage_mc_se"],
            "reaches_target": pooled["reaches_target"],
            "coverage_min_layer": min(s["coverage"] for s in layers),
            **{f"{f}_by_layer": [s[f] for s in layers] for f in fields},
        }
    return out


def eval_study(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluate side of the study: per document count `args.units`, `args.eval_reps` samples."""
    ev = eval_population(args.eval_layers, args.eval_dim)
    truth = eval_truth(ev)
    out: dict[str, Any] = {
        "settings": {
            "reps": args.eval_reps,
            "units": args.units,
            "layers": args.eval_layers,
            "dim": args.eval_dim,
            "bootstrap": args.eval_bootstrap,
            "ablations": list(ABLATIONS),
            "mean_length": float((ev["support"] * ev["pmf"]).sum()),
            "token_weighted_mean_length": float(
                (ev["support"] ** 2 * ev["pmf"]).sum() / (ev["support"] * ev["pmf"]).sum()
            ),
        },
        "truth": truth,
    }
    start, cpu = time.perf_counter(), time.process_time()
    for n_units in args.units:
        t0, c0 = time.perf_counter(), time.process_time()
        reps = []
        for rep in range(args.eval_reps):
            reps.append(eval_repetition(ev, truth, n_units, rep, args.eval_bootstrap))
            _progress(f"evaluate U={n_units}", reps, args.eval_reps, 5, EVAL_BY_LAYER[:4], t0)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        out[f"U{n_units}"] = {**eval_summarise(reps), "seconds": seconds, "cpu_seconds": cpu_seconds}
    out["seconds"], out["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
    return out


def _cell(x: float | None, spec: str) -> str:
    return "-" if x is None else f"{x:{spec}}"


def table(result: dict[str, Any]) -> str:
    """The markdown tables of coverage, width and bias per statistic and document count: the
    aggregate stage's, then the evaluate and baseline stages'."""
    lines = []
    for part, keys, prefix in (
        (result, STATISTICS, "D"),
        (result.get("evaluate", {}), EVAL_STATISTICS, "U"),
    ):
        ds = [k for k in part if k.startswith(prefix) and k[1:].isdigit()]
        if not ds:
            continue
        head = "| statistic | interval | " + " | ".join(
            f"{prefix} = {d[1:]}: coverage | width | bias / SE | SE / error SD" for d in ds
        )
        lines += ["", head + " |", "|---|---|" + "---:|---:|---:|---:|" * len(ds)]
        for key in keys:
            cells = [key, "yes" if part[ds[0]][key]["interval"] else "no"]
            for d in ds:
                s = part[d][key]
                formats = (("width", ".3g"), ("bias_se", "+.2f"), ("se_over_error_sd", ".2f"))
                if key.endswith("_by_layer"):
                    width, bias, ratio = (", ".join(_cell(x, f) for x in s[f"{name}_by_layer"]) for name, f in formats)
                else:
                    width, bias, ratio = (_cell(s.get(name), f) for name, f in formats)
                cells += [_cell(s["coverage"] and 100 * s["coverage"], ".1f") + " %", width, bias, ratio]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines[1:])


def run_study(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The whole study: the population, its truth, then per document count the repetitions."""
    start, cpu = time.perf_counter(), time.process_time()
    pop = make_population(args.latents, args.layers, seed=args.population_seed)
    tr = population_truth(pop, args.truth_pairs)
    truth_seconds = time.perf_counter() - start
    print(f"truth: {truth_seconds:.0f} s", flush=True)
    pooled = pooled_truth(tr)
    result: dict[str, Any] = {
        "command": command,
        "settings": {
            "reps": args.reps,
            "documents": args.documents,
            "latents": args.latents,
            "layers": args.layers,
            "k": args.k,
            "bootstrap": args.bootstrap,
            "min_count": args.min_count,
            "min_documents": args.min_documents,
            "population_seed": args.population_seed,
            "truth_pairs": args.truth_pairs,
            "target": TARGET,
            "required": list(REQUIRED),
            "max_rate": AnalysisParams().max_rate,
            "paper_batch_tokens": AnalysisParams().paper_batch_tokens,
        },
        "population": {
            **pooled,
            "within_share_all_latents": float(tr["within"].sum() / tr["total"].sum()),
            "within_share_mass_all_latents": float(tr["within_mass"].sum() / tr["total_mass"].sum()),
            **paper_truth(tr),
        },
        "truth_seconds": truth_seconds,
    }
    result["evaluate"] = eval_study(args) if args.eval_reps else {}
    work = Path(tempfile.mkdtemp(prefix="mlsae-coverage-"))
    try:
        for n_documents in args.documents if args.reps else []:
            t0, c0 = time.perf_counter(), time.process_time()
            reps = []
            for rep in range(args.reps):
                reps.append(repetition(pop, tr, n_documents, rep, args, work))
                _progress(f"D={n_documents}", reps, args.reps, 10, REQUIRED, t0)
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
            result[f"D{n_documents}"] = {**summarise(reps), "seconds": seconds, "cpu_seconds": cpu_seconds}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["wall_seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = time.process_time() - cpu  # of this process (its threads included)
    result["load_average"] = list(os.getloadavg())  # the machine's, over 1, 5, 15 min at the end
    return result


def one_core() -> None:
    """Run on one CPU, at a lower priority (the machine is shared)."""
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
    os.nice(10)
    zarr.config.set({"threading.max_workers": 1})
    torch.set_num_threads(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=500, help="repetitions per document count")
    ap.add_argument("--documents", type=int, nargs="+", default=[64, 256], help="eval documents per sample")
    ap.add_argument("--latents", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--k", type=int, default=16, help="entries per (token, layer) at least")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--min-count", type=int, default=10)
    ap.add_argument("--min-documents", type=int, default=5)
    ap.add_argument("--population-seed", type=int, default=1)
    ap.add_argument("--truth-pairs", type=int, default=100_000, help="Monte-Carlo pairs per latent for the truth")
    ap.add_argument("--eval-reps", type=int, default=1000, help="evaluate side: repetitions per document count")
    ap.add_argument("--units", type=int, nargs="+", default=[64, 230, 256], help="evaluate side: documents")
    ap.add_argument("--eval-layers", type=int, default=4)
    ap.add_argument("--eval-dim", type=int, default=8, help="evaluate side: residual dimension")
    ap.add_argument("--eval-bootstrap", type=int, default=200, help="evaluate.bootstrap")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "coverage.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    result = run_study(args, " ".join([".venv/bin/python benchmarks/coverage.py", *argv]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwall time {result['wall_seconds']:.0f} s; results in {args.out}\n")
    print(table(result))
    return result


if __name__ == "__main__":
    one_core()
    main()
