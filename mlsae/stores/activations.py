"""The activation store `data/activations.zarr` (Zarr v3, sharded): layout, writing, reading.

Layout: one group per split (`train`, `eval`), each with
  resid    (tokens, layers, d_model)  float16 | float32 | bfloat16 (stored as its uint16 bits)
  tokens   (tokens,) int32    context (tokens,) int32    position (tokens,) int16
  special  (tokens,) bool     document (tokens,) int64  (the token's document id: the resampling unit)
Root attrs: schema, model, revision, n_layers, d_model, hook, corpus, context, dtype, data_seed,
shuffle_documents, document_tokens, split (the document split: seed, share, eval_until; no document
is in both splits), shard_tokens, done (shards of `resid` written per split) and `complete`, set
last.
`resid` is written one whole shard at a time (no read-modify-write of shards), so an interrupted
extract resumes from the last finished shard. Every chunk of `resid` carries a CRC32C checksum
(as does every shard index), so a garbled or truncated shard raises on read instead of silently
changing numbers; `guard` turns such read errors into one line naming the store and how to
rebuild it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from mlsae.core.errors import MlsaeError
from mlsae.core.paths import CONTEXT, DOCUMENT, HOOK_NAME, POSITION, RESID, SPECIAL, SPLITS, STORE_SCHEMA, TOKENS

NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
SHARD_TARGET_BYTES = 128 << 20
CHUNKS_PER_SHARD = 8
CHECKSUM = Crc32cCodec()
"""Bytes-to-bytes codec appended to the chunk codecs of the large arrays of both stores."""
# Packages whose frames, innermost in a traceback, mean "the store's bytes could not be decoded".
_READ_PACKAGES = ("zarr", "numcodecs", "crc32c", "google_crc32c")


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """A float tensor as the numpy array the store holds (bfloat16 as raw uint16 bits).

    Refuses non-finite values, so nothing non-finite is ever written: a residual the model made
    non-finite, or one the storage dtype cannot hold (float16 tops out at 65504, and Gemma's
    residual entries reach about 1e5). For a (tokens, layers, d) tensor the error names the block.
    """
    stored = x.to(TORCH_DTYPES[dtype]).cpu()
    if not bool(torch.isfinite(stored).all()):
        bad = ~torch.isfinite(stored)
        where = ""
        if bad.dim() == 3:
            where = f" at block {int(bad.any(-1).any(0).nonzero()[0])}"
        if not bool(torch.isfinite(x).all()):
            raise MlsaeError(f"model: the residual stream is non-finite{where}; nothing was written")
        peak = float(x.abs().max())
        raise MlsaeError(
            f"extract.dtype: {dtype} cannot hold the residuals (|x| reaches {peak:.4g}{where}; {dtype} "
            f"max {torch.finfo(TORCH_DTYPES[dtype]).max:.4g}); use extract.dtype: bfloat16 or float32"
        )
    x = stored
    if dtype == "bfloat16":
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def shard_contexts(context: int, n_layers: int, d_model: int, dtype: str) -> int:
    """Contexts per shard: whole contexts, about SHARD_TARGET_BYTES, a multiple of CHUNKS_PER_SHARD."""
    per_context = context * n_layers * d_model * np.dtype(NUMPY_DTYPES[dtype]).itemsize
    n = max(1, SHARD_TARGET_BYTES // per_context)
    return max(CHUNKS_PER_SHARD, n - n % CHUNKS_PER_SHARD)


def open_root(path: str, mode: str = "r") -> zarr.Group:
    try:
        return zarr.open_group(str(path), mode=mode)  # type: ignore[arg-type]
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise MlsaeError(f"{path}: store not found (run `dvc repro extract` first)") from None
    except Exception as e:  # corrupted metadata
        raise MlsaeError(f"{path}: cannot open store ({type(e).__name__}: {e})") from None


def exists(path: str) -> bool:
    try:
        zarr.open_group(str(path), mode="r")
        return True
    except Exception:
        return False


def _raised_in(exc: BaseException, packages: tuple[str, ...]) -> bool:
    """Whether the innermost frame of `exc`'s traceback is in one of `packages`."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    parts = Path(tb.tb_frame.f_code.co_filename).parts
    return any(name in parts for name in packages)


