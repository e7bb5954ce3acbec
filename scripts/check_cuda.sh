#!/usr/bin/env bash
# Compile-check every CUDA source in kernels/cuda, with no GPU:
#  1. nvcc, for sm_80 (PTX) and sm_90 (cubin, no register spills), with exactly the -D defines
#     the CuPy loader uses (its BUILD_VARIANTS): tests/test_cuda.py::test_nvcc_compiles.
#  2. NVRTC, the runtime compiler CuPy itself uses on a GPU machine (RawModule), which lacks
#     nvcc's host headers: tests/test_cuda.py::test_nvrtc_compiles. Its wheels (the `nvrtc`
#     extra in pyproject.toml: cupy-cuda13x + nvidia-cuda-nvrtc) are installed into .venv here.
# Each step fails if its tests were skipped while the tool is available. Needs the .venv
# (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp); trap 'rm -f "$log"' EXIT
if ! command -v nvcc >/dev/null 2>&1; then
    echo "check_cuda: nvcc not found, CUDA sources NOT compile-checked by nvcc"
else
    .venv/bin/python -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py \
        -k "nvcc_compiles or every_cuda_source" | tee "$log"
    if grep -q "skipped" "$log"; then
        echo "check_cuda: nvcc is installed but compile checks were skipped"; exit 1
    fi
fi
# The extra's requirements straight from pyproject.toml (pip install -e ".[nvrtc]" would rebuild
# the Cython extensions of the editable install for nothing).
reqs=$(.venv/bin/python - <<'PY'
import re
text = open("pyproject.toml").read()
print(" ".join(re.findall(r'"([^"]+)"', re.search(r"^nvrtc = \[(.*)\]$", text, re.M).group(1))))
PY
)
echo "== NVRTC compile check (the nvrtc extra: $reqs)"
# shellcheck disable=SC2086 # a list of requirement words
.venv/bin/python -m pip install -q $reqs
.venv/bin/python -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py -k "nvrtc_compiles" \
    | tee "$log"
if grep -q "skipped" "$log"; then
    echo "check_cuda: the NVRTC wheels are installed but the NVRTC checks were skipped"; exit 1
fi
