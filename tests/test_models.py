"""Model loading and the residual stream, checked against independent Hugging Face copies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlsae.core.errors import MlsaeError
from mlsae.core.paths import HOOK_NAME
from mlsae.models.registry import REGISTRY, classify, load_model
from mlsae.models.tiny import SIZES, build_tiny

TINY = ["tiny-neox", "tiny-llama"]


@pytest.fixture(scope="module", params=TINY)
def tiny(request: pytest.FixtureRequest) -> tuple:
    """(loaded model, an independent unwrapped HF copy of it built from the same seed)."""
    loaded = load_model(request.param, "cpu")
    fresh = build_tiny(request.param)[0].eval()
    return loaded, fresh


def token_ids(vocab: int, batch: int = 3, length: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def final_norm_of(hf: torch.nn.Module) -> torch.nn.Module:
    base = hf.base_model
    return base.norm if hasattr(base, "norm") else base.final_layer_norm


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- names ----------------------------------------------------------------------------------


def test_classify_registry_hub_and_paths(tmp_path: Path) -> None:
    assert classify("pythia-70m") == ("hub", "EleutherAI/pythia-70m")
    assert classify("smollm2-135m") == ("embedded", "smollm2-135m")
    assert classify("tiny-llama") == ("tiny", "tiny-llama")
    assert classify("EleutherAI/pythia-160m") == ("hub", "EleutherAI/pythia-160m")
    hf_dir = tmp_path / "m"
    hf_dir.mkdir()
    with pytest.raises(MlsaeError, match="no config.json"):
        classify(str(hf_dir))
    (hf_dir / "config.json").write_text("{}")
    assert classify(str(hf_dir)) == ("local", str(hf_dir))
    with pytest.raises(MlsaeError, match="does not exist"):
        classify(str(tmp_path / "missing.gguf"))
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert classify(str(gguf)) == ("gguf", str(gguf))


@pytest.mark.parametrize("name", ["pythia70m", "no-such-model", ""])
def test_unknown_name_lists_known_models(name: str) -> None:
    with pytest.raises(MlsaeError) as info:
        load_model(name)
    message = str(info.value)
    assert message.startswith("model: ") and "\n" not in message
    assert all(known in message for known in REGISTRY)


# --- residual stream ------------------------------------------------------------------------


def test_metadata(tiny: tuple) -> None:
    loaded, fresh = tiny
    assert (loaded.n_layers, loaded.d_model, loaded.max_context) == (SIZES["layers"], SIZES["hidden"], SIZES["context"])
    assert loaded.vocab_size == fresh.config.vocab_size == len(loaded.tokenizer)
    assert loaded.revision.endswith("seed0")


def test_residuals_are_hf_hidden_states_and_last_is_pre_norm(tiny: tuple) -> None:
    loaded, fresh = tiny
    ids = token_ids(loaded.vocab_size)
    resid = loaded.residuals(ids)
    L = loaded.n_layers
    assert resid.shape == (3, 40, L, loaded.d_model) and resid.dtype == torch.float32
    with torch.no_grad():
        out = fresh(ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == L + 1
    for i in range(L - 1):
        assert rel(resid[:, :, i], hs[i + 1]) < 1e-5, i
    last = resid[:, :, L - 1]
    assert rel(last, hs[L]) > 0.1  # NOT HF's last hidden state, which is after the final norm
    with torch.no_grad():
        normed = final_norm_of(fresh)(last)
        assert rel(normed, hs[L]) < 1e-5
        assert rel(fresh.get_output_embeddings()(normed), out.logits) < 1e-5
    # the loaded model's own final norm and unembedding give the logits too
    with torch.no_grad():
        assert rel(loaded.unembed(loaded.final_norm(last)), out.logits) < 1e-5


def test_residuals_are_the_bridge_hook_resid_post(tiny: tuple) -> None:
    """The fast path reads exactly what transformer-lens calls blocks.{i}.hook_resid_post."""
    loaded, _ = tiny
    ids = token_ids(loaded.vocab_size, seed=1)
    _, cache = loaded.bridge.run_with_cache(ids)
    resid = loaded.residuals(ids)
    for i in range(loaded.n_layers):
        assert rel(resid[:, :, i], cache[HOOK_NAME.format(i=i)].float()) < 1e-5, i


def test_residuals_do_not_depend_on_the_batch(tiny: tuple) -> None:
    loaded, _ = tiny
    ids = token_ids(loaded.vocab_size, batch=4, length=24, seed=2)
    together = loaded.residuals(ids)
    alone = torch.cat([loaded.residuals(ids[i : i + 1]) for i in range(4)])
    assert rel(together, alone) < 1e-5


def test_bridge_is_lazy_and_never_wraps_the_hf_model(tiny: tuple) -> None:
    """Extraction needs no bridge; the bridge, once built, shares the HF model's weights (no
    copy) and leaves the HF model's own modules unwrapped."""
    loaded, fresh = tiny
    layer_type = type(fresh.base_model.layers[0])
    again = load_model(loaded.name, "cpu")
    again.residuals(token_ids(loaded.vocab_size, batch=1, length=8))
    assert "bridge" not in vars(again)  # not built
    bridged = {p.data_ptr() for p in loaded.bridge.parameters()}
    own = {p.data_ptr() for p in loaded.hf_model.parameters()}
    assert own and own <= bridged
    assert all(
        type(m).__module__.startswith("transformers.") or type(m).__module__.startswith("torch.")
        for m in loaded.hf_model.modules()
    )
    assert type(loaded.hf_model.base_model.layers[0]) is layer_type


def test_logits_and_splice_match_hf(tiny: tuple) -> None:
    loaded, fresh = tiny
    ids = token_ids(loaded.vocab_size, seed=3)
    with torch.no_grad():
        clean = fresh(ids).logits
    assert rel(loaded.logits(ids), clean) < 1e-5
    assert rel(loaded.logits(ids, {1: lambda x: x}), clean) < 1e-5

    shift = torch.randn(loaded.d_model, generator=torch.Generator().manual_seed(4))
    layer = fresh.base_model.layers[1]
    handle = layer.register_forward_hook(
        lambda m, a, out: (out[0] + shift, *out[1:]) if isinstance(out, tuple) else out + shift
    )
    try:
        with torch.no_grad():
            shifted = fresh(ids).logits
    finally:
        handle.remove()
    spliced = loaded.logits(ids, {1: lambda x: x + shift})
    assert rel(spliced, shifted) < 1e-5 and rel(spliced, clean) > 1e-3
