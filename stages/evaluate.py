"""evaluate: per-layer reconstruction metrics and spliced downstream loss on the eval split."""

import typer

from mlsae.core import paths as C
from mlsae.core.io import write_text
from mlsae.core.metrics import EvalMetrics, write_metrics
from mlsae.core.stage import params, stage
from mlsae.core.tables import to_csv
from mlsae.evaluation.reconstruction import evaluate
from mlsae.lens.loading import load_stage_lens
from mlsae.models.registry import load_model, resolve_device
from mlsae.sae.model import MLSAE
from mlsae.stores.activations import ActivationStore, guard


def main(params_file: str = "params.yaml") -> None:
    with stage("evaluate"), guard(C.ACTIVATIONS, "extract"):
        p = params(params_file)
        reader = ActivationStore(str(C.ACTIVATIONS))
        reader.check_model(p.model)
        device = resolve_device(p.device("evaluate"))
        lens = load_stage_lens(C.LENS_DIR, reader).to(device)
        sae = MLSAE.load(C.SAE_DIR, device)
        model = load_model(p.model, device)
        metrics, rows = evaluate(p, sae, lens, model, reader)
        write_metrics(C.EVAL_METRICS, EvalMetrics.from_dict(metrics, "evaluate"))
        write_text(C.EVAL_PLOT, to_csv(rows))


if __name__ == "__main__":
    typer.run(main)
