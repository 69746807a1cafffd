"""Reading the lens stage's output `data/lens/` back: the lens every later stage applies.

`data/lens/mlsae.json` (`RECORD`) holds the mode, model and shapes; for `pretrained` and `fit` the
directory also holds the tuned-lens files (config.json + params.pt). This module imports no lens
fitting code, so train, evaluate and dump do not depend on it.
"""

from __future__ import annotations

from pathlib import Path

from mlsae.core.errors import MlsaeError
from mlsae.core.io import read_json
from mlsae.lens.tuned import Lens
from mlsae.stores.activations import ActivationStore

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
