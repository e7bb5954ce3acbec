// conv_pipelined.cuh: the implicit-GEMM convolution of stage pipelined (conv2d.cu), which the
// fused conv2d_bias_relu stage (conv2d_bias_relu.cu) runs with its bias + ReLU epilogue.
//
// Same GEMM as conv_implicit_gemm.cuh, per group g:
//     out_g (Kg x P) = W_g (Kg x R) @ X_col_g (R x P),
//     Kg = k/groups, P = n*ho*wo, R = (c/groups)*kh*kw ordered (input channel, tap row, tap col),
// with what siboehm's SGEMM ladder (kernels 5, 6, 9) and CUTLASS's "optimized" implicit-GEMM
// iterators add to the stage-2 kernel, each for one reason:
//
//  1. Register blocking 8 x 8 (float32, 128 x 128 tile): each thread accumulates TM x TN
//     outputs from TM + TN values read from shared memory per step of the reduction, so the
//     FMAs per shared load grow from 16 / 8 = 2 (4 x 4) to 64 / 16 = 4, and with 128-bit
//     loads from 16 / 2 = 8 to 64 / 4 = 16 per shared-load instruction.
//  2. 128-bit shared loads: the weight tile is stored transposed (As[r][m]) and the im2col
//     tile as rows of pixels (Bs[r][p]), so a thread's TM channels and TN pixels at one r are
//     runs of 4 floats (2 doubles): one float4 / double2 load each.
//  3. Register-staged double buffering: two shared buffers; while the block multiplies slice t
//     out of one, each thread has already issued the global loads (weights and im2col gathers)
//     of slice t+1 into registers, and stores them into the other buffer after its FMAs. The
//     loads' latency hides behind BK * TM * TN FMAs, and one __syncthreads per slice suffices.
//  4. Division-free gathers: each thread's im2col rows advance by BK per slice. Instead of
//     dividing every row index by kh*kw and kw (stage 2: two integer divisions per gathered
//     element), each row keeps (input channel, tap row, tap column) counters, advanced by the
//     precomputed step of BK rows with one compare-and-subtract per level, as CUTLASS's
//     Conv2dFpropActivationTileAccessIteratorOptimized advances its (filter_r, filter_s,
//     channel) position. The pixel decode (image, oh, ow) happens once per thread.
//
// Which pixels a thread owns: TN pixels as TN / VEC runs of VEC consecutive pixels, the runs
// BN / (TN / VEC) apart (float32 8 x 8: pixels 4t..4t+3 and 64+4t..64+4t+3 for t = t_col).
// siboehm's kernel 6 gives a thread TN = 8 *adjacent* pixels read as 2 float4; then 8 threads
// of a quarter warp read addresses 32 B apart and threads t and t+4 hit the same banks (a
// 2-way conflict). With runs of 4, a quarter warp reads 128 contiguous bytes (conflict-free),
// and at the store 16 consecutive threads write 16 runs of 4 consecutive pixels: 256
// contiguous bytes of an output row per instruction with 128-bit stores (when ho*wo % 4 == 0
// and out is 16-byte aligned) or 4 interleaved scalar instructions otherwise.
//
// Split-K (CUTLASS's "parallel split-K": GemmSplitKParallel + a reduction kernel):
// a layer whose best tile still gives fewer blocks than the GPU has SMs (ResNet-50 res5 at
// batch 8: 56 blocks of 64 x 64 for 132 SMs) is run as S launches' worth of blocks in one
// grid, block z = split * groups + g summing only rows [split * slice_rows, (split + 1) *
// slice_rows) of R, slice_rows a multiple of BK (so every split but the last is whole BK
// slices and the counters above start on a slice boundary). Each split stores its partial
// output raw (the conv2d epilogue) into slice `split` of a (S, n, k, ho, wo) workspace;
// conv_split_sum (below) then adds the S partials in a fixed order (no atomics: the result
// does not depend on block timing), applies the bias + ReLU when fused, and writes out once.
// Unsplit launches pass slice_rows >= R and grid.z = groups: split = 0, the whole reduction.
//
// Grid: (cdiv(P, BN), cdiv(Kg, BM), groups * S), block (NT,), NT = (BM/TM) * (BN/TN).
// Shared memory: 2 * BK * ((BM + VEC) + BN) values = 16640 B for float32 128 x 128 x 8.
#pragma once
#include "conv_implicit_gemm.cuh"

