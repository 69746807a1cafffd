"""The typed params object: every knob of params.yaml, validated once at the edge.

Layout: one pydantic model per params.yaml section (`DataParams`, `SAEParams`, ...) under
`Params`. Every field has its default and its docstring here and nowhere else: library configs
that mirror a section (`mlsae.sae.model.SAEConfig`) take their defaults from these classes.

`load_params("params.yaml")` returns `Params`; a missing file, bad YAML, an unknown key or an
ill-typed value raises `MlsaeError` with one line naming the dotted key, e.g.
`sae.k: input should be greater than or equal to 1 (got 0)` or
`sae.expnsion: unknown param; known: auxk, auxk_coef, ...`.

Why pydantic: `Literal` fields, `extra="forbid"` and strict types (no `"5"` for 5, no `true` for
1, no NaN or infinity for a float) give each rule one declaration instead of hand-written
coercion, and the models dump back to the plain dicts that `section_hash` and the checkpoint
identities hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from mlsae.core.errors import MlsaeError

DTYPES = ("float16", "bfloat16", "float32")
LENS_MODES = ("none", "pretrained", "fit")
"""The lens stage's modes (params `lens`); the SAE config's `lens` is one of these too."""
NORMALISATIONS = ("vector", "seed")
TRAIN_SOURCES = ("store", "stream")
FIRST_POSITION_OUTLIER = 2.0
"""`data.skip_first: auto` skips position 0 when its mean residual norm exceeds this many times the
mean norm at the other positions, at some block."""

Dtype = Literal["float16", "bfloat16", "float32"]
LensMode = Literal["none", "pretrained", "fit"]
Normalisation = Literal["vector", "seed"]
TrainSource = Literal["store", "stream"]
Ablation = Literal["mean", "zero"]


def is_int(value: object) -> bool:
    """An integer (Python or numpy) that is not a bool: the project's one integer check."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
    return value


Device = Annotated[str, AfterValidator(_device)]
"""A device spec a stage resolves once (`mlsae.models.registry.resolve_device`)."""
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]


class Section(BaseModel):
    """A params.yaml section: unknown keys, wrong types and non-finite floats are refused."""

    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, use_attribute_docstrings=True, validate_default=True
    )


class DataParams(Section):
    source: str = "embedded:python-docs"
    """`embedded:python-docs`, `hf:NAME[:CONFIG]`, or a path/glob of .txt/.jsonl/.parquet files."""
    seed: NonNegative = 0
    """Seed of the data: the document shuffle, the train/eval document split, and the eval sample
    the spliced evaluation runs on."""
    shuffle_documents: bool | Literal["auto"] = "auto"
    """Take the documents in a seeded shuffled order (`auto`: the embedded corpus only, whose
    documents come grouped by topic; a user's corpus keeps its order unless `true`)."""
    document_tokens: NonNegative | Literal["auto"] = "auto"
    """At most this many tokens of each document (its separator and first tokens), so a token
    budget spans many documents; 0: whole documents; `auto`: 64 for the embedded corpus, whole
    documents otherwise."""
    context: Annotated[int, Field(ge=2)] = 128
    """Tokens per context (at least 2: a 1-token context has no next-token target)."""
    train_tokens: Positive = 65536
    """Tokens extracted for training (rounded up to whole contexts)."""
    eval_tokens: Positive = 8192
    """Tokens extracted for evaluation and analysis (rounded up to whole contexts)."""
    sample_tokens: Positive = 16384
    """Stream mode only (`train.source: stream`): train tokens extract still stores, the sample the
    lens fit reads (rounded up to whole contexts, at most `train_tokens`); see mlsae/data/stream.py."""
    skip_first: bool | Literal["auto"] = "auto"
    """Leave position 0 of every context out of training, eval metrics and analysis: `true`, `false`,
    or `auto` (skip it when extract measures it as an outlier: its mean residual norm is more than
    `FIRST_POSITION_OUTLIER` times the mean norm elsewhere at some block; contexts are cut
    mid-document, and the first token becomes an attention sink with outlier norms)."""


class ExtractParams(Section):
    dtype: Dtype = "float16"
    """Storage dtype of the residual vectors: float16, bfloat16 or float32."""
    batch_size: Positive = 8
    """Contexts per forward pass."""
    device: Device = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""


