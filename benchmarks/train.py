"""Throughput of the MLSAE training step against a plain dense-autograd TopK SAE, with and
without dead latents (AuxK).

The arms start from the same weights, see the same batches and use the same Adam, decoder
constraints and per-vector normalisation (`vector`: the dense reference's); they differ only in how
the step is computed:

  sparse       mlsae.sae.trainer.train_step: dense encoder matmul, then gathers / index_add over
               the k active latents for the decoder and for every gradient. No latent is dead
               (dead_tokens is far beyond the run), so the AuxK term is zero.
  sparse 5%    the same step with a seeded 5 % of the latents dead (their tokens_since_fired set
  dead         past dead_tokens before every step, so a latent that fires stays dead): AuxK acts,
               multiplying by the dead latents' encoder rows only (mlsae.sae.kernels.dead_topk) and
               decoding the top-auxk of them.
  dense        full matmul encoder, TopK mask into a dense (N, n_latents) code, dense matmul
               decoder, plain autograd backward (no AuxK).

FLOPs: a step's useful work is counted as matmul multiply-adds x 2 (V vectors, d_model d, n latents,
k active): sparse 2Vdn (the dense encoder product) + 10Vkd (the decoder forward and its two
gradients, and the encoder's weight and input gradients over the k active latents; the input
gradient feeds b_pre); with n_dead dead latents and a = min(auxk, n_dead), AuxK adds 2Vd n_dead (the
dead rows' product) + 10Vad (the same five products over the a AuxK latents); dense 12Vdn (the six
products over all n latents). Each arm's achieved FLOP/s is printed as a fraction of the machine's
measured FLOP/s on the encoder's own (V x d) @ (d x n) matmul, timed in the same run; the
dead/no-dead step-time ratio is printed next to its FLOP floor (the ratio of the two arms' FLOPs).

Guard: the script exits 1 when the sparse (no-dead) step is less than --min-ratio (3.7) times
faster than the dense reference's (median step), or when the held-out FVU is not finite.

Data: sparse positive combinations of random unit atoms plus noise, with a per-layer scale and
offset, so that FVU falls during the run.

    .venv/bin/python benchmarks/train.py [--steps 20] [--tokens 512] [--layers 4] [--device cuda]

Allocator: the stages' setting (mlsae/core/allocator.py: large freed blocks are reused, not page-faulted
in afresh), which speeds up every arm; `MLSAE_MALLOC=default` measures under glibc's defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlsae.core.allocator import keep_large_blocks
from mlsae.sae.model import MLSAE, SAEConfig
from mlsae.sae.trainer import make_optimizer, train_step


class DenseTopKSAE(nn.Module):
    """The textbook dense TopK SAE, starting from a copy of an MLSAE's weights."""

    def __init__(self, sae: MLSAE) -> None:
        super().__init__()
        self.k = sae.cfg.k
        self.W_enc = nn.Parameter(sae.W_enc.detach().clone())
        self.W_dec = nn.Parameter(sae.W_dec.detach().clone().contiguous())
        self.b_pre = nn.Parameter(sae.b_pre.detach().clone())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (normalised input, reconstruction in the normalised space), both (B, L, d)."""
        x = x.float()
        xn = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
        z = (xn - self.b_pre) @ self.W_enc.T
        values, indices = z.topk(self.k, dim=-1)
        code = torch.zeros_like(z).scatter(-1, indices, values.relu())
        return xn, code @ self.W_dec.T + self.b_pre


def fvu(xn: Tensor, xn_hat: Tensor) -> Tensor:
    """Mean over layers of Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the batch."""
    err = (xn - xn_hat).float().pow(2).sum(dim=(0, 2))
    total = (xn - xn.mean(0, keepdim=True)).float().pow(2).sum(dim=(0, 2))
    return (err / total).mean()


def dense_step(model: DenseTopKSAE, opt: torch.optim.Optimizer, x: Tensor) -> float:
    """One step of the dense baseline with the same decoder constraints as the MLSAE."""
    loss = fvu(*model(x))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        w, g = model.W_dec, model.W_dec.grad
        g -= w * (g * w).sum(0)
    opt.step()
    with torch.no_grad():
        model.W_dec /= model.W_dec.norm(dim=0)
    return float(loss.detach())


def make_data(n_batches: int, tokens: int, layers: int, d: int, seed: int) -> list[Tensor]:
    """Batches of (tokens, layers, d) float16 residual-like vectors."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(4 * d, d, generator=gen), dim=1)
    scale = 1 + torch.arange(layers).float()[:, None]
    offset = torch.randn(layers, d, generator=gen)
    batches = []
    for _ in range(n_batches):
        coef = torch.rand(tokens * layers, atoms.shape[0], generator=gen)
        coef = coef * (coef > 0.99)  # ~1 % of atoms active per vector
        x = (coef @ atoms).reshape(tokens, layers, d) + 0.05 * torch.randn(tokens, layers, d, generator=gen)
        batches.append((x * scale + offset).half())
    return batches


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_flops(rows: int, inner: int, cols: int, device: torch.device, bf16: bool, repeats: int = 7) -> float:
    """FLOP/s of one (rows x inner) @ (inner x cols) matmul on `device` (median of `repeats`)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(rows, inner, device=device, dtype=dtype)
    b = torch.randn(inner, cols, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * rows * inner * cols / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per arm")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per arm before timing")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per batch")
    ap.add_argument("--layers", type=int, default=4, help="layers per token (vectors = tokens × layers)")
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 autocast)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave the default)")
    ap.add_argument("--dead", type=float, default=0.05, help="share of latents dead in the AuxK arm")
    ap.add_argument("--auxk", type=int, default=256, help="sae.auxk of every sparse arm")
    ap.add_argument(
        "--min-ratio", type=float, default=3.7, help="exit 1 below this sparse/dense speed ratio (median step)"
    )
    args = ap.parse_args()
    allocator = "the stages' (mlsae/core/allocator.py)" if keep_large_blocks() else "glibc's defaults"
    print(f"allocator: {allocator}; MLSAE_MALLOC=default for glibc's")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    d, n = args.d_model, args.expansion * args.d_model
    vectors = args.tokens * args.layers
    print(
        f"d_model {d}, n_latents {n}, k {args.k}, batch {args.tokens} tokens x {args.layers} layers"
        f" = {vectors} vectors, {args.steps} timed steps, device {device}"
        f"{' (bf16 autocast)' if bf16 else ''}, threads {torch.get_num_threads()}"
    )
    batches = make_data(args.warmup + args.steps + 1, args.tokens, args.layers, d, args.seed)
    batches = [b.to(device) for b in batches]
    train, held_out = batches[:-1], batches[-1]

    # dead_tokens beyond any run: no latent dies by itself; the dead arm's are set dead by hand
    dead_tokens = 10**12
    torch.manual_seed(args.seed)
    cfg = SAEConfig(
        d_model=d,
        n_latents=n,
        k=args.k,
        layers=list(range(args.layers)),
        auxk=args.auxk,
        dead_tokens=dead_tokens,
        normalisation="vector",
    )
    sae = MLSAE(cfg).to(device)
    sae.init_b_pre(sae.normalise(torch.cat(train[:2]).float())[0])
    sae_dead = copy.deepcopy(sae)
    n_dead = max(1, round(args.dead * n))
    dead_ids = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))[:n_dead].to(device)
    n_aux = min(args.auxk, n_dead)
    dense = DenseTopKSAE(sae)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # The arms alternate step by step so that load from other processes hits both alike.
    sparse_opt, dead_opt, dense_opt = (make_optimizer(m, args.lr) for m in (sae, sae_dead, dense))
    auxk_seen: list[float] = []

    def kill() -> None:
        """Set the chosen latents dead again (one that fired during the last step would be alive)."""
        with torch.no_grad():
            sae_dead.tokens_since_fired[dead_ids] = dead_tokens

    def dead_step(x: Tensor) -> float:
        stats = train_step(sae_dead, dead_opt, x)
        auxk_seen.append(stats["auxk"])
        return stats["fvu"]

    arms = {
        "sparse": lambda x: train_step(sae, sparse_opt, x)["fvu"],
        "sparse_dead": dead_step,
        "dense": lambda x: dense_step(dense, dense_opt, x),
    }
    before = {"sparse_dead": kill}
    times: dict[str, list[float]] = {name: [] for name in arms}
    last = {name: math.nan for name in arms}
    peak_rss = {}
    with autocast:
        for name, step in arms.items():  # warm-up, one arm after the other, to see each one's peak RSS
            for x in train[: args.warmup]:
                before.get(name, lambda: None)()
                step(x)
            peak_rss[name] = peak_rss_mib()
        for x in train[args.warmup :]:
            for name, step in arms.items():
                before.get(name, lambda: None)()
                assert name != "sparse_dead" or int(sae_dead.dead_mask().sum()) == n_dead
                sync()
                start = time.perf_counter()
                last[name] = step(x)
                sync()
                times[name].append(time.perf_counter() - start)
    assert all(a > 0 for a in auxk_seen) and not any(sae.dead_mask()), "the arms are not what they claim"
    median = {name: vectors / statistics.median(t) for name, t in times.items()}
    step_time = {name: statistics.median(t) for name, t in times.items()}
    sparse_flops = 2 * vectors * d * n + 10 * vectors * args.k * d
    step_flops = {
        "sparse": sparse_flops,
        "sparse_dead": sparse_flops + 2 * vectors * d * n_dead + 10 * vectors * n_aux * d,
        "dense": 12 * vectors * d * n,
    }
    peak_flops = matmul_flops(vectors, d, n, device, bf16)
    achieved = {name: step_flops[name] / statistics.median(t) for name, t in times.items()}
    overall = {name: vectors * len(t) / sum(t) for name, t in times.items()}

    with torch.no_grad(), autocast:
        out = sae(held_out)
        sparse_eval = float(fvu(out.xn, out.xn_hat))
        out = sae_dead(held_out)
        dead_eval = float(fvu(out.xn, out.xn_hat))
        dense_eval = float(fvu(*dense(held_out)))

    rows = [
        ("step time, ms (median)", {k: 1e3 * v for k, v in step_time.items()}, ".1f"),
        ("vectors/s (median step)", median, ".0f"),
        ("vectors/s (all steps)", overall, ".0f"),
        ("last train-step FVU", last, ".4f"),
        ("held-out FVU", {"sparse": sparse_eval, "sparse_dead": dead_eval, "dense": dense_eval}, ".4f"),
        ("peak RSS (MiB)", peak_rss, ".0f"),
        ("GFLOP per step", {k: v / 1e9 for k, v in step_flops.items()}, ".2f"),
        ("GFLOP/s achieved (median)", {k: v / 1e9 for k, v in achieved.items()}, ".1f"),
        ("fraction of matmul FLOP/s", {k: v / peak_flops for k, v in achieved.items()}, ".2f"),
    ]
    columns = {
        "sparse": "sparse (mlsae)",
        "sparse_dead": f"sparse {100 * n_dead / n:.0f}% dead",
        "dense": "dense autograd",
    }
    print(f"{'':26}" + "".join(f"{title:>18}" for title in columns.values()))
    for label, value, fmt in rows:
        print(f"{label:26}" + "".join(f"{value[name]:18{fmt}}" for name in columns))
    ratio, ratio_all = median["sparse"] / median["dense"], overall["sparse"] / overall["dense"]
    print(f"measured matmul ({vectors} x {d}) @ ({d} x {n}): {peak_flops / 1e9:.1f} GFLOP/s")
    print(
        f"speed ratio sparse/dense: {ratio:.2f}x median step, {ratio_all:.2f}x all steps (guard >= "
        f"{args.min_ratio}x); FLOP floor of the ratio: {step_flops['dense'] / step_flops['sparse']:.2f}x"
    )
    dead_ratio = step_time["sparse_dead"] / step_time["sparse"]
    floor = step_flops["sparse_dead"] / step_flops["sparse"]
    print(
        f"AuxK ({n_dead} dead latents, {n_aux} used): step time {1e3 * step_time['sparse_dead']:.1f} ms vs "
        f"{1e3 * step_time['sparse']:.1f} ms without dead latents, ratio {dead_ratio:.2f}x; its FLOP floor "
        f"{floor:.3f}x (the measured ratio is {dead_ratio / floor:.2f}x the floor); fraction of matmul FLOP/s "
        f"{achieved['sparse_dead'] / peak_flops:.2f} dead vs {achieved['sparse'] / peak_flops:.2f} no-dead"
    )
    rel = abs(sparse_eval - dense_eval) / dense_eval
    print(f"held-out FVU relative difference: {100 * rel:.2f}% (target within 2%)")
    if device.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(
        f"(peak RSS is the process's high-water mark after each arm's warm-up, in the order of the"
        f" columns; current RSS {psutil.Process().memory_info().rss / 2**20:.0f} MiB)"
    )
    if not math.isfinite(rel) or not math.isfinite(dead_eval):
        sys.exit(1)
    if ratio < args.min_ratio:
        print(f"FAIL: the sparse step is {ratio:.2f}x the dense reference's speed, below {args.min_ratio}x")
        sys.exit(1)


if __name__ == "__main__":
    main()
