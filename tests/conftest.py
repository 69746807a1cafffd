"""Shared fixtures: a tmp working directory, a small local text corpus, a tiny params factory, and
one tiny-llama activation store shared by the train, evaluate and dump tests."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mlsae.core.errors import MlsaeError
from mlsae.core.params import Params, parse_params
from mlsae.data.extract import extract
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
        "data": {"source": str(corpus), "seed": 0, "context": 64, "train_tokens": 2048, "eval_tokens": 512},
        "extract": {"dtype": "float16", "batch_size": 8, "device": "cpu"},
        "train": {"seed": 0},
        "analysis": {"seed": 0},
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


# ---------------------------------------------------------------------------------------------
# the document split, restated independently of mlsae/data/contexts.py


def document_runs(tokenizer: Any, docs: list[str], document_tokens: int = 0) -> list[np.ndarray]:
    """Each document's run in a split's token stream: its separator (EOS) and its tokens, cut to
    `document_tokens` (0: whole), for a tokenizer that puts no BOS of its own before a text."""
    sep = tokenizer.eos_token_id
    runs = []
    for doc in docs:
        run = [sep, *tokenizer(doc, add_special_tokens=False)["input_ids"]]
        runs.append(np.asarray(run[:document_tokens] if document_tokens else run, dtype=np.int64))
    return runs


def route_documents(
    lengths: list[int], n_train: int, n_eval: int, context: int, seed: int
) -> tuple[list[int], list[int], int]:
    """(train documents, eval documents, eval_until) by the documented rule: document i goes to
    eval while the eval split is not full and u_i < n_eval / (n_train + n_eval), u the draws of
    default_rng([seed, 1]); a document routed to a full split is dropped; eval_until is one past the
    document that filled the eval split; nothing is read once both are full."""
    share = n_eval / (n_train + n_eval)
    u = np.random.default_rng([seed, 1]).random(len(lengths))
    need = {"train": n_train * context, "eval": n_eval * context}
    have = {"train": 0, "eval": 0}
    docs: dict[str, list[int]] = {"train": [], "eval": []}
    eval_until = None
    for i, n in enumerate(lengths):
        side = "eval" if eval_until is None and u[i] < share else "train"
        if have[side] >= need[side]:
            continue
        docs[side].append(i)
        have[side] = min(need[side], have[side] + n)
        if side == "eval" and have["eval"] == need["eval"]:
            eval_until = i + 1
        if eval_until is not None and have["train"] == need["train"]:
            break
    assert eval_until is not None and have["train"] == need["train"], "corpus too small for this split"
    return docs["train"], docs["eval"], eval_until


def split_arrays(
    runs: list[np.ndarray], ids: list[int], n_contexts: int, context: int
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document) of one split: the runs of `ids` joined, cut into `n_contexts` rows."""
    tokens = np.concatenate([runs[i] for i in ids])[: n_contexts * context]
    document = np.concatenate([np.full(len(runs[i]), i) for i in ids])[: n_contexts * context]
    assert tokens.size == n_contexts * context
    return tokens.reshape(n_contexts, context), document.reshape(n_contexts, context)


def run_extract(p: Params, out: Path | str, **kwargs: Any) -> dict:
    """`extract` with the narrow arguments taken from a Params (progress off)."""
    kwargs.setdefault("progress", False)
    return extract(p.model, p.data, p.extract, p.train.source, str(out), **kwargs)


def stream_source(p: Params) -> Any:
    """The StreamSource `train` needs when `p.train.source` is stream (None in store mode)."""
    from mlsae.sae.trainer import StreamSource

    return StreamSource(p.model, p.data, p.extract) if p.train.source == "stream" else None


def run_train(p: Params, reader: Any, lens: Any, out: Path, ckpt: Path, **kwargs: Any) -> tuple[dict, list[dict]]:
    """`train` with the narrow arguments taken from a Params, as stages/train.py calls it (progress off)."""
    from mlsae.sae.trainer import train

    kwargs.setdefault("progress", False)
    kwargs.setdefault("stream", stream_source(p))
    return train(p.sae, p.train, p.lens, reader, lens, out, ckpt, **kwargs)


def stage_command(stage: str, prelude: str = "") -> list[str]:
    """argv running `stages/<stage>.py` (it reads ./params.yaml) in a fresh interpreter; a
    `prelude` (Python, e.g. shrinking shard sizes) runs first in the same process."""
    script = str(ROOT / "stages" / f"{stage}.py")
    if not prelude:
        return [sys.executable, script]
    return [
        sys.executable,
        "-c",
        f"{prelude}\nimport runpy, sys\nsys.argv = [{script!r}]\nrunpy.run_path({script!r}, run_name='__main__')",
    ]


def stage_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


# ---------------------------------------------------------------------------------------------
# the activation store shared by test_train.py, test_evaluate.py and test_dump.py


def store_raw(root: Path) -> dict:
    return {
        "model": "tiny-llama",
        "data": {
            "source": str(root / "corpus.jsonl"),
            "seed": 0,
            "context": 32,
            "train_tokens": 2048,
            "eval_tokens": 512,
        },
        "extract": {"dtype": "float32", "batch_size": 16, "device": "cpu"},
        "train": {"seed": 0},
        "analysis": {"seed": 0},
    }


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
        run_extract(parse_params(store_raw(root)), path)
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
