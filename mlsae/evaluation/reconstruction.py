"""The evaluate stage: the SAE's reconstruction quality per layer, and what splicing it costs.

Reconstruction metrics run over the whole eval split's kept tokens (not special; not position 0
when the store skips it), in the space the SAE works in (lens space, each vector standardised):

    fvu_ℓ = Σ_t ‖x_tℓ − x̃_tℓ‖² / Σ_t ‖x_tℓ − x̄_ℓ‖²      (x̄_ℓ the split's mean vector at layer ℓ)
    mse_ℓ = Σ_t ‖x_tℓ − x̃_tℓ‖² / (n·d)      l0_ℓ = mean active latents      fvu = mean_ℓ fvu_ℓ

plus ``dead_fraction`` (latents never active on the split). This is the training loss's FVU
(:func:`mlsae.sae.kernels.fvu_from_sums` for both) over the whole split instead of one batch.

Downstream, on the spliced sample (mlsae/evaluation/sample.py), only the reconstruction is spliced
(``recon``, mlsae/evaluation/downstream.py). The clean CE comes from the clean forward the splice
runs anyway (the baseline stage's, on the same sample, is the same number); the mean ablation's
ΔCE comes from the baseline stage's sums (mlsae/evaluation/baseline.py), paired by document:

    delta_ce_ℓ       = Σ ce[recon, ℓ] / Σ n − Σ ce_clean / Σ n       kl_ℓ = Σ kl[recon, ℓ] / Σ n
    loss_recovered_ℓ = 1 − delta_ce_ℓ / delta_ce_mean_ℓ    (the fraction of the mean-ablation loss recovered)
    delta_ce, kl, loss_recovered: means over the layers ℓ

Uncertainty. Every sum above is kept per eval document (at most ``MAX_UNITS`` units: beyond that,
groups of consecutive documents), so each figure's bias-corrected value, standard error and 95 %
interval over resampled documents (`evaluate.bootstrap` replicas and the delete-one jackknife,
seeded by `analysis.seed`; mlsae/stats/estimate.py) cost no second pass. In a replica the fvu
denominator is taken about the full split's mean x̄ (the replica's own mean differs from it by
O(1/n); this keeps the per-unit statistics scalars per layer).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mlsae.core.errors import MlsaeError
from mlsae.core.paths import DOCUMENT
from mlsae.evaluation.downstream import Replacement, SpliceSums, splice_sums
from mlsae.evaluation.sample import SplicedSample
from mlsae.lens.tuned import Lens
from mlsae.models.registry import LoadedModel
from mlsae.sae.kernels import fvu_from_sums
from mlsae.sae.model import MLSAE
from mlsae.stats.bootstrap import resample_counts, unit_index
from mlsae.stats.estimate import figures
from mlsae.stores.activations import ActivationStore

MAX_UNITS = 1024
"""Most resampling units for the reconstruction figures (bounds memory on large eval splits)."""


@torch.no_grad()
def reconstruction_metrics(
    sae: MLSAE,
    lens: Lens,
    reader: ActivationStore,
    chunk: int = 2048,
    progress: bool = True,
    n_resamples: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """fvu, mse, l0 per layer and dead_fraction over the eval split; with `n_resamples` > 0 also
    fvu's resampled figures (`fvu_plugin`, `fvu_se`, `fvu_ci`, ...)."""
    layers = sae.cfg.layers
    L, d = len(layers), sae.cfg.d_model
    n_total = reader.n_tokens("eval")
    keep = reader.keep("eval")
    if not keep.any():
        raise MlsaeError(
            f"{reader.path}: no eval token is kept (all special or skipped); nothing to evaluate (use longer documents)"
        )
    unit_of = np.zeros(n_total, dtype=np.int64)  # documents with a kept token are the units
    unit_of[keep], n_units = unit_index(reader.meta("eval", DOCUMENT)[keep], MAX_UNITS)
    s_x = torch.zeros(n_units, L, d, dtype=torch.float64)
    s_xx = torch.zeros(n_units, L, dtype=torch.float64)
    s_err = torch.zeros(n_units, L, dtype=torch.float64)
    s_n = torch.zeros(n_units, dtype=torch.float64)
    s_l0 = torch.zeros(L, dtype=torch.float64)
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    for lo in tqdm(range(0, n_total, chunk), desc="evaluate: reconstruction", disable=not progress):
        hi = min(n_total, lo + chunk)
        x = reader.resid_kept("eval", lo, hi, layers)
        if x.shape[0] == 0:
            continue
        unit = torch.from_numpy(unit_of[lo:hi][keep[lo:hi]])
        batch = sae(lens(x.to(sae.b_pre.device), layers))
        xn, xh = batch.xn.double().cpu(), batch.xn_hat.double().cpu()
        s_x.index_add_(0, unit, xn)
        s_xx.index_add_(0, unit, xn.pow(2).sum(2))
        s_err.index_add_(0, unit, (xn - xh).pow(2).sum(2))
        s_n.index_add_(0, unit, torch.ones(len(unit), dtype=torch.float64))
        active = (batch.values > 0).cpu()
        s_l0 += active.sum((0, 2)).double()
        fired[batch.indices.cpu()[active]] = True
    n = float(s_n.sum())
    mean = s_x.sum(0) / n  # (L, d)
    # Σ_t ‖x − x̄‖² per unit, about the full split's mean: xx − 2 x̄·Σx + n‖x̄‖²
    ss = (s_xx - 2 * (s_x * mean).sum(-1) + s_n[:, None] * mean.pow(2).sum(-1)).numpy()
    err = s_err.numpy()
    counts = resample_counts(n_units, n_resamples, seed) if n_resamples else None
    out: dict[str, Any] = figures(
        "fvu", {"err": err, "ss": ss}, lambda err, ss: fvu_from_sums(err, ss), counts, by_layer=True
    )
    fvu_by_layer = fvu_from_sums(err.sum(0), ss.sum(0))
    out["fvu_plugin_by_layer"] = fvu_by_layer.tolist()
    mse = err.sum(0) / (n * d)
    out.update(
        {
            "mse": float(mse.mean()),
            "mse_by_layer": mse.tolist(),
            "l0": float((s_l0 / n).mean()),
            "l0_by_layer": (s_l0 / n).tolist(),
            "dead_fraction": float(1 - fired.float().mean()),
            "eval_vectors": int(n) * L,
            "bootstrap_units": n_units,
        }
    )
    return out


