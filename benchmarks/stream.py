"""Stream mode against store mode on the same tokens: throughput, peak memory and disk.

Arms at 1x and 4x `--tokens` train tokens, interleaved; each stage in its own process, as in the
pipeline (so that each peak RSS is that stage's own):

  store    extract (the train split, the eval split) then train from the store: today's path.
  stream   extract in stream mode (the eval split and the sample only), then train with
           `train.source: stream` (the corpus through the model while training).

Both train the same MLSAE (SmolLM2-135M: d_model 576, expansion 16 = 9,216 latents, k 32, all 30
blocks) with the same batch and buffer sizes, and time everything a user waits for: model loads,
extraction, training. Prints vectors/s (trained token-layer vectors per second of wall time, both
stages), the stream/store ratio, each stage's peak RSS and the bytes left on disk (the store plus
the SAE), and the 4x/1x ratios of train's peak RSS and of the disk: stream mode's should be flat, store mode's disk grows with the
train tokens. AuxK acts from the first steps at both scales (`sae.dead_tokens` one step), so that
its product over the dead latents' encoder rows and its top-k are in both peaks.

    .venv/bin/python benchmarks/stream.py [--tokens 2048] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def raw_params(arm: str, tokens: int, device: str) -> dict:
    return {
        "model": "smollm2-135m",
        "data": {"context": 128, "train_tokens": tokens, "eval_tokens": 512, "sample_tokens": 512},
        "extract": {"dtype": "float16", "batch_size": 8, "device": device},
        # dead after one step without firing: AuxK (its product over the dead rows, its top-k) acts from
        # the first steps at both scales, so that peak memory compares like with like
        "sae": {"expansion": 16, "k": 32, "dead_tokens": 256},
        "train": {
            "source": arm,
            "batch_tokens": 256,
            "shuffle_buffer_tokens": 1024,
            "checkpoint_every": 10**6,
            "geometric_median_sample": 1024,
            "device": device,
        },
    }


def child(stage: str, arm: str, tokens: int, device: str, work: Path) -> None:
    """One stage of one arm in this process (a pipeline runs each stage in its own); prints one JSON line."""
    from mlsae.core.params import parse_params
    from mlsae.data.extract import extract
    from mlsae.lens.tuned import Lens
    from mlsae.sae.trainer import StreamSource, train
    from mlsae.stores.activations import ActivationStore

    p = parse_params(raw_params(arm, tokens, device))
    t0 = time.perf_counter()
    out: dict = {}
    if stage == "extract":
        extract(p.model, p.data, p.extract, p.train.source, str(work / "activations.zarr"), progress=False)
    else:
        reader = ActivationStore(str(work / "activations.zarr"))
        stream = StreamSource(p.model, p.data, p.extract) if p.train.source == "stream" else None
        metrics, _ = train(
            p.sae,
            p.train,
            p.lens,
            reader,
            Lens.identity(reader.n_layers, reader.d_model),
            work / "sae",
            work / "ckpt",
            stream=stream,
            progress=False,
        )
        out = {"vectors": metrics["steps"] * p.train.batch_tokens * reader.n_layers, "fvu": metrics["fvu"]}
    out.update(wall=time.perf_counter() - t0, rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(out))


def run_arm(arm: str, tokens: int, device: str) -> dict:
    """Extract then train, each in a fresh process, in one temporary directory."""
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in ("extract", "train"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    stage,
                    "--arm",
                    arm,
                    "--tokens",
                    str(tokens),
                    "--device",
                    device,
                    "--work",
                    tmp,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                raise SystemExit(f"{arm} arm, {stage} failed:\n{out.stderr[-3000:]}")
            result[stage] = json.loads(out.stdout.strip().splitlines()[-1])
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    e, t = result["extract"], result["train"]
    return {
        "wall": e["wall"] + t["wall"],
        "extract": e["wall"],
        "vectors": t["vectors"],
        "fvu": t["fvu"],
        "rss": t["rss"],
        "rss_extract": e["rss"],
        "disk": disk,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="train tokens at 1x")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", choices=("extract", "train"))
    ap.add_argument("--arm", choices=("store", "stream"))
    ap.add_argument("--work", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.arm, args.tokens, args.device, args.work)
        return
    results = {}
    for scale in (1, 4):
        for arm in ("store", "stream"):
            r = results[arm, scale] = run_arm(arm, scale * args.tokens, args.device)
            print(
                f"{arm:6s} {scale}x ({scale * args.tokens:,} train tokens): {r['wall']:6.1f} s "
                f"({r['extract']:.1f} s extract), {r['vectors'] / r['wall']:,.0f} vectors/s, "
                f"peak RSS train {r['rss'] / 2**30:.2f} GiB (extract {r['rss_extract'] / 2**30:.2f}), disk {r['disk'] / 2**20:.1f} MiB, train FVU {r['fvu']:.3f}",
                flush=True,
            )
    for scale in (1, 4):
        s, t = results["store", scale], results["stream", scale]
        print(
            f"{scale}x: stream / (extract + store-mode train) throughput: "
            f"{(t['vectors'] / t['wall']) / (s['vectors'] / s['wall']):.2f}x"
        )
    for arm in ("store", "stream"):
        a, b = results[arm, 1], results[arm, 4]
        print(f"{arm}: 4x/1x peak RSS of train {b['rss'] / a['rss']:.2f}, 4x/1x disk {b['disk'] / a['disk']:.2f}")


if __name__ == "__main__":
    main()
