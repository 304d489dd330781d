#!/usr/bin/env bash
# Create .venv with torch 2.13.0 (the build pip finds: see below) and install stablesr (plus extras given as arguments,
# e.g. "test").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first, pinned. Which build pip takes depends on the index it is configured with (PyPI on Linux x86-64: the
# CUDA build; a CPU wheel index: the CPU build). TORCH_PIP_ARGS passes extra options, e.g. --index-url of PyTorch's
# CPU wheels.
# shellcheck disable=SC2086
.venv/bin/pip install --quiet --disable-pip-version-check ${TORCH_PIP_ARGS:-} "torch==2.13.0"
extras=${1:-}
if [ -n "$extras" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[${extras}]"
else
  .venv/bin/pip install --quiet --disable-pip-version-check -e .
fi