def reconstruction(sae: MLSAE, lens: Lens) -> Replacement:
    """The ``recon`` variant: the SAE's reconstruction of the block's residual, in model space."""

    def replace(j: int, block: int, clean: torch.Tensor) -> torch.Tensor:
        return _reconstruct(sae, lens, clean, block)

    return replace


def _reconstruct(sae: MLSAE, lens: Lens, resid: torch.Tensor, block: int) -> torch.Tensor:
    h = lens(resid.float().unsqueeze(-2), [block]).squeeze(-2)
    xn, mean, std = sae.normalise(h, [sae.cfg.layers.index(block)])
    values, indices = sae.encode(xn)
    recon = sae.denormalise(sae.decode(values, indices), mean, std)
    return lens.inverse(recon.unsqueeze(-2), [block]).squeeze(-2)


def splice_figures(recon: SpliceSums, base: SpliceSums, n_resamples: int, seed: int) -> dict[str, Any]:
    """`delta_ce`, `kl` and (with a mean-ablation baseline) `loss_recovered`, by layer and their
    means over layers, from evaluate's `recon` sums and the baseline stage's `base` sums of the same
    sample (module docstring)."""
    if recon.sample != base.sample or not np.array_equal(recon.units, base.units):
        raise MlsaeError(
            "the baseline stage's sums are for another spliced sample (other eval split, "
            "evaluate.tokens or data.seed); rerun the baseline stage"
        )
    counts = resample_counts(len(recon.units), n_resamples, seed) if n_resamples else None
    ce, kl = recon.variant("recon")
    per_unit = {"ce_clean": recon.ce_clean, "n": recon.count, "ce": ce, "kl": kl}

    def delta_ce(ce_clean: np.ndarray, n: np.ndarray, ce: np.ndarray, **_: np.ndarray) -> np.ndarray:
        return ce / n[:, None] - (ce_clean / n)[:, None]

    out = figures("ce_clean", per_unit, lambda ce_clean, n, **_: ce_clean / n, counts)
    out.update(figures("delta_ce", per_unit, delta_ce, counts, by_layer=True))
    out.update(figures("kl", per_unit, lambda n, kl, **_: kl / n[:, None], counts, by_layer=True))
    if "mean" in base.variants:
        ce_mean, _ = base.variant("mean")
        paired = {**per_unit, "base_clean": base.ce_clean, "ce_mean": ce_mean}

        def recovered(
            ce_clean: np.ndarray, n: np.ndarray, ce: np.ndarray, base_clean: np.ndarray, ce_mean: np.ndarray, **_: Any
        ) -> np.ndarray:
            lost = ce_mean - base_clean[:, None]
            return 1 - (ce - ce_clean[:, None]) / np.where(lost != 0, lost, np.nan)

        out.update(figures("loss_recovered", paired, recovered, counts, by_layer=True))
    return out


