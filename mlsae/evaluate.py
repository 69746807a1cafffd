"""The evaluate stage: reconstruction quality per layer, and what splicing costs downstream.

Reconstruction metrics run over the whole eval split (special tokens masked) in the space the SAE
works in (lens space, each vector standardised): `fvu` = Σ‖x − x̃‖² / Σ‖x − mean(x)‖² per layer,
with the mean per dimension over the split; `mse` per dimension; `l0`; `dead_fraction`.
Downstream metrics splice block ℓ's residual on `evaluate.tokens` eval tokens: the SAE's
reconstruction (un-normalised, mapped back through the inverse lens: model space) or zeros, and
compare next-token CE and KL(clean ‖ spliced) with the clean forward, which is shared by all layers.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mlsae.constants import SPECIAL, TOKENS
from mlsae.errors import MlsaeError
from mlsae.lens import Lens
from mlsae.models import LoadedModel
from mlsae.params import Params
from mlsae.sae import MLSAE
from mlsae.store import ActivationStore


@torch.no_grad()
def reconstruction_metrics(sae: MLSAE, lens: Lens, reader: ActivationStore, chunk: int = 2048,
                           progress: bool = True) -> dict:
    """fvu, mse, l0 per layer and dead_fraction over the eval split (streaming, float64 sums)."""
    layers = sae.cfg.layers
    L, d = len(layers), sae.cfg.d_model
    s_x = torch.zeros(L, d, dtype=torch.float64)
    s_xx = torch.zeros(L, dtype=torch.float64)
    s_err = torch.zeros(L, dtype=torch.float64)
    s_l0 = torch.zeros(L, dtype=torch.float64)
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    n = 0
    n_chunks = -(-reader.n_tokens("eval") // chunk)
    for x in tqdm(reader.chunks("eval", chunk, layers), total=n_chunks, desc="evaluate: reconstruction",
                  disable=not progress):
        out = sae(lens(x.to(sae.b_pre.device), layers))
        xn, xh = out.xn.double().cpu(), out.xn_hat.double().cpu()
        s_x += xn.sum(0)
        s_xx += xn.pow(2).sum((0, 2))
        s_err += (xn - xh).pow(2).sum((0, 2))
        active = (out.values > 0).cpu()
        s_l0 += active.sum((0, 2)).double()
        fired[out.indices.cpu()[active]] = True
        n += x.shape[0]
    if n == 0:
        raise MlsaeError(f"{reader.path}: every eval token is special; nothing to evaluate (use longer documents)")
    total_var = s_xx - s_x.pow(2).sum(-1) / n
    fvu = (s_err / total_var).tolist()
    mse = (s_err / (n * d)).tolist()
    l0 = (s_l0 / n).tolist()
    return {
        "fvu": float(np.mean(fvu)), "fvu_by_layer": fvu,
        "mse": float(np.mean(mse)), "mse_by_layer": mse,
        "l0": float(np.mean(l0)), "l0_by_layer": l0,
        "dead_fraction": float(1 - fired.float().mean()),
        "eval_vectors": n * L,
    }


def _ce_and_kl(clean_logp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
               mask: torch.Tensor) -> tuple[float, float]:
    """Summed CE of `logits` on targets and summed KL(clean ‖ spliced) over masked positions."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    ce = -logp.gather(-1, targets[..., None]).squeeze(-1)
    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
    return float(ce[mask].sum()), float(kl[mask].sum())


