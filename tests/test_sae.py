"""Tests of mlsae.sae.model against independent numpy computations and the dense reference path."""

from __future__ import annotations

import contextlib
import json
import math
from datetime import timedelta

import numpy as np
import pytest
import torch

from mlsae.core.errors import MlsaeError
from mlsae.core.params import SAEParams
from mlsae.core.paths import SAE_CONFIG, SAE_WEIGHTS
from mlsae.sae import config as sae_config_module
from mlsae.sae.config import check_dead_window, check_k, resolve_dead_tokens
from mlsae.sae.kernels import dead_topk, sparse_outer, topk_select
from mlsae.sae.model import MLSAE, SAEConfig, geometric_median
from mlsae.sae.trainer import make_optimizer, train_step


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: extra threads only add synchronisation on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_sae(d: int = 16, n: int = 64, k: int = 4, layers: int = 3, seed: int = 0, **kw: object) -> MLSAE:
    torch.manual_seed(seed)
    kw.setdefault("normalisation", "vector")  # the numpy references below implement `vector`
    return MLSAE(SAEConfig(d_model=d, n_latents=n, k=k, layers=list(range(layers)), **kw))


def residuals(b: int, layers: int, d: int, seed: int = 1) -> torch.Tensor:
    """Residual-like vectors with a per-layer scale and offset, so normalisation matters."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, layers + 1, dtype=torch.float32)[:, None] * 2
    return torch.randn(b, layers, d, generator=g) * scale + torch.randn(layers, d, generator=g)


# ---------------------------------------------------------------------------------------------
# forward against numpy


def numpy_forward(sae: MLSAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-vector standardise, dense TopK + ReLU, decode, map back; FVU per layer."""
    w_enc = sae.W_enc.detach().double().numpy()
    w_dec = sae.W_dec.detach().double().numpy()
    b_pre = sae.b_pre.detach().double().numpy()
    mean = x.mean(-1, keepdims=True)
    std = np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    xn = (x - mean) / std
    z = (xn - b_pre) @ w_enc.T
    kth = np.sort(z, axis=-1)[..., -sae.cfg.k][..., None]
    code = np.where(z >= kth, np.maximum(z, 0), 0.0)
    xn_hat = code @ w_dec.T + b_pre
    fvu = ((xn - xn_hat) ** 2).sum(axis=(0, 2)) / ((xn - xn.mean(0)) ** 2).sum(axis=(0, 2))
    return xn, xn_hat, xn_hat * std + mean, fvu


@pytest.mark.parametrize("layers", [1, 3])
def test_forward_and_fvu_match_numpy(layers: int) -> None:
    sae = make_sae(layers=layers).double()
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.1)
    x = residuals(32, layers, 16).double()
    out = sae(x)
    xn, xn_hat, recon, fvu = numpy_forward(sae, x.numpy())
    np.testing.assert_allclose(out.xn.numpy(), xn, atol=1e-12)
    np.testing.assert_allclose(out.xn_hat.detach().numpy(), xn_hat, atol=1e-10)
    np.testing.assert_allclose(out.recon.detach().numpy(), recon, atol=1e-9)
    np.testing.assert_allclose(sae.loss(out).fvu_by_layer.detach().numpy(), fvu, rtol=1e-10)
    assert out.values.shape == out.indices.shape == (32, layers, 4)
    assert (out.values >= 0).all()


