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
SPLIT_SUM_THREADS = 256  # split-K's second pass: one thread per output, like naive
MAX_BLOCKS = 1 << 24  # grid-stride loops cover anything beyond this
# Split-K keeps at least this many rows of the reduction per split (32 BK-deep slices of 8):
# a split's main loop must stay long against its prologue (first fetch, decode) and its
# epilogue (a store of every output it covers); ResNet-50's res4 / res5 (R = 2304 / 4608)
# could split up to 9 / 18 ways, a 1x1 C64 layer (R = 64) not at all.
MIN_SPLIT_ROWS = 256


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


def _launch_tile(filename: str, name: str, tile, arrays: tuple, x, w, out, p, *extra,
                 splits: int = 1) -> None:
    """Launch kernel ``name`` of ``filename`` with block tile ``tile`` over the output:
    grid (pixel tiles, channel tiles per group, groups * splits), ``tile.threads`` threads a
    block (``splits`` > 1: split-K, block z = split * groups + g; conv_pipelined.cuh)."""
    n, k, ho, wo = out.shape
    kg = k // p.groups
    grid = _loader.check_grid(
        (cdiv(n * ho * wo, tile.bn), cdiv(kg, tile.bm), p.groups * splits),
        f"{name} with output {out.shape}, groups={p.groups}, splits={splits}")
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
    FMAs it needs. Small-pixel x small-channel layers stay under-filled by every tile; for
    those :func:`choose_split_k` splits the reduction.
    """
    tiles = PIPELINED_TILES[np.dtype(dtype).name]
    shortest = min(t.bm for t in tiles)
    fitting = [i for i, t in enumerate(tiles) if t.bm <= max(kg, shortest)]
    for i in fitting:
        if cdiv(pixels, tiles[i].bn) * cdiv(kg, tiles[i].bm) * groups >= sms:
            return i
    return fitting[-1]


def choose_split_k(blocks: int, reduction: int, sms: int) -> int:
    """How many ways to split the reduction of a layer whose chosen tile gives ``blocks``
    blocks, each summing ``reduction`` = (C/groups)*kH*kW rows, on a GPU with ``sms`` SMs.

    Rule: 1 (no split) when the tile already gives every SM a block; otherwise the smallest S
    with ``blocks * S >= sms``, capped at ``reduction // MIN_SPLIT_ROWS`` so every split
    still runs >= 256 rows (32 BK-slices) of the double-buffered loop. On an H200 (132 SMs),
    ResNet-50 at batch 8 (float32, 64 x 64 tiles): res4 (3x3 C256 14x14, R = 2304) 100
    blocks -> S = 2, 200 blocks; res5 (3x3 C512 7x7, R = 4608) 56 blocks -> S = 3, 168
    blocks. Every other layer of the set already fills the GPU (S = 1). :func:`split_slices`
    turns S into whole BK-slices per split (which may lower it).
    """
    if blocks <= 0 or blocks >= sms:
        return 1
    return max(1, min(cdiv(sms, blocks), reduction // MIN_SPLIT_ROWS))


def split_slices(reduction: int, bk: int, splits: int) -> tuple[int, int]:
    """(splits actually used, rows per split) for cutting ``reduction`` rows ``splits`` ways
    on BK boundaries (the kernel's counters and its tail check assume a split starts on one).

    Each split gets ``cdiv(cdiv(reduction, bk), splits)`` BK-slices; the last one the rest.
    That can leave fewer non-empty splits than asked (R = 24 = 3 slices of 8, asked 2: 2
    slices + 1; asked 5: 3 splits of one slice each), so the count is clamped to the
    non-empty ones: no block ever runs an empty range. ValueError for ``splits`` < 1.
    """
    if not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ValueError(f"split-K: expected a positive number of splits, got {splits!r}")
    slice_rows = cdiv(cdiv(reduction, bk), splits) * bk
    return cdiv(reduction, slice_rows), slice_rows


def launch_pipelined(filename: str, prefix: str, narrow: str, x, w, bias, out, p,
                     tile: int | None = None, splits: int | None = None) -> None:
    """Launch ``<prefix>_<i>`` of ``filename``: tile i of ``PIPELINED_TILES[out.dtype]``,
    with the bias (None for conv2d) as the kernel's third array argument when given.

    ``tile=None`` picks i with :func:`choose_pipelined_tile` for this GPU's SM count, and
    hands depthwise / thin groups (K/groups < WIDE_MIN_CHANNELS) to kernel ``narrow`` (stage
    implicit_gemm's 1-channel tile). An explicit ``tile`` (the tests force each one) runs
    that tile whatever the shape. The kernel stores 128-bit vectors when every output row run
    it writes is aligned: ho*wo a multiple of the vector width and ``out`` 16-byte aligned.

    Split-K: ``splits=None`` chooses S with :func:`choose_split_k` when the tile is chosen
    too, and runs unsplit (S = 1) when the tile is forced; an explicit ``splits`` is clamped
    by :func:`split_slices`. With S > 1, conv2d.cu's ``conv2d_pipelined_<i>`` (whichever
    stage this is: the partials are raw sums) writes S partial outputs into a (S, N, K, Ho,
    Wo) workspace from CuPy's memory pool on out's device (no cudaMalloc after the first
    call of a size), and ``<filename stem>_split_sum`` adds them in order, applies this
    stage's epilogue (bias + ReLU for the fused stage) and writes ``out`` once.
    """
    n, k, ho, wo = out.shape
    kg = k // p.groups
    reduction = w.shape[1] * w.shape[2] * w.shape[3]  # R = (C/groups) * kH * kW
    arrays = (x, w, out) if bias is None else (x, w, bias, out)
    tiles = PIPELINED_TILES[out.dtype.name]
    if tile is None:
        if kg < WIDE_MIN_CHANNELS:
            _launch_tile(filename, narrow, CONV_TILES["narrow"], arrays, x, w, out, p)
            return
        sms = sm_count(out.device.id)
        tile = choose_pipelined_tile(out.dtype, kg, p.groups, n * ho * wo, sms)
        if splits is None:
            blocks = cdiv(n * ho * wo, tiles[tile].bn) * cdiv(kg, tiles[tile].bm) * p.groups
            splits = choose_split_k(blocks, reduction, sms)
    splits, slice_rows = split_slices(reduction, tiles[tile].bk, 1 if splits is None else splits)
    if splits == 1:
        _launch_tile(filename, f"{prefix}_{tile}", tiles[tile], arrays, x, w, out, p,
                     _vec_store(out), np.int32(slice_rows))
    else:
        _launch_split_k(filename, tile, splits, slice_rows, x, w, bias, out, p)


def _vec_store(target) -> np.int32:
    """The kernels' ``vec_out`` flag: 1 when every run of 16 bytes of output pixels it stores
    is 16-byte aligned (Ho*Wo a multiple of the vector width, ``target`` 16-byte aligned)."""
    ho, wo = target.shape[-2:]
    vec = 16 // target.dtype.itemsize  # values per 128-bit store: float4 or double2
    return np.int32((ho * wo) % vec == 0 and target.data.ptr % 16 == 0)


def _launch_split_k(filename: str, tile: int, splits: int, slice_rows: int, x, w, bias, out,
                    p) -> None:
    """Split-K in two launches: S partial outputs into a workspace, then their sum into out."""
    n, k, ho, wo = out.shape
    with out.device:  # CuPy's pool: after the first call of a size, no cudaMalloc
        ws = cupy.empty((splits, n, k, ho, wo), out.dtype)  # partial s: ws[s], out's layout
    # Partials are raw sums whichever stage this is: conv2d.cu's kernel (no epilogue) writes
    # them; partial s starts s*N*K*Ho*Wo values in, so vector alignment is as for ws[0].
    _launch_tile("conv2d.cu", f"conv2d_pipelined_{tile}", PIPELINED_TILES[out.dtype.name][tile],
                 (x, w, ws), x, w, out, p, _vec_store(ws), np.int32(slice_rows), splits=splits)
    # The sum pass of this stage's file: conv2d_split_sum or conv2d_bias_relu_split_sum.
    fn = _loader.kernel(filename, filename.removesuffix(".cu") + "_split_sum", defines(out.dtype))
    grid = (min(cdiv(out.size, SPLIT_SUM_THREADS), MAX_BLOCKS),)
    bias_arg = () if bias is None else (bias,)
    with out.device:
        fn(grid, (SPLIT_SUM_THREADS,),
           (ws, *bias_arg, out, *(np.int32(v) for v in (n, k, ho * wo, splits))))


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


def run_pipelined(x, w, out, p, tile: int | None = None, splits: int | None = None) -> None:
    """Stage pipelined with tile ``tile`` of ``_loader.PIPELINED_TILES`` and ``splits``-way
    split-K forced (the tests run every tile and several splits through here), or chosen by
    shape when None (the registered stage); see :func:`launch_pipelined`."""
    launch_pipelined("conv2d.cu", "conv2d_pipelined", "conv2d_implicit_gemm_narrow", x, w, None,
                     out, p, tile, splits)


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
    takes two registers) that still gives each of the GPU's SMs a block; (5) split-K where
    even the smallest tile leaves SMs idle and the reduction is long
    (:func:`choose_split_k`): the same kernel, launched over groups * S z-blocks, sums S
    BK-aligned slices of R into a (S, N, K, Ho, Wo) workspace, and a second, elementwise
    kernel adds the S partials in a fixed order (deterministic, no atomics) into ``out``.
    Depthwise / thin groups (K/groups < 16) keep stage 2's 1-channel tile.
    Bottleneck removed: shared-memory load issue per FMA, global-load latency exposed
    between tiles, the gather's integer divisions, and idle SMs on layers with few pixels
    and few channels but long reductions: ResNet-50 at batch 8 on an H200's 132 SMs, res4
    (3x3 C256 14x14, R = 2304) goes from 100 blocks of 64 x 64 to 2 x 100 = 200, res5 (3x3
    C512 7x7, R = 4608) from 56 to 3 x 56 = 168. The price: the S partials are written and
    read once more (res4: 2 x 1.6 MB, res5: 3 x 0.8 MB, each way) plus a second launch,
    small against the 1.85 GFLOP of either layer.
    Still lacks: tensor cores (TF32 / FP64 MMA), cp.async / TMA copies, 128-bit global loads,
    and a split-K that reduces inside the GEMM kernel (CUTLASS's serial split-K, stream-K)
    instead of through a workspace; the tile is not re-chosen once a layer is split (a
    larger tile split more ways would reuse more per load).
    Registers (ptxas, nvcc 13.0, sm_90): float32 157 / 107 / 109 / 64 for the four tiles
    (the 128 x 128 tile fits one 256-thread block per SM, the others two or more); float64
    128 / 106 / 78 / 138; the split sum 32; no spills. Compile-checked and CPU-emulated only
    where it was written (no GPU): it is designed to buy the above, not measured to.
    """
    run_pipelined(x, w, out, p)
