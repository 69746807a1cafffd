"""Tuned lens: index convention, tuned-lens file interop, inverse, fitting and KL metrics.

Everything runs on a tiny randomly initialised Llama built in-process (no downloads).
Residual "block i" = output of decoder layer i; for i < L-1 that is HF hidden_states[i+1],
and the last block's output is taken with a hook because HF's last hidden state is post-norm.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from mlsae.core.errors import MlsaeError
from mlsae.core.paths import LENS_CONFIG, LENS_PARAMS
from mlsae.lens.fit import fit_lens, kl_by_layer, shuffled_chunks
from mlsae.lens.tuned import Lens, import_tuned_lens, load_pretrained

L, D, V = 4, 32, 256


@pytest.fixture(scope="module")
def model() -> transformers.LlamaForCausalLM:
    """A tiny random Llama; a wide init makes the layers' predictions differ."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def run(model: transformers.LlamaForCausalLM) -> dict[str, torch.Tensor | tuple[torch.Tensor, ...]]:
    """HF hidden states, logits and this project's residuals (tokens, L, D) for random text."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: object, output: object) -> None:
        captured["last"] = output[0] if isinstance(output, tuple) else output  # type: ignore[index]

    handle = model.model.layers[-1].register_forward_hook(hook)
    ids = torch.randint(0, V, (80, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    handle.remove()
    hs = out.hidden_states
    resid = torch.stack([*hs[1:L], captured["last"]], dim=2).reshape(-1, L, D)
    return {"hidden_states": tuple(h.reshape(-1, D) for h in hs), "logits": out.logits.reshape(-1, V), "resid": resid}


@pytest.fixture(scope="module")
def tl() -> object:
    """The tuned-lens package (with mlsae's transformer-lens 4 shim applied)."""
    return import_tuned_lens()


def random_lens(seed: int = 0, scale: float = 0.1) -> Lens:
    """A lens with random nonzero translators (including the unused translator 0)."""
    g = torch.Generator().manual_seed(seed)
    weight = scale * torch.randn(L, D, D, generator=g)
    bias = torch.randn(L, D, generator=g)
    return Lens(L, D, weight, bias)


def test_forward_follows_index_convention() -> None:
    """Block i uses translator i+1 (h + A h + b); the last block is the identity."""
    lens = random_lens()
    h = torch.randn(7, L, D)
    out = lens(h, range(L))
    for i in range(L - 1):
        expected = h[:, i] + h[:, i] @ lens.weight[i + 1].T + lens.bias[i + 1]
        torch.testing.assert_close(out[:, i], expected)
    torch.testing.assert_close(out[:, L - 1], h[:, L - 1], rtol=0, atol=0)
    # a subset of blocks, out of order, with extra leading dims
    sub = lens(h[:, [3, 1]].reshape(7, 1, 2, D), [3, 1]).reshape(7, 2, D)
    torch.testing.assert_close(sub, out[:, [3, 1]])


def test_bias_of_one_translator_moves_exactly_one_block(run: dict) -> None:
    """Setting translator 2's bias moves block 1 only; translator 0's moves nothing."""
    resid = run["resid"][:16]
    for translator, moved in ((2, {1}), (1, {0}), (3, {2}), (0, set())):
        bias = torch.zeros(L, D)
        bias[translator] = 1.0
        out = Lens(L, D, torch.zeros(L, D, D), bias)(resid)
        changed = {i for i in range(L) if not torch.equal(out[:, i], resid[:, i])}
        assert changed == moved, (translator, changed)
        for i in moved:
            torch.testing.assert_close(out[:, i], resid[:, i] + 1.0)


def test_residual_convention_matches_hf(model: transformers.LlamaForCausalLM, run: dict) -> None:
    """Block i < L-1 is hidden_states[i+1]; the last block is pre-norm and norm+unembed gives the logits."""
    resid, hs = run["resid"], run["hidden_states"]
    for i in range(L - 1):
        torch.testing.assert_close(resid[:, i], hs[i + 1], rtol=0, atol=0)
    assert not torch.allclose(resid[:, L - 1], hs[L])  # HF's last hidden state is post-norm
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(model.model.norm(resid[:, L - 1])), run["logits"])


