"""Cost of the baseline and evaluate stages' splices against a clean forward, on the same tokens.

Arms, interleaved in every repeat (so that load from other processes hits all of them alike):

  clean       one clean forward per batch (LoadedModel.residuals: the blocks only, as extract runs
              them) -> seconds per token: the unit of the ratio.
  from-block  mlsae.evaluation.downstream.splice_sums on the same contexts (a SplicedSample of them):
              one clean forward that records every block's call, then for each SAE layer and each
              variant (--variants: evaluate's recon, the baseline stage's mean and, opt-in, zero) a
              rerun of the blocks after the spliced one, the final norm, the unembedding, CE and KL,
              summed per document.
  full        (--with-full) the previous path: a whole forward through the transformer-lens bridge
              per (layer, variant), with a hook replacing the block's output.

Printed: seconds per spliced (token, layer, variant) divided by seconds per clean-forward token,
from the median repeat and from the fastest one (the least disturbed on a shared machine). Issue
target: <= 0.8 (the full-forward path measured 1.6 on the default run).

    .venv/bin/python benchmarks/evaluate.py [--model smollm2-135m] [--contexts 8] [--context 128]

Allocator: the stages' setting (mlsae/core/allocator.py: large freed blocks are reused, not page-faulted
in afresh), which speeds up every arm; `MLSAE_MALLOC=default` measures under glibc's defaults.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlsae.core.allocator import keep_large_blocks
from mlsae.data import contexts, corpus
from mlsae.evaluation.downstream import Replacement, mean_ablation, splice_sums, zero_ablation
from mlsae.evaluation.reconstruction import reconstruction
from mlsae.evaluation.sample import SplicedSample
from mlsae.lens.tuned import Lens
from mlsae.models.registry import load_model
from mlsae.sae.model import MLSAE, SAEConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", type=int, default=8)  # evaluate.batch_size
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--with-full", action="store_true")
    ap.add_argument("--variants", default="recon,mean,zero", help="comma-separated: recon, mean, zero")
    args = ap.parse_args()
    variants = args.variants.split(",")
    allocator = "the stages' (mlsae/core/allocator.py)" if keep_large_blocks() else "glibc's defaults"
    print(f"allocator: {allocator}; MLSAE_MALLOC=default for glibc's")

    model = load_model(args.model, args.device)
    ctx = contexts.build_contexts(
        corpus.iter_documents("embedded:python-docs"), model.tokenizer, args.context, args.contexts
    )
    tokens, special = ctx.tokens, ctx.special
    sample = SplicedSample(
        contexts=np.arange(args.contexts), tokens=tokens, special=special, excluded=special, document=ctx.document
    )
    ids = torch.from_numpy(tokens.astype(np.int64))
    layers = list(range(model.n_layers))
    torch.manual_seed(0)
    sae = MLSAE(SAEConfig(d_model=model.d_model, n_latents=args.expansion * model.d_model, k=32, layers=layers)).eval()
    lens = Lens.identity(model.n_layers, model.d_model)
    means = torch.zeros(len(layers), model.d_model)
    every: dict[str, Replacement] = {
        "recon": reconstruction(sae, lens),
        "mean": mean_ablation(means),
        "zero": zero_ablation,
    }
    replacements = {name: every[name] for name in variants}
    n_tok = tokens.size

    def clean() -> float:
        t = time.perf_counter()
        model.residuals(ids)
        return time.perf_counter() - t

    def from_block() -> float:
        t = time.perf_counter()
        splice_sums(model, sample, layers, replacements, args.contexts, progress=False)
        return time.perf_counter() - t

    def full() -> float:
        t = time.perf_counter()
        for block in layers:
            for _ in variants:
                model.logits(ids, {block: torch.zeros_like})
        return time.perf_counter() - t

    arms = {"clean": clean, "from-block": from_block}
    if args.with_full:
        arms["full"] = full
    times: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(args.repeats + 1):
        for name, fn in arms.items():
            elapsed = fn()
            if repeat:  # the first repeat warms up
                times[name].append(elapsed)
    per_clean = {k: statistics.median(v) / n_tok for k, v in (("median", times["clean"]),)}
    splices = n_tok * len(layers) * len(variants)
    print(
        f"{args.model}: {args.contexts} x {args.context} tokens, {len(layers)} layers, variants {variants}, "
        f"device {args.device}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"clean forward: {1e3 * per_clean['median']:.3f} ms/token (median), "
        f"{1e3 * min(times['clean']) / n_tok:.3f} ms/token (fastest)"
    )
    for name in arms:
        if name == "clean":
            continue
        med = statistics.median(times[name]) / splices / per_clean["median"]
        best = min(times[name]) / splices / (min(times["clean"]) / n_tok)
        print(
            f"{name:>10}: {1e3 * statistics.median(times[name]) / splices:.3f} ms per spliced token-layer-variant; "
            f"ratio to a clean forward token: {med:.2f} (median), {best:.2f} (fastest)"
        )


if __name__ == "__main__":
    main()
