"""Interop: importing the seed paper's MLSAEs (`sae.source`) and exporting to SAELens >= 6.

The seed's forward and SAELens's TopK encode are re-implemented here in float64 numpy from their
published code and documented formulas (neither package can join this environment), and compared
with what this project's import, dump and export produce on the shared tiny activation store.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from safetensors.numpy import load_file as load_np
from safetensors.torch import save_file

from mlsae.core import paths as C
from mlsae.core.errors import MlsaeError
from mlsae.core.params import parse_params
from mlsae.lens.tuned import Lens
from mlsae.report.inputs import _read_csv
from mlsae.sae.dump import dump
from mlsae.sae.importer import TRAIN_CURVE_HEADER
from mlsae.sae.importer import import_sae as import_sae_narrow
from mlsae.sae.model import MLSAE, SAEConfig
from mlsae.sae.saelens import export_saelens
from mlsae.stores.activations import ActivationStore

ROOT = Path(__file__).resolve().parents[1]
D, N, K = 64, 256, 8  # the shared store's d_model (tiny-llama), latents and k of the test SAEs

pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures `store`, `reader`: conftest.py


# ----------------------------------------------------------------------------------------------
# independent references


def seed_forward(x: np.ndarray, w_enc: np.ndarray, b_pre: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The seed's MLSAE.forward latents (mlsae/model/autoencoder.py), float64: standardize with the
    unbiased std and eps 1e-5 added to it, encoder on (x - pre_encoder_bias), TopK, then ReLU.
    Returns (values, indices), each (..., k), sorted by index."""
    x = x.astype(np.float64)
    xc = x - x.mean(-1, keepdims=True)
    std = np.sqrt((xc**2).sum(-1, keepdims=True) / (x.shape[-1] - 1))
    z = (xc / (std + 1e-5) - b_pre) @ w_enc.T.astype(np.float64)
    return _topk_relu(z, k)


def saelens_encode(
    x: np.ndarray, tensors: dict[str, np.ndarray], cfg: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SAELens 6's TopKSAE.encode as documented: process_sae_in (layer_norm: mean, unbiased std,
    divide by std + 1e-5; then minus b_dec when apply_b_dec_to_input), hidden_pre = sae_in @ W_enc
    + b_enc, TopK then ReLU. Returns (values, indices) sorted by index, and hidden_pre."""
    assert cfg["normalize_activations"] == "layer_norm" and cfg["architecture"] == "topk"
    x = x.astype(np.float64)
    xc = x - x.mean(-1, keepdims=True)
    u = xc / (xc.std(-1, ddof=1, keepdims=True) + 1e-5)
    sae_in = u - tensors["b_dec"] * float(cfg["apply_b_dec_to_input"])
    z = sae_in @ tensors["W_enc"].astype(np.float64) + tensors["b_enc"]
    return (*_topk_relu(z, cfg["k"]), z)


def _topk_relu(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.sort(np.argpartition(-z, k - 1, axis=-1)[..., :k], axis=-1)
    return np.maximum(np.take_along_axis(z, idx, -1), 0.0), idx


def by_index(values: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(indices, axis=-1)
    return np.take_along_axis(values, order, -1), np.take_along_axis(indices, order, -1)


def f16_tol(ref: np.ndarray, atol: float) -> np.ndarray:
    """The dump stores values as float16: `atol` plus half a float16 ulp of the reference."""
    return atol + np.abs(ref) * 2.0**-11


# ----------------------------------------------------------------------------------------------
# helpers


def write_seed(
    path: Path,
    d: int = D,
    n: int = N,
    k: int = K,
    seed: int = 0,
    tfm: dict | None = None,
    cfg_extra: dict | None = None,
    tensor_extra: dict | None = None,
) -> dict[str, np.ndarray]:
    """A checkpoint in the seed's exact published format (PyTorchModelHubMixin): config.json with
    the init kwargs, model.safetensors with the seed's key names. `tfm`: the Lightning module's
    kwargs instead (keys under `autoencoder.` beside a stand-in transformer weight)."""
    g = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(n, d, generator=g) / d**0.5
    w_dec = w_enc.T.clone()
    w_dec /= w_dec.norm(dim=0)
    b_pre = 0.1 * torch.randn(d, generator=g)
    if tfm is None:
        cfg = {
            "n_inputs": d,
            "n_latents": n,
            "k": k,
            "dead_steps_threshold": 152,
            "dead_threshold": 0.001,
            "auxk": 256,
            "standardize": True,
        }
        prefix, extra = "", {}
    else:
        cfg = {
            "model_name": "tiny-llama",
            "layers": None,
            "expansion_factor": n // d,
            "k": k,
            "auxk": 256,
            "auxk_coef": 1 / 32,
            "dead_tokens_threshold": 10_000_000,
            "dead_threshold": 0.001,
            "lr": 1e-4,
            "standardize": True,
            "skip_special_tokens": True,
            "max_length": 2048,
            "batch_size": 1,
            "accumulate_grad_batches": 64,
            "tuned_lens": False,
            **tfm,
        }
        prefix, extra = "autoencoder.", {"transformer.model.gpt_neox.embed_in.weight": torch.randn(10, d, generator=g)}
    tensors = {
        f"{prefix}encoder.weight": w_enc,
        f"{prefix}decoder.weight": w_dec,
        f"{prefix}pre_encoder_bias": b_pre,
        **extra,
        **(tensor_extra or {}),
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**cfg, **(cfg_extra or {})}))
    save_file({key: t.contiguous() for key, t in tensors.items()}, str(path / "model.safetensors"))
    return {"w_enc": w_enc.numpy(), "w_dec": w_dec.numpy(), "b_pre": b_pre.numpy()}


def params_with(store: tuple[Path, dict], **sae: object):
    return parse_params({**store[1], "sae": sae})


def dump_arrays(sae: MLSAE, reader: ActivationStore, path: Path) -> tuple[np.ndarray, np.ndarray]:
    dump(sae, Lens.identity(reader.n_layers, reader.d_model), reader, str(path), progress=False)
    root = zarr.open_group(str(path), mode="r")
    return by_index(root[C.VALUES][:].astype(np.float64), root[C.INDICES][:].astype(np.int64))


def import_sae(p, reader: ActivationStore, out_dir: Path) -> dict:
    """The train stage's import, with its narrow arguments taken from `p`."""
    return import_sae_narrow(p.sae, p.lens, reader, out_dir)


