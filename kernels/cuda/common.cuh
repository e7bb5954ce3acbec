// common.cuh: small helpers shared by every CUDA chapter of fastops.
//
// The sources are compiled at run time by NVRTC (through cupy.RawModule), so they include no
// system headers: everything a kernel needs is here or built into CUDA C++. The Python loader
// (kernels/cuda/_loader.py) pastes this file in place of `#include "common.cuh"`, and the
// nvcc compile check in tests/test_cuda.py compiles exactly that expanded text.
//
// Conventions for every kernel in this folder:
//   * arrays are C-contiguous (row-major) and validated in Python before any launch;
//   * sizes arrive as 32-bit ints (each dimension < 2^31), but element offsets are computed in
//     64 bits (`idx_t`), because a 4096 x 1048576 matrix has more than 2^31 elements;
//   * every kernel is bounds-checked: any size, including 1 and primes, is legal.
#pragma once

typedef long long idx_t;  // element offsets: products of two dimensions can pass 2^31

// Number of tiles of size `tile` needed to cover `n` (ceil division).
__device__ __forceinline__ int cdiv(int n, int tile) { return (n + tile - 1) / tile; }

// A ReLU that keeps NaN, as torch.relu: NaN > 0 is false, so test v != v explicitly.
// (A plain fmaxf(v, 0) would turn NaN into 0.)
template <typename T>
__device__ __forceinline__ T relu_keep_nan(T v) { return (v > T(0) || v != v) ? v : T(0); }
