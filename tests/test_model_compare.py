"""`mlsae compare --run A --run B`: the model table and figure from two runs' reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from mlsae.cli import app
from mlsae.core.errors import MlsaeError
from mlsae.compare.models import compare_models, load_run


def fake_run(root: Path, model: str, n_layers: int, eff: float, eff_ci: list[float], cos: float) -> Path:
    (root / "metrics").mkdir(parents=True)
    (root / "tables").mkdir()
    (root / "tables" / "summary.csv").write_text(f"model,n_layers\n{model},{n_layers}\n")
    files = {
        "extract": {"n_layers": n_layers, "d_model": 64, "adjacent_cos": cos, "adjacent_cos_by_layer": [cos] * (n_layers - 1)},
        "eval": {"fvu": 0.25, "fvu_ci": [0.24, 0.26], "delta_ce": 0.3, "delta_ce_ci": [0.2, 0.4], "dead_fraction": 0.01},
        "analysis": {"within_share": 0.07, "within_share_ci": [0.06, 0.08], "within_share_mass": 0.3,
                     "var_within_norm": 0.004, "var_total_norm": 0.05, "effective_layers": eff,
                     "effective_layers_ci": eff_ci, "multi_layer_fraction": 0.5, "multi_layer_fraction_ci": [0.49, 0.51],
                     "var_ratio_paper": 50.0},
    }
    for name, data in files.items():
        (root / "metrics" / f"{name}.json").write_text(json.dumps(data))
    return root


def test_table_values_intervals_and_depth_normalisation(tmp_path: Path) -> None:
    a = fake_run(tmp_path / "a", "model-a", 30, 3.0, [2.9, 3.3], 0.9)
    b = fake_run(tmp_path / "b", "model-b", 12, 2.4, [2.3, 2.5], 0.8)
    table = compare_models([a, b], tmp_path / "out" / "models.md")
    assert table["model"].to_list() == ["model-a", "model-b"]
    assert table["n_layers"].to_list() == ["30", "12"]
    assert table["effective_layers"].to_list() == ["3 (2.9–3.3)", "2.4 (2.3–2.5)"]
    # effective_layers / n_layers: 3/30 = 0.1 (0.0967–0.11), 2.4/12 = 0.2 (0.192–0.208)
    assert table["effective_layers / n_layers"].to_list() == ["0.1 (0.0967–0.11)", "0.2 (0.192–0.208)"]
    assert table["var_ratio_paper"].to_list() == ["50", "50"]  # no interval in the files: none shown
    md = (tmp_path / "out" / "models.md").read_text()
    assert "| model-a | 30 |" in md and "not a size series" in md
    assert pl.read_csv(tmp_path / "out" / "models.csv").height == 2
    assert (tmp_path / "out" / "models.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_runs_fail_naming_the_file(tmp_path: Path) -> None:
    a = fake_run(tmp_path / "a", "model-a", 30, 3.0, [2.9, 3.3], 0.9)
    with pytest.raises(MlsaeError, match="at least two"):
        compare_models([a], tmp_path / "m.md")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    (b / "metrics" / "eval.json").unlink()
    with pytest.raises(MlsaeError, match=r"b/metrics/eval\.json: not found"):
        load_run(b)
    data = json.loads((a / "metrics" / "analysis.json").read_text())
    del data["effective_layers"]
    (b / "metrics" / "eval.json").write_text((a / "metrics" / "eval.json").read_text())
    (b / "metrics" / "analysis.json").write_text(json.dumps(data))
    with pytest.raises(MlsaeError, match=r"analysis\.json: no number under 'effective_layers'"):
        load_run(b)
    assert not (tmp_path / "m.md").exists()


def test_cli_writes_the_comparison(tmp_path: Path) -> None:
    a = fake_run(tmp_path / "a", "model-a", 30, 3.0, [2.9, 3.3], 0.9)
    b = fake_run(tmp_path / "b", "model-b", 12, 2.4, [2.3, 2.5], 0.8)
    out = tmp_path / "c" / "models.md"
    result = CliRunner().invoke(app, ["compare", "--run", str(a), "--run", str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.with_suffix(".png").is_file()
    bad = CliRunner().invoke(app, ["compare", "--run", str(a), "--run", str(tmp_path / "nope")])
    assert bad.exit_code == 1
