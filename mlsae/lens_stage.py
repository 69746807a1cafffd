"""The lens stage: write `data/lens/` for `lens: none | pretrained | fit`, and read it back.

`data/lens/mlsae.json` records the mode, model and shapes; for `pretrained` and `fit` the
directory also holds the tuned-lens files (config.json + params.pt). `none` writes only the
small record (the identity needs no weights), so the graph keeps its shape at no cost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mlsae.errors import MlsaeError
from mlsae.io import atomic_dir, read_json, write_json
from mlsae.lens import Lens, load_pretrained
from mlsae.lens_fit import fit_lens, kl_by_layer
from mlsae.params import Params
from mlsae.store import ActivationStore

RECORD = "mlsae.json"


def load_stage_lens(lens_dir: str | Path, reader: ActivationStore) -> Lens:
    """The lens the lens stage wrote, checked against the store's model and shapes."""
    lens_dir = Path(lens_dir)
    record = read_json(lens_dir / RECORD)
    if record.get("model") != reader.attrs.get("model"):
        raise MlsaeError(
            f"{lens_dir}: lens is for model {record.get('model')!r} but the store holds {reader.attrs.get('model')!r}; rerun the lens stage"
        )
    if record["mode"] == "none":
        return Lens.identity(reader.n_layers, reader.d_model)
    return Lens.load(lens_dir, reader.n_layers, reader.d_model)


def eval_sample(reader: ActivationStore, n: int, skip: int = 0) -> torch.Tensor:
    """`n` non-special eval tokens after the first `skip` of them, all blocks, float32."""
    rank = np.cumsum(reader.keep("eval"))
    start = int(np.searchsorted(rank, skip + 1))
    stop = min(reader.n_tokens("eval"), int(np.searchsorted(rank, skip + n)) + 1)
    return reader.resid_kept("eval", start, stop)[:n]


def train_chunks(reader: ActivationStore):
    """A tuned-lens TrainIterFactory over the store's train split: store chunks in a seeded order."""
    chunk = reader.chunk_tokens
    n = reader.n_tokens("train")

    def factory(generator: torch.Generator) -> Iterator[torch.Tensor]:
        starts = torch.arange(0, n, chunk)[torch.randperm(-(-n // chunk), generator=generator)]
        for s in starts.tolist():
            x = reader.resid_kept("train", s, min(n, s + chunk))
            yield x[torch.randperm(x.shape[0], generator=generator)]

    return factory


def run_lens_stage(p: Params, reader: ActivationStore, out_dir: Path, progress: bool = True) -> dict:
    """Build the lens for `p.lens`, write `out_dir`, return lens metrics."""
    record = {"mode": p.lens, "model": reader.attrs.get("model"), "n_layers": reader.n_layers,
              "d_model": reader.d_model}
    if p.lens == "none":
        with atomic_dir(out_dir) as tmp:
            write_json(tmp / RECORD, record)
        return {"lens": "none"}

    from mlsae.models import load_model

    from mlsae.models import resolve_device

    model = load_model(p.model, resolve_device(p.device("lens")))
    reader.check_model(p.model)
    if p.lens == "pretrained":
        lens = load_pretrained(p.lens_path, reader.n_layers, reader.d_model, model_name=_hub_name(p.model))
        info: dict = {}
    else:
        lens, info = fit_lens(
            train_chunks(reader), model.final_norm, model.unembed, reader.n_layers, reader.d_model,
            steps=p.lens_fit.steps, lr=p.lens_fit.lr, batch_tokens=p.lens_fit.batch_tokens, seed=p.seed,
            eval_resid=eval_sample(reader, p.lens_fit.eval_tokens), patience=p.lens_fit.patience,
            progress=progress,
        )
    # early stopping saw the first eval_tokens eval tokens; measure on the next ones (held out)
    held_out = eval_sample(reader, p.lens_fit.eval_tokens, skip=p.lens_fit.eval_tokens)
    if held_out.shape[0] == 0:
        held_out = eval_sample(reader, p.lens_fit.eval_tokens)
    kl = kl_by_layer(lens, held_out, model.final_norm, model.unembed)
    with atomic_dir(out_dir) as tmp:
        lens.save(tmp, model_name=p.model, revision=str(reader.attrs.get("revision")))
        write_json(tmp / RECORD, record)
    metrics = {"lens": p.lens, **kl}
    for key in ("steps", "best_step", "stopped_early"):
        if key in info:
            metrics[f"fit_{key}"] = info[key]
    return metrics


def _hub_name(model: str) -> str:
    from mlsae.models import REGISTRY

    return REGISTRY.get(model, model)
