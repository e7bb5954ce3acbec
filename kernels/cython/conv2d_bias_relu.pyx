# cython: language_level=3
"""conv2d + bias + ReLU in Cython: the fused stage.

The un-fused stages (naive ... tiled conv, then a bias pass and a ReLU pass over the output)
are derived automatically by fastops.registry from conv2d.pyx; this chapter adds only the
last step: do the bias and ReLU inside the tiled conv's write-back.
"""
from fastops.kernels.cython.conv2d import conv2d_tiled_epilogue
from fastops.registry import register


@register("conv2d_bias_relu", "cython", "fused",
          "tiled implicit-GEMM conv with bias + ReLU in the micro-kernel write-back")
def conv2d_bias_relu_fused(x, w, bias, out, p):
    """Stage 5 · fused.

    Changed since `tiled` (+ separate passes): the bias add and the ReLU run in the
    micro-kernel's epilogue, on the MR x NR block of out while it is still in zmm registers,
    on the last KC block only (microkernel.h: add the row's bias, then max(0, v), which keeps
    NaN like numpy.maximum), in the masked segment write-back of the direct kernel too. The
    depthwise kernel (depthwise.h) starts its register accumulators at the bias and applies
    the ReLU before its one store of each block of output columns.
    Bottleneck removed: two extra sweeps over out (read + write each) that the un-fused
    ladder makes after the conv: for a 64 x 56 x 56 float32 output that is 4 x 0.8 MB of
    memory traffic per image.
    Still missing: everything `tiled` lacks.
    """
    # x: (N, C, H, W)  w: (K, C/groups, kH, kW)  bias: (K,)  out: (N, K, Ho, Wo)
    conv2d_tiled_epilogue(x, w, out, p, bias, True)
