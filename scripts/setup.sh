#!/usr/bin/env bash
# Create .venv with the CPU build of torch 2.13.0 and install stablesr (plus extras given as arguments, e.g. "test").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build; 2.13.0 is the CPU wheel.
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
extras=${1:-}
if [ -n "$extras" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[${extras}]"
else
  .venv/bin/pip install --quiet --disable-pip-version-check -e .
fi
