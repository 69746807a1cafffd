"""One prepared GPU check: proves the CUDA paths and projects the paper's run (issue #27).

    python3 benchmarks/gpu_check.py --device cuda            # on a GPU: paper shapes, <= 8 min on one H100
    python3 benchmarks/gpu_check.py --device cpu --small     # CI scale on CPU (make gpu-check), < 1 min

Writes `<out>/gpu_check.json` (every number, every check with its tolerance) and `<out>/gpu_check.md`
(the summary that docs/gpu.md carries), rewritten after every section so a run cut short keeps what
it measured; exits 1 when a check fails. Sections, each with a time budget:

  train_step   the MLSAE train step on the device (bf16 autocast on CUDA, as the train stage wraps it)
               against the same step on CPU in float32: same init, same data; FVU, AuxK, the TopK sets
               and the gradients agree within the tolerances below.
  throughput   the paper-shaped MLSAE (d 512, 32,768 latents, k 32, 6 layers) at 131,072 tokens x 6
               layers per step, or the largest batch that fits (tried downward on OOM, recorded), and at
               16,384 tokens (one rank's share of the paper's step on 8 GPUs): vectors/s and the fraction
               of the card's bf16 matmul FLOP/s measured in the same run, with no dead latent and with
               5 % dead (AuxK active); a torch profiler table of the top kernels (where the time goes).
  splice       evaluate's downstream sums (`splice_sums`, mlsae.models.splice) on the device against
               CPU, on a random-init Llama of SmolLM2-135M's exact shape; both float32, as evaluate runs.
  stream       a random-init GPT-NeoX of Pythia-70m's shape streams 2048-token contexts through the
               model and the SAE step together, as stream mode does (forward, the store's float16 cast
               on the host, shuffle, batch back to the device, step), at one rank's share of the
               paper's step; from that, the projected wall time of presets/paper.yaml (1B tokens) on
               one GPU and on 8.
  ddp          DistributedDataParallel over NCCL (gloo on CPU) with one process: the step equals the
               plain step, as tests/test_train.py's gloo test checks on CPU.

On CPU there is no CUDA to compare: the device-vs-CPU comparisons run the same CPU code path twice
(float32, no autocast: the train stage's CPU path) and say so in every section (`comparison`,
`cuda: false`); DDP runs over gloo. `--small` shrinks every shape so that this runs in CI.
Needs only torch, transformers, safetensors, numpy and mlsae's own imports; on the GPU image zarr and
three of its dependencies travel as wheels (benchmarks/gpu_wheels.sh; docs/gpu.md has the command).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import paper  # benchmarks/paper.py: the paper's shapes, its CPU projection
import train as train_bench  # benchmarks/train.py: residual-like data, matmul FLOP/s

from mlsae.core.allocator import keep_large_blocks
from mlsae.evaluation.downstream import SpliceSums, mean_ablation, splice_sums, zero_ablation
from mlsae.evaluation.reconstruction import reconstruction
from mlsae.evaluation.sample import SplicedSample
from mlsae.lens.tuned import Lens
from mlsae.models.registry import LoadedModel
from mlsae.models.splice import Splicer
from mlsae.sae.model import MLSAE, SAEConfig
from mlsae.sae.trainer import make_optimizer, train_step
from mlsae.stores.activations import from_storage, to_storage

PAPER_BATCH = 131072
"""Tokens per optimiser step in presets/paper.yaml (train.batch_tokens)."""
RANKS = 8
PAPER_DEAD_TOKENS = 10_000_000
DEAD_FRACTION = 0.05
LR = 1e-4
TARGET_FRACTION = 0.30
"""The issue's target: the train step at the paper's shape reaches this fraction of the card's bf16 FLOP/s."""
OOM = torch.OutOfMemoryError  # torch.cuda.OutOfMemoryError is the same class

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    tie_word_embeddings=True,
    hidden_act="silu",
)
"""SmolLM2-135M-Instruct's LlamaConfig fields (as the embedded GGUF converts to)."""


@dataclass(frozen=True)
class Shapes:
    label: str
    d: int
    n: int
    k: int
    layers: int
    auxk: int
    eq_tokens: int  # train_step: tokens of the compared batch
    candidates: tuple[int, ...]  # throughput: batch sizes (tokens) tried, largest first
    rank_tokens: int  # one rank's share of the paper's step on 8 GPUs
    timed_steps: int
    peak_side: int  # square matmul for the card's FLOP/s
    splice_model: dict
    splice_layers: tuple[int, ...]
    splice_expansion: int
    splice_contexts: int
    splice_tokens: int
    neox: dict  # overrides of paper.PYTHIA_70M ({}: Pythia-70m's exact shape)
    context: int
    fwd_contexts: int  # contexts per model forward (extract.batch_size)
    buffer_contexts: int  # contexts per shuffle buffer
    buffers: int  # timed buffers (one more runs first, untimed)
    ddp_tokens: int
    ddp_steps: int
    simulate_oom_above: int | None = None  # --small: batches above this raise OOM (exercises the fallback)
    budgets: dict = field(default_factory=dict)  # seconds per section


FULL = Shapes(
    label="paper (d 512, 32,768 latents, k 32, 6 layers; SmolLM2-135M and Pythia-70m shapes)",
    d=paper.D_MODEL,
    n=paper.EXPANSION * paper.D_MODEL,
    k=paper.K,
    layers=paper.N_LAYERS,
    auxk=256,
    eq_tokens=2048,
    candidates=(131072, 65536, 32768, 16384, 8192, 4096, 2048),
    rank_tokens=PAPER_BATCH // RANKS,
    timed_steps=5,
    peak_side=8192,
    splice_model=SMOLLM2_135M,
    splice_layers=(0, 14, 29),
    splice_expansion=16,
    splice_contexts=2,
    splice_tokens=256,
    neox={},
    context=paper.CONTEXT,
    fwd_contexts=32,
    buffer_contexts=32,
    buffers=2,
    ddp_tokens=4096,
    ddp_steps=2,
    budgets={"train_step": 60, "throughput": 150, "splice": 90, "stream": 90, "ddp": 60},
)
SMALL = Shapes(
    label="small (CI: d 64, 1,024 latents, k 8, 3 layers; scaled-down Llama and GPT-NeoX)",
    d=64,
    n=1024,
    k=8,
    layers=3,
    auxk=32,
    eq_tokens=256,
    candidates=(1024, 512),
    rank_tokens=256,
    timed_steps=3,
    peak_side=256,
    splice_model={
        **SMOLLM2_135M,
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 64,
    },
    splice_layers=(0, 3),
    splice_expansion=8,
    splice_contexts=2,
    splice_tokens=32,
    neox=dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
    ),
    context=64,
    fwd_contexts=4,
    buffer_contexts=8,
    buffers=1,
    ddp_tokens=128,
    ddp_steps=2,
    simulate_oom_above=512,
    budgets={"train_step": 30, "throughput": 30, "splice": 30, "stream": 30, "ddp": 30},
)

