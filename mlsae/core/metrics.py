"""The stages' metrics files (`reports/metrics/<stage>.json`) as typed records, one per stage.

Each producing stage builds its record from what its library function returns and writes it with
:func:`write_metrics`; report and compare read the files back with :func:`read_metrics` (or
:meth:`StageMetrics.from_dict` for the JSON `dvc exp show` embeds). The JSON keys are the field
names, in field order; an absent optional figure is ``null``. Reading checks the keys: a key the
record does not know is an error, except in :class:`AnalysisMetrics`, which keeps such keys in
``extra`` (so new analysis statistics flow through report and compare without a change here).

Definitions of the figures: docs/design.md, "Metrics".
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, overload

from mlsae.core.errors import MlsaeError
from mlsae.core.io import read_json, write_json

M = TypeVar("M", bound="StageMetrics")


class Figures(Protocol):
    """Read access to a stage's figures by JSON key: a :class:`StageMetrics` record or a plain
    dict (a parsed metrics file, a `dvc exp show` row)."""

    @overload
    def get(self, key: str, /) -> Any: ...
    @overload
    def get(self, key: str, default: Any, /) -> Any: ...

    def __getitem__(self, key: str, /) -> Any: ...

    def __contains__(self, key: object, /) -> bool: ...


@dataclass
class StageMetrics:
    """Shared JSON conversion of the per-stage records below."""

    open_keys: ClassVar[bool] = False
    """Keep unknown keys (in ``extra``) instead of refusing them."""
    _keys: list[str] | None = field(default=None, init=False, repr=False, compare=False)
    """The keys, in order, of the JSON object this record was read from (written back as read)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the keys it was read with, in their order; else the fields in order
        (optional ones only when set), then ``extra``."""
        fields = [f for f in dataclasses.fields(self) if f.name not in ("extra", "_keys")]
        extra = getattr(self, "extra", {})
        if self._keys is not None:
            return {k: extra[k] if k in extra else getattr(self, k) for k in self._keys}
        out = {
            f.name: getattr(self, f.name)
            for f in fields
            if getattr(self, f.name) is not None or f.metadata.get("always", True)
        }
        out.update(extra)
        return out

    @classmethod
    def from_dict(cls: type[M], data: Any, source: str = "metrics", partial: bool = False) -> M:
        """The record of a parsed JSON object; a missing required key (unless `partial`: readers
        of older or hand-made files, where a missing figure reads as None) or an unknown key
        raises MlsaeError naming `source`."""
        if not isinstance(data, dict):
            raise MlsaeError(f"{source}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "_keys"}
        unknown = sorted(set(data) - names)
        if unknown and not cls.open_keys:
            raise MlsaeError(f"{source}: unknown key {unknown[0]!r} for {cls.__name__}")
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data
            and f.name not in ("extra", "_keys")
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing and not partial:
            raise MlsaeError(f"{source}: missing key {missing[0]!r}")
        values = {k: v for k, v in data.items() if k in names}
        values.update({name: None for name in missing})
        if cls.open_keys:
            values["extra"] = {k: data[k] for k in unknown}
        record = cls(**values)
        record._keys = list(data)
        return record

    def get(self, key: str, default: Any = None) -> Any:
        """A figure by its JSON key (``extra`` included), for code that walks keys by name
        (the summary row reads records and `dvc exp show` dicts alike)."""
        return self.to_dict().get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()


def _optional(**kw: Any) -> Any:
    """A field that is left out of the JSON when None (the stage did not produce it)."""
    return field(default=None, metadata={"always": False}, **kw)


@dataclass
class ExtractMetrics(StageMetrics):
    """`extract.json`: what was extracted, and the residual stream's adjacent-layer similarity."""

    tokens: int
    """Tokens extracted (train + eval)."""
    train_tokens: int
    eval_tokens: int
    tokens_per_s: float | None
    """Extraction throughput (None when nothing new was extracted)."""
    resumed: bool
    """An interrupted extract was resumed."""
    n_layers: int
    """Transformer blocks of the model."""
    d_model: int
    adjacent_cos: float | None
    """Mean over block pairs of adjacent_cos_by_layer."""
    adjacent_cos_by_layer: list[float]
    """Mean cosine of the mean-centred residuals of blocks (i, i+1), eval split, over the kept
    tokens (not special; not position 0 when skipped) (length n_layers - 1)."""
    first_position_norm_ratio: float | None = _optional()
    """Max over blocks of first_position_norm_ratio_by_layer."""
    first_position_norm_ratio_by_layer: list[float] | None = _optional()
    """Mean residual norm at position 0 over the mean at positions > 0, per block (eval split,
    non-special tokens)."""
    skip_first: bool | None = _optional()
    """Whether position 0 is left out of training, metrics and analysis (data.skip_first)."""
    train_documents: int | None = _optional()
    """Documents with a kept token in the train split (the split is by document)."""
    eval_documents: int | None = _optional()
    """Documents with a kept token in the eval split: the resampling units of every interval."""


