"""Reading the lens stage's output `data/lens/` back: the lens every later stage applies.

`data/lens/mlsae.json` (`RECORD`) holds the mode, model and shapes; for `pretrained` and `fit` the
directory also holds the tuned-lens files (config.json + params.pt), and the record their sha256
(`SHA256`), checked before they are read: a changed byte, or a record without the hashes, is an
error naming the file and the fix (it fails closed, like the SAE's `weights_sha256`). This module
imports no lens fitting code, so train, evaluate and dump do not depend on it.
"""

from __future__ import annotations

from pathlib import Path

from mlsae.core.errors import MlsaeError
from mlsae.core.io import file_sha256, read_json
from mlsae.core.params import LENS_MODES
from mlsae.core.paths import LENS_CONFIG, LENS_PARAMS
from mlsae.lens.tuned import Lens
from mlsae.stores.activations import ActivationStore

RECORD = "mlsae.json"
SHA256 = "sha256"
"""Key of the record holding {file name: sha256} of the tuned-lens files."""


def load_stage_lens(lens_dir: str | Path, reader: ActivationStore) -> Lens:
    """The lens the lens stage wrote, checked against the store's model and shapes and, for a
    tuned lens, against the sha256 of its files."""
    lens_dir = Path(lens_dir)
    path = lens_dir / RECORD
    record = read_json(path)
    rebuild = f"restore it with `dvc checkout {lens_dir}` or rebuild it with `dvc repro -f lens`"
    if not isinstance(record, dict):
        raise MlsaeError(f"{path}: expected a JSON object (the lens stage's record); {rebuild}")
    mode = record.get("mode")
    if mode not in LENS_MODES:
        raise MlsaeError(f"{path}: 'mode' is {mode!r}, expected one of {', '.join(LENS_MODES)}; {rebuild}")
    if record.get("model") != reader.attrs.get("model"):
        raise MlsaeError(
            f"{lens_dir}: lens is for model {record.get('model')!r} but the store holds {reader.attrs.get('model')!r}; rerun the lens stage"
        )
    if mode == "none":
        return Lens.identity(reader.n_layers, reader.d_model)
    hashes = record.get(SHA256)
    for name in (LENS_CONFIG, LENS_PARAMS):
        want = hashes.get(name) if isinstance(hashes, dict) else None
        if not isinstance(want, str):
            raise MlsaeError(f"{path}: no sha256 recorded for {name} (written by an older version); {rebuild}")
        if not (lens_dir / name).is_file():
            raise MlsaeError(f"{lens_dir / name}: missing; {rebuild}")
        if file_sha256(lens_dir / name) != want:
            raise MlsaeError(
                f"{lens_dir / name}: sha256 differs from the one recorded in {path} (corrupted); {rebuild}"
            )
    return Lens.load(lens_dir, reader.n_layers, reader.d_model)