# ------------------------------------------------------------------------------------------------
# Tolerances

BF16 = {
    "topk_overlap_min": 0.95,
    "fvu_rel_max": 2e-3,
    "auxk_rel_max": 5e-3,
    "l0_rel_max": 0.01,
    "grad_cos_min": 0.999,
    "grad_norm_rel_max": 5e-3,
}
"""Device (bf16 autocast) vs CPU (float32). Under autocast the encoder product, the only dense one,
runs in bf16: its output keeps 8 significant bits (relative rounding 2^-9), so pre-activations
closer than that swap places around the k-th largest, and at 32,768 latents several fall within
one bf16 step of the k-th value (neighbouring order statistics there are about 1/(n·pdf) ≈ 0.005 σ
apart). So the TopK sets differ by a latent or two in some vectors; the swapped latents sit at the
threshold, where their values are small, so FVU, AuxK and the gradients move little. Calibration
(`--cpu-bf16`: CPU bf16 autocast against CPU float32, the paper's shape, 2,048 tokens x 6 layers,
both cases): TopK overlap 0.988 (63 % of vectors with identical sets), FVU relative difference
2.4e-5, AuxK 2.9e-4, gradient cosines >= 0.99995, norm differences <= 4e-4. Each bound is 4 to
100 times that, to absorb cuBLAS's other summation order; a real bug (a wrong cast, a dropped
term, a device mix-up) moves these by orders of magnitude more."""

SAME = {key: (1.0 - 1e-6 if key.endswith("_min") else 1e-5) for key in BF16}
"""The same float32 code path twice on one device (CPU runs, where no CUDA is there to compare):
deterministic kernels, so equal up to float32 summation order."""

SPLICE_TOL = {"logits_rel_max": 1e-3, "ce_clean_abs_max": 1e-3, "metric_abs_max": 2e-3}
"""Evaluate's splice, device vs CPU, both float32 (evaluate runs no autocast; TF32 stays off, torch's
default): logits differ by summation order only (~1e-6 relative; the bound is max|Δ| over std of the
logits), and a TopK swap at a near-tie of the SAE's float32 pre-activations (about 1e-4 of vectors) moves
one token's CE at one layer by far less than a nat; so per-token means (ΔCE and KL per layer and
variant, in nats) agree to well under the bound. On the random-init SmolLM2 shape (2 x 256 tokens)
the recon splice's KL is 0.06-0.12 nats/token per layer (measured on CPU), so the bound is 2-3 % of it."""

DDP_TOL = {"weight_rel_max": 1e-3, "metric_rel_max": 1e-4}
"""DDP with one process all-reduces one gradient (a sum over one rank, divided by one), so only
run-to-run nondeterminism of the device's reductions can separate it from the plain step: weight
differences after the steps, relative to how far the steps moved the weights, stay far below 1e-3
(bitwise equal on CPU)."""


# ------------------------------------------------------------------------------------------------
# Helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check(name: str, value: float, bound: float, kind: str, note: str = "") -> dict:
    """A check: `value` >= `bound` (kind "min") or <= `bound` (kind "max")."""
    ok = bool(math.isfinite(value)) and (value >= bound if kind == "min" else value <= bound)
    return {
        "name": name,
        "value": value,
        "tolerance": f"{'>=' if kind == 'min' else '<='} {bound:g}",
        "passed": ok,
        **({"note": note} if note else {}),
    }


def truth(name: str, ok: bool, value: Any = None, note: str = "") -> dict:
    return {
        "name": name,
        "value": value if value is not None else ok,
        "tolerance": "true",
        "passed": bool(ok),
        **({"note": note} if note else {}),
    }


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def sae_config(
    d: int,
    n: int,
    k: int,
    layers: list[int],
    auxk: int,
    dead_tokens: int = PAPER_DEAD_TOKENS,
    normalisation: str = "seed",
) -> SAEConfig:
    """The paper preset's SAE settings (auxk_coef 1/32, seed normalisation) at the given shape."""
    return SAEConfig(
        d_model=d,
        n_latents=n,
        k=k,
        layers=layers,
        auxk=auxk,
        auxk_coef=1 / 32,
        dead_tokens=dead_tokens,
        normalisation=normalisation,
        lens="none",
        model="gpu-check",
        params_hash="",
    )


def mark_dead(sae: MLSAE, fraction: float, seed: int = 0) -> None:
    """Make a fixed, seeded `fraction` of the latents dead (their counters at the dead window)."""
    n = sae.cfg.n_latents
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: round(fraction * n)]
    with torch.no_grad():
        sae.tokens_since_fired.zero_()
        sae.tokens_since_fired[idx.to(sae.tokens_since_fired.device)] = sae.cfg.dead_tokens


