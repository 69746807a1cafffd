"""Failure handling across stages: one clear line, exit 1, earlier outputs untouched.

Stage-specific bad inputs (unknown model, empty corpus, k > n_latents, corrupted checkpoint, ...)
are tested next to each stage; this file covers the shared contract and the output-path errors.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlsae.core.errors import MlsaeError
from mlsae.core.io import atomic_dir, write_json
from mlsae.core.stage import stage

ROOT = Path(__file__).resolve().parents[1]


def run_stage(cwd: Path, name: str, params: dict) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / f"{name}.py")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_error_line(proc: subprocess.CompletedProcess, stage_name: str) -> str:
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: {stage_name}: ")
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    "exc, expected",
    [
        (MlsaeError("sae.k: must be >= 1 (got 0)"), "error: train: sae.k: must be >= 1 (got 0)"),
        (OSError(errno.ENOSPC, "No space left on device", "data/sae/x"), "error: train: data/sae/x: disk full"),
        (
            PermissionError(errno.EACCES, "Permission denied", "reports/m.json"),
            "error: train: reports/m.json: permission denied",
        ),
    ],
)
def test_stage_wrapper_prints_one_line_and_exits_1(capsys, exc, expected):
    with pytest.raises(SystemExit) as e:
        with stage("train"):
            raise exc
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == expected


def test_interrupt_exits_130(capsys):
    with pytest.raises(SystemExit) as e:
        with stage("extract"):
            raise KeyboardInterrupt
    assert e.value.code == 130 and "rerun to resume" in capsys.readouterr().err


def test_failed_atomic_dir_leaves_the_previous_output(tmp_path):
    out = tmp_path / "sae"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (out / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_disk_full_during_json_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    write_json(path, {"fvu": 0.1})

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError):
        write_json(path, {"fvu": 0.2})
    monkeypatch.undo()
    assert path.read_text().strip().endswith("}") and '"fvu": 0.1' in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


@pytest.mark.slow  # starts stage processes (a new interpreter each)
def test_unwritable_output_path_is_reported(tmp_path):
    (tmp_path / "reports").write_text("a file where the reports directory should be")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):  # whole documents go to one split: several are needed
        (corpus / f"{i:02d}.txt").write_text(f"Document {i}: the quick brown fox jumps over the lazy dog. " * 20)
    params = {
        "model": "tiny-llama",
        "data": {"source": str(corpus / "*.txt"), "context": 32, "train_tokens": 256, "eval_tokens": 64},
    }
    line = one_error_line(run_stage(tmp_path, "extract", params), "extract")
    assert "reports/metrics: Not a directory" in line


@pytest.mark.slow  # starts stage processes (a new interpreter each)
def test_stages_downstream_of_a_missing_store_say_what_to_run(tmp_path):
    for name in ("lens", "train", "dump"):
        line = one_error_line(run_stage(tmp_path, name, {"model": "tiny-llama"}), name)
        assert "activations.zarr" in line and "not found" in line


@pytest.mark.slow  # starts stage processes (a new interpreter each)
def test_bad_params_file_names_the_key(tmp_path):
    line = one_error_line(run_stage(tmp_path, "train", {"train": {"batch_tokens": -1}}), "train")
    assert "train.batch_tokens" in line
    (tmp_path / "params.yaml").write_text("model: [unclosed")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "train.py")], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert "params.yaml: not valid YAML" in one_error_line(proc, "train")
