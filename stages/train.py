"""train: the MLSAE on the train split (in lens space); checkpoints and resumes.

Multi-process: `torchrun --nproc_per_node=N stages/train.py` (DDP; NCCL on GPUs, gloo on CPUs).
"""

import typer

from mlsae import constants as C
from mlsae.io import write_json, write_text
from mlsae.lens_stage import load_stage_lens
from mlsae.stage import params, stage
from mlsae.store import ActivationStore, guard
from mlsae.tables import to_csv
from mlsae.train import train


def main(params_file: str = "params.yaml") -> None:
    with stage("train"), guard(C.ACTIVATIONS, "extract"):
        p = params(params_file)
        reader = ActivationStore(str(C.ACTIVATIONS))
        reader.check_model(p.model)
        lens = load_stage_lens(C.LENS_DIR, reader)
        metrics, history = train(p, reader, lens, C.SAE_DIR, C.CHECKPOINTS_DIR / "train")
        if metrics:  # rank 0 of a torchrun job, or the single process
            write_json(C.TRAIN_METRICS, metrics)
            write_text(C.TRAIN_PLOT, to_csv(history))


if __name__ == "__main__":
    typer.run(main)