def set_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, |set(a) ∩ set(b)| / width for index rows a, b (N, width) of distinct entries."""
    if a.shape[-1] == 0:
        return torch.ones(a.shape[0])
    a, b = a.reshape(-1, a.shape[-1]).cpu().sort(-1).values, b.reshape(-1, b.shape[-1]).cpu().sort(-1).values
    pos = torch.searchsorted(b, a).clamp_max(b.shape[-1] - 1)
    return (b.gather(-1, pos) == a).float().mean(-1)


def grad_stats(g: torch.Tensor, ref: torch.Tensor) -> dict:
    g, ref = g.detach().double().flatten().cpu(), ref.detach().double().flatten().cpu()
    norm = float(ref.norm())
    return {
        "cos": float(g @ ref / (g.norm() * ref.norm()).clamp_min(1e-300)),
        "norm_rel": abs(float(g.norm()) - norm) / max(norm, 1e-300),
        "err_rel": float((g - ref).norm()) / max(norm, 1e-300),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_flops(vectors: int, d: int, n: int, k: int, n_aux: int) -> float:
    """A train step's useful matmul FLOPs (benchmarks/train.py's count): the dense encoder product
    2Vdn, plus 10Vkd for the decoder and the sparse gradients over the k active latents; AuxK adds
    its n_aux latents to the sparse part."""
    return 2.0 * vectors * d * n + 10.0 * vectors * (k + n_aux) * d


# ------------------------------------------------------------------------------------------------
# The run


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        if self.device.type == "cuda":
            self.device = torch.device(
                "cuda", torch.cuda.current_device() if self.device.index is None else self.device.index
            )
            torch.cuda.set_device(self.device)
        self.cuda = self.device.type == "cuda"
        self.shapes = SMALL if args.small else FULL
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.section_end = math.inf
        self.result: dict[str, Any] = {
            "script": "benchmarks/gpu_check.py",
            "argv": sys.argv[1:],
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "env": self.env(),
            "shapes": asdict(self.shapes),
            "cuda": self.cuda,
            "tolerances": {"train_step": self.tol, "splice": SPLICE_TOL, "ddp": DDP_TOL},
            "sections": {},
            "passed": False,
            "seconds": 0.0,
        }

    @property
    def tol(self) -> dict:
        return BF16 if (self.cuda or self.args.cpu_bf16) else SAME

    def autocast(self) -> contextlib.AbstractContextManager:
        """The train stage's autocast (mlsae/sae/trainer.py): bf16 on CUDA, none on CPU."""
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if self.args.cpu_bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def env(self) -> dict:
        import transformers

        env = {
            "device": str(self.device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "host_cpu": platform.processor() or platform.machine(),
        }
        if self.cuda:
            prop = torch.cuda.get_device_properties(self.device)
            env.update(
                gpu=prop.name,
                gpu_memory_gib=round(prop.total_memory / 2**30, 1),
                multiprocessors=prop.multi_processor_count,
                cuda=torch.version.cuda,
            )
            with contextlib.suppress(Exception):  # informational only: never stop the run for these
                version = torch.cuda.nccl.version()
                env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
            with contextlib.suppress(Exception):
                env["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        return env

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        """Seconds left in the current section's budget."""
        return self.section_end - time.perf_counter()

    def section(self, name: str, title: str, fn: Callable[[Run], dict]) -> None:
        budget = self.shapes.budgets[name]
        start = time.perf_counter()
        if self.elapsed() + 0.25 * budget > self.args.deadline_s:
            data: dict = {
                "error": f"skipped: {self.elapsed():.0f} s of the {self.args.deadline_s:.0f} s deadline used",
                "checks": [],
            }
        else:
            self.section_end = start + budget
            print(f"[{self.elapsed():6.1f} s] {name}: {title}", flush=True)
            try:
                data = fn(self)
            except Exception as e:
                data = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8), "checks": []}
            finally:
                gc.collect()
                if self.cuda:
                    torch.cuda.empty_cache()
        seconds = time.perf_counter() - start
        data = {
            "title": title,
            **data,
            "seconds": round(seconds, 2),
            "budget_s": budget,
            "within_budget": seconds <= budget,
        }
        data["passed"] = "error" not in data and bool(data["checks"]) and all(c["passed"] for c in data["checks"])
        self.result["sections"][name] = data
        for c in data["checks"]:
            if not c["passed"]:
                print(f"    FAILED {c['name']}: {c['value']} (tolerance {c['tolerance']})", flush=True)
        if "error" in data:
            print(f"    ERROR {data['error']}", flush=True)
        self.write()

    def write(self) -> None:
        self.result["seconds"] = round(self.elapsed(), 1)
        sections = self.result["sections"]
        self.result["passed"] = bool(sections) and all(s["passed"] for s in sections.values())
        try:
            summary = markdown(self.result)
        except Exception:
            summary = f"(the summary failed to render)\n\n```\n{traceback.format_exc()}```\n"
        for name, text in (("gpu_check.json", json.dumps(self.result, indent=1) + "\n"), ("gpu_check.md", summary)):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.out / name)


# ------------------------------------------------------------------------------------------------
# Sections


def comparison(run: Run, what: str) -> str:
    if run.cuda:
        return {
            "train": "CUDA (bf16 autocast, as the train stage) vs CPU (float32)",
            "splice": "CUDA (float32, as evaluate) vs CPU (float32)",
        }[what]
    if run.args.cpu_bf16 and what == "train":
        return "CPU bf16 autocast vs CPU float32 (--cpu-bf16: tolerance calibration; not a CUDA check)"
    return (
        "CPU vs CPU: the same CPU code path twice (float32, no autocast); no CUDA here, so this proves "
        "the script and the comparison run, not the CUDA path"
    )


def section_train_step(run: Run) -> dict:
    s, dev, tol = run.shapes, run.device, run.tol
    x = train_bench.make_data(1, s.eq_tokens, s.layers, s.d, seed=1)[0]  # float16, as the store gives it
    checks, cases = [], {}
    for case, dead in (("no dead latents", 0.0), ("5 % dead latents (AuxK active)", DEAD_FRACTION)):
        torch.manual_seed(0)
        ref = MLSAE(sae_config(s.d, s.n, s.k, list(range(s.layers)), s.auxk))
        ref.init_b_pre(ref.normalise(x)[0])
        mark_dead(ref, dead)
        arm = copy.deepcopy(ref).to(dev)
        ref_opt, arm_opt = make_optimizer(ref, LR), make_optimizer(arm, LR)
        xd = x.to(dev)
        with torch.no_grad():  # the step's own forward, repeated for its TopK sets (deterministic)
            ref_out = ref(x, auxk=True)
            with run.autocast():
                arm_out = arm(xd, auxk=True)
        ref_m = train_step(ref, ref_opt, x)
        with run.autocast():
            arm_m = train_step(arm, arm_opt, xd)
        sync(dev)
        overlap = set_overlap(arm_out.indices, ref_out.indices)
        grads = {
            name: grad_stats(getattr(arm, name).grad, getattr(ref, name).grad) for name in ("W_enc", "W_dec", "b_pre")
        }
        c = cases[case] = {
            "vectors": x.shape[0] * x.shape[1],
            "fvu": {"device": arm_m["fvu"], "cpu": ref_m["fvu"], "rel": rel(arm_m["fvu"], ref_m["fvu"])},
            "auxk": {"device": arm_m["auxk"], "cpu": ref_m["auxk"], "rel": rel(arm_m["auxk"], ref_m["auxk"])},
            "l0": {"device": arm_m["l0"], "cpu": ref_m["l0"]},
            "dead_fraction": {"device": arm_m["dead_fraction"], "cpu": ref_m["dead_fraction"]},
            "topk_overlap_mean": float(overlap.mean()),
            "topk_overlap_min": float(overlap.min()),
            "topk_identical_fraction": float((overlap == 1).float().mean()),
            "grads": grads,
        }
        tag = "AuxK" if dead else "plain"
        checks += [
            check(
                f"{tag}: TopK set overlap (mean over vectors)", c["topk_overlap_mean"], tol["topk_overlap_min"], "min"
            ),
            check(f"{tag}: FVU relative difference", c["fvu"]["rel"], tol["fvu_rel_max"], "max"),
            check(f"{tag}: L0 relative difference", rel(arm_m["l0"], ref_m["l0"]), tol["l0_rel_max"], "max"),
        ]
        for name, g in grads.items():
            checks += [
                check(f"{tag}: grad {name} cosine", g["cos"], tol["grad_cos_min"], "min"),
                check(f"{tag}: grad {name} norm relative difference", g["norm_rel"], tol["grad_norm_rel_max"], "max"),
            ]
        if dead:
            checks += [
                truth(
                    "AuxK: the AuxK loss is active on both",
                    arm_m["auxk"] > 0 and ref_m["auxk"] > 0,
                    note="5 % of latents dead, so the top-auxk dead latents reconstruct the error",
                ),
                check("AuxK: AuxK loss relative difference", c["auxk"]["rel"], tol["auxk_rel_max"], "max"),
            ]
        del ref, arm, ref_opt, arm_opt, ref_out, arm_out, xd
    return {
        "comparison": comparison(run, "train"),
        "cuda": run.cuda,
        "tolerance_set": "bf16" if tol is BF16 else "same-path",
        "cases": cases,
        "checks": checks,
    }


