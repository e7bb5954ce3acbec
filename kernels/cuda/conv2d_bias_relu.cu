// conv2d_bias_relu.cu: relu(conv2d(x, w) + bias) in one kernel.
//
//   x (n, c, h, w)   weights (k, c/groups, kh, kw)   bias (k,)   out (n, k, ho, wo)
//   REAL = float or double (-DREAL=...), C-contiguous arrays.
// Only the fused stage lives here: the un-fused comparison points (conv2d stage, then a bias
// pass, then a ReLU pass) are derived in Python from the conv2d ladder
// (fastops.registry.derive_unfused_conv_bias_relu).
//
// Register use (nvcc 13.0 -arch=sm_90 -Xptxas -v, float / double, no spills):
//   conv2d_bias_relu_fused_wide 64 / 97, conv2d_bias_relu_fused_narrow 48 / 48.

#include "conv_implicit_gemm.cuh"

// ------------------------------------------------------------------------------------------
// Stage fused: the implicit_gemm kernel with the bias add and the ReLU applied to the
// accumulators in registers before the one store of the output.
//   Changed since implicit_gemm + separate passes: the output is written once instead of
//   being written by the conv, then read and written by the bias pass, then read and
//   written by the ReLU pass (5 sweeps over n*k*ho*wo values become 1).
//   Bottleneck removed: the memory traffic and launch overhead of the two elementwise passes,
//   which matter most on small, memory-bound layers (7x7 feature maps, 1x1 convs).
//   ReLU keeps NaN (relu_keep_nan in common.cuh), as torch.relu.
//   Still lacks: what implicit_gemm lacks (128-bit loads, double buffering, tensor cores).
// ------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__((WIDE_BM / WIDE_TM) * (WIDE_BN / WIDE_TN))
conv2d_bias_relu_fused_wide(const REAL* __restrict__ x, const REAL* __restrict__ wt,
                            const REAL* __restrict__ bias, REAL* __restrict__ out,
                            CONV_SHAPE_PARAMS)
{
    conv_implicit_gemm<WIDE_BM, WIDE_BN, WIDE_BK, WIDE_TM, WIDE_TN, true>(x, wt, bias, out,
                                                                         CONV_SHAPE);
}

extern "C" __global__ void __launch_bounds__((NARROW_BM / NARROW_TM) * (NARROW_BN / NARROW_TN))
conv2d_bias_relu_fused_narrow(const REAL* __restrict__ x, const REAL* __restrict__ wt,
                              const REAL* __restrict__ bias, REAL* __restrict__ out,
                              CONV_SHAPE_PARAMS)
{
    conv_implicit_gemm<NARROW_BM, NARROW_BN, NARROW_BK, NARROW_TM, NARROW_TN, true>(
        x, wt, bias, out, CONV_SHAPE);
}