def test_normalise_round_trip_and_statistics() -> None:
    sae = make_sae()
    x = residuals(8, 3, 16) * 100 + 7
    xn, mean, std = sae.normalise(x)
    np.testing.assert_allclose(xn.mean(-1).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(xn.std(-1, unbiased=False).numpy(), 1, atol=1e-5)
    np.testing.assert_allclose(sae.denormalise(xn, mean, std).numpy(), x.numpy(), rtol=1e-6, atol=1e-4)
    # float16 input, and a constant vector (zero variance) stays finite
    x16 = x.half()
    x16[0, 0] = 3.0
    xn16, mean16, std16 = sae.normalise(x16)
    assert xn16.dtype == torch.float32 and torch.isfinite(xn16).all()
    assert torch.equal(xn16[0, 0], torch.zeros(16))
    np.testing.assert_allclose(sae.denormalise(xn16, mean16, std16).numpy(), x16.float().numpy(), atol=1e-2)


# ---------------------------------------------------------------------------------------------
# sparse path against the dense reference


@pytest.mark.parametrize("layers", [1, 3])
def test_sparse_matches_dense_forward_and_gradients(layers: int) -> None:
    """float64, AuxK active: forward identical, gradients of every parameter equal to 1e-10."""
    sae = make_sae(layers=layers, auxk=8, dead_tokens=10).double()
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.1)
        sae.tokens_since_fired[::3] = 10  # a third of the latents are dead
    x = residuals(24, layers, 16).double()
    results = {}
    for dense in (False, True):
        sae.zero_grad()
        out = sae(x, dense=dense, auxk=True)
        losses = sae.loss(out)
        losses.loss.backward()
        results[dense] = (out, losses, {n: p.grad.clone() for n, p in sae.named_parameters()})
    (sp, sp_loss, sp_grad), (de, de_loss, de_grad) = results[False], results[True]
    assert sp_loss.auxk > 0
    assert torch.equal(sp.indices, de.indices)
    torch.testing.assert_close(sp.values, de.values, rtol=0, atol=1e-12)
    torch.testing.assert_close(sp.xn_hat, de.xn_hat, rtol=0, atol=1e-12)
    torch.testing.assert_close(sp.aux_recon, de.aux_recon, rtol=0, atol=1e-12)
    torch.testing.assert_close(sp_loss.loss, de_loss.loss, rtol=0, atol=1e-12)
    for name in ("W_enc", "W_dec", "b_pre"):
        assert de_grad[name].abs().max() > 1e-4, name  # the comparison is not vacuous
        torch.testing.assert_close(sp_grad[name], de_grad[name], rtol=0, atol=1e-10, msg=name)


def numpy_auxk_choice(sae: MLSAE, x: torch.Tensor, n_aux: int) -> tuple[np.ndarray, np.ndarray]:
    """The dense masked reference in float64 numpy: every latent's pre-activation, the live ones
    masked out, the top `n_aux` kept, ReLU'd: (values, indices), each row sorted by index."""
    xn = sae.normalise(x)[0].detach().double().numpy().reshape(-1, sae.cfg.d_model)
    z = (xn - sae.b_pre.detach().double().numpy()) @ sae.W_enc.detach().double().numpy().T
    dead = sae.dead_mask().numpy()
    z[:, ~dead] = -np.inf
    idx = np.sort(np.argsort(-z, axis=1, kind="stable")[:, :n_aux], axis=1)
    return np.maximum(np.take_along_axis(z, idx, 1), 0), idx


