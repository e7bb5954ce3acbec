#!/usr/bin/env bash
# Compile-check every CUDA source in kernels/cuda with nvcc, for sm_80 (PTX) and sm_90 (cubin,
# no register spills), with exactly the -D defines the CuPy loader uses (its BUILD_VARIANTS).
# No GPU needed. The checks live in tests/test_cuda.py (test_nvcc_compiles); this script runs
# just them and fails if nvcc is installed but they did not run. Needs the .venv (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
    echo "check_cuda: nvcc not found, CUDA sources NOT compile-checked"; exit 0
fi
log=$(mktemp); trap 'rm -f "$log"' EXIT
.venv/bin/python -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
    -k "nvcc_compiles or every_cuda_source" | tee "$log"
if grep -q "skipped" "$log"; then
    echo "check_cuda: nvcc is installed but compile checks were skipped"; exit 1
fi