class LensFitParams(Section):
    steps: Positive = 200
    """Optimiser steps when `lens: fit`."""
    batch_tokens: Positive = 32
    """Tokens per lens-fitting step."""
    lr: Annotated[float, Field(gt=0)] = 1e-3
    """Learning rate of the translators."""
    patience: Positive = 5
    """Evaluations without eval-KL improvement before stopping early."""
    eval_tokens: Positive = 256
    """Eval tokens for early stopping and the lens KL metrics (each costs layers x vocab)."""
    device: Device = "cpu"
    """Where `lens: fit` trains and the lens KL is measured: auto (CUDA when present), cpu, cuda
    or cuda:N."""
    seed: NonNegative = 0
    """Seed of the lens fit's batch order (the translators start at zero, the identity)."""


def _unique_layers(layers: str | list[int]) -> str | list[int]:
    if isinstance(layers, list) and (not layers or len(set(layers)) != len(layers)):
        raise ValueError("must be a non-empty list of distinct block indices")
    return layers


def _sae_source(source: str) -> str:
    if source != "train" and (not source.strip() or source != source.strip() or "\n" in source):
        raise ValueError("must be 'train', a local directory or a hub id owner/name")
    return source


class SAEParams(Section):
    layers: Annotated[Literal["all"] | list[NonNegative], AfterValidator(_unique_layers)] = "all"
    """`all`, or a list of block indices (e.g. [3] gives a single-layer SAE baseline)."""
    expansion: Positive = 16
    """n_latents = expansion x d_model."""
    k: Positive = 32
    """Active latents per vector (TopK)."""
    auxk: NonNegative = 256
    """Dead latents used by the AuxK loss."""
    auxk_coef: Annotated[float, Field(ge=0)] = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: Positive | Literal["auto"] = "auto"
    """A latent is dead after this many tokens without firing (a token counts once for all layers).
    Must be shorter than the run (steps x train.batch_tokens), or AuxK can never act; `auto`: an
    eighth of the run's tokens (`data.train_tokens` x `train.epochs`; paper-scale runs use ~10M)."""
    center: Literal["none", "layer"] = "none"
    """`layer`: subtract each block's mean (over the first train batches, in the SAE's space) from
    its vectors before the SAE standardises them, and add it back on decode, so the dictionary need
    not spend latents on per-layer mean directions; `none`: no centring."""
    normalisation: Normalisation = "seed"
    """Per-vector standardisation: `seed` (the seed paper's: unbiased std + 1e-5, which is also
    SAELens's `layer_norm`, so imports compute what they computed there and exports are exact) or
    `vector` (biased std, eps 1e-6 inside the sqrt: this project's first versions)."""
    source: Annotated[str, AfterValidator(_sae_source)] = "train"
    """`train` (train a new SAE), or an existing SAE that the train stage imports instead: a local
    directory or hub id (`owner/name`) in the seed paper's format (e.g.
    `tim-lawson/mlsae-pythia-70m-deduped-x64-k32`), or another experiment's `data/sae` directory.
    An imported SAE keeps its own n_latents, k, normalisation and layers (expansion, k, auxk,
    auxk_coef, dead_tokens and normalisation are then unused; `layers` picks the blocks of a seed SAE
    that records none)."""


class TrainParams(Section):
    seed: NonNegative = 0
    """Seed of the SAE's initialisation and of the batch order (a change reruns train and what
    follows it, never extract or lens)."""
    source: TrainSource = "store"
    """Where train batches come from: `store` (the train split extract stored; the default for small
    runs) or `stream` (the corpus through the model while training: disk use independent of
    `data.train_tokens`, for paper-scale runs; mlsae/data/stream.py)."""
    batch_tokens: Positive = 512
    """Tokens per optimiser step; each contributes all selected layers."""
    lr: Annotated[float, Field(gt=0)] = 3e-3
    """Adam learning rate. 3e-3 suits the short CPU default (about 128 steps; the README's
    experiments section has the measurements); long runs want 1e-4 to 3e-4."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate over the run: `constant`, or decayed to 0 at the run's last step, `linear` or
    `cosine` (after the warm-up). Stream mode knows its step count only as an estimate (the
    corpus's tokens per context vary), so there the decay ends near, not exactly at, the last step."""
    warmup_steps: NonNegative = 0
    """Steps over which the learning rate rises linearly from lr / warmup_steps to lr."""
    epochs: Positive = 1
    """Passes over the train split."""
    shuffle_buffer_tokens: Positive = 16384
    """Tokens held in the shuffle buffer; bounds memory."""
    checkpoint_every: Positive = 50
    """Optimiser steps between checkpoints."""
    grad_clip: Annotated[float, Field(ge=0)] = 0.0
    """Max gradient norm; 0 disables clipping."""
    geometric_median_sample: Positive = 4096
    """Normalised vectors used for the geometric-median init of b_pre."""
    device: Device = "auto"
    """auto (CUDA when present), cpu, cuda or cuda:N."""


