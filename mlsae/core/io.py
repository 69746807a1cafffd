"""Atomic output helpers: everything is written to a temporary path and renamed into place; a disk
error on the way names the path it was writing. `exclusive` is the one lock a writer of resumable
state (a checkpoint, a store) holds, so two processes never write one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlsae.core.errors import MlsaeError


def _check_finite(value: Any, where: str, key: str = "") -> None:
    """Raise MlsaeError naming the first NaN/inf in `value` (its dotted key): a metric that is not
    a number is an error, never written as null (`None` itself stays: it means "undefined")."""
    if isinstance(value, float) and not math.isfinite(value):
        raise MlsaeError(f"{where}: {key or 'value'} is {value}, not a finite number; refusing to write it")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, where, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, where, f"{key}[{i}]")


def named(error: OSError, path: str | os.PathLike[str]) -> OSError:
    """`error` with a file name: itself when it names one, else a copy naming `path` (a disk-full
    error raised by a library writing a buffer often names no file, and the user needs to know
    which disk filled up)."""
    if error.filename:
        return error
    renamed = OSError(error.errno, error.strerror or str(error) or type(error).__name__, str(path))
    renamed.__cause__ = error
    return renamed


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; it replaces `path` only if the block succeeds
    (the project's one atomic-write helper: readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise named(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (a temporary sibling, then rename)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as JSON atomically; a NaN or infinity anywhere raises MlsaeError naming its key."""
    _check_finite(obj, str(path))
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MlsaeError(f"{path}: not found (run the stage that writes it first)") from None
    except json.JSONDecodeError as e:
        raise MlsaeError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise MlsaeError(f"{path}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None


def short_hash(obj: Any) -> str:
    """A short, stable hash of JSON-able data (provenance in configs, checkpoint identities)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def remove(path: str | Path) -> None:
    """Delete a file or directory tree; fsspec URLs (`memory://`, `s3://`, ...) too."""
    if "://" in str(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(path))
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `path` only if the block succeeds. On any
    failure, the swap included, the temporary directory is removed and `path` is left as it was."""
    path = Path(path).absolute()
    here = Path.cwd().resolve()
    if path.name in ("", ".", "..") or path.resolve() in (here, *here.parents):
        raise MlsaeError(f"{path}: refusing to replace the working directory or a directory above it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except OSError as e:
        remove(tmp)
        raise named(e, path) from None
    except BaseException:
        remove(tmp)
        raise
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    moved = False
    try:
        if path.exists() or path.is_symlink():
            path.rename(old)
            moved = True
        tmp.rename(path)
    except BaseException:
        if moved and not path.exists():
            old.rename(path)
        remove(tmp)
        raise
    remove(old)


@contextlib.contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` for the block, or raise MlsaeError at once when
    another process holds it. `what` names what the lock protects, for the error line.

    An advisory `flock`: the kernel drops it when its holder exits, however it exits (kill -9
    included), so a stale lock never blocks a rerun. URLs (fsspec stores) are not locked."""
    if "://" in str(path):
        yield
        return
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise MlsaeError(
                f"{what}: another process (pid {holder}) is writing it (lock {path}); wait for it to finish or "
                f"stop it, then rerun (run experiments side by side with `dvc exp run --queue`)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
