"""dump: top-k latent (indices, values) of every eval token and layer -> data/latents.zarr."""

import typer

from mlsae.core import paths as C
from mlsae.core.stage import params, stage
from mlsae.lens.loading import load_stage_lens
from mlsae.models.registry import resolve_device
from mlsae.sae.dump import dump
from mlsae.sae.model import MLSAE
from mlsae.stores.activations import ActivationStore, guard


def main(params_file: str = "params.yaml") -> None:
    with stage("dump"), guard(C.ACTIVATIONS, "extract"):
        p = params(params_file)
        reader = ActivationStore(str(C.ACTIVATIONS))
        reader.check_model(p.model)
        device = resolve_device(p.device("dump"))
        lens = load_stage_lens(C.LENS_DIR, reader).to(device)
        dump(MLSAE.load(C.SAE_DIR, device), lens, reader, str(C.LATENTS))


if __name__ == "__main__":
    typer.run(main)