def measure(run: Run, sae: MLSAE, opt: torch.optim.Optimizer, tokens: int, dead: float) -> dict:
    """Time `run.shapes.timed_steps` train steps (after one untimed step) on a batch of `tokens`
    tokens x layers of random residuals; {"result": "ok", ...} or, if it does not fit, the reason."""
    s, dev = run.shapes, run.device
    if s.simulate_oom_above is not None and tokens > s.simulate_oom_above:
        return {
            "tokens": tokens,
            "result": f"OOM (simulated: --small caps the batch at {s.simulate_oom_above} "
            "tokens to exercise the downward search)",
        }
    failure = None
    try:
        if run.cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        x = torch.randn(tokens, s.layers, s.d, device=dev)
        times: list[float] = []
        metrics: dict = {}
        for i in range(1 + s.timed_steps):  # step 0: warm-up, and the test that it fits
            mark_dead(sae, dead)  # the same dead set before every step (firing revives latents)
            sync(dev)
            t = time.perf_counter()
            with run.autocast():
                metrics = train_step(sae, opt, x)
            sync(dev)
            if i:
                times.append(time.perf_counter() - t)
                if run.left() < 0:
                    break
        step = statistics.median(times)
        vectors = tokens * s.layers
        n_aux = min(s.auxk, round(dead * s.n)) if dead else 0
        out = {
            "tokens": tokens,
            "result": "ok",
            "vectors": vectors,
            "timed_steps": len(times),
            "step_s": step,
            "vectors_per_s": vectors / step,
            "tokens_per_s": tokens / step,
            "flop_per_step": step_flops(vectors, s.d, s.n, s.k, n_aux),
            "fvu": metrics["fvu"],
            "auxk": metrics["auxk"],
            "n_aux": n_aux,
        }
        if run.cuda:
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        return out
    except OOM as e:
        failure = "OOM: " + " ".join(str(e).split())[:160]
    except RuntimeError as e:
        message = " ".join(str(e).split())
        if "can't allocate memory" in message:  # the CPU allocator's OOM (--device cpu at full shapes)
            failure = "OOM: " + message[:160]
        else:  # e.g. a kernel's size limit: recorded, and a check fails on it
            failure = f"error: {type(e).__name__}: " + message[:300]
    x = None
    gc.collect()
    if run.cuda:
        torch.cuda.empty_cache()
    return {"tokens": tokens, "result": failure}


def profile_steps(
    run: Run, sae: MLSAE, opt: torch.optim.Optimizer, tokens: int, dead: float, steps: int = 2, rows: int = 12
) -> dict:
    """Where a step's time goes: torch profiler's top entries by self time on the device (the
    kernels, on CUDA) or on the CPU, per step."""
    from torch.profiler import ProfilerActivity, profile

    s, dev = run.shapes, run.device
    x = torch.randn(tokens, s.layers, s.d, device=dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            mark_dead(sae, dead)
            with run.autocast():
                train_step(sae, opt, x)
        sync(dev)
    events = list(prof.key_averages())
    names = ("self_device_time_total", "self_cuda_time_total") if run.cuda else ("self_cpu_time_total",)
    key = next((k for k in names if events and hasattr(events[0], k)), names[-1])  # older torch: cuda
    events = [e for e in events if getattr(e, key, 0) > 0]
    if not events:
        return {"tokens": tokens, "error": f"the profiler recorded no {key}"}
    total = sum(getattr(e, key) for e in events)
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:rows]
    return {
        "tokens": tokens,
        "steps": steps,
        "clock": "device (CUDA kernels)" if run.cuda else "CPU (ops)",
        "total_ms_per_step": total / 1e3 / steps,
        "top": [
            {
                "name": e.key[:90],
                "calls_per_step": e.count / steps,
                "ms_per_step": getattr(e, key) / 1e3 / steps,
                "share": getattr(e, key) / total,
            }
            for e in top
        ],
    }


