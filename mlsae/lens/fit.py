"""Fitting a tuned lens on stored residuals, and the lens's KL metrics.

`fit_lens` trains the translators of blocks 0..L-2 (the last block's is the identity) so that
the model's own unembedding of the translated residual matches the model's output computed from
the stored last-block residual; `kl_by_layer` measures KL(final ‖ lens prediction) per block for
the logit lens and the tuned lens. The lens itself (forward, inverse, files) is `mlsae/lens/tuned.py`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlsae.core.errors import MlsaeError
from mlsae.lens.tuned import Lens

ArrayLike = Tensor | np.ndarray
"""Residuals ``(tokens, layers, d_model)``: a tensor, or anything sliced along axis 0 into
numpy arrays (a numpy array, a Zarr array)."""

TrainIterFactory = Callable[[torch.Generator], Iterable[ArrayLike]]
"""Called once per epoch with fit_lens's seeded generator; returns an iterable of chunks
``(n, L, d)`` of training residuals (any n, any float dtype). Draw the epoch's shuffle from
the generator so that the run is reproducible from ``seed``; ``fit_lens`` cuts the chunks
into batches of exactly ``batch_tokens`` rows (carrying remainders across chunks and
epochs)."""


# ---------------------------------------------------------------------- fitting


def fit_lens(
    train_iter_factory: TrainIterFactory,
    final_norm: nn.Module,
    unembed: nn.Module,
    n_layers: int,
    d_model: int,
    steps: int,
    lr: float,
    batch_tokens: int,
    seed: int,
    eval_resid: ArrayLike,
    patience: int,
    progress: bool = True,
    *,
    eval_every: int = 25,
    eval_batch: int = 256,
) -> tuple[Lens, dict[str, Any]]:
    """Train translators for blocks 0..L-2 on stored residuals; return (lens, info).

    Objective, per block i < L-1 and token: KL(p ‖ q_i) with
    ``p = softmax(unembed(final_norm(h_{L-1})))`` from the stored last-block residual (no
    new forward pass) and ``q_i = softmax(unembed(final_norm(h_i + A h_i + b)))`` with
    translator i+1. The loss is the sum over blocks of the batch-mean KL, so each
    translator follows its own gradient. ``final_norm`` and ``unembed`` are frozen (a
    float32 copy is used if they are in another dtype).

    Optimiser: Adam (zero-initialised translators, no weight decay). tuned-lens itself
    uses Nesterov SGD with a tuned lr and warm-up; Adam needs no per-model lr tuning for
    the few hundred steps this pipeline runs. Nothing here is random except the data
    order, which ``train_iter_factory`` draws from a generator seeded with ``seed``.

    Early stopping: the mean KL over blocks 0..L-2 on ``eval_resid`` ``(N, L, d)`` is
    measured before training and every ``eval_every`` steps (and after the last); the
    best translators are kept and training stops after ``patience`` evaluations without
    improvement. Each evaluation costs N·(L-1) unembeddings.

    ``info``: ``steps`` run, ``best_step``, ``eval_kl`` (best), ``eval_kl_initial``
    (logit lens), ``stopped_early``, and ``history`` (one dict per evaluation). The lens
    is returned on the CPU.
    """
    if steps < 0:
        raise MlsaeError(f"lens fit: steps must be >= 0, got {steps}")
    for name, value in (("lr", lr), ("batch_tokens", batch_tokens), ("patience", patience), ("eval_every", eval_every)):
        if not value > 0:
            raise MlsaeError(f"lens fit: {name} must be positive, got {value}")
    _check_resid(eval_resid, n_layers, d_model, "eval residuals")
    if len(eval_resid) == 0:
        raise MlsaeError("lens fit: the eval residuals are empty")

    with _frozen_float32(final_norm) as norm, _frozen_float32(unembed) as head:
        device = _module_device(head)
        n_tr = n_layers - 1
        w = torch.zeros(n_tr, d_model, d_model, device=device, requires_grad=True)
        b = torch.zeros(n_tr, d_model, device=device, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=lr)

        def snapshot() -> Lens:
            zero_w, zero_b = w.new_zeros(1, d_model, d_model), b.new_zeros(1, d_model)
            return Lens(n_layers, d_model, torch.cat([zero_w, w.detach()]), torch.cat([zero_b, b.detach()]))

        def evaluate() -> float:
            if n_tr == 0:
                return 0.0
            kl = _kl_sums(snapshot(), eval_resid, norm, head, eval_batch, n_layers, d_model)
            return float(kl[1][:n_tr].mean()) / len(eval_resid)

        generator = torch.Generator().manual_seed(seed)
        batches = _rebatch(train_iter_factory, generator, batch_tokens, n_layers, d_model)
        initial = best = evaluate()
        best_lens, best_step, bad, step, train_kl = snapshot(), 0, 0, 0, math.nan
        history: list[dict[str, float]] = [{"step": 0, "train_kl": math.nan, "eval_kl": initial}]
        stopped_early = False
        bar = _progress(steps, progress)
        try:
            while step < steps and n_tr > 0:
                x = next(batches).to(device, torch.float32)
                with torch.no_grad():
                    target = F.log_softmax(head(norm(x[:, -1])), dim=-1)
                opt.zero_grad(set_to_none=True)
                total = 0.0
                for i in range(n_tr):  # one backward per block keeps one (B, vocab) alive
                    h = x[:, i]
                    logq = F.log_softmax(head(norm(h + h @ w[i].T + b[i])), dim=-1)
                    loss = F.kl_div(logq, target, log_target=True, reduction="none").sum(-1).mean()
                    loss.backward()
                    total += loss.item()
                if not math.isfinite(total):
                    raise MlsaeError(f"lens fit: loss is not finite at step {step + 1}; lower the lens lr (now {lr})")
                opt.step()
                step += 1
                train_kl = total / n_tr
                bar.update(1)
                bar.set_postfix(train_kl=f"{train_kl:.4f}", best_eval_kl=f"{best:.4f}")
                if step % eval_every == 0 or step == steps:
                    current = evaluate()
                    history.append({"step": step, "train_kl": train_kl, "eval_kl": current})
                    if current < best:
                        best, best_lens, best_step, bad = current, snapshot(), step, 0
                    else:
                        bad += 1
                        if bad >= patience:
                            stopped_early = step < steps
                            break
        finally:
            bar.close()
    info = {
        "steps": step,
        "best_step": best_step,
        "eval_kl": best,
        "eval_kl_initial": initial,
        "stopped_early": stopped_early,
        "history": history,
    }
    return best_lens.to("cpu"), info


def shuffled_chunks(resid: ArrayLike, chunk_tokens: int = 4096) -> TrainIterFactory:
    """A ``TrainIterFactory`` over in-memory residuals ``(N, L, d)``: each epoch, a fresh
    permutation of the rows drawn from fit_lens's generator, yielded ``chunk_tokens`` at a time."""

    def factory(generator: torch.Generator) -> Iterator[Tensor]:
        order = torch.randperm(len(resid), generator=generator)
        for start in range(0, len(order), chunk_tokens):
            rows = order[start : start + chunk_tokens]
            yield resid[rows] if isinstance(resid, Tensor) else torch.from_numpy(np.asarray(resid[rows.numpy()]))

    return factory


