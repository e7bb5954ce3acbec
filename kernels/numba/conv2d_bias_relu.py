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
    Measured (batch 1, float32, 3x3 pad 1, interleaved with ``torch.relu(F.conv2d(x, w, b))``
    in one process, 8 rounds x 10 calls after an untimed one, 2 threads for both; ms are
    medians, each row from one run; the ratio column spans the runs of this version, two or
    three per layer, minutes apart):

    ==========================  =====  ===========  ===================
    layer                       this   torch eager  torch / this
    ==========================  =====  ===========  ===================
    res2 C64 56x56 K64          1.50   1.42         0.95
    res3 C128 28x28 K128        1.57   1.23         0.78-0.84
    res4 C256 14x14 K256        1.61   1.18         0.73-0.80
    res5 C512 7x7 K512          1.65   1.22         0.74-0.88
    depthwise C128 56x56        0.21   0.19         0.82-0.93
    ==========================  =====  ===========  ===================

    With other jobs holding about one core (both libraries near their 1-thread speed) the
    ratios were 0.83-1.03 (res2 1.03). The implicit-GEMM engine this replaced (gathered patch panels,
    the matmul micro-kernel, depthwise through 6-row tiles) measured 0.38-0.70 of torch in
    runs beside it, and 0.02-0.07 on the depthwise layer.
    Benchmark pitfall seen here: torch's bundled OpenMP and Numba's system libgomp in one
    process sometimes lock into a state where every parallel call of either waits for
    scheduler ticks (this stage 24 ms, torch 40 ms, for the rest of the process);
    ``OMP_WAIT_POLICY=PASSIVE`` avoided it in every run.
    Still missing: everything `tiled` lacks (see conv2d.py): junk columns of the wide grid,
    unaligned B loads from many image rows.
    """
    # x: (N, C, H, W)  w: (K, C/groups, kH, kW)  bias: (K,)  out: (N, K, Ho, Wo)
    _conv_gemm_safe(x, w, out, p.stride_h, p.stride_w, p.pad_top, p.pad_bottom, p.pad_left,
                    p.pad_right, p.dil_h, p.dil_w, p.groups, bias, True, get_num_threads())
