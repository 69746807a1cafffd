"""The baseline and evaluate stages: reconstruction metrics against numpy, the per-document splice
sums against an independent Hugging Face computation, the figures made from them (delta CE, KL,
the loss recovered), the spliced sample, the splice's layer, the tuned lens's inverse, `lens: none`.

The store comes from the tiny random Llama (4 blocks, d_model 64). Downstream metrics use a copy of
that model fine-tuned for a few dozen steps on the store's train contexts: a random model is no
better than the uniform distribution, so zero-ablating a block cannot hurt it (its delta_ce_zero
is slightly *negative*). The fine-tuned one is clearly better than uniform, so zero ablation must
cost it, while a perfect reconstruction must cost nothing.
"""

from __future__ import annotations

import copy
import json
import math
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import run_train as train
from mlsae.core import paths as C
from mlsae.core.errors import MlsaeError
from mlsae.core.params import parse_params
from mlsae.evaluation.baseline import ablation_figures, baseline, layer_means
from mlsae.evaluation.downstream import _ROWS, SpliceSums, _ce_kl, splice_sums
from mlsae.evaluation.reconstruction import evaluate, reconstruction, reconstruction_metrics, splice_figures
from mlsae.evaluation.sample import AUTO_TOKENS, SplicedSample, resolve_tokens, spliced_sample
from mlsae.lens.build import run_lens_stage
from mlsae.lens.loading import load_stage_lens
from mlsae.lens.tuned import Lens
from mlsae.models.registry import LoadedModel, load_model
from mlsae.sae.model import MLSAE, NORM_EPS, SEED_NORM_EPS, SAEConfig
from mlsae.stores.activations import ActivationStore

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures `store`, `reader`: conftest.py


SAE_RAW = {
    "sae": {"layers": [1, 3], "expansion": 4, "k": 8, "auxk": 32, "dead_tokens": 256},
    "train": {
        "batch_tokens": 128,
        "lr": 1e-3,
        "epochs": 1,
        "shuffle_buffer_tokens": 512,
        "geometric_median_sample": 256,
        "device": "cpu",
    },
    "evaluate": {"tokens": 64, "batch_size": 2},
}


def raw_params(store: tuple[Path, dict]) -> dict:
    return {**copy.deepcopy(store[1]), **copy.deepcopy(SAE_RAW)}


@pytest.fixture(scope="module")
def sae(store: tuple[Path, dict], reader: ActivationStore, tmp_path_factory: pytest.TempPathFactory) -> MLSAE:
    """A briefly trained MLSAE on blocks 1 and 3 (non-contiguous: exercises layer selection)."""
    tmp = tmp_path_factory.mktemp("sae")
    train(parse_params(raw_params(store)), reader, Lens.identity(4, 64), tmp / "sae", tmp / "ckpt", progress=False)
    return MLSAE.load(tmp / "sae").eval()


