"""extract: corpus -> residual stream of every block -> data/activations.zarr."""

import typer

from mlsae.core import paths as C
from mlsae.core.metrics import ExtractMetrics, write_metrics
from mlsae.core.stage import params, stage
from mlsae.data.extract import extract


def main(params_file: str = "params.yaml") -> None:
    with stage("extract"):
        p = params(params_file)
        metrics = extract(p.model, p.data, p.extract, p.train.source, str(C.ACTIVATIONS))
        write_metrics(C.EXTRACT_METRICS, ExtractMetrics.from_dict(metrics, "extract"))


if __name__ == "__main__":
    typer.run(main)