class EvaluateParams(Section):
    tokens: Positive | Literal["auto"] = "auto"
    """Eval tokens of the spliced sample (whole contexts drawn at random, seeded by `data.seed`)
    for the downstream delta CE and KL, in the baseline and evaluate stages; at most the eval split;
    `auto`: the lesser of 2,048 and the eval split."""
    baselines: list[Ablation] = Field(default_factory=lambda: list[Ablation](["mean"]))
    """Ablations the baseline stage splices at every layer: `mean` (the layer's eval mean: the
    denominator of the loss recovered) and, opt-in, `zero`."""
    bootstrap: NonNegative = 200
    """Bootstrap resamples of eval documents, for each figure's bootstrap bias (`*_bias_boot`, a
    check on the jackknife's, which gives the value and the 95 % interval); 0 turns resampling off
    (plug-in values, no intervals)."""
    batch_size: Positive = 8
    """Contexts per spliced forward pass."""
    device: Literal[""] | Device = ""
    """Where evaluate runs (model, SAE, lens): auto, cpu, cuda or cuda:N; empty: `extract.device`."""


class DumpParams(Section):
    device: Device = "cpu"
    """Where dump encodes the eval split: auto (CUDA when present), cpu, cuda or cuda:N."""


class AnalysisParams(Section):
    seed: NonNegative = 0
    """Seed of every bootstrap (the baseline, evaluate and aggregate stages' resampling of eval
    documents): only the `_bias_boot` diagnostics depend on it (values, SEs and intervals come from
    the jackknife)."""
    min_count: NonNegative = 10
    """Latents active on fewer tokens are left out of the per-latent variance averages."""
    multi_layer_threshold: Annotated[float, Field(gt=0, le=0.5)] = 0.1
    """An active (token, latent) pair is multi-layer when its second-largest layer share is at
    least this (multi_layer_fraction); in (0, 0.5], since a second-largest share is at most 1/2."""
    bootstrap: NonNegative = 200
    """Bootstrap resamples of eval documents, for each figure's bootstrap bias (`*_bias_boot`, a
    check on the jackknife's, which gives the value and the 95 % interval); 0 turns resampling off
    (plug-in values, no intervals)."""
    top_latents: NonNegative = 20
    """Latents in the report's top-latent table."""
    top_tokens: Positive = 5
    """Max-activating contexts kept per latent."""
    max_rate: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Firing rate (active tokens / analysed tokens) from which a latent counts as dense: the
    `_sparse` figures leave such latents out."""
    min_documents: Positive = 5
    """Eval documents a latent must be active in (besides `min_count` tokens) to count in the
    per-latent averages (K); the `_any_docs` figures drop this condition."""
    paper_batch_tokens: Positive = 2048
    """Analysed tokens per batch of the seed paper's estimator (batches of consecutive documents)."""


class BrowseParams(Section):
    latents: Positive = 400
    """Latents given a page in the browser: the most often active ones (ties by index)."""
    contexts: Positive = 5
    """Top activating contexts per latent (at most one per eval context)."""
    before: NonNegative = 20
    """Tokens shown before a context's peak token."""
    after: NonNegative = 6
    """Tokens shown after a context's peak token."""
    bins: Positive = 20
    """Bins of each latent's activation histogram."""
    logit_tokens: Positive = 8
    """Top and bottom unembedding tokens of each decoder direction."""
    neighbours: NonNegative = 6
    """Nearest latents by decoder cosine, per latent."""
    prompts: Positive = 3
    """Eval contexts shown token by token in the prompt view."""
    prompt_latents: Positive = 6
    """Latents listed per token in the prompt view."""


