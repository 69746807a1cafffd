"""The downstream cost of replacing a layer: next-token CE and KL with one block spliced.

For every SAE layer (block ℓ) and every variant, the residual after block ℓ is replaced and the
model runs on from there (mlsae.models.splice). The variants:

* ``recon`` (the evaluate stage, mlsae/evaluation/reconstruction.py): the SAE's reconstruction:
  lens, standardise, TopK encode, decode, de-standardise, inverse lens, so the splice is in the
  model's own basis (this module knows no SAE, so the baseline stage depends on none);
* ``mean`` (the baseline stage): the mean residual of block ℓ over the eval split's analysed
  tokens (mean ablation: the information-free baseline that keeps the residual on the data's scale);
* ``zero`` (the baseline stage, when `evaluate.baselines` asks for it): zeros. In a bias-free model
  such as Llama a zero residual stays zero up to the next block's input, but the positions that
  are not analysed (position 0, separators) keep their clean residual, so later blocks still see
  something: ΔCE_zero is not ln V − CE, and it says little about the layer.

Positions. The replacement applies at the analysed positions only: tokens that are not special
and, with ``data.skip_first``, not position 0 of a context (an attention sink with outlier norms
that the SAE never saw); other positions keep their clean residual. A position t counts in the
loss when t and t+1 are in the same context, t is analysed and t+1 is not special; it belongs to
the document of token t (token t+1 is then in the same document: every document starts with its
separator, a special token).

Per document u of the sample the stages keep sufficient statistics (:class:`SpliceSums`):
``ce_clean[u]`` and ``count[u]`` (summed clean CE and loss positions), ``ce[v, u, ℓ]`` (summed
CE) and ``kl[v, u, ℓ]`` (summed KL(clean ‖ spliced)). Every downstream figure is a ratio of sums
over documents of these (mlsae/evaluation/reconstruction.py, mlsae/evaluation/baseline.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mlsae.core.errors import MlsaeError
from mlsae.evaluation.sample import SplicedSample
from mlsae.models.registry import LoadedModel
from mlsae.models.splice import Splicer

Replacement = Callable[[int, int, torch.Tensor], torch.Tensor]
"""``(layer position j, block, clean residual (B, T, d)) -> replacement (B, T, d)``."""


@dataclass
class SpliceSums:
    """Per-document sums of the downstream metrics (see the module docstring)."""

    units: np.ndarray  # (U,) document ids, ascending
    variants: tuple[str, ...]
    layers: list[int]
    ce_clean: np.ndarray  # (U,) float64
    count: np.ndarray  # (U,) float64
    ce: np.ndarray  # (V, U, L) float64
    kl: np.ndarray  # (V, U, L) float64
    n_tokens: int
    """Tokens of the spliced contexts."""
    sample: str = ""
    """The spliced sample's fingerprint."""

    @property
    def spliced_token_layers(self) -> int:
        """(token, layer, variant) splices evaluated: tokens of every spliced context."""
        return self.n_tokens * len(self.variants) * len(self.layers)

    def save(self, path: str | Path) -> None:
        """Write the sums as one ``.npz`` file (the baseline stage's output)."""
        with open(path, "wb") as f:
            np.savez(
                f,
                units=self.units,
                variants=np.array(self.variants),
                layers=np.array(self.layers),
                ce_clean=self.ce_clean,
                count=self.count,
                ce=self.ce,
                kl=self.kl,
                n_tokens=np.array(self.n_tokens),
                sample=np.array(self.sample),
            )

    @classmethod
    def load(cls, path: str | Path) -> SpliceSums:
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(
                    units=z["units"],
                    variants=tuple(str(v) for v in z["variants"]),
                    layers=[int(b) for b in z["layers"]],
                    ce_clean=z["ce_clean"],
                    count=z["count"],
                    ce=z["ce"],
                    kl=z["kl"],
                    n_tokens=int(z["n_tokens"]),
                    sample=str(z["sample"]),
                )
        except FileNotFoundError:
            raise MlsaeError(f"{path}: not found (run the baseline stage first)") from None
        except (OSError, ValueError, KeyError) as e:
            raise MlsaeError(
                f"{path}: unreadable baseline sums ({type(e).__name__}); rerun the baseline stage"
            ) from None

    def variant(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(ce, kl)`` of one variant, each (U, L)."""
        v = self.variants.index(name)
        return self.ce[v], self.kl[v]


def loss_positions(excluded: np.ndarray, special: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(analysed (C, T), loss (C, T−1)) masks: analysed positions are not `excluded`; position t
    counts in the loss when it is analysed and token t+1 is not special."""
    analysed = ~excluded.astype(bool)
    loss = analysed[:, :-1] & ~special[:, 1:].astype(bool)
    return analysed, loss


def mean_ablation(layer_means: torch.Tensor) -> Replacement:
    """The ``mean`` variant: each SAE layer's mean residual (`layer_means` (L, d), model space)."""

    def replace(j: int, block: int, clean: torch.Tensor) -> torch.Tensor:
        return layer_means[j].to(clean.device, clean.dtype).expand_as(clean)

    return replace


def zero_ablation(j: int, block: int, clean: torch.Tensor) -> torch.Tensor:
    """The ``zero`` variant."""
    return torch.zeros_like(clean)


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
    model: LoadedModel,
    sample: SplicedSample,
    layers: list[int],
    replacements: dict[str, Replacement],
    batch_size: int,
    progress: bool = True,
) -> SpliceSums:
    """Per-document downstream sums of every variant in `replacements` at every block of `layers`,
    on the sample's contexts."""
    n_ctx, n_pos = sample.tokens.shape
    dev = model.device
    splicer = Splicer(model)
    analysed, loss = loss_positions(sample.excluded, sample.special)
    # the documents holding a loss position are the units (others would be empty units)
    positions = sample.document[:, :-1]
    units, inverse = np.unique(positions[loss], return_inverse=True)
    unit = np.zeros(positions.shape, dtype=np.int64)
    unit[loss] = inverse
    variants = tuple(replacements)
    n_units = len(units)
    shape = (len(variants), n_units, len(layers))
    sums = SpliceSums(
        units=units.astype(np.int64),
        variants=variants,
        layers=list(layers),
        ce_clean=np.zeros(n_units),
        count=np.bincount(unit[loss], minlength=n_units).astype(np.float64),
        ce=np.zeros(shape),
        kl=np.zeros(shape),
        n_tokens=n_ctx * n_pos,
        sample=sample.fingerprint(),
    )
    if sums.count.sum() == 0:
        raise MlsaeError(
            "no position has a next-token target (every position is special or skipped); "
            "raise data.context or evaluate.tokens"
        )
    bar = tqdm(total=n_ctx * len(layers), desc="spliced forwards", unit="ctx·layer", disable=not progress)
    logits_buf: torch.Tensor | None = None
    for start in range(0, n_ctx, batch_size):
        rows = slice(start, min(n_ctx, start + batch_size))
        ids = torch.from_numpy(sample.tokens[rows].astype(np.int64)).to(dev)
        keep = torch.from_numpy(analysed[rows]).to(dev)[..., None]
        mask = loss[rows]
        where = unit[rows][mask]
        targets = ids[:, 1:].reshape(-1)
        run = splicer.clean(ids)
        vocab = run.logits.shape[-1]
        clean_logp = F.log_softmax(run.logits[:, :-1], dim=-1).reshape(-1, vocab)
        clean_p = clean_logp.exp()
        ce_clean = -clean_logp.gather(-1, targets[:, None]).view(mask.shape)
        sums.ce_clean += np.bincount(where, ce_clean.double().cpu().numpy()[mask], minlength=n_units)
        if logits_buf is None or logits_buf.shape[0] != clean_logp.shape[0]:
            logits_buf = torch.empty(clean_logp.shape, device=dev)
        for j, block in enumerate(layers):
            clean = run.resid[block]
            for v, name in enumerate(variants):
                replacement = replacements[name](j, block, clean)
                resid = torch.where(keep, replacement.to(clean.dtype), clean)
                h = splicer.hidden_from(run, block, resid)[:, :-1]
                logits = splicer.head(h, out=logits_buf.view(*h.shape[:-1], vocab)).reshape(-1, vocab)
                ce, kl = _ce_kl(logits, targets, clean_logp, clean_p)
                sums.ce[v, :, j] += np.bincount(
                    where, ce.view(mask.shape).double().cpu().numpy()[mask], minlength=n_units
                )
                sums.kl[v, :, j] += np.bincount(
                    where, kl.view(mask.shape).double().cpu().numpy()[mask], minlength=n_units
                )
            bar.update(rows.stop - rows.start)
    bar.close()
    return sums
