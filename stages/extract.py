"""extract: corpus -> residual stream of every block -> data/activations.zarr."""

import typer

from mlsae import constants as C
from mlsae.extract import extract
from mlsae.metrics import ExtractMetrics, write_metrics
from mlsae.stage import params, stage


def main(params_file: str = "params.yaml") -> None:
    with stage("extract"):
        metrics = extract(params(params_file), str(C.ACTIVATIONS))
        write_metrics(C.EXTRACT_METRICS, ExtractMetrics.from_dict(metrics, "extract"))


if __name__ == "__main__":
    typer.run(main)
