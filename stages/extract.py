"""extract: corpus -> residual stream of every block -> data/activations.zarr."""

import typer

from mlsae import constants as C
from mlsae.extract import extract
from mlsae.io import write_json
from mlsae.stage import params, stage


def main(params_file: str = "params.yaml") -> None:
    with stage("extract"):
        write_json(C.EXTRACT_METRICS, extract(params(params_file), str(C.ACTIVATIONS)))


if __name__ == "__main__":
    typer.run(main)
