"""The evaluate stage: reconstruction quality per layer, and what splicing costs downstream.

Reconstruction metrics run over the whole eval split's kept tokens (not special; not position 0
when the store skips it), in the space the SAE works in (lens space, each vector standardised):

    fvu_ℓ = Σ_t ‖x_tℓ − x̃_tℓ‖² / Σ_t ‖x_tℓ − x̄_ℓ‖²      (x̄_ℓ the split's mean vector at layer ℓ)
    mse_ℓ = Σ_t ‖x_tℓ − x̃_tℓ‖² / (n·d)      l0_ℓ = mean active latents      fvu = mean_ℓ fvu_ℓ

plus ``dead_fraction`` (latents never active on the split). Downstream metrics (ΔCE and KL with
one block spliced: reconstruction, zero and mean ablation) are in mlsae/evaluation/downstream.py.

Uncertainty. Every sum above is kept per resampling unit — an eval context, or, when the split has
more than ``MAX_UNITS`` contexts, one of ``MAX_UNITS`` equal groups of consecutive contexts — so a
95 % bootstrap interval (``evaluate.bootstrap`` resamples of the units with replacement, seeded by
``seed``) costs no second pass: ``fvu_ci``, ``delta_ce_ci``, ``kl_ci`` and the ablations'. In a
resample the fvu denominator is taken about the full split's mean x̄ (the resample's own mean
differs from it by O(1/n); this keeps the per-unit statistics scalars per layer).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from mlsae.core.errors import MlsaeError
from mlsae.core.params import Params
from mlsae.core.paths import TOKENS
from mlsae.evaluation import downstream
from mlsae.lens.tuned import Lens
from mlsae.models.registry import LoadedModel
from mlsae.sae.model import MLSAE
from mlsae.stats.bootstrap import context_counts, interval_json, percentile_interval
from mlsae.stores.activations import ActivationStore

MAX_UNITS = 512
"""Most resampling units for the reconstruction intervals (bounds memory on large eval splits)."""


@torch.no_grad()
def reconstruction_metrics(
    sae: MLSAE,
    lens: Lens,
    reader: ActivationStore,
    chunk: int = 2048,
    progress: bool = True,
    n_resamples: int = 0,
    seed: int = 0,
) -> dict:
    """fvu, mse, l0 per layer, dead_fraction, the mean model-space residual of each SAE layer
    (``layer_means``, for mean ablation), and with `n_resamples` > 0 a bootstrap ``fvu_ci``."""
    layers = sae.cfg.layers
    L, d = len(layers), sae.cfg.d_model
    n_total = reader.n_tokens("eval")
    context = int(reader.attrs["context"])
    n_ctx = max(1, n_total // context)
    n_units = min(n_ctx, MAX_UNITS)
    keep = reader.keep("eval")
    unit_of = (np.arange(n_total) // context) * n_units // n_ctx  # consecutive contexts per unit
    s_x = torch.zeros(n_units, L, d, dtype=torch.float64)
    s_xx = torch.zeros(n_units, L, dtype=torch.float64)
    s_err = torch.zeros(n_units, L, dtype=torch.float64)
    s_n = torch.zeros(n_units, dtype=torch.float64)
    s_l0 = torch.zeros(L, dtype=torch.float64)
    s_raw = torch.zeros(L, d, dtype=torch.float64)
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    starts = range(0, n_total, chunk)
    for lo in tqdm(starts, desc="evaluate: reconstruction", disable=not progress):
        hi = min(n_total, lo + chunk)
        x = reader.resid_kept("eval", lo, hi, layers)
        if x.shape[0] == 0:
            continue
        unit = torch.from_numpy(unit_of[lo:hi][keep[lo:hi]])
        s_raw += x.double().sum(0)
        out = sae(lens(x.to(sae.b_pre.device), layers))
        xn, xh = out.xn.double().cpu(), out.xn_hat.double().cpu()
        s_x.index_add_(0, unit, xn)
        s_xx.index_add_(0, unit, xn.pow(2).sum(2))
        s_err.index_add_(0, unit, (xn - xh).pow(2).sum(2))
        s_n.index_add_(0, unit, torch.ones(len(unit), dtype=torch.float64))
        active = (out.values > 0).cpu()
        s_l0 += active.sum((0, 2)).double()
        fired[out.indices.cpu()[active]] = True
    n = float(s_n.sum())
    if n == 0:
        raise MlsaeError(
            f"{reader.path}: no eval token is kept (all special or skipped); nothing to evaluate (use longer documents)"
        )
    mean = s_x.sum(0) / n  # (L, d)
    # Σ_t ‖x − x̄‖² per unit, about the full split's mean: xx − 2 x̄·Σx + n‖x̄‖²
    ss = s_xx - 2 * (s_x * mean).sum(-1) + s_n[:, None] * mean.pow(2).sum(-1)
    fvu_by_layer = (s_err.sum(0) / ss.sum(0)).numpy()
    out = {
        "fvu": float(fvu_by_layer.mean()),
        "fvu_by_layer": fvu_by_layer.tolist(),
        "mse": float((s_err.sum(0) / (n * d)).mean()),
        "mse_by_layer": (s_err.sum(0) / (n * d)).tolist(),
        "l0": float((s_l0 / n).mean()),
        "l0_by_layer": (s_l0 / n).tolist(),
        "dead_fraction": float(1 - fired.float().mean()),
        "eval_vectors": int(n) * L,
        "layer_means": (s_raw / n).float(),
    }
    if n_resamples > 0:
        counts = torch.from_numpy(context_counts(n_units, n_resamples, seed)).double()  # (U, B)
        err_b = torch.einsum("ul,ub->bl", s_err, counts)
        ss_b = torch.einsum("ul,ub->bl", ss, counts)
        fvu_b = (err_b / ss_b).mean(1).numpy()
        out["fvu_ci"] = interval_json(percentile_interval(fvu_b))
        out["bootstrap_units"] = n_units
    return out


def downstream_contexts(reader: ActivationStore, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, excluded) (C, T) of the first whole eval contexts holding `n_tokens` tokens; more
    than the split holds is an error naming both numbers (the check stage refuses it up front)."""
    context = int(reader.attrs["context"])
    available = reader.n_tokens("eval") // context
    n_ctx = -(-n_tokens // context)
    if n_ctx > available:
        raise MlsaeError(
            f"evaluate.tokens: {n_tokens} is more than the eval split's {available * context} tokens "
            f"({available} contexts of {context}); lower it or raise data.eval_tokens"
        )
    tokens = reader.split("eval")[TOKENS][: n_ctx * context].reshape(n_ctx, context)
    excluded = ~reader.keep("eval")[: n_ctx * context].reshape(n_ctx, context)
    return tokens, excluded


def evaluate(
    p: Params, sae: MLSAE, lens: Lens, model: LoadedModel, reader: ActivationStore, progress: bool = True
) -> tuple[dict, list[dict]]:
    """All eval metrics (scalars, *_by_layer lists, *_ci intervals) and the plot CSV's rows."""
    t0 = time.perf_counter()
    sae.eval()
    metrics = reconstruction_metrics(
        sae, lens, reader, progress=progress, n_resamples=p.evaluate.bootstrap, seed=p.seed
    )
    means = metrics.pop("layer_means")
    tokens, excluded = downstream_contexts(reader, p.evaluate.tokens)
    # `excluded` already holds position 0 when the store skips it: pass skip_first=False
    sums = downstream.splice_sums(sae, lens, model, tokens, excluded, means, False, p.evaluate.batch_size, progress)
    counts = context_counts(len(sums.count), p.evaluate.bootstrap, p.seed) if p.evaluate.bootstrap else None
    metrics.update(downstream.downstream_metrics(sums, counts))
    metrics["layers"] = sae.cfg.layers
    metrics["wall_s"] = time.perf_counter() - t0
    keys = ("fvu", "mse", "l0", "delta_ce", "delta_ce_zero", "delta_ce_mean", "kl", "kl_zero", "kl_mean")
    rows = [
        {"layer": block, **{key: metrics[f"{key}_by_layer"][j] for key in keys}}
        for j, block in enumerate(sae.cfg.layers)
    ]
    return metrics, rows
