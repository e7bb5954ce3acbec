// matmul.cu: the float32 SGEMM ladder, C = A @ B, one kernel per stage, naive first.
//
//   A: (M, K)  B: (K, N)  C: (M, N)   float32, C-contiguous (row-major), validated in Python.
//
// The ladder follows Simon Boehm's "How to optimize a CUDA matmul kernel" (siboehm/SGEMM_CUDA):
// each kernel changes one thing, and the difference between two neighbours is the lesson.
// Unlike that tutorial, every kernel here is bounds-checked, so M, N and K may be anything
// (1, primes, non-multiples of every tile): tiles that overhang the matrix are zero-filled when
// loaded and masked when stored. The 128-bit (float4) paths need rows that start on 16-byte
// boundaries; the Python side passes `vec_*` flags saying whether they do (K % 4 == 0 for A,
// N % 4 == 0 for B and C, and aligned base pointers), and the kernels fall back to scalar
// accesses otherwise (the flag is uniform across the grid, so the branch never diverges).
//
// Tile sizes are compile-time constants set by the loader with -D defines (one source of truth:
// MATMUL_DEFINES and WARPTILES in kernels/cuda/_loader.py, which also compute the launch grids
// from them).
//
// Grid layout for every kernel: blockIdx.x walks row blocks of C, blockIdx.y column blocks
// (gridDim.x may reach 2^31 - 1, gridDim.y only 65535, and batched "linear layer" calls fold
// the batch into M, so M is the long side).
//
// Register use (nvcc 13.0 -arch=sm_90 -Xptxas -v; no spills anywhere, which the test
// tests/test_cuda.py::test_nvcc_compiles checks): naive 32, coalesced 32, smem 32,
// blocktiled 143 (1 block of 256 threads per SM), vectorized 109 (2 blocks per SM),
// warptiled 223 with the default tile (2 blocks of 128 threads per SM); the other candidate
// tiles' counts are noted beside them in _loader.WARPTILES.

#include "common.cuh"

#if !defined(TILE) || !defined(BT_BM) || !defined(WT_BM)
#error "compile through kernels/cuda/_loader.py, which sets the tile sizes with -D defines"
#endif

// ------------------------------------------------------------------------------------------
// Shared helpers: tile loads and fragment stores. Every stage from `smem` on uses them.
// ------------------------------------------------------------------------------------------

// Copy the ROWS x COLS tile of row-major `src` (rows x cols) whose corner is (r0, c0) into
// the shared array `dst` (ROWS x COLS, row-major), zero-filling what lies outside the matrix.
// Consecutive threads take consecutive columns, so a warp reads contiguous runs of a row.
template <int ROWS, int COLS, int NT>
__device__ __forceinline__ void load_tile(const float* __restrict__ src, int rows, int cols,
                                          int r0, int c0, float* __restrict__ dst)
{
    static_assert((ROWS * COLS) % NT == 0, "every thread copies the same number of elements");
#pragma unroll
    for (int i = 0; i < (ROWS * COLS) / NT; ++i) {
        const int e = threadIdx.x + i * NT;
        const int gr = r0 + e / COLS, gc = c0 + e % COLS;
        dst[e] = (gr < rows && gc < cols) ? src[(idx_t)gr * cols + gc] : 0.0f;
    }
}

// Four consecutive elements row[c .. c+3] of a row with `cols` elements: one 128-bit load when
// `vec` (row start 16-byte aligned, so c % 4 == 0 is too) and all four are inside, otherwise
// four masked scalar loads.
__device__ __forceinline__ float4 load4(const float* __restrict__ row, int c, int cols, bool vec)
{
    if (vec && c + 3 < cols) return *reinterpret_cast<const float4*>(row + c);
    float4 v;
    v.x = c + 0 < cols ? row[c + 0] : 0.0f;
    v.y = c + 1 < cols ? row[c + 1] : 0.0f;
    v.z = c + 2 < cols ? row[c + 2] : 0.0f;
    v.w = c + 3 < cols ? row[c + 3] : 0.0f;
    return v;
}

__device__ __forceinline__ void store4(float* __restrict__ row, int c, int cols, float4 v, bool vec)
{
    if (vec && c + 3 < cols) {
        *reinterpret_cast<float4*>(row + c) = v;
        return;
    }
    if (c + 0 < cols) row[c + 0] = v.x;
    if (c + 1 < cols) row[c + 1] = v.y;
    if (c + 2 < cols) row[c + 2] = v.z;
    if (c + 3 < cols) row[c + 3] = v.w;
}

