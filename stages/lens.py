"""lens: none (identity record) | pretrained (tuned-lens dir or hub) | fit (trained here)."""

import typer

from mlsae.core import paths as C
from mlsae.core.metrics import LensMetrics, write_metrics
from mlsae.core.stage import params, stage
from mlsae.lens.build import run_lens_stage
from mlsae.stores.activations import ActivationStore, guard


def main(params_file: str = "params.yaml") -> None:
    with stage("lens"), guard(C.ACTIVATIONS, "extract"):
        p = params(params_file)
        reader = ActivationStore(str(C.ACTIVATIONS))
        reader.check_model(p.model)
        metrics = run_lens_stage(p.lens, p.lens_path, p.lens_fit, p.model, reader, C.LENS_DIR)
        write_metrics(C.LENS_METRICS, LensMetrics.from_dict(metrics, "lens"))


if __name__ == "__main__":
    typer.run(main)
