"""baseline: clean CE and the ablations' cost on the spliced sample, per document (no SAE)."""

import typer

from mlsae.core import paths as C
from mlsae.core.io import atomic_dir
from mlsae.core.metrics import BaselineMetrics, write_metrics
from mlsae.core.params import select_layers
from mlsae.core.stage import params, stage
from mlsae.evaluation.baseline import run_baseline
from mlsae.evaluation.sample import spliced_sample
from mlsae.models.registry import load_model, resolve_device
from mlsae.stores.activations import ActivationStore, guard


def main(params_file: str = "params.yaml") -> None:
    with stage("baseline"), guard(C.ACTIVATIONS, "extract"):
        p = params(params_file)
        reader = ActivationStore(str(C.ACTIVATIONS))
        reader.check_model(p.model)
        model = load_model(p.model, resolve_device(p.device("baseline")))
        sample = spliced_sample(reader, p.evaluate.tokens, p.data.seed)
        layers = select_layers(p.sae, reader.n_layers)
        ev = p.evaluate
        sums, metrics = run_baseline(
            model, reader, layers, sample, ev.baselines, ev.batch_size, ev.bootstrap, p.analysis.seed
        )
        with atomic_dir(C.BASELINE_DIR) as tmp:
            sums.save(tmp / C.BASELINE_SUMS)
        write_metrics(C.BASELINE_METRICS, BaselineMetrics.from_dict(metrics, "baseline"))


if __name__ == "__main__":
    typer.run(main)
