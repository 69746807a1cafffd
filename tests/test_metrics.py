"""The typed stage metrics: JSON round trips keep keys and order, bad files fail with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlsae.core.errors import MlsaeError
from mlsae.core.metrics import (
    STAGE_METRICS,
    AnalysisMetrics,
    EvalMetrics,
    LensMetrics,
    TrainMetrics,
    read_metrics,
    write_metrics,
)
from mlsae.core.params import parse_params

TRAIN = {
    "fvu": 0.25,
    "fvu_by_layer": [0.2, 0.3],
    "loss": 0.26,
    "l0": 32.0,
    "dead_fraction": None,
    "vectors_per_s": 1.5e5,
    "steps": 10,
    "tokens": 5120,
    "n_latents": 256,
    "layers": [0, 1],
}


def test_round_trip_keeps_every_key_in_order(tmp_path: Path) -> None:
    record = TrainMetrics.from_dict(TRAIN, "train")
    assert record.fvu == 0.25 and record.layers == [0, 1] and record.dead_fraction is None
    write_metrics(tmp_path / "train.json", record)
    text = (tmp_path / "train.json").read_text()
    assert text == json.dumps(TRAIN, indent=2) + "\n"  # what the stage wrote before the records
    assert read_metrics(tmp_path / "train.json", TrainMetrics) == record


def test_optional_lens_figures_are_left_out_when_absent() -> None:
    assert LensMetrics(lens="none").to_dict() == {"lens": "none"}
    fit = LensMetrics(lens="fit", kl_logit_lens=2.0, kl_tuned_lens=1.0, fit_steps=20)
    assert fit.to_dict() == {"lens": "fit", "kl_logit_lens": 2.0, "kl_tuned_lens": 1.0, "fit_steps": 20}


def test_unknown_and_missing_keys_fail_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(MlsaeError, match=r"^train.json: unknown key 'fvu_typo' for TrainMetrics$"):
        TrainMetrics.from_dict({**TRAIN, "fvu_typo": 1.0}, "train.json")
    missing = {k: v for k, v in TRAIN.items() if k != "steps"}
    with pytest.raises(MlsaeError, match=r"^train.json: missing key 'steps'$"):
        TrainMetrics.from_dict(missing, "train.json")
    # partial reads (hand-made or older files) take a missing figure as None and write it back absent
    partial = TrainMetrics.from_dict(missing, "train.json", partial=True)
    assert partial.steps is None and "steps" not in partial and partial.to_dict() == missing
    (tmp_path / "eval.json").write_text("[1, 2]")
    with pytest.raises(MlsaeError, match="eval.json: expected a JSON object"):
        read_metrics(tmp_path / "eval.json", EvalMetrics)


def test_analysis_keeps_keys_it_does_not_know() -> None:
    data = {"var_within": 0.1, "var_ratio": None, "new_statistic": [1.0, 2.0], "n_layers": 4}
    record = AnalysisMetrics.from_dict(data, "analysis")
    assert record.var_within == 0.1 and record.extra == {"new_statistic": [1.0, 2.0]}
    assert record.to_dict() == data and list(record.to_dict()) == list(data)
    assert record["new_statistic"] == [1.0, 2.0] and record.get("absent", 7) == 7


def test_one_record_per_metrics_file() -> None:
    assert set(STAGE_METRICS) == {"extract", "lens", "train", "baseline", "eval", "analysis"}


def test_device_per_stage_from_params() -> None:
    p = parse_params({})
    assert {s: p.device(s) for s in ("extract", "lens", "train", "evaluate", "dump")} == {
        "extract": "auto",
        "lens": "cpu",
        "train": "auto",
        "evaluate": "auto",
        "dump": "cpu",
    }
    p = parse_params({"extract": {"device": "cpu"}, "evaluate": {"device": "cuda:1"}, "dump": {"device": "auto"}})
    assert (p.device("evaluate"), p.device("dump")) == ("cuda:1", "auto")
    assert parse_params({"extract": {"device": "cpu"}}).device("evaluate") == "cpu"  # empty: extract's