def _rebatch(
    factory: TrainIterFactory, generator: torch.Generator, batch_tokens: int, n_layers: int, d_model: int
) -> Iterator[Tensor]:
    """Endless batches of exactly ``batch_tokens`` rows cut from the factory's epochs."""
    pending: list[Tensor] = []
    count = 0
    while True:
        produced = 0
        for chunk in factory(generator):
            chunk = torch.as_tensor(chunk)
            _check_resid(chunk, n_layers, d_model, "training residuals")
            produced += len(chunk)
            pending.append(chunk)
            count += len(chunk)
            while count >= batch_tokens:
                data = torch.cat(pending) if len(pending) > 1 else pending[0]
                yield data[:batch_tokens]
                rest = data[batch_tokens:]
                pending, count = ([rest] if len(rest) else []), len(rest)
        if produced == 0:
            raise MlsaeError("lens fit: the training residuals are empty")


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar (a silent one when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="lens fit", unit="step", disable=not enabled)


# ---------------------------------------------------------------------- metrics


def kl_by_layer(
    lens: Lens, resid: ArrayLike, final_norm: nn.Module, unembed: nn.Module, batch: int = 256
) -> dict[str, Any]:
    """KL(final ‖ lens prediction) per block, in nats per token, for logit and tuned lens.

    ``resid`` is ``(N, L, d)`` (all blocks, any float dtype; a tensor or anything sliced
    into numpy arrays such as a Zarr array). The reference distribution is the model's
    output computed from the stored last-block residual. Tokens are processed ``batch``
    at a time and blocks one by one, so at most a ``(batch, vocab)`` logit matrix is
    alive. Returns ``kl_logit_lens_by_layer`` and ``kl_tuned_lens_by_layer`` (length L,
    block order; the last block is 0 by definition) and their means over the L blocks,
    ``kl_logit_lens`` and ``kl_tuned_lens``.
    """
    n_layers, d_model = lens.n_layers, lens.d_model
    _check_resid(resid, n_layers, d_model, "residuals")
    if len(resid) == 0:
        raise MlsaeError("lens metrics: no residuals to evaluate")
    with _frozen_float32(final_norm) as norm, _frozen_float32(unembed) as head:
        logit, tuned = _kl_sums(lens, resid, norm, head, batch, n_layers, d_model)
    logit_list = [float(v) / len(resid) for v in logit]
    tuned_list = [float(v) / len(resid) for v in tuned]
    return {
        "kl_logit_lens_by_layer": logit_list,
        "kl_tuned_lens_by_layer": tuned_list,
        "kl_logit_lens": sum(logit_list) / n_layers,
        "kl_tuned_lens": sum(tuned_list) / n_layers,
    }


