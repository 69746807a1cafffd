"""Projected wall time of the paper's main run (presets/paper.yaml) from throughput measured here.

The run streams 1B tokens of context 2048 through Pythia-70m-deduped (6 blocks, d_model 512) into
an MLSAE of 64 x 512 = 32,768 latents, k 32, all 6 blocks (131,072 tokens per step). Its cost per
token is one model forward (stream mode runs the model while it trains) plus one SAE step on 6
vectors. This script measures both on `--device`:

  model   a GPT-NeoX with Pythia-70m's exact shape (random weights, built in-process: the same
          FLOPs as the real model, no hub access needed), `LoadedModel.residuals` on whole
          2048-token contexts: tokens/s.
  sae     `train_step` of the paper-shaped MLSAE (Adam) on batches of `--sae-tokens` tokens x 6
          blocks: vectors/s, with no latent dead (AuxK idle) and with every latent dead (AuxK's
          top-256 over all of them: the most it can cost). The step cost is linear in the batch,
          so the paper's 131,072-token step costs 131,072 / sae-tokens times one of these.

and prints the projected time for 1B tokens on this device: model + SAE, run one after the other
as stream mode does, and divided by N for N data-parallel ranks (each streams its own slice).

    .venv/bin/python benchmarks/paper.py [--device cpu] [--sae-tokens 256] [--ranks 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlsae.core.allocator import keep_large_blocks
from mlsae.models.registry import LoadedModel
from mlsae.sae.model import MLSAE, SAEConfig
from mlsae.sae.trainer import make_optimizer, train_step

TOKENS = 1_000_000_000
CONTEXT = 2048
N_LAYERS, D_MODEL, EXPANSION, K = 6, 512, 64, 32


PYTHIA_70M = dict(
    vocab_size=50304,
    hidden_size=D_MODEL,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=8,
    intermediate_size=2048,
    max_position_embeddings=CONTEXT,
)
"""Pythia-70m(-deduped)'s GPT-NeoX config fields (with rotary_pct 0.25, parallel residual, untied unembedding)."""


def pythia_70m_shape(device: torch.device, **shape: int) -> LoadedModel:
    """A random-init GPT-NeoX of Pythia-70m's exact shape on `device`; `shape` overrides fields of
    PYTHIA_70M (benchmarks/gpu_check.py --small builds a scaled-down one)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    fields = {**PYTHIA_70M, **shape}
    config = GPTNeoXConfig(**fields, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).eval().requires_grad_(False).to(device)
    name = "pythia-70m-shape" if not shape else "gpt-neox-small"
    return LoadedModel(
        name,
        "random",
        model,
        None,
        fields["num_hidden_layers"],
        fields["hidden_size"],
        fields["max_position_embeddings"],
        fields["vocab_size"],
        device,
    )


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--contexts", type=int, default=1, help="2048-token contexts per model forward")
    ap.add_argument("--sae-tokens", type=int, default=256, help="tokens per measured SAE step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=8, help="data-parallel ranks for the last line")
    args = ap.parse_args()
    keep_large_blocks()  # as the stages run (mlsae/core/stage.py); MLSAE_MALLOC=default: glibc's
    device = torch.device(args.device)

    model = pythia_70m_shape(device)
    ids = torch.randint(0, 50304, (args.contexts, CONTEXT))
    t_model = timed(lambda: model.residuals(ids), args.repeats)
    model_tps = ids.numel() / t_model
    model = None  # free its memory before the SAE's

    sae_tps = {}
    for case, dead_tokens in (("no dead latents", 10**12), ("every latent dead (AuxK on all)", 1)):
        cfg = SAEConfig(
            d_model=D_MODEL,
            n_latents=EXPANSION * D_MODEL,
            k=K,
            layers=list(range(N_LAYERS)),
            auxk=256,
            auxk_coef=1 / 32,
            dead_tokens=dead_tokens,
            normalisation="seed",
            lens="none",
            model="pythia-70m-deduped",
            params_hash="",
        )
        torch.manual_seed(0)
        sae = MLSAE(cfg).to(device)
        opt = make_optimizer(sae, 1e-4)
        x = torch.randn(args.sae_tokens, N_LAYERS, D_MODEL, device=device)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device.type == "cuda"
            else torch.autocast("cpu", enabled=False)
        )

        def step() -> None:
            with autocast:
                train_step(sae, opt, x)

        step()  # after one step the dead counters say which latents are dead
        sae_tps[case] = args.sae_tokens / timed(step, args.repeats)

    print(f"device {device}: model forward {model_tps:,.0f} tokens/s ({CONTEXT}-token contexts)")
    for case, tps in sae_tps.items():
        total = TOKENS * (1 / model_tps + 1 / tps)
        print(
            f"SAE step, {case}: {tps * N_LAYERS:,.0f} vectors/s = {tps:,.0f} tokens/s "
            f"(the paper's 131,072-token step: {131072 / tps:,.1f} s)"
        )
        print(
            f"  stream mode, 1B tokens, one process: {total / 3600:,.1f} h ({total / 86400:,.2f} days) = "
            f"model {TOKENS / model_tps / 3600:,.1f} h + SAE {TOKENS / tps / 3600:,.1f} h; "
            f"{args.ranks} data-parallel ranks like this one: {total / args.ranks / 3600:,.1f} h"
        )


if __name__ == "__main__":
    main()