def by_index(values: torch.Tensor, indices: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(values, indices) of each row reordered by latent index (TopK's order is unspecified)."""
    v, i = values.detach().reshape(-1, values.shape[-1]).numpy(), indices.reshape(-1, indices.shape[-1]).numpy()
    order = np.argsort(i, axis=1)
    return np.take_along_axis(v, order, 1), np.take_along_axis(i, order, 1)


@pytest.mark.parametrize("n_dead", [3, 40])  # fewer dead latents than auxk = 8, and more
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_auxk_on_dead_rows_equals_the_dense_masked_reference(n_dead: int, dtype: torch.dtype) -> None:
    """The sparse path's AuxK multiplies by the dead rows of W_enc only; it picks the latents, and
    gives the values, AuxK loss and gradients, of the dense path's masked full product."""
    sae = make_sae(auxk=8, dead_tokens=10).to(dtype)
    dead = torch.randperm(64, generator=torch.Generator().manual_seed(n_dead))[:n_dead]
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.1)
        sae.tokens_since_fired[dead] = 10 + torch.arange(n_dead)  # at or past the window
        sae.tokens_since_fired[63 if 63 not in dead else 62] = 9  # just short of it: alive
    assert int(sae.dead_mask().sum()) == n_dead
    n_aux = min(8, n_dead)
    x = residuals(24, 3, 16).to(dtype)
    results = {}
    for dense in (False, True):
        sae.zero_grad()
        out = sae(x, dense=dense, auxk=True)
        losses = sae.loss(out)
        losses.loss.backward()
        results[dense] = (out, losses, {n: p.grad.clone() for n, p in sae.named_parameters()})
    (sp, sp_loss, sp_grad), (de, de_loss, de_grad) = results[False], results[True]
    tol = {torch.float64: 1e-10, torch.float32: 2e-5}[dtype]
    assert sp.aux_recon is not None and sp_loss.auxk > 0
    ref_values, ref_indices = numpy_auxk_choice(sae, x, n_aux)
    for out in (sp, de):
        _, _, aux_values, aux_indices = sae._encode(sae.normalise(x)[0], out is de, n_aux)
        assert aux_indices.shape == (24, 3, n_aux)
        values, indices = by_index(aux_values, aux_indices)
        assert np.array_equal(indices, ref_indices)  # the same latents, all of them dead
        assert sae.dead_mask()[torch.from_numpy(indices)].all()
        np.testing.assert_allclose(values, ref_values, rtol=0, atol=tol)
    torch.testing.assert_close(sp.aux_recon, de.aux_recon, rtol=0, atol=tol)
    torch.testing.assert_close(sp_loss.auxk, de_loss.auxk, rtol=0, atol=tol)
    torch.testing.assert_close(sp_loss.loss, de_loss.loss, rtol=0, atol=tol)
    for name in ("W_enc", "W_dec", "b_pre"):
        assert de_grad[name].abs().max() > 1e-4, name  # the comparison is not vacuous
        torch.testing.assert_close(sp_grad[name], de_grad[name], rtol=0, atol=tol, msg=name)
    # the AuxK gradient reaches the dead rows of W_enc: the dead latents can come back
    assert sp_grad["W_enc"][torch.from_numpy(np.unique(ref_indices))].abs().max() > 0


def test_dead_topk_reads_only_the_dead_rows() -> None:
    """dead_topk never touches a live latent's encoder row (NaN there changes nothing), and equals
    topk_select's masked selection on the full product."""
    g = torch.Generator().manual_seed(0)
    xc, w_enc = (
        torch.randn(50, 16, generator=g, dtype=torch.float64),
        torch.randn(64, 16, generator=g, dtype=torch.float64),
    )
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[2, 5, 11, 17, 30, 31, 47, 60, 63]] = True
    for n_aux in (1, 4, 9):
        _, _, ref_values, ref_indices = topk_select(xc @ w_enc.T, 3, dead, n_aux)
        poisoned = w_enc.clone()
        poisoned[~dead] = float("nan")
        values, indices = dead_topk(xc, poisoned, dead, n_aux)
        assert torch.isfinite(values).all()
        got, want = by_index(values, indices), by_index(ref_values, ref_indices)
        assert np.array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-12)


def test_gradients_match_independent_autograd() -> None:
    """The sparse path's gradients equal autograd through a from-scratch dense loss (float64)."""
    sae = make_sae().double()
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.1)
    x = residuals(24, 3, 16).double()
    sae.loss(sae(x)).loss.backward()
    w_enc, w_dec, b_pre = (p.detach().clone().requires_grad_() for p in (sae.W_enc, sae.W_dec, sae.b_pre))
    xn = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    z = (xn - b_pre) @ w_enc.T
    vals, idx = z.topk(4, dim=-1)
    xn_hat = torch.zeros_like(z).scatter(-1, idx, vals.relu()) @ w_dec.T + b_pre
    fvu = ((xn - xn_hat) ** 2).sum((0, 2)) / ((xn - xn.mean(0)) ** 2).sum((0, 2))
    fvu.mean().backward()
    for param, ref in zip((sae.W_enc, sae.W_dec, sae.b_pre), (w_enc, w_dec, b_pre)):
        torch.testing.assert_close(param.grad, ref.grad, rtol=0, atol=1e-10)


