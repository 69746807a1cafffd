"""The converted-model cache: a GGUF model de-quantised once, then loaded from safetensors.

Layout, one directory per GGUF file content under ``<cache>/converted/<sha256 of the GGUF>/``:

    config.json, tokenizer files     what ``save_pretrained`` writes (the HF model and tokenizer)
    model.safetensors                the de-quantised float32 weights
    manifest.json                    written last: the GGUF's sha256 and file name, the transformers
                                     version, and every other file's size and sha256

``<cache>`` is ``$MLSAE_CACHE``, else ``$XDG_CACHE_HOME/mlsae``, else ``~/.cache/mlsae``: outside
the repository, shared by every stage and every experiment.

Why: transformers de-quantises a GGUF tensor by tensor in Python, which takes tens of seconds,
and extract, lens fit, baseline, evaluate and browse each load the model; loading the converted
safetensors is a plain read.

Safety: a directory is built under a temporary name and renamed into place when whole, so a
reader never sees half of one. Before use, every file listed in the manifest is checked against
its size and sha256; a directory with no manifest, a missing file, or a mismatch (a partial copy,
a corrupted disk block) is deleted and rebuilt from the GGUF, with a notice on stderr. The key
is the GGUF's content hash, so a changed file never meets a stale conversion.

Every failure is one line naming the file: a GGUF whose header does not parse (`gguf_dims` reads
it first, with every length checked against the file's size), one the converter cannot read, and
a cache directory that cannot be written (a full disk names the directory).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from torch import nn

from mlsae.core.errors import MlsaeError
from mlsae.core.io import file_sha256

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
_LAYOUT = 1


@dataclass(frozen=True)
class ModelDims:
    n_layers: int
    d_model: int
    max_context: int | None = None


class _Malformed(Exception):
    """A GGUF header that does not parse; the message says where and why."""


_MAX_KEY = 1 << 16
"""Longest metadata key accepted (real keys are tens of bytes)."""
_MAX_DEPTH = 4
"""Deepest nesting of arrays accepted (real files nest none)."""


class _Header:
    """Sequential reader of a GGUF header: every length is checked against the bytes left in the
    file before anything is read or skipped, so a crafted length cannot allocate or seek wild."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size = f, size

    def left(self) -> int:
        return self.size - self.f.tell()

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise _Malformed(f"truncated header: {what} needs {n} bytes at offset {self.f.tell()}, {self.left()} left")
        return self.f.read(n)

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.unpack("<Q", f"{what} length")
        if limit is not None and n > limit:
            raise _Malformed(f"{what} length {n} at offset {self.f.tell() - 8} exceeds {limit} bytes")
        return self.take(n, what).decode("utf-8", "replace")

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise _Malformed(f"truncated header: {what} needs {n} bytes at offset {self.f.tell()}, {self.left()} left")
        self.f.seek(n, 1)


def gguf_dims(path: str | Path) -> ModelDims:
    """Block count, embedding width and context length from a GGUF file's metadata header.

    Reads the key-value section sequentially and stops once the three keys are found (the
    tokenizer's large arrays and the tensors are never read). A header that does not parse (a
    truncated file, a length beyond the file's end, an unknown value type) raises MlsaeError
    naming the file and the cause."""
    from gguf import GGUFValueType as T

    scalar = {
        T.UINT8: "<B",
        T.INT8: "<b",
        T.UINT16: "<H",
        T.INT16: "<h",
        T.UINT32: "<I",
        T.INT32: "<i",
        T.FLOAT32: "<f",
        T.BOOL: "<?",
        T.UINT64: "<Q",
        T.INT64: "<q",
        T.FLOAT64: "<d",
    }

    def kind_of(code: int, key: str) -> Any:
        try:
            return T(code)
        except ValueError:
            raise _Malformed(f"key {key!r} has unknown value type {code}") from None

    def value(h: _Header, code: int, key: str, depth: int = 0) -> Any:
        kind = kind_of(code, key)
        if kind == T.STRING:
            return h.string(f"value of {key!r}")
        if kind == T.ARRAY:
            if depth >= _MAX_DEPTH:
                raise _Malformed(f"key {key!r}: arrays nested deeper than {_MAX_DEPTH}")
            item, n = h.unpack("<I", f"item type of {key!r}"), h.unpack("<Q", f"length of {key!r}")
            item_kind = kind_of(item, key)
            if item_kind in scalar:  # skip without decoding
                h.skip(n * struct.calcsize(scalar[item_kind]), f"array {key!r}")
            else:
                if n * 8 > h.left():  # every item takes at least 8 bytes (a length)
                    raise _Malformed(f"array {key!r} of {n} items exceeds the file")
                for _ in range(n):
                    value(h, item, key, depth + 1)
            return None
        return h.unpack(scalar[kind], f"value of {key!r}")

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            h = _Header(f, size)
            if f.read(4) != b"GGUF":
                raise MlsaeError(f"model: {path} is not a GGUF file")
            h.unpack("<I", "version")
            h.unpack("<Q", "tensor count")
            n_keys = h.unpack("<Q", "key count")
            if n_keys * 12 > h.left():  # a key takes at least 12 bytes (length, type)
                raise _Malformed(f"key count {n_keys} exceeds the file")
            found: dict[str, Any] = {}
            for _ in range(n_keys):
                key = h.string("key", limit=_MAX_KEY)
                found[key] = value(h, h.unpack("<I", f"value type of {key!r}"), key)
                arch = found.get("general.architecture")
                wanted = [f"{arch}.block_count", f"{arch}.embedding_length", f"{arch}.context_length"]
                if arch and all(k in found for k in wanted):
                    try:
                        return ModelDims(int(found[wanted[0]]), int(found[wanted[1]]), int(found[wanted[2]]))
                    except (TypeError, ValueError):
                        raise _Malformed(f"{wanted[0]}, {wanted[1]} or {wanted[2]} is not a number") from None
    except _Malformed as e:
        raise MlsaeError(f"model: {path}: malformed GGUF header ({e})") from None
    raise MlsaeError(f"model: {path}: GGUF metadata lacks the block count or embedding length")


