"""The converted-model cache: built once, reused, and rebuilt (never used) when damaged.

The GGUF conversion itself is replaced by the tiny Llama (a real HF model and tokenizer): what is
tested is the cache's contract, keyed by the file's content hash."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlsae.models import gguf_cache as model_cache
from mlsae.models.tiny import build_tiny


@pytest.fixture()
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[int]]:
    """A file standing for a GGUF, the cache under tmp_path, and a counter of conversions."""
    monkeypatch.setenv("MLSAE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not really a gguf file, but its hash keys the cache")
    calls: list[int] = []

    def dequantise(p: Path):
        calls.append(1)
        model, tok, _ = build_tiny("tiny-llama")
        return model, tok

    monkeypatch.setattr(model_cache, "dequantise", dequantise)
    return path, calls


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        return model(input_ids=ids).logits


def converted(path: Path) -> Path:
    return model_cache.cache_root() / "converted" / model_cache.file_sha256(path)


def test_converted_once_then_loaded_from_the_cache(fake_gguf):
    path, calls = fake_gguf
    model, tok, sha = model_cache.load_gguf(path)
    again, tok2, sha2 = model_cache.load_gguf(path)
    assert calls == [1] and sha == sha2 == model_cache.file_sha256(path)
    reference, _, _ = build_tiny("tiny-llama")
    torch.testing.assert_close(logits(again), logits(reference), rtol=0, atol=0)
    assert tok2("some text").input_ids == tok("some text").input_ids
    assert (converted(path) / model_cache.MANIFEST).is_file()


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest", "missing-file"])
def test_damaged_cache_is_rebuilt_never_used(fake_gguf, damage, capsys):
    path, calls = fake_gguf
    model_cache.load_gguf(path)
    weights = converted(path) / model_cache.WEIGHTS
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "no-manifest":  # an interrupted build that was renamed by hand, say
        (converted(path) / model_cache.MANIFEST).unlink()
    else:
        (converted(path) / "config.json").unlink()
    model, _, _ = model_cache.load_gguf(path)
    assert calls == [1, 1]
    assert "rebuilding" in capsys.readouterr().err
    reference, _, _ = build_tiny("tiny-llama")
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=0)


def test_another_file_gets_its_own_conversion(fake_gguf):
    path, calls = fake_gguf
    model_cache.load_gguf(path)
    other = path.with_name("other.gguf")
    other.write_bytes(b"different content")
    model_cache.load_gguf(other)
    assert calls == [1, 1] and converted(path) != converted(other)
