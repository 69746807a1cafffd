"""The baseline stage: what the model loses when a layer's information is removed, without any SAE.

On the spliced sample (mlsae/evaluation/sample.py) it runs the clean forward and the ablation
splices that `evaluate.baselines` asks for (``mean``, the default; ``zero``), at every SAE layer
(`sae.layers`), and keeps per-document sums (mlsae/evaluation/downstream.py) in
``data/baseline/sums.npz``. Nothing here depends on the SAE, so an SAE experiment (`-S sae.k=64`)
never reruns it; the evaluate stage reads the sums and pairs them with its reconstruction splices
(the fraction of the mean-ablation loss recovered).

With ``n`` the loss positions and sums over the sample's documents:

    ce_clean           = Σ ce_clean / Σ n
    delta_ce_mean_ℓ    = Σ ce[mean, ℓ] / Σ n − ce_clean        kl_mean_ℓ = Σ kl[mean, ℓ] / Σ n
    delta_ce_mean, kl_mean: means over the layers ℓ                (zero: likewise)

each with its bias-corrected value, standard error and interval over resampled documents
(mlsae/stats/estimate.py). The mean ablation replaces block ℓ's residual at the analysed
positions by its mean over the eval split's analysed tokens (model space).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from mlsae.evaluation.downstream import Replacement, SpliceSums, mean_ablation, splice_sums, zero_ablation
from mlsae.evaluation.sample import SplicedSample
from mlsae.models.registry import LoadedModel
from mlsae.stats.bootstrap import resample_counts
from mlsae.stats.estimate import figures
from mlsae.stores.activations import ActivationStore


@torch.no_grad()
def layer_means(reader: ActivationStore, layers: list[int], chunk: int = 4096) -> torch.Tensor:
    """(L, d) float32: each block's mean residual over the eval split's analysed tokens."""
    total = torch.zeros(len(layers), reader.d_model, dtype=torch.float64)
    count = 0
    for x in reader.chunks("eval", chunk, layers):
        total += x.double().sum(0)
        count += x.shape[0]
    return (total / max(count, 1)).float()


def baseline(
    model: LoadedModel,
    reader: ActivationStore,
    layers: list[int],
    sample: SplicedSample,
    baselines: Sequence[str],
    batch_size: int,
    progress: bool = True,
) -> SpliceSums:
    """The clean forward and the `baselines` ablations (``mean``, ``zero``) of every block in
    `layers`, summed per document of `sample`."""
    replacements: dict[str, Replacement] = {}
    for name in baselines:
        replacements[name] = mean_ablation(layer_means(reader, layers)) if name == "mean" else zero_ablation
    return splice_sums(model, sample, layers, replacements, batch_size, progress)


def ablation_figures(sums: SpliceSums, n_resamples: int, seed: int) -> dict[str, Any]:
    """`ce_clean` and, per ablation ``v``, `delta_ce_{v}` and `kl_{v}` (by layer and their mean),
    with the resampled figures (module docstring)."""
    counts = resample_counts(len(sums.units), n_resamples, seed) if n_resamples else None
    clean = {"ce_clean": sums.ce_clean, "n": sums.count}
    out = figures("ce_clean", clean, lambda ce_clean, n: ce_clean / n, counts)
    for name in sums.variants:
        ce, kl = sums.variant(name)
        per_unit = {**clean, "ce": ce, "kl": kl}
        out.update(
            figures(
                f"delta_ce_{name}",
                per_unit,
                lambda ce_clean, n, ce, kl: ce / n[:, None] - (ce_clean / n)[:, None],
                counts,
                by_layer=True,
            )
        )
        out.update(figures(f"kl_{name}", per_unit, lambda ce_clean, n, ce, kl: kl / n[:, None], counts, by_layer=True))
    return out


def baseline_metrics(sums: SpliceSums, n_resamples: int, seed: int, wall_s: float) -> dict[str, Any]:
    """The baseline stage's metrics (`reports/metrics/baseline.json`)."""
    return {
        **ablation_figures(sums, n_resamples, seed),
        "baselines": list(sums.variants),
        "layers": sums.layers,
        "downstream_tokens": int(sums.count.sum()),
        "downstream_documents": len(sums.units),
        "spliced_token_layers": sums.spliced_token_layers,
        "sample": sums.sample,
        "wall_s": wall_s,
    }


def run_baseline(
    model: LoadedModel,
    reader: ActivationStore,
    layers: list[int],
    sample: SplicedSample,
    baselines: list[str],
    batch_size: int,
    n_resamples: int,
    seed: int,
    progress: bool = True,
) -> tuple[SpliceSums, dict[str, Any]]:
    """The baseline stage: (the sums evaluate reads, the metrics)."""
    t0 = time.perf_counter()
    sums = baseline(model, reader, layers, sample, baselines, batch_size, progress)
    return sums, baseline_metrics(sums, n_resamples, seed, time.perf_counter() - t0)