@dataclass
class LensMetrics(StageMetrics):
    """`lens.json`: the lens mode and, for a lens, its KL to the model's output per block."""

    lens: str
    """none | pretrained | fit."""
    kl_logit_lens_by_layer: list[float] | None = _optional()
    """KL(final || logit-lens prediction) per block, nats/token, held-out eval tokens."""
    kl_tuned_lens_by_layer: list[float] | None = _optional()
    """KL(final || tuned-lens prediction) per block."""
    kl_logit_lens: float | None = _optional()
    kl_tuned_lens: float | None = _optional()
    fit_steps: int | None = _optional()
    """lens: fit only: optimiser steps run."""
    fit_best_step: int | None = _optional()
    fit_stopped_early: bool | None = _optional()


@dataclass
class TrainMetrics(StageMetrics):
    """`train.json`: the SAE's training figures (means over the last 10% of steps)."""

    fvu: float
    fvu_by_layer: list[float]
    loss: float
    l0: float
    dead_fraction: float | None
    vectors_per_s: float | None
    steps: int
    tokens: int
    n_latents: int
    layers: list[int]
    auxk_steps: int | None = _optional()
    """Steps whose AuxK term was non-zero (some latent was dead)."""
    train_source: str | None = _optional()
    """`train.source`: store (batches from the stored train split) or stream (from the corpus)."""
    model_tokens: int | None = _optional()
    """Stream mode: tokens run through the model while training, all ranks (a resumed run counts
    only its own)."""
    imported: bool | None = _optional()
    """`sae.source` other than train: the SAE was imported, not trained (no training figures)."""
    source: str | None = _optional()
    format: str | None = _optional()
    """Format of the imported SAE: seed (the paper's published format) or project."""
    sae_sha256: str | None = _optional()
    normalisation: str | None = _optional()
    d_model: int | None = _optional()
    k: int | None = _optional()
    lens: str | None = _optional()


