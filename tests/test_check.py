"""The check stage (issue 16): params problems found before DVC deletes anything, the corpus
manifest that reruns extract when a corpus file's content changes, the params.yaml trap notice,
degenerate evaluate inputs, non-finite metrics, and a fast failure for an unreachable hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mlsae import check as chk
from mlsae.core.errors import MlsaeError
from mlsae.core.io import write_json
from mlsae.core.params import parse_params

ROOT = Path(__file__).resolve().parents[1]


def params(corpus: Path, **sections) -> dict:
    raw = {
        "model": "tiny-llama",
        "data": {"source": str(corpus), "context": 64, "train_tokens": 1024, "eval_tokens": 256},
        "evaluate": {"tokens": 128},
        "sae": {"dead_tokens": 256},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def rejected(raw: dict) -> str:
    with pytest.raises(MlsaeError) as e:
        chk.validate(parse_params(raw))
    return str(e.value)


# --- cross-param checks ------------------------------------------------------------------------


def test_one_token_context_is_rejected_by_params():
    with pytest.raises(MlsaeError, match=r"^data.context: input should be greater than or equal to 2 \(got 1\)$"):
        parse_params({"data": {"context": 1}})


def test_evaluate_tokens_above_the_eval_split_names_both_numbers(text_corpus):
    # eval split: ceil(200 / 64) = 4 contexts = 256 tokens; asking for 257 is an error, 256 is fine
    line = rejected(params(text_corpus, data={"eval_tokens": 200}, evaluate={"tokens": 257}))
    assert line.startswith("evaluate.tokens: 257") and "256 tokens" in line
    chk.validate(parse_params(params(text_corpus, data={"eval_tokens": 200}, evaluate={"tokens": 256})))


def test_dead_window_at_or_beyond_the_run_is_refused_up_front(text_corpus):
    line = rejected(params(text_corpus, data={"train_tokens": 1000}, train={"epochs": 2}, sae={"dead_tokens": 2000}))
    assert line.startswith("sae.dead_tokens: 2000") and "2000 tokens" in line and "train.epochs 2" in line
    chk.validate(
        parse_params(params(text_corpus, data={"train_tokens": 1000}, train={"epochs": 2}, sae={"dead_tokens": 1999}))
    )
    chk.validate(parse_params(params(text_corpus, data={"train_tokens": 1000}, sae={"dead_tokens": 5000, "auxk": 0})))


def test_auto_values_resolve_as_documented(text_corpus):
    """sae.dead_tokens: auto is an eighth of the run's tokens, always inside the run;
    evaluate.tokens: auto is the lesser of 2048 and the eval split, always inside the split."""
    from mlsae.evaluation.sample import resolve_tokens
    from mlsae.sae.config import resolve_dead_tokens

    for train_tokens, epochs in ((1000, 1), (1000, 2), (65536, 1), (9, 1)):
        p = parse_params(
            params(
                text_corpus, data={"train_tokens": train_tokens}, train={"epochs": epochs}, sae={"dead_tokens": "auto"}
            )
        )
        assert resolve_dead_tokens(p.sae.dead_tokens, train_tokens * epochs) == max(1, train_tokens * epochs // 8)
        chk.check_auxk_window(p)
    for eval_tokens, expected in ((200, 256), (1024, 1024), (5000, 2048)):  # the split: whole contexts of 64
        p = parse_params(params(text_corpus, data={"eval_tokens": eval_tokens}, evaluate={"tokens": "auto"}))
        assert resolve_tokens(p.evaluate.tokens, chk.eval_split_tokens(p), 64) == expected
        chk.check_evaluate_tokens(p)


def test_a_small_run_needs_no_other_flag(text_corpus):
    """params.yaml's defaults with only `data.train_tokens=4096 data.eval_tokens=1024` (on the tiny
    model) pass every check: the auto values follow the smaller run; the old fixed values did not."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"] = "tiny-llama"
    raw["data"].update(train_tokens=4096, eval_tokens=1024)
    p = parse_params(raw)
    assert (p.sae.dead_tokens, p.evaluate.tokens) == ("auto", "auto")
    chk.validate(p)
    # what auto replaced: the default run's fixed values would refuse this run
    for section, key, value in (("sae", "dead_tokens", 8192), ("evaluate", "tokens", 2048)):
        fixed = {**raw, section: {**raw[section], key: value}}
        assert rejected(fixed).startswith(f"{section}.{key}: {value}")


def test_model_dimension_checks_for_the_tiny_model(text_corpus):
    # tiny-llama: 4 blocks, d_model 64 (mlsae.models.tiny.SIZES)
    line = rejected(params(text_corpus, sae={"expansion": 1, "k": 65}))
    assert line == (
        "sae.k: 65 is more than the SAE's n_latents = sae.expansion x d_model = 1 x 64 = 64; lower sae.k "
        "or raise sae.expansion"
    )
    chk.validate(parse_params(params(text_corpus, sae={"expansion": 1, "k": 64})))
    assert rejected(params(text_corpus, sae={"layers": [4]})).startswith("sae.layers: index 4 out of range")
    assert "maximum context" in rejected(params(text_corpus, data={"context": 257}, evaluate={"tokens": 64}))
    assert rejected(params(text_corpus, model="no-such-model")).startswith("model: unknown model")


