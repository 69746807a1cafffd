"""The train stage loop: shuffled batches from the store -> MLSAE steps -> checkpoints -> outputs.

Single process, or `torchrun --nproc_per_node=N` with DistributedDataParallel (NCCL on GPUs, gloo
on CPUs): every rank follows the same batch plan and takes its slice of each global batch, so the
ranks always run the same number of steps. Rank 0 writes checkpoints and outputs.

A checkpoint resumes only the run it belongs to: its identity holds every param that shapes the
batches and the SAE, and the activation store's whole identity (model, revision, the corpus's
content hash, sizes, dtype, seed, skip_first, ...); in stream mode also the corpus's content hash
read now. Rank 0 holds a lock on the checkpoint directory for the whole run, so a second trainer
refuses at once instead of writing the same checkpoint. SIGINT/SIGTERM during a step are held until
the step is done, then a single process saves a checkpoint (store mode) and stops.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from mlsae.core.errors import MlsaeError
from mlsae.core.io import atomic_dir, atomic_file, exclusive, short_hash
from mlsae.core.params import DataParams, ExtractParams, SAEParams, TrainParams, select_layers
from mlsae.core.paths import CHECKPOINT
from mlsae.data import corpus
from mlsae.data.shuffle import BatchPlan, iter_batches
from mlsae.data.stream import StreamBatches, check_store
from mlsae.lens.tuned import Lens
from mlsae.models.registry import load_model, resolve_device
from mlsae.sae.config import SAEConfig, check_dead_window, resolve_dead_tokens
from mlsae.sae.model import MLSAE
from mlsae.stores.activations import ActivationStore

CHECKPOINT_VERSION = 2  # 2: the identity holds the store's whole identity and the corpus content
LOCK = "lock"
"""The lock file in the checkpoint directory (held by rank 0 while it trains)."""
_NOT_IDENTITY = frozenset({"done", "complete", "arrays"})
"""Store attrs that record progress, not content: left out of a checkpoint's identity."""
ADAM_EPS = 6.25e-10
"""Adam's eps (the paper's value)."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_spec: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when launched by torchrun; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), resolve_device(device_spec)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


@dataclass(frozen=True)
class StreamSource:
    """What stream mode (`train.source: stream`) builds its batches from: the model, the corpus
    and the storage dtype (mlsae/data/stream.py)."""

    model: str
    data: DataParams
    extract: ExtractParams


def sae_config(
    sae: SAEParams, train: TrainParams, lens_mode: str, reader: ActivationStore, run_tokens: int
) -> SAEConfig:
    """The SAE the train stage builds for these params on this store's model; `run_tokens` (train
    tokens x epochs) resolves `sae.dead_tokens: auto`."""
    cfg = SAEConfig(
        d_model=reader.d_model,
        n_latents=sae.expansion * reader.d_model,
        k=sae.k,
        layers=select_layers(sae, reader.n_layers),
        auxk=sae.auxk,
        auxk_coef=sae.auxk_coef,
        dead_tokens=resolve_dead_tokens(sae.dead_tokens, run_tokens),
        normalisation=sae.normalisation,
        center=sae.center,
        lens=lens_mode,
        model=str(reader.attrs.get("model")),
        params_hash=short_hash({"sae": sae.model_dump(), "train": train.model_dump(), "lens": lens_mode}),
    )
    cfg.validate(expansion=sae.expansion)
    return cfg


def identity_of(
    sae: SAEParams, train: TrainParams, lens: Lens, reader: ActivationStore, stream: StreamSource | None, world: int = 1
) -> dict:
    """What a checkpoint must match to be resumed (not where or how often it was saved)."""
    identity = {
        "sae": sae.model_dump(),
        "train": train.model_dump(exclude={"device", "checkpoint_every"}),
        "lens": lens.fingerprint(),
        # every attr that identifies the store's content (its corpus content hash included)
        "store": {k: v for k, v in sorted(reader.attrs.items()) if k not in _NOT_IDENTITY},
    }
    if stream is not None:  # the batches come from the corpus, the model and this many ranks
        identity["stream"] = {
            "data": stream.data.model_dump(),
            "corpus_sha256": corpus.content_sha256(stream.data.source),
            "model": stream.model,
            "dtype": stream.extract.dtype,
            "batch_size": stream.extract.batch_size,
            "world": world,
        }
    return identity


def load_checkpoint(path: Path, identity: dict) -> dict | None:
    """The checkpoint at `path` if it belongs to this run; None if absent or from another run.

    Loaded with `weights_only=True`: only tensors and plain data are unpickled, so a crafted file
    cannot run code; anything else is refused with one line.
    """
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a real pickle that names a class or function to call
            raise MlsaeError(
                f"{path}: refused: the checkpoint holds objects other than tensors and plain "
                "data (not one this project wrote); delete it to start over"
            ) from None
        raise MlsaeError(f"{path}: corrupted checkpoint (UnpicklingError); delete it to start over") from None
    except Exception as e:
        raise MlsaeError(f"{path}: corrupted checkpoint ({type(e).__name__}); delete it to start over") from None
    if isinstance(ckpt, dict) and type(ckpt.get("version")) is int and 0 < ckpt["version"] < CHECKPOINT_VERSION:
        return None  # an older layout, whose identity cannot vouch for this run: start afresh
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise MlsaeError(f"{path}: corrupted checkpoint (unknown layout); delete it to start over")
    return ckpt if ckpt.get("identity") == identity else None


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def lr_factor(step: int, n_steps: int, schedule: str, warmup_steps: int) -> float:
    """The learning rate of optimiser step `step` (0-based) of `n_steps`, as a fraction of
    `train.lr`: ``min(1, (step + 1) / warmup_steps)`` times ``1`` (`constant`), ``1 - t`` (`linear`)
    or ``(1 + cos(pi t)) / 2`` (`cosine`), with ``t = step / n_steps`` the fraction of the run done,
    so a decayed rate reaches 0 at the run's end."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    t = min(1.0, step / max(n_steps, 1))
    decay = {"constant": 1.0, "linear": 1.0 - t, "cosine": 0.5 * (1.0 + math.cos(math.pi * t))}[schedule]
    return warm * decay