@dataclass
class BaselineMetrics(StageMetrics):
    """`baseline.json`: the clean CE and the ablations' cost on the spliced sample (no SAE).

    Open: each figure ``k`` comes with ``k_plugin``, ``k_bias_boot``, ``k_bias_jack``, ``k_se``,
    ``k_ci`` and, per layer, ``k_by_layer`` and ``k_by_layer_ci`` (mlsae/stats/estimate.py)."""

    open_keys: ClassVar[bool] = True
    ce_clean: float | None = None
    """Clean next-token CE, nats/token, over the spliced sample's loss positions."""
    delta_ce_mean: float | None = None
    """Mean over layers of the CE increase with the layer mean-ablated."""
    delta_ce_mean_by_layer: list[float] | None = None
    baselines: list[str] | None = None
    layers: list[int] | None = None
    downstream_tokens: int | None = None
    downstream_documents: int | None = None
    wall_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalMetrics(StageMetrics):
    """`eval.json`: reconstruction on the eval split and the spliced downstream loss.

    Open, like BaselineMetrics: each figure ``k`` comes with its resampled figures."""

    open_keys: ClassVar[bool] = True
    fvu: float | None = None
    """Mean over layers of fvu_by_layer (bias-corrected; fvu_plugin is the plug-in)."""
    fvu_by_layer: list[float] | None = None
    mse: float | None = None
    mse_by_layer: list[float] | None = None
    l0: float | None = None
    l0_by_layer: list[float] | None = None
    dead_fraction: float | None = None
    eval_vectors: int | None = None
    ce_clean: float | None = None
    delta_ce: float | None = None
    """Mean over layers of the CE increase with the layer's reconstruction spliced in."""
    delta_ce_by_layer: list[float] | None = None
    kl: float | None = None
    kl_by_layer: list[float] | None = None
    loss_recovered: float | None = None
    """Mean over layers of 1 − delta_ce / delta_ce_mean (the baseline stage's mean ablation)."""
    loss_recovered_by_layer: list[float] | None = None
    downstream_tokens: int | None = None
    downstream_documents: int | None = None
    downstream_contexts: int | None = None
    spliced_token_layers: int | None = None
    """(token, layer) splices evaluated: with wall_s, the cost per splice."""
    bootstrap_units: int | None = None
    """Resampling units of the reconstruction figures (eval documents, or groups of them)."""
    layers: list[int] | None = None
    wall_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class AnalysisMetrics(StageMetrics):
    """`analysis.json`: the latents' layer-distribution statistics (see mlsae/analysis/aggregate.py).

    Open: keys not listed here are kept in ``extra`` and written back, so statistics added by
    the aggregate stage need no change here to reach report and compare."""

    open_keys: ClassVar[bool] = True
    var_within: float | None = None
    """Mean over counted latents of within_f (equal token weighting); docs/statistics.md."""
    var_between: float | None = None
    var_total: float | None = None
    within_share: float | None = None
    """var_within / var_total."""
    var_ratio: float | None = None
    """var_total / var_within."""
    var_within_mass: float | None = None
    var_between_mass: float | None = None
    var_total_mass: float | None = None
    within_share_mass: float | None = None
    var_ratio_mass: float | None = None
    var_within_norm: float | None = None
    """var_within / (L-1)^2: comparable across models of different depth."""
    var_total_norm: float | None = None
    effective_layers: float | None = None
    """Mean over active pairs of exp(entropy of p_tf)."""
    multi_layer_fraction: float | None = None
    """Share of active pairs whose second-largest layer share is >= analysis.multi_layer_threshold."""
    mean_layer_std: float | None = None
    var_token_paper: float | None = None
    """The seed paper's estimator (docs/statistics.md: not a variance)."""
    var_aggregate_paper: float | None = None
    var_ratio_paper: float | None = None
    n_tokens: int | None = None
    n_active_pairs: int | None = None
    n_entries: int | None = None
    n_latents_active: int | None = None
    n_latents_counted: int | None = None
    n_layers: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


STAGE_METRICS: dict[str, type[StageMetrics]] = {
    "extract": ExtractMetrics,
    "lens": LensMetrics,
    "train": TrainMetrics,
    "baseline": BaselineMetrics,
    "eval": EvalMetrics,
    "analysis": AnalysisMetrics,
}
"""Metrics file stem -> its record type."""


def write_metrics(path: str | os.PathLike[str], metrics: StageMetrics) -> None:
    """Write a stage's record as its metrics JSON, atomically."""
    write_json(path, metrics.to_dict())


def read_metrics(path: str | Path, cls: type[M], partial: bool = False) -> M:
    """Read and check a metrics JSON file; MlsaeError names the file on any problem."""
    return cls.from_dict(read_json(path), str(path), partial)
