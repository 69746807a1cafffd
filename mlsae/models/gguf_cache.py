"""The converted-model cache: a GGUF model de-quantised once, then loaded from safetensors.

Layout, one directory per GGUF file content under ``<cache>/converted/<sha256 of the GGUF>/``:

    config.json, tokenizer files     what ``save_pretrained`` writes (the HF model and tokenizer)
    model.safetensors                the de-quantised float32 weights
    manifest.json                    written last: the GGUF's sha256 and file name, the transformers
                                     version, and every other file's size and sha256

``<cache>`` is ``$MLSAE_CACHE``, else ``$XDG_CACHE_HOME/mlsae``, else ``~/.cache/mlsae``: outside
the repository, shared by every stage and every experiment.

Why: transformers de-quantises a GGUF tensor by tensor in Python (16–30 s for the 93 MB SmolLM2
file), and extract, lens fit, evaluate and browse each load the model. Loading the converted
safetensors takes a second or two.

Safety: a directory is built under a temporary name and renamed into place when whole, so a
reader never sees half of one. Before use, every file listed in the manifest is checked against
its size and sha256; a directory with no manifest, a missing file, or a mismatch (a partial copy,
a corrupted disk block) is deleted and rebuilt from the GGUF, with a notice on stderr. The key
is the GGUF's content hash, so a changed file never meets a stale conversion.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from mlsae.core.io import file_sha256

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
_LAYOUT = 1


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


def load_gguf(path: Path) -> tuple[nn.Module, object, str]:
    """(float32 model, tokenizer, GGUF sha256) for a GGUF file, through the cache."""
    from transformers import AutoTokenizer

    gguf_sha = file_sha256(path)
    target = cache_root() / "converted" / gguf_sha
    if target.exists() and not _valid(target, gguf_sha):
        print(f"notice: model cache {target} is incomplete or corrupt; rebuilding it", file=sys.stderr)
        shutil.rmtree(target, ignore_errors=True)
    if not target.exists():
        _convert(path, gguf_sha, target)
    return _load_converted(target), AutoTokenizer.from_pretrained(str(target)), gguf_sha


def _load_converted(target: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)


def dequantise(path: Path) -> tuple[nn.Module, object]:
    """The float32 model and tokenizer of a GGUF file, converted by transformers (slow)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model, tok


def _convert(path: Path, gguf_sha: str, target: Path) -> None:
    """De-quantise the GGUF and write the cache directory atomically."""
    import transformers

    model, tok = dequantise(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
