"""What every stage entry point shares: params loading, the one-line error contract, and one run
per workspace.

One run per workspace: the check stage records the params it validated and the DVC process that
runs it (`record_run`, in `data/checkpoints/run.json`). Every later stage loads its params with
`params()`, which refuses in one line when params.yaml no longer holds what check validated
(another `dvc exp run` or `dvc repro` in this workspace rewrote it) or when another, still running
DVC process ran check after this run's. A stage started by DVC also dies with it: on Linux the
kernel sends it SIGTERM when its parent exits (`PR_SET_PDEATHSIG`), and a watchdog thread does the
same when DVC is a more distant ancestor (a shell or torchrun between them); SIGTERM is handled
like Ctrl-C, so resumable stages stop at a safe point, checkpointing where they can.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlsae.core.allocator import keep_large_blocks
from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_json
from mlsae.core.params import Params, load_params
from mlsae.core.paths import CHECKPOINTS_DIR, RUN_RECORD

PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when its parent exits."""
QUEUE_HINT = "run experiments side by side with `dvc exp run --queue` (then `dvc exp run --run-all`)"


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Turn expected failures into `error: <one line>` on stderr and exit status 1.

    MlsaeError is a bad input; OSError on an output path (disk full, permission denied) is
    reported with the path, never swallowed; MemoryError says so; Ctrl-C and SIGTERM exit 130
    (resumable stages resume). A process started by DVC dies with it (see the module docstring).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    keep_large_blocks()  # large CPU arrays reused, not page-faulted in afresh (mlsae/core/allocator.py)
    previous = _terminate_as_interrupt()
    try:
        die_with_run()
        yield
    except MlsaeError as e:
        print(f"error: {name}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as e:
        what = {errno.ENOSPC: "disk full", errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}
        reason = what.get(e.errno or 0, e.strerror or " ".join(str(e).split()) or type(e).__name__)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {name}: {where}{reason}", file=sys.stderr)
        raise SystemExit(1) from None
    except MemoryError:
        print(
            f"error: {name}: out of memory (lower the sizes in params.yaml; `check` estimates the need)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"error: {name}: interrupted (rerun to resume)", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def params(path: str | Path = "params.yaml") -> Params:
    """The stage's params, refused when params.yaml changed since `check` validated it for this run
    (see `check_run`)."""
    p = load_params(path)
    check_run(p, Path(path))
    return p


# --------------------------------------------------------------------------------------------
# Dying with the run
# --------------------------------------------------------------------------------------------


def _terminate_as_interrupt() -> Any:
    """SIGTERM raises KeyboardInterrupt (main thread only), so it unwinds like Ctrl-C: temporary
    files removed, checkpoints saved where a stage can. Returns the handler it replaced (None when
    it replaced none)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        return None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    return previous


def run_process() -> dict[str, Any] | None:
    """The DVC process this one runs under (`{"pid", "started"}`), found among its ancestors by
    command line; None when no DVC process started it (a stage run by hand)."""
    try:
        import psutil

        proc = psutil.Process().parent()
        while proc is not None and proc.pid > 1:
            cmd = proc.cmdline()
            if any(Path(arg).name in ("dvc", "dvc.exe") for arg in cmd[:2]) or cmd[1:3] == ["-m", "dvc"]:
                return {"pid": proc.pid, "started": proc.create_time()}
            proc = proc.parent()
    except Exception:  # a process gone or unreadable while walking: no run to follow
        return None
    return None


def _alive(run: dict[str, Any]) -> bool:
    try:
        import psutil

        return abs(psutil.Process(int(run["pid"])).create_time() - float(run["started"])) < 1e-3
    except Exception:
        return False


def die_with_run() -> None:
    """When DVC started this process: SIGTERM when the parent exits (Linux's parent-death signal,
    set with prctl through ctypes), and, if DVC is not the direct parent, a daemon thread that sends
    it when the DVC process is gone. A stage run by hand may outlive its shell (nohup) and is left
    alone."""
    if not os.environ.get("DVC_STAGE"):
        return
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if parent == 1 or os.getppid() != parent:  # the parent exited before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
        return
    run = run_process()
    if run is None or run["pid"] == parent:
        return

    def watch() -> None:
        while _alive(run):
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="mlsae-die-with-dvc", daemon=True).start()


# --------------------------------------------------------------------------------------------
# One run per workspace
# --------------------------------------------------------------------------------------------


def run_record_path(params_path: Path) -> Path:
    """`data/checkpoints/run.json` of the workspace holding `params_path`."""
    return params_path.absolute().parent / CHECKPOINTS_DIR / RUN_RECORD


def _changed(now: dict[str, Any], then: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(now) | set(then)):
        a, b = now.get(key), then.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key} {json.dumps(b)} -> {json.dumps(a)}")
    return keys


def record_run(p: Params, params_path: Path) -> None:
    """The check stage's record of the params it validated and of the DVC process running it.
    Refuses when the last record belongs to another DVC process that is still running."""
    path = run_record_path(params_path)
    me = run_process()
    old = _read_record(path)
    if old is not None and isinstance(old.get("run"), dict) and old["run"] != me and _alive(old["run"]):
        raise MlsaeError(
            f"another run (dvc, pid {old['run']['pid']}) is in progress in this workspace; wait for it, or {QUEUE_HINT}"
        )
    write_json(path, {"params": p.to_dict(), "run": me, "params_file": params_path.name})


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("params"), dict) else None


def check_run(p: Params, params_path: Path) -> None:
    """Refuse to start on params other than the ones check validated for the run in progress, or
    when another DVC process ran check after this one's and is still running. Nothing to compare
    with when check has not run here (no record)."""
    record = _read_record(run_record_path(params_path))
    if record is None:
        return
    changed = _changed(p.to_dict(), record["params"])
    if changed:
        raise MlsaeError(
            f"{params_path.name} changed since `check` validated it for this run ({'; '.join(changed[:4])}"
            f"{'; ...' if len(changed) > 4 else ''}): another `dvc exp run` or `dvc repro` in this workspace? "
            f"One run at a time per workspace: {QUEUE_HINT}; to run on the new params, rerun from check "
            f"(`dvc repro`, or `dvc repro -s check` before a single stage)"
        )
    run, me = record.get("run"), run_process()
    if isinstance(run, dict) and me is not None and run != me and _alive(run):
        raise MlsaeError(
            f"another run (dvc, pid {run['pid']}) started in this workspace after this one and is still "
            f"running; one run at a time per workspace: {QUEUE_HINT}"
        )
