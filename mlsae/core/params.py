"""The typed params object: every knob of params.yaml, validated once at the edge.

`load_params("params.yaml")` returns `Params`; a missing, unknown or ill-typed key raises
`MlsaeError` naming the dotted key (e.g. `sae.k: must be an integer >= 1 (got 0)`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from mlsae.core.errors import MlsaeError

DTYPES = ("float16", "bfloat16", "float32")
FIRST_POSITION_OUTLIER = 2.0
"""`data.skip_first: auto` skips position 0 when its mean residual norm exceeds this many times the
mean norm at the other positions, at some block."""
LENS_MODES = ("none", "pretrained", "fit")
NORMALISATIONS = ("vector", "seed")  # mlsae.sae.model.NORMALISATIONS (params must not import torch)
"""The lens stage's modes (params `lens`); the SAE config's `lens` is one of these too."""


def is_int(value: object) -> bool:
    """An integer (Python or numpy) that is not a bool: the project's one integer check."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class DataParams:
    source: str = "embedded:python-docs"
    """`embedded:python-docs`, `hf:NAME[:CONFIG]`, or a path/glob of .txt/.jsonl/.parquet files."""
    context: int = 128
    """Tokens per context."""
    train_tokens: int = 65536
    """Tokens extracted for training (rounded up to whole contexts)."""
    eval_tokens: int = 8192
    """Tokens extracted for evaluation and analysis (rounded up to whole contexts)."""
    sample_tokens: int = 16384
    """Stream mode only (`train.source: stream`): train tokens extract still stores, the sample the
    lens fit reads (rounded up to whole contexts, at most `train_tokens`); see mlsae/data/stream.py."""
    skip_first: Union[bool, str] = "auto"
    """Leave position 0 of every context out of training, eval metrics and analysis: `true`, `false`,
    or `auto` (skip it when extract measures it as an outlier: its mean residual norm is more than
    `FIRST_POSITION_OUTLIER` times the mean norm elsewhere at some block; contexts are cut
    mid-document, and the first token becomes an attention sink with outlier norms)."""


@dataclass
class ExtractParams:
    dtype: str = "float16"
    """Storage dtype of the residual vectors: float16, bfloat16 or float32."""
    batch_size: int = 8
    """Contexts per forward pass."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""


@dataclass
class LensFitParams:
    steps: int = 200
    """Optimiser steps when `lens: fit`."""
    batch_tokens: int = 32
    """Tokens per lens-fitting step."""
    lr: float = 1e-3
    """Learning rate of the translators."""
    patience: int = 5
    """Evaluations without eval-KL improvement before stopping early."""
    eval_tokens: int = 256
    """Eval tokens for early stopping and the lens KL metrics (each costs layers x vocab)."""
    device: str = "cpu"
    """Where `lens: fit` trains and the lens KL is measured: auto (CUDA when present), cpu, cuda
    or cuda:N."""


@dataclass
class SAEParams:
    layers: Union[str, list[int]] = "all"
    """`all`, or a list of block indices (e.g. [3] gives a single-layer SAE baseline)."""
    expansion: int = 16
    """n_latents = expansion x d_model."""
    k: int = 32
    """Active latents per vector (TopK)."""
    auxk: int = 256
    """Dead latents used by the AuxK loss."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int = 8192
    """A latent is dead after this many tokens without firing (a token counts once for all layers).
    Must be shorter than the run (steps x train.batch_tokens), or AuxK can never act; the default is
    an eighth of the default run (paper-scale runs use ~10M)."""
    normalisation: str = "seed"
    """Per-vector standardisation: `seed` (the seed paper's: unbiased std + 1e-5, which is also
    SAELens's `layer_norm`, so imports compute what they computed there and exports are exact) or
    `vector` (biased std, eps 1e-6 inside the sqrt: this project's first versions)."""
    source: str = "train"
    """`train` (train a new SAE), or an existing SAE that the train stage imports instead: a local
    directory or hub id (`owner/name`) in the seed paper's format (e.g.
    `tim-lawson/mlsae-pythia-70m-deduped-x64-k32`), or another experiment's `data/sae` directory.
    An imported SAE keeps its own n_latents, k, normalisation and layers (expansion, k, auxk,
    auxk_coef, dead_tokens and normalisation are then unused; `layers` picks the blocks of a seed SAE that records none)."""


TRAIN_SOURCES = ("store", "stream")


