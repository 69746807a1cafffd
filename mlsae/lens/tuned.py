"""Tuned lens: per-layer affine translators into the final layer's basis.

A tuned lens maps the residual h of a layer to ``h + A h + b`` so that the model's own
unembedding of the result (final norm, then unembedding matrix) predicts the model's
final output distribution. See docs/design.md, "Tuned lens".

Index conventions (the seed paper's code had this off by one):

* This project numbers residuals by **block**: "layer i" is the output of block i,
  i = 0..L-1, which is Hugging Face ``hidden_states[i + 1]`` for i < L-1. The last
  block's output is taken *before* the final norm.
* The tuned-lens package numbers translators by **hidden-state index**: translator ℓ is
  for ``hidden_states[ℓ]`` (0 = embeddings) and there are L of them; the final layer
  has none.
* Hence block i uses translator i+1 for i < L-1 and the identity for block L-1.
  Translator 0 (embeddings) is never used here; it is kept so that files round-trip.

On disk a lens is a tuned-lens directory (``config.json`` + ``params.pt``), so lenses
written here load with ``tuned_lens.TunedLens.from_model_and_pretrained`` and lenses
written by the tuned-lens package load here. ``params.pt`` is the state dict of the
package's ``layer_translators`` ModuleList of ``nn.Linear(d, d)``: keys ``"{ℓ}.weight"``
(= A_ℓ, applied as ``h @ A_ℓᵀ``) and ``"{ℓ}.bias"`` (= b_ℓ).

Fitting a lens on stored residuals and its KL metrics are in ``mlsae/lens/fit.py``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from mlsae.core.errors import MlsaeError
from mlsae.core.io import atomic_dir, atomic_file, write_text
from mlsae.core.paths import LENS_CONFIG, LENS_PARAMS

LENS_TYPE = "linear_tuned_lens"


def import_tuned_lens() -> ModuleType:
    """Import the ``tuned_lens`` package, made usable under transformer-lens 4.

    tuned-lens 0.2.0 probes ``transformer_lens.HookedTransformer`` (in
    ``model_surgery.get_final_norm`` / ``get_unembedding_matrix``, reached by ``Unembed``
    and ``TunedLens.from_model*``); transformer-lens 4 removed that class and raises
    ImportError on access. Telling tuned-lens that transformer-lens is unavailable makes
    it take its plain Hugging Face path, which is the only one we use. This is the one
    place that applies the shim; use this function instead of ``import tuned_lens``.
    """
    import tuned_lens
    import tuned_lens.model_surgery

    tuned_lens.model_surgery._transformer_lens_available = False
    return tuned_lens


class Lens(nn.Module):
    """Affine translators for the blocks of an L-block model (none: the identity lens).

    Buffers ``weight (L, d, d)`` and ``bias (L, d)`` are indexed by tuned-lens translator
    index (block i uses index i+1; see the module docstring). They are float32 and not
    trainable; move the lens with ``.to(device)``.
    """

    weight: Tensor | None
    bias: Tensor | None

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Build a lens; ``weight``/``bias`` None means the identity lens.

        ``meta`` holds the tuned-lens config fields ``base_model_name_or_path``,
        ``base_model_revision`` and ``unembed_hash``, written back by ``save``.
        """
        super().__init__()
        if n_layers < 1 or d_model < 1:
            raise MlsaeError(f"lens: need n_layers >= 1 and d_model >= 1, got {n_layers}, {d_model}")
        self.n_layers = n_layers
        self.d_model = d_model
        self.meta: dict[str, Any] = dict(meta or {})
        if (weight is None) != (bias is None):
            raise MlsaeError("lens: give both translator weight and bias, or neither")
        if weight is not None and bias is not None:
            if tuple(weight.shape) != (n_layers, d_model, d_model) or tuple(bias.shape) != (n_layers, d_model):
                raise MlsaeError(
                    f"lens: translators {tuple(weight.shape)} / {tuple(bias.shape)} do not fit "
                    f"{n_layers} layers × d_model {d_model}"
                )
            weight = weight.detach().to(torch.float32).clone()
            bias = bias.detach().to(torch.float32).clone()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self._lu: tuple[tuple[Any, ...], Tensor, Tensor] | None = None

    @classmethod
    def identity(cls, n_layers: int, d_model: int) -> Lens:
        """The logit lens: every block maps to itself."""
        return cls(n_layers, d_model)

    @property
    def is_identity(self) -> bool:
        """True when the lens holds no translators."""
        return self.weight is None

    def fingerprint(self) -> str:
        """A short hash of the translators (shapes and values): what a checkpoint or a latent store
        made in this lens's space must match."""
        h = hashlib.sha256(f"{self.n_layers}x{self.d_model}".encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def extra_repr(self) -> str:
        """Shape summary for ``repr``."""
        kind = "identity" if self.is_identity else "tuned"
        return f"n_layers={self.n_layers}, d_model={self.d_model}, {kind}"

    # ------------------------------------------------------------------ mapping

    def _check(self, h: Tensor, blocks: Sequence[int] | None) -> list[int]:
        """Validate ``blocks`` against the model and ``h``'s shape; return the block list."""
        blocks = list(range(self.n_layers)) if blocks is None else [int(b) for b in blocks]
        bad = [b for b in blocks if not 0 <= b < self.n_layers]
        if bad:
            raise MlsaeError(f"lens: block index {bad[0]} out of range 0..{self.n_layers - 1}")
        if h.ndim < 2 or h.shape[-2] != len(blocks) or h.shape[-1] != self.d_model:
            raise MlsaeError(
                f"lens: residuals of shape {tuple(h.shape)} do not match {len(blocks)} blocks × d_model {self.d_model}"
            )
        return blocks

    def _translated(self, blocks: list[int]) -> tuple[list[int], list[int]]:
        """Positions in ``blocks`` that have a translator, and their translator indices."""
        pos = [j for j, b in enumerate(blocks) if b < self.n_layers - 1]
        return pos, [blocks[j] + 1 for j in pos]

    def forward(self, h: Tensor, blocks: Sequence[int] | None = None) -> Tensor:
        """Map residuals ``h (..., len(blocks), d)`` of the given blocks into lens space.

        ``blocks`` are block indices in 0..L-1 (None: all, in order). Computed in float32
        and returned in ``h``'s dtype; the last block and the identity lens are unchanged.
        """
        blocks = self._check(h, blocks)
        pos, idx = self._translated(blocks)
        if self.weight is None or self.bias is None or not pos:
            return h
        w = _take(self.weight, idx).to(h.device)
        b = _take(self.bias, idx).to(h.device)
        out = h.to(torch.float32)  # a copy unless h is already float32
        x = _take(out, pos, dim=-2)
        y = x + torch.einsum("...nd,ned->...ne", x, w) + b
        out = out.clone() if out is h else out
        out[..., pos, :] = y
        return out.to(h.dtype)

    def inverse(self, h_lens: Tensor, blocks: Sequence[int] | None = None) -> Tensor:
        """Map lens-space vectors back to the model's basis: ``(I + A_ℓ)⁻¹ (h − b_ℓ)``.

        Solved in float64 with an LU factorisation of every ``I + A_ℓ``, cached until the
        translators change. Returned in ``h_lens``'s dtype.
        """
        blocks = self._check(h_lens, blocks)
        pos, idx = self._translated(blocks)
        if self.weight is None or self.bias is None or not pos:
            return h_lens
        lu, piv = self._lu_factors(h_lens.device)
        x = _take(h_lens, pos, dim=-2).to(torch.float64) - _take(self.bias, idx).to(h_lens.device, torch.float64)
        lead = x.shape[:-2]
        rhs = x.reshape(-1, len(pos), self.d_model).permute(1, 2, 0)  # (n, d, tokens)
        sol = torch.linalg.lu_solve(_take(lu, idx), _take(piv, idx), rhs)
        out = h_lens.clone()
        out[..., pos, :] = sol.permute(2, 0, 1).reshape(*lead, len(pos), self.d_model).to(h_lens.dtype)
        return out

    def _lu_factors(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """LU factors of ``I + A_ℓ`` for every translator, on ``device``, cached."""
        assert self.weight is not None
        key = (self.weight._version, self.weight.data_ptr(), device)
        if self._lu is None or self._lu[0] != key:
            eye = torch.eye(self.d_model, dtype=torch.float64, device=device)
            lu, piv = torch.linalg.lu_factor(eye + self.weight.to(device, torch.float64))
            self._lu = (key, lu, piv)
        return self._lu[1], self._lu[2]

    # ------------------------------------------------------------------ files

    def save(
        self,
        path: str | Path,
        *,
        model_name: str | None = None,
        revision: str | None = None,
        unembed_hash: str | None = None,
    ) -> None:
        """Write the lens to directory ``path`` in the tuned-lens format, atomically.

        All L translators are written (zeros for the identity lens). The files are
        written to a temporary sibling directory that is renamed to ``path``; if ``path``
        is already a directory, each file is renamed into it instead (other files stay).
        ``unembed_hash`` (tuned-lens's hash of the unembedding) may stay None: the
        package then skips its unembedding check.
        """
        path = Path(path)
        weight = self.weight if self.weight is not None else torch.zeros(self.n_layers, self.d_model, self.d_model)
        bias = self.bias if self.bias is not None else torch.zeros(self.n_layers, self.d_model)
        state: dict[str, Tensor] = {}
        for layer in range(self.n_layers):
            # clone: saving a view would store the whole stacked tensor under each key
            state[f"{layer}.weight"] = weight[layer].detach().to("cpu", torch.float32).clone()
            state[f"{layer}.bias"] = bias[layer].detach().to("cpu", torch.float32).clone()
        meta = {**self.meta}
        for key, value in (
            ("base_model_name_or_path", model_name),
            ("base_model_revision", revision),
            ("unembed_hash", unembed_hash),
        ):
            if value is not None:
                meta[key] = value
        config = {
            "base_model_name_or_path": meta.get("base_model_name_or_path", ""),
            "d_model": self.d_model,
            "num_hidden_layers": self.n_layers,
            "bias": True,
            "base_model_revision": meta.get("base_model_revision"),
            "unembed_hash": meta.get("unembed_hash"),
            "lens_type": LENS_TYPE,
        }
        if path.is_dir():  # e.g. a caller's own temporary directory: keep its other files
            _write_files(path, state, config)
        else:
            with atomic_dir(path) as tmp:
                _write_files(tmp, state, config)

    @classmethod
    def load(cls, path: str | Path, n_layers: int, d_model: int) -> Lens:
        """Load a tuned-lens directory (written here or by the tuned-lens package).

        Raises MlsaeError (one line, naming the directory) for missing or unreadable
        files, another lens type, or translators for another layer count or d_model.
        """
        path = Path(path)
        config_path, params_path = path / LENS_CONFIG, path / LENS_PARAMS
        if not config_path.is_file() or not params_path.is_file():
            raise MlsaeError(f"lens {path}: not a tuned-lens directory (needs {LENS_CONFIG} and {LENS_PARAMS})")
        try:
            config = json.loads(config_path.read_text())
            file_layers, file_d = int(config["num_hidden_layers"]), int(config["d_model"])
        except (ValueError, KeyError, TypeError) as e:
            raise MlsaeError(f"lens {config_path}: unreadable tuned-lens config ({type(e).__name__}: {e})") from None
        if config.get("lens_type", LENS_TYPE) != LENS_TYPE:
            raise MlsaeError(f"lens {path}: lens_type {config['lens_type']!r} is not supported (only {LENS_TYPE!r})")
        if (file_layers, file_d) != (n_layers, d_model):
            raise MlsaeError(
                f"lens {path}: has {file_layers} layers × d_model {file_d}, "
                f"but the model has {n_layers} layers × d_model {d_model}"
            )
        try:
            state = torch.load(params_path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for corrupt files
            raise MlsaeError(f"lens {params_path}: unreadable parameters ({type(e).__name__})") from None
        has_bias = bool(config.get("bias", True))
        weight = torch.zeros(n_layers, d_model, d_model)
        bias = torch.zeros(n_layers, d_model)
        kinds = ("weight", "bias") if has_bias else ("weight",)
        expected = {f"{i}.{kind}" for i in range(n_layers) for kind in kinds}
        if not isinstance(state, dict) or set(state) != expected:
            keys = sorted(state)[:4] if isinstance(state, dict) else type(state).__name__
            raise MlsaeError(f"lens {params_path}: expected translators 0..{n_layers - 1}, found {keys}...")
        for i in range(n_layers):
            w, b = state[f"{i}.weight"], state.get(f"{i}.bias")
            if tuple(w.shape) != (d_model, d_model) or (b is not None and tuple(b.shape) != (d_model,)):
                raise MlsaeError(
                    f"lens {params_path}: translator {i} has shape {tuple(w.shape)}, "
                    f"but the model has d_model {d_model}"
                )
            weight[i] = w.float()
            if b is not None:
                bias[i] = b.float()
        meta = {k: config.get(k) for k in ("base_model_name_or_path", "base_model_revision", "unembed_hash")}
        return cls(n_layers, d_model, weight, bias, meta)


def load_pretrained(spec: str | Path | None, n_layers: int, d_model: int, model_name: str) -> Lens:
    """Load a pretrained tuned lens: ``spec`` a local directory, or empty for the hub.

    With an empty ``spec`` the lens for ``model_name`` (a hub id such as ``gpt2`` or
    ``EleutherAI/pythia-160m``) comes from the tuned-lens package's own artifact loader
    (``tuned_lens.load_artifacts.load_lens_artifacts``: the AlignmentResearch/tuned-lens
    space, or ``$TUNED_LENS_REPO_ID``), which needs network access unless cached.
    """
    if spec is not None and str(spec).strip():
        path = Path(spec)
        if not path.is_dir():
            raise MlsaeError(
                f"lens_path: {path} is not a directory (expected tuned-lens {LENS_CONFIG} + {LENS_PARAMS})"
            )
        return Lens.load(path, n_layers, d_model)

    load_artifacts = import_tuned_lens().load_artifacts
    from huggingface_hub import errors as hub_errors

    alternatives = "set lens_path to a local tuned-lens directory, or use lens=fit"
    try:
        config_path, _ = load_artifacts.load_lens_artifacts(model_name)
    except (hub_errors.LocalEntryNotFoundError, ConnectionError, TimeoutError) as e:
        raise MlsaeError(
            f"lens=pretrained: downloading the tuned lens for {model_name!r} needs network access "
            f"({type(e).__name__}); {alternatives}"
        ) from None
    except (hub_errors.EntryNotFoundError, hub_errors.RepositoryNotFoundError, hub_errors.HFValidationError) as e:
        raise MlsaeError(
            f"lens=pretrained: no published tuned lens for model {model_name!r} ({type(e).__name__}); {alternatives}"
        ) from None
    return Lens.load(Path(config_path).parent, n_layers, d_model)


# ---------------------------------------------------------------------- helpers


def _write_files(directory: Path, state: dict[str, Tensor], config: dict[str, Any]) -> None:
    """``params.pt`` and ``config.json`` into ``directory``, each file atomically."""
    with atomic_file(directory / LENS_PARAMS) as tmp:
        torch.save(state, tmp)
    write_text(directory / LENS_CONFIG, json.dumps(config, indent=2) + "\n")


def _take(t: Tensor, idx: list[int], dim: int = 0) -> Tensor:
    """``t`` indexed by ``idx`` along ``dim``: a view when ``idx`` is a contiguous range."""
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return t.narrow(dim, idx[0], len(idx))
    return t.index_select(dim, torch.tensor(idx, device=t.device))
