"""evaluate: per-layer reconstruction metrics and the spliced reconstruction's downstream loss."""

import typer

from mlsae.core import paths as C
from mlsae.core.io import write_text
from mlsae.core.metrics import EvalMetrics, write_metrics
from mlsae.core.stage import params, stage
from mlsae.core.tables import to_csv
from mlsae.evaluation.downstream import SpliceSums
from mlsae.evaluation.reconstruction import evaluate
from mlsae.evaluation.sample import spliced_sample
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
        sample = spliced_sample(reader, p.evaluate.tokens, p.data.seed)
        base = SpliceSums.load(C.BASELINE_DIR / C.BASELINE_SUMS)
        ev = p.evaluate
        metrics, rows = evaluate(sae, lens, model, reader, sample, base, ev.batch_size, ev.bootstrap, p.analysis.seed)
        write_metrics(C.EVAL_METRICS, EvalMetrics.from_dict(metrics, "evaluate"))
        write_text(C.EVAL_PLOT, to_csv(rows))


if __name__ == "__main__":
    typer.run(main)