@dataclass
class TrainParams:
    source: str = "store"
    """Where train batches come from: `store` (the train split extract stored; the default for small
    runs) or `stream` (the corpus through the model while training: disk use independent of
    `data.train_tokens`, for paper-scale runs; mlsae/data/stream.py)."""
    batch_tokens: int = 512
    """Tokens per optimiser step; each contributes all selected layers."""
    lr: float = 3e-3
    """Adam learning rate. 3e-3 suits the short CPU default (measured on SmolLM2-135M, 126 steps:
    train FVU 0.75 at 1e-4, 0.44 at 4e-4, 0.32 at 1e-3, 0.25 at 3e-3); long runs want 1e-4 to 3e-4."""
    epochs: int = 1
    """Passes over the train split."""
    shuffle_buffer_tokens: int = 16384
    """Tokens held in the shuffle buffer; bounds memory."""
    checkpoint_every: int = 50
    """Optimiser steps between checkpoints."""
    grad_clip: float = 0.0
    """Max gradient norm; 0 disables clipping."""
    geometric_median_sample: int = 4096
    """Normalised vectors used for the geometric-median init of b_pre."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""


@dataclass
class EvaluateParams:
    tokens: int = 2048
    """Eval tokens (whole contexts, the split's first) for the spliced delta CE and KL; at most the
    eval split."""
    bootstrap: int = 200
    """Bootstrap resamples of eval contexts for the 95 % intervals (`*_ci`); 0 disables them."""
    batch_size: int = 8
    """Contexts per spliced forward pass."""
    device: str = ""
    """Where evaluate runs (model, SAE, lens): auto, cpu, cuda or cuda:N; empty: `extract.device`."""


@dataclass
class DumpParams:
    device: str = "cpu"
    """Where dump encodes the eval split: auto (CUDA when present), cpu, cuda or cuda:N."""


@dataclass
class AnalysisParams:
    min_count: int = 10
    """Latents active on fewer tokens are left out of the per-latent variance averages."""
    multi_layer_threshold: float = 0.1
    """An active (token, latent) pair is multi-layer when its second-largest layer share is at
    least this (multi_layer_fraction)."""
    bootstrap: int = 200
    """Bootstrap resamples of eval contexts for the 95 % intervals (`*_ci`); 0 disables them."""
    top_latents: int = 20
    """Latents in the report's top-latent table."""
    top_tokens: int = 5
    """Max-activating contexts kept per latent."""


@dataclass
class BrowseParams:
    latents: int = 400
    """Latents given a page in the browser: the most often active ones (ties by index)."""
    contexts: int = 5
    """Top activating contexts per latent (at most one per eval context)."""
    before: int = 20
    """Tokens shown before a context's peak token."""
    after: int = 6
    """Tokens shown after a context's peak token."""
    bins: int = 20
    """Bins of each latent's activation histogram."""
    logit_tokens: int = 8
    """Top and bottom unembedding tokens of each decoder direction."""
    neighbours: int = 6
    """Nearest latents by decoder cosine, per latent."""
    prompts: int = 3
    """Eval contexts shown token by token in the prompt view."""
    prompt_latents: int = 6
    """Latents listed per token in the prompt view."""


@dataclass
class Params:
    model: str = "smollm2-135m"
    """Registry name, hub id, local HF directory or .gguf path."""
    seed: int = 0
    """Seed of every random choice (split, init, shuffling)."""
    data: DataParams = field(default_factory=DataParams)
    extract: ExtractParams = field(default_factory=ExtractParams)
    lens: str = "none"
    """none | pretrained | fit."""
    lens_path: str = ""
    """Local tuned-lens directory for `lens: pretrained` (empty: the hub resource)."""
    lens_fit: LensFitParams = field(default_factory=LensFitParams)
    sae: SAEParams = field(default_factory=SAEParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    dump: DumpParams = field(default_factory=DumpParams)
    analysis: AnalysisParams = field(default_factory=AnalysisParams)
    browse: BrowseParams = field(default_factory=BrowseParams)

    def validate(self) -> "Params":
        positive = {
            "data.context": self.data.context,
            "data.train_tokens": self.data.train_tokens,
            "data.eval_tokens": self.data.eval_tokens,
            "data.sample_tokens": self.data.sample_tokens,
            "extract.batch_size": self.extract.batch_size,
            "sae.expansion": self.sae.expansion,
            "sae.k": self.sae.k,
            "sae.dead_tokens": self.sae.dead_tokens,
            "train.batch_tokens": self.train.batch_tokens,
            "train.epochs": self.train.epochs,
            "train.shuffle_buffer_tokens": self.train.shuffle_buffer_tokens,
            "train.checkpoint_every": self.train.checkpoint_every,
            "train.geometric_median_sample": self.train.geometric_median_sample,
            "evaluate.tokens": self.evaluate.tokens,
            "evaluate.batch_size": self.evaluate.batch_size,
            "lens_fit.steps": self.lens_fit.steps,
            "lens_fit.batch_tokens": self.lens_fit.batch_tokens,
            "lens_fit.patience": self.lens_fit.patience,
            "lens_fit.eval_tokens": self.lens_fit.eval_tokens,
            "analysis.top_tokens": self.analysis.top_tokens,
            **{f"browse.{k}": v for k, v in dataclasses.asdict(self.browse).items()
               if k not in ("before", "after", "neighbours")},
        }
        for key, value in positive.items():
            if value < 1:
                raise MlsaeError(f"{key}: must be >= 1 (got {value})")
        if self.data.context < 2:
            raise MlsaeError(f"data.context: must be >= 2: a 1-token context has no next-token target (got {self.data.context})")
        for key, value in {"sae.auxk": self.sae.auxk, "analysis.min_count": self.analysis.min_count,
                           "analysis.top_latents": self.analysis.top_latents,
                           "evaluate.bootstrap": self.evaluate.bootstrap,
                           "analysis.bootstrap": self.analysis.bootstrap,

                           "browse.before": self.browse.before, "browse.after": self.browse.after,
                           "browse.neighbours": self.browse.neighbours}.items():
            if value < 0:
                raise MlsaeError(f"{key}: must be >= 0 (got {value})")
        for key, value in {"train.lr": self.train.lr, "lens_fit.lr": self.lens_fit.lr}.items():
            if not value > 0:
                raise MlsaeError(f"{key}: must be > 0 (got {value})")
        if self.sae.auxk_coef < 0 or self.train.grad_clip < 0:
            raise MlsaeError("sae.auxk_coef and train.grad_clip must be >= 0")
        if not 0 < self.analysis.multi_layer_threshold <= 0.5:
            raise MlsaeError(f"analysis.multi_layer_threshold: must be in (0, 0.5] (a second-largest share is at "
                             f"most 1/2; got {self.analysis.multi_layer_threshold})")
        if self.data.skip_first not in (True, False, "auto"):
            raise MlsaeError(f"data.skip_first: must be true, false or auto (got {self.data.skip_first!r})")
        if self.extract.dtype not in DTYPES:
            raise MlsaeError(f"extract.dtype: unknown dtype {self.extract.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.train.source not in TRAIN_SOURCES:
            raise MlsaeError(f"train.source: must be one of {', '.join(TRAIN_SOURCES)} (got {self.train.source!r})")
        if self.lens not in LENS_MODES:
            raise MlsaeError(f"lens: unknown mode {self.lens!r}; use one of {', '.join(LENS_MODES)}")
        if self.sae.normalisation not in NORMALISATIONS:
            raise MlsaeError(f"sae.normalisation: must be one of {', '.join(NORMALISATIONS)} (got {self.sae.normalisation!r})")
        source = self.sae.source
        if source != "train" and (not source.strip() or source != source.strip() or "\n" in source):
            raise MlsaeError(f"sae.source: must be 'train', a local directory or a hub id owner/name (got {source!r})")
        layers = self.sae.layers
        if isinstance(layers, str):
            if layers != "all":
                raise MlsaeError(f"sae.layers: must be 'all' or a list of block indices (got {layers!r})")
        elif not layers or len(set(layers)) != len(layers) or any(i < 0 for i in layers):
            raise MlsaeError(f"sae.layers: must be a non-empty list of distinct indices >= 0 (got {layers})")
        return self

    def device(self, stage: str) -> str:
        """The device spec a stage runs on (resolve it once, with `models.resolve_device`)."""
        specs = {"extract": self.extract.device, "lens": self.lens_fit.device, "train": self.train.device,
                 "evaluate": self.evaluate.device or self.extract.device, "dump": self.dump.device}
        return specs[stage]

    def select_layers(self, n_layers: int) -> list[int]:
        """The block indices the SAE uses, checked against the model's layer count."""
        if self.sae.layers == "all":
            return list(range(n_layers))
        layers = sorted(self.sae.layers)  # type: ignore[arg-type]
        bad = [i for i in layers if i >= n_layers]
        if bad:
            raise MlsaeError(f"sae.layers: index {bad[0]} out of range for a model with {n_layers} layers (0..{n_layers - 1})")
        return layers

    def section_hash(self, *sections: str) -> str:
        """Stable short hash of some sections (recorded in outputs to detect mismatches)."""
        blob = json.dumps({s: _plain(getattr(self, s)) for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin is Union:
        for option in get_args(hint):
            try:
                return _coerce(key, value, option)
            except MlsaeError:
                continue
        raise MlsaeError(f"{key}: unexpected value {value!r}")
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            raise MlsaeError(f"{key}: expected a list (got {value!r})")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is Literal:
        if value not in get_args(hint):
            raise MlsaeError(f"{key}: must be one of {get_args(hint)} (got {value!r})")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise MlsaeError(f"{key}: expected true/false (got {value!r})")
        return value
    if hint is int:
        if not is_int(value):
            raise MlsaeError(f"{key}: expected an integer (got {value!r})")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MlsaeError(f"{key}: expected a number (got {value!r})")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise MlsaeError(f"{key}: expected a string (got {value!r})")
        return value
    raise TypeError(hint)


def _build(cls: type, raw: Any, prefix: str = "") -> Any:
    if not isinstance(raw, dict):
        raise MlsaeError(f"{prefix.rstrip('.') or 'params'}: expected a mapping (got {raw!r})")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise MlsaeError(f"{prefix}{unknown[0]}: unknown param; known: {', '.join(sorted(names))}")
    values = {name: _coerce(prefix + name, raw[name], hints[name]) for name in names if name in raw}
    return cls(**values)


def parse_params(raw: dict[str, Any]) -> Params:
    """Typed, validated params from a raw mapping; missing keys take the defaults."""
    return _build(Params, raw).validate()


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise MlsaeError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MlsaeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_params(raw)
