"""Atomic output helpers: everything is written to a temporary path and renamed into place."""

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


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; it replaces `path` only if the block succeeds
    (the project's one atomic-write helper: readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (a temporary sibling, then rename)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
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
    """Yield a fresh temporary directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    remove(old)