// The BM x BK tile of A at (r0, k0) -> shared As stored transposed, As[k][m] (BK x BM), read
// from global memory 4 k-values at a time. Transposing makes the compute loop read a column
// of the A tile as contiguous floats, which the compiler turns into 128-bit shared loads.
template <int BM, int BK, int NT>
__device__ __forceinline__ void load_a_transposed4(const float* __restrict__ A, int M, int K,
                                                   int r0, int k0, float* __restrict__ As, bool vec)
{
    static_assert(BK % 4 == 0 && (BM * BK / 4) % NT == 0, "whole float4 chunks per thread");
#pragma unroll
    for (int i = 0; i < (BM * BK / 4) / NT; ++i) {
        const int e = threadIdx.x + i * NT;
        const int m = e / (BK / 4), kq = (e % (BK / 4)) * 4;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (r0 + m < M) v = load4(A + (idx_t)(r0 + m) * K, k0 + kq, K, vec);
        As[(kq + 0) * BM + m] = v.x;
        As[(kq + 1) * BM + m] = v.y;
        As[(kq + 2) * BM + m] = v.z;
        As[(kq + 3) * BM + m] = v.w;
    }
}

// The BK x BN tile of B at (k0, c0) -> shared Bs (BK x BN), 128-bit loads and stores.
template <int BK, int BN, int NT>
__device__ __forceinline__ void load_b4(const float* __restrict__ B, int K, int N, int k0, int c0,
                                        float* __restrict__ Bs, bool vec)
{
    static_assert(BN % 4 == 0 && (BK * BN / 4) % NT == 0, "whole float4 chunks per thread");
#pragma unroll
    for (int i = 0; i < (BK * BN / 4) / NT; ++i) {
        const int e = threadIdx.x + i * NT;
        const int k = e / (BN / 4), nq = (e % (BN / 4)) * 4;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (k0 + k < K) v = load4(B + (idx_t)(k0 + k) * N, c0 + nq, N, vec);
        *reinterpret_cast<float4*>(&Bs[k * BN + nq]) = v;
    }
}

// Store a TM x TN register fragment `acc` (row stride LD) at C[r0 .. r0+TM, c0 .. c0+TN],
// masking what falls outside the M x N matrix; 128-bit stores when `vec`.
template <int TM, int TN, int LD>
__device__ __forceinline__ void store_fragment(float* __restrict__ C, int M, int N, int r0, int c0,
                                               const float* acc, bool vec)
{
    static_assert(TN % 4 == 0, "fragments are stored 4 columns at a time");
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        if (r0 + i >= M) break;
        float* row = C + (idx_t)(r0 + i) * N;
#pragma unroll
        for (int j = 0; j < TN; j += 4) {
            const float4 v = make_float4(acc[i * LD + j], acc[i * LD + j + 1],
                                         acc[i * LD + j + 2], acc[i * LD + j + 3]);
            store4(row, c0 + j, N, v, vec);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Stage 1 · naive: one thread per element of C, threads numbered down the M axis.
//   Launch: block (32, 32), grid (cdiv(M, 32), cdiv(N, 32)).
//   Lesson: correct but memory-bound on the worst access pattern. threadIdx.x (the fastest
//   index inside a warp) walks *rows* of C, so the 32 threads of a warp read A at addresses
//   K floats apart and write C at addresses N floats apart: every access is its own 32-byte
//   transaction. Each element of A and B is re-read from global memory (L2 at best) by every
//   thread that needs it: 2*K loads per 2*K FLOPs.
// ------------------------------------------------------------------------------------------
extern "C" __global__ void matmul_naive(const float* __restrict__ A, const float* __restrict__ B,
                                        float* __restrict__ C, int M, int N, int K)
{
    const int row = blockIdx.x * blockDim.x + threadIdx.x;  // varies fastest in a warp: bad
    const int col = blockIdx.y * blockDim.y + threadIdx.y;
    if (row >= M || col >= N) return;
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) acc += A[(idx_t)row * K + k] * B[(idx_t)k * N + col];
    C[(idx_t)row * N + col] = acc;
}

// ------------------------------------------------------------------------------------------
// Stage 2 · coalesced: the same work, threads renumbered so a warp covers 32 columns of one row.
//   Launch: block (TILE*TILE,), grid (cdiv(M, TILE), cdiv(N, TILE)).
//   Changed: only the thread -> (row, col) mapping. Now the 32 threads of a warp share `row`
//   (their A load is one broadcast) and take 32 consecutive columns (their B loads and C
//   stores are one 128-byte transaction each): global memory coalescing.
//   Still lacks: data reuse; every FMA still needs two loads from L1/L2.
// ------------------------------------------------------------------------------------------
extern "C" __global__ void matmul_coalesced(const float* __restrict__ A, const float* __restrict__ B,
                                            float* __restrict__ C, int M, int N, int K)
{
    const int row = blockIdx.x * TILE + threadIdx.x / TILE;
    const int col = blockIdx.y * TILE + threadIdx.x % TILE;  // varies fastest in a warp: good
    if (row >= M || col >= N) return;
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) acc += A[(idx_t)row * K + k] * B[(idx_t)k * N + col];
    C[(idx_t)row * N + col] = acc;
}

