"""extract: corpus -> residual stream of every block -> data/activations.zarr."""

import typer

from mlsae import constants as C
from mlsae.extract import extract
from mlsae.io import write_json, write_text
from mlsae.tables import to_csv
from mlsae.stage import params, stage


def main(params_file: str = "params.yaml") -> None:
    with stage("extract"):
        metrics = extract(params(params_file), str(C.ACTIVATIONS))
        write_json(C.EXTRACT_METRICS, metrics)
        write_text(C.ADJ_COS_PLOT, to_csv([
            {"layer": i, "adjacent_cos": c} for i, c in enumerate(metrics["adjacent_cos_by_layer"])
        ]))


if __name__ == "__main__":
    typer.run(main)