class Params(Section):
    model: str = "smollm2-135m"
    """Registry name, hub id, local HF directory or .gguf path."""
    data: DataParams = Field(default_factory=DataParams)
    extract: ExtractParams = Field(default_factory=ExtractParams)
    lens: LensMode = "none"
    """none | pretrained | fit."""
    lens_path: str = ""
    """Local tuned-lens directory for `lens: pretrained` (empty: the hub resource)."""
    lens_fit: LensFitParams = Field(default_factory=LensFitParams)
    sae: SAEParams = Field(default_factory=SAEParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    dump: DumpParams = Field(default_factory=DumpParams)
    analysis: AnalysisParams = Field(default_factory=AnalysisParams)
    browse: BrowseParams = Field(default_factory=BrowseParams)

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise MlsaeError(f"params: expected a mapping (got {raw!r})")
        if "seed" in raw:
            raise MlsaeError(
                "seed: replaced by data.seed (document shuffle, split, eval sample), train.seed (SAE init, batch "
                "order) and analysis.seed (bootstraps); set those instead"
            )
        return raw

    def device(self, stage: str) -> str:
        """The device spec a stage runs on (resolve it once, with `models.registry.resolve_device`);
        only that stage's key is read (`evaluate.device`, and `extract.device` when it is empty:
        the baseline and evaluate stages)."""
        if stage in ("evaluate", "baseline"):
            return self.evaluate.device or self.extract.device
        sections: dict[str, ExtractParams | LensFitParams | TrainParams | DumpParams]
        sections = {"extract": self.extract, "lens": self.lens_fit, "train": self.train, "dump": self.dump}
        return sections[stage].device

    def select_layers(self, n_layers: int) -> list[int]:
        """The block indices the SAE uses, checked against the model's layer count."""
        return select_layers(self.sae, n_layers)

    def section_hash(self, *sections: str) -> str:
        """Stable short hash of some sections (recorded in outputs to detect mismatches)."""
        blob = json.dumps({s: _plain(getattr(self, s)) for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def select_layers(sae: SAEParams, n_layers: int) -> list[int]:
    """The block indices `sae.layers` selects, checked against the model's layer count."""
    if sae.layers == "all":
        return list(range(n_layers))
    layers = sorted(sae.layers)
    bad = [i for i in layers if i >= n_layers]
    if bad:
        raise MlsaeError(
            f"sae.layers: index {bad[0]} out of range for a model with {n_layers} layers (0..{n_layers - 1})"
        )
    return layers


def _plain(value: Any) -> Any:
    return value.model_dump() if isinstance(value, BaseModel) else value


_TYPE_TAGS = {"bool", "str", "int", "float", "list", "dict"}


def _key(loc: tuple) -> str:
    """`('sae', 'layers', 'list[int]', 1)` -> `sae.layers[1]`: the dotted key, without the union
    branch tags pydantic puts in a location."""
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif part.isidentifier() and part not in _TYPE_TAGS:
            key += f".{part}" if key else part
    return key or "params"


def _one_line(error: ValidationError) -> str:
    """One line for a failed validation: the deepest key at fault (a union's branches can fail at
    different depths; the deepest is the most specific), what is wrong (the messages of every
    branch that failed at that key, joined by "or") and the value given."""
    errors = error.errors(include_url=False)
    keyed = [(_key(e["loc"]), e) for e in errors]
    deepest = max(keyed, key=lambda ke: ke[0].count(".") + ke[0].count("["))[0]
    failed = [e for key, e in keyed if key == deepest]
    first = failed[0]
    if first["type"] == "extra_forbidden":
        section = _section_of(first["loc"][:-1])
        known = ", ".join(sorted(section.model_fields)) if section else ""
        return f"{deepest}: unknown param; known: {known}"
    messages: list[str] = []
    for e in failed:
        message = e["msg"].removeprefix("Value error, ")
        message = message[:1].lower() + message[1:]
        if message not in messages:
            messages.append(message)
    return f"{deepest}: {' or '.join(messages)} (got {first['input']!r})"


def _section_of(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def parse_params(raw: Any) -> Params:
    """Typed, validated params from a raw mapping; missing keys take the defaults."""
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise MlsaeError(_one_line(e)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise MlsaeError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MlsaeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_params(raw)
