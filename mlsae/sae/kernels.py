"""The MLSAE's numerical kernels: TopK selection, the sparse TopK encoder, FVU, geometric median.

`sparse_encoder(device_type)` is an autograd Function whose forward is one dense matmul plus TopK
and whose backward touches only the k active (and AuxK) latents per vector; `sparse_outer` forms
the encoder's weight gradient as a sparse-dense product. The MLSAE (`mlsae/sae/model.py`) composes them;
they live apart so the model reads as the paper's equations.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def topk_select(z: Tensor, k: int, dead: Tensor | None, n_aux: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TopK + ReLU of the pre-activations z (N, n), and the top-``n_aux`` among the dead latents.

    The dense reference path's AuxK: the sparse path takes the dead latents' pre-activations alone
    (:func:`dead_topk`).
    """
    values, indices = z.topk(k, dim=-1, sorted=False)
    if dead is None or n_aux == 0:
        aux_values, aux_indices = z.new_zeros(z.shape[0], 0), indices.new_zeros(z.shape[0], 0)
    else:
        masked = z.masked_fill(~dead, -math.inf)
        aux_values, aux_indices = masked.topk(n_aux, dim=-1, sorted=False)
    return values.relu(), indices, aux_values.relu(), aux_indices


def dead_topk(xc: Tensor, w_enc: Tensor, dead: Tensor, n_aux: int) -> tuple[Tensor, Tensor]:
    """AuxK's top-``n_aux`` latents among the dead ones, ReLU'd: ``(values, indices)``, each (N, n_aux).

    Only the dead rows of the encoder enter the product (``xc @ W_enc[dead]ᵀ``, N x n_dead), so
    AuxK costs in proportion to the dead latents rather than a second pass over all of them; it
    selects what the top-``n_aux`` of the full pre-activations with the live latents masked out
    selects (:func:`topk_select`, the dense reference), up to the rounding of the two products."""
    dead_ids = dead.nonzero().squeeze(1)
    values, local = (xc @ w_enc[dead_ids].T).topk(n_aux, dim=-1, sorted=False)
    return values.relu(), dead_ids[local]


_SCRATCH: dict[tuple, Tensor] = {}


def _preactivations(xc: Tensor, w_enc: Tensor) -> tuple[Tensor, bool]:
    """``xc @ w_enc.T`` (N, n), and whether it lives in a reused scratch buffer.

    On CPU (outside autocast) the product is written into one buffer per (dtype, inference mode),
    grown as needed and never freed: a fresh array of this size (75 MB for 2,048 vectors × 9,216
    latents) is page-faulted in anew on every call, a cost of the order of the product's own. The caller must be done with the result before the next call. Elsewhere (CUDA's caching
    allocator has no such cost; autocast picks the product's dtype) it is a plain product.
    """
    if xc.device.type != "cpu" or torch.is_autocast_enabled("cpu") or xc.dtype != w_enc.dtype:
        return xc @ w_enc.T, False
    shape = (xc.shape[0], w_enc.shape[0])
    key = (xc.dtype, torch.is_inference_mode_enabled())
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < shape[0] * shape[1]:
        buf = _SCRATCH[key] = torch.empty(shape[0] * shape[1], dtype=xc.dtype)
    return torch.matmul(xc, w_enc.T, out=buf[: shape[0] * shape[1]].view(shape)), True


def sparse_outer(indices: Tensor, coef: Tensor, x: Tensor, n_rows: int) -> Tensor:
    """``out[r] = Σ_{(i, j): indices[i, j] = r} coef[i, j] · x[i]``, i.e. ``Gᵀ x`` for the sparse
    (N, n_rows) matrix G with ``G[i, indices[i, j]] = coef[i, j]``, never materialised densely.

    On CPU Gᵀ is built in CSR form (entries stably sorted by row, so the sums run in a fixed order):
    its product is twice as fast there as the COO one, which coalesces first. Repeated (i, r)
    entries add up in both forms.
    """
    n, k = indices.shape
    rows = torch.arange(n, device=indices.device).repeat_interleave(k)
    flat = indices.reshape(-1)
    if indices.device.type == "cpu":
        order = torch.argsort(flat, stable=True)
        crow = torch.zeros(n_rows + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(flat, minlength=n_rows), 0, out=crow[1:])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            g_t = torch.sparse_csr_tensor(
                crow, rows[order], coef.reshape(-1)[order], (n_rows, n), check_invariants=False
            )
        return g_t @ x
    g_t = torch.sparse_coo_tensor(torch.stack([flat, rows]), coef.reshape(-1), (n_rows, n), check_invariants=False)
    return torch.sparse.mm(g_t, x)