def random_sae(layers: list[int], normalisation: str = "vector", lens: str = "none", seed: int = 0) -> MLSAE:
    torch.manual_seed(seed)
    sae = MLSAE(
        SAEConfig(
            d_model=D, n_latents=N, k=K, layers=layers, normalisation=normalisation, lens=lens, model="tiny-llama"
        )
    )
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.1)
    return sae


# ----------------------------------------------------------------------------------------------
# import: the seed's format


@pytest.mark.parametrize("layers", ["all", [1, 3]])
def test_imported_seed_sae_dumps_the_seeds_topk(store, reader, tmp_path, layers):
    ref = write_seed(tmp_path / "mlsae-tiny-llama-x4-k8")
    p = params_with(store, source=str(tmp_path / "mlsae-tiny-llama-x4-k8"), layers=layers)
    metrics = import_sae(p, reader, tmp_path / "sae")
    blocks = list(range(reader.n_layers)) if layers == "all" else layers
    assert metrics["imported"] is True and metrics["format"] == "seed" and metrics["layers"] == blocks
    sae = MLSAE.load(tmp_path / "sae")
    assert sae.cfg.normalisation == "seed" and (sae.cfg.n_latents, sae.cfg.k) == (N, K)
    assert torch.equal(sae.W_enc, torch.from_numpy(ref["w_enc"]))
    assert torch.equal(sae.W_dec, torch.from_numpy(ref["w_dec"]))

    x = reader.resid("eval", 0, reader.n_tokens("eval"), blocks).numpy()
    ref_values, ref_indices = seed_forward(x, ref["w_enc"], ref["b_pre"], K)
    assert (ref_values > 0).any(-1).all()
    # the imported SAE's own float32 encode, before the dump's float16 storage
    with torch.no_grad():
        values, indices = sae.encode(sae.normalise(torch.from_numpy(x))[0])
    values, indices = by_index(values.double().numpy(), indices.numpy())
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(values, ref_values, rtol=0, atol=1e-5)
    # the dump stage's stored top-k
    dumped_values, dumped_indices = dump_arrays(sae, reader, tmp_path / "latents.zarr")
    np.testing.assert_array_equal(dumped_indices, ref_indices)
    assert (np.abs(dumped_values - ref_values) <= f16_tol(ref_values, 1e-5)).all()


