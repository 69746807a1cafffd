"""train: the MLSAE on the train split (in lens space); checkpoints and resumes. With `sae.source`
other than `train`, imports that SAE instead (mlsae/sae_import.py).

Multi-process: `torchrun --nproc_per_node=N stages/train.py` (DDP; NCCL on GPUs, gloo on CPUs).
"""

import typer

from mlsae import constants as C
from mlsae.io import write_text
from mlsae.lens_stage import load_stage_lens
from mlsae.metrics import TrainMetrics, write_metrics
from mlsae.sae_import import TRAIN_CURVE_HEADER, import_sae
from mlsae.stage import params, stage
from mlsae.store import ActivationStore, guard
from mlsae.tables import to_csv
from mlsae.train import train


def main(params_file: str = "params.yaml") -> None:
    with stage("train"), guard(C.ACTIVATIONS, "extract"):
        p = params(params_file)
        reader = ActivationStore(str(C.ACTIVATIONS))
        reader.check_model(p.model)
        if p.sae.source != "train":
            write_metrics(C.TRAIN_METRICS, TrainMetrics.from_dict(import_sae(p, reader, C.SAE_DIR), "train", partial=True))
            write_text(C.TRAIN_PLOT, TRAIN_CURVE_HEADER)
            return
        lens = load_stage_lens(C.LENS_DIR, reader)
        metrics, history = train(p, reader, lens, C.SAE_DIR, C.CHECKPOINTS_DIR / "train")
        if metrics:  # rank 0 of a torchrun job, or the single process
            write_metrics(C.TRAIN_METRICS, TrainMetrics.from_dict(metrics, "train"))
            write_text(C.TRAIN_PLOT, to_csv(history))


if __name__ == "__main__":
    typer.run(main)