def test_sparse_matches_dense_float32() -> None:
    """The default float32 path agrees with the dense one to 1e-5 (absolute, gradients O(1e-2))."""
    sae = make_sae(auxk=8, dead_tokens=10)
    with torch.no_grad():
        sae.tokens_since_fired[1::2] = 10
    x = residuals(24, 3, 16)
    grads = []
    for dense in (False, True):
        sae.zero_grad()
        sae.loss(sae(x, dense=dense, auxk=True)).loss.backward()
        grads.append([p.grad.clone() for p in sae.parameters()])
    for sparse_grad, dense_grad in zip(*grads):
        torch.testing.assert_close(sparse_grad, dense_grad, rtol=0, atol=1e-5)


def test_reused_preactivation_buffer_gives_fresh_results() -> None:
    """On CPU the encoder writes its pre-activations into one reused buffer (and masks the dead
    latents in it in place). Batches of changing size, in and out of inference mode, each still
    equal the dense path, and training through the buffer still backpropagates."""
    sae = make_sae(auxk=8, dead_tokens=10)
    with torch.no_grad():
        sae.tokens_since_fired[::2] = 10
    for b, inference in ((40, False), (7, False), (40, True), (13, True), (24, False)):
        x = residuals(b, 3, 16, seed=b)
        with torch.inference_mode() if inference else contextlib.nullcontext():
            sparse, dense = sae(x, auxk=True), sae(x, dense=True, auxk=True)
        assert torch.equal(sparse.indices, dense.indices)
        torch.testing.assert_close(sparse.values, dense.values, rtol=0, atol=1e-6)
        torch.testing.assert_close(sparse.aux_recon, dense.aux_recon, rtol=0, atol=1e-5)
        if not inference:
            sae.zero_grad()
            sae.loss(sparse).loss.backward()
            assert sae.W_enc.grad.abs().max() > 0


def test_sparse_outer_matches_dense_product_with_repeats() -> None:
    """The encoder's weight-gradient kernel equals the dense Gᵀ x, rows with repeated latents
    included (a latent in both the TopK and the AuxK set of a vector)."""
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 11, (9, 5), generator=g)
    indices[0, :2] = 3  # a repeat within one row
    coef, x = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    dense = torch.zeros(9, 11, dtype=torch.float64)
    for i in range(9):
        for j in range(5):
            dense[i, indices[i, j]] += coef[i, j]
    torch.testing.assert_close(sparse_outer(indices, coef, x, 11), dense.T @ x, rtol=0, atol=1e-12)


def test_decode_matches_explicit_sum() -> None:
    sae = make_sae()
    values, indices = torch.rand(5, 4), torch.randint(0, 64, (5, 4))
    expected = torch.stack([sae.W_dec[:, indices[i]] @ values[i] for i in range(5)]) + sae.b_pre
    torch.testing.assert_close(sae.decode(values, indices).detach(), expected.detach())


# ---------------------------------------------------------------------------------------------
# AuxK and dead latents