def section_throughput(run: Run) -> dict:
    s, dev = run.shapes, run.device
    dtype = "bfloat16" if run.cuda else "float32"
    square = train_bench.matmul_flops(s.peak_side, s.peak_side, s.peak_side, dev, bf16=run.cuda)
    v_rank = s.rank_tokens * s.layers
    encoder = train_bench.matmul_flops(v_rank, s.d, s.n, dev, bf16=run.cuda)
    peak = max(square, encoder)  # the card's best measured matmul: the denominator of every fraction
    cases, checks, profiles = {}, [], {}
    for case, dead in (("no dead latents", 0.0), ("5 % dead latents (AuxK active)", DEAD_FRACTION)):
        torch.manual_seed(0)
        sae = MLSAE(sae_config(s.d, s.n, s.k, list(range(s.layers)), s.auxk)).to(dev)
        opt = make_optimizer(sae, LR)
        tried, largest = [], None
        for tokens in s.candidates:
            r = measure(run, sae, opt, tokens, dead)
            tried.append(r)
            if r["result"] == "ok":
                largest = r
                break
        rank = (
            largest
            if largest is None or largest["tokens"] == s.rank_tokens
            else measure(run, sae, opt, s.rank_tokens, dead)
        )
        c: dict[str, Any] = {
            "tried": [{"tokens": t["tokens"], "result": t["result"]} for t in tried],
            "largest": largest,
            "rank_batch": rank,
        }
        if largest is not None:
            c["paper_step_s"] = largest["step_s"] * PAPER_BATCH / largest["tokens"]  # linear in the batch
            c["fits_paper_batch"] = largest["tokens"] >= PAPER_BATCH
            for r in (largest, rank):
                if r is not None and r["result"] == "ok":
                    r["flop_fraction"] = r["flop_per_step"] / r["step_s"] / peak
            if run.left() > 0 or run.args.small:
                try:  # a profiler failure (CUPTI) must not lose the measurements above
                    profiles[case] = profile_steps(run, sae, opt, largest["tokens"], dead)
                except Exception as e:
                    profiles[case] = {"tokens": largest["tokens"], "error": f"{type(e).__name__}: {e}"}
        cases[case] = c
        tag = "AuxK" if dead else "plain"
        ok = [r for r in (largest, rank) if r is not None and r["result"] == "ok"]
        checks += [
            truth(f"{tag}: a batch fits", largest is not None, largest["tokens"] if largest else None),
            truth(
                f"{tag}: every batch tried ran or ran out of memory (no other error)",
                all(t["result"] == "ok" or t["result"].startswith("OOM") for t in tried + ([rank] if rank else [])),
            ),
            truth(f"{tag}: losses finite", bool(ok) and all(math.isfinite(r["fvu"]) for r in ok)),
        ]
        if dead:
            checks.append(
                truth("AuxK: the AuxK loss is active while timed", bool(ok) and all(r["auxk"] > 0 for r in ok))
            )
        del sae, opt
        gc.collect()
    headline = cases["no dead latents"].get("largest") or {}
    fraction = headline.get("flop_fraction")
    target = {
        "fraction": fraction,
        "target": TARGET_FRACTION,
        "applies": run.cuda and not run.args.small,
        "met": fraction is not None and fraction >= TARGET_FRACTION,
    }
    return {
        "cuda": run.cuda,
        "matmul_dtype": dtype,
        "peak_matmul_flops": peak,
        "square_matmul_flops": square,
        "square_matmul_shape": [s.peak_side] * 3,
        "encoder_matmul_flops": encoder,
        "encoder_matmul_shape": [v_rank, s.d, s.n],
        "cases": cases,
        "profiles": profiles,
        "target": target,
        "checks": checks,
    }


def _splice_metrics(sums: SpliceSums) -> dict:
    """Per-layer ΔCE and KL of every variant from the per-document sums (ratios of sums, as the
    baseline and evaluate stages compute them)."""
    n = float(sums.count.sum())
    ce_clean = float(sums.ce_clean.sum()) / n
    out: dict = {"ce_clean": ce_clean, "downstream_tokens": int(n)}
    for name, suffix in (("recon", ""), ("zero", "_zero"), ("mean", "_mean")):
        ce, kl = sums.variant(name)
        out[f"delta_ce{suffix}_by_layer"] = (ce.sum(0) / n - ce_clean).tolist()
        out[f"kl{suffix}_by_layer"] = (kl.sum(0) / n).tolist()
    return out


def section_splice(run: Run) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    s, dev = run.shapes, run.device
    cfg = LlamaConfig(**s.splice_model)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    n_layers, d, vocab, ctx = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.max_position_embeddings
    name = "smollm2-135m-shape" if s is FULL else "llama-small"

    def loaded(model: torch.nn.Module, device: torch.device) -> LoadedModel:
        return LoadedModel(name, "random", model, None, n_layers, d, ctx, vocab, device)

    cpu_model = loaded(hf, torch.device("cpu"))
    dev_model = loaded(copy.deepcopy(hf).to(dev), dev)
    tokens = np.random.default_rng(0).integers(0, vocab, (s.splice_contexts, s.splice_tokens))
    special = np.zeros(tokens.shape, dtype=bool)
    ids = torch.from_numpy(tokens)
    layers = list(s.splice_layers)
    resid = cpu_model.residuals(ids)[:, :, layers]  # (C, T, L, d)
    torch.manual_seed(1)
    sae = MLSAE(SAEConfig(d_model=d, n_latents=s.splice_expansion * d, k=s.k, layers=layers, model=name))
    sae.init_b_pre(sae.normalise(resid)[0])
    means = resid.mean(dim=(0, 1))
    # every context its own document; every position analysed (as evaluate with data.skip_first false)
    sample = SplicedSample(
        contexts=np.arange(len(tokens)),
        tokens=tokens,
        special=special,
        excluded=np.zeros(tokens.shape, dtype=bool),
        document=np.repeat(np.arange(len(tokens)), tokens.shape[1]).reshape(tokens.shape),
    )
    out, timing, logits = {}, {}, {}
    for label, model in (("cpu", cpu_model), ("device", dev_model)):
        t = time.perf_counter()
        variants = {
            "recon": reconstruction(copy.deepcopy(sae).to(model.device), Lens.identity(n_layers, d).to(model.device)),
            "zero": zero_ablation,
            "mean": mean_ablation(means.to(model.device)),
        }
        sums = splice_sums(model, sample, layers, variants, batch_size=s.splice_contexts, progress=False)
        sync(dev)
        timing[label] = time.perf_counter() - t
        out[label] = _splice_metrics(sums)
        logits[label] = Splicer(model).clean(ids).logits.cpu()
    ref, got = out["cpu"], out["device"]
    logits_rel = float((logits["device"] - logits["cpu"]).abs().max() / logits["cpu"].std())
    checks = [
        check("clean logits: max |difference| / std", logits_rel, SPLICE_TOL["logits_rel_max"], "max"),
        check(
            "clean CE (nats/token): |difference|",
            abs(got["ce_clean"] - ref["ce_clean"]),
            SPLICE_TOL["ce_clean_abs_max"],
            "max",
        ),
        truth(
            "the recon splice changes the output (KL > 0 at every layer)",
            min(ref["kl_by_layer"]) > 0,
            note="so the comparison is not of two unchanged forwards",
        ),
    ]
    diffs = {}
    for variant, suffix in (("recon", ""), ("zero", "_zero"), ("mean", "_mean")):
        for metric in ("delta_ce", "kl"):
            key = f"{metric}{suffix}_by_layer"
            diffs[key] = max(abs(a - b) for a, b in zip(got[key], ref[key]))
            checks.append(
                check(
                    f"{variant}: {metric} per layer (nats/token), max |difference|",
                    diffs[key],
                    SPLICE_TOL["metric_abs_max"],
                    "max",
                )
            )
    keep = (
        "ce_clean",
        "delta_ce_by_layer",
        "kl_by_layer",
        "delta_ce_zero_by_layer",
        "delta_ce_mean_by_layer",
        "downstream_tokens",
    )
    return {
        "comparison": comparison(run, "splice"),
        "cuda": run.cuda,
        "model": f"{name}: {n_layers} blocks, d_model {d}, vocab {vocab} (random init)",
        "sae_layers": layers,
        "sae_latents": sae.cfg.n_latents,
        "tokens": list(tokens.shape),
        "splice_seconds": timing,
        "max_differences": diffs,
        "metrics": {k: {"cpu": ref[k], "device": got[k]} for k in keep},
        "checks": checks,
    }


