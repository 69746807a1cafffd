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
    assert raw["evaluate"]["tokens"] > 0 and raw["analysis"]["min_count"] >= 0


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
    import yaml

    from mlsae.core.params import load_params

    path = Path(__file__).resolve().parents[1] / "presets" / "paper.yaml"
    p = load_params(path)
    assert (p.model, p.data.context, p.data.train_tokens) == ("pythia-70m-deduped", 2048, 10**9)
    assert (p.sae.expansion, p.sae.k, p.sae.layers) == (64, 32, "all")
    assert (p.train.batch_tokens, p.train.lr, p.train.source) == (131072, 1e-4, "stream")
    # every key of params.yaml is there (a preset is a whole params file)
    default = yaml.safe_load((path.parents[1] / "params.yaml").read_text())
    preset = yaml.safe_load(path.read_text())
    assert {k: set(v) if isinstance(v, dict) else None for k, v in default.items()} == \
           {k: set(v) if isinstance(v, dict) else None for k, v in preset.items()}
