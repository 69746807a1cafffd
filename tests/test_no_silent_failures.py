"""No silent failures (issue 28): each case of the red-team run that gave a wrong result with exit 0,
a traceback, or an output it should not touch, reproduced on the tiny models.

The items of the issue, in order: resume identity by content (1, 2), every chunk present and every
array checksummed (3, 4), lens weights hashed (5), exports that own what they replace (6), one run
per workspace (7, 8), imports of non-finite weights (9), params check knows (10), one line
everywhere (11), compare's output (12), min_count (13). The browser's CSP (14) is in
test_browse.py and test_browser.py. docs/failures.md maps each fault class to its test here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from conftest import run_extract as extract_params
from conftest import run_train, stage_command, stage_env, tiny_raw
from mlsae import check as chk
from mlsae.core import paths as C
from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_json
from mlsae.core.params import AnalysisParams, parse_params
from mlsae.core.stage import stage
from mlsae.data import corpus
from mlsae.lens.tuned import Lens
from mlsae.sae.model import MLSAE, SAEConfig
from mlsae.stores import activations as store
from mlsae.stores.activations import ActivationStore

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# helpers

SIZES = dict(data__context=32, data__train_tokens=2048, data__eval_tokens=512)  # 64 + 16 contexts
TRAIN = dict(
    sae={"expansion": 2, "k": 4, "auxk": 16, "dead_tokens": 256},
    train={
        "batch_tokens": 128,
        "lr": 1e-3,
        "epochs": 1,
        "shuffle_buffer_tokens": 512,
        "checkpoint_every": 2,
        "geometric_median_sample": 256,
        "device": "cpu",
    },
)


def run_extract(raw: dict, out: Path, **kwargs: Any) -> dict:
    return extract_params(parse_params(raw), out, **kwargs)


def arrays(path: Path) -> dict[str, np.ndarray]:
    root = store.open_root(str(path))
    return {
        f"{s}/{k}": root[s][k][:]
        for s in C.SPLITS
        for k in (C.RESID, C.TOKENS, C.CONTEXT, C.POSITION, C.SPECIAL, C.DOCUMENT)
    }


def assert_same_arrays(a: Path, b: Path) -> None:
    x, y = arrays(a), arrays(b)
    for key in x:
        assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), key


def edit(corpus_dir: Path) -> None:
    """Overwrite the first document (same path, same size: other text)."""
    doc = sorted(corpus_dir.iterdir())[0]
    doc.write_text(doc.read_text().swapcase())


def one_line(capsys: pytest.CaptureFixture, exit_code: int = 1) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def in_stage(name: str, fn: Any, capsys: pytest.CaptureFixture) -> str:
    """Run `fn` under the stage contract; the one error line it printed (exit status 1)."""
    with pytest.raises(SystemExit) as e:
        with stage(name):
            fn()
    assert e.value.code == 1
    return one_line(capsys)


@pytest.fixture()
def corpus_copy(text_corpus: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(text_corpus, tmp_path / "corpus"))


@pytest.fixture()
def store_copy(store: tuple[Path, dict], tmp_path: Path) -> Path:
    """A copy of the session's shared tiny-llama activation store, free to damage."""
    return Path(shutil.copytree(store[0], tmp_path / "activations.zarr"))


def chunk_file(root: Path, array: str) -> Path:
    files = sorted(p for p in (root / array / "c").rglob("*") if p.is_file())
    assert files, f"no chunk of {array}"
    return files[0]


# --------------------------------------------------------------------------------------------
# 1, 2. resume identity by content


def test_corpus_content_hash_follows_content_not_path(corpus_copy: Path, tmp_path: Path) -> None:
    before = corpus.content_sha256(str(corpus_copy))
    moved = Path(shutil.copytree(corpus_copy, tmp_path / "elsewhere"))
    assert corpus.content_sha256(str(moved)) != before  # the source string is part of it...
    assert corpus.content_sha256(str(corpus_copy)) == before  # ...and it is stable
    edit(corpus_copy)
    assert corpus.content_sha256(str(corpus_copy)) != before


