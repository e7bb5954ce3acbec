// conv2d.cu: the conv2d ladder on the GPU, naive first. No bias here: the API adds it.
//
//   x (n, c, h, w)   weights (k, c/groups, kh, kw)   out (n, k, ho, wo)
//   REAL = float or double (-DREAL=..., one compiled module per dtype), C-contiguous arrays.
// Every stage handles groups (depthwise included), stride, dilation and asymmetric padding;
// the shape arrives as the 16 ints of CONV_SHAPE_PARAMS (conv_implicit_gemm.cuh).
//
// Register use (nvcc 13.0 -arch=sm_90 -Xptxas -v, float / double, no spills):
//   conv2d_naive 40 / 40, conv2d_implicit_gemm_wide 64 / 97, conv2d_implicit_gemm_narrow 48 / 48,
//   conv2d_pipelined_0 157 / 128, _1 107 / 106, _2 109 / 78, _3 64 / 138 (tile i of
//   _loader.PIPELINED_TILES[dtype]: the float and double tables differ), conv2d_split_sum
//   32 / 32.

#include "conv_pipelined.cuh"

// ------------------------------------------------------------------------------------------
// Stage 1 · naive: direct convolution, one thread per output element.
//   Launch: block (256,), a grid-stride loop over the n*k*ho*wo outputs (ow fastest).
//   Each thread sums (c/groups)*kh*kw products straight from global memory. Consecutive
//   threads take consecutive output columns, so stores are coalesced and input loads are
//   too for stride 1, but nothing is reused on chip: every input pixel is fetched by each of
//   the kh*kw*(k/groups) outputs that need it (through L1/L2 at best), and every weight by
//   every pixel. Two loads per multiply-add: memory-bound.
// ------------------------------------------------------------------------------------------
extern "C" __global__ void conv2d_naive(const REAL* __restrict__ x, const REAL* __restrict__ wt,
                                        REAL* __restrict__ out, CONV_SHAPE_PARAMS)
{
    const ConvShape s = CONV_SHAPE;
    const int cg = s.c / s.groups, kg = s.k / s.groups;
    const idx_t total = (idx_t)s.n * s.k * s.ho * s.wo;
    for (idx_t o = blockIdx.x * (idx_t)blockDim.x + threadIdx.x; o < total;
         o += (idx_t)gridDim.x * blockDim.x) {
        const int ow = (int)(o % s.wo);
        idx_t t = o / s.wo;
        const int oh = (int)(t % s.ho);
        t /= s.ho;
        const int ko = (int)(t % s.k);
        const int img = (int)(t / s.k);
        const int g = ko / kg;
        const REAL* x_slab = x + ((idx_t)img * s.c + (idx_t)g * cg) * s.h * s.w;  // (cg, h, w)
        const REAL* w_row = wt + (idx_t)ko * cg * s.kh * s.kw;                     // (cg, kh, kw)
        REAL acc = REAL(0);
        for (int ci = 0; ci < cg; ++ci) {
            for (int i = 0; i < s.kh; ++i) {
                const int ih = oh * s.sh - s.pt + i * s.dh;
                for (int j = 0; j < s.kw; ++j) {
                    const int iw = ow * s.sw - s.pl + j * s.dw;
                    // Padding contributes 0 * weight (not a skipped term), as the reference.
                    const bool inside = ih >= 0 && ih < s.h && iw >= 0 && iw < s.w;
                    const REAL xv = inside ? x_slab[((idx_t)ci * s.h + ih) * s.w + iw] : REAL(0);
                    acc += xv * w_row[(ci * s.kh + i) * s.kw + j];
                }
            }
        }
        out[o] = acc;
    }
}

// ------------------------------------------------------------------------------------------
// Stage 2 · implicit_gemm: the convolution as a shared-memory tiled GEMM
//   out_g (K/groups x n*ho*wo) = W_g (K/groups x (c/groups)*kh*kw) @ im2col(x)_g,
// with the im2col matrix gathered tile by tile into shared memory, never written to global
// memory (see conv_implicit_gemm.cuh for the index math).
//   Changed since naive: a block stages a BK-deep slice of a BM-channel weight tile and of a
//   BN-pixel im2col tile in shared memory, and each thread accumulates a TM x TN fragment in
//   registers: each gathered input value feeds BM multiply-adds and each weight BN.
//   Bottleneck removed: the global/L2 traffic of naive (two loads per multiply-add).
//   Still lacks: 128-bit loads, double buffering (gathers and FMAs of a block do not
//   overlap), a cheaper index decode (two integer divisions per gathered element), and
//   tensor cores. Two tile shapes (_loader.CONV_TILES): wide (64 channels x 64 pixels) for
//   dense layers, narrow (1 x 256) for few channels per group such as depthwise.
// ------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__((WIDE_BM / WIDE_TM) * (WIDE_BN / WIDE_TN))
conv2d_implicit_gemm_wide(const REAL* __restrict__ x, const REAL* __restrict__ wt,
                          REAL* __restrict__ out, CONV_SHAPE_PARAMS)
{
    conv_implicit_gemm<WIDE_BM, WIDE_BN, WIDE_BK, WIDE_TM, WIDE_TN, false>(x, wt, nullptr, out,
                                                                          CONV_SHAPE);
}