def test_auxk_zero_without_dead_latents_and_positive_with_some() -> None:
    sae = make_sae(auxk=6, dead_tokens=100)
    x = residuals(16, 3, 16)
    out = sae(x, auxk=True)
    assert out.aux_recon is None and sae.loss(out).auxk == 0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::4] = True
    with torch.no_grad():
        sae.tokens_since_fired[dead] = 100
    out = sae(x, auxk=True)
    auxk = sae.loss(out).auxk
    assert auxk > 0
    grads = torch.autograd.grad(auxk, list(sae.parameters()))
    # independent: top-6 ReLU'd pre-activations among dead latents only, decoded without b_pre,
    # against the residual error taken as a constant
    z = ((out.xn - sae.b_pre) @ sae.W_enc.T).masked_fill(~dead, -math.inf)
    vals, idx = z.topk(6, dim=-1)
    e_hat = torch.zeros_like(z).scatter(-1, idx, vals.relu()) @ sae.W_dec.T
    e = (out.xn - out.xn_hat).detach()
    expected = (((e - e_hat) ** 2).sum((0, 2)) / ((e - e.mean(0)) ** 2).sum((0, 2))).mean()
    expected_grads = torch.autograd.grad(expected, list(sae.parameters()))
    torch.testing.assert_close(out.aux_recon, e_hat)
    torch.testing.assert_close(auxk, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    total = sae.loss(out)
    torch.testing.assert_close(total.loss, total.fvu + sae.cfg.auxk_coef * total.auxk)


def test_dead_counter_counts_tokens() -> None:
    sae = make_sae(n=8, k=2, layers=2, dead_tokens=10)
    values = torch.tensor([[[1.0, 0.0], [2.0, 3.0]], [[0.5, 1.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    indices = torch.tensor([[[0, 1], [2, 3]], [[0, 4], [5, 6]], [[0, 2], [3, 4]]])  # (B=3, L=2, k=2)
    sae.update_dead(values, indices, n_tokens=3)
    # fired (value > 0): 0, 2, 3, 4; zero values at latents 1, 5, 6 do not count as firing
    assert sae.tokens_since_fired.tolist() == [0, 3, 0, 0, 0, 3, 3, 3]
    sae.update_dead(values[:, :, :1], indices[:, :, :1], n_tokens=3)
    assert sae.tokens_since_fired.tolist() == [0, 6, 0, 0, 3, 6, 6, 6]
    sae.update_dead(torch.zeros(2, 2, 1), torch.zeros(2, 2, 1, dtype=torch.long), n_tokens=4)
    assert sae.tokens_since_fired.tolist() == [4, 10, 4, 4, 7, 10, 10, 10]
    assert sae.dead_mask().tolist() == [False, True, False, False, False, True, True, True]


def test_train_step_advances_dead_counter_by_batch_tokens() -> None:
    sae = make_sae(layers=3)
    opt = make_optimizer(sae, 1e-3)
    x = residuals(8, 3, 16)
    with torch.no_grad():
        fired = set(sae(x).indices[sae(x).values > 0].tolist())
    train_step(sae, opt, x)
    expected = [0 if i in fired else 8 for i in range(64)]  # 8 tokens (not 24 vectors, not 1 step)
    assert sae.tokens_since_fired.tolist() == expected


# ---------------------------------------------------------------------------------------------
# decoder constraints and training


def test_parallel_grad_removed_and_decoder_unit_norm_after_steps() -> None:
    sae = make_sae()
    opt = make_optimizer(sae, 1e-2)
    x = residuals(32, 3, 16)
    sae.loss(sae(x)).loss.backward()
    sae.remove_parallel_grads()
    dots = (sae.W_dec.grad * sae.W_dec).sum(0)
    assert dots.abs().max() < 1e-6 and sae.W_dec.grad.abs().max() > 1e-4
    before = sae.W_dec.detach().clone()
    for _ in range(5):
        train_step(sae, opt, x)
    assert not torch.allclose(before, sae.W_dec)
    np.testing.assert_allclose(sae.W_dec.detach().norm(dim=0).numpy(), 1, atol=1e-6)


def test_init_is_tied() -> None:
    sae = make_sae()
    rows = sae.W_enc / sae.W_enc.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sae.W_dec.detach(), rows.T.detach())


def train_run(seed: int, steps: int = 5) -> dict[str, torch.Tensor]:
    sae = make_sae(seed=seed, auxk=8, dead_tokens=16)
    opt = make_optimizer(sae, 1e-2)
    for i in range(steps):
        train_step(sae, opt, residuals(16, 3, 16, seed=100 + i), grad_clip=1.0)
    return {k: v.clone() for k, v in sae.state_dict().items()}


def test_same_seed_gives_identical_weights() -> None:
    first, second, other = train_run(3), train_run(3), train_run(4)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert not torch.equal(first["W_enc"], other["W_enc"])
    assert (first["tokens_since_fired"] >= 16).any()  # AuxK was exercised along the way


def test_train_step_refuses_nonfinite_loss() -> None:
    sae = make_sae()
    opt = make_optimizer(sae, 1e-3)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    x = residuals(8, 3, 16)
    x[2, 1, 5] = math.nan
    with pytest.raises(FloatingPointError, match="loss"):
        train_step(sae, opt, x)
    for name, value in sae.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_train_step_under_cpu_autocast() -> None:
    sae = make_sae(auxk=8, dead_tokens=8)
    opt = make_optimizer(sae, 1e-2)
    x = residuals(32, 3, 16)
    with torch.no_grad():
        sae.tokens_since_fired[::2] = 8
    grads = []
    for dense in (False, True):  # under bf16 autocast the sparse backward still matches autograd
        sae.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sae.loss(sae(x, dense=dense, auxk=True)).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in sae.parameters()]))
    assert torch.cosine_similarity(grads[0], grads[1], dim=0) > 0.999
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0.02 * grads[1].abs().max().item())
    sae.tokens_since_fired.zero_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        history = [train_step(sae, opt, x) for _ in range(20)]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in sae.parameters())
    assert history[-1]["fvu"] < history[0]["fvu"] and history[-1]["auxk"] > 0
    np.testing.assert_allclose(sae.W_dec.detach().norm(dim=0).numpy(), 1, atol=1e-6)


