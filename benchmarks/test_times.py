"""Wall time of the test suite as `make test` runs it, and its slowest tests.

Runs pytest with the Makefile's options (both cores, a module's tests on one worker) and a JUnit
report, then writes the total wall time, the outcome counts and the 15 slowest test phases
(setup and call together, per test) to ``benchmarks/results/test_times.json``, which the README's
development section cites:

    python benchmarks/test_times.py [pytest args...]
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAKE_TEST = ["-q", "-n", "2", "--dist", "loadscope"]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", *MAKE_TEST, f"--junitxml={junit}", *sys.argv[1:]]
        start = time.perf_counter()
        status = subprocess.call(command, cwd=ROOT)
        wall = time.perf_counter() - start
        root = ET.parse(junit).getroot()
    cases = []
    counts = {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        cases.append((float(case.get("time", 0.0)), name))
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        elif (skip := case.find("skipped")) is not None:
            counts["xfailed" if "xfail" in (skip.get("type", "") + skip.get("message", "")) else "skipped"] += 1
        else:
            counts["passed"] += 1
    cases.sort(reverse=True)
    result = {
        "command": "pytest " + " ".join(MAKE_TEST + sys.argv[1:]),
        "exit_status": status,
        "total_seconds": round(wall, 1),
        "tests": len(cases),
        **counts,
        "slowest": [{"test": name, "seconds": round(seconds, 1)} for seconds, name in cases[:15]],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "date": datetime.date.today().isoformat(),
    }
    out = ROOT / "benchmarks" / "results" / "test_times.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