def test_extract_interrupted_then_corpus_edited_starts_afresh(
    corpus_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 28 (1): the store recorded the corpus path only, so a rerun after an edit resumed,
    mixing old and new text, and marked the store complete."""
    monkeypatch.setattr(store, "SHARD_TARGET_BYTES", 1)  # 8 contexts per shard
    raw = tiny_raw(corpus_copy, **SIZES)
    out = tmp_path / "a.zarr"
    assert run_extract(raw, out, stop_after_shards=3) == {}
    edit(corpus_copy)
    metrics = run_extract(raw, out)
    assert metrics["resumed"] is False
    run_extract(raw, tmp_path / "ref.zarr")  # uninterrupted, on the edited corpus
    assert_same_arrays(out, tmp_path / "ref.zarr")
    assert store.open_root(str(out)).attrs["corpus_sha256"] == corpus.content_sha256(str(corpus_copy))


def test_extract_refuses_an_incomplete_store_of_other_params(
    corpus_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other params (here: extract.batch_size, which changes the residuals' rounding) never resume
    an incomplete store; it is refused, untouched, so that its own params can still finish it."""
    monkeypatch.setattr(store, "SHARD_TARGET_BYTES", 1)
    raw = tiny_raw(corpus_copy, **SIZES)
    out = tmp_path / "a.zarr"
    run_extract(raw, out, stop_after_shards=1)
    with pytest.raises(MlsaeError, match="incomplete store from another configuration"):
        run_extract(tiny_raw(corpus_copy, extract__batch_size=4, **SIZES), out)
    assert run_extract(raw, out)["resumed"] is True


class CountingStep:
    def __init__(self, real: Any) -> None:
        self.real, self.calls = real, 0

    def __call__(self, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        return self.real(*args, **kw)


def test_train_never_resumes_a_checkpoint_of_other_corpus_content(
    corpus_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 28 (2): the checkpoint's identity held the corpus path; after a corpus edit and a
    rebuilt store, train continued the old checkpoint, mixing both corpora."""
    import mlsae.sae.trainer as trainer

    raw = {**tiny_raw(corpus_copy, **SIZES), **TRAIN}
    p = parse_params(raw)
    acts = tmp_path / "act.zarr"
    run_extract(raw, acts)
    lens = Lens.identity(4, 64)
    run_train(p, ActivationStore(str(acts)), lens, tmp_path / "sae", tmp_path / "ckpt", max_steps=3)
    assert (tmp_path / "ckpt" / C.CHECKPOINT).is_file()
    edit(corpus_copy)
    run_extract(raw, acts)  # the complete store of the old text is rebuilt
    counting = CountingStep(trainer.train_step)
    monkeypatch.setattr(trainer, "train_step", counting)
    metrics, _ = run_train(p, ActivationStore(str(acts)), lens, tmp_path / "sae", tmp_path / "ckpt")
    assert counting.calls == metrics["steps"] > 3  # started afresh
    monkeypatch.undo()
    run_train(p, ActivationStore(str(acts)), lens, tmp_path / "ref", tmp_path / "ref-ckpt")
    for name, ref in MLSAE.load(tmp_path / "ref").state_dict().items():
        torch.testing.assert_close(MLSAE.load(tmp_path / "sae").state_dict()[name], ref, rtol=0, atol=0)


def _kill_when(proc: subprocess.Popen, ready: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.01)
        assert proc.poll() is None, f"the {what} ended ({proc.returncode}) before it could be killed"
        assert ready(), f"the {what} made no progress in {timeout} s"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _done(path: Path, split: str = "train") -> int:
    try:
        return json.loads((path / "zarr.json").read_text())["attributes"]["done"][split]
    except (OSError, ValueError, KeyError):
        return 0


def _run_stage(work: Path, name: str, prelude: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        stage_command(name, prelude), cwd=work, capture_output=True, text=True, env=stage_env(), timeout=300
    )


SHRINK = "import mlsae.stores.activations as s; s.SHARD_TARGET_BYTES = 1"
PACE_EXTRACT = "import time; _ts = s.to_storage; s.to_storage = lambda *a: (time.sleep(0.15), _ts(*a))[1]"
PACE_TRAIN = (
    "import time, mlsae.sae.trainer as t; _st = t.train_step\n"
    "t.train_step = lambda *a, **k: (time.sleep(0.05), _st(*a, **k))[1]"
)


@pytest.mark.slow  # stage processes killed with SIGKILL
def test_kill_9_mid_extract_and_mid_train_then_corpus_edit_equals_a_fresh_run(
    corpus_copy: Path, tmp_path: Path
) -> None:
    """The issue's end-to-end case: kill -9 extract mid-way, edit the corpus, rerun; kill -9 train
    mid-way, edit the corpus again, rerun extract and train. Both results equal uninterrupted runs
    on the final corpus."""
    work = tmp_path / "work"
    work.mkdir()
    raw = {**tiny_raw(corpus_copy, **SIZES), **TRAIN}
    raw["train"] = {**raw["train"], "epochs": 4, "checkpoint_every": 1}
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    acts = work / C.ACTIVATIONS

    with open(tmp_path / "extract.err", "w") as err:
        proc = subprocess.Popen(
            stage_command("extract", f"{SHRINK}\n{PACE_EXTRACT}"),
            cwd=work,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=stage_env(),
        )
    _kill_when(proc, lambda: _done(acts) >= 2, "extract")
    assert not store.open_root(str(acts)).attrs["complete"]
    edit(corpus_copy)
    done = _run_stage(work, "extract", SHRINK)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "starting afresh" in done.stderr and json.loads((work / C.EXTRACT_METRICS).read_text())["resumed"] is False

    lens_stage = _run_stage(work, "lens")
    assert lens_stage.returncode == 0, lens_stage.stderr[-2000:]
    ckpt = work / C.CHECKPOINTS_DIR / "train" / C.CHECKPOINT
    with open(tmp_path / "train.err", "w") as err:
        proc = subprocess.Popen(
            stage_command("train", PACE_TRAIN), cwd=work, stdout=subprocess.DEVNULL, stderr=err, env=stage_env()
        )
    _kill_when(proc, lambda: ckpt.is_file(), "train")
    assert torch.load(ckpt, weights_only=True)["step"] >= 1
    edit(corpus_copy)
    for name in ("extract", "train"):
        done = _run_stage(work, name, SHRINK if name == "extract" else "")
        assert done.returncode == 0, done.stderr[-2000:]
    assert not ckpt.exists()

    # uninterrupted runs on the final corpus
    ref = tmp_path / "ref"
    run_extract(raw, ref / "act.zarr")
    assert_same_arrays(acts, ref / "act.zarr")
    reader = ActivationStore(str(acts))
    run_train(parse_params(raw), reader, Lens.identity(4, 64), ref / "sae", ref / "ckpt")
    got, want = MLSAE.load(work / C.SAE_DIR).state_dict(), MLSAE.load(ref / "sae").state_dict()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 3, 4. every chunk present, every array checksummed


@pytest.mark.parametrize("array", ["train/resid", "eval/resid", "eval/tokens", "train/context"])
def test_missing_activation_chunk_fails_naming_the_array(store_copy: Path, array: str) -> None:
    """Issue 28 (3): a deleted chunk read back as zeros (fvu 0.0, loss 0.0, exit 0)."""
    chunk_file(store_copy, array).unlink()
    with pytest.raises(MlsaeError) as e:
        ActivationStore(str(store_copy))
    line = str(e.value)
    assert "\n" not in line and f"array {array} is missing chunk c/0" in line
    assert f"dvc checkout {store_copy}" in line and "dvc repro -f extract" in line


def test_train_stage_on_a_store_missing_a_chunk_prints_one_line(
    store: tuple[Path, dict],
    store_copy: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    import runpy

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "params.yaml").write_text(yaml.safe_dump({**store[1], **TRAIN}))
    shutil.move(store_copy, work / C.ACTIVATIONS)
    chunk_file(work / C.ACTIVATIONS, "train/resid").unlink()
    monkeypatch.chdir(work)
    main = runpy.run_path(str(ROOT / "stages" / "train.py"))["main"]
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1
    line = one_line(capsys)
    assert line.startswith("error: train: data/activations.zarr: array train/resid is missing chunk")
    assert not (work / C.SAE_DIR).exists() and not (work / C.TRAIN_METRICS).exists()


@pytest.fixture()
def latents_copy(store: tuple[Path, dict], tmp_path: Path) -> Path:
    from mlsae.sae.dump import dump

    reader = ActivationStore(str(store[0]))
    torch.manual_seed(0)
    sae = MLSAE(
        SAEConfig(
            d_model=reader.d_model,
            n_latents=2 * reader.d_model,
            k=4,
            layers=list(range(reader.n_layers)),
            model="tiny-llama",
        )
    )
    out = tmp_path / "latents.zarr"
    dump(sae, Lens.identity(reader.n_layers, reader.d_model), reader, str(out), progress=False)
    return out


@pytest.mark.parametrize("array", [C.INDICES, C.VALUES, C.TOKENS])
def test_missing_latent_chunk_fails_naming_the_array(latents_copy: Path, tmp_path: Path, array: str) -> None:
    """Issue 28 (3): a deleted latents chunk gave every headline null with exit 0."""
    from mlsae.analysis.aggregate import aggregate

    chunk_file(latents_copy, array).unlink()
    with pytest.raises(MlsaeError, match=rf"array {array} is missing chunk c/0.*dvc repro -f dump"):
        aggregate(latents_copy, tmp_path / "analysis", tmp_path / "analysis.json", AnalysisParams(min_count=1))
    with pytest.raises(MlsaeError, match=rf"array {array} is missing chunk"):
        token_meta(latents_copy)
    assert not (tmp_path / "analysis.json").exists()


def token_meta(path: Path) -> list[np.ndarray]:
    """The latent store's per-token metadata, read as the report stage reads it (the one reader)."""
    from mlsae.stores.latents import open_latents

    latents = open_latents(path)
    return [latents.meta(k) for k in (C.TOKENS, C.CONTEXT, C.POSITION, C.DOCUMENT)]


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, length unchanged: only a checksum can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "array", ["eval/tokens", "eval/special", "eval/position", "eval/context", "eval/document", "train/tokens"]
)
def test_flipped_byte_in_a_metadata_array_is_reported(store_copy: Path, array: str) -> None:
    """Issue 28 (4): the metadata arrays carried no checksum; one flipped byte in eval/tokens
    changed delta_ce silently (exit 0) and dump copied the bad tokens on."""
    flip(chunk_file(store_copy, array))
    split, key = array.split("/")
    with pytest.raises(MlsaeError, match=r"corrupted store.*dvc repro -f extract"):
        with store.guard(store_copy, "extract"):
            ActivationStore(str(store_copy)).meta(split, key)


def test_flipped_byte_in_the_latent_stores_token_copy_is_reported(latents_copy: Path) -> None:
    flip(chunk_file(latents_copy, C.TOKENS))
    with pytest.raises(MlsaeError, match=r"corrupted store.*dvc repro -f dump"):
        with store.guard(latents_copy, "dump"):
            token_meta(latents_copy)


def test_every_array_of_both_stores_is_checksummed_and_recorded(store: tuple[Path, dict], latents_copy: Path) -> None:
    """Every array, whatever arrays a store holds (a new one is covered without a list to update),
    carries a CRC32C checksum and is listed in the completion record."""
    import zarr

    for path in (store[0], latents_copy):
        root = zarr.open_group(str(path), mode="r")
        found = {name for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array)}
        assert {"eval/tokens", "eval/special", "eval/position", "eval/context"} <= found or {
            C.TOKENS,
            C.VALUES,
        } <= found
        for name in found:
            codecs = root[name].metadata.codecs
            inner = getattr(codecs[0], "codecs", ())  # a sharded array's chunk codecs
            assert "Crc32cCodec" in [type(c).__name__ for c in (*codecs, *inner)], (path, name)
        assert set(root.attrs.get("arrays", {})) == found, path


# --------------------------------------------------------------------------------------------
# 5. lens weights carry a sha256; a missing hash fails closed


@pytest.fixture()
def tuned_lens_dir(reader: ActivationStore, tmp_path: Path) -> Path:
    """data/lens of a `lens: pretrained` run: a random tuned lens for the tiny model, through the lens stage."""
    from mlsae.lens.build import run_lens_stage

    g = torch.Generator().manual_seed(0)
    L, d = reader.n_layers, reader.d_model
    weight = 0.01 * torch.randn(L, d, d, generator=g)
    weight[1, 0, 0] = 1.2345  # found in params.pt below
    Lens(L, d, weight, 0.01 * torch.randn(L, d, generator=g)).save(tmp_path / "pretrained")
    p = parse_params({**reader_params(reader), "lens": "pretrained", "lens_path": str(tmp_path / "pretrained")})
    run_lens_stage(p.lens, p.lens_path, p.lens_fit, p.model, reader, tmp_path / "lens", progress=False)
    return tmp_path / "lens"


def reader_params(reader: ActivationStore) -> dict:
    return {"model": "tiny-llama", "data": {"source": "unused.txt"}, "lens_fit": {"eval_tokens": 32}}


def test_flipped_byte_in_lens_weights_is_refused(tuned_lens_dir: Path, reader: ActivationStore) -> None:
    """Issue 28 (5): a flipped byte in data/lens/params.pt loaded with exit 0 (a translator weight
    off by 2.0): torch's zip reader checks no checksum."""
    from mlsae.lens.loading import load_stage_lens

    load_stage_lens(tuned_lens_dir, reader)  # intact: loads
    params = tuned_lens_dir / C.LENS_PARAMS
    data = bytearray(params.read_bytes())
    at = bytes(data).find(struct.pack("<f", 1.2345))
    assert at > 0
    data[at + 3] ^= 0x01  # the exponent's low bit: 1.2345 -> 2.469
    params.write_bytes(bytes(data))
    with pytest.raises(MlsaeError, match=r"params.pt: sha256 differs from the one recorded in .*dvc repro -f lens"):
        load_stage_lens(tuned_lens_dir, reader)


def test_lens_record_without_hashes_or_mode_fails_in_one_line(tuned_lens_dir: Path, reader: ActivationStore) -> None:
    """A record without the hashes (an older lens stage, or an edit) fails closed; one without
    `mode` gave a KeyError traceback."""
    from mlsae.lens.loading import RECORD, load_stage_lens

    path = tuned_lens_dir / RECORD
    record = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "sha256"}))
    with pytest.raises(MlsaeError, match=r"no sha256 recorded for config.json .*dvc repro -f lens"):
        load_stage_lens(tuned_lens_dir, reader)
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "mode"}))
    with pytest.raises(MlsaeError, match=r"mlsae.json: 'mode' is None, expected one of none, pretrained, fit"):
        load_stage_lens(tuned_lens_dir, reader)


