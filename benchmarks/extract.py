"""Throughput of the extract stage against a plain Hugging Face forward pass, on the same tokens.

Arms, interleaved in every repeat (so that load from other processes hits all of them alike):

  extract()   mlsae.data.extract.extract on a fresh store in a temporary directory: tokenisation,
              the forward passes, float16 conversion, the sharded Zarr writes and the
              adjacent-cosine metric; the model is loaded once beforehand and not timed.
  residuals   LoadedModel.residuals + conversion to the storage dtype, batch by batch (the
              compute part of extract, nothing else).
  plain HF    hf_model(ids, output_hidden_states=True) on a second, separately loaded copy of
              the model that the transformer-lens bridge never wrapped (full model, logits).
  bridge      (--with-bridge) transformer-lens's run_with_hooks reading blocks.{i}.hook_resid_post
              (+ the same conversion): the path extract took before it read the HF model's
              decoder-layer outputs with plain forward hooks.

The tokens are the contexts extract() itself stores (`--contexts` x `--context` tokens of
`embedded:python-docs`), fed in batches of `--batch-size` contexts to every arm. One warm-up
repeat, then `--repeats` timed ones. Prints tokens/s per arm (from the median time) and the
ratios to plain HF from the median and from the fastest repeat (the least disturbed by other
processes on a shared machine).

    .venv/bin/python benchmarks/extract.py [--model smollm2-135m] [--contexts 16] [--context 128]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlsae.core.params import parse_params
from mlsae.core.paths import TOKENS
from mlsae.data import extract as extract_mod
from mlsae.models.registry import LoadedModel, _load_gguf, _load_hf, classify, embedded_gguf, load_model
from mlsae.stores import activations as store


def plain_copy(name: str) -> torch.nn.Module:
    """A second copy of the model, loaded the same way but never wrapped by the bridge."""
    kind, target = classify(name)
    if kind == "embedded":
        model = _load_gguf(embedded_gguf())[0]
    elif kind == "gguf":
        model = _load_gguf(Path(target))[0]
    elif kind == "tiny":
        from mlsae.models.tiny import build_tiny

        model = build_tiny(target)[0]
    else:
        model = _load_hf(target, local=kind == "local")[0]
    return model.eval().requires_grad_(False)


def bridge_residuals(model: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """The residuals read through transformer-lens hooks (the bridge path)."""
    out: list[torch.Tensor] = []

    def grab(tensor: torch.Tensor, hook: object) -> None:
        out.append(tensor)

    hooks = [(model.hook(i), grab) for i in range(model.n_layers)]
    with torch.inference_mode():
        model.bridge.run_with_hooks(ids, fwd_hooks=hooks, return_type=None)
    return torch.stack(out, dim=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--with-bridge", action="store_true", help="also time the bridge-hook path")
    args = ap.parse_args()

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load_model(args.model, "cpu")
    hf = plain_copy(args.model)
    print(
        f"model {args.model}: {model.n_layers} layers, d_model {model.d_model}; "
        f"both copies loaded in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}"
    )

    tokens = args.contexts * args.context
    p = parse_params(
        {
            "model": args.model,
            "data": {
                "source": "embedded:python-docs",
                "seed": 0,
                "context": args.context,
                "train_tokens": tokens - args.context,
                "eval_tokens": args.context,
            },
            "extract": {"dtype": args.dtype, "batch_size": args.batch_size, "device": "cpu"},
        }
    )

    tmp = Path(tempfile.mkdtemp(prefix="mlsae-bench-"))
    run_no = iter(range(1 << 30))

    def run_extract() -> torch.Tensor:
        out = tmp / f"run{next(run_no)}.zarr"
        with mock.patch.object(extract_mod, "load_model", lambda *a, **k: model):
            extract_mod.extract(p.model, p.data, p.extract, p.train.source, str(out), progress=False)
        root = store.open_root(str(out))
        return (
            torch.from_numpy(__import__("numpy").concatenate([root[s][TOKENS][:] for s in ("train", "eval")]))
            .long()
            .reshape(-1, args.context)
        )

    ids = run_extract()  # the exact tokens extract stores; also a first warm-up
    assert ids.shape == (args.contexts, args.context), ids.shape
    batches = list(ids.split(args.batch_size))

    def run_residuals() -> None:
        for b in batches:
            store.to_storage(model.residuals(b).reshape(-1, model.n_layers, model.d_model), args.dtype)

    def run_plain() -> None:
        with torch.inference_mode():
            for b in batches:
                hf(b, output_hidden_states=True)

    def run_bridge() -> None:
        for b in batches:
            store.to_storage(bridge_residuals(model, b).reshape(-1, model.n_layers, model.d_model), args.dtype)

    arms = {"extract()": run_extract, "residuals": run_residuals, "plain HF": run_plain}
    if args.with_bridge:
        arms["bridge hooks"] = run_bridge
    times: dict[str, list[float]] = {k: [] for k in arms}
    for rep in range(args.repeats + 1):
        for name, fn in arms.items():
            start = time.perf_counter()
            fn()
            if rep:  # repeat 0 is the warm-up
                times[name].append(time.perf_counter() - start)

    with contextlib.suppress(OSError):
        import shutil

        shutil.rmtree(tmp)
    print(
        f"{tokens} tokens ({args.contexts} contexts x {args.context}, batch {args.batch_size}), "
        f"median of {args.repeats} repeats after a warm-up, arms interleaved"
    )
    rate = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    best = {name: tokens / min(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(
            f"  {name:13s} {rate[name]:9.1f} tok/s median, {best[name]:9.1f} best"
            f"   (times: {', '.join(f'{t:.2f}' for t in ts)} s)"
        )
    for name in arms:
        if name != "plain HF":
            print(
                f"ratio {name} / plain HF: {rate[name] / rate['plain HF']:.2f} median, "
                f"{best[name] / best['plain HF']:.2f} best  (target >= 1.0)"
            )


if __name__ == "__main__":
    main()
