"""The evaluate stage: reconstruction metrics against numpy, spliced downstream metrics against an
independent Hugging Face computation, the splice's layer, the tuned lens's inverse, `lens: none`.

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

from mlsae.core import paths as C
from mlsae.evaluation.downstream import _ROWS, _ce_kl, downstream_metrics, splice_sums
from mlsae.stats.bootstrap import context_counts
from mlsae.evaluation.reconstruction import downstream_contexts, evaluate, reconstruction_metrics
from mlsae.lens.tuned import Lens
from mlsae.lens.build import run_lens_stage
from mlsae.lens.loading import load_stage_lens
from mlsae.models.registry import LoadedModel, load_model
from mlsae.core.params import parse_params
from mlsae.sae.model import MLSAE, NORM_EPS, SEED_NORM_EPS, SAEConfig
from mlsae.stores.activations import ActivationStore
from mlsae.sae.trainer import train

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures `store`, `reader`: conftest.py


SAE_RAW = {"sae": {"layers": [1, 3], "expansion": 4, "k": 8, "auxk": 32, "dead_tokens": 256},
           "train": {"batch_tokens": 128, "lr": 1e-3, "epochs": 1, "shuffle_buffer_tokens": 512,
                     "geometric_median_sample": 256, "device": "cpu"},
           "evaluate": {"tokens": 64, "batch_size": 2}}


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


def hf_downstream(model: LoadedModel, reader: ActivationStore, n_ctx: int, sae: MLSAE, lens: Lens,
                  means: np.ndarray) -> dict:
    """Independent reference: HF forward hooks replace decoder layer ℓ's output at the kept
    positions (not special, not a skipped position 0) with numpy's reconstruction, zeros, or the
    layer's mean; loss over positions t with t and t+1 kept."""
    ids = torch.from_numpy(reader.split("eval")[C.TOKENS][: n_ctx * 32].reshape(n_ctx, 32).astype(np.int64))
    keep = torch.from_numpy(reader.keep("eval")[: n_ctx * 32].reshape(n_ctx, 32))
    mask = keep[:, :-1] & keep[:, 1:]
    tgt = ids[:, 1:, None]
    clean = F.log_softmax(hf_logits(model, ids)[:, :-1], -1)

    def ce_kl(logits: torch.Tensor) -> tuple[float, float]:
        logp = F.log_softmax(logits[:, :-1], -1)
        ce = -logp.gather(-1, tgt)[..., 0][mask].mean()
        kl = (clean.exp() * (clean - logp)).sum(-1)[mask].mean()
        return float(ce), float(kl)

    def at_kept(new):
        return lambda h: torch.where(keep[..., None], new(h).to(h.dtype), h)

    def recon(j: int, block: int):
        def fn(h: torch.Tensor) -> torch.Tensor:
            x = h.double().numpy()
            out = np_sae(sae, np_lens(lens, x, block))["recon"]
            return torch.from_numpy(np_lens_inverse(lens, out, block))

        return at_kept(fn)

    variants = {"recon": recon, "zero": lambda j, b: at_kept(torch.zeros_like),
                "mean": lambda j, b: at_kept(lambda h: torch.from_numpy(means[j]).expand_as(h))}
    base = float(-clean.gather(-1, tgt)[..., 0][mask].mean())
    out = {"ce_clean": base, "count": int(mask.sum()), "entropy": float(-(clean.exp() * clean).sum(-1)[mask].mean())}
    for name, make in variants.items():
        pairs = [ce_kl(hf_logits(model, ids, b, make(j, b))) for j, b in enumerate(sae.cfg.layers)]
        out[f"delta_{name}"] = [c - base for c, _ in pairs]
        out[f"kl_{name}"] = [k for _, k in pairs]
    return out


def run_downstream(sae: MLSAE, lens: Lens, model: LoadedModel, reader: ActivationStore, n_tokens: int,
                   batch_size: int, resamples: int = 0) -> dict:
    means = reconstruction_metrics(sae, lens, reader, progress=False)["layer_means"]
    tokens, excluded = downstream_contexts(reader, n_tokens)
    sums = splice_sums(sae, lens, model, tokens, excluded, means, False, batch_size, progress=False)
    counts = context_counts(len(sums.count), resamples, 0) if resamples else None
    return {**downstream_metrics(sums, counts), "means": means.double().numpy()}


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
    for j, block in enumerate(sae.cfg.layers):
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
    assert 0 < min(fvu) and max(l0) <= sae.cfg.k


# ---------------------------------------------------------------------------------------------
# downstream metrics


