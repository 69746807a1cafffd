"""The multi-layer TopK sparse autoencoder (MLSAE): model, loss and I/O (its config: mlsae/sae/config.py).

One SAE reads the residual vector of every selected layer of a token as a separate example
(Lawson et al. 2024). Each vector is standardised over its own entries, encoded with
``z = W_enc (x̂ − b_pre)`` and a TopK + ReLU, and decoded with ``W_dec · topk(z) + b_pre``.
The training path is sparse end to end: only the encoder's forward matmul is dense; the decoder
gathers k columns per vector and the encoder's backward touches only the k active rows. A plain
dense path (``dense=True``) is kept as the reference the sparse one is tested against.
The kernels are in ``mlsae/sae/kernels.py``; the optimiser and training step in ``mlsae/sae/trainer.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from mlsae.core.errors import MlsaeError
from mlsae.core.io import file_sha256, write_bytes, write_text
from mlsae.core.paths import SAE_CONFIG, SAE_WEIGHTS
from mlsae.sae.config import WEIGHTS_SHA256, SAEConfig
from mlsae.sae.kernels import geometric_median, layer_fvu, sparse_encoder, topk_select

NORM_EPS = 1e-6
"""``vector``: added to each vector's variance before dividing by its std (a constant vector maps to 0)."""
SEED_NORM_EPS = 1e-5
"""``seed``: added to each vector's unbiased std, as the seed code (and SAELens's ``layer_norm``) does."""


@dataclass
class SAEOutput:
    """What :meth:`MLSAE.forward` returns; every tensor keeps the input's (B, L) leading axes."""

    recon: Tensor
    """(B, L, d) reconstruction mapped back to the input space."""
    xn: Tensor
    """(B, L, d) normalised input."""
    xn_hat: Tensor
    """(B, L, d) reconstruction in the normalised space."""
    values: Tensor
    """(B, L, k) activations of the active latents (ReLU'd, may contain zeros)."""
    indices: Tensor
    """(B, L, k) int64 indices of the active latents."""
    aux_recon: Tensor | None = None
    """(B, L, d) the dead latents' reconstruction of the residual error (no b_pre); None if unused."""


@dataclass
class SAELoss:
    """Loss components of one batch (scalars are 0-dim tensors)."""

    loss: Tensor
    """Total loss: ``fvu + auxk_coef · auxk``."""
    fvu_by_layer: Tensor
    """(L,) fraction of variance unexplained per layer, in the normalised space."""
    fvu: Tensor
    """Mean of ``fvu_by_layer``."""
    auxk: Tensor
    """AuxK loss (0 when no latent is dead)."""


# ----------------------------------------------------------------------------------------------
# The model


