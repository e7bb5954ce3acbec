// conv2d_bias_relu.cu: relu(conv2d(x, w) + bias) in one kernel.
//
//   x (n, c, h, w)   weights (k, c/groups, kh, kw)   bias (k,)   out (n, k, ho, wo)
//   REAL = float or double (-DREAL=...), C-contiguous arrays.
// Only the fused stage lives here: the un-fused comparison points (conv2d stage, then a bias
// pass, then a ReLU pass) are derived in Python from the conv2d ladder
// (fastops.registry.derive_unfused_conv_bias_relu).
//
// Register use (nvcc 13.0 -arch=sm_90 -Xptxas -v, float / double, no spills):
//   conv2d_bias_relu_fused_0 130 / 124, _1 107 / 96, _2 103 / 78, _3 63 / 132,
//   conv2d_bias_relu_fused_narrow 48 / 48, conv2d_bias_relu_split_sum 34 / 34.

#include "conv_pipelined.cuh"

// ------------------------------------------------------------------------------------------
// Stage fused: stage pipelined's kernel (conv_pipelined.cuh) with the bias add and the ReLU
// applied to the accumulators in registers before the one store of the output.
//   Changed since pipelined + separate passes: the output is written once instead of being
//   written by the conv, then read and written by the bias pass, then read and written by
//   the ReLU pass (5 sweeps over n*k*ho*wo values become 1, 3 launches become 1).
//   Bottleneck removed: the memory traffic and launch overhead of the two elementwise passes,
//   which matter most on small, memory-bound layers (7x7 feature maps, 1x1 convs).
//   ReLU keeps NaN (relu_keep_nan in common.cuh), as torch.relu.
//   Tiles: the launcher picks one of _loader.PIPELINED_TILES per layer as for pipelined;
//   depthwise / thin groups (K/groups < 16) use stage implicit_gemm's narrow tile with the
//   same epilogue (conv2d_bias_relu_fused_narrow).
//   Split-K: where pipelined splits the reduction (no tile fills the SMs, R >= 512), the
//   partials come from conv2d.cu's conv2d_pipelined_<i> and conv2d_bias_relu_split_sum adds
//   them, the bias and the ReLU in one pass: one extra write + read of S partial outputs
//   (ResNet-50 res5 at batch 8: S = 3 partials of 8*512*49 floats = 0.8 MB each, 4.8 MB of
//   extra traffic against 1.85 GFLOP) and a second launch, in exchange for 168 busy blocks
//   instead of 56 on 132 SMs. Every layer that fills the GPU keeps the one-pass epilogue.
//   Still lacks: what pipelined lacks (tensor cores, cp.async, split-K without a workspace).
//   Compile-checked and CPU-emulated only where it was written: no GPU timing yet.
// ------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(PIPE_THREADS(0))
conv2d_bias_relu_fused_0(const REAL* __restrict__ x, const REAL* __restrict__ wt,
                         const REAL* __restrict__ bias, REAL* __restrict__ out,
                         CONV_SHAPE_PARAMS, int vec_out, int slice_rows)
{
    conv_pipelined<PIPE_TILE(0), true>(x, wt, bias, out, CONV_SHAPE, vec_out, slice_rows);
}

extern "C" __global__ void __launch_bounds__(PIPE_THREADS(1))
conv2d_bias_relu_fused_1(const REAL* __restrict__ x, const REAL* __restrict__ wt,
                         const REAL* __restrict__ bias, REAL* __restrict__ out,
                         CONV_SHAPE_PARAMS, int vec_out, int slice_rows)
{
    conv_pipelined<PIPE_TILE(1), true>(x, wt, bias, out, CONV_SHAPE, vec_out, slice_rows);
}

extern "C" __global__ void __launch_bounds__(PIPE_THREADS(2))
conv2d_bias_relu_fused_2(const REAL* __restrict__ x, const REAL* __restrict__ wt,
                         const REAL* __restrict__ bias, REAL* __restrict__ out,
                         CONV_SHAPE_PARAMS, int vec_out, int slice_rows)
{
    conv_pipelined<PIPE_TILE(2), true>(x, wt, bias, out, CONV_SHAPE, vec_out, slice_rows);
}

extern "C" __global__ void __launch_bounds__(PIPE_THREADS(3))
conv2d_bias_relu_fused_3(const REAL* __restrict__ x, const REAL* __restrict__ wt,
                         const REAL* __restrict__ bias, REAL* __restrict__ out,
                         CONV_SHAPE_PARAMS, int vec_out, int slice_rows)
{
    conv_pipelined<PIPE_TILE(3), true>(x, wt, bias, out, CONV_SHAPE, vec_out, slice_rows);
}

// Split-K's second pass for the fused stage: the partials come from conv2d.cu's
// conv2d_pipelined_<i> (raw sums, no epilogue); this adds them in split order, then the bias,
// then the NaN-keeping ReLU, and writes out once (conv_split_sum, conv_pipelined.cuh).
extern "C" __global__ void conv2d_bias_relu_split_sum(const REAL* __restrict__ ws,
                                                      const REAL* __restrict__ bias,
                                                      REAL* __restrict__ out, int n, int k,
                                                      int hw, int splits)
{
    conv_split_sum<true>(ws, bias, out, n, k, hw, splits);
}

// Depthwise / thin groups: stage 2's 1-channel x 256-pixel tile with the fused epilogue.
extern "C" __global__ void __launch_bounds__((NARROW_BM / NARROW_TM) * (NARROW_BN / NARROW_TN))
conv2d_bias_relu_fused_narrow(const REAL* __restrict__ x, const REAL* __restrict__ wt,
                              const REAL* __restrict__ bias, REAL* __restrict__ out,
                              CONV_SHAPE_PARAMS)
{
    conv_implicit_gemm<NARROW_BM, NARROW_BN, NARROW_BK, NARROW_TM, NARROW_TN, true>(
        x, wt, bias, out, CONV_SHAPE);
}
