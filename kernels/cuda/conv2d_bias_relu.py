"""conv2d + bias + ReLU on the GPU, fused into the implicit-GEMM kernel's epilogue.

Only the ``fused`` stage is registered here. The un-fused stages of this ladder (each conv2d
stage, then a separate bias pass and a separate ReLU pass) are registered automatically from
``conv2d.py`` by :func:`fastops.registry.derive_unfused_conv_bias_relu` before this module is
imported, so ``fused`` comes last.

Calling convention: ``kernel(x, w, bias, out, p)``; shapes as conv2d, ``bias`` (K,), all CuPy
arrays of one dtype (float32 or float64). Compile-checked only where it was written.
"""
from __future__ import annotations

from fastops.registry import register

from . import _loader
from .conv2d import CONV_DTYPE_NAMES, launch_implicit_gemm

cupy = _loader.require_cupy()  # ImportError (with the reason) when there is no CuPy or GPU


@register("conv2d_bias_relu", "cupy", "fused", "implicit GEMM with bias + ReLU in the epilogue",
          device="gpu", dtypes=CONV_DTYPE_NAMES)
def conv2d_bias_relu_fused(x, w, bias, out, p):
    """Stage fused.

    Changed since implicit_gemm + separate passes: the same implicit-GEMM kernel adds the
    bias and applies the ReLU to its accumulators in registers, then stores each output
    once. The un-fused chain writes the conv output, reads and writes it again for the bias,
    and once more for the ReLU (5 sweeps over N*K*Ho*Wo values, 3 launches) where this does
    1 sweep and 1 launch.
    Bottleneck removed: the memory traffic and launch overhead of the elementwise passes,
    which dominate small memory-bound layers (7x7 feature maps, 1x1 convolutions).
    ReLU keeps NaN as torch.relu does (v > 0 || v != v ? v : 0).
    Still lacks: what implicit_gemm lacks (128-bit loads, double buffering, tensor cores).
    """
    launch_implicit_gemm("conv2d_bias_relu.cu", "conv2d_bias_relu_fused", (x, w, bias, out),
                         x, w, out, p)
