"""Peak RSS of the real train loop at 1x and 4x the train tokens (target: flat).

Builds two synthetic activation stores (random residuals, d_model 576, 4 layers) with N and 4N
train tokens, runs `mlsae.sae.trainer.train` over the whole of each in a fresh subprocess, and prints
each run's peak RSS (VmHWM) and the ratio. Memory is bounded by `train.shuffle_buffer_tokens`, not
by the store.

    .venv/bin/python benchmarks/train_memory.py [--tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS, D_MODEL, CONTEXT = 4, 576, 128


def build_store(path: Path, n_tokens: int) -> None:
    from mlsae.stores import activations as store

    rng = np.random.default_rng(0)
    n_ctx = n_tokens // CONTEXT
    tokens = rng.integers(10, 1000, size=(n_ctx + 1, CONTEXT), dtype=np.int32)
    special = np.zeros_like(tokens, dtype=bool)
    # one document per context: train documents 1.., the eval document 0
    document = np.arange(n_ctx + 1, dtype=np.int64)[:, None].repeat(CONTEXT, 1)
    splits = {
        "train": store.SplitData(tokens[:n_ctx], special[:n_ctx], np.arange(n_ctx, dtype=np.int32), document[1:]),
        "eval": store.SplitData(tokens[n_ctx:], special[n_ctx:], np.array([0], dtype=np.int32), document[:1]),
    }
    attrs = {
        "model": "synthetic",
        "revision": "0",
        "n_layers": LAYERS,
        "d_model": D_MODEL,
        "corpus": "random",
        "context": CONTEXT,
        "train_tokens": n_tokens,
        "eval_tokens": CONTEXT,
        "dtype": "float16",
        "data_seed": 0,
        "split": {"seed": 0, "share": 1 / (n_ctx + 1), "eval_until": 1},
    }
    root = store.create(str(path), attrs, splits)
    step = int(root.attrs["shard_tokens"])
    for name, data in splits.items():
        n = data.n_tokens
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            root[name]["resid"][lo:hi] = rng.standard_normal((hi - lo, LAYERS, D_MODEL), dtype=np.float32).astype(
                np.float16
            )
    store.seal(root, path, "extract")


def run_child(path: str) -> None:
    """Train over the whole store; print JSON with steps, seconds and peak RSS."""
    from mlsae.core.params import parse_params
    from mlsae.lens.tuned import Lens
    from mlsae.sae.trainer import train
    from mlsae.stores.activations import ActivationStore

    reader = ActivationStore(path)
    p = parse_params(
        {
            "model": "synthetic",
            "sae": {"expansion": 16, "k": 32},
            "train": {"batch_tokens": 512, "shuffle_buffer_tokens": 8192, "checkpoint_every": 10_000},
        }
    )
    out = Path(path).parent
    t0 = time.perf_counter()
    metrics, _ = train(
        p.sae, p.train, p.lens, reader, Lens.identity(LAYERS, D_MODEL), out / "sae", out / "ckpt", progress=False
    )
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    print(json.dumps({"steps": metrics["steps"], "seconds": time.perf_counter() - t0, "peak_rss_mib": hwm / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384, help="train tokens of the 1x store")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_child(args.child)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (1, 4):
            path = Path(tmp) / f"x{scale}" / "activations.zarr"
            path.parent.mkdir()
            build_store(path, scale * args.tokens)
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(path)], capture_output=True, text=True, check=True
            )
            results[scale] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[scale]
            print(
                f"{scale}x: {scale * args.tokens} train tokens x {LAYERS} layers, d_model {D_MODEL}: "
                f"{r['steps']} steps in {r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB"
            )
    ratio = results[4]["peak_rss_mib"] / results[1]["peak_rss_mib"]
    print(f"peak RSS 4x / 1x = {ratio:.2f} (target: flat, about 1.0)")


if __name__ == "__main__":
    main()