def test_float16_is_refused_for_a_model_known_to_overflow_it(text_corpus):
    line = rejected(params(text_corpus, model="gemma3-270m", extract={"dtype": "float16"}))
    assert line.startswith("extract.dtype: float16 cannot hold gemma3-270m's residuals") and "bfloat16" in line
    chk.validate(parse_params(params(text_corpus, model="gemma3-270m", extract={"dtype": "bfloat16"})))
    chk.validate(parse_params(params(text_corpus, extract={"dtype": "float16"})))  # tiny-llama fits


def test_lens_path_and_corpus_must_exist(tmp_path, text_corpus):
    line = rejected(params(text_corpus, lens="pretrained", lens_path=str(tmp_path / "nope")))
    assert line.startswith("lens_path:")
    assert "no such file" in rejected(params(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text("  \n\n")
    assert "corpus is empty" in rejected(params(tmp_path / "blank.txt"))


def test_gguf_dims_reads_only_the_header(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])  # a string array before the dims
    w.add_array("tokenizer.ggml.scores", [0.5, 1.5, 2.5])
    w.add_block_count(7)
    w.add_embedding_length(48)
    w.add_context_length(99)
    w.add_tensor("t", np.zeros((2, 3), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert chk.gguf_dims(path) == chk.ModelDims(7, 48, 99)


def test_local_hf_dir_dims(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"num_hidden_layers": 3, "hidden_size": 32, "max_position_embeddings": 128})
    )
    assert chk.model_dims(str(tmp_path)) == chk.ModelDims(3, 32, 128)


# --- corpus manifest ---------------------------------------------------------------------------


def test_manifest_follows_content_not_path_and_is_stable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c").mkdir()
    for name, text in (("b.txt", "second document " * 20), ("a.txt", "first document " * 20)):
        (tmp_path / "c" / name).write_text(text)
    out = tmp_path / "data" / "corpus.json"
    assert chk.write_manifest("c", out)
    first = out.read_bytes()
    manifest = json.loads(first)
    assert [f["path"] for f in manifest["files"]] == ["c/a.txt", "c/b.txt"]
    import hashlib

    assert manifest["files"][0]["sha256"] == hashlib.sha256((tmp_path / "c/a.txt").read_bytes()).hexdigest()
    assert not chk.write_manifest("c", out) and out.read_bytes() == first  # unchanged: not rewritten
    (tmp_path / "c" / "a.txt").write_text("FIRST document " * 20)  # same size, new content
    assert chk.write_manifest("c", out) and out.read_bytes() != first


def test_embedded_and_hf_manifests():
    a, b = chk.corpus_manifest("embedded:python-docs"), chk.corpus_manifest("embedded:python-docs")
    assert a == b and a["python"] == sys.version.split()[0] and len(a["topics_sha256"]) == 64
    assert chk.corpus_manifest("hf:wikitext:wikitext-2-raw-v1") == {"source": "hf:wikitext:wikitext-2-raw-v1"}


# --- params.yaml trap --------------------------------------------------------------------------


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_params_drift_names_keys_and_the_restore_command_works(tmp_path):
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "ci@example.invalid")
    git(tmp_path, "config", "user.name", "ci")
    committed = "model: smollm2-135m        # name\nsae:\n  k: 32\n"
    (tmp_path / "params.yaml").write_text(committed)
    assert chk.params_drift(tmp_path / "params.yaml") == {}
    git(tmp_path, "add", "params.yaml")
    git(tmp_path, "commit", "-qm", "p")
    (tmp_path / "params.yaml").write_text("model: pythia-70m          # name\nsae:\n  k: 32\n")
    drift = chk.params_drift(tmp_path / "params.yaml")
    assert drift == {"model": ("pythia-70m", "smollm2-135m")}
    line = chk.drift_notice(drift)
    assert line.count("\n") == 0 and 'model="pythia-70m" (HEAD: "smollm2-135m")' in line
    assert chk.RESTORE_PARAMS in line
    subprocess.run(chk.RESTORE_PARAMS, shell=True, cwd=tmp_path, check=True)
    assert (tmp_path / "params.yaml").read_text() == committed


