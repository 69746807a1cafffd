"""The lens stage: write `data/lens/` for `lens: none | pretrained | fit` (read back by
`mlsae.lens.loading`).

`data/lens/mlsae.json` records the mode, model and shapes; for `pretrained` and `fit` the
directory also holds the tuned-lens files (config.json + params.pt), whose sha256 the record
holds too (`sha256`: file name -> hex digest; checked on every load, see `mlsae.lens.loading`).
`none` writes only the small record (the identity needs no weights), so the graph keeps its
shape at no cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mlsae.core.io import atomic_dir, file_sha256, write_json
from mlsae.core.params import LensFitParams
from mlsae.core.paths import LENS_CONFIG, LENS_PARAMS
from mlsae.lens.fit import fit_lens, kl_by_layer
from mlsae.lens.loading import RECORD, SHA256
from mlsae.lens.tuned import load_pretrained
from mlsae.stores.activations import ActivationStore


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


def run_lens_stage(
    mode: str,
    lens_path: str,
    fit: LensFitParams,
    model_name: str,
    reader: ActivationStore,
    out_dir: Path,
    progress: bool = True,
) -> dict:
    """Build the lens for `mode` (the `lens` param; `lens_path` for `pretrained`, `fit` for `fit`)
    on `model_name`, write `out_dir`, return lens metrics."""
    record = {
        "mode": mode,
        "model": reader.attrs.get("model"),
        "n_layers": reader.n_layers,
        "d_model": reader.d_model,
    }
    if mode == "none":
        with atomic_dir(out_dir) as tmp:
            write_json(tmp / RECORD, record)
        return {"lens": "none"}

    from mlsae.models.registry import load_model, resolve_device

    model = load_model(model_name, resolve_device(fit.device))
    reader.check_model(model_name)
    if mode == "pretrained":
        lens = load_pretrained(lens_path, reader.n_layers, reader.d_model, model_name=_hub_name(model_name))
        info: dict = {}
    else:
        lens, info = fit_lens(
            train_chunks(reader),
            model.final_norm,
            model.unembed,
            reader.n_layers,
            reader.d_model,
            steps=fit.steps,
            lr=fit.lr,
            batch_tokens=fit.batch_tokens,
            seed=fit.seed,
            eval_resid=eval_sample(reader, fit.eval_tokens),
            patience=fit.patience,
            progress=progress,
        )
    # early stopping saw the first eval_tokens eval tokens; measure on the next ones (held out)
    held_out = eval_sample(reader, fit.eval_tokens, skip=fit.eval_tokens)
    if held_out.shape[0] == 0:
        held_out = eval_sample(reader, fit.eval_tokens)
    kl = kl_by_layer(lens, held_out, model.final_norm, model.unembed)
    with atomic_dir(out_dir) as tmp:
        lens.save(tmp, model_name=model_name, revision=str(reader.attrs.get("revision")))
        record[SHA256] = {name: file_sha256(tmp / name) for name in (LENS_CONFIG, LENS_PARAMS)}
        write_json(tmp / RECORD, record)
    metrics = {"lens": mode, **kl}
    for key in ("steps", "best_step", "stopped_early"):
        if key in info:
            metrics[f"fit_{key}"] = info[key]
    return metrics


def _hub_name(model: str) -> str:
    from mlsae.models.registry import REGISTRY

    return REGISTRY.get(model, model)
