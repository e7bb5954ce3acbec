// conv_implicit_gemm.cuh: the conv2d shape record, the helpers every implicit-GEMM kernel
// shares (pixel decode, output offset, epilogue), and the shared-memory tiled implicit-GEMM
// convolution of stage implicit_gemm (conv2d.cu). Its 1-channel "narrow" tile also serves the
// later stages for depthwise / thin groups; conv_pipelined.cuh builds stage pipelined on the
// helpers here.
//
// REAL (float or double) is set by the loader with -DREAL=...; the tile shapes with
// -DWIDE_BM=... etc. (kernels/cuda/_loader.py, CONV_TILES).
#pragma once
#include "common.cuh"

#ifndef REAL
#error "compile through kernels/cuda/_loader.py, which sets -DREAL=float or -DREAL=double"
#endif

// One conv2d call, as torch.nn.functional.conv2d. Arrays (C-contiguous):
//   x (n, c, h, w)   weights (k, c/groups, kh, kw)   out (n, k, ho, wo)
// Padding is top/left explicitly; bottom/right are implied by ho, wo and the bounds checks.
struct ConvShape {
    int n, c, h, w;        // input
    int k, ho, wo;         // output channels and size
    int kh, kw;            // kernel size
    int sh, sw;            // stride
    int pt, pl;            // padding top, left
    int dh, dw;            // dilation
    int groups;
};

// Every conv kernel takes the shape as 16 int arguments in this order (CuPy passes scalars,
// not structs); the Python side builds them in fastops/kernels/cuda/conv2d.py:shape_args.
#define CONV_SHAPE_PARAMS                                                                       \
    int n, int c, int h, int w, int k, int ho, int wo, int kh, int kw, int sh, int sw, int pt,  \
        int pl, int dh, int dw, int groups
#define CONV_SHAPE ConvShape{n, c, h, w, k, ho, wo, kh, kw, sh, sw, pt, pl, dh, dw, groups}

// Output pixel p (0 <= p < n*ho*wo, the column index of the implicit GEMM, ow fastest) ->
// its image and the input coordinate of the top-left tap of its receptive field (may be
// negative or past the edge: padding). Two divisions; kernels do this once per thread.
struct PixelOrigin {
    int img, ih0, iw0;
};
__device__ __forceinline__ PixelOrigin pixel_origin(const ConvShape& s, idx_t p)
{
    const int ow = (int)(p % s.wo);
    const idx_t t = p / s.wo;
    return PixelOrigin{(int)(t / s.ho), (int)(t % s.ho) * s.sh - s.pt, ow * s.sw - s.pl};
}

// Offset of output pixel p of output channel 0 in out (n, k, ho, wo): channel ko of that
// pixel is at out[out_pixel_offset(s, p) + ko * ho * wo].
__device__ __forceinline__ idx_t out_pixel_offset(const ConvShape& s, idx_t p)
{
    const idx_t hw = (idx_t)s.ho * s.wo;
    const idx_t img = p / hw;
    return img * s.k * hw + (p - img * hw);
}

// The epilogue applied to an accumulator before its one store: nothing for conv2d, bias and
// a NaN-keeping ReLU for the fused conv2d_bias_relu.
template <bool BIAS_RELU>
__device__ __forceinline__ REAL epilogue(REAL acc, REAL bias)
{
    return BIAS_RELU ? relu_keep_nan(acc + bias) : acc;
}

