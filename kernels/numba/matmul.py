"""matmul in Numba: from the textbook triple loop to a packed, register-blocked GEMM.

What you will learn, stage by stage:

1. ``naive``: the i, j, k triple loop. One dot product per output, walking a column of ``b``
   with a stride of N elements: one cache line fetched per multiply-add, no SIMD.
2. ``vectorized``: the i, k, j order. The inner loop now walks a row of ``b`` and a row of
   ``out`` contiguously with independent iterations, so LLVM emits packed FMAs.
3. ``parallel``: the same rows, shared out over the cores with ``prange``.
4. ``tiled``: cache blocking, packing and register blocking, the structure of every fast GEMM
   (Goto/BLIS): each thread copies a KC x NC block of ``b`` into contiguous NR-wide panels in
   its L2 right before using it, MR rows of ``a`` stream from L1, and a MR x NR block of
   ``out`` lives in registers for a whole KC-long reduction.

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
# Cache blocks, sized for this machine (AMD EPYC Zen 4: L1d 32 KiB and L2 1 MiB per core, L3
# 32 MiB shared). The MR-row A sliver (KC x MR x 4 B = 12 KiB) stays in L1 while the
# micro-kernel sweeps every B panel of the block (KC x NR x 4 B = 64 KiB each, streamed from L2:
# two zmm loads per 12 FMAs). The packed KC x NC block of B is 512 x 512 x 4 B = 1 MiB (float64
# takes NC / 2 columns: the same bytes), all of L2 on paper; a half-L2 block measured slower all
# the same. K is cut into equal blocks of at most KC (768 = 2 x 384), so no runt block pays a
# whole pass over ``out``. A is read in place and there is no MC block: with B packed per
# block, each A sliver serves all of the block's panels while it is in L1, then is done.
# Measured (float32, 2 threads, GFLOP/s, interleaved medians of 21 in one process, load 2.7 rising
# to 13 by the last shape), KC x NC:      256x512  512x256  512x512   NumPy
#   196 x 768 x 3072 (K = 768: 384 + 384)    144      143      146      148
#   1024 x 1024 x 1024                       162      173      177      174
#   2048 x 2048 x 2048                       155      165      176      191
#   64 x 512 x 512                           139      150      151      124
# Longer KC halves the read-modify-write passes over ``out`` and the micro-kernel calls; wider
# NC means fewer column blocks, so A is streamed from L3 fewer times.
KC = 512
NC = 512


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
def _pack_b(b, k0, kc, col0, cols, bpk):
    """Copy the block b[k0:k0+kc, col0:col0+cols] into NR-wide panels, zero-padding the last.

    b: (K, N); bpk: (>= ceil(cols/NR), >= kc, NR), bpk[panel, p, j] = b[k0 + p, col0 +
    panel*NR + j]: the NR values the micro-kernel needs at step p are contiguous.
    The copy walks b row by row, so every read is a contiguous run of ``cols`` values and the
    hardware prefetcher streams it; walking panel by panel instead (NR values, then a jump of
    N to the next row) ran 3-4x slower (196 x 768 x 3072 float32, all of B on 2 threads:
    3.3 ms vs 0.9 ms).
    """
    full = cols // NR  # panels without padding
    for p in range(kc):
        row = k0 + p
        for panel in range(full):
            c0 = col0 + panel * NR
            for j in range(NR):
                bpk[panel, p, j] = b[row, c0 + j]
        if full * NR < cols:  # the last, partial panel: zeros past column col0 + cols
            c0 = col0 + full * NR
            for j in range(cols - full * NR):
                bpk[full, p, j] = b[row, c0 + j]
            for j in range(cols - full * NR, NR):
                bpk[full, p, j] = 0.0


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
def tile_grid(m, n, nc_max, threads):
    """(mc, nc): the output is cut into mc x nc tiles, a whole number of tiles per thread.

    Every row block of ``out`` packs its own copy of the columns of B it needs, so rows are
    split only when there are too few column panels to go round; columns are split into
    blocks of at most ``nc_max`` (the L2 budget), their count rounded up to a multiple of
    ``threads`` so each thread gets the same number of equal tiles, then evened out (nc: the
    even share rounded up to NR). The ViT MLP shape 196 x 768 x 3072 on 2 threads: 6 tiles
    of 198 x 512, 3 per thread, and B is packed exactly once.
    """
    panels = (n + NR - 1) // NR
    col_blocks = (n + nc_max - 1) // nc_max
    col_blocks = min(panels, (col_blocks + threads - 1) // threads * threads)
    row_blocks = min((m + MR - 1) // MR, (threads + col_blocks - 1) // col_blocks)
    mc = ((m + row_blocks - 1) // row_blocks + MR - 1) // MR * MR
    nc = ((n + col_blocks - 1) // col_blocks + NR - 1) // NR * NR
    return mc, nc


@jit(fastmath=FASTMATH, parallel=True)
def _matmul_tiled(a, b, out, threads):
    m, k = a.shape
    n = b.shape[1]
    # NC counts float32 columns; float64 takes half as many: the same bytes per block.
    mc, nc = tile_grid(m, n, NC * 4 // b.itemsize, threads)
    tiles_m = (m + mc - 1) // mc
    tiles_n = (n + nc - 1) // nc
    tiles = tiles_m * tiles_n
    # K in equal blocks of at most KC: 768 as 384 + 384, not 512 + 256.
    k_blocks = (k + KC - 1) // KC
    kc_max = (k + k_blocks - 1) // k_blocks
    no_bias = np.empty(0, dtype=out.dtype)
    a_edge = padded_rows(a, m - m % MR, m % MR)  # (MR, K): the last, short row block
    for t in prange(threads):  # one iteration per thread, each with its own packing buffer
        # (nc/NR, kc_max, NR): one packed block of B, this thread's, in L2
        bpk = np.empty(((nc + NR - 1) // NR, kc_max, NR), dtype=b.dtype)
        for tile in range(tiles * t // threads, tiles * (t + 1) // threads):
            row0 = (tile // tiles_n) * mc
            col0 = (tile % tiles_n) * nc
            rows = min(mc, m - row0)
            cols = min(nc, n - col0)
            for k0 in range(0, k, kc_max):
                kc = min(kc_max, k - k0)
                # Packed by the thread that uses it, right before use: the block goes
                # straight into this core's L2 instead of a serial pass over all of B, out to
                # DRAM and back, before any FMA; each element of b is copied once.
                _pack_b(b, k0, kc, col0, cols, bpk)
                for r in range(row0, row0 + rows, MR):  # MR rows of A (kc x MR, <= 12 KiB) in L1
                    amat, a_row0 = (a, r) if r + MR <= m else (a_edge, 0)
                    for c in range(col0, col0 + cols, NR):  # while B panels stream from L2
                        micro_kernel(amat, a_row0, k0, bpk[(c - col0) // NR], 0, kc, out, r, c,
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
    the threads, and each strip of b is read once, four rows at a time: for each row of ``a``
    the strip of ``out`` (2 KiB, in L1) is updated with four rows of b per pass, so the
    load + store of ``out`` is paid once per four FMAs instead of once per FMA, which had
    made the store port the bottleneck.
    Measured (float32, 2 threads, medians of 200, in one process, load 0.7), one row of b per
    pass -> four: 1 x 2048 x 1000 293-301 -> 152-153 us (numpy.matmul 119-121 us beside
    them); 4 x 2048 x 1000 1625-1916 -> 858-888 us (numpy 400-403); 5 x 2048 x 1000
    2193-2414 -> 763-824 us (numpy 430-450). Through the registered stage, interleaved call by
    call with numpy.matmul (medians of 300, load 0.7): 1 x 2048 x 1000 104 vs 118 us (1.13x),
    4 x 2048 x 1000 330 vs 406 us (1.23x).
    Still missing: register blocking over the rows of ``a`` (each row re-reads the strip of
    b from L1/L2), which Cython's fo_skinny kernels have.
    """
    m, k = a.shape
    n = b.shape[1]
    k4 = k - k % 4
    for strip in prange((n + SKINNY_COLUMNS - 1) // SKINNY_COLUMNS):
        c0 = strip * SKINNY_COLUMNS
        c1 = min(n, c0 + SKINNY_COLUMNS)
        width = c1 - c0
        for i in range(m):
            out[i, c0:c1] = 0.0
        for p in range(0, k4, 4):
            # (width,) contiguous strips of four rows of b: loaded once, used by every row
            b0, b1, b2, b3 = b[p, c0:c1], b[p + 1, c0:c1], b[p + 2, c0:c1], b[p + 3, c0:c1]
            for i in range(m):
                a0, a1, a2, a3 = a[i, p], a[i, p + 1], a[i, p + 2], a[i, p + 3]
                orow = out[i, c0:c1]
                for j in range(width):  # 1-D contiguous views: packed FMAs
                    orow[j] += a0 * b0[j] + a1 * b1[j] + a2 * b2[j] + a3 * b3[j]
        for p in range(k4, k):  # the last k % 4 rows of b, one at a time
            brow = b[p, c0:c1]
            for i in range(m):
                aip = a[i, p]
                orow = out[i, c0:c1]
                for j in range(width):
                    orow[j] += aip * brow[j]


@register("matmul", "numba", "tiled",
          "B packed block by block by the thread that uses it, 6x32 register micro-kernel")
def matmul_tiled(a, b, out):
    """Stage 4 · tiled.

    Changed since `parallel`: the GEMM is blocked for every level of the memory hierarchy
    (Goto/BLIS). ``out`` is cut into mc x nc tiles, the same number for every thread
    (:func:`tile_grid`). For each KC slice of the reduction, the thread that owns a tile packs
    its KC x nc block of ``b`` into NR-wide contiguous panels (in its own L2), then for every
    MR rows of ``a`` (read in place, in L1) the micro-kernel sweeps the block's panels, holding
    an MR x NR = 6 x 32 block of ``out`` in registers for the whole KC-long reduction: 192 FMAs
    per 38 loads.
    Bottleneck removed: memory traffic. ``out`` is written once per KC slice instead of once per
    k; each B value loaded from L2 feeds MR=6 FMAs, each A value NR=32.
    Fewer than MR rows (a batch-1 linear layer) take a skinny path instead, :func:`_matmul_skinny`:
    column strips over the threads, b streamed once, no packing.
    Why B is packed block by block, by its user: this stage used to pack all of ``b`` up front,
    both threads together, panel by panel, before any FMA. On the ViT MLP shape
    196 x 768 x 3072 (B = 9.4 MB) that pack took 3.6 ms of a 9.9 ms product, while the FMAs
    ran at 138-177 GFLOP/s: walking a panel reads 128 bytes of a row of ``b`` and jumps N
    floats to the next, so the prefetchers never get going. :func:`_pack_b` walks the block
    row by row instead (the same 9.4 MB in 1.2 ms), one block at a time, into the L2 of the
    thread that then reads it, and :func:`tile_grid` splits columns before rows so every
    element of ``b`` is packed once.
    Still missing: the next block's copy (about 1 ms of the ViT product, DRAM-bound) is not
    overlapped with this block's FMAs. Tried without gain (interleaved in one process): a
    software prefetch of the next block, one row per micro-kernel call (N=1024 13.20 vs
    13.19 ms; ViT min 6.55 vs 6.57 ms); threads starting their K blocks at different offsets
    so their copies do not coincide (ViT min 6.78 vs 6.79 ms); panel strides off 4 KiB
    multiples. Also: zmm register pressure caps MR x NR; edge tiles compute on zero padding.
    Tile sizes: the constants at the top (MR x NR = 6 x 32, KC = 512, NC = 512), with the sweep.
    Measured: ``fastops bench --full --op matmul --backend numba --stage tiled`` (float32, 2
    threads, load 1.7), "before" being the all-of-B stage swapped into the same harness;
    GFLOP/s (x NumPy in the same run), before -> after:
    196 x 768 x 3072 68 (0.53x) -> 123 (0.90x); N=256 101 (1.06x) -> 109 (1.11x);
    N=1024 109 (0.70x) -> 145 (0.87x); N=2048 133 (0.72x) -> 152 (0.85x); 64 x 512 x 512 89
    (0.79x) -> 105 (1.06x); float64 (same command, --dtype float64) 196 x 768 x 3072 65 -> 79,
    N=1024 88 -> 91. Interleaved in one process (medians of 21, load 2.3), x NumPy:
    196 x 768 x 3072 0.54 -> 0.88x, N=1024 0.90 -> 0.98x, N=2048 0.83 -> 0.89x, float64
    196 x 768 x 3072 0.74 -> 0.91x. The skinny path (1 x 2048 x 1000) is unchanged.
    """
    # a: (M, K)  b: (K, N)  out: (M, N)
    if a.shape[0] < MR:
        _serialised_skinny(a, b, out)
    else:
        _serialised_tiled(a, b, out, get_num_threads())


_serialised_tiled = serialised(_matmul_tiled)
_serialised_skinny = serialised(_matmul_skinny)
