"""train: the MLSAE on the train split (in lens space); checkpoints and resumes. With `sae.source`
other than `train`, imports that SAE instead (mlsae/sae/importer.py).

Multi-process: `torchrun --nproc_per_node=N stages/train.py` (DDP; NCCL on GPUs, gloo on CPUs).
"""

import typer

from mlsae.core import paths as C
from mlsae.core.io import write_text
from mlsae.core.metrics import TrainMetrics, write_metrics
from mlsae.core.stage import params, stage
from mlsae.core.tables import to_csv
from mlsae.lens.loading import load_stage_lens
from mlsae.sae.importer import TRAIN_CURVE_HEADER, import_sae
from mlsae.sae.trainer import StreamSource, train
from mlsae.stores.activations import ActivationStore, guard


def main(params_file: str = "params.yaml") -> None:
    with stage("train"), guard(C.ACTIVATIONS, "extract"):
        p = params(params_file)
        reader = ActivationStore(str(C.ACTIVATIONS))
        reader.check_model(p.model)
        if p.sae.source != "train":
            metrics = import_sae(p.sae, p.lens, reader, C.SAE_DIR)
            write_metrics(C.TRAIN_METRICS, TrainMetrics.from_dict(metrics, "train", partial=True))
            write_text(C.TRAIN_PLOT, TRAIN_CURVE_HEADER)
            return
        lens = load_stage_lens(C.LENS_DIR, reader)
        stream = StreamSource(p.model, p.data, p.extract) if p.train.source == "stream" else None
        metrics, history = train(
            p.sae, p.train, p.lens, reader, lens, C.SAE_DIR, C.CHECKPOINTS_DIR / "train", stream=stream
        )
        if metrics:  # rank 0 of a torchrun job, or the single process
            write_metrics(C.TRAIN_METRICS, TrainMetrics.from_dict(metrics, "train"))
            write_text(C.TRAIN_PLOT, to_csv(history))


if __name__ == "__main__":
    typer.run(main)