def make_optimizer(sae: nn.Module, lr: float) -> torch.optim.Adam:
    """Adam with the paper's eps; the fused kernel (one pass over each tensor) on CPU and CUDA."""
    params = list(sae.parameters())
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, eps=ADAM_EPS, fused=fused)


def train_step(sae: nn.Module, opt: torch.optim.Optimizer, x: Tensor, grad_clip: float = 0.0) -> dict[str, float]:
    """One optimiser step on raw residuals ``x`` (B, L, d); returns the batch's metrics:
    ``loss``, ``fvu``, ``auxk``, ``l0``, ``dead_fraction`` and ``fvu_layer_{block}`` per layer.

    ``sae`` is an :class:`MLSAE` or a DistributedDataParallel wrapper of one. The caller picks
    the device and may wrap the call in ``torch.autocast``. Raises ``FloatingPointError`` before
    touching the weights if the loss (or, with clipping, the gradient norm) is not finite.
    """
    core = cast(MLSAE, getattr(sae, "module", sae))
    sae.train()
    out = sae(x, auxk=True)
    losses = core.loss(out)
    loss = float(losses.loss.detach())
    finite = math.isfinite(loss)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank must agree to stop, or the others would wait forever in the all-reduce
        flag = torch.tensor(float(finite), device=losses.loss.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        finite = bool(flag.item())
    if not finite:
        raise FloatingPointError(
            f"sae training loss is {loss} (on this or another rank); step skipped, weights unchanged"
        )
    opt.zero_grad(set_to_none=True)
    losses.loss.backward()
    core.remove_parallel_grads()
    if grad_clip > 0:
        norm = float(nn.utils.clip_grad_norm_(core.parameters(), grad_clip))
        if not math.isfinite(norm):
            raise FloatingPointError(f"sae gradient norm is {norm}; step skipped, weights unchanged")
    opt.step()
    core.normalise_decoder()
    core.update_dead(out.values, out.indices, n_tokens=x.shape[0])
    metrics = {
        "loss": loss,
        "fvu": float(losses.fvu.detach()),
        "auxk": float(losses.auxk.detach()),
        "l0": float((out.values > 0).sum(-1).float().mean()),
        "dead_fraction": float(core.dead_mask().float().mean()),
    }
    for layer, value in zip(core.cfg.layers, losses.fvu_by_layer.detach().tolist()):
        metrics[f"fvu_layer_{layer}"] = value
    return metrics


class _StoreBatches:
    """Store mode's batches: the BatchPlan over the stored train split (mlsae/data/shuffle.py)."""

    def __init__(self, reader: ActivationStore, layers: list[int], plan: BatchPlan, rank: int, world: int):
        self.reader, self.layers, self.plan, self.rank, self.world = reader, layers, plan, rank, world

    def first_batches(self) -> Iterator[Tensor]:
        return iter_batches(self.reader, self.layers, self.plan)

    def batches(self, start: int) -> Iterator[Tensor]:
        return iter_batches(self.reader, self.layers, self.plan, start, self.rank, self.world)


def batch_source(
    train: TrainParams,
    stream: StreamSource | None,
    reader: ActivationStore,
    layers: list[int],
    ranks: Dist,
    device: torch.device,
    chunk_order: str = "shuffled",
    progress: bool = False,
) -> tuple[_StoreBatches | StreamBatches, int]:
    """(this rank's batch source, its step count: exact in store mode; in stream mode an estimate from
    the stored sample's share of usable tokens, which the learning-rate schedule and progress use)."""
    if train.source == "stream" and stream is None:
        raise ValueError("train.source: stream needs a StreamSource")
    split = check_store(stream.data if stream else None, train.source, reader.attrs)
    if stream is not None and train.source == "stream":
        model = load_model(stream.model, device)
        if (model.n_layers, model.d_model) != (reader.n_layers, reader.d_model):
            raise MlsaeError(
                f"model {stream.model}: {model.n_layers} blocks x d_model {model.d_model}, but the store holds "
                f"{reader.n_layers} x {reader.d_model}; rerun extract"
            )
        source = StreamBatches(
            stream.data,
            train,
            stream.extract,
            split,
            model,
            layers,
            reader.skip_first,
            ranks.rank,
            ranks.world,
            progress,
        )
        return source, source.expected_batches(float(reader.keep("train").mean()))
    excluded = ~reader.keep("train")  # special tokens, and position 0 when the store says skip_first
    plan = BatchPlan(
        excluded,
        reader.chunk_tokens,
        train.shuffle_buffer_tokens,
        train.batch_tokens,
        train.epochs,
        train.seed,
        chunk_order,
    )
    if plan.n_batches == 0:
        raise MlsaeError(
            f"train.batch_tokens: {train.batch_tokens} is more than the train split's usable tokens per "
            f"shuffle buffer; lower it or raise data.train_tokens / train.shuffle_buffer_tokens"
        )
    return _StoreBatches(reader, layers, plan, ranks.rank, ranks.world), plan.n_batches


def train(
    sae_params: SAEParams,
    train_params: TrainParams,
    lens_mode: str,
    reader: ActivationStore,
    lens: Lens,
    out_dir: Path,
    checkpoint_dir: Path,
    stream: StreamSource | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    snapshots: dict[int, Path] | None = None,
    chunk_order: str = "shuffled",
) -> tuple[dict, list[dict]]:
    """Train the MLSAE; write `out_dir` (sae.safetensors + config.json). Returns (metrics, history).

    Batches come from the store or, with `train.source: stream`, from the corpus through the model
    (`stream`, mlsae/data/stream.py). `lens_mode` is the `lens` param (recorded in the SAE config). `max_steps` stops early as if killed after that many steps (tests of resume).
    `snapshots` maps step numbers to directories where the SAE is also saved after that step (the
    convergence study: with a constant learning rate, the SAE after epoch e of a longer run is the
    SAE of an e-epoch run). `chunk_order="sequential"` visits the store's chunks in order (stream
    mode's order; the equivalence test).
    """
    ranks, device = init_distributed(train_params.device)
    lock = exclusive(Path(checkpoint_dir) / LOCK, str(checkpoint_dir)) if ranks.main else contextlib.nullcontext()
    with lock:
        return _train(
            sae_params,
            train_params,
            lens_mode,
            reader,
            lens,
            out_dir,
            checkpoint_dir,
            stream,
            progress,
            max_steps,
            snapshots,
            chunk_order,
            ranks,
            device,
        )


class _Steps:
    """SIGINT and SIGTERM that arrive during a step are held until the step (weights, optimiser,
    history, periodic checkpoint) is done, so an interrupted run stops between steps; outside a
    step they interrupt at once. Installed only in the main thread (signals are delivered there)."""

    def __init__(self) -> None:
        self.inside, self.pending = False, False
        self.saved: dict[int, object] = {}

    def __enter__(self) -> _Steps:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: object) -> None:
        if self.inside:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        self.inside = True
        try:
            yield
        finally:
            self.inside = False
        if self.pending:
            raise KeyboardInterrupt