def section_stream(run: Run) -> dict:
    s, dev = run.shapes, run.device
    model = paper.pythia_70m_shape(dev, **s.neox)
    n_layers, d = model.n_layers, model.d_model
    torch.manual_seed(0)
    sae = MLSAE(sae_config(d, s.n, s.k, list(range(n_layers)), s.auxk)).to(dev)
    opt = make_optimizer(sae, LR)
    gen = np.random.default_rng(0)
    step_tokens = s.rank_tokens
    model_io = sae_time = 0.0
    tokens = steps = timed_buffers = 0
    fvu = []
    for b in range(1 + s.buffers):  # buffer 0 is the untimed warm-up
        ids = torch.from_numpy(gen.integers(0, model.vocab_size, (s.buffer_contexts, s.context)))
        sync(dev)
        t0 = time.perf_counter()
        parts = []
        for lo in range(0, s.buffer_contexts, s.fwd_contexts):  # stream mode's _residuals: forward, store cast
            resid = model.residuals(ids[lo : lo + s.fwd_contexts])
            parts.append(from_storage(to_storage(resid.reshape(-1, n_layers, d), "float16"), "float16"))
        data = torch.cat(parts)
        order = torch.from_numpy(np.random.default_rng([0, b]).permutation(len(data)))
        t1 = time.perf_counter()
        n_steps = len(data) // step_tokens
        for i in range(n_steps):  # stream mode's batches, and the train loop's step
            x = data[order[i * step_tokens : (i + 1) * step_tokens]].float().to(dev, non_blocking=True)
            with run.autocast():
                fvu.append(train_step(sae, opt, x)["fvu"])
        sync(dev)
        t2 = time.perf_counter()
        if b:
            model_io, sae_time = model_io + t1 - t0, sae_time + t2 - t1
            tokens, steps, timed_buffers = tokens + len(data), steps + n_steps, timed_buffers + 1
            if run.left() < 0:
                break
    c_model, c_loop_sae = model_io / tokens, sae_time / tokens
    loop = {
        "step_tokens": step_tokens,
        "tokens": tokens,
        "steps": steps,
        "buffers": timed_buffers,
        "model_tokens_per_s": 1 / c_model,
        "sae_tokens_per_s": 1 / c_loop_sae,
        "together_tokens_per_s": tokens / (model_io + sae_time),
        "model_share": model_io / (model_io + sae_time),
    }

    # The projection: per-token costs, from the loop (the model and the host round trip, the SAE
    # step at one rank's batch) and from the throughput section (the step at other batches, AuxK).
    tp = run.result["sections"].get("throughput", {}).get("cases", {})
    proj: dict[str, Any] = {
        "tokens": paper.TOKENS,
        "ranks": RANKS,
        "assumptions": [
            "per-token costs add: model forward + the store's float16 cast on the host + the SAE step",
            f"{RANKS} GPUs: each rank streams 1/{RANKS} of the tokens at one rank's batch "
            f"({PAPER_BATCH // RANKS:,} tokens) as measured here; the gradient all-reduce (two 16.8M-float "
            "matrices per step) and 8 ranks sharing the node's CPU cores for the host cast are not measured",
            "1 GPU: the SAE step at the paper's 131,072 tokens costs 131,072 / B times the largest batch B that fit",
            "the AuxK case keeps 5 % of latents dead throughout (the most AuxK costs at this dead fraction)",
        ],
    }
    for case in ("no dead latents", "5 % dead latents (AuxK active)"):
        c = tp.get(case, {})
        rank, largest = c.get("rank_batch"), c.get("largest")
        base = tp.get("no dead latents", {}).get("rank_batch")
        if not (rank and largest and base and rank.get("result") == "ok" and base.get("result") == "ok"):
            if case == "no dead latents":  # without the throughput section: the loop alone
                proj[case] = {
                    "one_gpu_h": paper.TOKENS * (c_model + c_loop_sae) / 3600,
                    f"{RANKS}_gpus_h": paper.TOKENS / RANKS * (c_model + c_loop_sae) / 3600,
                }
            continue
        c_copy = max(0.0, c_loop_sae - 1 / base["tokens_per_s"])  # the host->device batch copy, per token
        one = c_model + c_copy + 1 / largest["tokens_per_s"]
        eight = c_model + c_copy + 1 / rank["tokens_per_s"]
        proj[case] = {
            "one_gpu_h": paper.TOKENS * one / 3600,
            f"{RANKS}_gpus_h": paper.TOKENS / RANKS * eight / 3600,
            "one_gpu_sae_batch_measured": largest["tokens"],
            "fits_paper_batch_on_one_gpu": c.get("fits_paper_batch"),
            "seconds_per_token": {
                "model_and_host_cast": c_model,
                "batch_copy": c_copy,
                "sae_step_one_gpu": 1 / largest["tokens_per_s"],
                "sae_step_rank": 1 / rank["tokens_per_s"],
            },
        }
    checks = [
        truth("the model and the SAE step ran together", steps > 0, steps),
        truth("every streamed step's FVU is finite", all(math.isfinite(v) for v in fvu)),
        truth(
            "a projection for 1 and 8 GPUs",
            all(math.isfinite(v) for v in proj["no dead latents"].values() if isinstance(v, float)),
        ),
    ]
    return {
        "cuda": run.cuda,
        "model": f"{model.name}: {n_layers} blocks, d_model {d}, vocab {model.vocab_size}, "
        f"context {s.context} (random init)",
        "loop": loop,
        "projection": proj,
        "note": ""
        if s is FULL
        else "small shapes: the projection is arithmetic on the small model's rates, not the paper's run",
        "checks": checks,
    }