@contextlib.contextmanager
def guard(path: str | Path, producer: str) -> Iterator[None]:
    """Report a store that cannot be decoded (a checksum mismatch from a truncated or garbled
    shard, a shard index that does not parse) as one MlsaeError naming the store and how to get
    it back, never as a traceback and never computed on. `producer` is the stage that writes it.
    Disk errors (OSError) and MlsaeError pass through unchanged."""
    try:
        yield
    except (MlsaeError, OSError, KeyboardInterrupt):
        raise
    except Exception as e:
        if not _raised_in(e, _READ_PACKAGES):
            raise
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise MlsaeError(
            f"{path}: corrupted store, cannot be read ({reason}); restore it with `dvc checkout {path}` "
            f"or rebuild it with `dvc repro -f {producer}`"
        ) from None


@dataclass
class SplitData:
    """Token metadata of one split (known before the model runs)."""

    tokens: np.ndarray  # (contexts, context) int32
    special: np.ndarray  # (contexts, context) bool
    context_index: np.ndarray  # (contexts,) int32: index of the context in its split's stream
    document: np.ndarray  # (contexts, context) int64: each token's document id

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)


def create(path: str, attrs: dict[str, Any], splits: dict[str, SplitData]) -> zarr.Group:
    """A new, incomplete store with metadata arrays filled and `resid` empty."""
    n_layers, d_model, context, dtype = attrs["n_layers"], attrs["d_model"], attrs["context"], attrs["dtype"]
    largest = max(d.tokens.shape[0] for d in splits.values())
    per_shard = min(
        shard_contexts(context, n_layers, d_model, dtype), -(-largest // CHUNKS_PER_SHARD) * CHUNKS_PER_SHARD
    )
    shard_tokens = per_shard * context
    chunk_tokens = shard_tokens // CHUNKS_PER_SHARD
    root = zarr.open_group(str(path), mode="w")
    for name, data in splits.items():
        n = data.n_tokens
        g = root.create_group(name)
        g.attrs["n_contexts"] = int(data.tokens.shape[0])
        g.create_array(
            RESID,
            shape=(n, n_layers, d_model),
            dtype=NUMPY_DTYPES[dtype],
            chunks=(chunk_tokens, n_layers, d_model),
            shards=(shard_tokens, n_layers, d_model),
            compressors=[CHECKSUM],
            fill_value=0,
        )
        meta = {
            TOKENS: data.tokens.reshape(-1).astype(np.int32),
            CONTEXT: np.repeat(data.context_index.astype(np.int32), context),
            POSITION: np.tile(np.arange(context, dtype=np.int16), data.tokens.shape[0]),
            SPECIAL: data.special.reshape(-1).astype(bool),
            DOCUMENT: data.document.reshape(-1).astype(np.int64),
        }
        for key, values in meta.items():
            g.create_array(key, data=values, chunks=(max(1, min(len(values), 1 << 22)),))
    # The identifying attrs go last: a store interrupted while being created has none, so it is
    # never taken for a resumable one.
    root.attrs.update(
        {
            **attrs,
            "schema": STORE_SCHEMA,
            "hook": HOOK_NAME,
            "shard_tokens": shard_tokens,
            "done": {s: 0 for s in splits},
            "complete": False,
        }
    )
    return root


class ActivationStore:
    """Read access to a complete activation store."""

    def __init__(self, path: str, allow_incomplete: bool = False):
        self.path = str(path)
        self.root = open_root(self.path)
        self.attrs = dict(self.root.attrs)
        if self.attrs.get("schema") != STORE_SCHEMA:
            raise MlsaeError(f"{self.path}: not an activation store of schema {STORE_SCHEMA}")
        if not allow_incomplete and not self.attrs.get("complete"):
            raise MlsaeError(f"{self.path}: incomplete store (extract was interrupted); rerun `dvc repro extract`")

    @property
    def n_layers(self) -> int:
        return int(self.attrs["n_layers"])

    @property
    def d_model(self) -> int:
        return int(self.attrs["d_model"])

    @property
    def dtype(self) -> str:
        return str(self.attrs["dtype"])

    @property
    def shard_tokens(self) -> int:
        return int(self.attrs["shard_tokens"])

    @property
    def chunk_tokens(self) -> int:
        """Tokens per Zarr chunk of `resid` (the unit of a contiguous read)."""
        return self.shard_tokens // CHUNKS_PER_SHARD

    def split(self, name: str) -> zarr.Group:
        if name not in SPLITS:
            raise ValueError(name)
        return self.root[name]  # type: ignore[return-value]

    def n_tokens(self, split: str) -> int:
        return int(self.split(split)[TOKENS].shape[0])

    def resid(
        self, split: str, start: int, stop: int, layers: list[int] | None = None, raw: bool = False
    ) -> torch.Tensor:
        """Residuals of tokens [start, stop) (tokens, layers, d_model): float32, or the storage
        dtype when `raw` (half the memory for buffers)."""
        arr = self.split(split)[RESID]
        if layers is None or layers == list(range(self.n_layers)):
            block = arr[start:stop]
        elif layers == list(range(layers[0], layers[-1] + 1)):
            block = arr[start:stop, layers[0] : layers[-1] + 1]
        else:
            block = arr[start:stop][:, layers]
        x = from_storage(block, self.dtype)
        return x if raw else x.float()

    def meta(self, split: str, key: str) -> np.ndarray:
        return self.split(split)[key][:]

    @property
    def skip_first(self) -> bool:
        """Whether position 0 of every context is left out of training, metrics and analysis
        (decided by extract from `data.skip_first`, recorded in the store's attrs)."""
        return bool(self.attrs.get("skip_first", False))

    def keep(self, split: str) -> np.ndarray:
        """(tokens,) bool: the tokens that are trained on, measured and analysed: not special, and
        not position 0 of a context when the store says `skip_first` (read once per split, cached)."""
        cache = self.__dict__.setdefault("_keep", {})
        if split not in cache:
            keep = ~self.meta(split, SPECIAL).astype(bool)
            if self.skip_first:
                keep &= self.meta(split, POSITION) != 0
            cache[split] = keep
        return cache[split]

    def resid_kept(self, split: str, start: int, stop: int, layers: list[int] | None = None) -> torch.Tensor:
        """Float32 residuals of the kept tokens (see `keep`) among [start, stop) (kept, layers, d_model)."""
        x = self.resid(split, start, stop, layers)
        return x[torch.from_numpy(self.keep(split)[start : start + x.shape[0]])]

    def chunks(
        self,
        split: str,
        chunk_tokens: int,
        layers: list[int] | None = None,
        special: bool = False,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Residuals of tokens [start, stop) (default: the whole split) in token order,
        `chunk_tokens` store tokens per float32 tensor (tokens, layers, d_model); tokens not kept (see
        `keep`) are dropped unless `special`. The project's one chunked split reader (adjacent cosines,
        reconstruction metrics, dump)."""
        end = self.n_tokens(split) if stop is None else min(stop, self.n_tokens(split))
        for lo in range(start, end, chunk_tokens):
            hi = min(end, lo + chunk_tokens)
            yield self.resid(split, lo, hi, layers) if special else self.resid_kept(split, lo, hi, layers)

    def check_model(self, name: str) -> None:
        if self.attrs.get("model") != name:
            raise MlsaeError(
                f"{self.path}: store holds model {self.attrs.get('model')!r}, params say {name!r}; rerun extract"
            )
