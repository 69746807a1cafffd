"""A GGUF model's tokenizer comes from the cache beside its converted weights: after the first
conversion, `load_tokenizer` never parses the GGUF again (Gemma 3's is 240 MB)."""

from __future__ import annotations

import pytest

from mlsae.models.registry import load_tokenizer

pytestmark = pytest.mark.slow  # the embedded Gemma 3 (converted once into the shared model cache)


def test_gemma_tokenizer_is_read_from_the_cache_not_the_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    reference = load_tokenizer("gemma3-270m")  # converts into the cache if it is not there yet
    calls: list[dict] = []
    real = transformers.AutoTokenizer.from_pretrained

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording)
    again = load_tokenizer("gemma3-270m")
    assert calls and not any("gguf_file" in kw for kw in calls)  # the cached files, not the GGUF
    text = "def f(x):\n    return x  # a docstring's worth of text"
    assert again(text)["input_ids"] == reference(text)["input_ids"]
    assert again.bos_token_id == reference.bos_token_id == 2