def test_train_step_through_ddp_matches_plain(tmp_path) -> None:
    """A DistributedDataParallel-wrapped SAE (gloo, one process) trains exactly like the bare one."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    # a bounded timeout: a gloo hang fails this test within minutes instead of stalling the suite
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=120),
    )
    try:
        plain, wrapped = make_sae(seed=5), make_sae(seed=5)
        ddp = DistributedDataParallel(wrapped)
        opts = make_optimizer(plain, 1e-2), make_optimizer(ddp, 1e-2)
        for i in range(3):
            x = residuals(16, 3, 16, seed=i)
            assert train_step(plain, opts[0], x) == train_step(ddp, opts[1], x)
    finally:
        dist.destroy_process_group()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(wrapped.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)


def test_forward_rejects_wrong_shape() -> None:
    with pytest.raises(MlsaeError, match=r"\(batch, 3, 16\)"):
        make_sae()(torch.zeros(4, 2, 16))


# ---------------------------------------------------------------------------------------------
# geometric median


def numpy_weiszfeld(points: np.ndarray, iters: int = 2000) -> np.ndarray:
    y = points.mean(0)
    for _ in range(iters):
        w = 1 / np.maximum(np.linalg.norm(points - y, axis=1), 1e-12)
        y = (w[:, None] * points).sum(0) / w.sum()
    return y


def test_geometric_median() -> None:
    # symmetric points: the median is the centre of symmetry
    square = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) + torch.tensor([3.0, -2.0])
    torch.testing.assert_close(geometric_median(square), torch.tensor([3.0, -2.0]))
    # agrees with an independent numpy Weiszfeld
    pts = np.random.default_rng(0).normal(size=(200, 5)) ** 3
    ours = geometric_median(torch.from_numpy(pts)).numpy()
    np.testing.assert_allclose(ours, numpy_weiszfeld(pts), atol=1e-6)
    # robust to an outlier, unlike the mean
    cluster = torch.randn(99, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    with_outlier = torch.cat([cluster, torch.full((1, 4), 1000.0)])
    assert geometric_median(with_outlier).norm() < 0.1 < with_outlier.mean(0).norm()
    # init_b_pre uses it
    sae = make_sae(d=4, layers=1)
    sae.init_b_pre(with_outlier[:, None, :])
    torch.testing.assert_close(sae.b_pre.detach(), geometric_median(with_outlier))


# ---------------------------------------------------------------------------------------------
# config and persistence


def test_save_load_round_trip(tmp_path) -> None:
    sae = make_sae(model="tiny", params_hash="abc")
    opt = make_optimizer(sae, 1e-2)
    x = residuals(16, 3, 16)
    for _ in range(3):
        train_step(sae, opt, x)
    sae.save(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == sorted([SAE_CONFIG, SAE_WEIGHTS])
    loaded = MLSAE.load(tmp_path / "sae")
    assert loaded.cfg == sae.cfg
    assert torch.equal(loaded.tokens_since_fired, sae.tokens_since_fired)
    with torch.no_grad():
        a, b = sae(x), loaded(x)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.recon, b.recon)
    # training resumes from the loaded weights as it would from the live ones
    assert train_step(loaded, make_optimizer(loaded, 1e-2), x)["fvu"] > 0


def test_load_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(MlsaeError, match="config.json: missing"):
        MLSAE.load(tmp_path)
    sae = make_sae()
    sae.save(tmp_path)
    weights, config = tmp_path / SAE_WEIGHTS, tmp_path / SAE_CONFIG
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(MlsaeError, match=r"sae\.safetensors: unreadable") as err:
        MLSAE.load(tmp_path)
    assert "\n" not in str(err.value)
    sae.save(tmp_path)
    recorded = {"weights_sha256": json.loads(config.read_text())["weights_sha256"]}  # a config without it fails closed
    config.write_text("{not json")
    with pytest.raises(MlsaeError, match="config.json: unreadable"):
        MLSAE.load(tmp_path)
    config.write_text(json.dumps({**sae.cfg.to_dict(), "n_latents": 32, **recorded}))
    with pytest.raises(MlsaeError, match="'W_enc' shape"):
        MLSAE.load(tmp_path)
    config.write_text(json.dumps({**sae.cfg.to_dict(), "k": 0, **recorded}))
    with pytest.raises(MlsaeError, match=r"config.json: sae\.k must be"):
        MLSAE.load(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k": 0}, r"^sae\.k must be a positive integer \(got 0\)$"),
        ({"k": 65}, r"^sae\.k: 65 is more than the SAE's n_latents = 64; lower sae\.k$"),
        ({"d_model": 0}, r"sae\.d_model "),
        ({"n_latents": 2.5}, r"sae\.n_latents "),
        ({"layers": []}, r"sae\.layers "),
        ({"layers": [0, -1]}, r"sae\.layers "),
        ({"layers": [2, 2]}, r"sae\.layers "),
        ({"auxk": -1}, r"sae\.auxk "),
        ({"auxk_coef": math.nan}, r"sae\.auxk_coef "),
        ({"dead_tokens": 0}, r"sae\.dead_tokens "),
        ({"normalisation": "layer"}, r"sae\.normalisation .*'layer'"),
        ({"lens": "magic"}, r"sae\.lens "),
        ({"k": True}, r"sae\.k "),
    ],
)
def test_bad_config_names_the_key(change: dict, message: str) -> None:
    data = {**SAEConfig(d_model=16, n_latents=64, k=4, layers=[0, 1]).to_dict(), **change}
    with pytest.raises(MlsaeError, match=message) as err:
        SAEConfig.from_dict(data)
    assert "\n" not in str(err.value)
    with pytest.raises(MlsaeError, match=message):
        MLSAE(SAEConfig(**data))


def test_config_lives_in_sae_config_and_defaults_to_the_params() -> None:
    assert SAEConfig is sae_config_module.SAEConfig  # still importable from mlsae.sae.model
    cfg = SAEConfig(d_model=16, n_latents=64, k=4, layers=[0])
    defaults = SAEParams()
    assert cfg.normalisation == "seed" == defaults.normalisation
    assert (cfg.auxk, cfg.auxk_coef) == (defaults.auxk, defaults.auxk_coef)
    assert cfg.dead_tokens == 65536 // 8  # what `auto` gives the default run


def test_config_rules_k_dead_window_and_auto_dead_tokens() -> None:
    check_k(64, 64)
    with pytest.raises(
        MlsaeError,
        match=r"^sae\.k: 65 is more than the SAE's n_latents = sae\.expansion x d_model "
        r"= 4 x 16 = 64; lower sae\.k or raise sae\.expansion$",
    ):
        check_k(65, 64, 4)
    check_dead_window(99, 100, "how")
    for dead in (100, 101):
        with pytest.raises(MlsaeError) as err:
            check_dead_window(dead, 100, "3 steps x 33")
        message = str(err.value)
        assert message.startswith(
            f"sae.dead_tokens: {dead} is at or beyond the run's length of 100 tokens (3 steps x 33)"
        )
        assert "\n" not in message and "sae.auxk: 0" in message
    assert resolve_dead_tokens("auto", 65536) == 8192 and resolve_dead_tokens("auto", 4096 * 3) == 1536
    assert resolve_dead_tokens("auto", 7) == 1  # at least one token
    assert resolve_dead_tokens(300, 65536) == 300


def test_config_dict_round_trip_and_unknown_keys() -> None:
    cfg = SAEConfig(d_model=16, n_latents=64, k=4, layers=[3], lens="fit", model="m", params_hash="h")
    assert SAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(MlsaeError, match="unknown key 'expansion'"):
        SAEConfig.from_dict({**cfg.to_dict(), "expansion": 4})
    with pytest.raises(MlsaeError, match="missing key 'sae.k'"):
        SAEConfig.from_dict({"d_model": 16, "n_latents": 64, "layers": [0]})


# ---------------------------------------------------------------------------------------------
# planted dictionary


def planted_batch(atoms: torch.Tensor, gen: torch.Generator, n_tokens: int) -> torch.Tensor:
    """(n_tokens, 2, d): each layer an independent positive combination of 3-4 shared atoms,
    each layer with its own scale and offset (removed by the per-vector normalisation)."""
    n_atoms = atoms.shape[0]
    layers = []
    for layer in range(2):
        n_active = torch.randint(3, 5, (n_tokens, 1), generator=gen)
        rank = torch.rand(n_tokens, n_atoms, generator=gen).argsort(1).argsort(1)
        coef = (0.5 + torch.rand(n_tokens, n_atoms, generator=gen)) * (rank < n_active)
        layers.append((coef @ atoms) * (1 + 2 * layer) + 0.5 * layer)
    return torch.stack(layers, 1)


def test_recovers_planted_dictionary() -> None:
    """≥ 90 % of 64 planted atoms (d = 32) get a decoder column with cosine ≥ 0.9.

    Per-vector standardisation removes each vector's mean, so what the SAE can see (and is
    compared with) is each atom's component orthogonal to the all-ones vector, re-normalised.
    """
    gen = torch.Generator().manual_seed(1234)
    atoms = torch.nn.functional.normalize(torch.randn(64, 32, generator=gen), dim=1)
    seen = torch.nn.functional.normalize(atoms - atoms.mean(1, keepdim=True), dim=1)
    torch.manual_seed(0)
    sae = MLSAE(SAEConfig(d_model=32, n_latents=128, k=4, layers=[0, 1], auxk=32, dead_tokens=1280))
    sae.init_b_pre(sae.normalise(planted_batch(atoms, gen, 512))[0])
    before = (seen @ sae.W_dec).max(1).values
    assert (before >= 0.9).float().mean() < 0.1  # a random dictionary does not pass
    opt = make_optimizer(sae, 3e-3)
    for _ in range(800):
        metrics = train_step(sae, opt, planted_batch(atoms, gen, 128))
    best = (seen @ sae.W_dec.detach()).max(1).values
    assert (best >= 0.9).float().mean() >= 0.9, best
    assert metrics["fvu"] < 0.2
