"""aggregate: streaming Polars analysis of the latents' layer distributions -> data/analysis/."""

import typer

from mlsae.analysis.aggregate import aggregate
from mlsae.core import paths as C
from mlsae.core.stage import params, stage
from mlsae.stores.activations import guard


def main(params_file: str = "params.yaml") -> None:
    with stage("aggregate"), guard(C.LATENTS, "dump"):
        p = params(params_file)
        aggregate(C.LATENTS, C.ANALYSIS_DIR, C.ANALYSIS_METRICS, p.analysis, progress=True)


if __name__ == "__main__":
    typer.run(main)
