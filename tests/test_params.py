"""The typed params object: defaults equal params.yaml, and every bad key is named."""

from pathlib import Path

import pytest
import yaml

from mlsae.core.errors import MlsaeError
from mlsae.core.params import Params, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_matches_the_dataclass_defaults():
    assert load_params(ROOT / "params.yaml").to_dict() == Params().to_dict()


def test_params_yaml_has_every_design_key():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert raw["model"] == "smollm2-135m" and raw["lens"] == "none"
    assert set(raw["data"]) >= {"source", "context", "train_tokens", "eval_tokens"}
    assert set(raw["sae"]) >= {"layers", "expansion", "k", "auxk", "auxk_coef", "dead_tokens"}
    assert set(raw["train"]) >= {"batch_tokens", "lr", "epochs"}
    assert raw["analysis"]["min_count"] >= 0
    # the seeds live in their sections; the auto values are the defaults
    assert "seed" not in raw
    assert raw["data"]["seed"] == raw["train"]["seed"] == raw["lens_fit"]["seed"] == raw["analysis"]["seed"] == 0
    assert raw["data"]["shuffle_documents"] == raw["data"]["document_tokens"] == "auto"
    assert raw["evaluate"]["tokens"] == raw["sae"]["dead_tokens"] == "auto"
    assert raw["evaluate"]["baselines"] == ["mean"]


def knobs(raw: dict) -> dict:
    return {k: set(v) if isinstance(v, dict) else None for k, v in raw.items()}


def params_knobs() -> dict:
    """Every key of the Params model, by section."""
    return {
        name: set(f.annotation.model_fields) if hasattr(f.annotation, "model_fields") else None
        for name, f in Params.model_fields.items()
    }


def test_params_yaml_lists_every_knob():
    assert knobs(yaml.safe_load((ROOT / "params.yaml").read_text())) == params_knobs()


def test_auto_and_new_keys_parse():
    p = parse_params({})
    assert (p.data.shuffle_documents, p.data.document_tokens, p.evaluate.tokens, p.sae.dead_tokens) == ("auto",) * 4
    assert p.evaluate.baselines == ["mean"] and (p.train.lr_schedule, p.train.warmup_steps) == ("constant", 0)
    p = parse_params(
        {
            "data": {"seed": 3, "shuffle_documents": True, "document_tokens": 0},
            "train": {"seed": 4, "lr_schedule": "cosine", "warmup_steps": 10},
            "lens_fit": {"seed": 5},
            "analysis": {"seed": 6},
            "evaluate": {"tokens": 100, "baselines": ["mean", "zero"]},
            "sae": {"dead_tokens": 7},
        }
    )
    assert (p.data.seed, p.train.seed, p.lens_fit.seed, p.analysis.seed) == (3, 4, 5, 6)
    assert (p.data.shuffle_documents, p.data.document_tokens, p.evaluate.tokens, p.sae.dead_tokens) == (True, 0, 100, 7)
    assert p.evaluate.baselines == ["mean", "zero"] and p.train.lr_schedule == "cosine"


@pytest.mark.parametrize("raw", [{"seed": 0}, {"seed": 1, "data": {"seed": 1}}])
def test_the_old_top_level_seed_is_refused_naming_the_section_seeds(raw, tmp_path):
    with pytest.raises(MlsaeError) as e:
        parse_params(raw)
    message = str(e.value)
    assert "\n" not in message and message.startswith("seed: ")
    for key in ("data.seed", "train.seed", "analysis.seed"):
        assert key in message
    (tmp_path / "params.yaml").write_text("seed: 0\nmodel: tiny-llama\n")
    with pytest.raises(MlsaeError) as e:
        load_params(tmp_path / "params.yaml")
    assert str(e.value) == message if raw == {"seed": 0} else str(e.value).startswith("seed: ")


@pytest.mark.parametrize(
    "raw, line",
    [
        ({"sae": {"k": 0}}, "sae.k: input should be greater than or equal to 1 (got 0)"),
        ({"data": {"seed": -1}}, "data.seed: input should be greater than or equal to 0 (got -1)"),
        (
            {"data": {"document_tokens": -1}},
            "data.document_tokens: input should be greater than or equal to 0 or input should be 'auto' (got -1)",
        ),
        (
            {"sae": {"dead_tokens": 0}},
            "sae.dead_tokens: input should be greater than or equal to 1 or input should be 'auto' (got 0)",
        ),
        (
            {"evaluate": {"tokens": 0}},
            "evaluate.tokens: input should be greater than or equal to 1 or input should be 'auto' (got 0)",
        ),
        (
            {"train": {"lr_schedule": "step"}},
            "train.lr_schedule: input should be 'constant', 'linear' or 'cosine' (got 'step')",
        ),
        ({"train": {"warmup_steps": -2}}, "train.warmup_steps: input should be greater than or equal to 0 (got -2)"),
        (
            {"evaluate": {"baselines": ["median"]}},
            "evaluate.baselines[0]: input should be 'mean' or 'zero' (got 'median')",
        ),
    ],
)
def test_new_keys_are_refused_in_pydantic_words(raw, line):
    with pytest.raises(MlsaeError) as e:
        parse_params(raw)
    assert str(e.value) == line


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"sae": {"k": 0}}, "sae.k"),
        ({"sae": {"kk": 3}}, "sae.kk"),
        ({"data": {"context": "long"}}, "data.context"),
        ({"extract": {"dtype": "float8"}}, "extract.dtype"),
        ({"lens": "magic"}, "lens"),
        ({"sae": {"layers": "some"}}, "sae.layers"),
        ({"sae": {"layers": [1, 1]}}, "sae.layers"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"modell": "gpt2"}, "modell"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_values_name_their_key(raw, key):
    with pytest.raises(MlsaeError) as e:
        parse_params(raw)
    message = str(e.value)
    assert message.startswith(key) and "\n" not in message


def test_layers_are_checked_against_the_model():
    p = parse_params({"sae": {"layers": [5, 2]}})
    assert p.select_layers(8) == [2, 5]
    assert parse_params({}).select_layers(3) == [0, 1, 2]
    with pytest.raises(MlsaeError, match=r"sae.layers: index 5 out of range .* 4 layers"):
        p.select_layers(4)


def test_section_hash_tracks_only_its_sections():
    a, b = parse_params({}), parse_params({"sae": {"k": 8}})
    assert a.section_hash("data") == b.section_hash("data")
    assert a.section_hash("sae") != b.section_hash("sae")


def test_paper_preset_is_the_papers_main_run() -> None:
    """presets/paper.yaml: a complete, valid params file with the paper's settings in stream mode."""

    from mlsae.core.params import load_params

    path = Path(__file__).resolve().parents[1] / "presets" / "paper.yaml"
    p = load_params(path)
    assert (p.model, p.data.context, p.data.train_tokens) == ("pythia-70m-deduped", 2048, 10**9)
    assert (p.sae.expansion, p.sae.k, p.sae.layers) == (64, 32, "all")
    assert (p.train.batch_tokens, p.train.lr, p.train.source) == (131072, 1e-4, "stream")


def test_paper_preset_is_a_whole_params_file() -> None:
    """Every key of params.yaml, and every knob, is in the preset (a preset is a whole params file)."""
    path = ROOT / "presets" / "paper.yaml"
    default = yaml.safe_load((ROOT / "params.yaml").read_text())
    preset = yaml.safe_load(path.read_text())
    assert knobs(default).keys() == knobs(preset).keys()
    for section, keys in knobs(default).items():
        assert keys is None or keys <= knobs(preset)[section], section
    assert knobs(preset) == params_knobs()
