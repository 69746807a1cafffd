#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs on the GPU image beyond what it holds: mlsae.sae.trainer
# imports the activation store (zarr), and zarr needs numcodecs, donfig and google-crc32c. Pinned as
# in constraints.txt, for the image's CPython 3.12 on x86-64 Linux, into .whl/ (git-ignored; the run
# carries it). Usage: bash benchmarks/gpu_wheels.sh   (PYTHON=.venv/bin/python to pick the pip)
set -euo pipefail; cd "$(dirname "$0")/.."; "${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(grep -E '^(zarr|numcodecs|donfig|google-crc32c)==' constraints.txt)