// ------------------------------------------------------------------------------------------
// Stage 3 · smem: shared-memory tiling, TILE x TILE blocks of A and B staged on chip.
//   Launch: block (TILE*TILE,), grid (cdiv(M, TILE), cdiv(N, TILE)).
//   Changed: the block walks K in steps of TILE; each step copies a TILE x TILE tile of A and
//   of B into shared memory once (one element per thread, coalesced), then every thread runs
//   TILE FMAs out of shared memory. Global traffic drops by a factor TILE (32).
//   Bottleneck removed: global/L2 bandwidth. New bottleneck: shared-memory bandwidth, since
//   each FMA still issues two shared loads (one of them a broadcast) for one multiply-add.
//   Shared memory: 2 * 32*32*4 B = 8 KiB per block.
// ------------------------------------------------------------------------------------------
extern "C" __global__ void matmul_smem(const float* __restrict__ A, const float* __restrict__ B,
                                       float* __restrict__ C, int M, int N, int K)
{
    __shared__ float As[TILE * TILE];  // A[row0 .. +TILE, k0 .. +TILE]
    __shared__ float Bs[TILE * TILE];  // B[k0 .. +TILE, col0 .. +TILE]
    const int ty = threadIdx.x / TILE, tx = threadIdx.x % TILE;
    const int row0 = blockIdx.x * TILE, col0 = blockIdx.y * TILE;
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += TILE) {
        load_tile<TILE, TILE, TILE * TILE>(A, M, K, row0, k0, As);
        load_tile<TILE, TILE, TILE * TILE>(B, K, N, k0, col0, Bs);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < TILE; ++k) acc += As[ty * TILE + k] * Bs[k * TILE + tx];
        __syncthreads();  // the next iteration overwrites the tiles
    }
    if (row0 + ty < M && col0 + tx < N) C[(idx_t)(row0 + ty) * N + col0 + tx] = acc;
}

// ------------------------------------------------------------------------------------------
// Stage 4 · blocktiled: 2-D register blocking, each thread computes a BT_TM x BT_TN block of C.
//   Launch: block (BT_NT,), grid (cdiv(M, BT_BM), cdiv(N, BT_BN)).
//   Changed: a block now owns a BT_BM x BT_BN (128 x 128) tile of C with BT_NT = 256 threads,
//   so each thread accumulates TM x TN = 8 x 8 = 64 results in registers. Per k step a thread
//   loads TM values of A and TN values of B from shared memory into registers and does
//   TM*TN FMAs with them: 16 shared loads for 64 FMAs instead of 2 per FMA.
//   Bottleneck removed: shared-memory bandwidth; the kernel can now approach the FMA units.
//   Still lacks: 128-bit accesses (all loads are 32-bit); the A tile is read down a column
//   of shared memory (stride BK), which the compiler cannot vectorise.
//   Shared memory: (128*8 + 8*128) * 4 B = 8 KiB per block.
// ------------------------------------------------------------------------------------------
#define BT_NT ((BT_BM / BT_TM) * (BT_BN / BT_TN))

