#!/usr/bin/env bash
# Set up (with the optional PyTorch baseline) and run the main job: the quick benchmark report.
# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are unset for this command only, so NumPy's baseline
# runs OpenBLAS's native kernel for this CPU (the report records which kernel ran).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "test,bench"
exec env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/fastops bench --quick "$@"