def test_imported_seed_sae_reconstructs_like_the_seed(store, reader, tmp_path):
    """decode + denormalise of `normalisation: seed` is the seed's (W_dec f + b) * std + mean, with
    the std *without* its epsilon, as the seed's decode uses it."""
    ref = write_seed(tmp_path / "seed")
    import_sae(params_with(store, source=str(tmp_path / "seed")), reader, tmp_path / "sae")
    sae = MLSAE.load(tmp_path / "sae")
    x = reader.resid("eval", 0, 64).numpy()
    with torch.no_grad():
        recon = sae(torch.from_numpy(x), dense=True).recon.double().numpy()
    values, indices = seed_forward(x, ref["w_enc"], ref["b_pre"], K)
    f = np.zeros((*x.shape[:-1], N))
    np.put_along_axis(f, indices, values, -1)
    xc = x - x.mean(-1, keepdims=True)
    expected = (f @ ref["w_dec"].T.astype(np.float64) + ref["b_pre"]) * xc.std(-1, ddof=1, keepdims=True) + x.mean(
        -1, keepdims=True
    )
    np.testing.assert_allclose(recon, expected, rtol=1e-5, atol=1e-4)


def test_tfm_checkpoint_takes_the_autoencoders_weights_and_layers(store, reader, tmp_path):
    ref = write_seed(tmp_path / "tfm", tfm={"layers": [0, 2]})
    metrics = import_sae(params_with(store, source=str(tmp_path / "tfm")), reader, tmp_path / "sae")
    sae = MLSAE.load(tmp_path / "sae")
    assert metrics["format"] == "seed-tfm" and sae.cfg.layers == [0, 2]
    assert torch.equal(sae.b_pre, torch.from_numpy(ref["b_pre"]))
    write_seed(tmp_path / "tfm_all", tfm={})
    assert import_sae(params_with(store, source=str(tmp_path / "tfm_all"), layers=[1]), reader, tmp_path / "sae2")[
        "layers"
    ] == [0, 1, 2, 3]  # layers: null = every block


def test_another_experiments_sae_dir_is_imported_as_is(store, reader, tmp_path):
    sae = random_sae([0, 3])
    sae.save(tmp_path / "other" / "data" / "sae")
    metrics = import_sae(params_with(store, source=str(tmp_path / "other/data/sae")), reader, tmp_path / "sae")
    again = MLSAE.load(tmp_path / "sae")
    assert metrics["format"] == "mlsae" and again.cfg == sae.cfg
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), sae.state_dict().values()))


# ----------------------------------------------------------------------------------------------
# mismatches and refusals: one line naming both sides


