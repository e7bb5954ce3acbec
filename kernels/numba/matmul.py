"""matmul in Numba: from the textbook triple loop to a packed, register-blocked GEMM.

What you will learn, stage by stage:

1. ``naive``: the i, j, k triple loop. One dot product per output, walking a column of ``b``
   with a stride of N elements: one cache line fetched per multiply-add, no SIMD.
2. ``vectorized``: the i, k, j order. The inner loop now walks a row of ``b`` and a row of
   ``out`` contiguously with independent iterations, so LLVM emits packed FMAs.
3. ``parallel``: the same rows, shared out over the cores with ``prange``.
4. ``tiled``: cache blocking, packing and register blocking, the structure of every fast GEMM
   (Goto/BLIS): a KC x NC block of ``b`` is copied into contiguous NR-wide panels that stay in
   L2, an MC x KC block of ``a`` into MR-tall panels, and a MR x NR block of ``out`` lives in
   registers for a whole KC-long reduction.

Calling convention (fastops.registry): ``kernel(a, b, out)`` with a (M, K), b (K, N),
out (M, N), all C-contiguous, one dtype (float32 or float64). Numba compiles one version per
dtype from the same source. ``out`` arrives uninitialised and is fully overwritten.

Measured numbers are in the stage docstrings, with how they were taken.
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, prange

from fastops.registry import register

from ._common import FASTMATH, jit, serialised, stack_vector

# ---------------------------------------------------------------------------------- tile sizes
# Register block: MR rows x NR columns of ``out``. float32: 6 rows x 32 columns = 12 zmm
# accumulators (24 for float64), plus the NR-wide row of b and one broadcast of a: below the 32
# vector registers of AVX-512, so nothing spills. Each k step does MR*NR FMAs for MR + NR loads.
# Measured on one thread, a kc=256 tile in L1: 4x32 107, 6x32 112, 8x32 114, 4x64 112 GFLOP/s;
# 6x32 keeps float64 (24 accumulators) spill-free too.
MR = 6
NR = 32
# Cache blocks. A packed B panel is KC x NR; the MR-row A panel (KC x MR x 4 B = 6 KiB) stays in
# L1 (48 KiB) while the micro-kernel sweeps every B panel of the block; the KC x NC block of B
# (256 x 512 x 4 B = 512 KiB float32, 1 MiB float64) stays in L2 (2 MiB) while every A panel of
# the MC rows passes by. The MC x KC block of A (96 x 256 x 4 B = 96 KiB) is copied once per
# K block.
KC = 256
NC = 512
MC = 96


# ---------------------------------------------------------------------------------- stage 1
@jit()
def _matmul_naive(a, b, out):
    m, k = a.shape
    n = b.shape[1]
    zero = np.zeros(1, dtype=out.dtype)[0]  # accumulate in the inputs' dtype
    for i in range(m):
        for j in range(n):
            acc = zero
            for p in range(k):
                acc += a[i, p] * b[p, j]  # b[p, j]: stride N -> a new cache line every step
            out[i, j] = acc


@register("matmul", "numba", "naive", "textbook i,j,k triple loop, one thread", max_flops=3e8)
def matmul_naive(a, b, out):
    """Stage 1 · naive.

    The i, j, k triple loop compiled by Numba: for each output, a dot product of a row of
    ``a`` with a column of ``b``.
    Bottleneck: the inner loop walks ``b`` down a column, N elements apart, so every multiply-add
    touches a new cache line; it is one serial chain of dependent adds (no FMA reordering allowed
    without fast-math), so no SIMD either.
    Still missing: contiguous access, SIMD, threads, cache reuse.
    """
    # a: (M, K)  b: (K, N)  out: (M, N)
    _matmul_naive(a, b, out)


# ---------------------------------------------------------------------------------- stage 2
@jit(fastmath=FASTMATH)
def _matmul_row(a, b, out, i):
    """out[i, :] = a[i, :] @ b, as K axpy updates along contiguous rows (i, k, j order)."""
    n = b.shape[1]
    for j in range(n):
        out[i, j] = 0.0
    for p in range(a.shape[1]):
        aip = a[i, p]
        for j in range(n):  # contiguous in b and out, iterations independent -> SIMD FMAs
            out[i, j] += aip * b[p, j]


@jit(fastmath=FASTMATH)
def _matmul_vectorized(a, b, out):
    for i in range(a.shape[0]):
        _matmul_row(a, b, out, i)


@register("matmul", "numba", "vectorized", "i,k,j order: contiguous inner loop, SIMD FMAs")
def matmul_vectorized(a, b, out):
    """Stage 2 · vectorized.

    Changed since `naive`: loops reordered to i, k, j. The inner loop is an axpy,
    ``out[i, :] += a[i, k] * b[k, :]``, over contiguous rows with independent iterations, and
    fast-math ``contract`` + ``reassoc`` lets LLVM turn it into packed FMAs (the test suite checks
    the assembly for ``vfmadd...ps`` on ymm/zmm).
    Bottleneck removed: strided access and scalar arithmetic.
    Still missing: one core only; every k step reloads and rewrites the whole ``out`` row, so the
    FMA units wait on loads/stores to L1/L2 (a row of b is re-read once per row of a).
    """
    # a: (M, K)  b: (K, N)  out: (M, N)
    _matmul_vectorized(a, b, out)


# ---------------------------------------------------------------------------------- stage 3
@jit(fastmath=FASTMATH, parallel=True)
def _matmul_parallel(a, b, out):
    for i in prange(a.shape[0]):  # rows are independent: each thread owns a set of rows
        _matmul_row(a, b, out, i)


@register("matmul", "numba", "parallel", "vectorized rows split over threads with prange")
def matmul_parallel(a, b, out):
    """Stage 3 · parallel.

    Changed since `vectorized`: the row loop is a ``prange``; each thread computes whole rows of
    ``out`` with the same SIMD axpy kernel.
    Bottleneck removed: only one of the cores was working.
    Still missing: data reuse. Each row streams all of ``b`` (K x N) through the cache, and the
    accumulating row of ``out`` round-trips through memory on every k step: the FMA units are
    fed by loads and stores, not by registers.
    """
    # a: (M, K)  b: (K, N)  out: (M, N)
    _serialised_parallel(a, b, out)


_serialised_parallel = serialised(_matmul_parallel)


# ---------------------------------------------------------------------------------- stage 4
@jit()
def padded_rows(a, row0, rows):
    """a[row0:row0+rows] copied into a zero-padded (MR, K) block, for an edge tile of rows < MR.

    Full tiles read A in place (see micro_kernel); only the last, short row block needs this.
    """
    block = np.zeros((MR, a.shape[1]), dtype=a.dtype)
    for i in range(rows):
        for p in range(a.shape[1]):
            block[i, p] = a[row0 + i, p]
    return block


@jit()
def _pack_b(b, row0, rows, col0, cols, bpk):
    """Copy b[row0:row0+rows, col0:col0+cols] into NR-wide panels, zero-padding the last.

    b: (K, N); bpk: (ceil(cols/NR), >= rows, NR), bpk[panel, p, j] = b[row0 + p, col0 +
    panel*NR + j]: the NR values the micro-kernel needs at step p are contiguous.
    """
    for panel in range((cols + NR - 1) // NR):
        c0 = col0 + panel * NR
        width = min(NR, col0 + cols - c0)
        for p in range(rows):
            for j in range(width):
                bpk[panel, p, j] = b[row0 + p, c0 + j]
            for j in range(width, NR):
                bpk[panel, p, j] = 0.0


@jit(fastmath=FASTMATH)
def _store_row(acc, out, row, col0, width, accumulate, bias, bias_row, last, relu):
    """Write one accumulator row into out[row, col0:col0+width] (the micro-kernel epilogue).

    accumulate: add to what earlier K blocks left there. last: this was the final K block, so
    add bias[row] (if ``bias`` is not empty) and apply ReLU (NaN stays NaN, as numpy.maximum)
    while the row is hot. bias_row: the index of ``row`` in ``bias``.
    """
    # np.float32(0) unifies with a float32 bias to float32 (a float64 0.0 would promote the
    # whole float32 epilogue to float64) and with a float64 bias to float64.
    bias_value = bias[bias_row] if bias.shape[0] > 0 else np.float32(0.0)
    for j in range(width):
        v = acc[j]
        if accumulate:
            v += out[row, col0 + j]
        if last:
            v += bias_value
            if relu and not (v > 0.0 or v != v):
                v = 0.0
        out[row, col0 + j] = v


@jit(fastmath=FASTMATH)
def micro_kernel(amat, a_row0, a_k0, bpanel, b_k0, kc, out, row0, col0, rows, cols, accumulate,
                 bias, last, relu):
    """out[row0:row0+rows, col0:col0+cols] (+)=
    amat[a_row0:a_row0+MR, a_k0:a_k0+kc] @ bpanel[b_k0:b_k0+kc, :NR].

    The MR x NR block of out stays in registers for the whole kc-long reduction.
    amat: (>= a_row0 + MR, >= a_k0 + kc) row-major A, read in place: its MR rows are MR
    sequential streams, which the hardware prefetchers follow (packing A into (kc, MR) panels
    measured no faster). bpanel: (>= b_k0 + kc, NR) packed columns of B;
    out: (M, N); rows <= MR, cols <= NR (the edge tiles); bias: (M,) added on the ``last`` K
    block, or an empty array for none.

    The six accumulator rows are separate stack vectors written out by name: LLVM keeps each
    as NR/16 zmm registers (float32) only when every index is a compile-time constant, which a
    loop over rows would hide.
    """
    dtype = bpanel.dtype
    c0 = stack_vector(NR, dtype)
    c1 = stack_vector(NR, dtype)
    c2 = stack_vector(NR, dtype)
    c3 = stack_vector(NR, dtype)
    c4 = stack_vector(NR, dtype)
    c5 = stack_vector(NR, dtype)
    for j in range(NR):
        c0[j] = 0.0
        c1[j] = 0.0
        c2[j] = 0.0
        c3[j] = 0.0
        c4[j] = 0.0
        c5[j] = 0.0
    for p in range(kc):
        # one k step: an outer product of a column of A (MR values) and a row of B (NR values)
        pa = a_k0 + p
        a0 = amat[a_row0, pa]
        a1 = amat[a_row0 + 1, pa]
        a2 = amat[a_row0 + 2, pa]
        a3 = amat[a_row0 + 3, pa]
        a4 = amat[a_row0 + 4, pa]
        a5 = amat[a_row0 + 5, pa]
        pb = b_k0 + p
        for j in range(NR):
            bj = bpanel[pb, j]
            c0[j] += a0 * bj
            c1[j] += a1 * bj
            c2[j] += a2 * bj
            c3[j] += a3 * bj
            c4[j] += a4 * bj
            c5[j] += a5 * bj
    # Epilogue, one call per accumulator row (named, not indexed: see above).
    _store_row(c0, out, row0, col0, cols, accumulate, bias, row0, last, relu)
    if rows > 1:
        _store_row(c1, out, row0 + 1, col0, cols, accumulate, bias, row0 + 1, last, relu)
    if rows > 2:
        _store_row(c2, out, row0 + 2, col0, cols, accumulate, bias, row0 + 2, last, relu)
    if rows > 3:
        _store_row(c3, out, row0 + 3, col0, cols, accumulate, bias, row0 + 3, last, relu)
    if rows > 4:
        _store_row(c4, out, row0 + 4, col0, cols, accumulate, bias, row0 + 4, last, relu)
    if rows > 5:
        _store_row(c5, out, row0 + 5, col0, cols, accumulate, bias, row0 + 5, last, relu)


@jit()
def tile_grid(m, n, mc, nc, min_tiles):
    """(mc, nc) for an m x n output, shrunk (keeping MR/NR multiples) until there are at least
    ``min_tiles`` tiles, so small problems still give every thread work; then evened out: for
    the same number of blocks, mc (nc) becomes the even share rounded up to MR (NR).

    ``prange`` hands each thread one contiguous share of the tiles, so a runt block costs a
    whole share: the ViT MLP shape 196 x 768 x 3072 cut into MC = 96 rows gave blocks of 96,
    96 and 4 rows, thread 0 nine full tiles and thread 1 three full and six 4-row ones
    (0.57x NumPy); even blocks are 66, 66, 64."""
    while ((m + mc - 1) // mc) * ((n + nc - 1) // nc) < min_tiles and nc > NR:
        nc = max(NR, (nc // 2) // NR * NR)
    while ((m + mc - 1) // mc) * ((n + nc - 1) // nc) < min_tiles and mc > MR:
        mc = max(MR, (mc // 2) // MR * MR)
    blocks = (m + mc - 1) // mc
    mc = ((m + blocks - 1) // blocks + MR - 1) // MR * MR
    blocks = (n + nc - 1) // nc
    nc = ((n + blocks - 1) // blocks + NR - 1) // NR * NR
    return mc, nc


@jit(parallel=True)
def _pack_b_all(b, bpk):
    """Pack all of b (K, N) into bpk (ceil(N/NR), K, NR), panels shared out over threads."""
    k, n = b.shape
    for panel in prange(bpk.shape[0]):
        _pack_b(b, 0, k, panel * NR, min(NR, n - panel * NR), bpk[panel:panel + 1])


@jit(fastmath=FASTMATH, parallel=True)
def _matmul_tiled(a, b, out, threads):
    m, k = a.shape
    n = b.shape[1]
    # B is packed once, by all threads, into NR-wide panels: (ceil(N/NR), K, NR). Packing it
    # per tile instead cost as much as the FMAs (MC=96: one copy per 192 FLOPs, measured 40
    # GFLOP/s instead of 100+). A tile's KC x NC block is then nc/NR chunks of KC x NR each.
    bpk = np.empty(((n + NR - 1) // NR, k, NR), dtype=b.dtype)
    _pack_b_all(b, bpk)
    mc, nc = tile_grid(m, n, MC, NC, 4 * threads)
    tiles_m = (m + mc - 1) // mc
    tiles_n = (n + nc - 1) // nc
    no_bias = np.empty(0, dtype=out.dtype)
    a_edge = padded_rows(a, m - m % MR, m % MR)  # (MR, K): the last, short row block
    for tile in prange(tiles_m * tiles_n):  # each thread owns whole mc x nc tiles of out
        row0 = (tile // tiles_n) * mc
        col0 = (tile % tiles_n) * nc
        rows = min(mc, m - row0)
        cols = min(nc, n - col0)
        for k0 in range(0, k, KC):
            kc = min(KC, k - k0)
            for r in range(row0, row0 + rows, MR):  # MR rows of A (kc x MR, 6 KiB) in L1 ...
                amat, a_row0 = (a, r) if r + MR <= m else (a_edge, 0)
                for c in range(col0, col0 + cols, NR):  # ... while B panels stream from L2
                    micro_kernel(amat, a_row0, k0, bpk[c // NR], k0, kc, out, r, c,
                                 min(MR, m - r), min(NR, n - c), k0 > 0, no_bias,
                                 k0 + kc >= k, False)


# Columns of out per task of the skinny path: a 512-float32 (2 KiB) strip of each of the < MR
# rows of out stays in L1 while the matching strips of all K rows of b stream past once.
SKINNY_COLUMNS = 512


@jit(fastmath=FASTMATH, parallel=True)
def _matmul_skinny(a, b, out):
    """out = a @ b for M < MR rows (e.g. a batch-1 linear layer), b streamed exactly once.

    Packing b into panels would copy all of it to feed fewer rows than the micro-kernel has
    (measured: 1.3 GFLOP/s at 1 x 2048 x 1000). Instead the columns are split into strips over
    the threads; for each k the strip of row k of b is loaded once and used by every row of a.
    Measured (1 x 2048 x 1000 float32, median of 50, machine busy with a CI run): 0.135 ms,
    30 GFLOP/s (packed path: 1.3 GFLOP/s); numpy.matmul 0.087 ms beside it.
    """
    m, k = a.shape
    n = b.shape[1]
    for strip in prange((n + SKINNY_COLUMNS - 1) // SKINNY_COLUMNS):
        c0 = strip * SKINNY_COLUMNS
        c1 = min(n, c0 + SKINNY_COLUMNS)
        width = c1 - c0
        for i in range(m):
            out[i, c0:c1] = 0.0
        for p in range(k):
            brow = b[p, c0:c1]  # (width,) contiguous: loaded once, used by every row
            for i in range(m):
                aip = a[i, p]
                orow = out[i, c0:c1]
                for j in range(width):  # 1-D contiguous views: packed FMAs
                    orow[j] += aip * brow[j]


@register("matmul", "numba", "tiled", "packed B/A panels in L2/L1, 6x32 register-blocked micro-kernel")
def matmul_tiled(a, b, out):
    """Stage 4 · tiled.

    Changed since `parallel`: the GEMM is blocked for every level of the memory hierarchy
    (Goto/BLIS). ``out`` is cut into MC x NC tiles shared out with ``prange``; for each KC slice
    of the reduction a tile packs its KC x NC block of ``b`` into NR-wide contiguous panels
    (512 KiB float32: L2) and its MC x KC block of ``a`` into MR-tall panels; the micro-kernel
    then holds an MR x NR = 6 x 32 block of ``out`` in registers for the whole KC-long reduction,
    doing 192 FMAs per 38 loads.
    Bottleneck removed: memory traffic. ``out`` is written once per KC slice instead of once per
    k; each B value loaded from L2 feeds MR=6 FMAs, each A value NR=32.
    Fewer than MR rows (a batch-1 linear layer) take a skinny path instead, :func:`_matmul_skinny`:
    column strips over the threads, b streamed once, no packing.
    Still missing: A/B packing is repeated per tile (about 1/(2*MC) extra traffic per FLOP);
    zmm register pressure caps MR x NR; edge tiles compute on zero padding.
    Tile sizes: MR x NR = 6 x 32 (12 zmm accumulators float32, 24 float64, of 32 registers);
    KC = 256 so an A panel (256 x 6 x 4 B = 6 KiB) stays in L1 (48 KiB) beside a streaming
    B panel; NC = 512 so the packed B block (256 x 512 x 4 B = 512 KiB) fits a quarter of L2
    (2 MiB); MC = 96 (multiple of MR) gives 22 tiles at N=1024 for 2 threads.
    Measured (N=1024 float32, min of 5 on a quiet machine): 142-146 GFLOP/s on 2 threads,
    75 on 1; numpy.matmul (OpenBLAS) gave 165-195 in runs beside it, so about 0.75-0.9x.
    """
    # a: (M, K)  b: (K, N)  out: (M, N)
    if a.shape[0] < MR:
        _serialised_skinny(a, b, out)
    else:
        _serialised_tiled(a, b, out, get_num_threads())


_serialised_tiled = serialised(_matmul_tiled)
_serialised_skinny = serialised(_matmul_skinny)