@pytest.mark.parametrize("lens_kind", list(LENSES))
def test_downstream_metrics_match_hf_splice(sae: MLSAE, model: LoadedModel, reader: ActivationStore,
                                            lens_kind: str) -> None:
    """Splicing from the spliced block (recorded calls, rerun of the later blocks) equals replacing
    HF decoder layer ℓ's output in a whole forward, for the SAE's own blocks (1 and 3), the three
    variants, over several batches with special (and skipped) positions kept clean and masked."""
    lens = LENSES[lens_kind]()
    n_ctx = reader.n_tokens("eval") // 32
    got = run_downstream(sae, lens, model, reader, n_ctx * 32, batch_size=6, resamples=200)
    ref = hf_downstream(model, reader, n_ctx, sae, lens, got["means"])
    assert got["downstream_tokens"] == ref["count"] < n_ctx * 31  # special positions were masked
    assert got["spliced_token_layers"] == n_ctx * 32 * 2 * 3
    assert got["ce_clean"] == pytest.approx(ref["ce_clean"], abs=1e-5)
    for name, suffix in (("recon", ""), ("zero", "_zero"), ("mean", "_mean")):
        np.testing.assert_allclose(got[f"delta_ce{suffix}_by_layer"], ref[f"delta_{name}"], rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(got[f"kl{suffix}_by_layer"], ref[f"kl_{name}"], rtol=1e-3, atol=1e-5)
        lo, hi = got[f"delta_ce{suffix}_ci"]
        assert lo <= got[f"delta_ce{suffix}"] <= hi and lo < hi
    # a briefly trained SAE is imperfect: splicing it costs something at every layer
    assert min(got["kl_by_layer"]) > 1e-3
    # the fine-tuned model is far better than uniform, so zero ablation costs a lot, and more than
    # replacing the layer by its mean
    assert got["delta_ce_zero"] > 1.0
    assert got["delta_ce_mean"] < got["delta_ce_zero"]


@pytest.mark.parametrize("lens_kind", list(LENSES))
def test_perfect_reconstruction_costs_nothing(model: LoadedModel, reader: ActivationStore, lens_kind: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A reconstruction equal to its input (through lens -> SAE -> inverse lens) gives delta_ce = 0
    and kl = 0 at every block, while zero ablation gives a large positive delta_ce."""
    lens = LENSES[lens_kind]()
    sae = perfect_sae(64, [0, 1, 2, 3])
    rec = reconstruction_metrics(sae, lens, reader, progress=False)
    assert max(rec["fvu_by_layer"]) < 1e-10
    got = run_downstream(sae, lens, model, reader, n_tokens=96, batch_size=2)
    np.testing.assert_allclose(got["delta_ce_by_layer"], 0, atol=1e-4)
    np.testing.assert_allclose(got["kl_by_layer"], 0, atol=1e-5)
    assert min(got["delta_ce_zero_by_layer"]) > 1.0
    assert min(got["kl_zero_by_layer"]) > 1.0
    if lens_kind == "tuned":
        # control: the same splice without mapping back through the inverse is far from free,
        # so the zero above really depends on the inverse
        monkeypatch.setattr(Lens, "inverse", lambda self, h, blocks=None: h)
        bad = run_downstream(sae, lens, model, reader, n_tokens=96, batch_size=2)
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


def test_lens_none_is_the_identity(store: tuple[Path, dict], reader: ActivationStore, model: LoadedModel,
                                   tmp_path: Path) -> None:
    """Train and evaluate with the lens stage's `lens: none` output give exactly what they give
    with no lens at all."""
    p = parse_params({**raw_params(store), "lens": "none"})
    assert run_lens_stage(p, reader, tmp_path / "lens", progress=False) == {"lens": "none"}
    assert sorted(f.name for f in (tmp_path / "lens").iterdir()) == ["mlsae.json"]  # no weights to carry
    lens = load_stage_lens(tmp_path / "lens", reader)
    assert lens.is_identity

    runs = {}
    for name, ln in (("none", lens), ("nolens", NoLens())):
        m_train, history = train(p, reader, ln, tmp_path / name / "sae", tmp_path / name / "ckpt", progress=False)
        sae = MLSAE.load(tmp_path / name / "sae")
        m_eval, rows = evaluate(p, sae, ln, model, reader, progress=False)
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


def test_evaluate_stage_writes_the_metrics_contract(store: tuple[Path, dict], reader: ActivationStore,
                                                    sae: MLSAE, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    raw = raw_params(store)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "data").mkdir()
    (tmp_path / C.ACTIVATIONS).symlink_to(store[0])
    run_lens_stage(parse_params(raw), reader, tmp_path / C.LENS_DIR, progress=False)
    sae.save(tmp_path / C.SAE_DIR)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "stages" / "evaluate.py"))["main"]()

    metrics = json.loads((tmp_path / C.EVAL_METRICS).read_text())
    for key in ("fvu", "mse", "l0", "delta_ce", "delta_ce_zero", "kl"):
        assert len(metrics[f"{key}_by_layer"]) == 2 and math.isfinite(metrics[key])
    assert 0 <= metrics["dead_fraction"] <= 1 and metrics["layers"] == [1, 3]
    assert metrics["downstream_tokens"] <= raw["evaluate"]["tokens"]
    rows = (tmp_path / C.EVAL_PLOT).read_text().splitlines()
    assert rows[0].split(",") == ["layer", "fvu", "mse", "l0", "delta_ce", "delta_ce_zero", "delta_ce_mean", "kl",
                                  "kl_zero", "kl_mean"]
    for key in ("fvu", "delta_ce", "kl", "delta_ce_mean"):
        lo, hi = metrics[f"{key}_ci"]
        assert lo <= metrics[key] <= hi
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "3"]
    assert float(rows[2].split(",")[1]) == pytest.approx(metrics["fvu_by_layer"][1])
