#!/usr/bin/env bash
# Compile-check every CUDA source in kernels/cuda with nvcc for sm_80 and sm_90 (PTX only,
# no GPU needed). Fails on any compile error. Skips, loudly, when nvcc is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
    echo "check_cuda: nvcc not found, CUDA sources NOT compile-checked"; exit 0
fi
shopt -s nullglob
files=(kernels/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "check_cuda: no .cu files"; exit 0; fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for f in "${files[@]}"; do
    for arch in sm_80 sm_90; do
        nvcc --ptx -arch="$arch" -std=c++17 -Ikernels/cuda -o "$tmp/$(basename "$f" .cu).$arch.ptx" "$f"
        echo "ok  $f ($arch)"
    done
done
