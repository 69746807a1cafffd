"""The convergence study: how the headline figures move as the MLSAE trains on more *fresh* tokens.

Every budget sees new text: training runs in stream mode (mlsae/data/stream.py), so a budget of B
tokens is the first B tokens of the train documents, never a repeat. The study's activation store
is extracted in stream mode with ``data.sample_tokens`` = the default run's 65,536 train tokens,
which makes its document split, eval split and stored sample the default run's own; the smallest
budgets therefore train on (a prefix of) the default run's train tokens and the larger ones go on
into the corpus. Every point is measured as the pipeline measures its SAE: reconstruction on the
eval split, the reconstruction splice against the baseline stage's sums on the same spliced sample,
the latent dump and the aggregate statistics, with the document jackknife's bias-corrected values
and intervals (docs/statistics.md).

Schedules (`train.lr_schedule`): ``constant`` trains once, to the largest budget, and saves the
SAE when each smaller budget's tokens are consumed: with a constant learning rate and one fixed
AuxK window those snapshots *are* the smaller budgets' runs, since stream mode's buffers and their
order do not depend on what follows. A decayed schedule (``cosine``) trains once per budget, so that
the decay lands at each run's end. The AuxK window (`sae.dead_tokens`) is held at the default run's for
every budget, so the dead-latent rule does not change with the budget.

Per point the study reports FVU, ΔCE, the fraction of the mean-ablation loss recovered, dead and
dense latent counts, the counted latents K, and every headline figure with its interval; between
consecutive budgets it splits the change of each share into a part on a fixed latent set (the
latents in K at both budgets, by id) and a part from K changing (:func:`decompose`).

    python -m mlsae.studies.convergence run --out runs/convergence [--budgets ...] [--schedules ...] [--seeds ...]
    python -m mlsae.studies.convergence report --out runs/convergence --docs docs

``run`` extracts the study's store (unless present), computes the baseline sums, trains and measures
every (schedule, seed, budget) point that is not done yet (its row in ``runs/convergence/points``),
and records wall times; ``report`` writes docs/convergence.md, .csv and .png from the rows.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import typer

from mlsae.analysis.aggregate import aggregate
from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_bytes, write_text
from mlsae.core.params import Params, load_params, parse_params
from mlsae.core.paths import LATENT_STATS
from mlsae.data import contexts, corpus
from mlsae.data.extract import extract
from mlsae.data.stream import check_store
from mlsae.evaluation.baseline import baseline
from mlsae.evaluation.downstream import SpliceSums
from mlsae.evaluation.reconstruction import evaluate
from mlsae.evaluation.sample import spliced_sample
from mlsae.lens.tuned import Lens
from mlsae.models.registry import load_model, load_tokenizer
from mlsae.sae.config import resolve_dead_tokens
from mlsae.sae.dump import dump
from mlsae.sae.model import MLSAE
from mlsae.sae.trainer import StreamSource, train
from mlsae.stores.activations import ActivationStore

app = typer.Typer(help="The convergence study on fresh tokens (stream mode).", no_args_is_help=True)

BUDGETS = (16384, 32768, 65536, 131072)
"""Distinct training tokens per point: an 8x span, from a quarter to twice the default run. The
embedded corpus cut to 64 tokens per document (`data.document_tokens: auto`, the default run's
split) holds too few train tokens for 262,144; a larger `data.source` does."""
SCHEDULES = ("constant", "cosine")
SEEDS = (0, 1)
"""Training seeds: every seed at the smallest and largest budget, seed 0 at every budget."""
FIGURES = (
    "within_share",
    "within_share_mass",
    "within_share_peak",
    "effective_layers",
    "multi_layer_fraction",
    "var_ratio_paper",
)
SHARES = ("within_share", "within_share_mass", "within_share_peak")


def study_params(base: Params, budget: int, schedule: str, seed: int) -> Params:
    """The default params with the study's changes (module docstring): stream mode with the default
    run's train tokens as the stored sample (so the split is the default run's), one AuxK window for
    every budget (the default run's), `budget` train tokens, `schedule`, training seed `seed`."""
    raw = base.model_dump()
    run_tokens = base.data.train_tokens * base.train.epochs
    raw["data"].update(train_tokens=budget, sample_tokens=base.data.train_tokens)
    raw["train"].update(source="stream", epochs=1, lr_schedule=schedule, seed=seed)
    raw["sae"].update(dead_tokens=resolve_dead_tokens(base.sae.dead_tokens, run_tokens))
    raw["lens"] = "none"
    return parse_params(raw)


def points(budgets: list[int], schedules: list[str], seeds: list[int]) -> list[tuple[str, int, int]]:
    """(schedule, seed, budget) of every point. The constant schedule, whose one run per seed yields
    every budget as a snapshot: the first seed at every budget, the other seeds at the smallest and
    largest (their runs are as long either way). A decayed schedule, which costs one run per budget:
    the first seed at the smallest and largest budget."""
    ends = {min(budgets), max(budgets)}
    return [
        (s, seed, b)
        for s in schedules
        for seed in (seeds if s == "constant" else seeds[:1])
        for b in sorted(budgets)
        if (s == "constant" and seed == seeds[0]) or b in ends
    ]


def budget_steps(p: Params, store: ActivationStore, budgets: list[int]) -> dict[int, int]:
    """The optimiser step at which each budget's tokens are consumed in a stream run: the batches of
    the budget's shuffle buffers (tokenised here, without the model: a buffer yields its usable
    tokens // train.batch_tokens batches)."""
    split = check_store(p.data, "stream", store.attrs)
    documents = corpus.ordered_documents(p.data.source, p.data.shuffle_documents, p.data.seed)
    stream = contexts.ContextStream(
        contexts.train_documents(documents, split),
        load_tokenizer(p.model),
        p.data.context,
        10**12,
        None,
        corpus.resolve_document_tokens(p.data.source, p.data.document_tokens),
    )
    per_buffer = p.train.shuffle_buffer_tokens // p.data.context
    steps, done = {}, 0
    for budget in sorted(budgets):
        n_contexts = -(-budget // p.data.context)
        while stream.position["context"] < n_contexts:
            take = min(per_buffer, n_contexts - stream.position["context"])
            ctx = stream.take(take)
            keep = ~ctx.special
            if store.skip_first:
                keep[:, 0] = False
            done += int(keep.sum()) // p.train.batch_tokens
        steps[budget] = done
    return steps


def _measure(p: Params, sae_dir: Path, store: ActivationStore, model: Any, base: SpliceSums, work: Path) -> dict:
    """Evaluate, dump and aggregate one SAE; its row of figures (and its per-latent table kept)."""
    sae = MLSAE.load(sae_dir).eval()
    lens = Lens.identity(store.n_layers, store.d_model)
    sample = spliced_sample(store, p.evaluate.tokens, p.data.seed)
    ev, _ = evaluate(
        sae,
        lens,
        model,
        store,
        sample,
        base,
        p.evaluate.batch_size,
        p.evaluate.bootstrap,
        p.analysis.seed,
        progress=False,
    )
    latents = work / "latents.zarr"
    dump(sae, lens, store, str(latents), progress=False)
    an = aggregate(latents, work / "analysis", work / "analysis.json", p.analysis)
    row: dict[str, Any] = {"n_latents": sae.cfg.n_latents}
    for key in ("fvu", "delta_ce", "loss_recovered", "dead_fraction"):
        row.update({k: v for k, v in ev.items() if k == key or k.startswith(f"{key}_")})
    for key in FIGURES:
        row.update({k: v for k, v in an.items() if k == key or k.startswith(f"{key}_")})
    for key in ("n_latents_counted", "n_units", "dense_latents_50", "dense_latents_90"):
        row[key] = an.get(key)
    return row


@app.command()
def run(
    out: Path = Path("runs/convergence"),
    budgets: list[int] = typer.Option(list(BUDGETS)),
    schedules: list[str] = typer.Option(list(SCHEDULES)),
    seeds: list[int] = typer.Option(list(SEEDS)),
    params_file: Path = Path("params.yaml"),
) -> None:
    """Train and measure every point not done yet (rows in OUT/points)."""
    base_params = load_params(params_file)
    top = study_params(base_params, max(budgets), schedules[0], seeds[0])
    bad = [b for b in budgets if b % top.train.shuffle_buffer_tokens]
    if bad:
        raise MlsaeError(
            f"--budgets: {bad} not multiples of train.shuffle_buffer_tokens {top.train.shuffle_buffer_tokens}"
        )
    store_path = out / "activations.zarr"
    if not (store_path / "zarr.json").exists():
        t0 = time.perf_counter()
        extract(top.model, top.data, top.extract, "stream", str(store_path))
        write_text(out / "extract_seconds.txt", f"{time.perf_counter() - t0:.0f}\n")
    store = ActivationStore(str(store_path))
    model = load_model(top.model, top.evaluate.device or top.extract.device)
    base_file = out / "baseline.npz"
    if not base_file.exists():
        sample = spliced_sample(store, top.evaluate.tokens, top.data.seed)
        sums = baseline(
            model,
            store,
            list(range(store.n_layers)),
            sample,
            top.evaluate.baselines,
            top.evaluate.batch_size,
            progress=False,
        )
        sums.save(base_file)
    base = SpliceSums.load(base_file)
    steps = budget_steps(top, store, budgets)
    rows_dir = out / "points"
    for schedule in schedules:
        for seed in seeds:
            todo = [b for s, sd, b in points(budgets, schedules, seeds) if s == schedule and sd == seed]
            todo = [b for b in todo if not (rows_dir / f"{schedule}_s{seed}_{b}.json").exists()]
            if not todo:
                continue
            runs = [max(todo)] if schedule == "constant" else todo
            for budget in runs:
                p = study_params(base_params, budget, schedule, seed)
                tag = f"{schedule}_s{seed}_{budget}"
                snapshots = {steps[b]: out / "sae" / f"{schedule}_s{seed}_{b}" for b in todo if b <= budget}
                if schedule != "constant":
                    snapshots = {steps[budget]: out / "sae" / tag}
                record = out / "runs" / f"{tag}.json"
                if record.exists() and all(d.exists() for d in snapshots.values()):
                    done_run = json.loads(record.read_text())  # trained before an interruption: measure only
                    train_s, history = done_run["train_seconds"], done_run["history"]
                else:
                    t0 = time.perf_counter()
                    _, history = train(
                        p.sae,
                        p.train,
                        p.lens,
                        store,
                        Lens.identity(store.n_layers, store.d_model),
                        out / "sae" / f"final_{tag}",
                        out / "ckpt" / tag,
                        stream=StreamSource(p.model, p.data, p.extract),
                        snapshots=snapshots,
                    )
                    train_s = time.perf_counter() - t0
                    keep = [{k: h[k] for k in ("step", "auxk", "dead_fraction")} for h in history]
                    write_text(record, json.dumps({"train_seconds": train_s, "history": keep}) + "\n")
                for step, sae_dir in sorted(snapshots.items()):
                    b = int(sae_dir.name.rsplit("_", 1)[1])
                    if not sae_dir.exists():
                        raise MlsaeError(f"{sae_dir}: no snapshot at step {step} (the run ended at {len(history)})")
                    t1 = time.perf_counter()
                    row = _measure(
                        study_params(base_params, b, schedule, seed),
                        sae_dir,
                        store,
                        model,
                        base,
                        out / "measure" / sae_dir.name,
                    )
                    done = history[:step]
                    row.update(
                        schedule=schedule,
                        seed=seed,
                        budget=b,
                        steps=step,
                        train_seconds=train_s,
                        measure_seconds=time.perf_counter() - t1,
                        # None where the run's step history was not kept (a run trained before records existed)
                        auxk_steps=sum(h["auxk"] > 0 for h in done) if len(done) == step else None,
                        train_dead_fraction=done[-1]["dead_fraction"] if done and len(done) == step else None,
                    )
                    write_text(rows_dir / f"{schedule}_s{seed}_{b}.json", json.dumps(row, indent=1) + "\n")
                    print(
                        f"{schedule} seed {seed} budget {b}: fvu {row['fvu']:.4f} within_share "
                        f"{row['within_share']:.4f} ({row['train_seconds']:.0f} s train, "
                        f"{row['measure_seconds']:.0f} s measure)",
                        flush=True,
                    )


def decompose(a: pl.DataFrame, b: pl.DataFrame, key: str, min_count: int, min_documents: int) -> dict[str, float]:
    """Split the change of share `key` (``var_within{w} / var_total{w}`` over K) from point `a` to
    point `b` into a fixed-set part and a composition part, from their per-latent tables::

        theta(X, K) = sum_{f in K} within_f(X) / sum_{f in K} total_f(X),   F = K_a ∩ K_b
        change      = theta(b, K_b) - theta(a, K_a)
        fixed_set   = theta(b, F) - theta(a, F)
        composition = change - fixed_set

    (plug-in values: the per-latent tables hold no bias corrections)."""
    weight = key.removeprefix("within_share")
    within, total = f"var_within{weight}", f"var_total{weight}"

    def counted(t: pl.DataFrame) -> pl.DataFrame:
        return t.filter((pl.col("count") >= max(min_count, 1)) & (pl.col("n_documents") >= min_documents))

    def theta(t: pl.DataFrame, ids: set[int]) -> float:
        rows = t.filter(pl.col("latent").is_in(sorted(ids)))
        return float(rows[within].sum()) / float(rows[total].sum())

    ka, kb = set(counted(a)["latent"].to_list()), set(counted(b)["latent"].to_list())
    fixed = ka & kb
    change = theta(b, kb) - theta(a, ka)
    fixed_set = theta(b, fixed) - theta(a, fixed)
    return {
        "change": change,
        "fixed_set": fixed_set,
        "composition": change - fixed_set,
        "fixed_latents": len(fixed),
        "k_a": len(ka),
        "k_b": len(kb),
    }


def _fmt(row: dict, key: str) -> str:
    value, ci = row.get(key), row.get(f"{key}_ci")
    if value is None:
        return "-"
    text = f"{value:.3g}"
    return f"{text} ({ci[0]:.3g}–{ci[1]:.3g})" if ci else text


@app.command()
def report(
    out: Path = Path("runs/convergence"), docs: Path = Path("docs"), params_file: Path = Path("params.yaml")
) -> None:
    """Write docs/convergence.md, .csv and .png from the measured points (and OUT/notes.md, if any)."""
    p = load_params(params_file)
    rows = [json.loads(f.read_text()) for f in sorted((out / "points").glob("*.json"))]
    if not rows:
        raise MlsaeError(f"{out}/points: no measured point; run `python -m mlsae.studies.convergence run` first")
    rows.sort(key=lambda r: (r["schedule"], r["seed"], r["budget"]))
    flat = pl.DataFrame([{k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()} for r in rows])
    write_text(docs / "convergence.csv", flat.write_csv())
    head = [
        "schedule",
        "seed",
        "train tokens",
        "steps",
        "FVU",
        "ΔCE",
        "loss recovered",
        "dead (eval)",
        "dense ≥50 %",
        "K",
        *FIGURES,
        "train s",
        "measure s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["schedule"],
            str(r["seed"]),
            f"{r['budget']:,}",
            str(r["steps"]),
            _fmt(r, "fvu"),
            _fmt(r, "delta_ce"),
            _fmt(r, "loss_recovered"),
            f"{r['dead_fraction']:.3g}",
            str(r.get("dense_latents_50")),
            str(r.get("n_latents_counted")),
            *(_fmt(r, k) for k in FIGURES),
            f"{r['train_seconds']:.0f}",
            f"{r['measure_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    parts = [
        "| schedule | seed | from | to | figure | change | fixed set | composition | latents in both |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for schedule in sorted({r["schedule"] for r in rows}):
        for seed in sorted({r["seed"] for r in rows}):
            chain = [r for r in rows if r["schedule"] == schedule and r["seed"] == seed]
            for a, b in itertools.pairwise(chain):
                ta = pl.read_parquet(
                    out / "measure" / f"{schedule}_s{seed}_{a['budget']}" / "analysis" / LATENT_STATS.name
                )
                tb = pl.read_parquet(
                    out / "measure" / f"{schedule}_s{seed}_{b['budget']}" / "analysis" / LATENT_STATS.name
                )
                for key in SHARES:
                    d = decompose(ta, tb, key, p.analysis.min_count, p.analysis.min_documents)
                    parts.append(
                        f"| {schedule} | {seed} | {a['budget']:,} | {b['budget']:,} | {key} | "
                        f"{d['change']:+.4f} | {d['fixed_set']:+.4f} | {d['composition']:+.4f} | "
                        f"{d['fixed_latents']} of {d['k_a']} / {d['k_b']} |"
                    )
    extract_s = (out / "extract_seconds.txt").read_text().strip() if (out / "extract_seconds.txt").exists() else "-"
    text = (
        "# Convergence study (fresh tokens)\n\n"
        "Generated by `python -m mlsae.studies.convergence report` from the points of "
        "`python -m mlsae.studies.convergence run` (mlsae/studies/convergence.py says what each point is). "
        "Every budget trains on new tokens (stream mode); the learning rate is constant or cosine-decayed to 0 "
        "at each run's end; the AuxK window is the default run's at every budget. Values are bias-corrected, intervals "
        "95 % over eval documents. Wall times on this 2-core machine: the study store's extract "
        f"{extract_s} s; each row's training run (`train s`, shared by a constant run's snapshots) and its "
        "measurement (`measure s`).\n\n"
        + "\n".join(lines)
        + "\n\n## Where the change comes from\n\nThe change of each share between consecutive budgets, split into "
        "the part on a fixed set of latents (in K at both budgets, same ids) and the part from K changing "
        "(plug-in values, `decompose` in mlsae/studies/convergence.py):\n\n"
        + "\n".join(parts)
        + "\n\n![convergence](convergence.png)\n"
    )
    notes = out / "notes.md"  # what the rows cannot say (e.g. how this run of the study went), kept beside them
    if notes.exists():
        text += "\n## Notes on this run of the study\n\n" + notes.read_text().strip() + "\n"
    write_text(docs / "convergence.md", text)
    write_bytes(docs / "convergence.png", _figure(rows))


def _figure(rows: list[dict]) -> bytes:
    import io

    from matplotlib.figure import Figure

    keys = ("fvu", "delta_ce", "dead_fraction", *FIGURES[:5])
    fig = Figure(figsize=(14, 6.5), layout="constrained")
    axes = fig.subplots(2, 4).ravel()
    for ax, key in zip(axes, keys):
        for schedule in sorted({r["schedule"] for r in rows}):
            for seed in sorted({r["seed"] for r in rows}):
                chain = [r for r in rows if r["schedule"] == schedule and r["seed"] == seed]
                if not chain:
                    continue
                x = [r["budget"] for r in chain]
                y = [np.nan if r.get(key) is None else r[key] for r in chain]
                line = ax.plot(x, y, marker="o", label=f"{schedule}, seed {seed}")[0]
                cis = [r[f"{key}_ci"] for r in chain if r.get(f"{key}_ci")]
                if len(cis) == len(chain):
                    ax.fill_between(x, [c[0] for c in cis], [c[1] for c in cis], alpha=0.15, color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_title(key)
        ax.set_xlabel("distinct train tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Convergence on fresh tokens (SmolLM2-135M, stream mode; bands: 95 % over eval documents)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


if __name__ == "__main__":
    app()
