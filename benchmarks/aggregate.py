"""Throughput and memory of the streaming analysis (`mlsae.analysis.aggregate.aggregate`).

Builds two random latent stores of realistic shape (L=30 layers, k=32, 9216 latents, documents of
37 tokens as on the default run) with N and 4N eval tokens, then runs `aggregate` (the stage's
default analysis params: 200 bootstrap replicas) on each in a fresh subprocess so that each peak
RSS is its own. Prints rows/s (rows = tokens x layers x k sparse entries), peak RSS and the ratios.

With ``--reference DIR`` (a checkout of another commit, e.g. ``git worktree add /tmp/ref HEAD~5``)
the same stores are also analysed by that checkout's code, alternating with this one's (``--repeats``
rounds), and the ratio of the 4N rates is printed: what "measured side by side" means here.

Targets: peak RSS of the 4N run within 1.5x of the N run (flat in tokens); with a reference, the 4N
rate at least 0.7x the reference's (issue #23).

    .venv/bin/python benchmarks/aggregate.py [--tokens 8192] [--keep DIR] [--reference DIR] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

N_LAYERS = 30
K = 32
N_LATENTS = 9216
CONTEXT = 128  # a special (BOS) token opens every context
SHARD_TOKENS = 8192  # the dump stage's layout (mlsae/sae/dump.py)
CHUNK_TOKENS = 1024
DOCUMENT_TOKENS = 37  # the default run's mean tokens per document (64-token cut of the embedded corpus)


def build_store(path: Path, n_tokens: int, seed: int = 0) -> None:
    """Write a complete random latent store of `n_tokens` tokens.

    Per token, a pool of distinct latent ids is drawn without replacement with Zipf-like weights
    (Gumbel top-k); layer l takes a window of k consecutive pool entries whose start moves by a
    random 8..24 per layer, so a latent stays active over a few adjacent layers, as in MLSAEs.
    About 2 % of the entries are zero (inactive).
    """
    rng = np.random.default_rng(seed)
    log_w = -1.1 * np.log(rng.permutation(N_LATENTS) + 10.0)
    steps = rng.integers(8, 25, size=(n_tokens, N_LAYERS))
    steps[:, 0] = 0
    offsets = np.cumsum(steps, axis=1)  # (T, L)
    pool_size = int(offsets.max()) + K
    group = zarr.create_group(str(path), overwrite=True)
    arrays = {}
    for name, dtype in (("indices", np.int32), ("values", np.float16)):
        arrays[name] = group.create_array(
            name,
            shape=(n_tokens, N_LAYERS, K),
            dtype=dtype,
            chunks=(CHUNK_TOKENS, N_LAYERS, K),
            shards=(SHARD_TOKENS, N_LAYERS, K),
        )
    window = offsets[:, :, None] + np.arange(K)[None, None, :]  # (T, L, k) pool positions
    for start in range(0, n_tokens, SHARD_TOKENS):
        stop = min(start + SHARD_TOKENS, n_tokens)
        gumbel = log_w[None, :] - np.log(-np.log(rng.random((stop - start, N_LATENTS))))
        pool = np.argpartition(-gumbel, pool_size, axis=1)[:, :pool_size]
        rng.permuted(pool, axis=1, out=pool)
        idx = np.take_along_axis(pool[:, None, :], window[start:stop].reshape(stop - start, 1, -1), axis=2)
        vals = rng.lognormal(0.0, 1.0, size=idx.shape).astype(np.float16)
        vals[rng.random(idx.shape) < 0.02] = 0
        arrays["indices"][start:stop] = idx.reshape(stop - start, N_LAYERS, K).astype(np.int32)
        arrays["values"][start:stop] = vals.reshape(stop - start, N_LAYERS, K)
    t = np.arange(n_tokens)
    group.create_array("tokens", data=rng.integers(0, 49152, n_tokens).astype(np.int32), chunks=(SHARD_TOKENS,))
    group.create_array("context", data=(t // CONTEXT).astype(np.int32), chunks=(SHARD_TOKENS,))
    group.create_array("position", data=(t % CONTEXT).astype(np.int16), chunks=(SHARD_TOKENS,))
    group.create_array("special", data=(t % CONTEXT == 0), chunks=(SHARD_TOKENS,))
    group.create_array("document", data=(t // DOCUMENT_TOKENS).astype(np.int64), chunks=(SHARD_TOKENS,))
    from mlsae.stores.activations import seal

    seal(group, "latents", "dump")
    group.attrs.update({"layers": list(range(N_LAYERS)), "n_latents": N_LATENTS, "k": K, "complete": True})


def peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, it starts afresh at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_one(store: Path, out: Path) -> dict:
    """Child process: run `aggregate` once and report time and peak RSS as JSON on stdout (this
    checkout's API, or a reference checkout's older one, whichever the import path holds)."""
    try:
        from mlsae.analysis.aggregate import aggregate
        from mlsae.core.allocator import keep_large_blocks
        from mlsae.core.params import AnalysisParams

        def run() -> dict:
            return aggregate(store, out / "analysis", out / "analysis.json", AnalysisParams())
    except ImportError:  # a checkout from before the sub-packages
        from mlsae.aggregate import aggregate  # type: ignore[no-redef]
        from mlsae.allocator import keep_large_blocks  # type: ignore[no-redef]

        def run() -> dict:
            return aggregate(store, out / "analysis", out / "analysis.json")

    keep_large_blocks()  # as the aggregate stage runs (mlsae/core/stage.py); MLSAE_MALLOC=default: glibc's
    base_kib = peak_rss_kib()
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = run()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_kib = peak_rss_kib()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_mib": peak_kib / 1024,
        "base_mib": base_kib / 1024,
        "load": os.getloadavg()[0],
        "metrics": metrics,
    }


def measure(store: Path, out: Path, code: Path) -> dict:
    """Run the child on `store` with the mlsae package of checkout `code`."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    child = subprocess.run(
        [sys.executable, __file__, "--child", str(store), str(out)], check=True, capture_output=True, text=True, env=env
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="N: the small store's tokens (the large has 4N)")
    parser.add_argument("--keep", type=Path, default=None, help="build the stores here and keep them")
    parser.add_argument("--reference", type=Path, default=None, help="a checkout to compare with, side by side")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the 4N comparison with --reference")
    parser.add_argument("--child", nargs=2, metavar=("STORE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(Path(args.child[0]), Path(args.child[1]))))
        return

    here = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp_name:
        root = Path(args.keep or tmp_name)
        results = {}
        for scale in (1, 4):
            n_tokens = scale * args.tokens
            store = root / f"latents_{scale}x.zarr"
            if not (store / "document").exists():
                t0 = time.perf_counter()
                build_store(store, n_tokens, seed=scale)
                print(f"built {store.name}: {n_tokens} tokens in {time.perf_counter() - t0:.1f}s", flush=True)
            result = measure(store, root / f"out_{scale}x", here)
            rows = n_tokens * N_LAYERS * K
            result["rows"] = rows
            results[scale] = result
            print(
                f"{scale}x: tokens={n_tokens} rows={rows:,} time={result['seconds']:.2f}s "
                f"rows/s={rows / result['seconds'] / 1e6:.1f}M "
                f"(cpu {result['cpu_seconds']:.2f}s = {rows / result['cpu_seconds'] / 1e6:.1f}M rows per cpu-s) "
                f"peak_rss={result['peak_mib']:.0f}MiB (after imports {result['base_mib']:.0f}MiB) "
                f"pairs={result['metrics']['n_active_pairs']:,} within_share={result['metrics']['within_share']:.4f} "
                f"load_avg={result['load']:.1f} on {os.cpu_count()} cpus",
                flush=True,
            )
        ratio = results[4]["peak_mib"] / results[1]["peak_mib"]
        print(f"peak RSS ratio 4x/1x = {ratio:.2f} (target <= 1.5): {'OK' if ratio <= 1.5 else 'MISSED'}")
        if args.reference is None:
            return
        store, rows = root / "latents_4x.zarr", 4 * args.tokens * N_LAYERS * K
        rates: dict[str, list[float]] = {"this": [], "reference": []}
        peaks: dict[str, list[float]] = {"this": [], "reference": []}
        for _ in range(args.repeats):
            for name, code in (("reference", args.reference), ("this", here)):
                result = measure(store, root / f"out_{name}", code)
                rates[name].append(rows / result["seconds"] / 1e6)
                peaks[name].append(result["peak_mib"])
                print(f"4x {name}: {rates[name][-1]:.2f}M rows/s, peak {result['peak_mib']:.0f}MiB", flush=True)
        speed = float(np.median(rates["this"]) / np.median(rates["reference"]))
        print(
            f"4x rows/s, this / reference (medians of {args.repeats}) = {speed:.2f} (target >= 0.7): "
            f"{'OK' if speed >= 0.7 else 'MISSED'}; peak RSS this / reference = "
            f"{np.median(peaks['this']) / np.median(peaks['reference']):.2f}"
        )


if __name__ == "__main__":
    main()
