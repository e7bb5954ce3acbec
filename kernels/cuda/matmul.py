"""matmul on the GPU: the float32 SGEMM ladder in CUDA C, launched through CuPy.

The kernels are in ``matmul.cu`` beside this file, one per stage in the same order; this file
sizes the launch grids and registers the stages. Each stage's docstring is its lesson; the
CUDA source has the same text next to the code. The ladder follows siboehm/SGEMM_CUDA (naive,
coalescing, shared-memory tiling, 2-D block tiling, vectorised access, warp tiling), with
bounds checks added so any M, N, K works.

Calling convention (fastops.registry): ``kernel(a, b, out)``, ``a`` (M, K), ``b`` (K, N),
``out`` (M, N), all float32 CuPy arrays, C-contiguous, on the current device.
float32 only: the vectorised stages move float4 (4 x 32-bit) values, and FP32 is the GPU's fast
non-tensor-core format (FP64 runs at half of it on an H200 and a fraction on consumer parts).

No speed numbers are quoted here: this ladder was only compile-checked (nvcc, sm_80 and sm_90)
where it was written; ``benchmarks/gpu_bench.py`` measures it on a GPU and writes the table.
"""
from __future__ import annotations

import numpy as np

from fastops.registry import register

from . import _loader
from ._loader import BT_THREADS, MATMUL_DEFINES as T, WARPTILE, WarpTile, cdiv

cupy = _loader.require_cupy()  # ImportError (with the reason) when there is no CuPy or GPU

F32 = ("float32",)


def _launch(name: str, grid, block, a, b, out, *extra, defines=T) -> None:
    m, k = a.shape
    n = b.shape[1]
    fn = _loader.kernel("matmul.cu", name, defines)
    grid = _loader.check_grid(grid, f"matmul/{name} with M={m}, N={n}")
    with out.device:
        fn(grid, block, (a, b, out, np.int32(m), np.int32(n), np.int32(k), *extra))


def _vec_flags(a, b, out):
    """Whether each matrix's rows start on 16-byte boundaries, so float4 accesses are legal.

    True when the row length is a multiple of 4 floats and the base pointer is 16-byte
    aligned (CuPy allocations are; views into a batch may not be).
    """
    k, n = a.shape[1], b.shape[1]
    return (np.int32(k % 4 == 0 and a.data.ptr % 16 == 0),
            np.int32(n % 4 == 0 and b.data.ptr % 16 == 0),
            np.int32(n % 4 == 0 and out.data.ptr % 16 == 0))


@register("matmul", "cupy", "naive", "one thread per C element, warps along M: uncoalesced",
          device="gpu", dtypes=F32, max_flops=1.5e11)
def matmul_naive(a, b, out):
    """Stage 1 · naive.

    One CUDA thread per element of C computes its dot product straight from global memory.
    Threads are numbered down the M axis (threadIdx.x -> row), so the 32 threads of a warp
    read A at addresses K floats apart and write C N floats apart: no access is coalesced,
    each costs its own memory transaction. Nothing is reused on chip: 2 loads per FMA.
    Lacks: coalescing, on-chip reuse, everything. max_flops keeps it at or under 4096^3.
    """
    m, n = a.shape[0], b.shape[1]
    _launch("matmul_naive", (cdiv(m, 32), cdiv(n, 32)), (32, 32), a, b, out)


@register("matmul", "cupy", "coalesced", "threads renumbered so a warp reads one row of B: coalesced",
          device="gpu", dtypes=F32, max_flops=1.5e11)
def matmul_coalesced(a, b, out):
    """Stage 2 · coalesced.

    Changed since naive: only the mapping from thread index to (row, column). A warp now
    covers 32 consecutive columns of one row, so its loads of B and its stores of C are one
    128-byte transaction each, and its load of A is a single broadcast.
    Bottleneck removed: uncoalesced global memory access (memory transactions per useful
    byte drop by up to 32x).
    Still lacks: on-chip reuse; every FMA still needs two loads from the cache hierarchy.
    """
    m, n = a.shape[0], b.shape[1]
    tile = T["TILE"]
    _launch("matmul_coalesced", (cdiv(m, tile), cdiv(n, tile)), (tile * tile,), a, b, out)


@register("matmul", "cupy", "smem", "32x32 tiles of A and B staged in shared memory",
          device="gpu", dtypes=F32)
def matmul_smem(a, b, out):
    """Stage 3 · smem.

    Changed since coalesced: the block walks K in 32-wide steps; each step copies a 32 x 32
    tile of A and of B into shared memory (one coalesced load per thread), then each thread
    runs 32 FMAs out of shared memory.
    Bottleneck removed: global memory / L2 traffic, cut by the tile width (32x fewer loads).
    Still lacks: register reuse; each FMA still costs two shared-memory loads, so shared
    memory bandwidth, not arithmetic, is the limit. Tiles: 2 x 32*32*4 B = 8 KiB per block.
    """
    m, n = a.shape[0], b.shape[1]
    tile = T["TILE"]
    _launch("matmul_smem", (cdiv(m, tile), cdiv(n, tile)), (tile * tile,), a, b, out)