def test_inverse_undoes_forward() -> None:
    """inverse(forward(h)) == h for random nonzero A, b, for all blocks and subsets, in float16 too."""
    lens = random_lens(scale=0.1)  # eigenvalues of I + A within 0.57 of 1: well conditioned
    h = 3 * torch.randn(5, 3, L, D)
    torch.testing.assert_close(lens.inverse(lens(h)), h, rtol=1e-5, atol=1e-4)
    for blocks in ([3], [0, 2], [2, 0, 3]):
        x = h[..., blocks, :]
        y = lens(x, blocks)
        moved = [j for j in range(len(blocks)) if not torch.equal(y[..., j, :], x[..., j, :])]
        assert moved == [j for j, b in enumerate(blocks) if b != L - 1]
        torch.testing.assert_close(lens.inverse(y, blocks), x, rtol=1e-5, atol=1e-4)
    half = h.half()
    out = lens.inverse(lens(half))
    assert out.dtype == torch.float16 and lens(half).dtype == torch.float16
    torch.testing.assert_close(out.float(), half.float(), rtol=0, atol=0.05)
    # independent closed form: solve (I + A) x = y - b for block 0 (translator 1)
    y = lens(h)[..., 0, :].reshape(-1, D).double()
    a, b = lens.weight[1].double(), lens.bias[1].double()
    x = torch.linalg.solve(torch.eye(D, dtype=torch.float64) + a, (y - b).T).T
    torch.testing.assert_close(x.float(), h[..., 0, :].reshape(-1, D), rtol=1e-5, atol=1e-4)


def test_inverse_cache_follows_parameter_changes() -> None:
    """Changing translators in place after an inverse call is picked up."""
    lens = random_lens()
    h = torch.randn(4, L, D)
    lens.inverse(h)
    lens.weight.mul_(2.0)
    torch.testing.assert_close(lens.inverse(lens(h)), h, rtol=1e-5, atol=1e-4)


def test_fingerprint_follows_the_translators(tmp_path: Path) -> None:
    """Lens.fingerprint (what a train checkpoint records of its lens): equal for equal translators,
    also after a save and load, and changed by one changed weight, a changed bias or another shape."""
    lens = random_lens(seed=3)
    assert lens.fingerprint() == random_lens(seed=3).fingerprint() and len(lens.fingerprint()) == 16
    lens.save(tmp_path / "lens")
    assert load_pretrained(str(tmp_path / "lens"), L, D, "tiny").fingerprint() == lens.fingerprint()
    assert random_lens(seed=4).fingerprint() != lens.fingerprint()
    nudged = copy.deepcopy(lens)
    with torch.no_grad():
        nudged.weight[2, 5, 7] += 1e-3
    assert nudged.fingerprint() != lens.fingerprint()
    shifted = copy.deepcopy(lens)
    with torch.no_grad():
        shifted.bias[1, 0] -= 1e-3
    assert shifted.fingerprint() != lens.fingerprint()
    assert Lens.identity(L, D).fingerprint() == Lens.identity(L, D).fingerprint()
    assert Lens.identity(L, D).fingerprint() != Lens.identity(L + 1, D).fingerprint() != lens.fingerprint()


def test_identity_lens_is_a_no_op(model: transformers.LlamaForCausalLM, run: dict, tmp_path: Path) -> None:
    """Identity forward/inverse return the input; its tuned KL equals the logit-lens KL; saved, it is all zeros."""
    lens = Lens.identity(L, D)
    h = torch.randn(6, L, D).half()
    assert torch.equal(lens(h), h) and torch.equal(lens.inverse(h), h)
    kl = kl_by_layer(lens, run["resid"][:200], model.model.norm, model.lm_head, 64)
    assert kl["kl_tuned_lens_by_layer"] == kl["kl_logit_lens_by_layer"]
    lens.save(tmp_path / "lens")
    loaded = Lens.load(tmp_path / "lens", L, D)
    assert not loaded.weight.any() and not loaded.bias.any()
    torch.testing.assert_close(loaded(h), h, rtol=0, atol=0)


def test_lens_saved_here_loads_in_tuned_lens(
    model: transformers.LlamaForCausalLM, run: dict, tl: object, tmp_path: Path
) -> None:
    """tuned_lens.TunedLens loads our directory and maps hidden_states[i+1] as we map block i."""
    lens = random_lens()
    lens.save(tmp_path / "lens", model_name="tiny-llama")
    theirs = tl.TunedLens.from_model_and_pretrained(model, str(tmp_path / "lens"))
    assert len(theirs) == L
    resid, hs = run["resid"][:100], run["hidden_states"]
    ours = lens(resid)
    with torch.no_grad():
        for i in range(L - 1):
            torch.testing.assert_close(theirs.transform_hidden(hs[i + 1][:100], i + 1), ours[:, i])
            torch.testing.assert_close(theirs(hs[i + 1][:100], i + 1), model.lm_head(model.model.norm(ours[:, i])))
    assert json.loads((tmp_path / "lens" / LENS_CONFIG).read_text())["base_model_name_or_path"] == "tiny-llama"