def section_ddp(run: Run) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    s, dev = run.shapes, run.device
    backend = "nccl" if run.cuda else "gloo"
    batches = [b.to(dev) for b in train_bench.make_data(s.ddp_steps, s.ddp_tokens, s.layers, s.d, seed=2)]
    torch.manual_seed(0)
    init = MLSAE(sae_config(s.d, s.n, s.k, list(range(s.layers)), s.auxk))
    init.init_b_pre(init.normalise(batches[0].cpu())[0])
    mark_dead(init, DEAD_FRACTION)  # AuxK on: its all-reduces of the dead counters run too
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised: the plain step would not be plain")
    plain = copy.deepcopy(init).to(dev)
    opt = make_optimizer(plain, LR)
    plain_m = []
    for x in batches:
        with run.autocast():
            plain_m.append(train_step(plain, opt, x))
    # one process, this machine's loopback (no network needed)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        used = dist.get_backend()
        core = copy.deepcopy(init).to(dev)
        model = DistributedDataParallel(core, device_ids=[dev.index] if run.cuda else None)
        opt = make_optimizer(core, LR)
        ddp_m = []
        for x in batches:
            with run.autocast():
                ddp_m.append(train_step(model, opt, x))
        sync(dev)
    finally:
        dist.destroy_process_group()
    weights = {}
    for name in ("W_enc", "W_dec", "b_pre"):
        a, b, w0 = getattr(core, name).detach().cpu(), getattr(plain, name).detach().cpu(), getattr(init, name).detach()
        weights[name] = {
            "bitwise_equal": bool(torch.equal(a, b)),
            "max_abs": float((a - b).abs().max()),
            "rel_to_update": float((a - b).norm() / (b - w0).norm().clamp_min(1e-30)),
        }
    metric_rel = max(rel(m[k], p[k]) for m, p in zip(ddp_m, plain_m) for k in ("loss", "fvu", "auxk"))
    checks = [truth(f"the process group runs {backend}", used == backend, used)]
    checks += [
        check(
            f"{name}: |DDP - plain| / |plain - init| after {len(batches)} steps",
            w["rel_to_update"],
            DDP_TOL["weight_rel_max"],
            "max",
        )
        for name, w in weights.items()
    ]
    checks += [
        check("loss, FVU, AuxK per step: max relative difference", metric_rel, DDP_TOL["metric_rel_max"], "max"),
        truth(
            "dead-latent counters equal",
            bool(torch.equal(core.tokens_since_fired.cpu(), plain.tokens_since_fired.cpu())),
        ),
        truth("AuxK active in every step", all(m["auxk"] > 0 for m in ddp_m)),
    ]
    return {
        "backend": used,
        "cuda": run.cuda,
        "world_size": 1,
        "comparison": (
            "DDP over NCCL, one process, vs the plain step"
            if run.cuda
            else "DDP over gloo (CPU), one process, vs the plain step; not NCCL"
        ),
        "steps": len(batches),
        "weights": weights,
        "metrics": {"plain": plain_m, "ddp": ddp_m},
        "checks": checks,
    }


SECTIONS: dict[str, tuple[str, Callable[[Run], dict]]] = {
    "train_step": ("Train step, device vs CPU", section_train_step),
    "throughput": ("Throughput of the paper-shaped MLSAE", section_throughput),
    "splice": ("Evaluate's splice, device vs CPU", section_splice),
    "stream": ("The paper's run, projected (model and SAE step together)", section_stream),
    "ddp": ("DDP with one process vs the plain step", section_ddp),
}


# ------------------------------------------------------------------------------------------------
# The summary


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.2e}"
    return str(v)


def markdown(r: dict) -> str:
    env, sec = r["env"], r["sections"]
    where = (
        f"{env.get('gpu')} ({env.get('gpu_memory_gib')} GiB), CUDA {env.get('cuda')}, NCCL {env.get('nccl')}"
        if r["cuda"]
        else f"CPU ({env['host_cpu']}, {env['cpu_count']} cores)"
    )
    lines = [
        f"## GPU check on {'CUDA' if r['cuda'] else 'CPU'}: {'PASSED' if r['passed'] else 'FAILED'}",
        "",
        f"`python3 benchmarks/gpu_check.py {' '.join(r['argv'])}` on {where}; torch {env['torch']}, transformers "
        f"{env['transformers']}, Python {env['python']}; {r['started']}; {r['seconds']:.0f} s in all. "
        f"Shapes: {r['shapes']['label']}.",
        "",
    ]
    if not r["cuda"]:
        lines += [
            "**A CPU run, not a CUDA check.** No GPU here: every device-vs-CPU comparison below runs the same "
            "CPU code path twice (float32, no autocast) with the same-path tolerances, and DDP runs over gloo, "
            "not NCCL. It proves that the script and its checks run.",
            "",
        ]
    for name in SECTIONS:
        if name not in sec:
            continue
        d = sec[name]
        lines += [
            f"### {d['title']}: {'passed' if d['passed'] else 'FAILED'} ({d['seconds']:.1f} s, budget {d['budget_s']} s)",
            "",
        ]
        if d.get("comparison"):
            lines += [f"Comparison: {d['comparison']}.", ""]
        if d.get("error"):
            lines += [f"Error: `{d['error']}`", ""]
        extra = {"throughput": _md_throughput, "stream": _md_stream, "splice": _md_splice}.get(name)
        if extra and "error" not in d:
            try:
                lines += extra(d, r)
            except Exception as e:
                lines += [f"(no details: {type(e).__name__}: {e})", ""]
        if d["checks"]:
            lines += ["| check | value | tolerance | ok |", "|---|---|---|---|"]
            lines += [
                f"| {c['name']} | {_fmt(c['value'])} | {c['tolerance']} | {'yes' if c['passed'] else '**NO**'} |"
                for c in d["checks"]
            ]
            lines.append("")
    return "\n".join(lines)