def cache_root() -> Path:
    """``$MLSAE_CACHE``, else ``$XDG_CACHE_HOME/mlsae``, else ``~/.cache/mlsae``."""
    if os.environ.get("MLSAE_CACHE"):
        return Path(os.environ["MLSAE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mlsae"


def _files(directory: Path) -> dict[str, dict]:
    return {
        p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def _valid(directory: Path, gguf_sha: str) -> bool:
    """True when `directory` holds a whole, unaltered conversion of the GGUF with hash `gguf_sha`."""
    import transformers

    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest.get("layout") != _LAYOUT or manifest.get("gguf_sha256") != gguf_sha:
            return False
        if manifest.get("transformers") != transformers.__version__:
            return False
        files = manifest["files"]
        for name, meta in files.items():
            path = directory / name
            if path.stat().st_size != meta["size"] or file_sha256(path) != meta["sha256"]:
                return False
        return "model.safetensors" in files and "config.json" in files
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(float32 model, tokenizer, GGUF sha256) for a GGUF file, through the cache."""
    target, gguf_sha = _converted(path)
    return _load_converted(target), _cached_tokenizer(target), gguf_sha


def load_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a GGUF file, from the cache beside the converted weights (converting once if
    the cache lacks it): parsing a GGUF's tokenizer reads the whole file (240 MB for Gemma 3), so
    the stages that only decode tokens (report, check) read the small cached files instead."""
    target, _ = _converted(path)
    return _cached_tokenizer(target)


def _converted(path: Path) -> tuple[Path, str]:
    """(the valid cache directory of `path`, its sha256), converting or rebuilding it first."""
    gguf_sha = file_sha256(path)
    target = cache_root() / "converted" / gguf_sha
    if target.exists() and not _valid(target, gguf_sha):
        print(f"notice: model cache {target} is incomplete or corrupt; rebuilding it", file=sys.stderr)
        shutil.rmtree(target, ignore_errors=True)
    if not target.exists():
        _convert(path, gguf_sha, target)
    return target, gguf_sha


def _cached_tokenizer(target: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(target))


def _load_converted(target: Path) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)


def dequantise(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The float32 model and tokenizer of a GGUF file, converted by transformers (slow). A file the
    converter cannot read (damaged tensor data, an architecture it does not know) raises MlsaeError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dims(path)  # a header that does not parse fails here, in one line naming the file
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (MlsaeError, KeyboardInterrupt, MemoryError):
        raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS):
            raise
        raise MlsaeError(f"model: {path}: cannot convert this GGUF file ({_one_line(e)})") from None
    except Exception as e:  # the converter's own error types for a file it cannot read
        raise MlsaeError(f"model: {path}: cannot convert this GGUF file ({_one_line(e)})") from None
    return model, tok


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _convert(path: Path, gguf_sha: str, target: Path) -> None:
    """De-quantise the GGUF and write the cache directory atomically."""
    import transformers

    model, tok = dequantise(path)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        from safetensors.torch import save_file

        tmp.mkdir(parents=True)
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the float32 copy is not quantised
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        save_file(_unique_tensors(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        manifest = {
            "layout": _LAYOUT,
            "gguf_sha256": gguf_sha,
            "gguf_name": path.name,
            "transformers": transformers.__version__,
            "files": _files(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same conversion first
            shutil.rmtree(tmp, ignore_errors=True)
    except (KeyboardInterrupt, MlsaeError):
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # OSError, or safetensors' own error wrapping one
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError) and "IoError" not in str(e) and "No space left" not in str(e):
            raise
        if _disk_full(e):
            raise MlsaeError(
                f"model cache {target.parent}: disk full while writing the de-quantised {path.name} (about "
                f"{_weights_bytes(model) / 2**30:.1f} GiB); free space there or set MLSAE_CACHE to another disk"
            ) from None
        raise MlsaeError(
            f"model cache {target.parent}: cannot write the de-quantised {path.name} ({_one_line(e)}); "
            f"set MLSAE_CACHE to a writable directory"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _disk_full(e: BaseException) -> bool:
    """An ENOSPC, as an OSError or inside the message of a library's own error (safetensors writes
    through Rust and reports `IoError(Os { code: 28, kind: StorageFull, ... })`)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    text = str(e)
    return "No space left on device" in text or "StorageFull" in text


def _weights_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model).values())


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared (tied) tensor once, under its first name (the embedding,
    which transformers' loader ties the unembedding to), as `save_pretrained` would write it."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.detach().contiguous()
    return out
