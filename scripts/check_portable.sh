#!/usr/bin/env bash
# Build the Cython kernels the portable way (FASTOPS_PORTABLE=1: x86-64-v3, AVX2 + FMA, no
# AVX-512) in a scratch copy of the tracked files and run the Cython tests against it, so the
# AVX2 micro-kernels — which a -march=native build on an AVX-512 machine never compiles — stay
# correct. Needs the .venv made by scripts/setup.sh. Skips on CPUs without AVX2/FMA.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
if ! grep -qw avx2 /proc/cpuinfo || ! grep -qw fma /proc/cpuinfo; then
    echo "check_portable: this CPU lacks AVX2/FMA; portable build not tested"; exit 0
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$tmp"
cd "$tmp"
ln -s ../kernels fastops/kernels  # import fastops.kernels from this copy, not the editable one
FASTOPS_PORTABLE=1 "$root/.venv/bin/python" setup.py -q build_ext --inplace >build.log 2>&1 \
    || { tail -30 build.log; exit 1; }
"$root/.venv/bin/python" - <<'PY'
import fastops.kernels.cython._build_isa as isa, fastops.kernels.cython.matmul as m, os
assert os.getcwd() in m.__file__, m.__file__
assert "avx512f" not in isa.REQUIRED_CPU_FLAGS and "avx2" in isa.REQUIRED_CPU_FLAGS, isa.REQUIRED_CPU_FLAGS
print("portable build:", isa.MARCH_FLAGS, "->", m.__file__)
PY
"$root/.venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_cython_kernels.py \
    tests/test_correctness.py tests/test_api.py -k cython