@register("matmul", "cupy", "blocktiled", "2-D register blocking: 8x8 outputs per thread",
          device="gpu", dtypes=F32)
def matmul_blocktiled(a, b, out):
    """Stage 4 · blocktiled.

    Changed since smem: a block of 256 threads owns a 128 x 128 tile of C and walks K in
    steps of 8; each thread accumulates an 8 x 8 block of C in registers. Per k step a thread
    loads 8 values of A and 8 of B from shared memory and does 64 FMAs with them.
    Bottleneck removed: shared-memory bandwidth (16 shared loads per 64 FMAs instead of 2 per
    FMA); arithmetic intensity per block grows with the 128 x 128 tile.
    Still lacks: 128-bit memory instructions, and the A tile is read down a column of shared
    memory. Tiles: (128*8 + 8*128) * 4 B = 8 KiB of shared memory; 143 registers per thread.
    """
    m, n = a.shape[0], b.shape[1]
    grid = (cdiv(m, T["BT_BM"]), cdiv(n, T["BT_BN"]))
    _launch("matmul_blocktiled", grid, (BT_THREADS,), a, b, out)


@register("matmul", "cupy", "vectorized", "float4 global loads/stores, A tile transposed in smem",
          device="gpu", dtypes=F32)
def matmul_vectorized(a, b, out):
    """Stage 5 · vectorized.

    Changed since blocktiled: tiles move between global and shared memory as float4 (128-bit)
    loads and stores, the A tile is stored transposed so the 8 values of A a thread needs
    per k step are contiguous (two 128-bit shared loads), and C is written with float4
    stores. When a matrix's rows are not 16-byte aligned (K or N not a multiple of 4, or a
    misaligned view) the kernel takes scalar loads for that matrix instead.
    Bottleneck removed: load/store instruction issue (a quarter of the memory instructions).
    Still lacks: warp-level tiling, double-buffered loads overlapping the FMAs, tensor cores.
    """
    m, n = a.shape[0], b.shape[1]
    grid = (cdiv(m, T["BT_BM"]), cdiv(n, T["BT_BN"]))
    _launch("matmul_vectorized", grid, (BT_THREADS,), a, b, out, *_vec_flags(a, b, out))


def run_warptiled(a, b, out, tile: WarpTile = WARPTILE) -> None:
    """The warptiled kernel (stage 6) compiled for block/warp/thread tile ``tile``.

    ``tile`` is one of ``_loader.WARPTILES`` or any tile ``_loader.check_warptile`` accepts
    (ValueError otherwise). The registered stage runs it with the default tile; the tile
    sweep in benchmarks/gpu_bench.py and the tests run every candidate through here. Each tile
    is its own compiled module, cached per device like every other kernel.
    """
    defines = _loader.matmul_defines(tile)
    m, n = a.shape[0], b.shape[1]
    grid = (cdiv(m, tile.bm), cdiv(n, tile.bn))
    _launch("matmul_warptiled", grid, (tile.nt,), a, b, out, *_vec_flags(a, b, out),
            defines=defines)


@register("matmul", "cupy", "warptiled",
          f"block -> warp -> thread tiling, BK {WARPTILE.bk}, "
          f"{WARPTILE.results_per_thread} results/thread",
          device="gpu", dtypes=F32)
def matmul_warptiled(a, b, out):
    """Stage 6 · warptiled.

    Changed since vectorized: a level of tiling for the warp sits between the block tile and
    the thread fragment. With the default tile, a block of 4 warps owns 128 x 128 of C; each
    warp owns a 64 x 64 warp tile, covered in 1 x 4 sub-tiles of 64 x 16; in each sub-tile a
    lane holds an 8 x 4 fragment, so a lane accumulates 128 results. Lanes of a warp read
    neighbouring shared-memory words (fewer bank conflicts), every value loaded into a
    register feeds 16 or 8 FMAs, and BK doubles to 16 so each pair of __syncthreads() buys
    twice the arithmetic.
    Bottleneck removed: shared-memory bank conflicts and synchronisation per FMA.
    Still lacks: asynchronous double-buffered tile loads (cp.async / TMA) and tensor cores
    (TF32 wgmma on Hopper), which is most of the remaining gap to the vendor BLAS.

    The tile: the sizes above are the default, siboehm/SGEMM_CUDA's A6000 setting, and were
    not tuned for the H200. ``_loader.WARPTILES`` lists candidate tiles (published settings for
    this kernel on Ampere-class GPUs, larger 256-thread blocks, BK 8 / 16 / 32);
    benchmarks/gpu_bench.py times each against cuBLAS at 4096^3 on the GPU and reports the
    best; making the winner the default is then one line (``_loader.WARPTILE``). Nothing was
    measured where this was written (no GPU): which tile wins on the H200 is for that sweep to
    say.
    """
    run_warptiled(a, b, out, WARPTILE)