#if !defined(PIPE0_BM) || !defined(PIPE3_BM)
#error "compile through kernels/cuda/_loader.py, which sets the PIPE<i>_* tiles (PIPELINED_TILES)"
#endif
// Tile i of _loader.PIPELINED_TILES[dtype] as template arguments, and its thread count.
#define PIPE_TILE(i) PIPE##i##_BM, PIPE##i##_BN, PIPE##i##_BK, PIPE##i##_TM, PIPE##i##_TN
#define PIPE_THREADS(i) ((PIPE##i##_BM / PIPE##i##_TM) * (PIPE##i##_BN / PIPE##i##_TN))

// 16-byte vectors of REAL: float4 (VEC = 4) or double2 (VEC = 2), with pack / unpack to and
// from a register array (member by member, so the array stays in registers).
template <class T>
struct Vec16;
template <>
struct Vec16<float> {
    typedef float4 type;
    static constexpr int n = 4;
};
template <>
struct Vec16<double> {
    typedef double2 type;
    static constexpr int n = 2;
};
typedef Vec16<REAL>::type real_vec;
constexpr int VEC = Vec16<REAL>::n;

__device__ __forceinline__ void unpack(float4 v, float* d)
{
    d[0] = v.x, d[1] = v.y, d[2] = v.z, d[3] = v.w;
}
__device__ __forceinline__ void unpack(double2 v, double* d) { d[0] = v.x, d[1] = v.y; }
__device__ __forceinline__ float4 pack(const float* d) { return make_float4(d[0], d[1], d[2], d[3]); }
__device__ __forceinline__ double2 pack(const double* d) { return make_double2(d[0], d[1]); }

// VEC consecutive values at a 16-byte aligned address -> registers d[0 .. VEC).
__device__ __forceinline__ void load_vec(REAL* d, const REAL* src)
{
    unpack(*reinterpret_cast<const real_vec*>(src), d);
}

// An im2col row r = ci * kh*kw + ki * kw + kj as its (input channel, tap row, tap column).
// decode_row divides (kernels call it once per thread); advance adds a step that is itself
// decoded, without dividing: since step.kj < kw and step.ki < kh, a single
// compare-and-subtract per level carries.
struct TapPos {
    int ci, ki, kj;
};
__device__ __forceinline__ TapPos decode_row(const ConvShape& s, int r)
{
    const int taps = s.kh * s.kw;
    const int ci = r / taps, tap = r - ci * taps;
    return TapPos{ci, tap / s.kw, tap % s.kw};
}
__device__ __forceinline__ void advance(const ConvShape& s, const TapPos step, TapPos& pos)
{
    pos.kj += step.kj, pos.ki += step.ki, pos.ci += step.ci;
    if (pos.kj >= s.kw) pos.kj -= s.kw, ++pos.ki;
    if (pos.ki >= s.kh) pos.ki -= s.kh, ++pos.ci;
}

