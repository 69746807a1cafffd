"""The downstream cost of a layer's reconstruction: next-token CE and KL with one block spliced.

For every SAE layer (block ℓ) and every variant, the residual after block ℓ is replaced and the
model runs on from there (mlsae.models.splice):

* ``recon``: the SAE's reconstruction: lens, standardise, TopK encode, decode, de-standardise,
  inverse lens, so the splice is in the model's own basis;
* ``zero``: zeros (for scale; in a bias-free model such as Llama a zero residual stays zero, so
  the output is uniform and this is ln V − CE at every layer: it says nothing about the layer);
* ``mean``: the mean residual of block ℓ over the eval split's analysed tokens (mean ablation:
  the information-free baseline that keeps the residual on the data's scale).

Positions. The replacement applies at the analysed positions only: tokens that are not special
and, with ``data.skip_first``, not position 0 of a context (an attention sink with outlier norms
that the SAE never saw); other positions keep their clean residual. A position t counts in the
loss when t and t+1 are in the same context, neither token is special, and t is analysed.

Per eval context c the stage keeps sufficient statistics: ``ce_clean[c]`` and ``count[c]``
(summed clean CE and loss positions), ``ce[v, c, ℓ]`` (summed CE) and ``kl[v, c, ℓ]`` (summed
KL(clean ‖ spliced)). Then, with every sum over the evaluated contexts,

    ce_clean        = Σ_c ce_clean[c] / Σ_c count[c]
    delta_ce_ℓ      = Σ_c ce[recon, c, ℓ] / Σ_c count[c] − ce_clean   (zero, mean: likewise)
    kl_ℓ            = Σ_c kl[recon, c, ℓ] / Σ_c count[c]
    delta_ce, kl    = means over the SAE's layers

and each headline figure gets a 95 % bootstrap interval by resampling contexts (mlsae.stats.bootstrap).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mlsae.core.errors import MlsaeError
from mlsae.lens.tuned import Lens
from mlsae.models.registry import LoadedModel
from mlsae.models.splice import Splicer
from mlsae.sae.model import MLSAE
from mlsae.stats.bootstrap import interval_json, percentile_interval

VARIANTS = ("recon", "zero", "mean")
"""Splice variants, in the order of the first axis of :class:`SpliceSums` arrays."""


@dataclass
class SpliceSums:
    """Per-context sums of the downstream metrics (see the module docstring)."""

    ce_clean: np.ndarray  # (C,) float64
    count: np.ndarray  # (C,) int64
    ce: np.ndarray  # (V, C, L) float64
    kl: np.ndarray  # (V, C, L) float64

    @property
    def spliced_token_layers(self) -> int:
        """(token, layer, variant) splices evaluated: tokens of every evaluated context."""
        return int(self.n_tokens) * self.ce.shape[0] * self.ce.shape[2]

    n_tokens: int = 0


def positions(special: np.ndarray, skip_first: bool) -> tuple[np.ndarray, np.ndarray]:
    """(analysed (C, T), loss (C, T−1)) masks for contexts of tokens with `special` flags."""
    analysed = ~special.astype(bool)
    if skip_first:
        analysed = analysed.copy()
        analysed[:, 0] = False
    loss = analysed[:, :-1] & ~special[:, 1:].astype(bool)
    return analysed, loss


def _reconstruct(sae: MLSAE, lens: Lens, resid: torch.Tensor, block: int) -> torch.Tensor:
    h = lens(resid.float().unsqueeze(-2), [block]).squeeze(-2)
    xn, mean, std = sae.normalise(h)
    values, indices = sae.encode(xn)
    recon = sae.denormalise(sae.decode(values, indices), mean, std)
    return lens.inverse(recon.unsqueeze(-2), [block]).squeeze(-2)


_ROWS = 16
"""Rows of the vocab-wide arrays that :func:`_ce_kl` takes at a time: their temporaries (a few MB)
stay in cache, where whole-batch temporaries (hundreds of MB each) are written to and read back
from memory several times per splice."""


def _ce_kl(
    logits: torch.Tensor, targets: torch.Tensor, clean_logp: torch.Tensor, clean_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row CE and KL(clean ‖ spliced) of float32 `logits` (N, V) with `targets` (N,), against
    the clean log-probabilities `clean_logp` (N, V) and their exponentials `clean_p`.

    The formulas are the plain ones, ``log q = z − logsumexp(z)``, ``ce = −log q[target]``,
    ``kl = Σ_v p_v (log p_v − log q_v)`` (the difference taken elementwise, so no large terms
    cancel), evaluated on blocks of :data:`_ROWS` rows into reused buffers."""
    n, vocab = logits.shape
    ce = torch.empty(n, device=logits.device)
    kl = torch.empty(n, device=logits.device)
    logq = torch.empty(min(n, _ROWS), vocab, device=logits.device)
    diff = torch.empty_like(logq)
    for r0 in range(0, n, _ROWS):
        r1 = min(n, r0 + _ROWS)
        z = logits[r0:r1]
        q = torch.sub(z, torch.logsumexp(z, -1, keepdim=True), out=logq[: r1 - r0])
        ce[r0:r1] = -q.gather(-1, targets[r0:r1, None]).squeeze(-1)
        d = torch.sub(clean_logp[r0:r1], q, out=diff[: r1 - r0])
        kl[r0:r1] = torch.linalg.vecdot(clean_p[r0:r1], d)
    return ce, kl