def _train(
    sae_params: SAEParams,
    train_params: TrainParams,
    lens_mode: str,
    reader: ActivationStore,
    lens: Lens,
    out_dir: Path,
    checkpoint_dir: Path,
    stream: StreamSource | None,
    progress: bool,
    max_steps: int | None,
    snapshots: dict[int, Path] | None,
    chunk_order: str,
    ranks: Dist,
    device: torch.device,
) -> tuple[dict, list[dict]]:
    train_tokens = stream.data.train_tokens if stream is not None else reader.n_tokens("train")
    cfg = sae_config(sae_params, train_params, lens_mode, reader, train_tokens * train_params.epochs)
    layers = cfg.layers
    source, n_steps = batch_source(
        train_params, stream, reader, layers, ranks, device, chunk_order, progress and ranks.main
    )
    streaming = isinstance(source, StreamBatches)
    if cfg.auxk > 0 and cfg.auxk_coef > 0:
        check_dead_window(
            cfg.dead_tokens,
            n_steps * train_params.batch_tokens,
            f"{n_steps} steps x train.batch_tokens {train_params.batch_tokens}",
        )
    ckpt_path = checkpoint_dir / CHECKPOINT
    identity = identity_of(sae_params, train_params, lens, reader, stream if streaming else None, ranks.world)
    lens = lens.to(device)
    ckpt = load_checkpoint(ckpt_path, identity)

    torch.manual_seed(train_params.seed)
    sae = MLSAE(cfg).to(device)
    opt = make_optimizer(sae, train_params.lr)
    history: list[dict] = []
    start = 0
    if ckpt is not None:
        sae.load_state_dict(ckpt["sae"])
        opt.load_state_dict(ckpt["opt"])
        history, start = ckpt["history"], ckpt["step"]
    else:
        tokens = _first_tokens(source.first_batches(), layers, lens, train_params.geometric_median_sample, device)
        sae.init_center(tokens)
        normalised = sae.normalise(tokens)[0].reshape(-1, tokens.shape[-1])
        pick = torch.randperm(normalised.shape[0], generator=torch.Generator().manual_seed(train_params.seed))
        sae.init_b_pre(normalised[pick[: train_params.geometric_median_sample].to(device)])
    model: torch.nn.Module = sae
    if ranks.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            sae, device_ids=[device.index] if device.type == "cuda" else None
        )

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    bar = tqdm(
        total=n_steps,
        initial=start,
        desc="train" + (" (stream; total: estimated)" if streaming else ""),
        unit="step",
        disable=not (progress and ranks.main),
    )
    t0, vectors = time.perf_counter(), 0
    step, stopped = start, False
    if isinstance(source, StreamBatches):
        batches = source.batches(ckpt.get("stream") if ckpt is not None else None)
    else:
        batches = source.batches(start)
    saved = start

    def checkpoint(buffer: object = None) -> None:
        save_checkpoint(
            ckpt_path,
            {
                "version": CHECKPOINT_VERSION,
                "identity": identity,
                "step": step,
                "sae": sae.state_dict(),
                "opt": opt.state_dict(),
                "history": history,
                **({"stream": buffer} if streaming else {}),
            },
        )

    with _Steps() as steps:
        try:
            for x in batches:
                if max_steps is not None and step >= max_steps:
                    stopped = True
                    break
                x = lens(x.to(device, non_blocking=True), layers)
                for group in opt.param_groups:
                    group["lr"] = train_params.lr * lr_factor(
                        step, n_steps, train_params.lr_schedule, train_params.warmup_steps
                    )
                with steps.step():
                    try:
                        with autocast:
                            stats = train_step(model, opt, x, train_params.grad_clip)
                    except FloatingPointError as e:
                        # `step` steps are done: this is step `step + 1` in the history's 1-based numbering
                        kept = (
                            f"last good checkpoint kept at {ckpt_path}" if ckpt_path.is_file() else "no checkpoint yet"
                        )
                        raise MlsaeError(
                            f"{e} at step {step + 1}; {kept} (lower train.lr or set train.grad_clip)"
                        ) from None
                    step += 1
                    vectors += x.shape[0] * x.shape[1] * ranks.world
                    history.append(
                        {
                            "step": step,
                            **{k: stats[k] for k in ("loss", "fvu", "auxk", "l0", "dead_fraction")},
                            **{k: v for k, v in stats.items() if k.startswith("fvu_layer_")},
                        }
                    )
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{stats['loss']:.4f}", fvu=f"{stats['fvu']:.4f}", dead=f"{stats['dead_fraction']:.3f}"
                    )
                    if ranks.main and snapshots and step in snapshots:
                        with atomic_dir(snapshots[step]) as tmp:
                            sae.save(tmp)
                    if (
                        step % train_params.checkpoint_every == 0
                        or step == max_steps
                        or (not streaming and step == n_steps)
                    ):
                        # a collective under torchrun: every rank
                        buffer = source.state() if isinstance(source, StreamBatches) else None
                        if ranks.main:
                            checkpoint(buffer)
                            saved = step
        except KeyboardInterrupt:
            # between steps (see _Steps): weights, optimiser and history agree on `step`; a stream
            # buffer may be half filled, and under torchrun a save would need every rank: only a
            # single store-mode process checkpoints here
            if ranks.world == 1 and not streaming and step > saved:
                checkpoint()
            bar.close()
            raise
    bar.close()
    elapsed = time.perf_counter() - t0
    if stopped:
        return {}, history
    if ranks.main:
        sae.cpu()
        with atomic_dir(out_dir) as tmp:
            sae.save(tmp)
        ckpt_path.unlink(missing_ok=True)
    if ranks.world > 1:
        dist.barrier()
    model_tokens = source.total_model_tokens() if isinstance(source, StreamBatches) else None  # a collective
    if not ranks.main:  # only rank 0 reports: the stage writes metrics and plots only when given some
        return {}, history
    metrics = _metrics(history, cfg, train_params.batch_tokens, vectors / elapsed if elapsed > 0 and vectors else None)
    metrics["train_source"] = train_params.source
    if streaming:
        metrics["model_tokens"] = model_tokens
    return metrics, history


