"""The stage processes' allocator setting (mlsae/core/allocator.py), observed in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import resource, torch
from mlsae.core.stage import stage
with stage("probe"):
    x = torch.ones(512, 30, 576)  # 35 MB: the train loop's activations at the default shape

    def products():
        for _ in range(10):
            y = x * 2.0
            z = y - x
            del y, z

    products()  # warm-up: the heap grows until freed neighbours coalesce into reusable blocks
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    products()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(**env: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env={**os.environ, **env}, check=True, capture_output=True, text=True
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_stage_reuses_large_blocks_instead_of_faulting_them_in_again() -> None:
    """Twenty 35 MB arrays after a warm-up: with glibc's defaults each is a fresh mmap,
    page-faulted in anew (about 8,600 faults of 4 KiB each); under `stage` the heap's freed
    blocks are reused and next to nothing is faulted in."""
    default = page_faults(MLSAE_MALLOC="default")
    tuned = page_faults()
    if default < 20 * 4000:
        pytest.skip(f"only {default} page faults with glibc's defaults (huge pages?): nothing to compare")
    assert tuned < default / 20, (tuned, default)
