"""What every stage entry point shares: params loading and the one-line error contract."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from mlsae.core.allocator import keep_large_blocks
from mlsae.core.errors import MlsaeError
from mlsae.core.params import Params, load_params


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Turn expected failures into `error: <one line>` on stderr and exit status 1.

    MlsaeError is a bad input; OSError on an output path (disk full, permission denied) is
    reported with the path, never swallowed; Ctrl-C exits 130 (resumable stages resume).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    keep_large_blocks()  # large CPU arrays reused, not page-faulted in afresh (mlsae/core/allocator.py)
    try:
        yield
    except MlsaeError as e:
        print(f"error: {name}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as e:
        what = {errno.ENOSPC: "disk full", errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}
        reason = what.get(e.errno or 0, e.strerror or type(e).__name__)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {name}: {where}{reason}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"error: {name}: interrupted (rerun to resume)", file=sys.stderr)
        raise SystemExit(130) from None


def params(path: str | Path = "params.yaml") -> Params:
    return load_params(path)
