"""The check stage: every problem knowable before running, found before DVC deletes any output.

`check(params_path, manifest_path)` does these things, in this order:

1. Parses and validates params.yaml (`mlsae.core.params`), then runs every function of `CHECKS`
   on the typed params. Each is `fn(p: Params) -> None` and raises `MlsaeError` naming the keys
   at fault; add a cross-param rule by appending a small function to `CHECKS`. The model's
   dimensions (`model_dims`) are read only where that is cheap and offline: the tiny registry
   models' config, a GGUF file's metadata header (the embedded model or a `.gguf` path), a local
   Hugging Face directory's `config.json`, or a hub model's cached `config.json`; otherwise the
   model-dependent checks are left to extract. The checks include every device the params name,
   a batch against the shuffle buffer and the run, a `lens_path` directory's contents, and a
   memory and disk estimate of the run against what this machine has (`check_resources`): a
   run that cannot fit fails here, saying how much it needs, not in extract after DVC deleted
   the old outputs.
2. Writes the corpus manifest (`data/corpus.json`, which extract depends on): for a local file,
   directory or glob `data.source`, the sorted files with their sha256 and size; for
   `embedded:python-docs`, the Python version, the sha256 of the pydoc topics and of the standard
   library's `.py` file list with sizes; for `hf:` sources, the spec string. No timestamps: the
   bytes are identical while the corpus is, so an unchanged corpus never reruns extract and an
   edited one always does. The file is rewritten only when its content changes.
3. Records the params it validated and the DVC process running it (`data/checkpoints/run.json`,
   `mlsae.core.stage.record_run`); every later stage refuses to start on other params, so two
   runs in one workspace cannot mix their params.yaml (`dvc exp run --queue` runs them apart).
0. First of all, prints a one-line notice when params.yaml differs from git HEAD's (see
   `params_drift`), so it shows even when a param is then rejected.

Why a stage of its own: DVC deletes a stage's outputs before running it, so params validated
inside a stage are validated too late; `check` is upstream of every other stage, so a rejected
param stops `dvc repro` / `dvc exp run` before anything is removed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_text
from mlsae.core.params import Params, load_params
from mlsae.core.paths import DATA, LENS_CONFIG, LENS_PARAMS
from mlsae.core.stage import record_run
from mlsae.data import corpus
from mlsae.models.gguf_cache import ModelDims, gguf_dims
from mlsae.sae.config import check_dead_window, check_k, resolve_dead_tokens

RESTORE_PARAMS = "git show HEAD:params.yaml > params.yaml"
"""The one-line fix for a params.yaml left over from a failed `dvc exp run -S` (the file looks
clean to git, so `git checkout -- params.yaml` and `git reset --hard` do not restore it)."""


# --------------------------------------------------------------------------------------------
# Model dimensions, read offline and cheaply
# --------------------------------------------------------------------------------------------


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
    """A local tuned-lens directory named for `lens: pretrained` must exist and hold a tuned lens:
    `config.json` (parsing, with the layer count and width, which must be the model's when known)
    and `params.pt`."""
    if p.lens != "pretrained" or not p.lens_path:
        return
    root = Path(p.lens_path)
    if not root.is_dir():
        raise MlsaeError(f"lens_path: {p.lens_path} is not a directory (a tuned-lens directory for lens=pretrained)")
    missing = [name for name in (LENS_CONFIG, LENS_PARAMS) if not (root / name).is_file()]
    if missing:
        raise MlsaeError(
            f"lens_path: {p.lens_path} holds no {' or '.join(missing)} (a tuned-lens directory has "
            f"{LENS_CONFIG} and {LENS_PARAMS})"
        )
    try:
        config = json.loads((root / LENS_CONFIG).read_text())
        layers, width = int(config["num_hidden_layers"]), int(config["d_model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MlsaeError(
            f"lens_path: {root / LENS_CONFIG} is not a tuned-lens config ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:120]})"
        ) from None
    dims = model_dims(p.model)
    if dims is not None and (layers, width) != (dims.n_layers, dims.d_model):
        raise MlsaeError(
            f"lens_path: {p.lens_path} is a lens for {layers} layers x d_model {width}, but model {p.model} has "
            f"{dims.n_layers} x {dims.d_model}"
        )


def check_devices(p: Params) -> None:
    """Every device the params name exists on this machine (CUDA present, the index in range)."""
    from mlsae.models.registry import resolve_device

    keys = {
        "extract.device": p.extract.device,
        "lens_fit.device": p.lens_fit.device,
        "train.device": p.train.device,
        "evaluate.device": p.evaluate.device,
        "dump.device": p.dump.device,
    }
    for key, spec in keys.items():
        if not spec:
            continue
        try:
            resolve_device(spec)
        except MlsaeError as e:
            raise MlsaeError(f"{key}: {str(e).removeprefix('device: ')}") from None


def train_split_tokens(p: Params) -> int:
    """Tokens the train stage can draw batches from: data.train_tokens in whole contexts."""
    return -(-p.data.train_tokens // p.data.context) * p.data.context


def check_batch(p: Params) -> None:
    """A batch fits in the shuffle buffer and in the run (the stage counts the usable tokens
    exactly; special tokens and position 0 only make it fewer)."""
    if p.sae.source != "train":
        return
    if p.train.batch_tokens > p.train.shuffle_buffer_tokens:
        raise MlsaeError(
            f"train.batch_tokens: {p.train.batch_tokens} exceeds train.shuffle_buffer_tokens "
            f"{p.train.shuffle_buffer_tokens} (batches are drawn from one buffer); lower it or raise the buffer"
        )
    n = train_split_tokens(p)
    if p.train.batch_tokens > n:
        raise MlsaeError(
            f"train.batch_tokens: {p.train.batch_tokens} exceeds the run's {n} train tokens (data.train_tokens="
            f"{p.data.train_tokens} in contexts of {p.data.context}); lower it or raise data.train_tokens"
        )


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
"""Registry models whose residual entries are known to exceed float16's range (65504), with a
bound on the largest |entry| on the embedded corpus (Gemma 3 270M: at the BOS position, in its
later blocks). Extract refuses a non-finite write anyway; this check says so before anything runs."""


def check_storage_dtype(p: Params) -> None:
    """extract.dtype float16 for a model known to overflow it."""
    peak = FLOAT16_UNSAFE.get(p.model)
    if peak is not None and p.extract.dtype == "float16":
        raise MlsaeError(
            f"extract.dtype: float16 cannot hold {p.model}'s residuals (entries reach about {peak:.2g}; float16 "
            f"max 65504); use bfloat16 or float32, e.g. dvc exp run -S model={p.model} -S extract.dtype=bfloat16"
        )


GIB = 2**30


def _bytes(n: float) -> str:
    """`n` bytes in GiB, or MiB below one GiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
EXTRACT_BYTES_PER_TOKEN = 24
"""Host memory extract holds per token of both splits before writing: the token stream and the
contexts cut from it (int32), their split copies, the special mask, and the store's per-token
arrays (tokens, context, special, position) as they are created."""
TRAIN_BYTES_PER_TOKEN = 18
"""Host memory the train stage's batch plan holds per train token (keep mask, row index, ids)."""


@dataclass(frozen=True)
class Need:
    memory: int
    disk: int
    why_memory: str
    why_disk: str


def estimate(p: Params, dims: ModelDims) -> Need:
    """A lower estimate of the run's peak host memory and of the disk its stores take: the token
    bookkeeping of extract (or of the train plan), one shard being written, the shuffle buffer and
    the SAE's training state; the activation store, the latent store and the SAE on disk. The
    model's own weights are not counted."""
    n_eval = eval_split_tokens(p)
    n_train = train_split_tokens(p)
    stored_train = n_train
    if p.train.source == "stream":
        stored_train = min(n_train, -(-p.data.sample_tokens // p.data.context) * p.data.context)
    layers = len(p.select_layers(dims.n_layers))
    item = ITEMSIZE[p.extract.dtype]
    vector = dims.n_layers * dims.d_model * item  # one token's residuals, every block
    n_latents = p.sae.expansion * dims.d_model
    shard = min(128 << 20, (stored_train + n_eval) * vector)
    extract_memory = (n_train + n_eval) * EXTRACT_BYTES_PER_TOKEN + 2 * shard
    sae_state = 4 * 2 * n_latents * dims.d_model * 4  # W_enc and W_dec: weights, grads, Adam's two moments
    step = 2 * p.train.batch_tokens * layers * n_latents * 4  # pre-activations, forward and backward
    buffer = p.train.shuffle_buffer_tokens * layers * dims.d_model * (item + 4)
    plan = n_train * TRAIN_BYTES_PER_TOKEN if p.train.source == "store" else 0
    train_memory = plan + buffer + sae_state + step
    store = (stored_train + n_eval) * (vector + 11)  # + tokens, context, position, special
    latents = n_eval * (layers * p.sae.k * 6 + 11)
    sae = 2 * n_latents * dims.d_model * 4
    if extract_memory >= train_memory:
        why_memory = f"extract holds ~{EXTRACT_BYTES_PER_TOKEN} bytes for each of {n_train + n_eval:,} tokens"
    else:
        why_memory = (
            f"train: shuffle buffer {_bytes(buffer)}, SAE state {_bytes(sae_state)}, batch {_bytes(step)}, "
            f"plan {_bytes(plan)}"
        )
    why_disk = (
        f"activation store {_bytes(store)}: {stored_train + n_eval:,} tokens x {dims.n_layers} blocks x "
        f"d_model {dims.d_model} x {item} bytes"
    )
    return Need(max(extract_memory, train_memory), store + latents + sae, why_memory, why_disk)


def _size(path: Path) -> int:
    """Bytes under `path` (0 when absent)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def machine(data_dir: Path = DATA) -> tuple[int, int]:
    """(physical memory, disk space for the stores): the free space of the disk holding `data/`
    plus what the stores it would replace take now."""
    import psutil

    probe = data_dir.absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free + sum(_size(data_dir / name) for name in ("activations.zarr", "latents.zarr"))
    return psutil.virtual_memory().total, free


def check_resources(p: Params) -> None:
    """The run fits the machine: memory and disk estimates (`estimate`) against its physical
    memory and the disk space under `data/`. Needs the model's dimensions (read offline)."""
    dims = model_dims(p.model)
    if dims is None:
        return
    need = estimate(p, dims)
    memory, disk = machine()
    keys = "data.train_tokens / data.eval_tokens"
    if need.memory > memory:
        raise MlsaeError(
            f"{keys}: this run needs at least {_bytes(need.memory)} of memory ({need.why_memory}), but this "
            f"machine has {_bytes(memory)}; lower them"
            + (" or use train.source: stream" if p.train.source == "store" else "")
        )
    if need.disk > disk:
        raise MlsaeError(
            f"{keys}: this run needs at least {_bytes(need.disk)} of disk under {DATA}/ ({need.why_disk}), but "
            f"{_bytes(disk)} are free there; lower them"
            + (", use train.source: stream" if p.train.source == "store" else "")
            + " or extract.dtype: float16/bfloat16"
        )


CHECKS: list[Callable[[Params], None]] = [
    check_evaluate_tokens,
    check_lens_path,
    check_corpus,
    check_model,
    check_auxk_window,
    check_storage_dtype,
    check_devices,
    check_batch,
    check_resources,
]


def validate(p: Params) -> None:
    for fn in CHECKS:
        fn(p)


# --------------------------------------------------------------------------------------------
# Corpus manifest
# --------------------------------------------------------------------------------------------


def corpus_manifest(source: str) -> dict[str, Any]:
    """What decides the corpus's content (see the module docstring); deterministic."""
    return corpus.manifest(source)


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


def check(
    params_path: str | Path,
    manifest_path: str | Path,
    notice: Callable[[str], None] | None = None,
    record: bool = False,
) -> Params:
    """Report params drift (first, so it shows even when a param is rejected), validate params
    (every check), write the corpus manifest, then, with `record`, record the validated params for
    the later stages of this run (`mlsae.core.stage.record_run`: one run per workspace)."""
    line = drift_notice(params_drift(params_path), Path(params_path).name)
    if line:
        (notice or (lambda s: print(s, file=sys.stderr)))(line)
    p = load_params(params_path)
    validate(p)
    write_manifest(p.data.source, manifest_path)
    if record:
        record_run(p, Path(params_path))
    return p