class MLSAE(nn.Module):
    """A TopK SAE over (token, layer) residual vectors.

    Parameters: ``W_enc`` (n_latents, d_model), ``W_dec`` (d_model, n_latents) with unit-norm
    columns, ``b_pre`` (d_model,); buffer ``tokens_since_fired`` (n_latents,) int64.
    Computation runs in the parameters' dtype (float32 by default) unless under autocast.
    """

    tokens_since_fired: Tensor  # buffers (register_buffer), declared for the type checker
    layer_center: Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        w_enc = torch.randn(cfg.n_latents, cfg.d_model) / math.sqrt(cfg.d_model)
        self.W_enc = nn.Parameter(w_enc)
        # Stored latent-major, i.e. as the transpose of a contiguous (n_latents, d_model) matrix:
        # the sparse decoder gathers whole columns, and the gradient keeps the same layout.
        self.W_dec = nn.Parameter(w_enc.clone().T)
        self.b_pre = nn.Parameter(torch.zeros(cfg.d_model))
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.n_latents, dtype=torch.int64))
        if cfg.center == "layer":
            self.register_buffer("layer_center", torch.zeros(len(cfg.layers), cfg.d_model))
        self.normalise_decoder()

    # -- normalisation -------------------------------------------------------------------------

    def normalise(self, x: Tensor, positions: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Standardise each vector over its last axis; returns ``(xn, mean, std)`` such that
        :meth:`denormalise` is ``xn · std + mean`` (formulas: :attr:`SAEConfig.normalisation`).

        With ``center: layer`` the second-last axis of `x` indexes layer positions (all of them,
        or `positions`): each vector loses its layer's centre first, and ``mean`` carries it back
        (it is then a (..., d) vector, not a (..., 1) scalar)."""
        x = x.to(self.b_pre.dtype)
        center = None
        if self.cfg.center == "layer":
            center = self.layer_center if positions is None else self.layer_center[positions]
            x = x - center
        mean = x.mean(-1, keepdim=True)
        centred = x - mean
        if self.cfg.normalisation == "seed":
            std = centred.std(-1, keepdim=True)  # unbiased; the epsilon goes outside the sqrt
            xn = centred / (std + SEED_NORM_EPS)
        else:
            std = (centred.pow(2).mean(-1, keepdim=True) + NORM_EPS).sqrt()  # faster than Tensor.var on CPU
            xn = centred / std
        return xn, (mean if center is None else mean + center), std

    @staticmethod
    def denormalise(xn: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """Inverse of :meth:`normalise`."""
        return xn * std + mean

    # -- encoder / decoder ---------------------------------------------------------------------

    def encode(self, xn: Tensor, dense: bool = False) -> tuple[Tensor, Tensor]:
        """TopK + ReLU latents of normalised vectors (..., d) → ``(values, indices)``, each (..., k)."""
        values, indices, _, _ = self._encode(xn, dense, 0)
        return values, indices

    def _encode(self, xn: Tensor, dense: bool, n_aux: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        lead = xn.shape[:-1]
        xc = xn.reshape(-1, self.cfg.d_model) - self.b_pre
        dead = self.dead_mask() if n_aux else None
        if dense:
            z = xc @ self.W_enc.T
            out = list(topk_select(z, self.cfg.k, dead, n_aux))
            out[0], out[2] = out[0].to(xc.dtype), out[2].to(xc.dtype)
        else:
            out = list(sparse_encoder(xc.device.type).apply(xc, self.W_enc, self.cfg.k, dead, n_aux))
        return tuple(t.reshape(*lead, t.shape[-1]) for t in out)  # type: ignore[return-value]

    def decode(self, values: Tensor, indices: Tensor, dense: bool = False) -> Tensor:
        """``W_dec · sparse + b_pre`` for latents given as (..., k) values and indices → (..., d)."""
        return self._dictionary(values, indices, dense) + self.b_pre

    def _dictionary(self, values: Tensor, indices: Tensor, dense: bool) -> Tensor:
        """``W_dec · sparse`` without the bias; sparse path sums k gathered columns per vector."""
        lead, k = values.shape[:-1], values.shape[-1]
        v, i = values.reshape(-1, k).to(self.W_dec.dtype), indices.reshape(-1, k)
        if dense:
            f = v.new_zeros(v.shape[0], self.cfg.n_latents).scatter(1, i, v)
            out = f @ self.W_dec.T
        else:
            out = F.embedding_bag(i, self.W_dec.T, per_sample_weights=v, mode="sum")
        return out.to(self.W_dec.dtype).reshape(*lead, self.cfg.d_model)

    # -- forward and loss ----------------------------------------------------------------------

    def forward(self, x: Tensor, *, dense: bool = False, auxk: bool = False) -> SAEOutput:
        """Encode and reconstruct raw residuals ``x`` (B, L, d_model) of any float dtype.

        ``auxk=True`` also reconstructs the residual error from the top-``auxk`` dead latents
        (needed by :meth:`loss` for the AuxK term). ``dense=True`` runs the dense reference path.
        """
        cfg = self.cfg
        if x.ndim != 3 or x.shape[1:] != (len(cfg.layers), cfg.d_model):
            raise MlsaeError(
                f"sae input must have shape (batch, {len(cfg.layers)}, {cfg.d_model}) (got {tuple(x.shape)})"
            )
        xn, mean, std = self.normalise(x)
        n_aux = self._n_aux() if auxk else 0
        values, indices, aux_values, aux_indices = self._encode(xn, dense, n_aux)
        xn_hat = self.decode(values, indices, dense)
        aux_recon = self._dictionary(aux_values, aux_indices, dense) if n_aux else None
        return SAEOutput(self.denormalise(xn_hat, mean, std), xn, xn_hat, values, indices, aux_recon)

    def loss(self, out: SAEOutput) -> SAELoss:
        """Mean per-layer FVU plus ``auxk_coef ·`` AuxK, all in the normalised space."""
        if out.xn.shape[0] < 2:
            raise MlsaeError("sae batch must hold at least 2 tokens (FVU needs a batch mean)")
        fvu_by_layer = layer_fvu(out.xn, out.xn_hat)
        fvu = fvu_by_layer.mean()
        if out.aux_recon is None:
            auxk = fvu.new_zeros(())
        else:
            error = (out.xn - out.xn_hat).detach()
            auxk = layer_fvu(error, out.aux_recon).mean()
        return SAELoss(fvu + self.cfg.auxk_coef * auxk, fvu_by_layer, fvu, auxk)

    # -- dead latents --------------------------------------------------------------------------

    def dead_mask(self) -> Tensor:
        """(n_latents,) bool: latents that have not fired for ``dead_tokens`` tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def _n_aux(self) -> int:
        if self.cfg.auxk == 0 or self.cfg.auxk_coef == 0:
            return 0
        return min(self.cfg.auxk, int(self.dead_mask().sum()))

    @torch.no_grad()
    def update_dead(self, values: Tensor, indices: Tensor, n_tokens: int) -> None:
        """Reset the counter of latents that fired (value > 0) anywhere in the batch; add
        ``n_tokens`` to the others. Under torch.distributed the batch is the global one."""
        fired = torch.zeros(self.cfg.n_latents, dtype=torch.int32, device=indices.device)
        fired.index_add_(0, indices.reshape(-1), (values > 0).reshape(-1).int())
        count = torch.tensor(n_tokens, dtype=torch.int64, device=indices.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(fired)
            torch.distributed.all_reduce(count)
        self.tokens_since_fired.add_(count).masked_fill_(fired > 0, 0)

    # -- initialisation and decoder constraints -----------------------------------------------

    @torch.no_grad()
    def init_center(self, sample: Tensor) -> None:
        """``center: layer``: set each layer's centre to the mean of a (tokens, L, d) sample of raw
        (lens-space) inputs."""
        if self.cfg.center == "layer":
            self.layer_center.copy_(sample.reshape(-1, len(self.cfg.layers), self.cfg.d_model).double().mean(0))

    @torch.no_grad()
    def init_b_pre(self, xn_sample: Tensor) -> None:
        """Set ``b_pre`` to the geometric median of a sample of *normalised* vectors (..., d)."""
        self.b_pre.copy_(geometric_median(xn_sample.reshape(-1, self.cfg.d_model)))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Remove from ``W_dec.grad`` the component parallel to each (unit-norm) decoder column."""
        grad, w = self.W_dec.grad, self.W_dec
        if grad is not None:
            grad.addcmul_(w, (grad * w).sum(0), value=-1)

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale every decoder column to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=0).clamp_min(1e-12))

    # -- persistence ---------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write ``sae.safetensors`` (weights + dead counter) and ``config.json`` atomically; the
        config records the weights file's sha256 (``weights_sha256``), checked by :meth:`load`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        data = safetensors_bytes(tensors)
        write_bytes(directory / SAE_WEIGHTS, data)
        record = {**self.cfg.to_dict(), WEIGHTS_SHA256: hashlib.sha256(data).hexdigest()}
        write_text(directory / SAE_CONFIG, json.dumps(record, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> MLSAE:
        """Rebuild an SAE saved by :meth:`save`; a missing or corrupt file, a config without the
        weights' sha256, weights whose sha256 differs from it, or a non-finite weight raise MlsaeError."""
        directory = Path(directory)
        cfg_path, weights_path = directory / SAE_CONFIG, directory / SAE_WEIGHTS
        for path in (cfg_path, weights_path):
            if not path.is_file():
                raise MlsaeError(f"{path}: missing (not a saved SAE directory)")
        try:
            raw = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise MlsaeError(f"{cfg_path}: unreadable config ({_one_line(e)})") from None
        if not isinstance(raw, dict):
            raise MlsaeError(f"{cfg_path}: config must be a JSON object")
        recorded = raw.pop(WEIGHTS_SHA256, None)
        try:
            cfg = SAEConfig.from_dict(raw)
        except (MlsaeError, TypeError) as e:
            raise MlsaeError(f"{cfg_path}: {_one_line(e)}") from None
        rebuild = f"restore it with `dvc checkout {directory}` or rebuild it with `dvc repro -f train`"
        try:
            tensors = load_file(str(weights_path))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise MlsaeError(f"{weights_path}: unreadable weights ({_one_line(e)}); {rebuild}") from None
        if not isinstance(recorded, str):  # fails closed: without the hash nothing vouches for the weights
            raise MlsaeError(
                f"{cfg_path}: no {WEIGHTS_SHA256} recorded for {SAE_WEIGHTS} (written by an older version, or "
                f"edited); {rebuild}"
            )
        if file_sha256(weights_path) != recorded:
            raise MlsaeError(
                f"{weights_path}: sha256 differs from the one recorded in {cfg_path} (corrupted); {rebuild}"
            )
        sae = cls(cfg)
        for name, ref in sae.state_dict().items():
            got = tensors.get(name)
            if got is None or got.shape != ref.shape:
                found = "missing" if got is None else f"shape {tuple(got.shape)}"
                expected = f"expected shape {tuple(ref.shape)}"
                raise MlsaeError(f"{weights_path}: tensor {name!r} {found}, {expected}")
            if got.is_floating_point() and not bool(torch.isfinite(got).all()):
                raise MlsaeError(f"{weights_path}: tensor {name!r} holds NaN or infinite values; {rebuild}")
        sae.load_state_dict(tensors)
        return sae.to(device)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