def test_lens_saved_by_tuned_lens_loads_here(
    model: transformers.LlamaForCausalLM, run: dict, tl: object, tmp_path: Path
) -> None:
    """A lens built and saved by the tuned-lens package loads here, matches, and round-trips its files."""
    theirs = tl.TunedLens.from_model(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for translator in theirs:
            translator.weight.copy_(0.1 * torch.randn(D, D, generator=g))
            translator.bias.copy_(torch.randn(D, generator=g))
    theirs.save(tmp_path / "theirs")
    lens = Lens.load(tmp_path / "theirs", L, D)
    resid, hs = run["resid"][:100], run["hidden_states"]
    ours = lens(resid)
    with torch.no_grad():
        for i in range(L - 1):
            torch.testing.assert_close(ours[:, i], theirs.transform_hidden(hs[i + 1][:100], i + 1))
    lens.save(tmp_path / "again")
    a = torch.load(tmp_path / "theirs" / LENS_PARAMS, weights_only=True)
    b = torch.load(tmp_path / "again" / LENS_PARAMS, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    conf_a = json.loads((tmp_path / "theirs" / LENS_CONFIG).read_text())
    conf_b = json.loads((tmp_path / "again" / LENS_CONFIG).read_text())
    assert conf_a == conf_b  # unembed hash and model name carried over


def test_save_is_atomic_and_replaces(tmp_path: Path) -> None:
    """Saving over an existing lens replaces its files, keeps other files, leaves no temporaries."""
    random_lens(0).save(tmp_path / "lens")
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == sorted([LENS_CONFIG, LENS_PARAMS])
    (tmp_path / "lens" / "record.json").write_text("{}")
    second = random_lens(1)
    second.save(tmp_path / "lens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens"]
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == sorted([LENS_CONFIG, LENS_PARAMS, "record.json"])
    assert torch.equal(Lens.load(tmp_path / "lens", L, D).weight, second.weight)


def test_mismatched_lens_is_rejected(tmp_path: Path) -> None:
    """Another d_model or layer count, a missing directory or a corrupt file: one-line MlsaeError naming the dir."""
    path = tmp_path / "lens"
    random_lens().save(path)
    with pytest.raises(MlsaeError, match=r"has 4 layers × d_model 32, but the model has 4 layers × d_model 64") as e:
        Lens.load(path, L, 64)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MlsaeError, match=r"has 4 layers × d_model 32, but the model has 6 layers") as e:
        Lens.load(path, 6, D)
    assert str(path) in str(e.value)
    with pytest.raises(MlsaeError, match="not a tuned-lens directory"):
        Lens.load(tmp_path / "missing", L, D)
    with pytest.raises(MlsaeError, match="lens_path"):
        load_pretrained(tmp_path / "missing", L, D, "tiny-llama")
    # config claims the right shape but the translators are wrong
    state = torch.load(path / LENS_PARAMS, weights_only=True)
    state["2.weight"] = torch.zeros(D, D + 1)
    torch.save(state, path / LENS_PARAMS)
    with pytest.raises(MlsaeError, match="translator 2 has shape"):
        Lens.load(path, L, D)
    (path / LENS_PARAMS).write_bytes(b"not a checkpoint")
    with pytest.raises(MlsaeError, match="unreadable parameters"):
        Lens.load(path, L, D)
    with pytest.raises(MlsaeError, match="out of range"):
        random_lens()(torch.zeros(2, 1, D), [L])


def test_load_pretrained_local_and_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local dir loads; the hub path offline fails in one line naming the alternatives."""
    lens = random_lens()
    lens.save(tmp_path / "lens")
    assert torch.equal(load_pretrained(str(tmp_path / "lens"), L, D, "tiny-llama").weight, lens.weight)

    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(MlsaeError) as e:
        load_pretrained("", L, D, "gpt2")
    message = str(e.value)
    assert "network" in message and "lens_path" in message and "lens=fit" in message and "gpt2" in message
    assert "\n" not in message


def test_kl_by_layer_matches_model_logits(model: transformers.LlamaForCausalLM, run: dict) -> None:
    """Logit-lens KL per block equals KL(model logits ‖ lm_head(norm(hidden_states[i+1]))), batching-invariant."""
    resid, hs, logits = run["resid"][:300], run["hidden_states"], run["logits"][:300]
    lens = random_lens(scale=0.05)
    kl = kl_by_layer(lens, resid.half(), model.model.norm, model.lm_head, batch=64)
    logp = F.log_softmax(logits, -1)
    with torch.no_grad():
        for i in range(L - 1):
            logq = F.log_softmax(model.lm_head(model.model.norm(hs[i + 1][:300])), -1)
            expected = (logp.exp() * (logp - logq)).sum(-1).mean().item()
            assert kl["kl_logit_lens_by_layer"][i] == pytest.approx(expected, rel=2e-3, abs=1e-4)
            logq = F.log_softmax(model.lm_head(model.model.norm(lens(resid[:, i : i + 1], [i])[:, 0])), -1)
            expected = (logp.exp() * (logp - logq)).sum(-1).mean().item()
            assert kl["kl_tuned_lens_by_layer"][i] == pytest.approx(expected, rel=2e-3, abs=1e-4)
    assert kl["kl_logit_lens_by_layer"][-1] == 0.0 and kl["kl_tuned_lens_by_layer"][-1] == 0.0
    assert kl["kl_logit_lens"] == pytest.approx(sum(kl["kl_logit_lens_by_layer"]) / L)
    other = kl_by_layer(lens, resid.numpy(), model.model.norm, model.lm_head, batch=300)
    assert other["kl_tuned_lens_by_layer"] == pytest.approx(kl["kl_tuned_lens_by_layer"], rel=2e-3)
    assert model.lm_head.weight.requires_grad  # the caller's module is left as it was
    half_norm, half_head = copy.deepcopy(model.model.norm).half(), copy.deepcopy(model.lm_head).half()
    half = kl_by_layer(lens, resid, half_norm, half_head, batch=128)
    assert half["kl_tuned_lens_by_layer"] == pytest.approx(kl["kl_tuned_lens_by_layer"], rel=2e-2, abs=1e-3)
    assert half_head.weight.dtype == torch.float16  # computed on a float32 copy


def test_fit_beats_logit_lens_on_held_out_tokens(model: transformers.LlamaForCausalLM, run: dict) -> None:
    """A fitted lens has lower held-out KL than the logit lens at every block but the last, reproducibly."""
    resid = run["resid"]
    train, held = resid[:2048].half(), resid[2048:]
    norm, head = model.model.norm, model.lm_head

    def fit(steps: int) -> tuple[Lens, dict]:
        return fit_lens(
            shuffled_chunks(train, 500), norm, head, L, D, steps=steps, lr=1e-2, batch_tokens=256,
            seed=0, eval_resid=held[:256], patience=2, progress=False, eval_every=10,
        )  # fmt: skip

    lens, info = fit(40)
    kl = kl_by_layer(lens, held[256:], norm, head, 128)
    for i in range(L - 1):
        assert kl["kl_tuned_lens_by_layer"][i] < 0.9 * kl["kl_logit_lens_by_layer"][i], (i, kl)
    assert kl["kl_tuned_lens_by_layer"][L - 1] == 0.0
    assert not lens.weight[0].any() and not lens.bias[0].any()  # the embedding translator is untouched
    assert info["eval_kl"] < info["eval_kl_initial"] and info["history"][0]["step"] == 0
    assert info["eval_kl"] == min(h["eval_kl"] for h in info["history"])
    first, again = fit(10)[0], fit(10)[0]
    assert first.weight.any() and torch.equal(again.weight, first.weight) and torch.equal(again.bias, first.bias)
    assert head.weight.grad is None  # frozen: no gradient reached the model


def test_fit_stops_early_and_keeps_best(model: transformers.LlamaForCausalLM, run: dict) -> None:
    """With a harmful learning rate the eval KL never improves: stop after `patience` evals, keep the identity."""
    resid = run["resid"]
    lens, info = fit_lens(
        shuffled_chunks(resid[:512], 100), model.model.norm, model.lm_head, L, D, steps=1000, lr=50.0,
        batch_tokens=64, seed=0, eval_resid=resid[2048:2304], patience=2, progress=False, eval_every=2,
    )  # fmt: skip
    assert info["stopped_early"] and info["steps"] == 4 and info["best_step"] == 0
    assert not lens.weight.any() and not lens.bias.any()