@functools.cache
def sparse_encoder(device_type: str) -> type[torch.autograd.Function]:
    """The TopK encoder as an autograd Function whose backward only touches the active latents.

    ``custom_fwd``/``custom_bwd`` are bound to one device type, so there is one class per type.
    """

    class SparseTopKEncode(torch.autograd.Function):
        @staticmethod
        @torch.amp.custom_fwd(device_type=device_type)
        def forward(
            ctx: Any, xc: Tensor, w_enc: Tensor, k: int, dead: Tensor | None, n_aux: int
        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            z, _ = _preactivations(xc, w_enc)  # the one dense product; lower precision under autocast
            values, indices, aux_values, aux_indices = topk_select(z, k, None, 0)
            if dead is not None and n_aux:  # AuxK: pre-activations of the dead latents only
                aux_values, aux_indices = dead_topk(xc, w_enc, dead, n_aux)
            values, aux_values = values.to(xc.dtype), aux_values.to(xc.dtype)
            all_indices, all_values = torch.cat([indices, aux_indices], 1), torch.cat([values, aux_values], 1)
            ctx.save_for_backward(xc, w_enc, all_indices, all_values)
            ctx.mark_non_differentiable(indices, aux_indices)
            return values, indices, aux_values, aux_indices

        @staticmethod
        @torch.amp.custom_bwd(device_type=device_type)
        def backward(
            ctx: Any, g_values: Tensor, _g_indices: Any, g_aux: Tensor, _g_aux_indices: Any
        ) -> tuple[Tensor | None, Tensor | None, None, None, None]:
            xc, w_enc, indices, values = ctx.saved_tensors
            coef = torch.cat([g_values, g_aux], 1).to(xc.dtype) * (values > 0)  # ReLU gate
            grad_xc = grad_w = None
            if ctx.needs_input_grad[0]:  # Σ_j coef[i, j] · W_enc[indices[i, j]]
                grad_xc = F.embedding_bag(indices, w_enc, per_sample_weights=coef.to(w_enc.dtype), mode="sum")
            if ctx.needs_input_grad[1]:
                with torch.autocast(device_type, enabled=False):  # sparse kernels: keep full precision
                    grad_w = sparse_outer(indices, coef, xc, w_enc.shape[0]).to(w_enc.dtype)
            return grad_xc, grad_w, None, None, None

    return SparseTopKEncode


def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """Geometric median of the rows of ``points`` (N, d) by Weiszfeld's iteration, started at the mean."""
    x = points.reshape(-1, points.shape[-1]).double()
    y = x.mean(0)
    for _ in range(max_iter):
        weights = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_next = (weights[:, None] * x).sum(0) / weights.sum()
        done = (y_next - y).norm() <= tol * max(1.0, float(y.norm()))
        y = y_next
        if done:
            break
    return y.to(points.dtype)


def layer_fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-layer FVU of a batch, Σ‖x − x̂‖² / Σ‖x − mean_batch(x)‖²: (B, L, d) → (L,)."""
    err = (x - x_hat).pow(2).sum(dim=(0, 2))
    total = (x - x.mean(0, keepdim=True)).pow(2).sum(dim=(0, 2))
    return fvu_from_sums(err, total)


def fvu_from_sums(err: Any, total: Any) -> Any:
    """The one FVU formula, from its two sums (elementwise, tensors or numpy arrays): the squared
    error Σ‖x − x̂‖² over the centred sum of squares Σ‖x − x̄‖² (a zero total counts as the dtype's
    eps). The training loss takes both over a batch; the evaluate stage over the eval split, and per
    resampled set of documents."""
    if isinstance(total, Tensor):
        return err / total.clamp_min(torch.finfo(total.dtype).eps)
    total = np.asarray(total, dtype=np.float64)
    return np.asarray(err, dtype=np.float64) / np.maximum(total, np.finfo(np.float64).eps)