// BIAS_RELU only with one split (grid.z = groups): a split launch stores raw partials
// (BIAS_RELU = false) and leaves the bias + ReLU to conv_split_sum.
template <int BM, int BN, int BK, int TM, int TN, bool BIAS_RELU>
__device__ __forceinline__ void conv_pipelined(const REAL* __restrict__ x,
                                               const REAL* __restrict__ wt,
                                               const REAL* __restrict__ bias,
                                               REAL* __restrict__ out, const ConvShape s,
                                               bool vec_out, int slice_rows)
{
    constexpr int NT = (BM / TM) * (BN / TN);
    constexpr int A_LOADS = BM * BK / NT;    // weights each thread stages per slice
    constexpr int B_ROW_STEP = NT / BN;      // im2col rows the block fills per pass
    constexpr int B_LOADS = BK / B_ROW_STEP; // im2col values each thread gathers per slice
    constexpr int TM_RUNS = TM / VEC, TN_RUNS = TN / VEC;
    constexpr int M_RUN_GAP = BM / TM_RUNS, N_RUN_GAP = BN / TN_RUNS;  // between a thread's runs
    static_assert(TM % VEC == 0 && TN % VEC == 0, "fragments are whole 16-byte vectors");
    static_assert((BM * BK) % NT == 0 && (BK & (BK - 1)) == 0,
                  "every thread stages the same number of weights; BK a power of two");
    static_assert(NT % BN == 0 && BK % B_ROW_STEP == 0,
                  "each thread gathers one fixed pixel column of the im2col tile");
    static_assert((BN / TN) % 8 == 0, "a quarter warp reads 8 distinct runs of Bs");

    // As[buf][r][m] = W_g[m0 + m, r0 + r] (transposed: a thread's channels are contiguous).
    // The row pad of VEC values keeps rows 16-byte aligned and moves row r by 4 banks, so the
    // staging stores (8 consecutive threads: 8 r of one m) fall in distinct banks.
    __shared__ __align__(16) REAL As[2][BK][BM + VEC];
    __shared__ __align__(16) REAL Bs[2][BK][BN];  // Bs[buf][r][p] = X_col_g[r0 + r, p0 + p]

    const int cg = s.c / s.groups, kg = s.k / s.groups;
    const int R = cg * s.kh * s.kw;
    const idx_t P = (idx_t)s.n * s.ho * s.wo;
    const int g = blockIdx.z % s.groups, split = blockIdx.z / s.groups;
    const int m0 = blockIdx.y * BM;           // first output channel of the tile, in group g
    const idx_t p0 = (idx_t)blockIdx.x * BN;  // first output pixel of the tile
    const REAL* w_grp = wt + (idx_t)g * kg * R;  // (kg, R) weight rows of group g
    // This block's part of the reduction: rows [r_begin, r_begin + slice_rows) of R, clipped
    // to R. r_begin is a multiple of BK (the launcher's slice_rows is), so the only partial
    // BK slice is the reduction's tail, which the r < R checks below already zero.
    const int r_begin = split * slice_rows;
    const int rows = slice_rows < R - r_begin ? slice_rows : R - r_begin;  // last split: less
    const int slices = cdiv(rows, BK);
    out += split * P * s.k;  // partial `split` of the (S, n, k, ho, wo) workspace (or out)

    // ---- gather state: one pixel column of the im2col tile, B_LOADS rows of it per slice
    const int b_col = threadIdx.x % BN, b_row0 = threadIdx.x / BN;
    const bool p_ok = p0 + b_col < P;
    const PixelOrigin o = p_ok ? pixel_origin(s, p0 + b_col) : PixelOrigin{0, 0, 0};
    const REAL* x_slab = x + ((idx_t)o.img * s.c + (idx_t)g * cg) * s.h * s.w;  // (cg, h, w)
    TapPos row[B_LOADS];  // this thread's rows b_row0 + i * B_ROW_STEP of the current slice
#pragma unroll
    for (int i = 0; i < B_LOADS; ++i)
        row[i] = decode_row(s, r_begin + b_row0 + i * B_ROW_STEP);
    const TapPos slice_step = decode_row(s, BK);  // BK rows on, in the same mixed radix

    REAL a_stage[A_LOADS], b_stage[B_LOADS];  // slice t+1 in flight from global memory

    // Issue the global loads of the slice starting at reduction index r0 into registers.
    // Weights: consecutive threads read consecutive r of one row (32-byte runs for BK = 8).
    // im2col: consecutive threads take consecutive pixels (coalesced for stride 1); a padding
    // tap or a row past R reads nothing and stages 0 (so 0 * weight enters the sum, as in the
    // reference: a NaN weight still gives NaN).
    auto fetch = [&](int r0) {
#pragma unroll
        for (int i = 0; i < A_LOADS; ++i) {
            const int e = threadIdx.x + i * NT, m = e / BK, r = e % BK;
            const bool ok = m0 + m < kg && r0 + r < R;
            a_stage[i] = ok ? w_grp[(idx_t)(m0 + m) * R + r0 + r] : REAL(0);
        }
#pragma unroll
        for (int i = 0; i < B_LOADS; ++i) {
            const int ih = o.ih0 + row[i].ki * s.dh, iw = o.iw0 + row[i].kj * s.dw;
            // row[i].ci >= cg exactly when the row index is >= R (the reduction's tail).
            const bool inside =
                p_ok && row[i].ci < cg && ih >= 0 && ih < s.h && iw >= 0 && iw < s.w;
            b_stage[i] = inside ? x_slab[((idx_t)row[i].ci * s.h + ih) * s.w + iw] : REAL(0);
            advance(s, slice_step, row[i]);  // ready for the next slice
        }
    };
    // Registers -> shared buffer `buf` (after every thread is done reading it).
    auto stash = [&](int buf) {
#pragma unroll
        for (int i = 0; i < A_LOADS; ++i) {
            const int e = threadIdx.x + i * NT;
            As[buf][e % BK][e / BK] = a_stage[i];
        }
#pragma unroll
        for (int i = 0; i < B_LOADS; ++i) Bs[buf][b_row0 + i * B_ROW_STEP][b_col] = b_stage[i];
    };

    // ---- the thread's fragment: channels t_row*VEC + {0..VEC) + q*M_RUN_GAP, pixels likewise
    const int t_row = threadIdx.x / (BN / TN), t_col = threadIdx.x % (BN / TN);
    REAL acc[TM][TN] = {};
    REAL a_frag[TM], b_frag[TN];

    fetch(r_begin);
    stash(0);
    __syncthreads();
    for (int t = 0; t < slices; ++t) {
        const int cur = t & 1;
        const bool more = t + 1 < slices;         // uniform across the block
        if (more) fetch(r_begin + (t + 1) * BK);  // in flight during the FMAs below
#pragma unroll
        for (int r = 0; r < BK; ++r) {
#pragma unroll
            for (int q = 0; q < TM_RUNS; ++q)
                load_vec(&a_frag[q * VEC], &As[cur][r][q * M_RUN_GAP + t_row * VEC]);
#pragma unroll
            for (int q = 0; q < TN_RUNS; ++q)
                load_vec(&b_frag[q * VEC], &Bs[cur][r][q * N_RUN_GAP + t_col * VEC]);
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += a_frag[i] * b_frag[j];
        }
        // Buffer cur^1 was last read in iteration t-1, which every thread finished before the
        // __syncthreads that ended it; this one publishes slice t+1 for iteration t+1.
        if (more) stash(cur ^ 1);
        __syncthreads();
    }

    // ---- epilogue: out[img, g*kg + m, oh, ow] = epilogue(acc), each output stored once.
    const idx_t hw = (idx_t)s.ho * s.wo;
    int ko[TM];  // output channel of fragment row i, or -1 past the group's kg channels
    REAL b[TM];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + (i / VEC) * M_RUN_GAP + t_row * VEC + i % VEC;
        ko[i] = m < kg ? g * kg + m : -1;
        b[i] = BIAS_RELU && m < kg ? bias[g * kg + m] : REAL(0);
    }
