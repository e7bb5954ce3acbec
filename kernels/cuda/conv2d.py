"""conv2d on the GPU: direct and implicit-GEMM convolution in CUDA C, launched through CuPy.

The kernels are in ``conv2d.cu`` (and the shared implicit GEMM in ``conv_implicit_gemm.cuh``);
this file chooses tiles, sizes the grids and registers the stages in ladder order.

Calling convention (fastops.registry): ``kernel(x, w, out, p)`` with ``x`` (N, C, H, W),
``w`` (K, C/groups, kH, kW), ``out`` (N, K, Ho, Wo) CuPy arrays of one dtype (float32 or
float64: the sources are compiled once per dtype with ``-DREAL=float|double``) and ``p`` a
:class:`fastops.validation.ConvParams`. No bias: the API adds it.

No speed numbers are quoted here: these kernels were only compile-checked (nvcc, sm_80 and
sm_90) where they were written; ``benchmarks/gpu_bench.py`` measures them on a GPU.
"""
from __future__ import annotations

import numpy as np

from fastops.registry import register

from . import _loader
from ._loader import CONV_DTYPES, CONV_TILES, WIDE_MIN_CHANNELS, cdiv

cupy = _loader.require_cupy()  # ImportError (with the reason) when there is no CuPy or GPU

CONV_DTYPE_NAMES = tuple(CONV_DTYPES)  # ("float32", "float64")
NAIVE_THREADS = 256
MAX_BLOCKS = 1 << 24  # grid-stride loops cover anything beyond this


def defines(dtype) -> dict:
    return _loader.conv_defines(CONV_DTYPES[np.dtype(dtype).name])


def shape_args(x, w, out, p) -> tuple:
    """The 16 int32 kernel arguments of CONV_SHAPE_PARAMS (conv_implicit_gemm.cuh), in order."""
    n, c, h, width = x.shape
    k, _cg, kh, kw = w.shape
    _n, _k, ho, wo = out.shape
    return tuple(np.int32(v) for v in (n, c, h, width, k, ho, wo, kh, kw, p.stride_h,
                                       p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w,
                                       p.groups))


def launch_implicit_gemm(filename: str, prefix: str, arrays: tuple, x, w, out, p) -> None:
    """Launch ``<prefix>_wide`` or ``<prefix>_narrow`` of ``filename`` over the output.

    ``arrays`` are the kernel's array arguments (x, w[, bias], out). The tile is chosen by
    output channels per group: the wide 64-channel tile for dense layers, the narrow
    1-channel tile when a 64-channel tile would be mostly padding (depthwise).
    """
    n, k, ho, wo = out.shape
    kg = k // p.groups
    name = "wide" if kg >= WIDE_MIN_CHANNELS else "narrow"
    tile = CONV_TILES[name]
    grid = _loader.check_grid((cdiv(n * ho * wo, tile.bn), cdiv(kg, tile.bm), p.groups),
                              f"{prefix} with output {out.shape}, groups={p.groups}")
    fn = _loader.kernel(filename, f"{prefix}_{name}", defines(out.dtype))
    with out.device:
        fn(grid, (tile.threads,), (*arrays, *shape_args(x, w, out, p)))


@register("conv2d", "cupy", "naive", "direct convolution, one thread per output element",
          device="gpu", dtypes=CONV_DTYPE_NAMES, max_flops=5e10)
def conv2d_naive(x, w, out, p):
    """Stage 1 · naive.

    Direct convolution: one CUDA thread per output element (n, k, oh, ow), ow fastest, sums
    its (C/groups)*kH*kW products straight from global memory. Stores are coalesced, and so
    are input loads for stride 1, but nothing is staged on chip: each input value is fetched
    once per output that uses it and each weight once per output pixel, two loads per
    multiply-add, so the kernel is bound by cache bandwidth, not arithmetic.
    Lacks: any data reuse in shared memory or registers.
    """
    total = out.size
    fn = _loader.kernel("conv2d.cu", "conv2d_naive", defines(out.dtype))
    grid = (min(cdiv(total, NAIVE_THREADS), MAX_BLOCKS),)
    with out.device:
        fn(grid, (NAIVE_THREADS,), (x, w, out, *shape_args(x, w, out, p)))


@register("conv2d", "cupy", "implicit_gemm",
          "shared-memory tiled implicit GEMM, im2col gathered on the fly",
          device="gpu", dtypes=CONV_DTYPE_NAMES)
def conv2d_implicit_gemm(x, w, out, p):
    """Stage 2 · implicit_gemm.

    Changed since naive: the convolution of group g becomes the GEMM
    out_g (K/g x N*Ho*Wo) = W_g (K/g x C/g*kH*kW) @ im2col(x)_g, computed as a tiled GEMM
    whose im2col operand is never materialised: each BK x BN tile of it is gathered into
    shared memory with on-the-fly index math (reduction index -> channel, tap; column ->
    image, output pixel -> input pixel, or 0 for padding). A block stages a 64-channel weight
    tile and a 64-pixel input tile (16 deep) and each thread accumulates 4 x 4 outputs in
    registers, so each gathered input value feeds 64 multiply-adds and each weight 64.
    Depthwise and other thin groups (K/groups < 16) use a 1-channel x 256-pixel tile instead.
    Bottleneck removed: the global/L2 traffic of naive (two loads per multiply-add).
    Still lacks: 128-bit loads, double-buffered tiles (gathers and FMAs do not overlap), a
    cheaper index decode (two integer divisions per gathered element), tensor cores.
    """
    launch_implicit_gemm("conv2d.cu", "conv2d_implicit_gemm", (x, w, out), x, w, out, p)
