"""The convergence study: how the headline statistics move as training grows.

One training run of ``max(epochs)`` epochs over the default run's train split, with the SAE saved
at the end of each listed epoch (``train(..., snapshots=...)``). The learning rate is constant and
epoch e's batch plan does not depend on how many epochs follow, so the snapshot after epoch e *is*
the SAE of ``dvc exp run -S train.epochs=e`` (tests/test_train.py checks this on a tiny model).
Each snapshot is then measured like the pipeline measures its SAE: reconstruction on the eval split
(mlsae.evaluation.reconstruction), the latent dump (mlsae.sae.dump) and the aggregate statistics (mlsae.analysis.aggregate).

    python -m mlsae.studies.convergence train   --store data/activations.zarr --out runs/convergence --budgets 0.5 1 2 4
    python -m mlsae.studies.convergence measure --store data/activations.zarr --out runs/convergence --docs docs

``measure`` writes ``docs/convergence.csv``, ``.md`` and ``.png``. The store must be the default
run's (``dvc repro extract``); params come from ``params.yaml`` except ``train.epochs``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import typer

from mlsae.analysis.aggregate import aggregate
from mlsae.core.io import write_bytes, write_text
from mlsae.core.params import load_params
from mlsae.data.shuffle import BatchPlan
from mlsae.evaluation.reconstruction import reconstruction_metrics
from mlsae.lens.tuned import Lens
from mlsae.sae.dump import dump
from mlsae.sae.model import MLSAE
from mlsae.sae.trainer import train as train_sae
from mlsae.stores.activations import ActivationStore

app = typer.Typer(help=__doc__.splitlines()[0], no_args_is_help=True)
FIGURES = (
    "within_share",
    "within_share_mass",
    "var_ratio_paper",
    "effective_layers",
    "multi_layer_fraction",
    "fvu",
    "dead_fraction",
)


def epoch_ends(reader: ActivationStore, p, epochs: int) -> list[int]:
    """The step number at the end of each epoch 1..epochs (the batch plan's own count)."""
    plan = BatchPlan(
        ~reader.keep("train"), reader.chunk_tokens, p.train.shuffle_buffer_tokens, p.train.batch_tokens, epochs, p.seed
    )
    per_epoch = [sum(b.n_batches for b in plan.buffers if b.epoch == e) for e in range(epochs)]
    return np.cumsum(per_epoch).tolist()


def budget_step(ends: list[int], budget: float) -> int:
    """The step at which `budget` epochs are done: an epoch end, or a fraction of the first epoch."""
    if budget == int(budget):
        return ends[int(budget) - 1]
    if budget > 1:
        raise typer.BadParameter(f"budget {budget}: fractions only below one epoch")
    return max(1, round(budget * ends[0]))


def _name(budget: float) -> str:
    return f"sae_e{budget:g}"


@app.command()
def train(
    store: Path = Path("data/activations.zarr"),
    out: Path = Path("runs/convergence"),
    budgets: list[float] = typer.Option([0.5, 1, 2, 4]),
    params_file: Path = Path("params.yaml"),
) -> None:
    """Train once up to the largest budget (in epochs), saving the SAE at every budget."""
    p = load_params(params_file)
    if p.train.source != "store":
        raise typer.BadParameter(
            "train.source: the convergence study counts epochs over the stored train split; set train.source: store"
        )
    p.train.epochs = int(np.ceil(max(budgets)))
    reader = ActivationStore(str(store))
    ends = epoch_ends(reader, p, p.train.epochs)
    snapshots = {budget_step(ends, b): out / _name(b) for b in budgets}
    last = max(snapshots)
    _, history = train_sae(
        p,
        reader,
        Lens.identity(reader.n_layers, reader.d_model),
        out / "sae_final",
        out / "ckpt",
        snapshots=snapshots,
        max_steps=None if last == ends[-1] else last,
    )
    write_text(out / "history.json", json.dumps(history))


@app.command()
def measure(
    store: Path = Path("data/activations.zarr"),
    out: Path = Path("runs/convergence"),
    docs: Path = Path("docs"),
    params_file: Path = Path("params.yaml"),
) -> None:
    """Measure every snapshot in `out` and write the table and figure to `docs`."""
    p = load_params(params_file)
    reader = ActivationStore(str(store))
    history = json.loads((out / "history.json").read_text())
    budgets = sorted(float(d.name[5:]) for d in out.glob("sae_e*"))
    ends = epoch_ends(reader, p, int(np.ceil(max(budgets))))
    lens = Lens.identity(reader.n_layers, reader.d_model)
    rows = []
    for e in budgets:
        step = budget_step(ends, e)
        sae = MLSAE.load(out / _name(e)).eval()
        rec = reconstruction_metrics(sae, lens, reader, n_resamples=p.analysis.bootstrap, seed=p.seed)
        latents = out / f"latents_e{e:g}.zarr"
        dump(sae, lens, reader, str(latents))
        stats = aggregate(
            latents,
            out / f"analysis_e{e:g}",
            out / f"analysis_e{e:g}.json",
            min_count=p.analysis.min_count,
            top_tokens=0,
            multi_layer_threshold=p.analysis.multi_layer_threshold,
            n_resamples=p.analysis.bootstrap,
            seed=p.seed,
        )
        done = history[:step]
        row = {
            "epochs": e,
            "steps": step,
            "train_tokens": step * p.train.batch_tokens,
            "fvu": rec["fvu"],
            "fvu_ci": rec.get("fvu_ci"),
            "dead_fraction": rec["dead_fraction"],
            "train_dead_fraction": done[-1]["dead_fraction"],
            "auxk_steps": sum(h["auxk"] > 0 for h in done),
        }
        for key in (*FIGURES[:5], "var_ratio", "var_ratio_mass"):
            row[key] = stats.get(key)
            row[f"{key}_ci"] = stats.get(f"{key}_ci")
        rows.append(row)
    _write(rows, docs)


def _fmt(value, ci=None) -> str:
    if value is None:
        return "-"
    text = f"{value:.3g}"
    return f"{text} ({ci[0]:.3g}–{ci[1]:.3g})" if ci else text


def _write(rows: list[dict], docs: Path) -> None:
    flat = pl.DataFrame([{k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()} for r in rows])
    write_text(docs / "convergence.csv", flat.write_csv())
    head = [
        "epochs",
        "train tokens",
        "FVU",
        "dead (eval)",
        "dead (train end)",
        "AuxK steps",
        "within_share",
        "within_share_mass",
        "var_ratio",
        "var_ratio_paper",
        "effective_layers",
        "multi_layer_fraction",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"{r['epochs']:g}",
            f"{r['train_tokens']:,}",
            _fmt(r["fvu"], r["fvu_ci"]),
            _fmt(r["dead_fraction"]),
            _fmt(r["train_dead_fraction"]),
            str(r["auxk_steps"]),
            *(
                _fmt(r[k], r[f"{k}_ci"])
                for k in (
                    "within_share",
                    "within_share_mass",
                    "var_ratio",
                    "var_ratio_paper",
                    "effective_layers",
                    "multi_layer_fraction",
                )
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    intro = (
        "# Convergence study\n\n"
        "How the headline statistics move as the default run's MLSAE trains longer: SmolLM2-135M, the default\n"
        "params (expansion 16, k 32, lr 3e-3, batch 512 tokens x 30 layers, AuxK window 8,192 tokens), trained for\n"
        "0.5, 1, 2 and 4 epochs over the same 64k-token train split (budgets spanning 8x, up to 4x the default's\n"
        "training tokens), measured on the default eval split. One 4-epoch run with snapshots gives all four rows:\n"
        "with a constant learning rate, the snapshot after epoch e is the SAE of `dvc exp run -S train.epochs=e`\n"
        "(tested; the 1-epoch snapshot equals the committed default run's SAE bit for bit).\n"
        "Intervals: 95 % bootstrap over the eval contexts. Reproduce (after `dvc repro`):\n\n"
        "```bash\n"
        "python -m mlsae.studies.convergence train --store data/activations.zarr --out runs/convergence --budgets 0.5 1 2 4\n"
        "python -m mlsae.studies.convergence measure --store data/activations.zarr --out runs/convergence --docs docs\n"
        "```\n\n"
    )
    write_text(docs / "convergence.md", intro + "\n".join(lines) + "\n\n![convergence](convergence.png)\n")
    write_bytes(docs / "convergence.png", _figure(rows))


def _figure(rows: list[dict]) -> bytes:
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6.5), layout="constrained")
    axes = fig.subplots(2, 4).ravel()
    tokens = [r["train_tokens"] for r in rows]
    for ax, key in zip(axes, (*FIGURES, "var_ratio")):
        values = [np.nan if r[key] is None else r[key] for r in rows]
        ax.plot(tokens, values, marker="o")
        cis = [r.get(f"{key}_ci") for r in rows]
        if all(cis):
            ax.fill_between(tokens, [c[0] for c in cis], [c[1] for c in cis], alpha=0.25)
        ax.set_xscale("log", base=2)
        ax.set_title(key)
        ax.set_xlabel("train tokens")
        ax.grid(alpha=0.3)
    fig.suptitle(
        "Convergence: the SmolLM2-135M default run trained 0.5-4 epochs (bands: 95% bootstrap over eval contexts)"
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


if __name__ == "__main__":
    app()