def _first_tokens(batches: Iterator[Tensor], layers: list[int], lens: Lens, n: int, device: torch.device) -> Tensor:
    """The first shuffled batches, at least `n` tokens of them, in lens space: (tokens, L, d). The
    layer centres (``sae.center: layer``) are their means; ``b_pre``'s geometric median is taken
    over `n` of their (token, layer) vectors."""
    rows, got = [], 0
    for x in batches:
        rows.append(x)
        got += x.shape[0]
        if got >= n:
            break
    if not rows:
        raise MlsaeError(
            "train.batch_tokens: no shuffle buffer holds a whole batch of usable tokens (special tokens "
            "and position 0 are left out); lower it or raise train.shuffle_buffer_tokens"
        )
    x = torch.cat(rows).to(device)
    return lens(x, layers)


def _metrics(history: list[dict], cfg: SAEConfig, batch_tokens: int, vectors_per_s: float | None) -> dict:
    tail = history[-max(1, len(history) // 10) :]
    by_layer = [float(np.mean([h[f"fvu_layer_{layer}"] for h in tail])) for layer in cfg.layers]
    return {
        "fvu": float(np.mean(by_layer)),
        "fvu_by_layer": by_layer,
        "loss": float(np.mean([h["loss"] for h in tail])),
        "l0": float(np.mean([h["l0"] for h in tail])),
        "dead_fraction": history[-1]["dead_fraction"] if history else None,
        "auxk_steps": sum(1 for h in history if h["auxk"] > 0),
        "vectors_per_s": vectors_per_s,
        "steps": len(history),
        "tokens": len(history) * batch_tokens,
        "n_latents": cfg.n_latents,
        "layers": cfg.layers,
    }
