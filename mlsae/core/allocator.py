"""glibc's malloc, set once per stage process to reuse large freed blocks instead of unmapping them.

By default glibc serves every request above its mmap threshold (adaptive, but never above 32 MiB
on 64-bit Linux) with a fresh ``mmap`` and hands it back with ``munmap`` when it is freed. Every
new array of that size is then page-faulted in again, one 4 KiB page at a time, by the first op
that writes it. On CPU the stages make such arrays at every step: the train loop's activations at
the default shape (512 tokens × 30 layers × 576, float32) are 35 MB each, and a handful are made
per step; evaluate's clean logits are 200 MB per batch.

:func:`keep_large_blocks` raises the mmap threshold to 1 GiB, so those arrays come from the heap,
and the trim threshold likewise, so that freeing the block at the top of the heap does not hand
the memory back at once. The page faults go, and with them a share of every op's time on such
arrays (`MLSAE_MALLOC=default python benchmarks/train.py` against a plain run measures the step
time under each setting). The numbers a stage computes do not change.

Cost: memory the process frees stays mapped until it exits instead of being returned at once. A
freed block is reused by the next request that fits; the first few requests of a new size can
still grow the heap (an aligned request is a little larger than the block just freed) until freed
neighbours coalesce, after which a loop of same-sized arrays faults nothing in. That growth is
the price: a higher peak RSS (`benchmarks/train_memory.py` under each setting measures it).
Elsewhere than glibc (macOS, musl) it does nothing. ``MLSAE_MALLOC=default`` leaves glibc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
"""mallopt parameter: free memory at the heap top above this is returned to the system."""
M_MMAP_THRESHOLD = -3
"""mallopt parameter: requests of at least this size get their own mmap."""
LARGE = 1 << 30
"""Both thresholds: 1 GiB, above any array a default-scale stage makes on CPU."""

_applied: bool | None = None


def keep_large_blocks() -> bool:
    """Set both thresholds once per process; returns whether glibc took them."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux") and os.environ.get("MLSAE_MALLOC", "") != "default":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = bool(mallopt(M_MMAP_THRESHOLD, LARGE)) and bool(mallopt(M_TRIM_THRESHOLD, LARGE))
    return _applied
