"""Wall time of each stage of a `dvc repro`, from DVC's own output as it runs.

Runs ``dvc repro`` (with ``--force``: every stage, as on a fresh clone with a warm model cache)
or ``dvc exp run -S ...`` in the repository, timestamps every ``Running stage '<name>'`` line, and
writes each stage's seconds (a stage ends where the next begins or the command ends; a stage DVC
skips or restores from its cache takes no line) with the total, the machine and the command to
``benchmarks/results/<name>.json``:

    python benchmarks/repro_times.py                          # dvc repro --force -> repro_times.json
    python benchmarks/repro_times.py --name exp_k64 -- exp run -S sae.k=64

The README's stage table cites the file this writes for the committed run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = re.compile(r"^Running stage '([^']+)'")


def timed(command: list[str], cwd: Path) -> tuple[dict[str, float], float, int]:
    """``({stage: seconds}, total seconds, exit status)`` of one DVC command, its output echoed."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    stages: dict[str, float] = {}
    current, since = None, start
    for line in proc.stdout:
        sys.stdout.write(line)
        m = STAGE.match(line)
        if m:
            now = time.perf_counter()
            if current is not None:
                stages[current] = stages.get(current, 0.0) + now - since
            current, since = m.group(1), now
    status = proc.wait()
    end = time.perf_counter()
    if current is not None:
        stages[current] = stages.get(current, 0.0) + end - since
    return stages, end - start, status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="repro_times", help="results file name (benchmarks/results/NAME.json)")
    ap.add_argument("--repo", type=Path, default=ROOT, help="the repository to run in")
    ap.add_argument("--label", default="this checkout", help="what --repo holds (e.g. a commit), for the record")
    ap.add_argument("dvc_args", nargs="*", help="arguments after `dvc` (default: repro --force)")
    args = ap.parse_args()
    dvc_args = args.dvc_args or ["repro", "--force"]
    command = [str(Path(sys.executable).parent / "dvc"), *dvc_args]
    stages, total, status = timed(command, args.repo)
    result = {
        "command": "dvc " + " ".join(dvc_args),
        "code": args.label,
        "exit_status": status,
        "stage_seconds": {k: round(v, 1) for k, v in stages.items()},
        "total_seconds": round(total, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "date": datetime.date.today().isoformat(),
    }
    out = ROOT / "benchmarks" / "results" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    print(json.dumps(result, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