# --------------------------------------------------------------------------------------------
# 6. exports own what they replace


def saved_sae(path: Path) -> Path:
    torch.manual_seed(0)
    MLSAE(SAEConfig(d_model=8, n_latents=16, k=2, layers=[0, 1], model="tiny-llama", normalisation="seed")).save(path)
    return path


def export_in_stage(sae: Path, out: str | Path, capsys: pytest.CaptureFixture) -> str:
    from mlsae.sae.saelens import export_saelens

    return in_stage("export", lambda: export_saelens(sae, out, force=True), capsys)


def listing(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_export_force_never_replaces_a_git_repository(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 28 (6): `--force` on a git repository deleted it, .git included, with exit 0."""
    sae = saved_sae(tmp_path / "sae")
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "notes.txt").write_text("mine")
    before = listing(repo)
    line = export_in_stage(sae, repo, capsys)
    assert line.startswith("error: export: ") and "git repository" in line
    assert listing(repo) == before


def test_export_force_never_replaces_a_pipeline_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`--force data/sae` replaced the pipeline's SAE and then failed."""
    monkeypatch.chdir(tmp_path)
    saved_sae(tmp_path / C.SAE_DIR)
    before = listing(tmp_path / "data")
    for out in (C.SAE_DIR, C.DATA, C.TABLES_DIR / "saelens", C.REPORTS):
        line = export_in_stage(tmp_path / C.SAE_DIR, out, capsys)
        assert "pipeline output" in line, line
    assert listing(tmp_path / "data") == before


@pytest.mark.parametrize("out", [".", ".."])
def test_export_force_never_replaces_the_working_directory_or_above(
    tmp_path: Path, out: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`--force .` raised a traceback; `--force ..` left a stray temporary directory."""
    work = tmp_path / "work"
    work.mkdir()
    sae = saved_sae(work / "sae")
    monkeypatch.chdir(work)
    before = listing(tmp_path)
    line = export_in_stage(sae, out, capsys)
    assert "working directory or a directory above it" in line
    assert listing(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_export_force_replaces_an_earlier_export_and_leaves_no_temp_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from mlsae.sae import saelens

    sae = saved_sae(tmp_path / "sae")
    saelens.export_saelens(sae, tmp_path / "out")
    before = listing(tmp_path / "out")

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(saelens, "save_file", full)
    line = export_in_stage(sae, tmp_path / "out", capsys)
    assert line == f"error: export: {tmp_path / 'out'}: disk full"  # the path the write was for
    assert listing(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sae"]  # no temporary sibling
    monkeypatch.undo()
    assert (tmp_path / "out" / ".mlsae-export").is_file()  # the marker of an earlier export...
    saelens.export_saelens(sae, tmp_path / "out", force=True)  # ...so --force replaces it


# --------------------------------------------------------------------------------------------
# 7, 8. one run per workspace


def run_check_stage() -> None:
    """`python stages/check.py` in the working directory, in this process."""
    import runpy

    runpy.run_path(str(ROOT / "stages" / "check.py"))["main"]()


@pytest.fixture()
def checked(tiny_params: Any, workdir: Path) -> Path:
    """A workspace whose check stage has validated (and recorded) params.yaml."""
    raw = tiny_params(
        model="tiny-llama",
        data__context=32,
        data__train_tokens=1024,
        data__eval_tokens=256,
        evaluate={"tokens": 64},
        sae={"dead_tokens": 256},
        train={"batch_tokens": 128, "shuffle_buffer_tokens": 512},
    )
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))
    run_check_stage()
    return workdir / "params.yaml"


def test_later_stage_refuses_params_changed_since_check(checked: Path) -> None:
    """Issue 28 (7): a second `dvc exp run` in the same workspace rewrote params.yaml and the first
    run's later stages ran on it."""
    from mlsae.core import stage as stage_mod

    stage_mod.params(checked)  # unchanged: fine
    raw = yaml.safe_load(checked.read_text())
    raw["sae"]["k"] = 16
    checked.write_text(yaml.safe_dump(raw))
    with pytest.raises(MlsaeError) as e:
        stage_mod.params(checked)
    line = str(e.value)
    assert "\n" not in line and line.startswith("params.yaml changed since `check` validated it")
    assert "sae.k 32 -> 16" in line and "dvc exp run --queue" in line


def test_check_refuses_while_another_run_is_in_progress(checked: Path, capsys: pytest.CaptureFixture) -> None:
    import psutil

    record = checked.parent / C.CHECKPOINTS_DIR / C.RUN_RECORD
    live = {"pid": os.getpid(), "started": psutil.Process().create_time()}  # stands for a running dvc
    data = json.loads(record.read_text())
    write_json(record, {**data, "run": live})
    with pytest.raises(SystemExit):
        run_check_stage()
    line = one_line(capsys)
    assert line.startswith(f"error: check: another run (dvc, pid {os.getpid()}) is in progress") and "--queue" in line
    write_json(record, {**data, "run": {**live, "started": live["started"] - 100}})  # that pid, reused: gone
    run_check_stage()


def test_second_trainer_on_one_checkpoint_refuses(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path
) -> None:
    """Issue 28 (8): an orphaned train process went on writing while a rerun resumed its checkpoint.
    The trainer holds a lock on its checkpoint directory: the second refuses at once."""
    p = parse_params({**store[1], **TRAIN})
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with open(ckpt / "lock", "w") as held:  # another process's lock, as flock sees it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(MlsaeError, match=r"another process .* is writing it \(lock .*lock\)"):
            run_train(p, reader, Lens.identity(4, 64), tmp_path / "sae", ckpt)
    assert not (tmp_path / "sae").exists()
    metrics, _ = run_train(p, reader, Lens.identity(4, 64), tmp_path / "sae", ckpt, max_steps=1)


def test_second_extract_on_one_store_refuses(tiny_params: Any, tmp_path: Path) -> None:
    out = tmp_path / "a.zarr"
    with open(tmp_path / ".a.zarr.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(MlsaeError, match="another process"):
            run_extract(tiny_params(data__context=32, data__train_tokens=256, data__eval_tokens=64), out)
    assert not out.exists()


FAKE_DVC = """\
import os, subprocess, sys, time
env = {**os.environ, "DVC_STAGE": "train"}
child = subprocess.Popen(sys.argv[1:], env=env)
print(child.pid, flush=True)
time.sleep(600)
"""
STAGE_LOOP = """\
import pathlib, sys, time
from mlsae.core.stage import stage
beat = pathlib.Path(sys.argv[1])
with stage("train"):
    while True:
        beat.write_text(str(time.time()))
        time.sleep(0.05)
"""


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow  # spawns processes and kills them
@pytest.mark.parametrize("via_shell", [False, True])
def test_stage_dies_with_its_dvc_process(tmp_path: Path, via_shell: bool) -> None:
    """Issue 28 (8): SIGTERM (or kill -9) to `dvc repro` left the stage running, orphaned. A stage
    started by DVC gets SIGTERM when its parent exits (PR_SET_PDEATHSIG), and when DVC is further
    up (a shell that does not exec in between) a watchdog thread sends it."""
    dvc = tmp_path / "bin" / "dvc"  # a process whose command line names dvc, like the real one
    dvc.parent.mkdir()
    dvc.write_text(FAKE_DVC)
    beat = tmp_path / "beat"
    child = [sys.executable, "-c", STAGE_LOOP, str(beat)]
    if via_shell:
        child = ["sh", "-c", " ".join(f"'{a}'" for a in child) + "; true"]  # `; true`: sh stays the parent
    parent = subprocess.Popen([sys.executable, str(dvc), *child], stdout=subprocess.PIPE, text=True, env=stage_env())
    pid = int(parent.stdout.readline())
    stage_pid = pid
    try:
        deadline = time.monotonic() + 60
        while not beat.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert beat.exists(), "the stage never started"
        if via_shell:
            import psutil

            stage_pid = psutil.Process(pid).children()[0].pid
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 15
        while not _gone(stage_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(stage_pid), "the stage outlived its dvc process"
    finally:
        for p in {pid, stage_pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


@pytest.mark.slow  # a stage process and a signal
def test_sigterm_stops_train_between_steps_with_a_checkpoint(store: tuple[Path, dict], tmp_path: Path) -> None:
    """SIGTERM is handled like Ctrl-C: the step finishes, a checkpoint is saved (here the only one:
    checkpoint_every is beyond the run), the stage exits 130 with one line; the rerun resumes."""
    from mlsae.lens.build import run_lens_stage

    raw = {**store[1], **TRAIN}
    raw["train"] = {**raw["train"], "epochs": 5, "checkpoint_every": 100_000}
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    (work / C.ACTIVATIONS).symlink_to(store[0])
    p = parse_params(raw)
    run_lens_stage(
        p.lens, p.lens_path, p.lens_fit, p.model, ActivationStore(str(store[0])), work / C.LENS_DIR, progress=False
    )
    steps = tmp_path / "steps"
    prelude = (
        f"import pathlib, time, mlsae.sae.trainer as t; _st = t.train_step; _n = [0]\n"
        f"def _step(*a, **k):\n    out = _st(*a, **k); _n[0] += 1; pathlib.Path({str(steps)!r}).write_text(str(_n[0]))"
        f"; time.sleep(0.05); return out\nt.train_step = _step"
    )
    proc = subprocess.Popen(
        stage_command("train", prelude),
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=stage_env(),
    )
    deadline = time.monotonic() + 120
    # (the file may be caught empty between its truncation and its write: that reads as 0)
    while (
        time.monotonic() < deadline
        and proc.poll() is None
        and int((steps.read_text() if steps.exists() else "") or 0) < 3
    ):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].endswith("error: train: interrupted (rerun to resume)")
    ckpt = torch.load(work / C.CHECKPOINTS_DIR / "train" / C.CHECKPOINT, weights_only=True)
    assert ckpt["step"] >= 3 and len(ckpt["history"]) == ckpt["step"]


# --------------------------------------------------------------------------------------------
# 9. imports refuse non-finite weights


def test_import_of_a_seed_sae_with_nan_weights_is_refused(
    store: tuple[Path, dict], reader: ActivationStore, tmp_path: Path
) -> None:
    """Issue 28 (9): a NaN SAE imported with exit 0 and went into dvc.lock; evaluate then failed."""
    from test_interop import D, N, write_seed

    from mlsae.sae.importer import import_sae

    nan = torch.randn(N, D)
    nan[3, 5] = float("nan")
    write_seed(tmp_path / "seed", tensor_extra={"encoder.weight": nan})
    p = parse_params({**store[1], "sae": {"source": str(tmp_path / "seed")}})
    with pytest.raises(MlsaeError, match=r"tensor 'W_enc' holds 1 NaN or infinite value\(s\); refusing to import"):
        import_sae(p.sae, p.lens, reader, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# 10. params check knows: found before DVC deletes anything


def check_params(corpus_dir: Path, **sections: Any) -> dict:
    raw = {
        "model": "tiny-llama",
        "data": {"source": str(corpus_dir), "context": 64, "train_tokens": 1024, "eval_tokens": 256},
        "evaluate": {"tokens": 128},
        "sae": {"dead_tokens": 256},
        "train": {"batch_tokens": 128, "shuffle_buffer_tokens": 512},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def rejected(raw: dict) -> str:
    with pytest.raises(MlsaeError) as e:
        chk.validate(parse_params(raw))
    return str(e.value)


def test_check_accepts_the_test_params(text_corpus: Path) -> None:
    chk.validate(parse_params(check_params(text_corpus)))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"train": {"device": "tpu9"}}, r"^train.device: must be auto, cpu, cuda, cuda:N or mps"),
        ({"sae": {"auxk_coef": float("nan")}}, r"^sae.auxk_coef: input should be a finite number"),
        ({"train": {"grad_clip": float("nan")}}, r"^train.grad_clip: input should be a finite number"),
    ],
)
def test_bad_device_and_non_finite_floats_are_refused_by_params(text_corpus: Path, section: dict, message: str) -> None:
    """Issue 28 (10): these were found by the stage, after DVC had deleted its outputs (a NaN
    grad_clip was accepted silently). The typed params refuse them (pydantic, at the edge)."""
    with pytest.raises(MlsaeError, match=message):
        parse_params(check_params(text_corpus, **section))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_a_device_this_machine_lacks_is_refused_by_check(text_corpus: Path) -> None:
    assert rejected(check_params(text_corpus, evaluate={"device": "cuda:1"})).startswith(
        "evaluate.device: 'cuda:1' requested but CUDA is not available"
    )


def test_batch_above_the_run_or_the_buffer_is_refused_by_check(text_corpus: Path) -> None:
    line = rejected(check_params(text_corpus, train={"batch_tokens": 2048, "shuffle_buffer_tokens": 4096}))
    assert line.startswith("train.batch_tokens: 2048 exceeds the run's 1024 train tokens")
    line = rejected(check_params(text_corpus, train={"batch_tokens": 1024, "shuffle_buffer_tokens": 512}))
    assert line.startswith("train.batch_tokens: 1024 exceeds train.shuffle_buffer_tokens 512")


def test_lens_path_contents_are_checked(text_corpus: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    line = rejected(check_params(text_corpus, lens="pretrained", lens_path=str(empty)))
    assert (
        line
        == f"lens_path: {empty} holds no config.json or params.pt (a tuned-lens directory has config.json and params.pt)"
    )
    Lens(3, 64, torch.zeros(3, 64, 64), torch.zeros(3, 64)).save(tmp_path / "wrong")  # tiny-llama: 4 layers
    line = rejected(check_params(text_corpus, lens="pretrained", lens_path=str(tmp_path / "wrong")))
    assert "is a lens for 3 layers x d_model 64, but model tiny-llama has 4 x 64" in line
    Lens(4, 64, torch.zeros(4, 64, 64), torch.zeros(4, 64)).save(tmp_path / "right")
    chk.validate(parse_params(check_params(text_corpus, lens="pretrained", lens_path=str(tmp_path / "right"))))


def test_a_run_that_cannot_fit_fails_in_check_saying_how_much_it_needs(text_corpus: Path) -> None:
    """Issue 28 (10, 11): data.train_tokens=1e10 allocated 37 GiB in extract (a traceback)."""
    line = rejected(check_params(text_corpus, data={"train_tokens": 10_000_000_000}))
    assert line.startswith("data.train_tokens / data.eval_tokens: this run needs at least ")
    assert "GiB of memory" in line or "GiB of disk" in line
    memory, disk = chk.machine()
    need = chk.estimate(
        parse_params(check_params(text_corpus, data={"train_tokens": 10_000_000_000})), chk.model_dims("tiny-llama")
    )
    assert need.memory > memory and need.memory > 200 * 2**30  # ~24 bytes a token before any residual
    small = chk.estimate(parse_params(check_params(text_corpus)), chk.model_dims("tiny-llama"))
    assert small.memory < 2**30 and small.disk < 2**25


def test_disk_estimate_names_the_store_size(text_corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chk, "machine", lambda data_dir=C.DATA: (1 << 50, 1 << 20))  # 1 MiB free
    line = rejected(check_params(text_corpus, data={"train_tokens": 65536}))
    assert line.startswith("data.train_tokens / data.eval_tokens: this run needs at least 33.5 MiB of disk under data/")
    assert "(activation store 32.8 MiB: 65,792 tokens x 4 blocks x d_model 64 x 2 bytes)" in line
    assert "1.0 MiB are free there" in line


# --------------------------------------------------------------------------------------------
# 11. one line everywhere


def gguf_bytes(*kv: bytes, n_keys: int | None = None) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv) if n_keys is None else n_keys) + b"".join(kv)


def gguf_string(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


ARCH = gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("llama")


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (gguf_bytes(struct.pack("<Q", 1 << 62) + bytes(32)), "key length 4611686018427387904 at offset 24 exceeds"),
        (gguf_bytes(gguf_string("general.architecture") + struct.pack("<I", 99)), "has unknown value type 99"),
        (gguf_bytes(ARCH, gguf_string("llama.block_count") + struct.pack("<I", 4)), "truncated header"),
        (gguf_bytes(ARCH, n_keys=1 << 40), "key count 1099511627776 exceeds the file"),
        (gguf_bytes(gguf_string("a") + struct.pack("<IIQ", 9, 8, 1 << 60)), "array 'a' of 1152921504606846976 items"),
        (b"GGUF\x03\x00", "truncated header"),
    ],
)
def test_crafted_gguf_headers_fail_in_one_line(tmp_path: Path, blob: bytes, reason: str) -> None:
    """Issue 28 (11): crafted headers gave tracebacks (huge key length, unknown value type,
    truncated header)."""
    path = tmp_path / "m.gguf"
    path.write_bytes(blob)
    with pytest.raises(MlsaeError) as e:
        chk.gguf_dims(path)
    line = str(e.value)
    assert line.startswith(f"model: {path}: malformed GGUF header (") and reason in line and "\n" not in line


def test_crafted_gguf_fails_the_check_stage_in_one_line(
    tmp_path: Path, text_corpus: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.gguf").write_bytes(gguf_bytes(struct.pack("<Q", 1 << 62)))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(check_params(text_corpus, model=str(tmp_path / "m.gguf"))))
    line = in_stage("check", lambda: chk.check("params.yaml", C.CORPUS_MANIFEST), capsys)
    assert line.startswith("error: check: model: ") and "malformed GGUF header" in line


def test_jsonl_line_with_a_lone_surrogate_is_one_line_naming_the_line(tmp_path: Path, tiny_params: Any) -> None:
    """Issue 28 (11): "\\ud800" in a JSONL text crashed the tokenizer with a traceback."""
    path = tmp_path / "c.jsonl"
    good = json.dumps({"text": "plain text " * 200})
    path.write_text(f"{good}\n{good}\n" + '{"text": "bad \\ud800 text"}\n')
    with pytest.raises(MlsaeError, match=rf"^{path}:3: 'text' holds an unpaired surrogate '\\ud800' at character 4"):
        list(corpus.iter_documents(str(path)))
    with pytest.raises(MlsaeError, match=rf"^{path}:3: 'text' holds an unpaired surrogate"):
        run_extract(
            tiny_params(data__source=str(path), data__context=32, data__train_tokens=4096, data__eval_tokens=64),
            tmp_path / "a.zarr",
        )


def test_garbled_parquet_names_the_file_and_reason(tmp_path: Path) -> None:
    """Issue 28 (11): a garbled parquet printed `error: extract: OSError` (no file, no reason)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(
        pa.table({"text": [f"document number {i} " * 50 for i in range(3000)]}),
        path,
        row_group_size=1000,
        compression="snappy",
    )
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # a data page: the footer still parses
    path.write_bytes(bytes(data))
    with pytest.raises(MlsaeError, match=rf"^{path}: cannot read as Parquet \(OSError: Corrupt snappy"):
        list(corpus.iter_documents(str(path)))


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),
    ],
)
def test_model_cache_on_a_full_disk_is_one_line_naming_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """Issue 28 (11): the model cache on a full disk gave a traceback (safetensors writes through
    Rust, so the disk-full error names no path)."""
    import safetensors.torch

    from mlsae.models import gguf_cache
    from mlsae.models.tiny import build_tiny

    monkeypatch.setenv("MLSAE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"stands for a GGUF: its hash keys the cache")
    monkeypatch.setattr(gguf_cache, "dequantise", lambda p: build_tiny("tiny-llama")[:2])

    def full(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(MlsaeError) as e:
        gguf_cache.load_gguf(path)
    line = str(e.value)
    assert line.startswith(
        f"model cache {tmp_path / 'cache' / 'converted'}: disk full while writing the de-quantised model.gguf"
    )
    assert "MLSAE_CACHE" in line
    assert [p.name for p in (tmp_path / "cache" / "converted").iterdir()] == []  # no half-written directory


def test_disk_full_line_names_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Issue 28 (11): the disk-full line named no path when the library's error carried none."""

    def full(self: Path, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # no file name, as from a C library

    monkeypatch.setattr(Path, "write_bytes", full)
    line = in_stage("train", lambda: write_json(tmp_path / "m.json", {"a": 1}), capsys)
    assert line == f"error: train: {tmp_path / 'm.json'}: disk full"


def test_out_of_memory_is_one_line(capsys: pytest.CaptureFixture) -> None:
    def boom() -> None:
        raise MemoryError

    assert in_stage("extract", boom, capsys).startswith("error: extract: out of memory")


EXP_SHOW_BAD = {
    "not JSON": b"[{",
    "not UTF-8": b'[{"rev": "\xff\xfe"}]',
    "an object, not rows": b'{"rev": "workspace"}',
    "rows without rev": b'[{"Experiment": "k8", "sae.k": 8}]',
    "rows not mappings": b"[1, 2]",
    "DVC 2.x layout": b'{"workspace": {"baseline": {"data": {}}}}',
    "a number": b"5",
}


@pytest.mark.parametrize("case", sorted(EXP_SHOW_BAD))
def test_compare_with_malformed_json_is_one_line_naming_the_file(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Issue 28 (11): `mlsae compare` on malformed JSON gave a traceback."""
    from mlsae.compare.experiments import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "show.json").write_bytes(EXP_SHOW_BAD[case])
    with pytest.raises(SystemExit) as e:
        main(out=None, json_file=Path("show.json"), all_commits=False, run=None)
    assert e.value.code == 1
    line = one_line(capsys)
    assert line.startswith("error: compare: show.json: "), line
    assert not (tmp_path / "reports").exists()


def test_compare_runs_with_malformed_metrics_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from mlsae.compare.experiments import main

    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        (tmp_path / name / "metrics").mkdir(parents=True)
        (tmp_path / name / "tables").mkdir()
        (tmp_path / name / "tables" / "summary.csv").write_text("model\nm\n")
        for stage_name in ("extract", "eval", "analysis"):
            (tmp_path / name / "metrics" / f"{stage_name}.json").write_text("[1, 2]")
    with pytest.raises(SystemExit):
        main(out=None, json_file=None, all_commits=False, run=[Path("a"), Path("b")])
    assert "expected a JSON object of metrics" in one_line(capsys)
    (tmp_path / "a" / "tables" / "summary.csv").write_bytes(b"\x00\xff garbage")
    with pytest.raises(SystemExit):
        main(out=None, json_file=None, all_commits=False, run=[Path("a"), Path("b")])
    assert "summary.csv: not a summary table" in one_line(capsys)


# --------------------------------------------------------------------------------------------
# 12. mlsae compare writes outside every stage's outputs


def dvc_outputs() -> set[str]:
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs: set[str] = set()
    for spec in pipeline.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in spec.get(kind) or []:
                outs.update(entry if isinstance(entry, dict) else [entry])
    return outs


def test_compare_writes_outside_every_stage_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Issue 28 (12): the table went to reports/tables/, the report stage's output: `dvc status`
    saw the report changed and the next `dvc repro` deleted the table."""
    from test_report import EXP_SHOW_JSON

    from mlsae.compare.experiments import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "show.json").write_text(EXP_SHOW_JSON)
    main(out=None, json_file=Path("show.json"), all_commits=False, run=None)
    written = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "reports").rglob("*") if p.is_file())
    assert written == ["reports/compare/experiments.csv", "reports/compare/experiments.md"]
    for path in written:
        assert not any(path == o or path.startswith(o.rstrip("/") + "/") for o in dvc_outputs()), path
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(out=Path("reports/tables/experiments.md"), json_file=Path("show.json"), all_commits=False, run=None)
    assert "pipeline output reports/tables" in one_line(capsys)
    assert not (tmp_path / "reports" / "tables").exists()


# --------------------------------------------------------------------------------------------
# 13. analysis.min_count leaving no latent


def test_min_count_above_every_latents_count_is_an_error_naming_it(tmp_path: Path) -> None:
    """Issue 28 (13): exit 0 with empty headline metrics and no note."""
    from test_analysis import HAND_INDICES, HAND_SPECIAL, HAND_VALUES, N_LATENTS, make_store

    from mlsae.analysis.aggregate import aggregate

    path = make_store(tmp_path / "s.zarr", HAND_INDICES, HAND_VALUES, HAND_SPECIAL, n_latents=N_LATENTS)
    with pytest.raises(
        MlsaeError, match=r"^analysis.min_count: 10 leaves no latent .*lower analysis.min_count to at most 4"
    ):
        aggregate(path, tmp_path / "analysis", tmp_path / "analysis.json", AnalysisParams(min_count=10))
    assert not (tmp_path / "analysis").exists() and not (tmp_path / "analysis.json").exists()
    # (the store holds 3 documents: min_documents at most that, so that min_count alone decides)
    counted = aggregate(
        path, tmp_path / "analysis", tmp_path / "analysis.json", AnalysisParams(min_count=4, min_documents=1)
    )
    assert counted["n_latents_counted"] == 1
