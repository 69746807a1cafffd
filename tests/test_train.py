"""The train stage: batch plan, resume (in process and after `kill -9`), DDP under torchrun,
NaN handling, bad inputs, single-layer SAEs.

Everything runs on an activation store of the tiny random Llama (4 blocks, d_model 64) over a
small local corpus of short documents (so both splits hold document separators), built once per
test session and shared by test_train/test_evaluate/test_dump.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from conftest import run_train as train
from mlsae.core import paths as C
from mlsae.core.errors import MlsaeError
from mlsae.core.params import Params, parse_params
from mlsae.data.shuffle import BatchPlan, iter_batches
from mlsae.lens.build import run_lens_stage
from mlsae.lens.tuned import Lens
from mlsae.sae.model import MLSAE
from mlsae.sae.trainer import CHECKPOINT_VERSION, lr_factor
from mlsae.stores.activations import ActivationStore

ROOT = Path(__file__).resolve().parents[1]
TRAIN_STAGE = ROOT / "stages" / "train.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures `store`, `reader`: conftest.py


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


TRAIN_RAW = {
    "sae": {"expansion": 4, "k": 8, "auxk": 32, "dead_tokens": 256},
    "train": {
        "batch_tokens": 128,
        "lr": 1e-3,
        "epochs": 2,
        "shuffle_buffer_tokens": 512,
        "checkpoint_every": 2,
        "geometric_median_sample": 256,
        "device": "cpu",
    },
}


def raw_params(store: tuple[Path, dict], **over: dict) -> dict:
    return merge(merge(store[1], TRAIN_RAW), over)


def identity(reader: ActivationStore) -> Lens:
    return Lens.identity(reader.n_layers, reader.d_model)


def plan_of(p: Params, reader: ActivationStore) -> BatchPlan:
    """The plan train() builds (same store chunks, see mlsae.sae.trainer.train)."""
    return BatchPlan(
        ~reader.keep("train"),
        reader.chunk_tokens,
        p.train.shuffle_buffer_tokens,
        p.train.batch_tokens,
        p.train.epochs,
        p.train.seed,
    )


def state(sae: MLSAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def assert_same_weights(a: MLSAE, b: MLSAE, atol: float = 1e-6) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        if key == "tokens_since_fired":
            assert torch.equal(sa[key], sb[key]), key
        else:
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=atol, msg=key)


def stage_dir(tmp: Path, store: tuple[Path, dict], raw: dict, with_store: bool = True) -> Path:
    """A working dir for `stages/train.py`: params.yaml, data/activations.zarr (a link), data/lens (none)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp / "data").mkdir(exist_ok=True)
    if with_store:
        (tmp / C.ACTIVATIONS).symlink_to(store[0])
    p = parse_params(raw)
    run_lens_stage(
        p.lens, p.lens_path, p.lens_fit, p.model, ActivationStore(str(store[0])), tmp / C.LENS_DIR, progress=False
    )
    return tmp