def test_mismatches_name_both_sides(store, reader, tmp_path):
    write_seed(tmp_path / "wide", d=32, n=128)
    with pytest.raises(MlsaeError, match=r"has d_model 32, but the store .* holds d_model 64"):
        import_sae(params_with(store, source=str(tmp_path / "wide")), reader, tmp_path / "sae")
    write_seed(tmp_path / "mlsae-pythia-70m-deduped-x4-k8")
    with pytest.raises(
        MlsaeError, match=r"trained on model 'pythia-70m-deduped', but the store .* holds model 'tiny-llama'"
    ):
        import_sae(
            params_with(store, source=str(tmp_path / "mlsae-pythia-70m-deduped-x4-k8")), reader, tmp_path / "sae"
        )
    write_seed(tmp_path / "tfm", tfm={"layers": [2, 7]})
    with pytest.raises(MlsaeError, match=r"uses blocks \[2, 7\], but the store .* holds 4 layers"):
        import_sae(params_with(store, source=str(tmp_path / "tfm")), reader, tmp_path / "sae")
    random_sae([0], lens="pretrained").save(tmp_path / "lensed")
    with pytest.raises(MlsaeError, match=r"^lens: .* works in lens=pretrained space, but params say lens=none"):
        import_sae(params_with(store, source=str(tmp_path / "lensed")), reader, tmp_path / "sae")
    write_seed(tmp_path / "mlsae-tiny-llama-x4-k8-lens")
    with pytest.raises(MlsaeError, match=r"lens=pretrained space, but params say lens=none"):
        import_sae(params_with(store, source=str(tmp_path / "mlsae-tiny-llama-x4-k8-lens")), reader, tmp_path / "sae")
    random_sae([0], lens="fit").save(tmp_path / "fitted")
    with pytest.raises(MlsaeError, match=r"lens=fit"):
        import_sae(params_with(store, source=str(tmp_path / "fitted")), reader, tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


@pytest.mark.parametrize(
    "variant, message",
    [
        ({"cfg_extra": {"standardize": False}}, r"unsupported seed variant: standardize=False"),
        ({"cfg_extra": {"normalize_decoder": True}}, r"unsupported seed variant: unknown .* key 'normalize_decoder'"),
        ({"tensor_extra": {"encoder.bias": torch.zeros(N)}}, r"unsupported seed variant: tensor 'encoder.bias'"),
        ({"cfg_extra": {"k": 0}}, r"'k' must be a positive integer"),
        ({"cfg_extra": {"n_latents": 300}}, r"'encoder.weight' has shape \(256, 64\), expected \(300, 64\)"),
    ],
)
def test_unsupported_seed_variants_are_refused_by_name(store, reader, tmp_path, variant, message):
    write_seed(tmp_path / "seed", **variant)
    with pytest.raises(MlsaeError, match=message):
        import_sae(params_with(store, source=str(tmp_path / "seed")), reader, tmp_path / "sae")


def test_bad_sources(store, reader, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MlsaeError, match=r"holds neither this project's sae.safetensors"):
        import_sae(params_with(store, source=str(tmp_path / "empty")), reader, tmp_path / "sae")
    with pytest.raises(MlsaeError, match=r"neither a local directory nor a hub id"):
        import_sae(params_with(store, source=str(tmp_path / "no" / "such" / "dir")), reader, tmp_path / "sae")
    with pytest.raises(MlsaeError, match=r"^sae.source: must be 'train'"):
        params_with(store, source=" ")


# ----------------------------------------------------------------------------------------------
# export to SAELens


def test_saelens_encode_on_an_exported_seed_normalised_sae_matches_the_dump(reader, tmp_path):
    """`normalisation: seed` is SAELens's layer_norm: the export is exact."""
    layers = [0, 1, 3]
    sae = random_sae(layers, "seed")
    sae.save(tmp_path / "sae")
    folders = export_saelens(tmp_path / "sae", tmp_path / "out")
    assert [f.name for f in folders] == [f"blocks.{i}.hook_resid_post" for i in layers]
    dumped_values, dumped_indices = dump_arrays(sae, reader, tmp_path / "latents.zarr")
    x = reader.resid("eval", 0, reader.n_tokens("eval"), layers).numpy()
    own_values, _ = own_encode(sae, x)
    for j, folder in enumerate(folders):
        values, indices, _ = saelens_encode(x[:, j], *saelens_folder(folder))
        np.testing.assert_array_equal(indices, dumped_indices[:, j])
        np.testing.assert_allclose(values, own_values[:, j], rtol=0, atol=1e-4)
        assert (np.abs(values - dumped_values[:, j]) <= f16_tol(values, 1e-4)).all()


def test_saelens_encode_on_an_exported_vector_normalised_sae_is_within_the_stated_bound(reader, tmp_path):
    """`normalisation: vector` differs from layer_norm only in where its epsilon goes; the
    pre-activations differ by at most (1e-5 + 5e-7/σ)/σ · ‖W_enc[j]‖ · sqrt(d) (σ: the vector's
    biased std). The tiny model's residuals have σ ~ 0.01, real models' ~ 1: checked on both."""
    layers = [0, 2]
    sae = random_sae(layers, "vector")
    sae.save(tmp_path / "sae")
    folders = export_saelens(tmp_path / "sae", tmp_path / "out")
    dumped_values, dumped_indices = dump_arrays(sae, reader, tmp_path / "latents.zarr")
    x = reader.resid("eval", 0, reader.n_tokens("eval"), layers).numpy()
    w, b_pre = sae.W_enc.detach().double().numpy(), sae.b_pre.detach().double().numpy()
    for j, folder in enumerate(folders):
        for scale in (1.0, 100.0):
            xs = x[:, j].astype(np.float64) * scale
            values, indices, z = saelens_encode(xs, *saelens_folder(folder))
            xc = xs - xs.mean(-1, keepdims=True)
            sigma = np.sqrt((xc**2).mean(-1))
            bound = (1e-5 + 5e-7 / sigma) / sigma * D**0.5
            z_own = (xc / np.sqrt((xc**2).mean(-1, keepdims=True) + 1e-6) - b_pre) @ w.T
            assert (np.abs(z - z_own) <= bound[:, None] * np.linalg.norm(w, axis=1) * (1 + 1e-9)).all()
            own_values, own_indices = own_encode(sae, xs[:, None].astype(np.float32))
            if scale == 1.0:  # the dump itself, on the stored residuals
                # a top-k set may differ only where the k-th and (k+1)-th pre-activations are
                # closer than twice the bound (a near-tie), and then by swapping those latents
                top = -np.sort(-z, axis=-1)
                tie = top[:, K - 1] - top[:, K] <= 2 * bound * np.linalg.norm(w, axis=1).max()
                differ = (indices != dumped_indices[:, j]).any(-1)
                assert not (differ & ~tie).any() and differ.sum() <= 0.01 * len(differ)
                same = ~differ
                dz_bound = bound[same, None] * np.linalg.norm(w, axis=1)[indices[same]]  # ReLU is 1-Lipschitz
                assert (np.abs(values[same] - dumped_values[same, j]) <= f16_tol(values[same], 1e-5) + dz_bound).all()
            else:  # residual-stream scale (σ > 0.1): same indices, values within 1e-4
                assert sigma.min() > 0.1
                np.testing.assert_array_equal(indices, own_indices[:, 0])
                np.testing.assert_allclose(values, own_values[:, 0], rtol=0, atol=1e-4)


def own_encode(sae: MLSAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        values, indices = sae.encode(sae.normalise(torch.from_numpy(x))[0])
    return by_index(values.double().numpy(), indices.numpy())


def saelens_folder(folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    return load_np(str(folder / "sae_weights.safetensors")), json.loads((folder / "cfg.json").read_text())


def test_saelens_cfg_schema_and_hardlinks(tmp_path):
    layers = [0, 1, 2, 3]
    random_sae(layers).save(tmp_path / "sae")
    folders = export_saelens(tmp_path / "sae", tmp_path / "out")
    inodes = {os.stat(f / "sae_weights.safetensors").st_ino for f in folders}
    assert len(inodes) == 1 and os.stat(folders[0] / "sae_weights.safetensors").st_nlink == len(layers)
    for block, folder in zip(layers, folders):
        assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
        cfg = json.loads((folder / "cfg.json").read_text())
        # SAELens 6 SAEConfig/TopKSAEConfig fields and their allowed values
        assert cfg["architecture"] == "topk" and (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (D, N, K)
        assert cfg["normalize_activations"] in (
            "none",
            "expected_average_only_in",
            "constant_norm_rescale",
            "layer_norm",
        )
        assert cfg["normalize_activations"] == "layer_norm" and cfg["apply_b_dec_to_input"] is True
        assert cfg["dtype"] == "float32" and cfg["reshape_activations"] == "none"
        assert cfg["rescale_acts_by_decoder_norm"] is False
        meta = cfg["metadata"]
        assert int(meta["sae_lens_version"].split(".")[0]) >= 6
        assert meta["hook_name"] == f"blocks.{block}.hook_resid_post" and meta["model_name"] == "tiny-llama"
        tensors = load_np(str(folder / "sae_weights.safetensors"))
        assert {k: (v.shape, v.dtype) for k, v in tensors.items()} == {
            "W_enc": ((D, N), np.float32),
            "W_dec": ((N, D), np.float32),
            "b_enc": ((N,), np.float32),
            "b_dec": ((D,), np.float32),
        }


def test_export_refusals(tmp_path):
    random_sae([0], lens="pretrained").save(tmp_path / "lensed")
    with pytest.raises(MlsaeError, match=r"tuned-lens space \(lens=pretrained\) and SAELens has no lens"):
        export_saelens(tmp_path / "lensed", tmp_path / "out")
    random_sae([0]).save(tmp_path / "sae")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(MlsaeError, match=r"not empty; pick another folder or pass --force"):
        export_saelens(tmp_path / "sae", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").exists()
    # --force replaces only an earlier export (issue 28: it used to replace any folder)
    with pytest.raises(MlsaeError, match=r"not written by `mlsae export` \(no \.mlsae-export in it\)"):
        export_saelens(tmp_path / "sae", tmp_path / "busy", force=True)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["keep.txt"]
    export_saelens(tmp_path / "sae", tmp_path / "out")
    export_saelens(tmp_path / "sae", tmp_path / "out", force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".mlsae-export", "blocks.0.hook_resid_post"]


def test_export_cli(tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mlsae.cli", "export", *args],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
        )

    proc = cli("--format", "onnx", "o")
    assert proc.returncode == 1 and proc.stderr.strip() == "error: export: --format: unknown format 'onnx'; use saelens"
    proc = cli("--format", "saelens", "o")
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: export: data/sae/config.json: missing")
    random_sae([1, 2]).save(tmp_path / C.SAE_DIR)
    proc = cli("--format", "saelens", "--model-name", "my-model", "o")
    assert proc.returncode == 0, proc.stderr
    assert "2 SAELens folder(s)" in proc.stdout and "approximate" in proc.stdout
    cfg = json.loads((tmp_path / "o" / "blocks.2.hook_resid_post" / "cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == "my-model"


def test_train_can_use_the_seed_normalisation(store, reader):
    from mlsae.sae.trainer import sae_config

    p = params_with(store, normalisation="seed")
    cfg = sae_config(p.sae, p.train, p.lens, reader, 2048)
    assert cfg.normalisation == "seed" and cfg.model == "tiny-llama"
    p = params_with(store, normalisation="vector")
    assert sae_config(p.sae, p.train, p.lens, reader, 2048).normalisation == "vector"
    with pytest.raises(MlsaeError, match=r"^sae.normalisation: input should be 'vector' or 'seed' \(got 'layer'\)$"):
        params_with(store, normalisation="layer")


# ----------------------------------------------------------------------------------------------
# the train stage with sae.source


def run_train(cwd: Path, store: tuple[Path, dict], source: str) -> subprocess.CompletedProcess:
    (cwd / "data").mkdir(parents=True, exist_ok=True)
    link = cwd / C.ACTIVATIONS
    if not link.exists():
        link.symlink_to(store[0])
    (cwd / "params.yaml").write_text(yaml.safe_dump({**store[1], "sae": {"source": source}}))
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / "train.py")],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_train_stage_imports_instead_of_training(store, tmp_path):
    write_seed(tmp_path / "seed")
    random_sae([1, 2]).save(tmp_path / "other" / "data" / "sae")
    for source, fmt, layers in (
        (tmp_path / "seed", "seed", [0, 1, 2, 3]),
        (tmp_path / "other" / "data" / "sae", "mlsae", [1, 2]),
    ):
        run = tmp_path / f"run_{fmt}"
        proc = run_train(run, store, str(source))
        assert proc.returncode == 0, proc.stderr[-2000:]
        metrics = json.loads((run / C.TRAIN_METRICS).read_text())
        assert metrics["imported"] is True and metrics["source"] == str(source) and metrics["format"] == fmt
        assert metrics["layers"] == layers and "fvu" not in metrics and metrics["steps"] == 0
        assert metrics["sae_sha256"] == hashlib.sha256((run / C.SAE_DIR / C.SAE_WEIGHTS).read_bytes()).hexdigest()[:16]
        assert (run / C.TRAIN_PLOT).read_text() == TRAIN_CURVE_HEADER
        assert _read_csv(run / C.TRAIN_PLOT, ("step", "loss", "fvu", "dead_fraction")).height == 0
        assert MLSAE.load(run / C.SAE_DIR).cfg.layers == layers
        assert not (run / C.CHECKPOINTS_DIR).exists()


def test_train_stage_mismatch_is_one_line_and_writes_nothing(store, tmp_path):
    write_seed(tmp_path / "wide", d=32, n=64)
    proc = run_train(tmp_path / "run", store, str(tmp_path / "wide"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: train: sae.source: ") and "d_model 32" in lines[0]
    assert not (tmp_path / "run" / C.SAE_DIR).exists() and not (tmp_path / "run" / C.TRAIN_METRICS).exists()
