"""The activation store `data/activations.zarr` (Zarr v3, sharded): layout, writing, reading.

Layout: one group per split (`train`, `eval`), each with
  resid    (tokens, layers, d_model)  float16 | float32 | bfloat16 (stored as its uint16 bits)
  tokens   (tokens,) int32    context (tokens,) int32    position (tokens,) int16
  special  (tokens,) bool     document (tokens,) int64  (the token's document id: the resampling unit)
Root attrs: schema, model, revision, n_layers, d_model, hook, corpus, corpus_sha256 (the
content of the corpus, `mlsae.data.corpus.content_sha256`), context, dtype, data_seed,
shuffle_documents, document_tokens, split (the document split: seed, share, eval_until; no document
is in both splits), batch_size, device, shard_tokens, done (shards of `resid` written per split),
`arrays` (the completion record, see `seal`) and `complete`, set last. `resid` is written one whole
shard at a time (no read-modify-write of shards), so an interrupted extract resumes from the last
finished shard.

Integrity: every chunk of every array (`resid` and the metadata arrays alike) carries a CRC32C
checksum (as does every shard index), so a garbled or truncated chunk raises on read instead of
silently changing numbers; `guard` turns such read errors into one line naming the store and how
to rebuild it. A chunk that is not there at all would read as the fill value (zeros) with no
error, so a finished store records, for every array it holds, its shape, dtype and number of
stored chunks (`seal`), and every reader checks that each of those chunks exists (`verify`) before
reading anything. Both apply to the latent store too (mlsae/stores/latents.py).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from mlsae.core.errors import MlsaeError
from mlsae.core.paths import CONTEXT, DOCUMENT, HOOK_NAME, POSITION, RESID, SPECIAL, SPLITS, STORE_SCHEMA, TOKENS

NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
SHARD_TARGET_BYTES = 128 << 20
CHUNKS_PER_SHARD = 8
CHECKSUM = Crc32cCodec()
"""Bytes-to-bytes codec appended to the chunk codecs of every array of both stores."""
META_CODECS = [ZstdCodec(), CHECKSUM]
"""Compressors of the small per-token arrays (tokens, context, position, special, ...)."""
RECORD = "arrays"
"""Root attr of a finished store: {array path: {shape, dtype, chunks}}, see `seal`."""
# Every chunk is written even when it holds only the fill value (zarr skips those by default), so
# that a finished store has every chunk of its chunk grid on disk and a missing one is damage.
zarr.config.set({"array.write_empty_chunks": True})
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
        return zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise MlsaeError(f"{path}: store not found (run `dvc repro extract` first)") from None
    except Exception as e:  # corrupted metadata
        raise MlsaeError(f"{path}: cannot open store ({type(e).__name__}: {e})") from None


def lock_path(path: str | Path) -> str:
    """The lock file a store's writer holds (`mlsae.core.io.exclusive`): a hidden sibling,
    `data/.activations.zarr.lock` (URLs are not locked)."""
    path = str(path)
    return path if "://" in path else str(Path(path).with_name(f".{Path(path).name}.lock"))


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


# --------------------------------------------------------------------------------------------
# The completion record: every chunk present
# --------------------------------------------------------------------------------------------


def _arrays(root: zarr.Group) -> dict[str, zarr.Array]:
    """Every array under `root`, at any depth, by its path in the store (e.g. `train/resid`)."""
    return {name: node for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array)}


def _chunk_keys(arr: zarr.Array) -> list[str]:
    """The store keys of every chunk (every shard, for a sharded array) of `arr`'s chunk grid."""
    grid = arr.metadata.chunk_grid.chunk_shape  # the shard shape when sharded
    counts = [-(-n // c) for n, c in zip(arr.shape, grid)]
    return [arr.metadata.encode_chunk_key(coords) for coords in itertools.product(*map(range, counts))]


def _stored_keys(root: zarr.Group, name: str) -> set[str]:
    """The chunk keys stored under array `name` (relative to the array, e.g. `c/0/0/0`)."""
    prefix = f"{root.store_path.path}/{name}/".lstrip("/")

    async def listing() -> list[str]:
        return [key async for key in root.store.list_prefix(prefix)]

    return {key[len(prefix) :] for key in sync(listing())}


def _missing(root: zarr.Group, name: str, arr: zarr.Array) -> list[str]:
    stored = _stored_keys(root, name)
    return [key for key in _chunk_keys(arr) if key not in stored]


def seal(root: zarr.Group, path: str | Path, producer: str, **attrs: Any) -> None:
    """Mark a store finished: check that every chunk of every array is stored, then write the
    completion record (`RECORD`: each array's shape, dtype and chunk count) together with
    `complete: True` and `attrs`, in one metadata write. Raises MlsaeError naming a missing chunk."""
    record = {}
    for name, arr in sorted(_arrays(root).items()):
        missing = _missing(root, name, arr)
        if missing:
            raise MlsaeError(
                f"{path}: array {name} is missing chunk {missing[0]} ({len(missing)} of {len(_chunk_keys(arr))}) "
                f"after writing it; rebuild it with `dvc repro -f {producer}`"
            )
        record[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": len(_chunk_keys(arr))}
    root.attrs.update({**attrs, RECORD: record, "complete": True})


def verify(root: zarr.Group, path: str | Path, producer: str) -> None:
    """Check a finished store against its completion record: every recorded array exists with its
    shape and dtype, and every one of its chunks is stored. One MlsaeError line otherwise, naming
    the array and the fix (a missing chunk would otherwise read back as zeros)."""
    fix = f"restore it with `dvc checkout {path}` or rebuild it with `dvc repro -f {producer}`"
    record = root.attrs.get(RECORD)
    if not isinstance(record, dict) or not record:
        raise MlsaeError(f"{path}: no completion record (attr {RECORD!r}: written by an older version); {fix}")
    try:
        arrays = _arrays(root)
    except Exception as e:  # an array's metadata (zarr.json) that does not parse
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        raise MlsaeError(f"{path}: cannot read its arrays' metadata ({reason}); {fix}") from None
    for name, want in sorted(record.items()):
        arr = arrays.get(name)
        if arr is None:
            raise MlsaeError(f"{path}: array {name} is missing; {fix}")
        if not isinstance(want, dict) or [list(arr.shape), str(arr.dtype)] != [want.get("shape"), want.get("dtype")]:
            raise MlsaeError(
                f"{path}: array {name} has shape {list(arr.shape)} {arr.dtype}, its completion record says "
                f"{want!r}; {fix}"
            )
        missing = _missing(root, name, arr)
        if missing or want.get("chunks") != len(_chunk_keys(arr)):
            what = f"chunk {missing[0]} ({len(missing)} of {want.get('chunks')})" if missing else "chunks"
            raise MlsaeError(f"{path}: array {name} is missing {what}; {fix}")


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
            g.create_array(key, data=values, chunks=(max(1, min(len(values), 1 << 22)),), compressors=META_CODECS)
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
            raise MlsaeError(
                f"{self.path}: not an activation store of schema {STORE_SCHEMA} (schema "
                f"{self.attrs.get('schema')!r}); rebuild it with `dvc repro -f extract`"
            )
        if not allow_incomplete:
            if not self.attrs.get("complete"):
                raise MlsaeError(f"{self.path}: incomplete store (extract was interrupted); rerun `dvc repro extract`")
            verify(self.root, self.path, "extract")

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
        return self.root[name]

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