extern "C" __global__ void __launch_bounds__(BT_NT)
matmul_blocktiled(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
                  int M, int N, int K)
{
    __shared__ float As[BT_BM * BT_BK];  // A tile, row-major (BM x BK)
    __shared__ float Bs[BT_BK * BT_BN];  // B tile, row-major (BK x BN)
    const int trow = threadIdx.x / (BT_BN / BT_TN), tcol = threadIdx.x % (BT_BN / BT_TN);
    const int row0 = blockIdx.x * BT_BM, col0 = blockIdx.y * BT_BN;
    float acc[BT_TM * BT_TN] = {};
    float a_reg[BT_TM], b_reg[BT_TN];
    for (int k0 = 0; k0 < K; k0 += BT_BK) {
        load_tile<BT_BM, BT_BK, BT_NT>(A, M, K, row0, k0, As);
        load_tile<BT_BK, BT_BN, BT_NT>(B, K, N, k0, col0, Bs);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < BT_BK; ++k) {
#pragma unroll
            for (int i = 0; i < BT_TM; ++i) a_reg[i] = As[(trow * BT_TM + i) * BT_BK + k];
#pragma unroll
            for (int j = 0; j < BT_TN; ++j) b_reg[j] = Bs[k * BT_BN + tcol * BT_TN + j];
#pragma unroll
            for (int i = 0; i < BT_TM; ++i)
#pragma unroll
                for (int j = 0; j < BT_TN; ++j) acc[i * BT_TN + j] += a_reg[i] * b_reg[j];
        }
        __syncthreads();
    }
    store_fragment<BT_TM, BT_TN, BT_TN>(C, M, N, row0 + trow * BT_TM, col0 + tcol * BT_TN, acc,
                                        false);
}

// ------------------------------------------------------------------------------------------
// Stage 5 · vectorized: stage 4 with 128-bit (float4) global loads and stores, A transposed.
//   Launch: as blocktiled, plus vec_a, vec_b, vec_c flags (0/1) from Python.
//   Changed: tiles are copied with float4 loads (4 consecutive floats per instruction, a
//   quarter of the load instructions), the A tile is stored transposed (As[k][m]) so the
//   TM values a thread needs per k are contiguous and come in as two 128-bit shared loads,
//   and C is written with float4 stores.
//   Bottleneck removed: load/store instruction issue and strided shared reads of A.
//   Still lacks: warp-level tiling (a warp's accesses to shared memory are not arranged to
//   avoid bank conflicts and to reuse registers across the warp), double buffering of the
//   tiles (loads and FMAs of one block do not overlap), and tensor cores.
// ------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(BT_NT)
matmul_vectorized(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
                  int M, int N, int K, int vec_a, int vec_b, int vec_c)
{
    __shared__ __align__(16) float As[BT_BK * BT_BM];  // A tile transposed (BK x BM)
    __shared__ __align__(16) float Bs[BT_BK * BT_BN];  // B tile (BK x BN)
    const int trow = threadIdx.x / (BT_BN / BT_TN), tcol = threadIdx.x % (BT_BN / BT_TN);
    const int row0 = blockIdx.x * BT_BM, col0 = blockIdx.y * BT_BN;
    float acc[BT_TM * BT_TN] = {};
    float a_reg[BT_TM], b_reg[BT_TN];
    for (int k0 = 0; k0 < K; k0 += BT_BK) {
        load_a_transposed4<BT_BM, BT_BK, BT_NT>(A, M, K, row0, k0, As, vec_a);
        load_b4<BT_BK, BT_BN, BT_NT>(B, K, N, k0, col0, Bs, vec_b);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < BT_BK; ++k) {
#pragma unroll
            for (int i = 0; i < BT_TM; ++i) a_reg[i] = As[k * BT_BM + trow * BT_TM + i];
#pragma unroll
            for (int j = 0; j < BT_TN; ++j) b_reg[j] = Bs[k * BT_BN + tcol * BT_TN + j];
#pragma unroll
            for (int i = 0; i < BT_TM; ++i)
#pragma unroll
                for (int j = 0; j < BT_TN; ++j) acc[i * BT_TN + j] += a_reg[i] * b_reg[j];
        }
        __syncthreads();
    }
    store_fragment<BT_TM, BT_TN, BT_TN>(C, M, N, row0 + trow * BT_TM, col0 + tcol * BT_TN, acc,
                                        vec_c);
}