@torch.no_grad()
def downstream_metrics(sae: MLSAE, lens: Lens, model: LoadedModel, reader: ActivationStore, n_tokens: int,
                       batch_size: int, progress: bool = True) -> dict:
    """delta_ce, delta_ce_zero, kl per layer on the first `n_tokens` eval tokens (whole contexts).

    Positions whose input or target token is special are masked out of CE and KL.
    """
    context = int(reader.attrs["context"])
    n_contexts = max(1, min(-(-n_tokens // context), reader.n_tokens("eval") // context))
    tokens = reader.split("eval")[TOKENS][: n_contexts * context].reshape(n_contexts, context)
    special = reader.meta("eval", SPECIAL)[: n_contexts * context].reshape(n_contexts, context)
    layers = sae.cfg.layers
    dev = model.device
    sae, lens = sae.to(dev), lens.to(dev)
    ce_clean = 0.0
    ce = {m: np.zeros(len(layers)) for m in ("recon", "zero")}
    kl = {m: np.zeros(len(layers)) for m in ("recon", "zero")}
    count = 0

    def reconstruct(j: int, block: int):
        def fn(resid: torch.Tensor) -> torch.Tensor:
            h = lens(resid.float().unsqueeze(-2), [block]).squeeze(-2)
            xn, mean, std = sae.normalise(h)
            values, indices = sae.encode(xn)
            recon = sae.denormalise(sae.decode(values, indices), mean, std)
            return lens.inverse(recon.unsqueeze(-2), [block]).squeeze(-2)

        return fn

    bar = tqdm(total=n_contexts * (1 + 2 * len(layers)), desc="evaluate: spliced forwards", unit="forward",
               disable=not progress)
    for start in range(0, n_contexts, batch_size):
        ids = torch.from_numpy(tokens[start : start + batch_size].astype(np.int64))
        sp = torch.from_numpy(special[start : start + batch_size])
        mask = (~sp[:, :-1] & ~sp[:, 1:]).to(dev)
        targets = ids[:, 1:].to(dev)
        clean = model.logits(ids)
        clean_logp = F.log_softmax(clean[:, :-1], dim=-1)
        ce_clean += float(-clean_logp.gather(-1, targets[..., None]).squeeze(-1)[mask].sum())
        count += int(mask.sum())
        bar.update(ids.shape[0])
        for j, block in enumerate(layers):
            for mode, fn in (("recon", reconstruct(j, block)), ("zero", torch.zeros_like)):
                c, k = _ce_and_kl(clean_logp, model.logits(ids, {block: fn}), targets, mask)
                ce[mode][j] += c
                kl[mode][j] += k
                bar.update(ids.shape[0])
        del clean, clean_logp
    bar.close()
    if count == 0:
        raise MlsaeError(
            f"evaluate.tokens: none of the {n_ctx * (context - 1)} next-token positions of the first {n_ctx} eval "
            "contexts has a non-special input and target (documents of one token?); use longer documents "
            "or raise evaluate.tokens"
        )
    base = ce_clean / count
    d_ce = (ce["recon"] / count - base).tolist()
    d_zero = (ce["zero"] / count - base).tolist()
    kl_r = (kl["recon"] / count).tolist()
    return {
        "ce_clean": base,
        "delta_ce": float(np.mean(d_ce)), "delta_ce_by_layer": d_ce,
        "delta_ce_zero": float(np.mean(d_zero)), "delta_ce_zero_by_layer": d_zero,
        "kl": float(np.mean(kl_r)), "kl_by_layer": kl_r,
        "kl_zero_by_layer": (kl["zero"] / count).tolist(),
        "downstream_tokens": count,
    }


def evaluate(p: Params, sae: MLSAE, lens: Lens, model: LoadedModel, reader: ActivationStore,
             progress: bool = True) -> tuple[dict, list[dict]]:
    """All eval metrics (scalars + *_by_layer lists) and the per-layer rows of the plot CSV."""
    t0 = time.perf_counter()
    sae.eval()
    metrics = reconstruction_metrics(sae, lens, reader, progress=progress)
    metrics.update(downstream_metrics(sae, lens, model, reader, p.evaluate.tokens, p.evaluate.batch_size, progress))
    metrics["layers"] = sae.cfg.layers
    metrics["wall_s"] = time.perf_counter() - t0
    rows = [
        {"layer": block, **{key: metrics[f"{key}_by_layer"][j] for key in
                            ("fvu", "mse", "l0", "delta_ce", "delta_ce_zero", "kl")}}
        for j, block in enumerate(sae.cfg.layers)
    ]
    return metrics, rows
