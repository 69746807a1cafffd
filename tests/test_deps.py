"""dvc.yaml is complete: every stage depends on every project module its entry point runs and on the
data it reads, and every file a stage writes is one of its outs, metrics or plots.

The import closure of `stages/<stage>.py` is derived from the source by AST (nothing is imported,
so this runs without torch): every `import mlsae...` / `from mlsae... import ...` anywhere in a
module, function-local imports included, plus the `__init__.py` of every package on the way.
Run `python tests/test_deps.py` to print each stage's expected code deps.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mlsae"
UNTRACKED = {"data/checkpoints"}  # working state of resumable stages, deliberately not an output
SOURCES = ("stages/", "mlsae/", "vendor/")  # files of the repository itself (code, page assets, vendored JS)


def _module_file(name: str) -> Path | None:
    """`mlsae.a.b` -> mlsae/a/b.py or mlsae/a/b/__init__.py (None if neither exists)."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _package_inits(name: str) -> set[Path]:
    parts = name.split(".")
    found = set()
    for i in range(1, len(parts) + 1):
        init = ROOT.joinpath(*parts[:i], "__init__.py")
        if init.is_file():
            found.add(init)
    return found


def _imported_modules(path: Path) -> set[str]:
    """Dotted names of the project modules `path` imports (top level or inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(ROOT).with_suffix("")
    here = list(rel.parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")}


def import_closure(entry: Path) -> set[str]:
    """Repo-relative paths of every project file that running `entry` imports, `entry` included."""
    seen: set[Path] = {entry}
    todo = [entry]
    while todo:
        for name in _imported_modules(todo.pop()):
            files = _package_inits(name)
            module = _module_file(name)
            if module is not None:
                files.add(module)
            for f in files - seen:
                seen.add(f)
                todo.append(f)
    return {p.relative_to(ROOT).as_posix() for p in seen}


def _pipeline() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _paths(entries: list) -> set[str]:
    out = set()
    for entry in entries or []:
        out.update(entry if isinstance(entry, dict) else [entry])
    return {str(p).rstrip("/") for p in out}


def _outputs(stage: dict) -> set[str]:
    return _paths(stage.get("outs")) | _paths(stage.get("metrics")) | _paths(stage.get("plots"))


def _covered(path: str, by: set[str]) -> bool:
    """`path` is one of `by` or inside one of them (a file of an output directory)."""
    return any(path == p or path.startswith(p + "/") for p in by)


def _is_code(dep: str) -> bool:
    return dep.startswith(("stages/", PACKAGE + "/")) and dep.endswith(".py")


def _constants() -> dict[str, str]:
    """NAME -> repo-relative path of every Path in mlsae/core/paths.py, evaluated without importing it."""
    tree = ast.parse((ROOT / PACKAGE / "core" / "paths.py").read_text())
    env: dict[str, object] = {"Path": Path}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                env[node.targets[0].id] = eval(compile(ast.Expression(node.value), "constants", "eval"), env)
            except Exception:
                continue
    return {k: v.as_posix() for k, v in env.items() if isinstance(v, Path) and k != "Path"}


STAGES = sorted(_pipeline())


def test_every_stage_has_an_entry_point():
    for name, stage in _pipeline().items():
        assert stage["cmd"].split()[-1] == f"stages/{name}.py", name
    assert {p.stem for p in (ROOT / "stages").glob("*.py")} == set(STAGES)


@pytest.mark.parametrize("name", STAGES)
def test_code_deps_are_exactly_the_import_closure(name):
    expected = import_closure(ROOT / "stages" / f"{name}.py")
    declared = {d for d in _paths(_pipeline()[name]["deps"]) if _is_code(d)}
    missing, stale = sorted(expected - declared), sorted(declared - expected)
    assert not missing and not stale, f"{name}: missing deps {missing}, stale deps {stale}"


def test_closure_follows_function_local_and_package_imports(tmp_path):
    # the closure must include lazily imported modules (lens_stage imports models inside a function)
    closure = import_closure(ROOT / "stages" / "train.py")
    assert {
        "mlsae/__init__.py",
        "mlsae/models/registry.py",
        "mlsae/lens/tuned.py",
        "mlsae/stores/activations.py",
        "mlsae/core/params.py",
    } <= closure


@pytest.mark.parametrize("name", STAGES)
def test_data_deps_are_upstream_outputs(name):
    pipeline = _pipeline()
    others = set().union(*(_outputs(s) for n, s in pipeline.items() if n != name))
    for dep in _paths(pipeline[name]["deps"]):
        if not dep.startswith(SOURCES):
            assert _covered(dep, others), f"{name}: dep {dep} is no other stage's output"


@pytest.mark.parametrize("name", STAGES)
def test_paths_an_entry_point_names_are_declared(name):
    """Every constants path the entry point uses is a dep or output of the stage (or a folder of them)."""
    constants = _constants()
    stage = _pipeline()[name]
    declared = _paths(stage["deps"]) | _outputs(stage)
    tree = ast.parse((ROOT / "stages" / f"{name}.py").read_text())
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "C"
    }
    for const in sorted(used & set(constants)):
        path = constants[const]
        if path in UNTRACKED or _covered(path, UNTRACKED):
            continue
        inside_declared = any(d.startswith(path + "/") for d in declared)
        assert _covered(path, declared) or inside_declared, f"{name}: uses C.{const} = {path}, not declared"


def test_baseline_stage_sits_between_extract_and_evaluate_and_knows_no_sae():
    """The baseline stage reads the store only: an SAE experiment (sae.k, sae.expansion, train.*,
    lens) never reruns it, and evaluate reads its sums."""
    pipeline = _pipeline()
    names = list(pipeline)
    assert names.index("extract") < names.index("baseline") < names.index("evaluate")
    base = pipeline["baseline"]
    data_deps = {d for d in _paths(base["deps"]) if not d.startswith(SOURCES)}
    assert data_deps == {"data/activations.zarr"}
    assert _outputs(base) == {"data/baseline", "reports/metrics/baseline.json"}
    params = set(base["params"])
    assert {"data.seed", "evaluate.tokens", "evaluate.baselines", "sae.layers"} <= params
    assert not {p for p in params if p.startswith(("train", "lens")) or (p.startswith("sae") and p != "sae.layers")}
    assert "data/baseline" in _paths(pipeline["evaluate"]["deps"])
    assert not any(_is_code(d) and d.startswith(PACKAGE + "/sae/") for d in _paths(base["deps"]))


def test_constants_outputs_match_dvc_outputs():
    """Each output path in mlsae/core/paths.py is written by exactly one stage, and every declared
    output is a constants path (so code and dvc.yaml cannot drift apart)."""
    constants = _constants()
    pipeline = _pipeline()
    outputs = {n: _outputs(s) for n, s in pipeline.items()}
    every = set().union(*outputs.values())
    folders = {"data", "reports", "reports/metrics", "reports/plots"}  # roots holding outputs
    for const, path in sorted(constants.items()):
        if path in folders or path in UNTRACKED or path.startswith(SOURCES):
            continue
        writers = [n for n, outs in outputs.items() if _covered(path, outs)]
        assert len(writers) == 1, f"C.{const} = {path} is the output of {writers or 'no stage'}"
    known = set(constants.values())
    for out in sorted(every):
        assert out in known, f"dvc.yaml output {out} has no constant in mlsae/core/paths.py"


if __name__ == "__main__":
    for stage_name in STAGES:
        print(f"{stage_name}:")
        for dep in sorted(import_closure(ROOT / "stages" / f"{stage_name}.py")):
            print(f"  - {dep}")