def test_no_drift_outside_git(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    assert chk.params_drift(tmp_path / "params.yaml") == {}


# --- finite metrics ----------------------------------------------------------------------------


def test_non_finite_metric_is_an_error_naming_the_key(tmp_path):
    path = tmp_path / "eval.json"
    with pytest.raises(MlsaeError, match=r"eval.json: kl_by_layer\[1\] is nan"):
        write_json(path, {"fvu": 0.5, "kl_by_layer": [0.1, float("nan")]})
    with pytest.raises(MlsaeError, match=r"fvu is inf"):
        write_json(path, {"fvu": float("inf")})
    assert not path.exists()
    write_json(path, {"fvu": 0.5, "undefined": None})
    assert json.loads(path.read_text()) == {"fvu": 0.5, "undefined": None}


# --- degenerate evaluate input -----------------------------------------------------------------


class _Reader:
    """A stand-in activation store whose eval tokens are all special (one-token documents)."""

    path = "data/activations.zarr"
    attrs = {"context": 4}

    def __init__(self):
        self.tokens = np.zeros(8, dtype=np.int32)

    def n_tokens(self, split):
        return 8

    def split(self, name):
        return {"tokens": self.tokens}

    def meta(self, split, key):
        return np.ones(8, dtype=bool)


def test_evaluate_with_every_position_masked_gives_one_line():
    """Every position special (one-token documents): no next-token target, one clear line."""
    import torch

    from mlsae.evaluation.downstream import mean_ablation, splice_sums
    from mlsae.evaluation.reconstruction import reconstruction
    from mlsae.evaluation.sample import SplicedSample
    from mlsae.lens.tuned import Lens
    from mlsae.models.registry import load_model
    from mlsae.sae.model import MLSAE, SAEConfig

    model = load_model("tiny-llama", "cpu")
    sae = MLSAE(SAEConfig(d_model=64, n_latents=128, k=2, layers=[0]))
    masked = np.ones((2, 4), dtype=bool)
    sample = SplicedSample(
        contexts=np.arange(2),
        tokens=np.ones((2, 4), dtype=np.int32),
        special=masked,
        excluded=masked,
        document=np.zeros((2, 4), dtype=np.int64),
    )
    for replacements in (
        {"recon": reconstruction(sae, Lens.identity(4, 64))},
        {"mean": mean_ablation(torch.zeros(1, 64))},
    ):
        with pytest.raises(MlsaeError, match=r"^no position has a next-token target") as e:
            splice_sums(model, sample, [0], replacements, 2, progress=False)
        assert "\n" not in str(e.value)


# --- offline hub -------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9", "http://10.255.255.1:9"])
def test_unreachable_hub_fails_fast_with_the_offline_hint(tmp_path, endpoint):
    """A closed port and a black-holed address: the hub is unreachable either way (retries
    used to take about a minute)."""
    code = (
        "import time\nfrom mlsae.models.registry import load_model\nfrom mlsae.core.errors import MlsaeError\n"
        "t = time.perf_counter()\ntry:\n    load_model('EleutherAI/pythia-70m')\nexcept MlsaeError as e:\n"
        "    print(round(time.perf_counter() - t, 2)); print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    seconds, message = proc.stdout.strip().splitlines()[:2]
    assert float(seconds) <= 5.0, proc.stdout
    assert "not available offline" in message and "offline alternatives" in message


# --- end to end: DVC ---------------------------------------------------------------------------


def run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.mark.slow
def test_dvc_corpus_edit_reruns_extract_and_bad_params_delete_nothing(tmp_path, text_corpus):
    repo = tmp_path
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("stages", "mlsae"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(text_corpus, repo / "corpus")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"] = "tiny-llama"
    raw["data"].update(source="corpus", context=32, train_tokens=1024, eval_tokens=256)
    raw["train"].update(batch_tokens=128, shuffle_buffer_tokens=512, geometric_median_sample=256)
    raw["evaluate"]["tokens"] = 64
    raw["sae"]["dead_tokens"] = 256
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "ci@example.invalid")
    run(repo, "git", "config", "user.name", "ci")
    run(repo, "dvc", "init", "-q")
    assert ran(run(repo, "dvc", "repro", "train").stdout) == {"check", "extract", "lens", "train"}
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline")
    committed = (repo / "params.yaml").read_text()
    # unchanged corpus: only check runs
    out = run(repo, "dvc", "repro", "train").stdout
    assert ran(out) == {"check"} and "Stage 'extract' didn't change" in out
    # 1. a corpus file's content changes (not its path): extract reruns
    doc = sorted((repo / "corpus").iterdir())[0]
    doc.write_text(doc.read_text().upper())
    assert "extract" in ran(run(repo, "dvc", "repro", "extract").stdout)
    # 4. a rejected param deletes nothing: check fails before DVC removes train's outputs
    before = {
        p: (repo / p).read_bytes()
        for p in (
            "reports/metrics/extract.json",
            "reports/metrics/train.json",
            "reports/plots/train.csv",
            "data/sae/sae.safetensors",
        )
    }
    for bad in ("sae.k=100000", "data.context=1", "evaluate.tokens=100000"):
        proc = run(repo, "dvc", "exp", "run", "-S", bad, check=False)
        assert proc.returncode != 0
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: check: ")]
        assert len(errors) == 1 and bad.split("=")[0] in errors[0], proc.stderr[-2000:]
        assert {p: (repo / p).read_bytes() for p in before} == before
        # 5. the params.yaml trap: the failed value stays; check names it and the fix works
        proc = run(repo, sys.executable, "stages/check.py", check=False)
        assert f"{bad.split('=')[0]}=" in proc.stderr and chk.RESTORE_PARAMS in proc.stderr
        run(repo, "sh", "-c", chk.RESTORE_PARAMS)
        assert (repo / "params.yaml").read_text() == committed
