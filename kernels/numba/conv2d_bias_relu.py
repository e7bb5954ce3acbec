"""conv2d + bias + ReLU in Numba: the epilogue fused into the tiled conv's micro-kernel.

The un-fused ladder (every conv2d stage, then a bias pass, then a ReLU pass over the output)
is derived automatically by :func:`fastops.registry.derive_unfused_conv_bias_relu`; this file
adds only the last stage. Calling convention: ``kernel(x, w, bias, out, p)`` with
x (N, C, H, W), w (K, C/groups, kH, kW), bias (K,), out (N, K, Ho, Wo), p a ConvParams.
"""
from __future__ import annotations

from numba import get_num_threads

from fastops.registry import register

from .conv2d import conv_gemm
from ._common import serialised

_conv_gemm_safe = serialised(conv_gemm)


@register("conv2d_bias_relu", "numba", "fused", "tiled implicit-GEMM conv with bias + ReLU "
          "applied in the micro-kernel epilogue")
def conv2d_bias_relu_fused(x, w, bias, out, p):
    """Stage 5 · fused.

    Changed since `tiled` (conv2d/numba/tiled followed by separate bias and ReLU passes): the
    same implicit-GEMM engine (:func:`fastops.kernels.numba.conv2d.conv_gemm`), but when the
    micro-kernel stores its 6 x 32 output block, once, at the end of the reduction, it adds
    the bias and applies ReLU (NaN stays NaN, as ``numpy.maximum``) on values still in
    registers. Depthwise-like groups (fewer than 6 output channels each) take the
    plane-by-plane path, with the same epilogue in its store.
    Bottleneck removed: two extra sweeps over the output in memory (read + write each), which
    cost as much as a small conv layer's arithmetic when the output does not fit in cache.
    Still missing: everything `tiled` lacks (see conv2d.py): junk columns of the wide grid,
    unaligned B loads from many image rows.
    """
    # x: (N, C, H, W)  w: (K, C/groups, kH, kW)  bias: (K,)  out: (N, K, Ho, Wo)
    _conv_gemm_safe(x, w, out, p.stride_h, p.stride_w, p.pad_top, p.pad_bottom, p.pad_left,
                    p.pad_right, p.dil_h, p.dil_w, p.groups, bias, True, get_num_threads())
