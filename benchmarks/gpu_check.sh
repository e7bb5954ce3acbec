#!/usr/bin/env bash
# GPU check of the CUDA (cupy) backend, for a machine with an NVIDIA GPU, CuPy and (optionally)
# PyTorch and nvcc: runs tests/test_cuda.py (its GPU and NVRTC layers), then
# benchmarks/gpu_bench.py (the ladders, and the sweep over the warptiled stage's candidate
# tiles at the largest matmul size), in at most TEST_TIMEOUT + BENCH_TIMEOUT (7 minutes).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default: $OUT, else ./gpu-out
#
# Writes to OUT_DIR: env.txt (nvidia-smi, versions), pytest.log, bench.log, report.json,
# report.md. Needs no network and builds nothing: fastops is staged into a temporary folder
# with kernels/ placed at fastops/kernels (what setup.py's package_dir does when installing),
# so the Cython extension need not build there. Environment knobs: PYTHON (default python3),
# TEST_TIMEOUT (s, default 150), BENCH_TIMEOUT (s, default 270), BENCH_ARGS (extra arguments
# for gpu_bench.py, e.g. "--sizes 1024 --batch 2" or "--skip-sweep"), TEST_SELECT (pytest -k
# expression; default: leave out the nvcc and CPU-emulation layers, see below; "" runs all).
# Exit status: 0 when tests and benchmark passed, 2 when there is no GPU, 1 otherwise.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT_DIR=${1:-${OUT:-$REPO/gpu-out}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=$(command -v "${PYTHON:-python3}") || { echo "no ${PYTHON:-python3} on PATH"; exit 1; }
case "$PY" in /*) ;; *) PY="$PWD/$PY" ;; esac
export PYTHONUNBUFFERED=1 CUPY_TF32=0 PYTHONDONTWRITEBYTECODE=1

STAGE=$(mktemp -d "${TMPDIR:-/tmp}/fastops-gpu.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
cp -r "$REPO/fastops" "$STAGE/fastops"
rm -rf "$STAGE/fastops/kernels"
cp -r "$REPO/kernels" "$STAGE/fastops/kernels"
cp -r "$REPO/tests" "$REPO/benchmarks" "$STAGE/"
cp "$REPO/pyproject.toml" "$STAGE/"

{
    echo "## nvidia-smi"; nvidia-smi 2>&1 || echo "(no nvidia-smi)"
    echo "## nvcc"; nvcc --version 2>&1 || echo "(no nvcc)"
    echo "## python"
    "$PY" - <<'EOF' 2>&1
import sys
print(sys.version)
for name in ("numpy", "cupy", "torch", "pytest"):
    try:
        module = __import__(name)
        print(name, module.__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "missing:", exc)
try:
    import cupy
    print("cupy.cuda.is_available():", cupy.cuda.is_available())
except Exception as exc:  # noqa: BLE001
    print("cupy:", exc)
EOF
} >"$OUT_DIR/env.txt"
cat "$OUT_DIR/env.txt"

# Run from the staged copy (cwd first on sys.path), so `import fastops` finds the staged package.
cd "$STAGE" || exit 1
echo "== tests/test_cuda.py"
# The nvcc compile check and the CPU emulation need no GPU and run in CI (scripts/test.sh,
# scripts/check_cuda.sh); with one compile per warptile candidate they cost tens of seconds
# that a GPU session, short and scarce, spends better on the GPU-only layers.
TEST_SELECT=${TEST_SELECT-not nvcc_compiles and not emulated}
timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    ${TEST_SELECT:+-k "$TEST_SELECT"} 2>&1 | tee "$OUT_DIR/pytest.log"
test_rc=${PIPESTATUS[0]}

echo "== benchmarks/gpu_bench.py"
# shellcheck disable=SC2086 # BENCH_ARGS is a list of words on purpose
timeout "${BENCH_TIMEOUT:-270}" "$PY" benchmarks/gpu_bench.py --out "$OUT_DIR" ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT_DIR/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "== tests exit $test_rc, benchmark exit $bench_rc; reports in $OUT_DIR"
if [ "$bench_rc" -eq 2 ]; then
    echo "no GPU: see $OUT_DIR/report.md"
    exit 2
fi
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && exit 0
exit 1