@pytest.fixture(scope="module")
def model(reader: ActivationStore) -> LoadedModel:
    """tiny-llama fine-tuned (60 Adam steps) on the store's train contexts; see the module docstring."""
    m = load_model("tiny-llama", "cpu")
    ids = torch.from_numpy(reader.split("train")[C.TOKENS][:].reshape(-1, 32).astype(np.int64))
    hf = m.hf_model
    hf.train().requires_grad_(True)
    opt = torch.optim.Adam(hf.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = ids[torch.randint(0, ids.shape[0], (16,), generator=g)]
        loss = hf(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    hf.eval().requires_grad_(False)
    return m


def random_lens(n_layers: int = 4, d: int = 64, seed: int = 0) -> Lens:
    g = torch.Generator().manual_seed(seed)
    weight = 0.2 * torch.randn(n_layers, d, d, generator=g) / math.sqrt(d)
    bias = 0.5 * torch.randn(n_layers, d, generator=g)
    return Lens(n_layers, d, weight, bias)


LENSES = {"identity": lambda: Lens.identity(4, 64), "tuned": random_lens}


def perfect_sae(d: int, layers: list[int]) -> MLSAE:
    """A genuine MLSAE that reconstructs every vector exactly: latents relu(x̂), relu(−x̂) with
    decoder columns ±e_i (unit norm), k = n_latents = 2d, b_pre = 0."""
    sae = MLSAE(SAEConfig(d_model=d, n_latents=2 * d, k=2 * d, layers=layers, auxk=0, normalisation="vector"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]).T)
        sae.b_pre.zero_()
    return sae.eval()


# ---------------------------------------------------------------------------------------------
# independent computations (float64, dense)


def np_lens(lens: Lens, x: np.ndarray, block: int) -> np.ndarray:
    """Block `block`'s vectors into lens space: translator block+1, none for the last block."""
    if lens.is_identity or block == lens.n_layers - 1:
        return x
    a, b = lens.weight[block + 1].double().numpy(), lens.bias[block + 1].double().numpy()
    return x + x @ a.T + b


def np_lens_inverse(lens: Lens, y: np.ndarray, block: int) -> np.ndarray:
    if lens.is_identity or block == lens.n_layers - 1:
        return y
    a, b = lens.weight[block + 1].double().numpy(), lens.bias[block + 1].double().numpy()
    return np.linalg.solve(np.eye(a.shape[0]) + a, (y - b).reshape(-1, a.shape[0]).T).T.reshape(y.shape)


def np_sae(sae: MLSAE, x: np.ndarray) -> dict[str, np.ndarray]:
    """Standardise each vector, dense TopK + ReLU, decode; float64."""
    w_enc, w_dec = sae.W_enc.detach().double().numpy(), sae.W_dec.detach().double().numpy()
    b_pre = sae.b_pre.detach().double().numpy()
    mean = x.mean(-1, keepdims=True)
    if sae.cfg.normalisation == "seed":  # unbiased std, eps added to it; decoded with the std alone
        std = x.std(-1, ddof=1, keepdims=True)
        xn = (x - mean) / (std + SEED_NORM_EPS)
    else:
        std = np.sqrt(x.var(-1, keepdims=True) + NORM_EPS)
        xn = (x - mean) / std
    z = (xn - b_pre) @ w_enc.T
    idx = np.argpartition(-z, sae.cfg.k - 1, axis=-1)[..., : sae.cfg.k]
    val = np.maximum(np.take_along_axis(z, idx, -1), 0)
    code = np.zeros_like(z)
    np.put_along_axis(code, idx, val, -1)
    xn_hat = code @ w_dec.T + b_pre
    return {"xn": xn, "xn_hat": xn_hat, "recon": xn_hat * std + mean, "code": code}


def hf_logits(model: LoadedModel, ids: torch.Tensor, block: int | None = None, fn=None) -> torch.Tensor:
    """The HF model's logits, optionally with decoder layer `block`'s output replaced by fn(output)."""
    handle = None
    if block is not None:

        def hook(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            new = fn(h).to(h.dtype)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handle = model.hf_model.base_model.layers[block].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model.hf_model(ids).logits.double()
    finally:
        if handle is not None:
            handle.remove()


def hf_downstream(model: LoadedModel, sample: SplicedSample, sae: MLSAE, lens: Lens, means: np.ndarray) -> dict:
    """Independent reference, per document of the sample: HF forward hooks replace decoder layer
    ℓ's output at the kept positions (not special, not a skipped position 0) with numpy's
    reconstruction, zeros, or the layer's mean; the loss positions are those t with t and t+1 kept
    (t+1 > 0, so not a skipped position 0), each counted for the document of token t. Returns the
    per-document sums: units, count, ce_clean (U,), ce and kl per variant (U, L)."""
    ids = torch.from_numpy(sample.tokens.astype(np.int64))
    keep = torch.from_numpy(~sample.excluded)
    assert torch.equal(keep, torch.from_numpy(~sample.special) & keep)  # specials are never kept
    mask = (keep[:, :-1] & keep[:, 1:]).numpy()
    units, unit = np.unique(sample.document[:, :-1][mask], return_inverse=True)
    tgt = ids[:, 1:, None]
    clean = F.log_softmax(hf_logits(model, ids)[:, :-1], -1)

    def per_unit(values: torch.Tensor) -> np.ndarray:
        return np.bincount(unit, values.numpy()[mask], minlength=len(units))

    def ce_kl(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        logp = F.log_softmax(logits[:, :-1], -1)
        return per_unit(-logp.gather(-1, tgt)[..., 0]), per_unit((clean.exp() * (clean - logp)).sum(-1))

    def at_kept(new):
        return lambda h: torch.where(keep[..., None], new(h).to(h.dtype), h)

    def recon(j: int, block: int):
        def fn(h: torch.Tensor) -> torch.Tensor:
            x = h.double().numpy()
            out = np_sae(sae, np_lens(lens, x, block))["recon"]
            return torch.from_numpy(np_lens_inverse(lens, out, block))

        return at_kept(fn)

    variants = {
        "recon": recon,
        "zero": lambda j, b: at_kept(torch.zeros_like),
        "mean": lambda j, b: at_kept(lambda h: torch.from_numpy(means[j]).expand_as(h)),
    }
    out = {
        "units": units,
        "count": np.bincount(unit, minlength=len(units)).astype(float),
        "ce_clean": per_unit(-clean.gather(-1, tgt)[..., 0]),
    }
    for name, make in variants.items():
        pairs = [ce_kl(hf_logits(model, ids, b, make(j, b))) for j, b in enumerate(sae.cfg.layers)]
        out[f"ce_{name}"] = np.stack([c for c, _ in pairs], 1)
        out[f"kl_{name}"] = np.stack([k for _, k in pairs], 1)
    return out


def run_downstream(
    sae: MLSAE,
    lens: Lens,
    model: LoadedModel,
    reader: ActivationStore,
    n_tokens: int,
    batch_size: int,
    resamples: int = 0,
) -> dict:
    """The baseline stage's sums (mean and zero ablations) and evaluate's recon sums on one spliced
    sample, and their figures (plug-in; with `resamples`, also the resampled figures)."""
    sample = spliced_sample(reader, n_tokens, 0)
    base = baseline(model, reader, sae.cfg.layers, sample, ["mean", "zero"], batch_size, progress=False)
    recon = splice_sums(model, sample, sae.cfg.layers, {"recon": reconstruction(sae, lens)}, batch_size, progress=False)
    out = {**ablation_figures(base, 0, 0), **splice_figures(recon, base, 0, 0)}
    resampled = (
        {**ablation_figures(base, resamples, 0), **splice_figures(recon, base, resamples, 0)} if resamples else {}
    )
    means = layer_means(reader, sae.cfg.layers).double().numpy()
    return {**out, "resampled": resampled, "base": base, "recon": recon, "sample": sample, "means": means}


# ---------------------------------------------------------------------------------------------
# reconstruction metrics


@pytest.mark.parametrize("lens_kind", list(LENSES))
def test_reconstruction_metrics_match_numpy(sae: MLSAE, reader: ActivationStore, lens_kind: str) -> None:
    lens = LENSES[lens_kind]()
    keep = reader.keep("eval")
    assert (~keep).any(), "the test store's eval split must hold special tokens"
    got = reconstruction_metrics(sae, lens, reader, chunk=100, progress=False)  # 100: chunks straddle contexts

    x = reader.resid("eval", 0, reader.n_tokens("eval")).double().numpy()[keep]
    fvu, mse, l0, fired = [], [], [], np.zeros(sae.cfg.n_latents, bool)
    for block in sae.cfg.layers:
        r = np_sae(sae, np_lens(lens, x[:, block], block))
        err = ((r["xn"] - r["xn_hat"]) ** 2).sum()
        fvu.append(err / ((r["xn"] - r["xn"].mean(0)) ** 2).sum())
        mse.append(err / r["xn"].size)
        l0.append((r["code"] > 0).sum(-1).mean())
        fired |= (r["code"] > 0).any(0)
    np.testing.assert_allclose(got["fvu_by_layer"], fvu, rtol=1e-4)
    np.testing.assert_allclose(got["mse_by_layer"], mse, rtol=1e-4)
    np.testing.assert_allclose(got["l0_by_layer"], l0, rtol=1e-3)
    assert got["fvu"] == pytest.approx(np.mean(fvu), rel=1e-4) and got["l0"] == pytest.approx(np.mean(l0), rel=1e-3)
    assert got["dead_fraction"] == pytest.approx(1 - fired.mean(), abs=2 / sae.cfg.n_latents)
    assert got["eval_vectors"] == keep.sum() * len(sae.cfg.layers)
    assert min(fvu) > 0 and max(l0) <= sae.cfg.k


def test_reconstruction_metrics_resample_documents(sae: MLSAE, reader: ActivationStore) -> None:
    """The resampling units of fvu are the eval documents: the delete-one-document jackknife, by
    hand (each document's squared error and spread about the split's mean), gives fvu's bias
    estimate; the plug-in is the unresampled fvu."""
    lens = Lens.identity(4, 64)
    plain = reconstruction_metrics(sae, lens, reader, progress=False)
    got = reconstruction_metrics(sae, lens, reader, progress=False, n_resamples=100, seed=0)
    keep = reader.keep("eval")
    document = reader.meta("eval", C.DOCUMENT)[keep]
    units, unit = np.unique(document, return_inverse=True)
    assert got["bootstrap_units"] == len(units) >= 5
    x = reader.resid("eval", 0, reader.n_tokens("eval")).double().numpy()[keep]
    err = np.zeros((len(units), 2))
    ss = np.zeros((len(units), 2))
    for j, block in enumerate(sae.cfg.layers):
        r = np_sae(sae, x[:, block])
        err[:, j] = np.bincount(unit, ((r["xn"] - r["xn_hat"]) ** 2).sum(-1))
        ss[:, j] = np.bincount(unit, ((r["xn"] - r["xn"].mean(0)) ** 2).sum(-1))
    plugin = (err.sum(0) / ss.sum(0)).mean()
    jack = ((err.sum(0) - err) / (ss.sum(0) - ss)).mean(1)
    assert got["fvu_plugin"] == pytest.approx(plugin, rel=1e-4)
    assert got["fvu_plugin"] == pytest.approx(plain["fvu"], rel=1e-9)
    np.testing.assert_allclose(got["fvu_plugin_by_layer"], plain["fvu_by_layer"], rtol=1e-9)
    bias = (len(units) - 1) * (jack.mean() - plugin)
    assert got["fvu_bias_jack"] == pytest.approx(bias, rel=1e-2, abs=1e-6)
    assert got["fvu"] == pytest.approx(got["fvu_plugin"] - got["fvu_bias_jack"], rel=1e-12)
    lo, hi = got["fvu_ci"]
    assert lo <= got["fvu"] <= hi and lo < hi and got["fvu_se"] > 0


# ---------------------------------------------------------------------------------------------
# the spliced sample


def test_spliced_sample_draws_whole_eval_contexts(reader: ActivationStore) -> None:
    n_ctx = reader.n_tokens("eval") // 32
    assert resolve_tokens("auto", n_ctx * 32, 32) == min(AUTO_TOKENS, n_ctx * 32) == n_ctx * 32 == 512
    assert resolve_tokens("auto", 10**6, 32) == AUTO_TOKENS == 2048
    assert resolve_tokens(100, 512, 32) == 100
    with pytest.raises(MlsaeError, match=r"^evaluate.tokens: 600 is more than the eval split's 512 tokens"):
        resolve_tokens(600, 512, 32)
    whole = spliced_sample(reader, "auto", 0)
    assert np.array_equal(whole.contexts, np.arange(n_ctx))
    for seed in (0, 1):
        sample = spliced_sample(reader, 70, seed)  # 70 tokens: 3 whole contexts
        chosen = np.sort(np.random.default_rng([seed, 2]).choice(n_ctx, 3, replace=False))
        assert np.array_equal(sample.contexts, chosen) and sample.tokens.shape == (3, 32)
        rows = (chosen[:, None] * 32 + np.arange(32)).reshape(-1)
        for got, key in ((sample.tokens, C.TOKENS), (sample.special, C.SPECIAL), (sample.document, C.DOCUMENT)):
            assert np.array_equal(got.reshape(-1), reader.meta("eval", key)[rows]), key
        assert np.array_equal(sample.excluded.reshape(-1), ~reader.keep("eval")[rows])
        assert sample.fingerprint() == spliced_sample(reader, 70, seed).fingerprint()
    assert spliced_sample(reader, 70, 0).fingerprint() != spliced_sample(reader, 70, 1).fingerprint()


# ---------------------------------------------------------------------------------------------
# downstream metrics


def test_layer_means_are_the_eval_splits_analysed_means(reader: ActivationStore) -> None:
    x = reader.resid("eval", 0, reader.n_tokens("eval")).double().numpy()[reader.keep("eval")]
    np.testing.assert_allclose(layer_means(reader, [1, 3]).numpy(), x[:, [1, 3]].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lens_kind", list(LENSES))
def test_splice_sums_match_hf_splice_per_document(
    sae: MLSAE, model: LoadedModel, reader: ActivationStore, lens_kind: str
) -> None:
    """Splicing from the spliced block (recorded calls, rerun of the later blocks) equals replacing
    HF decoder layer ℓ's output in a whole forward, per eval document, for the SAE's own blocks
    (1 and 3), the three variants, over several batches with special (and skipped) positions kept
    clean and masked; the figures are the ratios of those sums."""
    lens = LENSES[lens_kind]()
    n_ctx = reader.n_tokens("eval") // 32
    got = run_downstream(sae, lens, model, reader, n_ctx * 32, batch_size=6, resamples=200)
    base, recon, sample = got["base"], got["recon"], got["sample"]
    ref = hf_downstream(model, sample, sae, lens, got["means"])
    assert len(ref["units"]) >= 5  # several documents: the units of every sum
    for sums in (base, recon):
        assert np.array_equal(sums.units, ref["units"]) and np.array_equal(sums.count, ref["count"])
        assert sums.layers == [1, 3] and sums.sample == sample.fingerprint()
        np.testing.assert_allclose(sums.ce_clean, ref["ce_clean"], rtol=1e-5, atol=1e-4)
    assert got["ce_clean"] == pytest.approx(ref["ce_clean"].sum() / ref["count"].sum(), abs=1e-5)
    assert base.count.sum() == recon.count.sum() < n_ctx * 31  # special positions were masked
    assert base.variants == ("mean", "zero") and recon.variants == ("recon",)
    assert base.spliced_token_layers == n_ctx * 32 * 2 * 2 and recon.spliced_token_layers == n_ctx * 32 * 2
    for name, sums in (("recon", recon), ("mean", base), ("zero", base)):
        ce, kl = sums.variant(name)
        np.testing.assert_allclose(ce, ref[f"ce_{name}"], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(kl, ref[f"kl_{name}"], rtol=1e-3, atol=1e-4)
    # the figures, by hand from the reference sums: ratios of sums over documents
    n, clean = ref["count"].sum(), ref["ce_clean"].sum() / ref["count"].sum()
    for name, suffix in (("recon", ""), ("zero", "_zero"), ("mean", "_mean")):
        delta = ref[f"ce_{name}"].sum(0) / n - clean
        np.testing.assert_allclose(got[f"delta_ce{suffix}_by_layer"], delta, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(got[f"kl{suffix}_by_layer"], ref[f"kl_{name}"].sum(0) / n, rtol=1e-3, atol=1e-5)
        assert got[f"delta_ce{suffix}"] == pytest.approx(delta.mean(), rel=1e-3, abs=1e-5)
        resampled = got["resampled"]
        assert resampled[f"delta_ce{suffix}_plugin"] == pytest.approx(got[f"delta_ce{suffix}"], rel=1e-9)
        lo, hi = resampled[f"delta_ce{suffix}_ci"]
        assert lo <= resampled[f"delta_ce{suffix}"] <= hi and lo < hi
        assert len(resampled[f"delta_ce{suffix}_by_layer_ci"]) == 2
    recovered = 1 - (ref["ce_recon"].sum(0) / n - clean) / (ref["ce_mean"].sum(0) / n - clean)
    np.testing.assert_allclose(got["loss_recovered_by_layer"], recovered, rtol=1e-3)
    assert got["loss_recovered"] == pytest.approx(recovered.mean(), rel=1e-3)
    # a briefly trained SAE is imperfect: splicing it costs something at every layer
    assert min(got["kl_by_layer"]) > 1e-3
    # the fine-tuned model is far better than uniform, so zero ablation costs a lot, and more than
    # replacing the layer by its mean
    assert got["delta_ce_zero"] > 1.0
    assert got["delta_ce_mean"] < got["delta_ce_zero"]


def test_loss_recovered_is_one_minus_the_ratio_of_the_sums(
    sae: MLSAE, model: LoadedModel, reader: ActivationStore
) -> None:
    """loss_recovered_ℓ = 1 − ΔCE_ℓ / ΔCE_mean_ℓ, by hand from the two stages' per-document sums;
    its resampled figures (plug-in, bias, SE, interval) come with it."""
    got = run_downstream(sae, Lens.identity(4, 64), model, reader, 160, batch_size=4, resamples=100)
    base, recon = got["base"], got["recon"]
    n = recon.count.sum()
    clean = recon.ce_clean.sum() / n
    delta = recon.variant("recon")[0].sum(0) / n - clean
    delta_mean = base.variant("mean")[0].sum(0) / n - base.ce_clean.sum() / n
    recovered = 1 - delta / delta_mean
    np.testing.assert_allclose(got["loss_recovered_by_layer"], recovered, rtol=1e-9)
    np.testing.assert_allclose(got["delta_ce_by_layer"], delta, rtol=1e-9)
    np.testing.assert_allclose(got["delta_ce_mean_by_layer"], delta_mean, rtol=1e-9)
    assert got["loss_recovered"] == pytest.approx(recovered.mean(), rel=1e-9)
    assert min(recovered) > 0 and max(recovered) < 1  # better than the mean, worse than perfect
    resampled = got["resampled"]
    assert resampled["loss_recovered_plugin"] == pytest.approx(recovered.mean(), rel=1e-9)
    for key in ("bias_boot", "bias_jack", "se"):
        assert math.isfinite(resampled[f"loss_recovered_{key}"])
    lo, hi = resampled["loss_recovered_ci"]
    assert lo <= resampled["loss_recovered"] <= hi and lo < hi
    assert all(
        lo <= v <= hi
        for v, (lo, hi) in zip(resampled["loss_recovered_by_layer"], resampled["loss_recovered_by_layer_ci"])
    )


def test_evaluate_refuses_baseline_sums_of_another_sample(
    sae: MLSAE, model: LoadedModel, reader: ActivationStore
) -> None:
    layers = sae.cfg.layers
    lens = Lens.identity(4, 64)
    sample, other = spliced_sample(reader, 64, 0), spliced_sample(reader, 64, 1)
    assert not np.array_equal(sample.contexts, other.contexts)
    base = baseline(model, reader, layers, other, ["mean"], 4, progress=False)
    recon = splice_sums(model, sample, layers, {"recon": reconstruction(sae, lens)}, 4, progress=False)
    message = (
        "^the baseline stage's sums are for another spliced sample \\(other eval split, "
        "evaluate.tokens or data.seed\\); rerun the baseline stage$"
    )
    with pytest.raises(MlsaeError, match=message):
        splice_figures(recon, base, 0, 0)
    with pytest.raises(MlsaeError, match=message):
        evaluate(sae, lens, model, reader, sample, base, 4, 0, 0, progress=False)
    # blocks the baseline has no sums for are named
    only_1 = baseline(model, reader, [1], sample, ["mean"], 4, progress=False)
    with pytest.raises(MlsaeError, match=r"^the baseline stage has no sums for blocks \[3\] of the SAE"):
        evaluate(sae, lens, model, reader, sample, only_1, 4, 0, 0, progress=False)


@pytest.mark.parametrize("lens_kind", list(LENSES))
def test_perfect_reconstruction_costs_nothing(
    model: LoadedModel, reader: ActivationStore, lens_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconstruction equal to its input (through lens -> SAE -> inverse lens) gives delta_ce = 0,
    kl = 0 and loss_recovered = 1 at every block, while zero ablation gives a large positive delta_ce."""
    lens = LENSES[lens_kind]()
    sae = perfect_sae(64, [0, 1, 2, 3])
    rec = reconstruction_metrics(sae, lens, reader, progress=False)
    assert max(rec["fvu_by_layer"]) < 1e-10
    got = run_downstream(sae, lens, model, reader, n_tokens=160, batch_size=2)
    np.testing.assert_allclose(got["delta_ce_by_layer"], 0, atol=1e-4)
    np.testing.assert_allclose(got["kl_by_layer"], 0, atol=1e-5)
    np.testing.assert_allclose(got["loss_recovered_by_layer"], 1, atol=1e-3)
    assert min(got["delta_ce_zero_by_layer"]) > 1.0
    assert min(got["kl_zero_by_layer"]) > 1.0
    if lens_kind == "tuned":
        # control: the same splice without mapping back through the inverse is far from free,
        # so the zero above really depends on the inverse
        monkeypatch.setattr(Lens, "inverse", lambda self, h, blocks=None: h)
        bad = run_downstream(sae, lens, model, reader, n_tokens=160, batch_size=2)
        assert min(bad["kl_by_layer"][:3]) > 1e-2 and bad["kl_by_layer"][3] < 1e-5  # last block: no translator


def test_ce_kl_row_blocks_match_float64() -> None:
    """The blocked CE and KL (two whole row blocks and a partial one) equal the dense float64
    formulas. The logits sit around +40, where any form that subtracts large sums (Σ p·z against
    logsumexp) would lose digits in float32."""
    g = torch.Generator().manual_seed(0)
    n, vocab = 2 * _ROWS + 5, 3000
    z = torch.randn(n, vocab, generator=g) * 3 + 40
    clean = F.log_softmax(torch.randn(n, vocab, generator=g) * 3, -1)
    targets = torch.randint(0, vocab, (n,), generator=g)
    ce, kl = _ce_kl(z, targets, clean, clean.exp())
    logq = F.log_softmax(z.double(), -1)
    p = clean.double()
    torch.testing.assert_close(ce.double(), -logq.gather(-1, targets[:, None])[:, 0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(kl.double(), (p.exp() * (p - logq)).sum(-1), rtol=1e-6, atol=1e-5)
    assert float(kl.min()) > 1.0  # far from the trivial zero


def test_splice_happens_at_the_right_layer(model: LoadedModel, reader: ActivationStore) -> None:
    """Changing block ℓ's residual leaves blocks < ℓ untouched and changes blocks > ℓ and the
    logits; the block-ℓ hook sees the clean residual and equals HF decoder layer ℓ's output."""
    ids = torch.from_numpy(reader.split("eval")[C.TOKENS][:64].reshape(2, 32).astype(np.int64))
    clean_resid = model.residuals(ids)
    clean_logits = model.logits(ids)
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(2, 32, model.d_model, generator=g)
    for block in range(model.n_layers):
        seen: dict[int, torch.Tensor] = {}

        def record(b: int, change: bool):
            def fn(h: torch.Tensor) -> torch.Tensor:
                seen[b] = h.detach().clone()
                return h + delta if change else h

            return fn

        logits = model.logits(ids, {b: record(b, b == block) for b in range(model.n_layers)})
        for b in range(model.n_layers):
            if b <= block:  # blocks before ℓ, and ℓ's own output before the change
                torch.testing.assert_close(seen[b].float(), clean_resid[:, :, b], rtol=0, atol=1e-5)
            else:
                assert (seen[b].float() - clean_resid[:, :, b]).abs().max() > 1e-2
        assert (logits - clean_logits).abs().max() > 1e-2
        hf = hf_logits(model, ids, block, lambda h: h + delta)
        torch.testing.assert_close(logits.double(), hf, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# lens: none


class NoLens(torch.nn.Module):
    """No lens at all: returns its input unchanged."""

    def forward(self, h: torch.Tensor, blocks=None) -> torch.Tensor:
        return h

    def inverse(self, h: torch.Tensor, blocks=None) -> torch.Tensor:
        return h

    def fingerprint(self) -> str:  # what a train checkpoint records of its lens
        return "no lens"


def test_lens_none_is_the_identity(
    store: tuple[Path, dict], reader: ActivationStore, model: LoadedModel, tmp_path: Path
) -> None:
    """Train and evaluate with the lens stage's `lens: none` output give exactly what they give
    with no lens at all."""
    p = parse_params({**raw_params(store), "lens": "none"})
    assert run_lens_stage(p.lens, p.lens_path, p.lens_fit, p.model, reader, tmp_path / "lens", progress=False) == {
        "lens": "none"
    }
    assert sorted(f.name for f in (tmp_path / "lens").iterdir()) == ["mlsae.json"]  # no weights to carry
    lens = load_stage_lens(tmp_path / "lens", reader)
    assert lens.is_identity
    sample = spliced_sample(reader, p.evaluate.tokens, p.data.seed)
    base = baseline(model, reader, [1, 3], sample, p.evaluate.baselines, p.evaluate.batch_size, progress=False)

    runs = {}
    for name, ln in (("none", lens), ("nolens", NoLens())):
        m_train, history = train(p, reader, ln, tmp_path / name / "sae", tmp_path / name / "ckpt", progress=False)
        sae = MLSAE.load(tmp_path / name / "sae")
        m_eval, rows = evaluate(
            sae, ln, model, reader, sample, base, p.evaluate.batch_size, 50, p.analysis.seed, progress=False
        )
        runs[name] = (sae, m_train, history, m_eval, rows)
    a, b = runs["none"], runs["nolens"]
    for key, value in a[0].state_dict().items():
        assert torch.equal(value, b[0].state_dict()[key]), key
    drop = ("vectors_per_s", "wall_s")
    assert {k: v for k, v in a[1].items() if k not in drop} == {k: v for k, v in b[1].items() if k not in drop}
    assert a[2] == b[2]
    assert {k: v for k, v in a[3].items() if k not in drop} == {k: v for k, v in b[3].items() if k not in drop}
    assert a[4] == b[4]
    assert a[0].cfg.lens == "none"


# ---------------------------------------------------------------------------------------------
# the stage


def run_stage(name: str) -> None:
    runpy.run_path(str(ROOT / "stages" / f"{name}.py"))["main"]()


@pytest.fixture()
def stage_dir(
    store: tuple[Path, dict], reader: ActivationStore, sae: MLSAE, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A working directory holding params.yaml, the store (a link), the lens (none) and the SAE."""
    raw = raw_params(store)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "data").mkdir()
    (tmp_path / C.ACTIVATIONS).symlink_to(store[0])
    p = parse_params(raw)
    run_lens_stage(p.lens, p.lens_path, p.lens_fit, p.model, reader, tmp_path / C.LENS_DIR, progress=False)
    sae.save(tmp_path / C.SAE_DIR)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_baseline_and_evaluate_stages_write_the_metrics_contract(stage_dir: Path) -> None:
    raw = yaml.safe_load((stage_dir / "params.yaml").read_text())
    run_stage("baseline")
    base = json.loads((stage_dir / C.BASELINE_METRICS).read_text())
    sums = SpliceSums.load(stage_dir / C.BASELINE_DIR / C.BASELINE_SUMS)
    assert sums.variants == ("mean",) and base["baselines"] == ["mean"]  # evaluate.baselines' default
    assert sums.layers == base["layers"] == [1, 3]
    for key in ("ce_clean", "delta_ce_mean", "kl_mean"):
        assert math.isfinite(base[key])
        lo, hi = base[f"{key}_ci"]
        assert lo <= base[key] <= hi
    for key in ("delta_ce_mean", "kl_mean"):
        assert len(base[f"{key}_by_layer"]) == len(base[f"{key}_by_layer_ci"]) == 2
    assert "delta_ce_zero" not in base and "kl_zero" not in base  # opt-in
    assert base["downstream_tokens"] == int(sums.count.sum()) <= raw["evaluate"]["tokens"]
    assert base["downstream_documents"] == len(sums.units)

    run_stage("evaluate")
    metrics = json.loads((stage_dir / C.EVAL_METRICS).read_text())
    for key in ("fvu", "mse", "l0", "delta_ce", "kl", "loss_recovered"):
        assert len(metrics[f"{key}_by_layer"]) == 2 and math.isfinite(metrics[key])
    for key in ("fvu", "delta_ce", "kl", "loss_recovered"):
        for suffix in ("_plugin", "_bias_boot", "_bias_jack", "_se"):
            assert math.isfinite(metrics[key + suffix]), key + suffix
        lo, hi = metrics[f"{key}_ci"]
        assert lo <= metrics[key] <= hi
        assert len(metrics[f"{key}_by_layer_ci"]) == 2
    # the ablations live in baseline.json only
    assert not any(k.startswith(("delta_ce_mean", "delta_ce_zero", "kl_mean", "kl_zero")) for k in metrics)
    assert 0 <= metrics["dead_fraction"] <= 1 and metrics["layers"] == [1, 3]
    assert metrics["downstream_tokens"] == base["downstream_tokens"] <= raw["evaluate"]["tokens"]
    assert metrics["ce_clean"] == pytest.approx(base["ce_clean"], rel=1e-6)
    rows = (stage_dir / C.EVAL_PLOT).read_text().splitlines()
    assert rows[0].split(",") == ["layer", "fvu", "mse", "l0", "delta_ce", "kl", "loss_recovered"]
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "3"]
    assert float(rows[2].split(",")[1]) == pytest.approx(metrics["fvu_by_layer"][1])
    assert float(rows[2].split(",")[6]) == pytest.approx(metrics["loss_recovered_by_layer"][1])


def test_baseline_stage_zero_ablation_is_opt_in(stage_dir: Path) -> None:
    raw = yaml.safe_load((stage_dir / "params.yaml").read_text())
    raw["evaluate"]["baselines"] = ["mean", "zero"]
    (stage_dir / "params.yaml").write_text(yaml.safe_dump(raw))
    run_stage("baseline")
    base = json.loads((stage_dir / C.BASELINE_METRICS).read_text())
    assert base["baselines"] == ["mean", "zero"]
    for key in ("delta_ce_zero", "kl_zero", "delta_ce_mean", "kl_mean"):
        assert math.isfinite(base[key]) and len(base[f"{key}_by_layer"]) == 2
    assert SpliceSums.load(stage_dir / C.BASELINE_DIR / C.BASELINE_SUMS).variants == ("mean", "zero")


def test_evaluate_stage_refuses_the_baseline_of_another_sample_in_one_line(
    stage_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    run_stage("baseline")
    raw = yaml.safe_load((stage_dir / "params.yaml").read_text())
    raw["evaluate"]["tokens"] = 96  # another sample: the baseline's sums no longer fit
    (stage_dir / "params.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_stage("evaluate")
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert err.startswith("error: evaluate: ") and "rerun the baseline stage" in err
    assert "another spliced sample" in err and not (stage_dir / C.EVAL_METRICS).exists()