def _md_throughput(d: dict, r: dict) -> list[str]:
    unit = "TFLOP/s" if r["cuda"] else "GFLOP/s"
    scale = 1e12 if r["cuda"] else 1e9
    p = d["square_matmul_shape"][0]
    e = d["encoder_matmul_shape"]
    lines = [
        f"Measured {d['matmul_dtype']} matmul FLOP/s, in this run: {d['square_matmul_flops'] / scale:,.1f} {unit} "
        f"({p}×{p}×{p}); {d['encoder_matmul_flops'] / scale:,.1f} {unit} at the encoder's own shape "
        f"({e[0]:,}×{e[1]})·({e[1]}×{e[2]:,}). The fractions below divide by the larger, "
        f"{d['peak_matmul_flops'] / scale:,.1f} {unit}; a step's FLOPs count the dense encoder product (2Vdn) and "
        "the sparse decoder and gradients (10V(k + AuxK latents)d), as benchmarks/train.py does.",
        "",
        "| case | batch (tokens) | vectors/s | step (s) | 131,072-token step (s) | fraction of matmul FLOP/s | peak GPU memory (GiB) | batches tried |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, c in d["cases"].items():
        tried = ", ".join(
            f"{t['tokens']:,} {t['result'].split(':')[0].split(' (')[0]}"
            f"{' (simulated)' if 'simulated' in t['result'] else ''}"
            for t in c["tried"]
        )
        for label, m in (("largest that fit", c.get("largest")), ("one rank's share", c.get("rank_batch"))):
            if not m or m.get("result") != "ok":
                continue
            paper_step = f"{c['paper_step_s']:.3f}" if label == "largest that fit" else ""
            lines.append(
                f"| {case} ({label}) | {m['tokens']:,} | {m['vectors_per_s']:,.0f} | {m['step_s']:.4f} | "
                f"{paper_step} | {m.get('flop_fraction', float('nan')):.3f} | "
                f"{_fmt(m['peak_memory_gib']) if 'peak_memory_gib' in m else '–'} | {tried if label == 'largest that fit' else ''} |"
            )
            if c["largest"] is c.get("rank_batch"):
                break
    t = d["target"]
    lines.append("")
    if t["applies"]:
        lines.append(
            f"Target: at least {t['target']:.0%} of the card's bf16 FLOP/s at the paper's shape; reached "
            f"{_fmt(t['fraction'])}: {'met' if t['met'] else '**not met**; the profile below says where the time goes'}."
        )
    else:
        lines.append(
            f"(The {TARGET_FRACTION:.0%} target is for CUDA at the paper's shape; this run's fraction: {_fmt(t['fraction'])}.)"
        )
    lines.append("")
    for case, prof in d.get("profiles", {}).items():
        if "error" in prof:
            lines += [f"Profiler, {case}: `{prof['error']}`", ""]
            continue
        lines += [
            f"Where the time goes, {case}, {prof['tokens']:,} tokens (torch profiler, self time on the "
            f"{prof['clock']}, per step of {prof['total_ms_per_step']:.1f} ms):",
            "",
            "| kernel / op | calls per step | ms per step | share |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{t['name']}` | {t['calls_per_step']:g} | {t['ms_per_step']:.2f} | {t['share']:.1%} |"
            for t in prof["top"]
        ]
        lines.append("")
    return lines


def _md_splice(d: dict, r: dict) -> list[str]:
    m = d["metrics"]
    return [
        f"Model: {d['model']}; SAE: {d['sae_latents']:,} latents on blocks {d['sae_layers']}; "
        f"{d['tokens'][0]} contexts × {d['tokens'][1]} tokens. splice_sums took {d['splice_seconds']['cpu']:.1f} s on "
        f"CPU, {d['splice_seconds']['device']:.1f} s on the device. Clean CE {m['ce_clean']['cpu']:.4f} (CPU) vs "
        f"{m['ce_clean']['device']:.4f}; recon ΔCE by layer {[round(v, 4) for v in m['delta_ce_by_layer']['cpu']]} "
        f"(CPU) vs {[round(v, 4) for v in m['delta_ce_by_layer']['device']]}.",
        "",
    ]


def _md_stream(d: dict, r: dict) -> list[str]:
    lp, pj = d["loop"], d["projection"]
    lines = [
        f"Model: {d['model']}. Streamed {lp['tokens']:,} tokens in {lp['steps']} steps of {lp['step_tokens']:,} "
        f"tokens: {lp['together_tokens_per_s']:,.0f} tokens/s together (model and host cast alone "
        f"{lp['model_tokens_per_s']:,.0f} tokens/s, {lp['model_share']:.0%} of the time; SAE steps with their "
        f"batch copies {lp['sae_tokens_per_s']:,.0f} tokens/s).",
        "",
    ]
    if d.get("note"):
        lines += [f"*{d['note']}.*", ""]
    lines += ["| presets/paper.yaml, 1B tokens | one GPU | 8 GPUs |", "|---|---|---|"]
    for case in ("no dead latents", "5 % dead latents (AuxK active)"):
        p = pj.get(case)
        if p:
            lines.append(f"| {case} | {p['one_gpu_h']:,.2f} h | {p[f'{RANKS}_gpus_h']:,.2f} h |")
    fits = pj.get("no dead latents", {}).get("fits_paper_batch_on_one_gpu")
    if fits is False and r["cuda"]:
        lines += [
            "",
            f"The paper's 131,072-token step did not fit on this one GPU (largest: "
            f"{pj['no dead latents']['one_gpu_sae_batch_measured']:,} tokens): on one GPU the train stage "
            "needs a smaller `train.batch_tokens`; on 8 each rank takes 16,384.",
        ]
    lines += ["", "Assumptions: " + "; ".join(pj["assumptions"]) + ".", ""]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="CI shapes (under a minute on 2 CPU cores)")
    ap.add_argument("--out", default="runs/gpu-check", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=450.0,
        help="sections that would start this late are skipped (and fail): the run must end in 8 min",
    )
    ap.add_argument(
        "--cpu-bf16",
        action="store_true",
        help="on CPU, run the device arm of the train-step comparison under CPU bf16 autocast "
        "(calibrates the bf16 tolerances; not what the train stage does on CPU)",
    )
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here")
    keep_large_blocks()  # as the stages run (mlsae/core/allocator.py)
    run = Run(args)
    for name in args.sections:
        title, fn = SECTIONS[name]
        run.section(name, title, fn)
    run.write()
    print(
        f"[{run.elapsed():6.1f} s] {'PASSED' if run.result['passed'] else 'FAILED'}: "
        f"{run.out / 'gpu_check.json'}, {run.out / 'gpu_check.md'}",
        flush=True,
    )
    return 0 if run.result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