def evaluate(
    sae: MLSAE,
    lens: Lens,
    model: LoadedModel,
    reader: ActivationStore,
    sample: SplicedSample,
    base: SpliceSums,
    batch_size: int,
    n_resamples: int,
    seed: int,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """All eval metrics and the plot CSV's rows: `sample` is the spliced sample the baseline
    stage's sums `base` were made on; `n_resamples` is `evaluate.bootstrap`, `seed` `analysis.seed`."""
    t0 = time.perf_counter()
    sae.eval()
    metrics = reconstruction_metrics(sae, lens, reader, progress=progress, n_resamples=n_resamples, seed=seed)
    missing = sorted(set(sae.cfg.layers) - set(base.layers))
    if missing:
        raise MlsaeError(
            f"the baseline stage has no sums for blocks {missing} of the SAE; set sae.layers to cover "
            "them and rerun the baseline stage"
        )
    base = _select_layers(base, sae.cfg.layers)
    recon = splice_sums(
        model,
        sample,
        sae.cfg.layers,
        {"recon": reconstruction(sae.to(model.device), lens.to(model.device))},
        batch_size,
        progress,
    )
    metrics.update(splice_figures(recon, base, n_resamples, seed))
    metrics.update(
        {
            "downstream_tokens": int(recon.count.sum()),
            "downstream_documents": len(recon.units),
            "downstream_contexts": len(sample.contexts),
            "spliced_token_layers": recon.spliced_token_layers,
            "layers": sae.cfg.layers,
            "wall_s": time.perf_counter() - t0,
        }
    )
    keys = ("fvu", "mse", "l0", "delta_ce", "kl", "loss_recovered")
    rows = [
        {"layer": block, **{key: metrics[f"{key}_by_layer"][j] for key in keys if f"{key}_by_layer" in metrics}}
        for j, block in enumerate(sae.cfg.layers)
    ]
    return metrics, rows


def _select_layers(sums: SpliceSums, layers: list[int]) -> SpliceSums:
    """`sums` restricted to `layers` (the baseline may cover more blocks than the SAE uses)."""
    pick = [sums.layers.index(b) for b in layers]
    return SpliceSums(
        units=sums.units,
        variants=sums.variants,
        layers=list(layers),
        ce_clean=sums.ce_clean,
        count=sums.count,
        ce=sums.ce[:, :, pick],
        kl=sums.kl[:, :, pick],
        n_tokens=sums.n_tokens,
        sample=sums.sample,
    )