extern "C" __global__ void __launch_bounds__((NARROW_BM / NARROW_TM) * (NARROW_BN / NARROW_TN))
conv2d_implicit_gemm_narrow(const REAL* __restrict__ x, const REAL* __restrict__ wt,
                            REAL* __restrict__ out, CONV_SHAPE_PARAMS)
{
    conv_implicit_gemm<NARROW_BM, NARROW_BN, NARROW_BK, NARROW_TM, NARROW_TN, false>(
        x, wt, nullptr, out, CONV_SHAPE);
}

// ------------------------------------------------------------------------------------------
// Stage 3 · pipelined: the implicit GEMM of stage 2 rebuilt as siboehm's SGEMM kernels 6 + 9
// and CUTLASS's optimized iterators build a GEMM (conv_pipelined.cuh has the details).
//   Changed since implicit_gemm: larger register blocking (float32 up to a 128 x 128 tile,
//   8 x 8 outputs per thread), the weight tile stored transposed so both fragments are read
//   with 128-bit shared loads, two shared buffers filled through registers (the next slice's
//   global loads are in flight during this slice's FMAs; one __syncthreads per slice), and
//   im2col rows walked with (channel, tap row, tap column) counters instead of two integer
//   divisions per gathered element. The launcher picks the tile per layer: the largest of
//   _loader.PIPELINED_TILES that still gives every SM a block; when even the smallest does
//   not and the reduction is long, it splits the reduction S ways (split-K): the same
//   kernel, launched with grid.z = groups * S and slice_rows = R / S rounded up to BK, writes
//   S raw partial outputs into a workspace, and conv2d_split_sum adds them in order.
//   Bottleneck removed: shared-memory load issue (16 FMAs per 128-bit load instead of 2 per
//   scalar load), exposed global-load latency (stage 2 waits for each tile before its FMAs),
//   the integer divisions of the gather, and idle SMs on small outputs with long reductions
//   (ResNet-50 at batch 8 on 132 SMs: res4 100 -> 200 blocks, res5 56 -> 168).
//   Still lacks: tensor cores (TF32/FP64 MMA), cp.async / TMA copies, 128-bit global loads
//   (weight rows of length (c/groups)*kh*kw are rarely 16-byte aligned; im2col is a gather),
//   and a split-K without the workspace round trip (CUTLASS's serial split-K / stream-K
//   reduce in the GEMM kernel itself, behind a semaphore).
//   Depthwise and thin groups (K/groups < 16) keep stage 2's narrow tile.
//   Compile-checked and CPU-emulated only where it was written: no GPU timing yet.
// ------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(PIPE_THREADS(0))
conv2d_pipelined_0(const REAL* __restrict__ x, const REAL* __restrict__ wt,
                   REAL* __restrict__ out, CONV_SHAPE_PARAMS, int vec_out, int slice_rows)
{
    conv_pipelined<PIPE_TILE(0), false>(x, wt, nullptr, out, CONV_SHAPE, vec_out, slice_rows);
}

extern "C" __global__ void __launch_bounds__(PIPE_THREADS(1))
conv2d_pipelined_1(const REAL* __restrict__ x, const REAL* __restrict__ wt,
                   REAL* __restrict__ out, CONV_SHAPE_PARAMS, int vec_out, int slice_rows)
{
    conv_pipelined<PIPE_TILE(1), false>(x, wt, nullptr, out, CONV_SHAPE, vec_out, slice_rows);
}

extern "C" __global__ void __launch_bounds__(PIPE_THREADS(2))
conv2d_pipelined_2(const REAL* __restrict__ x, const REAL* __restrict__ wt,
                   REAL* __restrict__ out, CONV_SHAPE_PARAMS, int vec_out, int slice_rows)
{
    conv_pipelined<PIPE_TILE(2), false>(x, wt, nullptr, out, CONV_SHAPE, vec_out, slice_rows);
}

extern "C" __global__ void __launch_bounds__(PIPE_THREADS(3))
conv2d_pipelined_3(const REAL* __restrict__ x, const REAL* __restrict__ wt,
                   REAL* __restrict__ out, CONV_SHAPE_PARAMS, int vec_out, int slice_rows)
{
    conv_pipelined<PIPE_TILE(3), false>(x, wt, nullptr, out, CONV_SHAPE, vec_out, slice_rows);
}

// Split-K's second pass for conv2d: out = the sum of the S partials (conv_pipelined.cuh).
extern "C" __global__ void conv2d_split_sum(const REAL* __restrict__ ws, REAL* __restrict__ out,
                                            int n, int k, int hw, int splits)
{
    conv_split_sum<false>(ws, nullptr, out, n, k, hw, splits);
}