def stage_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    return env


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference(store: tuple[Path, dict], reader: ActivationStore, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted in-process run of TRAIN_RAW."""
    tmp = tmp_path_factory.mktemp("reference")
    p = parse_params(raw_params(store))
    metrics, history = train(p, reader, identity(reader), tmp / "sae", tmp / "ckpt", progress=False)
    return {"p": p, "metrics": metrics, "history": history, "sae": MLSAE.load(tmp / "sae"), "dir": tmp}


# ---------------------------------------------------------------------------------------------
# the batch plan


def epoch_ids(plan: BatchPlan, epoch: int) -> list[np.ndarray]:
    """Token ids of every batch of one epoch, from the plan."""
    out = []
    for buf in plan.buffers:
        if buf.epoch == epoch:
            ids = plan.token_ids(buf)
            out += [ids[j * plan.batch_tokens : (j + 1) * plan.batch_tokens] for j in range(buf.n_batches)]
    return out


def test_batch_plan_covers_non_special_tokens_once_per_epoch(reader: ActivationStore) -> None:
    special = reader.meta("train", C.SPECIAL)
    assert special.any(), "the test store must hold document separators"
    context = reader.meta("train", C.CONTEXT)
    batch, buffer_tokens = 64, 512
    plan = BatchPlan(special, 256, buffer_tokens, batch, 2, seed=0)
    n_buffers_per_epoch = sum(1 for b in plan.buffers if b.epoch == 0)
    epochs = [epoch_ids(plan, e) for e in range(2)]
    for batches in epochs:
        ids = np.concatenate(batches)
        assert all(len(b) == batch for b in batches)
        assert not special[ids].any()  # only non-special tokens
        assert len(np.unique(ids)) == len(ids)  # no token twice within an epoch
        missed = int((~special).sum()) - len(ids)  # each buffer drops less than one batch
        assert 0 <= missed < n_buffers_per_epoch * batch
        # shuffled across contexts: every batch mixes several contexts
        assert min(len(np.unique(context[b])) for b in batches) >= 4
    assert len(epochs[0]) + len(epochs[1]) == plan.n_batches
    assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))  # reshuffled per epoch

    # deterministic for a seed, different for another
    again = BatchPlan(special, 256, buffer_tokens, batch, 2, seed=0)
    other = BatchPlan(special, 256, buffer_tokens, batch, 2, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(epoch_ids(again, 0), epochs[0]))
    assert not np.array_equal(np.concatenate(epoch_ids(other, 0)[:3]), np.concatenate(epochs[0][:3]))

    # the data path: batch s is exactly the store's rows of those ids, also when resumed at s,
    # and the ranks of a 2-process job split each global batch between them
    resid = reader.resid("train", 0, reader.n_tokens("train"), [1, 3])
    all_ids = epochs[0] + epochs[1]
    got = list(iter_batches(reader, [1, 3], plan))
    assert len(got) == plan.n_batches
    for ids, x in zip(all_ids, got):
        torch.testing.assert_close(x, resid[torch.from_numpy(ids)], rtol=0, atol=0)
    for start in (0, 5, plan.n_batches - 1):
        tail = list(iter_batches(reader, [1, 3], plan, start))
        assert len(tail) == plan.n_batches - start
        assert all(torch.equal(a, b) for a, b in zip(tail, got[start:]))
    ranks = [list(iter_batches(reader, [1, 3], plan, 3, rank=r, world=2)) for r in range(2)]
    for s, (x0, x1) in enumerate(zip(*ranks)):
        assert x0.shape[0] == x1.shape[0] == batch // 2
        torch.testing.assert_close(torch.stack([x0, x1], 1).reshape(batch, 2, -1), got[3 + s], rtol=0, atol=0)


class RecordingReader:
    """An ActivationStore proxy that records every `resid` read."""

    def __init__(self, inner: ActivationStore) -> None:
        self.inner, self.reads = inner, []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def resid(self, split: str, start: int, stop: int, *args, **kw) -> torch.Tensor:
        self.reads.append(stop - start)
        return self.inner.resid(split, start, stop, *args, **kw)


@pytest.mark.parametrize("buffer_tokens", [100, 300, 512, 1000])
def test_shuffle_buffer_bounds_memory(reader: ActivationStore, buffer_tokens: int) -> None:
    """Every buffer holds at most shuffle_buffer_tokens tokens, also when a store chunk is larger."""
    special = reader.meta("train", C.SPECIAL)
    plan = BatchPlan(special, reader.chunk_tokens, buffer_tokens, 16, 1, seed=0)
    for buf in plan.buffers:
        assert sum(plan._span(int(i)).stop - plan._span(int(i)).start for i in buf.chunks) <= buffer_tokens
    assert plan.n_batches * 16 > 0.8 * (~special).sum()  # still uses (almost) all the data

    # what iter_batches really reads between two batches (a whole buffer is read before its first batch)
    rec = RecordingReader(reader)
    per_buffer, n = [], 0
    for _ in iter_batches(rec, [0], plan):  # type: ignore[arg-type]
        if rec.reads:
            per_buffer.append(sum(rec.reads))
            rec.reads.clear()
        n += 1
    assert n == plan.n_batches
    assert sum(per_buffer) <= reader.n_tokens("train")  # no buffer read twice
    assert max(per_buffer) <= buffer_tokens


# ---------------------------------------------------------------------------------------------
# resume


class CountingStep:
    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, *args, **kw):
        self.calls += 1
        return self.real(*args, **kw)


def test_resume_after_interruption_equals_uninterrupted_run(
    store: tuple[Path, dict], reader: ActivationStore, reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlsae.sae.trainer as train_mod

    p = reference["p"]
    n = plan_of(p, reader).n_batches
    assert reference["metrics"]["steps"] == n == len(reference["history"]) > 10
    out, ckpt = tmp_path / "sae", tmp_path / "ckpt"
    metrics, history = train(p, reader, identity(reader), out, ckpt, progress=False, max_steps=5)
    assert metrics == {} and len(history) == 5
    assert not out.exists()  # no half-trained output
    saved = torch.load(ckpt / C.CHECKPOINT, weights_only=True)
    assert saved["step"] == 5  # checkpointed at the stop even though checkpoint_every = 2

    counting = CountingStep(train_mod.train_step)
    monkeypatch.setattr(train_mod, "train_step", counting)
    metrics, history = train(p, reader, identity(reader), out, ckpt, progress=False)
    assert counting.calls == n - 5  # resumed, not restarted
    assert metrics["steps"] == n and [h["step"] for h in history] == list(range(1, n + 1))
    assert_same_weights(MLSAE.load(out), reference["sae"])
    np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in reference["history"]], rtol=1e-5)
    assert not (ckpt / C.CHECKPOINT).exists()  # removed once the output is whole


@pytest.mark.slow  # starts stage processes (a new interpreter each)
def test_kill_9_mid_run_then_rerun_resumes(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = raw_params(store, train={"epochs": 5, "checkpoint_every": 1})
    p = parse_params(raw)
    n = plan_of(p, reader).n_batches
    work = stage_dir(tmp_path / "work", store, raw)
    ckpt = work / C.CHECKPOINTS_DIR / "train" / C.CHECKPOINT
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN_STAGE)], cwd=work, env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    killed = torch.load(ckpt, weights_only=True)
    assert 1 <= killed["step"] < n
    assert not (work / C.SAE_DIR).exists() and not (work / C.TRAIN_METRICS).exists()

    # mark the checkpoint's history: the rerun's plot starts with it only if it resumed
    killed["history"][0]["loss"] = -12345.0
    torch.save(killed, ckpt)
    assert run_stage_in_process(work, monkeypatch) == 0  # the rerun (in process: saves an interpreter start)
    rows = read_csv(work / C.TRAIN_PLOT)
    assert len(rows) == n and float(rows[0]["loss"]) == -12345.0
    assert json.loads((work / C.TRAIN_METRICS).read_text())["steps"] == n
    assert not ckpt.exists()

    metrics, _ = train(p, reader, identity(reader), tmp_path / "ref", tmp_path / "ref-ckpt", progress=False)
    assert_same_weights(MLSAE.load(work / C.SAE_DIR), MLSAE.load(tmp_path / "ref"), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# DDP


WRAPPER = textwrap.dedent('''
    """Runs stages/train.py as __main__, logging this rank's writes, dead-latent counters, batch
    sizes and (stream mode) the contexts it ran through the model."""
    import json, os, runpy, sys
    import mlsae.core.io, mlsae.data.stream, mlsae.sae.trainer

    rank = int(os.environ.get("RANK", "0"))
    log = {"writes": [], "dead": [], "batch": [], "contexts": []}
    real = {"write_text": mlsae.core.io.write_text, "save_checkpoint": mlsae.sae.trainer.save_checkpoint,
            "atomic_dir": mlsae.sae.trainer.atomic_dir, "train_step": mlsae.sae.trainer.train_step,
            "residuals": mlsae.data.stream.StreamBatches._residuals}

    def write_text(path, text):
        log["writes"].append(str(path))
        return real["write_text"](path, text)

    def save_checkpoint(path, state):
        log["writes"].append(str(path))
        return real["save_checkpoint"](path, state)

    def atomic_dir(path):
        log["writes"].append(str(path))
        return real["atomic_dir"](path)

    def train_step(model, opt, x, grad_clip=0.0):
        out = real["train_step"](model, opt, x, grad_clip)
        log["dead"].append(getattr(model, "module", model).tokens_since_fired.tolist())
        log["batch"].append(x.shape[0])
        return out

    def residuals(self, tokens):
        log["contexts"] += [row.tolist() for row in tokens]
        return real["residuals"](self, tokens)

    mlsae.core.io.write_text = write_text
    mlsae.sae.trainer.save_checkpoint, mlsae.sae.trainer.atomic_dir = save_checkpoint, atomic_dir
    mlsae.sae.trainer.train_step = train_step
    mlsae.data.stream.StreamBatches._residuals = residuals
    try:
        sys.argv = [sys.argv[1]]
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        with open(f"log_rank{rank}.json", "w") as f:
            json.dump(log, f)
''')


@pytest.mark.slow  # spawns torchrun
def test_torchrun_two_processes_match_single_process(
    store: tuple[Path, dict], reader: ActivationStore, reference: dict, tmp_path: Path
) -> None:
    """2-process gloo DDP with the same global batch ends close to the 1-process run.

    Not bit-equal: each rank's loss is the FVU of its half batch (normalised by that half's own
    variance around its own mean) and DDP averages the two gradients, which is not the gradient
    of the whole batch's FVU. The tolerance is relative to how far training moved the weights:
    the DDP-vs-single difference must be under 10% of the single run's total update (measured
    1.1% for W_enc and 1.4% for W_dec after 24 steps at lr 1e-3; b_pre differs by 0.03%).
    """
    raw = raw_params(store)
    work = stage_dir(tmp_path / "work", store, raw)
    (work / "wrapper.py").write_text(WRAPPER)
    run = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "wrapper.py", str(TRAIN_STAGE)],
        cwd=work,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    logs = [json.loads((work / f"log_rank{r}.json").read_text()) for r in range(2)]
    n = len(reference["history"])
    p = reference["p"]

    # only rank 0 writes outputs (SAE dir, checkpoints, metrics, plot)
    assert logs[1]["writes"] == []
    written = set(logs[0]["writes"])
    assert {str(C.SAE_DIR), str(C.TRAIN_METRICS), str(C.TRAIN_PLOT)} <= written
    assert any(w.endswith(C.CHECKPOINT) for w in written)

    # every rank took half of each global batch, for the same number of steps
    assert logs[0]["batch"] == logs[1]["batch"] == [p.train.batch_tokens // 2] * n
    # dead-latent counters: identical on both ranks after every step, advanced by the global batch
    assert logs[0]["dead"] == logs[1]["dead"]
    dead = np.array(logs[0]["dead"])
    step = np.diff(np.vstack([np.zeros_like(dead[0]), dead]), axis=0)
    fired = dead == 0
    assert np.all(fired | (step == p.train.batch_tokens))
    assert fired.any() and (~fired).any()

    ddp = MLSAE.load(work / C.SAE_DIR)
    single = reference["sae"]
    rows = read_csv(work / C.TRAIN_PLOT)
    assert len(rows) == n and json.loads((work / C.TRAIN_METRICS).read_text())["steps"] == n
    torch.manual_seed(p.train.seed)
    init = MLSAE(ddp.cfg)  # train() seeds the init with train.seed: the start both runs share
    for name in ("W_enc", "W_dec"):
        moved = (getattr(single, name) - getattr(init, name)).norm()
        diff = (getattr(ddp, name) - getattr(single, name)).norm()
        assert moved > 0.5, name
        assert diff < 0.1 * moved, (name, float(diff), float(moved))
    with torch.no_grad():
        assert (ddp.b_pre - single.b_pre).norm() < 0.01 * single.b_pre.norm()
    # rank 0's logged FVU is that of its own half batch: close to the whole batch's, not equal
    tail = slice(n - 6, n)
    np.testing.assert_allclose(
        np.mean([float(r["fvu"]) for r in rows[tail]]),
        np.mean([h["fvu"] for h in reference["history"][tail]]),
        rtol=0.05,
    )


# ---------------------------------------------------------------------------------------------
# NaN loss


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    store: tuple[Path, dict], reader: ActivationStore, reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlsae.sae.trainer as train_mod

    p = reference["p"]
    real_step, calls = train_mod.train_step, []

    def poisoned(model, opt, x, grad_clip=0.0):
        calls.append(1)
        if len(calls) == 7:  # step 7 gets a NaN in one vector
            x = x.clone()
            x[3, 1, 5] = float("nan")
        return real_step(model, opt, x, grad_clip)

    monkeypatch.setattr(train_mod, "train_step", poisoned)
    out, ckpt = tmp_path / "sae", tmp_path / "ckpt"
    with pytest.raises(MlsaeError) as e:
        train(p, reader, identity(reader), out, ckpt, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "nan" in msg.lower() and "step 7" in msg and str(ckpt / C.CHECKPOINT) in msg
    assert not out.exists()
    saved = torch.load(ckpt / C.CHECKPOINT, weights_only=True)
    assert saved["step"] == 6  # the last checkpoint (every 2 steps) before the bad step
    assert len(saved["history"]) == 6 and all(np.isfinite(h["loss"]) for h in saved["history"])
    assert all(torch.isfinite(v).all() for v in saved["sae"].values() if v.is_floating_point())

    # the kept checkpoint is good: resuming without the NaN finishes like the uninterrupted run
    monkeypatch.setattr(train_mod, "train_step", real_step)
    train(p, reader, identity(reader), out, ckpt, progress=False)
    assert_same_weights(MLSAE.load(out), reference["sae"])


def test_nan_loss_before_any_checkpoint_says_so(
    reference: dict, reader: ActivationStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlsae.sae.trainer as train_mod

    real_step = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", lambda m, o, x, c=0.0: real_step(m, o, x * float("nan"), c))
    with pytest.raises(MlsaeError, match=r"at step 1; no checkpoint yet"):
        train(reference["p"], reader, identity(reader), tmp_path / "sae", tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt" / C.CHECKPOINT).exists() and not (tmp_path / "sae").exists()


# ---------------------------------------------------------------------------------------------
# bad inputs


BAD_INPUTS = {
    "k_above_n_latents": (
        {"sae": {"k": 10_000}},
        "sae.k: 10000 is more than the SAE's n_latents = sae.expansion x d_model = 4 x 64 = 256; "
        "lower sae.k or raise sae.expansion",
    ),
    "k_zero": ({"sae": {"k": 0}}, "sae.k"),
    "k_negative": ({"sae": {"k": -4}}, "sae.k"),
    "layer_out_of_range": ({"sae": {"layers": [1, 4]}}, "sae.layers"),
    "store_missing": ({}, str(C.ACTIVATIONS)),
    "store_incomplete": ({}, "incomplete"),
    "checkpoint_garbage": ({}, "corrupted checkpoint"),
    "checkpoint_truncated": ({}, "corrupted checkpoint"),
    "checkpoint_crafted_pickle": ({}, "refused: the checkpoint holds objects other than tensors"),
}


class _RunsCode:
    """Unpickling this runs code: it creates the file `marker` (a stand-in for anything worse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def write_crafted_checkpoint(path: Path) -> Path:
    """A checkpoint-shaped pickle whose unpickling would create the returned marker file."""
    marker = path.parent / "pwned"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"version": CHECKPOINT_VERSION, "identity": {}, "step": 0, "payload": _RunsCode(marker)}, path)
    return marker


