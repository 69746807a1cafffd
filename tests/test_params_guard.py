"""The params guard: every stage declares in dvc.yaml exactly the params it reads.

Each stage runs, in process, on the tiny model under a *recording* params object: a proxy of the
real `Params` that notes every leaf key read (``sae.k``; a whole section when code dumps it, e.g.
``sae`` for a checkpoint identity). Two runs cover the configurations that read different keys:
store mode without a lens, and stream mode with a fitted lens. For every stage, the keys read in
either run (as leaves) must equal the keys dvc.yaml declares for it (as leaves): a key read but not
declared would serve a stale output when changed; one declared but never read reruns the stage for
nothing. A declared key may be exempt when its line in dvc.yaml carries a comment starting
``# guard:`` that says why.
"""

from __future__ import annotations

import importlib.util
import re
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from mlsae.core.params import Params, parse_params

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("check", "extract", "lens", "train", "baseline", "evaluate", "dump", "aggregate", "report", "browse")


def leaves(model: type[BaseModel] | BaseModel, prefix: str = "") -> set[str]:
    """Every leaf key under a params section, dotted."""
    cls = model if isinstance(model, type) else type(model)
    out: set[str] = set()
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= leaves(ann, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


ALL = leaves(Params)


def expand(key: str) -> set[str]:
    """A declared or read key as the leaves it covers (a section covers all of its leaves)."""
    if key in ("", "params.yaml"):
        return set(ALL)
    return {k for k in ALL if k == key or k.startswith(key + ".")}


class Recorder:
    """Proxy of a params object (or section) that records the leaf keys read through it."""

    def __init__(self, target: BaseModel, prefix: str, reads: set[str]):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_reads", reads)

    @property  # isinstance(proxy, SAEParams) holds, as library code may check
    def __class__(self) -> type:  # type: ignore[override]
        return type(object.__getattribute__(self, "_target"))

    def __getattr__(self, name: str) -> Any:
        target, prefix, reads = (object.__getattribute__(self, k) for k in ("_target", "_prefix", "_reads"))
        value = getattr(target, name)
        if name in type(target).model_fields:
            if isinstance(value, BaseModel):
                return Recorder(value, f"{prefix}{name}.", reads)
            reads.add(f"{prefix}{name}")
            return value
        if name.startswith("model_dump") or name in ("to_dict",):
            reads.update(expand(prefix.rstrip(".")))  # the whole section is read
            return value
        if isinstance(value, types.MethodType):  # a params method reads through the proxy
            return types.MethodType(value.__func__, self)
        return value


def declared(stage: dict) -> tuple[set[str], set[str]]:
    """(declared leaves, exempt leaves) of a dvc.yaml stage, exempt ones marked `# guard:`."""
    out: set[str] = set()
    for entry in stage.get("params", []):
        out |= expand(entry if isinstance(entry, str) else next(iter(entry)))
    return out, set()


def exempt_keys(name: str) -> set[str]:
    """Leaves of the params lines of stage `name` whose dvc.yaml comment starts with `# guard:`."""
    text = (ROOT / "dvc.yaml").read_text()
    block = re.search(rf"^  {name}:\n(.*?)(?=^  \w+:\n|^plots:|\Z)", text, re.S | re.M)
    assert block, name
    out: set[str] = set()
    for line in block.group(1).splitlines():
        m = re.match(r"\s+- ([\w.]+)\s+# guard:", line)
        if m:
            out |= expand(m.group(1))
    return out


def load_stage(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"guard_stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def run_pipeline(workdir: Path, raw: dict, monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """Run every stage in `workdir` with params `raw`; the leaves each stage read."""
    monkeypatch.chdir(workdir)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    reads: dict[str, set[str]] = {}
    for name in STAGES:
        module = load_stage(name)
        seen: set[str] = set()
        real = getattr(module, "params", None)

        def recording(path: str | Path = "params.yaml", _real=real, _seen=seen) -> Any:
            return Recorder(_real(path), "", _seen)

        if real is not None:
            monkeypatch.setattr(module, "params", recording)
        else:  # check parses params itself: it validates the whole file
            seen |= set(ALL)
        module.main("params.yaml")
        reads[name] = {leaf for key in seen for leaf in expand(key)}
    return reads


@pytest.mark.slow  # the tiny pipeline twice, in process
def test_every_stage_declares_exactly_the_params_it_reads(
    text_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = {
        "model": "tiny-neox",
        "data": {
            "source": str(text_corpus),
            "context": 64,
            "train_tokens": 2048,
            "eval_tokens": 1024,
            "sample_tokens": 1024,
        },
        "extract": {"dtype": "float32", "batch_size": 8, "device": "cpu"},
        "sae": {"expansion": 2, "k": 4},
        "train": {"batch_tokens": 256, "device": "cpu"},
        "lens_fit": {"steps": 2, "batch_tokens": 8, "eval_tokens": 32},
        "evaluate": {"bootstrap": 4},
        "analysis": {"bootstrap": 4, "min_count": 1, "min_documents": 1},
        "browse": {"latents": 4, "prompts": 1},
    }
    stream = {**base, "lens": "fit", "train": {**base["train"], "source": "stream"}}
    parse_params(base), parse_params(stream)
    reads: dict[str, set[str]] = {name: set() for name in STAGES}
    for i, raw in enumerate((base, stream)):
        work = tmp_path / f"run{i}"
        work.mkdir()
        for name, keys in run_pipeline(work, raw, monkeypatch).items():
            reads[name] |= keys
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    problems = []
    for name in STAGES:
        want, _ = declared(pipeline[name])
        exempt = exempt_keys(name)
        missing = sorted(reads[name] - want)
        unused = sorted(want - reads[name] - exempt)
        if missing or unused:
            problems.append(f"{name}: read but not declared {missing}; declared but not read {unused}")
    assert not problems, "\n".join(problems)


def test_the_recorder_sees_leaves_sections_and_methods() -> None:
    reads: set[str] = set()
    p = Recorder(parse_params({}), "", reads)
    assert p.sae.k == 32 and isinstance(p.sae, type(parse_params({}).sae))
    p.device("evaluate")  # evaluate.device is empty: falls back to extract.device
    p.train.model_dump()
    assert {"sae.k", "evaluate.device", "extract.device"} <= reads
    assert expand("train") <= reads and "data.seed" not in reads
