"""conv2d on the GPU: direct and implicit-GEMM convolution in CUDA C, launched through CuPy.

The kernels are in ``conv2d.cu`` (the shared implicit GEMMs in ``conv_implicit_gemm.cuh`` and
``conv_pipelined.cuh``); this file chooses tiles, sizes the grids and registers the stages in
ladder order.

Calling convention (fastops.registry): ``kernel(x, w, out, p)`` with ``x`` (N, C, H, W),
``w`` (K, C/groups, kH, kW), ``out`` (N, K, Ho, Wo) CuPy arrays of one dtype (float32 or
float64: the sources are compiled once per dtype with ``-DREAL=float|double``) and ``p`` a
:class:`fastops.validation.ConvParams`. No bias: the API adds it.

No speed numbers are quoted here: these kernels were only compile-checked (nvcc, sm_80 and
sm_90) where they were written; ``benchmarks/gpu_bench.py`` measures them on a GPU.
"""
from __future__ import annotations

import functools

import numpy as np

from fastops.registry import register

from . import _loader
from ._loader import CONV_DTYPES, CONV_TILES, PIPELINED_TILES, WIDE_MIN_CHANNELS, cdiv

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


def _launch_tile(filename: str, name: str, tile, arrays: tuple, x, w, out, p, *extra) -> None:
    """Launch kernel ``name`` of ``filename`` with block tile ``tile`` over the output:
    grid (pixel tiles, channel tiles per group, groups), ``tile.threads`` threads a block."""
    n, k, ho, wo = out.shape
    kg = k // p.groups
    grid = _loader.check_grid((cdiv(n * ho * wo, tile.bn), cdiv(kg, tile.bm), p.groups),
                              f"{name} with output {out.shape}, groups={p.groups}")
    fn = _loader.kernel(filename, name, defines(out.dtype))
    with out.device:
        fn(grid, (tile.threads,), (*arrays, *shape_args(x, w, out, p), *extra))


def launch_implicit_gemm(filename: str, prefix: str, arrays: tuple, x, w, out, p) -> None:
    """Launch ``<prefix>_wide`` or ``<prefix>_narrow`` of ``filename`` over the output.

    ``arrays`` are the kernel's array arguments (x, w[, bias], out). The tile is chosen by
    output channels per group: the wide 64-channel tile for dense layers, the narrow
    1-channel tile when a 64-channel tile would be mostly padding (depthwise).
    """
    name = "wide" if out.shape[1] // p.groups >= WIDE_MIN_CHANNELS else "narrow"
    _launch_tile(filename, f"{prefix}_{name}", CONV_TILES[name], arrays, x, w, out, p)


@functools.lru_cache(maxsize=None)
def sm_count(device_id: int) -> int:
    """Streaming multiprocessors of GPU ``device_id`` (read once per device: 132 on an H200)."""
    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def choose_pipelined_tile(dtype, kg: int, groups: int, pixels: int, sms: int) -> int:
    """Index into ``PIPELINED_TILES[dtype]`` of the tile for a layer with ``kg`` output
    channels per group, ``groups`` groups and ``pixels`` = N*Ho*Wo output pixels on a GPU
    with ``sms`` SMs.

    The tiles are listed largest first. A larger tile reuses each loaded value more (fewer
    loads per FMA), but a grid with fewer blocks than SMs leaves SMs idle for the whole
    kernel: ResNet-50's res5 at batch 8 (392 pixels x 512 channels) makes only 4 x 4 = 16
    blocks of 128 x 128 for 132 SMs. So: the first (largest) tile that gives at least one
    block per SM; when none does, the last (smallest), which gives the most blocks. Tiles
    taller than ``kg`` are skipped (unless no tile is that short): their extra channel rows
    would be pure padding, e.g. a 128-row tile on a 64-channel layer computes twice the
    FMAs it needs. Small-pixel x small-channel layers stay under-filled: that would need
    split-K, which the one-pass fused epilogue rules out.
    """
    tiles = PIPELINED_TILES[np.dtype(dtype).name]
    shortest = min(t.bm for t in tiles)
    fitting = [i for i, t in enumerate(tiles) if t.bm <= max(kg, shortest)]
    for i in fitting:
        if cdiv(pixels, tiles[i].bn) * cdiv(kg, tiles[i].bm) * groups >= sms:
            return i
    return fitting[-1]