// ------------------------------------------------------------------------------------------
// Implicit GEMM. For group g the convolution is the matrix product
//     out_g (Kg x P) = W_g (Kg x R) @ X_col_g (R x P)
// with Kg = k/groups output channels, P = n*ho*wo output pixels of the whole batch, and the
// reduction R = (c/groups)*kh*kw running over (input channel, tap row, tap column). W_g is the
// weight array as it lies in memory (rows of R contiguous values). X_col_g is the im2col
// matrix, never materialised: when a BK x BN tile of it is needed, each thread computes which
// input pixel an entry stands for (the "on-the-fly im2col index math") and gathers it, or 0
// for padding. The product is then the register-blocked shared-memory GEMM of matmul.cu's
// stage blocktiled: a block owns a BM x BN tile of out_g, each thread a TM x TN fragment.
//
// Grid: (cdiv(P, BN), cdiv(Kg, BM), groups), block (NT,), NT = (BM/TM) * (BN/TN).
// Padding taps multiply a zero input by the weight (no skipped terms), so a NaN or Inf weight
// gives the same NaN as the zero-padded float64 reference.
// ------------------------------------------------------------------------------------------
template <int BM, int BN, int BK, int TM, int TN, bool BIAS_RELU>
__device__ __forceinline__ void conv_implicit_gemm(const REAL* __restrict__ x,
                                                   const REAL* __restrict__ wt,
                                                   const REAL* __restrict__ bias,
                                                   REAL* __restrict__ out, const ConvShape s)
{
    constexpr int NT = (BM / TM) * (BN / TN);
    constexpr int B_ROW_STEP = NT / BN;  // rows of the B tile filled per pass of the block
    static_assert(NT % BN == 0 && BK % B_ROW_STEP == 0,
                  "each thread gathers one fixed pixel column of the B tile");
    // +1 column: consecutive threads store consecutive k into As[k][m]; without padding
    // their addresses would be BM floats apart, i.e. in the same shared-memory bank.
    __shared__ REAL As[BK][BM + 1];  // weight tile, transposed: As[r][m] = W_g[m0 + m, r0 + r]
    __shared__ REAL Bs[BK][BN];      // im2col tile: Bs[r][p] = X_col_g[r0 + r, p0 + p]

    const int cg = s.c / s.groups, kg = s.k / s.groups;
    const int taps = s.kh * s.kw;
    const int R = cg * taps;
    const idx_t P = (idx_t)s.n * s.ho * s.wo;
    const int g = blockIdx.z;
    const int m0 = blockIdx.y * BM;             // first output channel of the tile, in group g
    const idx_t p0 = (idx_t)blockIdx.x * BN;    // first output pixel of the tile

    // The pixel column this thread gathers never changes across the R loop: decode it once
    // into (image, top-left input coordinate of its receptive field).
    const int b_col = threadIdx.x % BN, b_row0 = threadIdx.x / BN;
    const idx_t p_mine = p0 + b_col;
    const bool p_ok = p_mine < P;
    const PixelOrigin o = p_ok ? pixel_origin(s, p_mine) : PixelOrigin{0, 0, 0};
    // x[img, g*cg : (g+1)*cg] as a (cg, h, w) slab, and the (kg, R) weight rows of group g.
    const REAL* x_slab = x + ((idx_t)o.img * s.c + (idx_t)g * cg) * s.h * s.w;
    const REAL* w_grp = wt + (idx_t)g * kg * R;

    const int t_row = threadIdx.x / (BN / TN), t_col = threadIdx.x % (BN / TN);
    REAL acc[TM][TN] = {};
    REAL a_reg[TM], b_reg[TN];

    for (int r0 = 0; r0 < R; r0 += BK) {
        // Weight tile: consecutive threads read consecutive r of one row (coalesced).
        for (int e = threadIdx.x; e < BM * BK; e += NT) {
            const int m = e / BK, r = e % BK;
            const bool ok = m0 + m < kg && r0 + r < R;
            As[r][m] = ok ? w_grp[(idx_t)(m0 + m) * R + r0 + r] : REAL(0);
        }
        // im2col tile: consecutive threads take consecutive output pixels, i.e. (mostly)
        // consecutive input columns of one image row: coalesced for stride 1.
#pragma unroll
        for (int i = 0; i < BK / B_ROW_STEP; ++i) {
            const int r = b_row0 + i * B_ROW_STEP;
            const int rr = r0 + r;
            REAL v = REAL(0);
            if (p_ok && rr < R) {
                const int ci = rr / taps, tap = rr - ci * taps;
                const int ki = tap / s.kw, kj = tap - ki * s.kw;
                const int ih = o.ih0 + ki * s.dh, iw = o.iw0 + kj * s.dw;
                if (ih >= 0 && ih < s.h && iw >= 0 && iw < s.w)
                    v = x_slab[((idx_t)ci * s.h + ih) * s.w + iw];
            }
            Bs[r][b_col] = v;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < BK; ++r) {
#pragma unroll
            for (int i = 0; i < TM; ++i) a_reg[i] = As[r][t_row * TM + i];
            // A thread's TN pixels are BN/TN apart: a warp reads consecutive Bs addresses
            // (no bank conflicts) and later writes consecutive output pixels (coalesced).
#pragma unroll
            for (int j = 0; j < TN; ++j) b_reg[j] = Bs[r][t_col + j * (BN / TN)];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += a_reg[i] * b_reg[j];
        }
        __syncthreads();  // the next iteration overwrites the tiles
    }

    // Epilogue: out[img, g*kg + m, oh, ow], with the bias and ReLU applied in registers when
    // fused (no second pass over the output).
    const idx_t hw = (idx_t)s.ho * s.wo;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + t_row * TM + i;
        if (m >= kg) break;
        const int ko = g * kg + m;
        const REAL b = BIAS_RELU ? bias[ko] : REAL(0);
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const idx_t p = p0 + t_col + j * (BN / TN);
            if (p >= P) break;
            out[out_pixel_offset(s, p) + ko * hw] = epilogue<BIAS_RELU>(acc[i][j], b);
        }
    }
}
