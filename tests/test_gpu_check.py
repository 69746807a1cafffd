"""benchmarks/gpu_check.py, the prepared GPU check (docs/gpu.md), at CI scale on CPU.

`--device cpu --small` runs every section on small shapes: on CPU the device-vs-CPU comparisons run
the same CPU code path twice and DDP runs over gloo, so this proves that the script and its checks
run (it cannot rot between GPU sessions), not the CUDA paths; the output must say so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ["train_step", "throughput", "splice", "stream", "ddp"]


@pytest.fixture()
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The script as a module. It puts benchmarks/ first on sys.path and imports benchmarks/paper.py
    and train.py as `paper` and `train`: all three are undone afterwards, so no other test sees them."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for name in ("gpu_check", "paper", "train"):
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, float]:
    out = tmp_path_factory.mktemp("gpu_check")
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--out", str(out)],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text(), seconds


@pytest.mark.slow  # a 30-second subprocess
def test_every_section_runs_and_every_check_passes(cpu_run: tuple[dict, str, float]) -> None:
    result, summary, seconds = cpu_run
    assert list(result["sections"]) == SECTIONS
    for name, section in result["sections"].items():
        assert "error" not in section, (name, section.get("error"), section.get("traceback"))
        assert section["checks"], name
        failed = [c for c in section["checks"] if not c["passed"]]
        assert not failed, (name, failed)
        assert section["passed"], name
        for c in section["checks"]:
            assert c["tolerance"].startswith((">=", "<=", "true")), c
    assert result["passed"]
    assert summary.startswith("## GPU check on CPU: PASSED")
    assert seconds < 120  # under a minute on 2 cores when the machine is quiet; CI machines vary


@pytest.mark.slow
def test_cpu_run_says_it_is_not_a_cuda_check(cpu_run: tuple[dict, str, float]) -> None:
    result, summary, _ = cpu_run
    sections = result["sections"]
    assert result["cuda"] is False and result["env"]["device"] == "cpu"
    for name in ("train_step", "splice"):
        assert sections[name]["cuda"] is False
        assert sections[name]["comparison"].startswith("CPU vs CPU: the same CPU code path twice")
    assert sections["train_step"]["tolerance_set"] == "same-path"
    assert sections["ddp"]["backend"] == "gloo" and "not NCCL" in sections["ddp"]["comparison"]
    assert "A CPU run, not a CUDA check." in summary
    assert not sections["throughput"]["target"]["applies"]


@pytest.mark.slow
def test_cpu_run_exercises_each_measurement(cpu_run: tuple[dict, str, float]) -> None:
    result, summary, _ = cpu_run
    tp = result["sections"]["throughput"]
    for case in tp["cases"].values():
        # the downward search: the first size is refused (simulated OOM on --small), the next one runs
        assert [t["result"].split(" ")[0] for t in case["tried"]] == ["OOM", "ok"]
        # on a shared CPU the measured matmul peak and the step's time swing by 10x or more between
        # runs, so only their being measured is asserted, not their ratio
        assert case["largest"]["vectors_per_s"] > 0 and case["largest"]["flop_fraction"] > 0
        assert case["rank_batch"]["result"] == "ok"
    assert tp["cases"]["5 % dead latents (AuxK active)"]["largest"]["n_aux"] > 0
    assert all(p.get("top") for p in tp["profiles"].values())
    assert "Where the time goes" in summary
    train = result["sections"]["train_step"]["cases"]
    assert train["5 % dead latents (AuxK active)"]["auxk"]["cpu"] > 0
    assert train["no dead latents"]["auxk"]["cpu"] == 0
    projection = result["sections"]["stream"]["projection"]
    for case in ("no dead latents", "5 % dead latents (AuxK active)"):
        assert 0 < projection[case]["8_gpus_h"] < math.inf and 0 < projection[case]["one_gpu_h"] < math.inf
    assert result["sections"]["stream"]["loop"]["steps"] > 0
    ddp = result["sections"]["ddp"]["weights"]
    assert all(w["bitwise_equal"] for w in ddp.values())  # gloo, one process, CPU: the same numbers


def test_a_failing_check_or_section_fails_the_run(gpu_check: ModuleType, tmp_path: Path) -> None:
    """A failed check, an exception or a skipped section fails its section and the run, in the JSON
    and in the summary (the sections here are stand-ins; nothing is measured)."""
    gc = gpu_check
    args = argparse.Namespace(
        device="cpu", small=True, out=str(tmp_path), sections=[], deadline_s=450.0, cpu_bf16=False
    )
    run = gc.Run(args)
    run.section("train_step", "passes", lambda r: {"checks": [gc.check("close", 1e-7, 1e-5, "max")]})
    assert run.result["passed"]
    run.section(
        "splice",
        "a check fails",
        lambda r: {"checks": [gc.check("close", 2e-5, 1e-5, "max"), gc.check("nan", float("nan"), 0.9, "min")]},
    )

    def boom(r: object) -> dict:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    run.section("ddp", "raises", boom)
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [result["sections"][n]["passed"] for n in ("train_step", "splice", "ddp")] == [True, False, False]
    assert [c["passed"] for c in result["sections"]["splice"]["checks"]] == [False, False]
    assert "illegal memory access" in result["sections"]["ddp"]["error"]
    assert result["passed"] is False
    summary = (tmp_path / "gpu_check.md").read_text()
    assert summary.startswith("## GPU check on CPU: FAILED") and "**NO**" in summary
    # a section that would start after the deadline is skipped, and fails
    args.deadline_s = 0.0
    late = gc.Run(args)
    late.section("stream", "late", lambda r: {"checks": [gc.check("never run", 0.0, 1.0, "max")]})
    assert not late.result["sections"]["stream"]["passed"] and "skipped" in late.result["sections"]["stream"]["error"]
