"""End to end: the real dvc.yaml on tiny models in a temporary git repo.

`dvc repro`, then experiments that must rerun only what their params touch, an edit of the lens
code that must rerun every stage that runs it, `dvc metrics diff`, `dvc plots diff`, a queued
sweep, and the cross-experiment table.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # every test here spawns DVC runs

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": "tiny-llama",
    "data": {"train_tokens": 4096, "eval_tokens": 1024, "context": 64},
    "train": {"batch_tokens": 256, "shuffle_buffer_tokens": 2048},
    "sae": {"dead_tokens": 1024},
    "evaluate": {"tokens": 256},
    "lens_fit": {"steps": 20, "eval_tokens": 128},
}


def run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def ran_stages(output: str) -> set[str]:
    """Stages DVC ran, less `check` (always_changed: it runs first on every repro by design)."""
    ran = {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}
    assert "check" in ran, output[-2000:]
    return ran - {"check"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC repo holding the project's pipeline, params set for tiny-llama, reproduced once."""
    repo = tmp_path_factory.mktemp("pipeline")
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("stages", "mlsae"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in TINY.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "ci@example.invalid")
    run(repo, "git", "config", "user.name", "ci")
    run(repo, "dvc", "init", "-q")
    out = run(repo, "dvc", "repro").stdout
    assert ran_stages(out) == {
        "extract",
        "lens",
        "baseline",
        "train",
        "evaluate",
        "dump",
        "aggregate",
        "report",
        "browse",
    }
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline")
    return repo


def metrics(repo: Path, name: str) -> dict:
    return json.loads((repo / "reports" / "metrics" / f"{name}.json").read_text())


def test_repro_writes_every_output(repo):
    for path in (
        "data/activations.zarr/zarr.json",
        "data/sae/sae.safetensors",
        "data/sae/config.json",
        "data/lens/mlsae.json",
        "data/latents.zarr/zarr.json",
        "data/analysis/latents.parquet",
        "reports/tables/summary.md",
        "reports/figures/latent_layer_heatmap.png",
        "reports/plots/train.csv",
        "reports/plots/eval_by_layer.csv",
    ):
        assert (repo / path).exists(), path
    ev = metrics(repo, "eval")
    assert len(ev["fvu_by_layer"]) == 4 and len(ev["delta_ce_by_layer"]) == 4
    assert metrics(repo, "extract")["tokens"] == 4096 + 1024
    assert metrics(repo, "analysis")["n_layers"] == 4
    # nothing changed: nothing reruns
    assert ran_stages(run(repo, "dvc", "repro").stdout) == set()


def test_editing_a_lens_method_reruns_the_stages_that_run_it(repo):
    path = repo / "mlsae" / "lens" / "tuned.py"
    source = path.read_text()
    tree = ast.parse(source)
    lens = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Lens")
    forward = next(n for n in lens.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    first = forward.body[0]
    lines = source.splitlines(keepends=True)
    lines.insert(first.lineno - 1, " " * first.col_offset + "_unused = None  # a no-op edit of Lens.forward\n")
    path.write_text("".join(lines))
    out = run(repo, "dvc", "repro").stdout
    assert {"lens", "train", "evaluate", "dump"} <= ran_stages(out)
    assert "extract" not in ran_stages(out)
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "edit Lens.forward")
    assert ran_stages(run(repo, "dvc", "repro").stdout) == set()


def test_changing_k_reruns_train_and_what_follows_not_extract_or_baseline(repo):
    """An SAE experiment reruns what reads the SAE, never the model-only baseline stage."""
    out = run(repo, "dvc", "exp", "run", "-S", "sae.k=16").stdout
    assert ran_stages(out) == {"train", "evaluate", "dump", "aggregate", "report", "browse"}
    assert "Stage 'extract' didn't change, skipping" in out
    assert "Stage 'baseline' didn't change, skipping" in out
    assert metrics(repo, "eval")["l0"] <= 16
    diff = json.loads(run(repo, "dvc", "metrics", "diff", "--json").stdout)
    changed = {key for file in diff.values() for key in file}
    assert {"fvu", "delta_ce", "kl", "l0"} <= changed
    plots = run(repo, "dvc", "plots", "diff", "--json").stdout
    assert "eval_by_layer.csv" in plots and "train.csv" in plots


def test_single_layer_baseline_and_another_model(repo):
    out = run(repo, "dvc", "exp", "run", "-S", "sae.layers=[2]").stdout
    assert "extract" not in ran_stages(out)
    assert metrics(repo, "eval")["layers"] == [2] and len(metrics(repo, "eval")["fvu_by_layer"]) == 1
    out = run(repo, "dvc", "exp", "run", "-S", "model=tiny-neox").stdout
    assert "extract" in ran_stages(out)
    assert json.loads((repo / "data/sae/config.json").read_text())["model"] == "tiny-neox"


def test_a_training_seed_reruns_neither_the_data_nor_the_lens_nor_the_baseline(repo):
    run(repo, "dvc", "exp", "run", "-S", "train.seed=0")  # the committed params, whatever ran before
    before = metrics(repo, "extract"), (repo / "data/sae/sae.safetensors").read_bytes()
    out = run(repo, "dvc", "exp", "run", "-S", "train.seed=7").stdout
    assert ran_stages(out) == {"train", "evaluate", "dump", "aggregate", "report", "browse"}
    assert metrics(repo, "extract") == before[0]
    assert (repo / "data/sae/sae.safetensors").read_bytes() != before[1]  # another init and batch order


def test_lens_fit_experiment(repo):
    out = run(repo, "dvc", "exp", "run", "-S", "lens=fit").stdout
    assert {"lens", "train", "evaluate"} <= ran_stages(out) and "extract" not in ran_stages(out)
    lens = metrics(repo, "lens")
    assert lens["lens"] == "fit" and len(lens["kl_tuned_lens_by_layer"]) == 4
    assert (repo / "reports/figures/lens_kl_by_layer.png").exists()


def test_queued_sweep_and_compare(repo):
    run(repo, "dvc", "exp", "run", "--queue", "-S", "train.seed=1")
    run(repo, "dvc", "queue", "start", "-j", "1")
    import time

    deadline = time.time() + 600
    while time.time() < deadline:
        status = run(repo, "dvc", "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert "Success" in status, status
    shown = json.loads(run(repo, "dvc", "exp", "show", "--json").stdout)
    assert len(shown) >= 1
    run(repo, "mlsae", "compare")
    table = (repo / "reports/compare/experiments.md").read_text()
    assert "tiny-llama" in table


def test_stream_mode_reruns_only_what_the_train_budget_touches(repo):
    """In stream mode the store holds the eval split and the sample only: a larger
    data.train_tokens reruns extract (its params section changed) but it writes the very same
    store, so lens is skipped; train and what reads the SAE rerun."""
    out = run(repo, "dvc", "exp", "run", "-S", "train.source=stream", "-S", "data.sample_tokens=1024").stdout
    assert {"extract", "train"} <= ran_stages(out)
    store = repo / "data/activations.zarr"
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    first = metrics(repo, "train")
    assert first["train_source"] == "stream" and first["model_tokens"] == 4096

    out = run(repo, "dvc", "exp", "run", "-S", "data.train_tokens=8192").stdout
    assert ran_stages(out) == {"extract", "train", "evaluate", "dump", "aggregate", "report", "browse"}
    assert "Stage 'lens' didn't change, skipping" in out
    assert sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) == size
    second = metrics(repo, "train")
    assert second["model_tokens"] == 8192 and second["steps"] > first["steps"]
