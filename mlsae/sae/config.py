"""The MLSAE's config (`config.json` beside its weights) and the rules every SAE must keep.

`SAEConfig` is plain data (no torch), so the check stage can apply the same rules to params before
anything runs: `check_k` (TopK keeps at most every latent) and `check_dead_window` (AuxK needs a
dead window shorter than the run). The config's defaults are the params' (`SAEParams`): one home.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from mlsae.core.errors import MlsaeError
from mlsae.core.params import LENS_MODES, SAEParams, is_int, is_number

NORMALISATIONS = ("vector", "seed")
WEIGHTS_SHA256 = "weights_sha256"
"""Key of ``config.json`` holding the sha256 of ``sae.safetensors`` (not an SAEConfig field)."""
_DEFAULTS = SAEParams()
"""The params' defaults (mlsae.core.params.SAEParams), the config's defaults too: one home."""


@dataclass
class SAEConfig:
    """Everything needed to rebuild an MLSAE; stored as ``config.json`` next to the weights."""

    d_model: int
    """Width of each residual vector."""
    n_latents: int
    """Number of dictionary latents (``expansion × d_model``)."""
    k: int
    """Latents kept active per vector (TopK)."""
    layers: list[int]
    """Block indices of the selected layers, in the order of the input's layer axis (length L)."""
    auxk: int = _DEFAULTS.auxk
    """Dead latents per vector used by the AuxK loss (at most the number dead; 0 disables it)."""
    auxk_coef: float = _DEFAULTS.auxk_coef
    """Weight of the AuxK loss in the total loss."""
    dead_tokens: int = 8192
    """A latent is dead once it has not fired for this many tokens (a token counts once for all
    layers). The default is what `sae.dead_tokens: auto` gives the default run (65,536 / 8)."""
    center: str = _DEFAULTS.center
    """``layer``: a per-layer mean ``c_l`` (buffer ``layer_center``, (L, d)) is subtracted from each
    vector before normalisation and added back after: ``x̃ = denormalise(decode(encode(x − c_l))) +
    c_l``; ``none``: no centring (and no buffer)."""
    normalisation: str = _DEFAULTS.normalisation
    """Input normalisation of each vector x over its own d entries, with m = mean(x):
    ``vector``: x̂ = (x − m) / s, s = sqrt(Σ(x − m)² / d + 1e-6), reconstruction x̂·s + m;
    ``seed`` (the seed paper's SAEs, imported): x̂ = (x − m) / (σ + 1e-5) with the unbiased
    σ = sqrt(Σ(x − m)² / (d − 1)), reconstruction x̂·σ + m (σ without the epsilon, as the seed)."""
    lens: str = "none"
    """Space the SAE works in: ``none`` (model basis), ``pretrained`` or ``fit`` (tuned-lens space)."""
    model: str = ""
    """Name of the model whose residuals were used (provenance only)."""
    params_hash: str = ""
    """Hash of the params that produced this SAE (provenance only)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy of the config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SAEConfig:
        """Build and validate a config; unknown or missing keys raise :class:`MlsaeError`."""
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                raise MlsaeError(f"sae config: unknown key {key!r}")
        for f in fields(cls):
            if f.default is MISSING and f.default_factory is MISSING and f.name not in data:
                raise MlsaeError(f"sae config: missing key 'sae.{f.name}'")
        values = dict(data)
        if isinstance(values.get("layers"), (list, tuple)):
            values["layers"] = list(values["layers"])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self, expansion: int | None = None) -> None:
        """Raise :class:`MlsaeError` with one line naming the first bad key (`expansion`, when the
        config comes from params, lets the k rule name the fix)."""
        rules: list[tuple[str, Callable[[], bool], str]] = [
            ("d_model", lambda: is_int(self.d_model) and self.d_model >= 1, "a positive integer"),
            ("n_latents", lambda: is_int(self.n_latents) and self.n_latents >= 1, "a positive integer"),
            ("k", lambda: is_int(self.k) and self.k >= 1, "a positive integer"),
            ("layers", self._layers_ok, "a non-empty list of distinct block indices >= 0"),
            ("auxk", lambda: is_int(self.auxk) and self.auxk >= 0, "an integer >= 0"),
            ("auxk_coef", lambda: is_number(self.auxk_coef) and self.auxk_coef >= 0, "a finite number >= 0"),
            ("dead_tokens", lambda: is_int(self.dead_tokens) and self.dead_tokens >= 1, "an integer >= 1"),
            ("normalisation", lambda: self.normalisation in NORMALISATIONS, f"one of {NORMALISATIONS}"),
            ("center", lambda: self.center in ("none", "layer"), "one of ('none', 'layer')"),
            ("lens", lambda: self.lens in LENS_MODES, f"one of {LENS_MODES}"),
            ("model", lambda: isinstance(self.model, str), "a string"),
            ("params_hash", lambda: isinstance(self.params_hash, str), "a string"),
        ]
        for key, ok, rule in rules:
            if not ok():
                raise MlsaeError(f"sae.{key} must be {rule} (got {getattr(self, key)!r})")
        check_k(self.k, self.n_latents, expansion)

    def _layers_ok(self) -> bool:
        layers = self.layers
        return (
            isinstance(layers, list)
            and len(layers) > 0
            and all(is_int(i) and i >= 0 for i in layers)
            and len(set(layers)) == len(layers)
        )


def check_k(k: int, n_latents: int, expansion: int | None = None) -> None:
    """TopK keeps `k` of `n_latents` latents: `k` must not exceed them."""
    if k > n_latents:
        how = f" = sae.expansion x d_model = {expansion} x {n_latents // expansion}" if expansion else ""
        fix = "lower sae.k or raise sae.expansion" if expansion else "lower sae.k"
        raise MlsaeError(f"sae.k: {k} is more than the SAE's n_latents{how} = {n_latents}; {fix}")


def check_dead_window(dead_tokens: int, run_tokens: int, how: str) -> None:
    """A dead window at or beyond the run's length (`run_tokens`, explained by `how`) means no latent
    can ever be dead: AuxK never acts."""
    if dead_tokens >= run_tokens:
        raise MlsaeError(
            f"sae.dead_tokens: {dead_tokens} is at or beyond the run's length of {run_tokens} tokens ({how}), so no "
            f"latent could ever count as dead and AuxK would never act; lower sae.dead_tokens below {run_tokens} (or "
            "set sae.auxk: 0 to train without AuxK)"
        )


def resolve_dead_tokens(dead_tokens: int | str, run_tokens: int) -> int:
    """`sae.dead_tokens` as a number: `auto` is an eighth of the run's `run_tokens` (train tokens x
    epochs), at least 1."""
    return max(1, run_tokens // 8) if dead_tokens == "auto" else int(dead_tokens)
