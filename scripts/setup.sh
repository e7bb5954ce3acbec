#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install fastops into it,
# editable, building the Cython kernels for this CPU. Usage: scripts/setup.sh [EXTRAS]
#   EXTRAS: comma-separated optional extras, e.g. "test" or "test,bench" (bench adds torch).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Build requirements first, then an editable install without isolation: the Cython build
# reuses them, and kernels/ stays importable as fastops.kernels from the checkout.
.venv/bin/python -m pip install -q "setuptools>=68" wheel "Cython>=3.0" "numpy>=1.26"
.venv/bin/python -m pip install -q --no-build-isolation -e ".[${extras}]"
