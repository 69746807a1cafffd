"""The check stage: every problem knowable before running, found before DVC deletes any output.

`check(params_path, manifest_path)` does these things, in this order:

1. Parses and validates params.yaml (`mlsae.core.params`), then runs every function of `CHECKS`
   on the typed params. Each is `fn(p: Params) -> None` and raises `MlsaeError` naming the keys
   at fault; add a cross-param rule by appending a small function to `CHECKS`. The model's
   dimensions (`model_dims`) are read only where that is cheap and offline: the tiny registry
   models' config, a GGUF file's metadata header (the embedded model or a `.gguf` path), a local
   Hugging Face directory's `config.json`, or a hub model's cached `config.json`; otherwise the
   model-dependent checks are left to extract.
2. Writes the corpus manifest (`data/corpus.json`, which extract depends on): for a local file,
   directory or glob `data.source`, the sorted files with their sha256 and size; for
   `embedded:python-docs`, the Python version, the sha256 of the pydoc topics and of the standard
   library's `.py` file list with sizes; for `hf:` sources, the spec string. No timestamps: the
   bytes are identical while the corpus is, so an unchanged corpus never reruns extract and an
   edited one always does. The file is rewritten only when its content changes.
0. First of all, prints a one-line notice when params.yaml differs from git HEAD's (see
   `params_drift`), so it shows even when a param is then rejected.

Why a stage of its own: DVC deletes a stage's outputs before running it, so params validated
inside a stage are validated too late; `check` is upstream of every other stage, so a rejected
param stops `dvc repro` / `dvc exp run` before anything is removed.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlsae.core.errors import MlsaeError
from mlsae.core.io import file_sha256, write_text
from mlsae.core.params import Params, load_params
from mlsae.data import corpus
from mlsae.sae.config import check_dead_window, check_k, resolve_dead_tokens

RESTORE_PARAMS = "git show HEAD:params.yaml > params.yaml"
"""The one-line fix for a params.yaml left over from a failed `dvc exp run -S` (the file looks
clean to git, so `git checkout -- params.yaml` and `git reset --hard` do not restore it)."""


# --------------------------------------------------------------------------------------------
# Model dimensions, read offline and cheaply
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDims:
    n_layers: int
    d_model: int
    max_context: int | None = None


def gguf_dims(path: str | Path) -> ModelDims:
    """Block count, embedding width and context length from a GGUF file's metadata header.

    Reads the key-value section sequentially and stops once the three keys are found (the
    tokenizer's large arrays and the tensors are never read)."""
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
    with open(path, "rb") as f:

        def read(fmt: str) -> Any:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8", "replace")

        def value(kind: int) -> Any:
            kind = T(kind)
            if kind == T.STRING:
                return string()
            if kind == T.ARRAY:
                item, n = read("<I"), read("<Q")
                if T(item) in scalar:  # skip without decoding
                    f.seek(n * struct.calcsize(scalar[T(item)]), 1)
                else:
                    for _ in range(n):
                        value(item)
                return None
            return read(scalar[kind])

        if f.read(4) != b"GGUF":
            raise MlsaeError(f"model: {path} is not a GGUF file")
        read("<I")  # version
        read("<Q")  # tensor count
        found: dict[str, Any] = {}
        for _ in range(read("<Q")):
            key = string()
            found[key] = value(read("<I"))
            arch = found.get("general.architecture")
            wanted = [f"{arch}.block_count", f"{arch}.embedding_length", f"{arch}.context_length"]
            if arch and all(k in found for k in wanted):
                return ModelDims(int(found[wanted[0]]), int(found[wanted[1]]), int(found[wanted[2]]))
    raise MlsaeError(f"model: {path}: GGUF metadata lacks the block count or embedding length")


def config_dims(path: str | Path) -> ModelDims | None:
    """Dimensions from a Hugging Face `config.json` (None when its keys are unfamiliar)."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    cfg = {**cfg.get("text_config", {}), **cfg}

    def first(*keys: str) -> int | None:
        return next((int(cfg[k]) for k in keys if isinstance(cfg.get(k), int)), None)

    n_layers, d_model = first("num_hidden_layers", "n_layer", "num_layers"), first("hidden_size", "n_embd", "d_model")
    if n_layers is None or d_model is None:
        return None
    return ModelDims(n_layers, d_model, first("max_position_embeddings", "n_positions"))


def model_dims(name: str) -> ModelDims | None:
    """The model's dimensions if they can be read offline without loading weights, else None.
    An unknown model name or a missing file raises MlsaeError (as `models.classify` does)."""
    from mlsae.models import hub
    from mlsae.models.registry import EMBEDDED, TINY, classify, embedded_gguf

    kind, target = classify(name)
    if kind == TINY:
        from mlsae.models.tiny import SIZES

        return ModelDims(SIZES["layers"], SIZES["hidden"], SIZES["context"])
    if kind in (EMBEDDED, "gguf"):
        return gguf_dims(embedded_gguf(target) if kind == EMBEDDED else target)
    if kind == "local":
        return config_dims(Path(target) / "config.json")
    cached = hub.cached_file(target, "config.json")
    return config_dims(cached) if cached else None


# --------------------------------------------------------------------------------------------
# Cross-param checks: each raises MlsaeError naming the keys; append new ones to CHECKS
# --------------------------------------------------------------------------------------------


def eval_split_tokens(p: Params) -> int:
    """Tokens of the eval split: data.eval_tokens rounded up to whole contexts."""
    return -(-p.data.eval_tokens // p.data.context) * p.data.context


def check_evaluate_tokens(p: Params) -> None:
    """An explicit evaluate.tokens must fit in the eval split (`auto` takes at most the split)."""
    n = eval_split_tokens(p)
    if p.evaluate.tokens != "auto" and p.evaluate.tokens > n:
        raise MlsaeError(
            f"evaluate.tokens: {p.evaluate.tokens} exceeds the eval split ({n} tokens: data.eval_tokens="
            f"{p.data.eval_tokens} in contexts of {p.data.context}); lower evaluate.tokens or raise data.eval_tokens"
        )


def check_model(p: Params) -> None:
    """The model exists; sae.k, sae.layers and data.context fit its dimensions when known."""
    dims = model_dims(p.model)
    if dims is None:
        return
    check_k(p.sae.k, p.sae.expansion * dims.d_model, p.sae.expansion)
    p.select_layers(dims.n_layers)  # raises naming sae.layers
    if dims.max_context is not None and p.data.context > dims.max_context:
        raise MlsaeError(
            f"data.context: {p.data.context} exceeds the maximum context of model {p.model} ({dims.max_context})"
        )


def check_lens_path(p: Params) -> None:
    """A local tuned-lens directory named for `lens: pretrained` must exist."""
    if p.lens == "pretrained" and p.lens_path and not Path(p.lens_path).is_dir():
        raise MlsaeError(f"lens_path: {p.lens_path} is not a directory (a tuned-lens directory for lens=pretrained)")


def check_corpus(p: Params) -> None:
    """A local or embedded corpus exists and holds a non-empty document (hf: sources are only
    parsed: reaching the hub is extract's job)."""
    source = p.data.source
    if source.startswith(corpus.HF_PREFIX):
        corpus.parse_hf_source(source)
        return
    next(corpus.iter_documents(source))  # raises MlsaeError for a missing, unsupported or empty corpus


def check_auxk_window(p: Params) -> None:
    """sae.dead_tokens below the run's length, or AuxK can never act (the train stage checks the
    exact length from its batch plan; the run has at most train_tokens x epochs tokens)."""
    if p.sae.source == "train" and p.sae.auxk > 0 and p.sae.auxk_coef > 0:
        most = p.data.train_tokens * p.train.epochs
        how = f"at most data.train_tokens {p.data.train_tokens} x train.epochs {p.train.epochs}"
        check_dead_window(resolve_dead_tokens(p.sae.dead_tokens, most), most, how)


FLOAT16_UNSAFE: dict[str, float] = {"gemma3-270m": 1.04e5}
"""Registry models whose residual entries are known to exceed float16's range (65504): the largest
|entry| measured on the embedded corpus (Gemma 3 270M: the BOS position, above 65504 at blocks
7-17, 103,794 at block 14; other positions reach 46,550 at block 17). Extract
refuses a non-finite write anyway; this check says so before anything runs."""


def check_storage_dtype(p: Params) -> None:
    """extract.dtype float16 for a model known to overflow it."""
    peak = FLOAT16_UNSAFE.get(p.model)
    if peak is not None and p.extract.dtype == "float16":
        raise MlsaeError(
            f"extract.dtype: float16 cannot hold {p.model}'s residuals (entries reach about {peak:.2g}; float16 "
            f"max 65504); use bfloat16 or float32, e.g. dvc exp run -S model={p.model} -S extract.dtype=bfloat16"
        )


CHECKS: list[Callable[[Params], None]] = [
    check_evaluate_tokens,
    check_lens_path,
    check_corpus,
    check_model,
    check_auxk_window,
    check_storage_dtype,
]


def validate(p: Params) -> None:
    for fn in CHECKS:
        fn(p)


# --------------------------------------------------------------------------------------------
# Corpus manifest
# --------------------------------------------------------------------------------------------


def _display(path: Path) -> str:
    """A path relative to the working directory when inside it (so manifests move with the repo)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def corpus_manifest(source: str) -> dict[str, Any]:
    """What decides the corpus's content (see the module docstring); deterministic."""
    if source.startswith(corpus.HF_PREFIX):
        return {"source": source}
    if source == corpus.EMBEDDED_PYTHON_DOCS:
        from pydoc_data.topics import topics

        root = Path(sysconfig.get_paths()["stdlib"])
        listing = "".join(
            f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}\n" for p in corpus.stdlib_source_files(root)
        )
        return {
            "source": source,
            "python": sys.version.split()[0],
            "topics_sha256": hashlib.sha256(json.dumps(topics, sort_keys=True).encode()).hexdigest(),
            "stdlib_files_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        }
    if source.startswith(corpus.EMBEDDED_PREFIX):
        raise MlsaeError(f"data.source {source!r}: unknown embedded corpus (known: {corpus.EMBEDDED_PYTHON_DOCS})")
    files = corpus._resolve_files(source)
    return {
        "source": source,
        "files": [{"path": _display(f), "size": f.stat().st_size, "sha256": file_sha256(f)} for f in files],
    }


def write_manifest(source: str, path: str | Path) -> bool:
    """Write the corpus manifest to `path` atomically unless it already holds the same bytes;
    True when it was (re)written."""
    path = Path(path)
    text = json.dumps(corpus_manifest(source), indent=2, sort_keys=True) + "\n"
    if path.is_file() and path.read_text() == text:
        return False
    write_text(path, text)
    return True


# --------------------------------------------------------------------------------------------
# The params.yaml trap
# --------------------------------------------------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def params_drift(path: str | Path = "params.yaml") -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose value in `path` differs from git HEAD's version: {key: (now, HEAD)}.

    Empty outside a git repository, without a HEAD, or when HEAD has no such file. During
    `dvc exp run -S key=value` the applied keys show here, which is expected; a key nobody set
    on this run is a leftover of an earlier, failed experiment (DVC leaves its values in the
    file and git's index does not notice, since DVC keeps the line lengths)."""
    path = Path(path)
    try:
        proc = subprocess.run(
            ["git", "show", f"HEAD:./{path.name}"],
            cwd=path.parent.resolve(),
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    if proc.returncode != 0:
        return {}
    try:
        head = _flatten(yaml.safe_load(proc.stdout) or {})
        now = _flatten(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError):
        return {}
    missing = object()
    return {
        k: (now.get(k), head.get(k))
        for k in sorted(set(head) | set(now))
        if now.get(k, missing) != head.get(k, missing)
    }


def drift_notice(drift: dict[str, tuple[Any, Any]], name: str = "params.yaml") -> str | None:
    """One line naming the differing keys, their HEAD values and the fix; None when no drift."""
    if not drift:
        return None
    keys = ", ".join(f"{k}={json.dumps(now)} (HEAD: {json.dumps(head)})" for k, (now, head) in drift.items())
    return (
        f"note: check: {name} differs from git HEAD: {keys}; if that is not this run's `-S`, it is left over "
        f"from a failed `dvc exp run`: restore it with `{RESTORE_PARAMS}`"
    )


# --------------------------------------------------------------------------------------------


def check(params_path: str | Path, manifest_path: str | Path, notice: Callable[[str], None] | None = None) -> Params:
    """Report params drift (first, so it shows even when a param is rejected), validate params
    (every check), then write the corpus manifest."""
    line = drift_notice(params_drift(params_path), Path(params_path).name)
    if line:
        (notice or (lambda s: print(s, file=sys.stderr)))(line)
    p = load_params(params_path)
    validate(p)
    write_manifest(p.data.source, manifest_path)
    return p