@torch.inference_mode()
def splice_sums(
    sae: MLSAE,
    lens: Lens,
    model: LoadedModel,
    tokens: np.ndarray,
    special: np.ndarray,
    layer_means: torch.Tensor,
    skip_first: bool,
    batch_size: int,
    progress: bool = True,
) -> SpliceSums:
    """Downstream sums for contexts `tokens` (C, T) int with `special` (C, T) bool flags.

    `layer_means` (L, d): the mean residual of each SAE layer (model space) for the mean variant.
    """
    n_ctx, n_pos = tokens.shape
    layers = sae.cfg.layers
    dev = model.device
    sae, lens = sae.to(dev), lens.to(dev)
    splicer = Splicer(model)
    analysed, loss = positions(special, skip_first)
    shape = (len(VARIANTS), n_ctx, len(layers))
    sums = SpliceSums(
        np.zeros(n_ctx), loss.sum(1).astype(np.int64), np.zeros(shape), np.zeros(shape), n_tokens=n_ctx * n_pos
    )
    bar = tqdm(total=n_ctx * len(layers), desc="evaluate: spliced forwards", unit="ctx·layer", disable=not progress)
    logits_buf: torch.Tensor | None = None
    for start in range(0, n_ctx, batch_size):
        rows = slice(start, min(n_ctx, start + batch_size))
        ids = torch.from_numpy(tokens[rows].astype(np.int64)).to(dev)
        keep = torch.from_numpy(analysed[rows]).to(dev)[..., None]
        mask = torch.from_numpy(loss[rows]).to(dev)
        targets = ids[:, 1:].reshape(-1)
        run = splicer.clean(ids)
        vocab = run.logits.shape[-1]
        clean_logp = F.log_softmax(run.logits[:, :-1], dim=-1).reshape(-1, vocab)
        clean_p = clean_logp.exp()
        ce_clean = -clean_logp.gather(-1, targets[:, None]).view(mask.shape)
        sums.ce_clean[rows] = (ce_clean * mask).sum(1).double().cpu().numpy()
        if logits_buf is None or logits_buf.shape[0] != clean_logp.shape[0]:
            logits_buf = torch.empty(clean_logp.shape, device=dev)
        for j, block in enumerate(layers):
            clean = run.resid[block]
            replacements = {
                "recon": _reconstruct(sae, lens, clean, block),
                "zero": torch.zeros_like(clean),
                "mean": layer_means[j].to(dev, clean.dtype).expand_as(clean),
            }
            for v, name in enumerate(VARIANTS):
                resid = torch.where(keep, replacements[name].to(clean.dtype), clean)
                h = splicer.hidden_from(run, block, resid)[:, :-1]
                logits = splicer.head(h, out=logits_buf.view(*h.shape[:-1], vocab)).reshape(-1, vocab)
                ce, kl = _ce_kl(logits, targets, clean_logp, clean_p)
                sums.ce[v, rows, j] = (ce.view(mask.shape) * mask).sum(1).double().cpu().numpy()
                sums.kl[v, rows, j] = (kl.view(mask.shape) * mask).sum(1).double().cpu().numpy()
            bar.update(rows.stop - rows.start)
    bar.close()
    if sums.count.sum() == 0:
        raise MlsaeError(
            "evaluate: no position has a next-token target (every position is special or skipped); "
            "raise data.context or evaluate.tokens"
        )
    return sums


def downstream_metrics(sums: SpliceSums, counts: np.ndarray | None = None) -> dict:
    """Point estimates (and, given a (C, B) context count matrix, 95 % bootstrap intervals)."""
    out = _estimates(
        sums.ce_clean.sum()[None], sums.count.sum()[None], sums.ce.sum(1)[..., None], sums.kl.sum(1)[..., None]
    )
    metrics: dict = {"ce_clean": float(out["ce_clean"][0])}
    for v, name in enumerate(VARIANTS):
        suffix = "" if name == "recon" else f"_{name}"
        d_ce = out["delta_ce"][v, :, 0]  # (L,)
        kl = out["kl"][v, :, 0]
        metrics[f"delta_ce{suffix}"] = float(d_ce.mean())
        metrics[f"delta_ce{suffix}_by_layer"] = d_ce.tolist()
        metrics[f"kl{suffix}"] = float(kl.mean())
        metrics[f"kl{suffix}_by_layer"] = kl.tolist()
    metrics["downstream_tokens"] = int(sums.count.sum())
    metrics["downstream_contexts"] = len(sums.count)
    metrics["spliced_token_layers"] = sums.spliced_token_layers
    if counts is not None:
        reps = _estimates(
            sums.ce_clean @ counts,
            sums.count @ counts,
            np.einsum("vcl,cb->vlb", sums.ce, counts),
            np.einsum("vcl,cb->vlb", sums.kl, counts),
        )
        for v, name in enumerate(VARIANTS):
            suffix = "" if name == "recon" else f"_{name}"
            metrics[f"delta_ce{suffix}_ci"] = interval_json(percentile_interval(reps["delta_ce"][v].mean(0)))
            metrics[f"kl{suffix}_ci"] = interval_json(percentile_interval(reps["kl"][v].mean(0)))
    return metrics


def _estimates(ce_clean: np.ndarray, count: np.ndarray, ce: np.ndarray, kl: np.ndarray) -> dict:
    """Ratios of sums over contexts: `ce_clean`, `count` (B,), `ce`, `kl` (V, L, B); the last axis
    indexes resamples (length 1 for the point estimate)."""
    n = np.where(count > 0, count, np.nan).astype(np.float64)
    base = ce_clean / n
    return {"ce_clean": base, "delta_ce": ce / n - base, "kl": kl / n}
