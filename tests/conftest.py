"""Shared fixtures: a tmp working directory, a small local text corpus and a tiny params factory."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ascii_docs(n: int = 40, min_chars: int = 200) -> list[str]:
    """`n` ASCII-only documents (pydoc topics, in key order): decode back exactly with any
    byte-level tokenizer, and the tiny models' tokenizer was trained on this text."""
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        text = topics[key].encode("ascii", "ignore").decode().strip()
        if len(text) >= min_chars:
            docs.append(text)
        if len(docs) == n:
            break
    return docs


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory (the stages write data/ and reports/ relative to it)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of .txt files, one ASCII document each, sorted by name (~100k characters)."""
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(ascii_docs()):
        (root / f"doc{i:03d}.txt").write_text(text)
    return root


@pytest.fixture()
def tiny_params(text_corpus: Path) -> Callable[..., dict[str, Any]]:
    """`make(**overrides)`: a raw params dict for a fast tiny-model run; overrides use
    dotted keys with `__` for the dot, e.g. `make(data__context=32, model="tiny-llama")`."""
    base: dict[str, Any] = {
        "model": "tiny-neox",
        "seed": 0,
        "data": {"source": str(text_corpus), "context": 64, "train_tokens": 2048, "eval_tokens": 512},
        "extract": {"dtype": "float16", "batch_size": 8, "device": "cpu"},
    }

    def make(**overrides: Any) -> dict[str, Any]:
        raw = copy.deepcopy(base)
        for key, value in overrides.items():
            *parents, leaf = key.split("__")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return raw

    return make


def run_stage(stage: str, cwd: Path, env: dict[str, str] | None = None, prelude: str = "",
              timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `stages/<stage>.py` in `cwd` as a fresh Python process (reading ./params.yaml).

    `prelude` is Python run first in the same process (e.g. to shrink shard sizes)."""
    script = str(ROOT / "stages" / f"{stage}.py")
    code = (f"{prelude}\nimport runpy, sys\nsys.argv = [{script!r}]\n"
            f"runpy.run_path({script!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