def launch_pipelined(filename: str, prefix: str, narrow: str, arrays: tuple, x, w, out, p,
                     tile: int | None = None) -> None:
    """Launch ``<prefix>_<i>`` of ``filename``: tile i of ``PIPELINED_TILES[out.dtype]``.

    ``tile=None`` picks i with :func:`choose_pipelined_tile` for this GPU's SM count, and
    hands depthwise / thin groups (K/groups < WIDE_MIN_CHANNELS) to kernel ``narrow`` (stage
    implicit_gemm's 1-channel tile). An explicit ``tile`` (the tests force each one) runs
    that tile whatever the shape. The kernel stores 128-bit vectors when every output row run
    it writes is aligned: ho*wo a multiple of the vector width and ``out`` 16-byte aligned.
    """
    n, k, ho, wo = out.shape
    kg = k // p.groups
    if tile is None:
        if kg < WIDE_MIN_CHANNELS:
            _launch_tile(filename, narrow, CONV_TILES["narrow"], arrays, x, w, out, p)
            return
        tile = choose_pipelined_tile(out.dtype, kg, p.groups, n * ho * wo,
                                     sm_count(out.device.id))
    vec = 16 // out.dtype.itemsize  # values per 128-bit store: float4 or double2
    vec_out = (ho * wo) % vec == 0 and out.data.ptr % 16 == 0
    _launch_tile(filename, f"{prefix}_{tile}", PIPELINED_TILES[out.dtype.name][tile], arrays,
                 x, w, out, p, np.int32(vec_out))


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


def run_pipelined(x, w, out, p, tile: int | None = None) -> None:
    """Stage pipelined with tile ``tile`` of ``_loader.PIPELINED_TILES`` forced (the tests run
    every tile through here), or chosen by shape when None (the registered stage)."""
    launch_pipelined("conv2d.cu", "conv2d_pipelined", "conv2d_implicit_gemm_narrow", (x, w, out),
                     x, w, out, p, tile)


@register("conv2d", "cupy", "pipelined",
          "128x128 register-blocked implicit GEMM, double-buffered, division-free gathers",
          device="gpu", dtypes=CONV_DTYPE_NAMES)
def conv2d_pipelined(x, w, out, p):
    """Stage 3 · pipelined.

    Changed since implicit_gemm: what siboehm's SGEMM kernels 6 and 9 and CUTLASS's optimized
    implicit-GEMM iterators add (conv_pipelined.cuh), each for a reason:
    (1) larger register blocking, float32 up to a 128-channel x 128-pixel tile with 8 x 8
    outputs per thread (BK = 8, 256 threads): 64 FMAs per 16 fragment values read instead of
    16 per 8; (2) the weight tile transposed in shared memory, so both fragments are read as
    runs of 4 floats (2 doubles) with 128-bit shared loads: 16 FMAs per shared-load
    instruction instead of 2; (3) register-staged double buffering: two shared buffers, the
    next slice's weights and im2col gathers loaded into registers while this slice's FMAs
    run, one __syncthreads per slice; (4) division-free gathers: each thread's im2col rows
    carry (channel, tap row, tap column) counters advanced by BK with one compare-and-subtract
    per level, instead of two integer divisions per gathered element. The tile is chosen per
    layer by occupancy (:func:`choose_pipelined_tile`): the largest of 128x128, 128x64,
    64x128, 64x64 (float64: 64x64 down to 32x32, 4 x 4 or 2 x 4 per thread, since a double
    takes two registers) that still gives each of the GPU's SMs a block.
    Depthwise / thin groups (K/groups < 16) keep stage 2's 1-channel tile.
    Bottleneck removed: shared-memory load issue per FMA, global-load latency exposed
    between tiles, and the gather's integer divisions.
    Still lacks: tensor cores (TF32 / FP64 MMA), cp.async / TMA copies, 128-bit global loads,
    and split-K, so layers with few pixels and few channels (ResNet-50 res4/res5 at batch 8:
    56-100 blocks of 64 x 64 for 132 SMs) leave SMs idle.
    Registers (ptxas, nvcc 13.0, sm_90): float32 179 / 121 / 109 / 79 for the four tiles
    (the 128 x 128 tile fits one 256-thread block per SM, the others two or more); float64
    128 / 126 / 78 / 140; no spills. Compile-checked and CPU-emulated only where it was
    written (no GPU): it is designed to buy the above, not measured to.
    """
    run_pipelined(x, w, out, p)
