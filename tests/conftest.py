"""Shared fixtures: a tmp working directory, a small local text corpus, a tiny params factory, and
one tiny-llama activation store shared by the train, evaluate and dump tests."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from mlsae.core.errors import MlsaeError
from mlsae.data.extract import extract
from mlsae.core.params import parse_params
from mlsae.stores.activations import ActivationStore

ROOT = Path(__file__).resolve().parents[1]

# gloo (the CPU DDP backend, also in the torchrun subprocesses, which inherit this) binds to the
# loopback interface instead of whatever the machine's hostname resolves to: CI machines need
# not resolve their own hostname to a usable address, and the tests never leave the machine.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


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


def tiny_raw(corpus: Path, **overrides: Any) -> dict[str, Any]:
    """A raw params dict for a fast tiny-model run on `corpus`; overrides are dotted keys with
    `__` for the dot, e.g. `tiny_raw(corpus, data__context=32, model="tiny-llama")`."""
    raw: dict[str, Any] = {
        "model": "tiny-neox",
        "seed": 0,
        "data": {"source": str(corpus), "context": 64, "train_tokens": 2048, "eval_tokens": 512},
        "extract": {"dtype": "float16", "batch_size": 8, "device": "cpu"},
    }
    for key, value in overrides.items():
        *parents, leaf = key.split("__")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


@pytest.fixture()
def tiny_params(text_corpus: Path) -> Callable[..., dict[str, Any]]:
    """`make(**overrides)`: `tiny_raw` on the session's text corpus."""
    return functools.partial(tiny_raw, text_corpus)


def stage_command(stage: str, prelude: str = "") -> list[str]:
    """argv running `stages/<stage>.py` (it reads ./params.yaml) in a fresh interpreter; a
    `prelude` (Python, e.g. shrinking shard sizes) runs first in the same process."""
    script = str(ROOT / "stages" / f"{stage}.py")
    if not prelude:
        return [sys.executable, script]
    return [sys.executable, "-c", f"{prelude}\nimport runpy, sys\nsys.argv = [{script!r}]\n"
                                  f"runpy.run_path({script!r}, run_name='__main__')"]


def stage_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


# ---------------------------------------------------------------------------------------------
# the activation store shared by test_train.py, test_evaluate.py and test_dump.py


def store_raw(root: Path) -> dict:
    return {"model": "tiny-llama", "seed": 0,
            "data": {"source": str(root / "corpus.jsonl"), "context": 32, "train_tokens": 2048, "eval_tokens": 512},
            "extract": {"dtype": "float32", "batch_size": 16, "device": "cpu"}}


def shared_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(store path, its params) under the session's base temp dir: built by the first module that asks."""
    root = tmp_path_factory.getbasetemp() / "mlsae-shared-store"
    path = root / "activations.zarr"
    try:
        ActivationStore(str(path))
    except MlsaeError:
        from pydoc_data.topics import topics

        root.mkdir(exist_ok=True)
        paras = [p.strip() for key in sorted(topics) for p in topics[key].split("\n\n") if 40 < len(p.strip()) < 400]
        (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in paras[:400]))
        extract(parse_params(store_raw(root)), str(path), progress=False)
    return path, store_raw(root)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: extra threads only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return shared_store(tmp_path_factory)


@pytest.fixture(scope="module")
def reader(store: tuple[Path, dict]) -> ActivationStore:
    return ActivationStore(str(store[0]))