#pragma unroll
    for (int q = 0; q < TN_RUNS; ++q) {
        const idx_t pq = p0 + q * N_RUN_GAP + t_col * VEC;  // first pixel of run q
        if (pq >= P) break;
        if (vec_out) {
            // ho*wo % VEC == 0 and out 16-byte aligned (the launcher checked): the run lies
            // in one image, inside P (P is a multiple of VEC too), on a 16-byte boundary.
            const idx_t base = out_pixel_offset(s, pq);
#pragma unroll
            for (int i = 0; i < TM; ++i) {
                if (ko[i] < 0) continue;
                REAL v[VEC];
#pragma unroll
                for (int j = 0; j < VEC; ++j) v[j] = epilogue<BIAS_RELU>(acc[i][q * VEC + j], b[i]);
                *reinterpret_cast<real_vec*>(out + base + ko[i] * hw) = pack(v);
            }
        } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                if (pq + j >= P) break;
                const idx_t base = out_pixel_offset(s, pq + j);  // a run may cross images
#pragma unroll
                for (int i = 0; i < TM; ++i)
                    if (ko[i] >= 0)
                        out[base + ko[i] * hw] = epilogue<BIAS_RELU>(acc[i][q * VEC + j], b[i]);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Split-K's second pass: out[o] = epilogue(ws[0][o] + ws[1][o] + ... + ws[S-1][o]) for each of
// the n*k*ho*wo outputs o, ws the (S, n, k, ho, wo) partials of conv_pipelined's split launch.
// One thread per output (grid-stride, ow fastest): consecutive threads read consecutive
// addresses of each partial and write consecutive outputs, all coalesced. The partials are
// added in split order 0, 1, ..., S-1 by one thread, so the result is the same on every run
// (atomicAdd into out would make it depend on which block finished first). A NaN or Inf in
// any partial reaches the sum, as in the one-pass kernel.
// ------------------------------------------------------------------------------------------
// Launch: block (256,), grid cdiv(n*k*ho*wo, 256) capped (the loop covers the rest);
// ws (splits, n, k, hw), out (n, k, hw), hw = ho*wo.
template <bool BIAS_RELU>
__device__ __forceinline__ void conv_split_sum(const REAL* __restrict__ ws,
                                               const REAL* __restrict__ bias,
                                               REAL* __restrict__ out, int n, int k, int hw,
                                               int splits)
{
    const idx_t total = (idx_t)n * k * hw;
    for (idx_t o = blockIdx.x * (idx_t)blockDim.x + threadIdx.x; o < total;
         o += (idx_t)gridDim.x * blockDim.x) {
        REAL sum = ws[o];
        for (int i = 1; i < splits; ++i) sum += ws[i * total + o];
        // Output channel of o in (n, k, ho, wo): two divisions, against S loads per output.
        const REAL b = BIAS_RELU ? bias[(o / hw) % k] : REAL(0);
        out[o] = epilogue<BIAS_RELU>(sum, b);
    }
}