def bad_input_dir(case: str, work: Path, store: tuple[Path, dict], reader: ActivationStore) -> Path:
    over = BAD_INPUTS[case][0]
    raw = raw_params(store, **over)
    lens_raw = raw_params(store) if case in ("k_zero", "k_negative") else raw  # parse_params refuses k <= 0
    stage_dir(work, store, lens_raw, with_store=case not in ("store_missing", "store_incomplete"))
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    if case == "store_incomplete":
        shutil.copytree(store[0], work / C.ACTIVATIONS)
        zarr.open_group(str(work / C.ACTIVATIONS), mode="r+").attrs["complete"] = False
    ckpt = work / C.CHECKPOINTS_DIR / "train" / C.CHECKPOINT
    if case == "checkpoint_garbage":
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"not a checkpoint at all \x00\x01\x02" * 10)
    if case == "checkpoint_crafted_pickle":
        write_crafted_checkpoint(ckpt)
    if case == "checkpoint_truncated":  # a real checkpoint of this run, cut short
        train(parse_params(raw), reader, identity(reader), work / "unused", ckpt.parent, progress=False, max_steps=2)
        blob = ckpt.read_bytes()
        ckpt.write_bytes(blob[: len(blob) // 2])
    return work


def run_stage_in_process(work: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """`python stages/train.py` in `work`, without a new interpreter: the exit status."""
    monkeypatch.chdir(work)
    main = runpy.run_path(str(TRAIN_STAGE))["main"]
    try:
        main()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def assert_failed_cleanly(case: str, work: Path, rc: int, err: str) -> None:
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: train: "), err
    assert BAD_INPUTS[case][1] in lines[0], err
    assert not (work / C.SAE_DIR).exists() and not (work / C.TRAIN_METRICS).exists()
    if case.startswith("checkpoint"):
        assert (work / C.CHECKPOINTS_DIR / "train" / C.CHECKPOINT).exists()  # left for the user to inspect
        assert not (work / C.CHECKPOINTS_DIR / "train" / "pwned").exists()  # no code ran


def test_crafted_checkpoint_would_run_code_if_unpickled(tmp_path: Path) -> None:
    """The refusal above is meaningful: a plain (unsafe) load of the same file runs its code."""
    marker = write_crafted_checkpoint(tmp_path / C.CHECKPOINT)
    from mlsae.sae.trainer import load_checkpoint

    with pytest.raises(MlsaeError, match="refused"):
        load_checkpoint(tmp_path / C.CHECKPOINT, {})
    assert not marker.exists()
    torch.load(tmp_path / C.CHECKPOINT, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_with_one_clear_line(
    store: tuple[Path, dict],
    reader: ActivationStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    case: str,
) -> None:
    """The stage's main() in process (a new interpreter per case costs seconds; see the next test)."""
    work = bad_input_dir(case, tmp_path, store, reader)
    capsys.readouterr()
    rc = run_stage_in_process(work, monkeypatch)
    err = capsys.readouterr().err
    assert_failed_cleanly(case, work, rc, err)


@pytest.mark.slow  # starts stage processes (a new interpreter each)
@pytest.mark.parametrize("case", ["k_above_n_latents", "checkpoint_truncated"])
def test_bad_input_fails_with_one_clear_line_in_a_real_process(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path, case: str
) -> None:
    work = bad_input_dir(case, tmp_path, store, reader)
    run = subprocess.run(
        [sys.executable, str(TRAIN_STAGE)], cwd=work, env=stage_env(), capture_output=True, text=True, timeout=300
    )
    assert_failed_cleanly(case, work, run.returncode, run.stderr)


# ---------------------------------------------------------------------------------------------
# single-layer SAE


def test_single_layer_sae(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlsae.sae.trainer as train_mod

    p = parse_params(raw_params(store, sae={"layers": [2]}, train={"epochs": 1}))
    seen: list[torch.Tensor] = []
    real_step = train_mod.train_step
    monkeypatch.setattr(
        train_mod, "train_step", lambda m, o, x, c=0.0: (seen.append(x.clone()), real_step(m, o, x, c))[1]
    )
    metrics, history = train(p, reader, identity(reader), tmp_path / "sae", tmp_path / "ckpt", progress=False)
    sae = MLSAE.load(tmp_path / "sae")
    assert sae.cfg.layers == [2] and json.loads((tmp_path / "sae" / C.SAE_CONFIG).read_text())["layers"] == [2]
    assert metrics["layers"] == [2] and len(metrics["fvu_by_layer"]) == 1
    assert [k for k in history[0] if k.startswith("fvu_layer_")] == ["fvu_layer_2"]
    # it was fed block 2's residuals and nothing else
    layer2 = reader.resid("train", 0, reader.n_tokens("train"), [2])[:, 0]
    rows = {r.numpy().tobytes() for r in layer2}
    assert all(x.shape[1:] == (1, reader.d_model) for x in seen)
    assert all(v.numpy().tobytes() in rows for v in seen[0][:, 0])


def test_snapshot_after_epoch_one_is_the_one_epoch_run(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path
) -> None:
    """The convergence study's premise: with a constant learning rate, the SAE saved at the end of
    epoch 1 of a 2-epoch run equals the SAE of a 1-epoch run, bit for bit."""
    two = parse_params(raw_params(store, train={"epochs": 2}))
    ends = plan_of(parse_params(raw_params(store, train={"epochs": 1})), reader).n_batches
    train(
        two,
        reader,
        identity(reader),
        tmp_path / "two",
        tmp_path / "c2",
        progress=False,
        snapshots={ends: tmp_path / "snap"},
    )
    one = parse_params(raw_params(store, train={"epochs": 1}))
    train(one, reader, identity(reader), tmp_path / "one", tmp_path / "c1", progress=False)
    a, b = MLSAE.load(tmp_path / "snap").state_dict(), MLSAE.load(tmp_path / "one").state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(MLSAE.load(tmp_path / "two").W_enc, b["W_enc"])  # epoch 2 moved on


def test_dead_window_beyond_the_run_is_an_error(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path
) -> None:
    p = parse_params(raw_params(store, sae={"dead_tokens": 10**9}, train={"epochs": 1}))
    n = plan_of(p, reader).n_batches * p.train.batch_tokens
    with pytest.raises(
        MlsaeError, match=rf"sae.dead_tokens: 1000000000 is at or beyond the run's length of {n} tokens"
    ):
        train(p, reader, identity(reader), tmp_path / "sae", tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "sae").exists()


def test_auxk_acts_when_latents_die(store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path) -> None:
    """A window of one batch with many latents: some die and the AuxK term becomes non-zero."""
    p = parse_params(raw_params(store, sae={"dead_tokens": 128, "expansion": 16}, train={"epochs": 1}))
    metrics, history = train(p, reader, identity(reader), tmp_path / "sae", tmp_path / "ckpt", progress=False)
    assert metrics["auxk_steps"] == sum(h["auxk"] > 0 for h in history) > 0
    assert any(h["dead_fraction"] > 0 for h in history)


# ---------------------------------------------------------------------------------------------
# seeds, learning-rate schedules, sae.dead_tokens: auto


class RecordingInit:
    """Stands in for MLSAE in the trainer, recording each SAE's config and weights as initialised."""

    def __init__(self) -> None:
        self.inits: list[tuple[object, dict[str, torch.Tensor]]] = []

    def __call__(self, cfg):
        sae = MLSAE(cfg)
        self.inits.append((cfg, state(sae)))
        return sae


def test_train_seed_picks_the_init_and_the_batch_order(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlsae.sae.trainer as train_mod

    recording = RecordingInit()
    monkeypatch.setattr(train_mod, "MLSAE", recording)
    seen: dict[str, list[torch.Tensor]] = {}
    real_step = train_mod.train_step

    def step(name):
        def run(m, o, x, c=0.0):
            seen.setdefault(name, []).append(x.clone())
            return real_step(m, o, x, c)

        return run

    runs = {"a": {}, "b": {}, "seed1": {"seed": 1}}
    for name, over in runs.items():
        monkeypatch.setattr(train_mod, "train_step", step(name))
        p = parse_params(raw_params(store, train={"epochs": 1, **over}))
        train(p, reader, identity(reader), tmp_path / name / "sae", tmp_path / name / "ckpt", max_steps=3)
    init = {name: weights for name, (_, weights) in zip(runs, recording.inits)}
    for key in ("W_enc", "W_dec"):
        assert torch.equal(init["a"][key], init["b"][key])
        assert not torch.equal(init["a"][key], init["seed1"][key])
    # the init is torch's draw under manual_seed(train.seed)
    torch.manual_seed(1)
    assert torch.equal(MLSAE(recording.inits[2][0]).W_enc.detach(), init["seed1"]["W_enc"])
    assert len(seen["a"]) == len(seen["seed1"]) == 3
    assert all(torch.equal(x, y) for x, y in zip(seen["a"], seen["b"]))
    assert not torch.equal(seen["a"][0], seen["seed1"][0])  # another batch order


def test_lr_factor_values() -> None:
    n = 10
    assert [lr_factor(s, n, "constant", 0) for s in range(n)] == [1.0] * n
    # warm-up: (step + 1) / warmup_steps, then the schedule alone
    assert [lr_factor(s, n, "constant", 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    for s in range(n + 1):
        t = s / n
        assert lr_factor(s, n, "linear", 0) == pytest.approx(1 - t, abs=1e-12)
        assert lr_factor(s, n, "cosine", 0) == pytest.approx((1 + np.cos(np.pi * t)) / 2, abs=1e-12)
        assert lr_factor(s, n, "cosine", 3) == pytest.approx(min(1, (s + 1) / 3) * (1 + np.cos(np.pi * t)) / 2)
    # decayed schedules reach 0 at the run's end, and are decreasing on the way
    assert lr_factor(n, n, "linear", 0) == 0 and lr_factor(n, n, "cosine", 0) == pytest.approx(0, abs=1e-12)
    for schedule in ("linear", "cosine"):
        values = [lr_factor(s, n, schedule, 0) for s in range(n + 1)]
        assert values[0] == 1 and all(a > b for a, b in itertools.pairwise(values))


@pytest.mark.parametrize("schedule,warmup", [("constant", 3), ("linear", 0), ("cosine", 2)])
def test_trainer_applies_the_lr_schedule(
    store: tuple[Path, dict],
    reader: ActivationStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    schedule: str,
    warmup: int,
) -> None:
    import mlsae.sae.trainer as train_mod

    lrs: list[float] = []
    real_step = train_mod.train_step

    def recording(m, o, x, c=0.0):
        lrs.append(o.param_groups[0]["lr"])
        return real_step(m, o, x, c)

    monkeypatch.setattr(train_mod, "train_step", recording)
    p = parse_params(raw_params(store, train={"epochs": 1, "lr_schedule": schedule, "warmup_steps": warmup}))
    n = plan_of(p, reader).n_batches
    metrics, _ = train(p, reader, identity(reader), tmp_path / "sae", tmp_path / "ckpt")
    assert metrics["steps"] == len(lrs) == n > 5
    lr = p.train.lr
    for s, got in enumerate(lrs):
        warm = min(1.0, (s + 1) / warmup) if warmup else 1.0
        decay = {"constant": 1.0, "linear": 1 - s / n, "cosine": (1 + np.cos(np.pi * s / n)) / 2}[schedule]
        assert got == pytest.approx(lr * warm * decay, rel=1e-12, abs=1e-15), s
    if schedule != "constant":
        assert lrs[-1] < 0.2 * lr  # decayed most of the way by the last step


def test_dead_tokens_auto_is_an_eighth_of_the_run(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path
) -> None:
    p = parse_params(raw_params(store, sae={"dead_tokens": "auto"}, train={"epochs": 2}))
    assert p.sae.dead_tokens == "auto"
    train(p, reader, identity(reader), tmp_path / "sae", tmp_path / "ckpt")
    assert MLSAE.load(tmp_path / "sae").cfg.dead_tokens == reader.n_tokens("train") * 2 // 8 == 512