// ------------------------------------------------------------------------------------------
// Stage 6 · warptiled: a third level of tiling between the block and the thread: the warp.
//   Launch: block (WT_NT,), grid (cdiv(M, WT_BM), cdiv(N, WT_BN)), vec flags as stage 5.
//   Changed: the WT_BM x WT_BN block tile is split into WT_WM x WT_WN warp tiles (one per
//   warp); a warp covers its tile in WMITER x WNITER sub-tiles, and inside a sub-tile each
//   lane owns a TM x TN fragment. Lanes of a warp read neighbouring shared addresses (fewer
//   bank conflicts), each register value loaded from shared memory feeds TN*WNITER (or
//   TM*WMITER) FMAs, and the warp's working set maps onto the register file explicitly.
//   BK doubles to 16 so each __syncthreads pair buys twice the arithmetic.
//   Bottleneck removed: shared-memory bank conflicts and the sync overhead per FMA.
//   Still lacks: double-buffered (cp.async / TMA) tile loads that overlap the FMAs, and tensor
//   cores (TF32 / wgmma), which is where a vendor library's remaining lead comes from.
//   Default tile (siboehm's A6000 setting, not tuned for the H200): 128 x 128 x 16, 64 x 64
//   warp tiles, 8 x 4 fragments; shared memory (16*128 + 16*128) * 4 B = 16 KiB per block;
//   128 threads, 128 results each. The tile is meant to be chosen by the sweep over
//   _loader.WARPTILES in benchmarks/gpu_bench.py, run on the target GPU; every candidate
//   satisfies _loader.check_warptile, which spells out what this kernel assumes of its tile.
// ------------------------------------------------------------------------------------------
#define WT_WMITER ((WT_WM * WT_WN) / (32 * WT_TM * WT_TN * WT_WNITER))
#define WT_WSUBM (WT_WM / WT_WMITER)
#define WT_WSUBN (WT_WN / WT_WNITER)

extern "C" __global__ void __launch_bounds__(WT_NT)
matmul_warptiled(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
                 int M, int N, int K, int vec_a, int vec_b, int vec_c)
{
    static_assert(WT_NT == 32 * (WT_BM / WT_WM) * (WT_BN / WT_WN), "one warp per warp tile");
    static_assert(WT_WMITER * WT_WSUBM == WT_WM && WT_WNITER * WT_WSUBN == WT_WN, "sub-tiles cover the warp tile");
    static_assert((WT_WSUBM / WT_TM) * (WT_WSUBN / WT_TN) == 32, "32 lanes cover one sub-tile");
    __shared__ __align__(16) float As[WT_BK * WT_BM];  // A tile transposed (BK x BM)
    __shared__ __align__(16) float Bs[WT_BK * WT_BN];  // B tile (BK x BN)

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_row = warp / (WT_BN / WT_WN), warp_col = warp % (WT_BN / WT_WN);
    const int lane_row = lane / (WT_WSUBN / WT_TN), lane_col = lane % (WT_WSUBN / WT_TN);
    const int row0 = blockIdx.x * WT_BM, col0 = blockIdx.y * WT_BN;

    // acc holds (WMITER*TM) x (WNITER*TN) results, row stride WNITER*TN.
    float acc[WT_WMITER * WT_TM * WT_WNITER * WT_TN] = {};
    float a_reg[WT_WMITER * WT_TM], b_reg[WT_WNITER * WT_TN];
    for (int k0 = 0; k0 < K; k0 += WT_BK) {
        load_a_transposed4<WT_BM, WT_BK, WT_NT>(A, M, K, row0, k0, As, vec_a);
        load_b4<WT_BK, WT_BN, WT_NT>(B, K, N, k0, col0, Bs, vec_b);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < WT_BK; ++k) {
            const float* a_k = As + k * WT_BM + warp_row * WT_WM + lane_row * WT_TM;
            const float* b_k = Bs + k * WT_BN + warp_col * WT_WN + lane_col * WT_TN;
#pragma unroll
            for (int wm = 0; wm < WT_WMITER; ++wm)
#pragma unroll
                for (int i = 0; i < WT_TM; ++i) a_reg[wm * WT_TM + i] = a_k[wm * WT_WSUBM + i];
#pragma unroll
            for (int wn = 0; wn < WT_WNITER; ++wn)
#pragma unroll
                for (int j = 0; j < WT_TN; ++j) b_reg[wn * WT_TN + j] = b_k[wn * WT_WSUBN + j];
#pragma unroll
            for (int i = 0; i < WT_WMITER * WT_TM; ++i)
#pragma unroll
                for (int j = 0; j < WT_WNITER * WT_TN; ++j)
                    acc[i * (WT_WNITER * WT_TN) + j] += a_reg[i] * b_reg[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int wm = 0; wm < WT_WMITER; ++wm)
#pragma unroll
        for (int wn = 0; wn < WT_WNITER; ++wn)
            store_fragment<WT_TM, WT_TN, WT_WNITER * WT_TN>(
                C, M, N, row0 + warp_row * WT_WM + wm * WT_WSUBM + lane_row * WT_TM,
                col0 + warp_col * WT_WN + wn * WT_WSUBN + lane_col * WT_TN,
                acc + (wm * WT_TM) * (WT_WNITER * WT_TN) + wn * WT_TN, vec_c);
}