@torch.no_grad()
def _kl_sums(
    lens: Lens, resid: ArrayLike, norm: nn.Module, head: nn.Module, batch: int, n_layers: int, d_model: int
) -> tuple[Tensor, Tensor]:
    """Summed (over tokens) KL per block for the identity lens and for ``lens``; float64."""
    device = _module_device(head)
    logit = torch.zeros(n_layers, dtype=torch.float64)
    tuned = torch.zeros(n_layers, dtype=torch.float64)

    def kl_sum(h: Tensor, target: Tensor) -> float:
        logq = F.log_softmax(head(norm(h)), dim=-1)
        return float(F.kl_div(logq, target, log_target=True, reduction="sum"))

    for start in range(0, len(resid), batch):
        x = torch.as_tensor(resid[start : start + batch]).to(device, torch.float32)
        target = F.log_softmax(head(norm(x[:, -1])), dim=-1)
        for i in range(n_layers - 1):
            logit[i] += kl_sum(x[:, i], target)
            if not lens.is_identity:
                tuned[i] += kl_sum(lens(x[:, i : i + 1], [i])[:, 0], target)
    return logit, (logit.clone() if lens.is_identity else tuned)


# ---------------------------------------------------------------------- helpers


def _check_resid(resid: ArrayLike, n_layers: int, d_model: int, what: str) -> None:
    """Raise MlsaeError unless ``resid`` has shape ``(N, n_layers, d_model)``."""
    shape = tuple(resid.shape)
    if len(shape) != 3 or shape[1:] != (n_layers, d_model):
        raise MlsaeError(f"lens: {what} of shape {shape} do not match (tokens, {n_layers}, {d_model})")


def _module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU if it has none)."""
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _frozen_float32(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in float32 with no parameter gradients, the caller's module untouched.

    A float32 module is used in place with ``requires_grad`` switched off and restored
    afterwards (no copy of a large unembedding); another dtype gets a float32 copy.
    """
    params = list(module.parameters())
    if all(p.dtype == torch.float32 for p in [*params, *module.buffers()] if p.is_floating_point()):
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(False)
            yield module
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
    else:
        yield copy.deepcopy(module).to(torch.float32).requires_grad_(False)
