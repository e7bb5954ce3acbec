# cython: language_level=3
"""matmul in Cython: from the textbook triple loop to a packed, register-blocked GEMM.

What you will learn, stage by stage (out (M, N) = a (M, K) @ b (K, N), row-major):

1. naive       - the i, j, k dot-product loop; one thread.
2. vectorized  - the i, k, j order: the inner loop runs along contiguous rows of b and out,
                 so the C compiler turns it into packed FMA instructions.
3. parallel    - the same loop with OpenMP (Cython prange) over blocks of rows.
4. tiled       - BLIS/GotoBLAS: A and B packed into cache-sized slivers, an MR x NR block of
                 C held in vector registers by an intrinsics micro-kernel (microkernel.h),
                 tasks spread over the threads (the engine is in gemm.pxi).

Every kernel runs with the GIL released (``with nogil``). The Python-visible ``def`` wrappers
dispatch on dtype to ``cdef ... nogil`` cores written once over the fused type ``real``.
"""
from functools import lru_cache

from cython.parallel cimport prange
from libc.string cimport memset

from fastops.registry import register

include "gemm.pxi"


# ---------------------------------------------------------------------------- shared helper
cdef void rows_axpy(const real *a, const real *b, real *out, Py_ssize_t K, Py_ssize_t N,
                    Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t j0, Py_ssize_t j1) noexcept nogil:
    """out[i0:i1, j0:j1] = a[i0:i1] @ b[:, j0:j1] in i, k, j order.

    The inner j loop reads b[k, j0:j1] and updates out[i, j0:j1], both unit stride, so the
    compiler emits packed loads and FMAs; out's row stays in L1 across the k loop."""
    cdef Py_ssize_t i, k, j
    cdef real aik
    cdef real *orow
    cdef const real *brow
    for i in range(i0, i1):
        orow = out + i * N
        memset(orow + j0, 0, (j1 - j0) * sizeof(real))
        for k in range(K):
            aik = a[i * K + k]
            brow = b + k * N
            for j in range(j0, j1):
                orow[j] += aik * brow[j]


# ---------------------------------------------------------------------------- 1 naive
cdef void naive_core(const real *a, const real *b, real *out, Py_ssize_t M, Py_ssize_t K,
                     Py_ssize_t N) noexcept nogil:
    cdef Py_ssize_t i, j, k
    cdef real acc
    for i in range(M):
        for j in range(N):
            acc = 0
            for k in range(K):
                acc += a[i * K + k] * b[k * N + j]  # b read down a column: stride N
            out[i * N + j] = acc


cdef void naive_run(const real[:, ::1] a, const real[:, ::1] b, real[:, ::1] out):
    with nogil:
        naive_core(&a[0, 0], &b[0, 0], &out[0, 0], a.shape[0], a.shape[1], b.shape[1])


@register("matmul", "cython", "naive", "i,j,k dot-product loops, one thread",
          max_flops=3e8)
def matmul_naive(a, b, out):
    """Stage 1 · naive.

    The textbook definition: for each (i, j), a dot product over k, one thread, GIL released.
    Bottleneck: the k loop walks b down a column (stride N elements), so every load of b is a
    new cache line once N is large, and the scalar reduction into one accumulator is a chain
    of dependent adds the compiler may not reorder (no reassociation), so nothing vectorises.
    Still missing: unit-stride access, SIMD, threads, cache blocking.
    """
    # a: (M, K)  b: (K, N)  out: (M, N), C-contiguous, one dtype (checked upstream)
    if a.dtype.char == "f":
        naive_run[float](a, b, out)
    else:
        naive_run[double](a, b, out)


# ---------------------------------------------------------------------------- 2 vectorized
cdef void vectorized_run(const real[:, ::1] a, const real[:, ::1] b, real[:, ::1] out):
    with nogil:
        rows_axpy(&a[0, 0], &b[0, 0], &out[0, 0], a.shape[1], b.shape[1], 0, a.shape[0], 0,
                  b.shape[1])


@register("matmul", "cython", "vectorized", "i,k,j order: unit-stride inner loop, SIMD FMA",
          max_flops=2e10)
def matmul_vectorized(a, b, out):
    """Stage 2 · vectorized.

    Changed since `naive`: the loops run i, k, j. For a fixed (i, k) the inner loop is
    out[i, :] += a[i, k] * b[k, :]: both rows are contiguous, and the iterations are
    independent, so gcc (-O3 -march=native -ffp-contract=fast) emits packed vfmadd*ps/pd
    instructions (tests/test_cython_kernels.py checks the built .so contains them).
    Bottleneck removed: strided column access and the serial dependency of the dot product.
    Still missing: one thread only; out's row is loaded and stored on every k step (one load
    + one store per FMA: bound by L1 bandwidth, not by the FMA units), and b is streamed from
    memory once per row of a, since nothing is blocked for the caches.
    """
    if a.dtype.char == "f":
        vectorized_run[float](a, b, out)
    else:
        vectorized_run[double](a, b, out)


# ---------------------------------------------------------------------------- 3 parallel
cdef enum:
    ROW_BLOCK = 8  # rows per OpenMP chunk: a few rows, so 2 threads get balanced work


cdef void parallel_run(const real[:, ::1] a, const real[:, ::1] b, real[:, ::1] out):
    cdef Py_ssize_t M = a.shape[0], K = a.shape[1], N = b.shape[1], blk
    cdef const real *pa = &a[0, 0]
    cdef const real *pb = &b[0, 0]
    cdef real *po = &out[0, 0]
    with nogil:
        for blk in prange((M + ROW_BLOCK - 1) // ROW_BLOCK, schedule="static"):
            rows_axpy(pa, pb, po, K, N, blk * ROW_BLOCK, min(M, (blk + 1) * ROW_BLOCK), 0, N)


@register("matmul", "cython", "parallel", "vectorized loop, OpenMP prange over row blocks",
          max_flops=4e10)
def matmul_parallel(a, b, out):
    """Stage 3 · parallel.

    Changed since `vectorized`: blocks of ROW_BLOCK = 8 rows of out are shared among the
    OpenMP threads (Cython prange, static schedule: every block costs the same).
    Bottleneck removed: one idle core. Each thread owns whole rows of out, so there is no
    write sharing.
    Still missing: the same memory traffic per FLOP as `vectorized` (every thread streams all
    of b for each of its rows), so two threads compete for the same DRAM bandwidth; no
    register blocking.
    """
    if a.dtype.char == "f":
        parallel_run[float](a, b, out)
    else:
        parallel_run[double](a, b, out)


# ---------------------------------------------------------------------------- 4 tiled
cdef enum:
    # Column chunk of the M = 1 path: the row out[0, chunk] (4 KiB float32) stays in L1
    # while rows of b stream past it.
    GEMV_COLUMNS = 1024
    SKINNY_COLUMNS = 256  # column chunk of the portable M < MR path: out[i, chunk] in L1

cdef extern from "microkernel.h" nogil:
    enum:
        FO_HAVE_SKINNY
    void fo_gemv_f(long K, const float *A, const float *B, long ldb, float *C, long nc)
    void fo_gemv_d(long K, const double *A, const double *B, long ldb, double *C, long nc)
    void fo_skinny_f(int m, long K, const float *A, long lda, const float *B, long ldb,
                     float *C, long ldc, long nc)
    void fo_skinny_d(int m, long K, const double *A, long lda, const double *B, long ldb,
                     double *C, long ldc, long nc)


cdef void skinny_run(const real[:, ::1] a, const real[:, ::1] b, real[:, ::1] out):
    """M < MR (e.g. one input row, a GEMV): no packing. Packing B would copy all of it to use
    each element M times, and an MR-row micro-tile would be mostly padding.
    M = 1: the columns are split into one contiguous chunk per thread (more when N > threads
    x GEMV_COLUMNS) and fo_gemv_* streams whole row segments of b through it.
    2 <= M < MR: chunks of 4 vectors of columns over the threads; fo_skinny_* keeps up to 3
    rows x 4 vectors of out in registers while it walks b down the chunk.
    Without AVX-512 (or with the intrinsics disabled) the `vectorized` loop runs on column
    chunks instead (microkernel.h has the measurements behind the split)."""
    cdef Py_ssize_t M = a.shape[0], K = a.shape[1], N = b.shape[1], ch, i, j0, width, chunks
    cdef int threads = openmp.omp_get_max_threads()
    cdef const real *pa = &a[0, 0]
    cdef const real *pb = &b[0, 0]
    cdef real *po = &out[0, 0]
    cdef Py_ssize_t lanes = 64 // sizeof(real)
    with nogil:
        if FO_HAVE_SKINNY and fo_simd_enabled and M == 1:
            # Equal chunks, a multiple of the thread count, whole vectors wide.
            chunks = (N + GEMV_COLUMNS - 1) // GEMV_COLUMNS
            chunks = (chunks + threads - 1) // threads * threads
            width = round_up((N + chunks - 1) // chunks, lanes)
            for ch in prange((N + width - 1) // width, schedule="static", num_threads=threads):
                j0 = ch * width
                if real is float:
                    fo_gemv_f(K, pa, pb + j0, N, po + j0, min(width, N - j0))
                else:
                    fo_gemv_d(K, pa, pb + j0, N, po + j0, min(width, N - j0))
        elif FO_HAVE_SKINNY and fo_simd_enabled:
            width = 4 * lanes  # 4 zmm of columns: 64 floats, 32 doubles
            for ch in prange((N + width - 1) // width, schedule="static"):
                j0 = ch * width
                for i in range(0, M, 3):
                    if real is float:
                        fo_skinny_f(<int> min(3, M - i), K, pa + i * K, K, pb + j0, N,
                                    po + i * N + j0, N, min(width, N - j0))
                    else:
                        fo_skinny_d(<int> min(3, M - i), K, pa + i * K, K, pb + j0, N,
                                    po + i * N + j0, N, min(width, N - j0))
        else:
            for ch in prange((N + SKINNY_COLUMNS - 1) // SKINNY_COLUMNS, schedule="static"):
                rows_axpy(pa, pb, po, K, N, 0, M, ch * SKINNY_COLUMNS,
                          min(N, (ch + 1) * SKINNY_COLUMNS))


cdef tiled_run(const real[:, ::1] a, const real[:, ::1] b, real[:, ::1] out, Py_ssize_t m_block,
               Py_ssize_t n_block):
    cdef Py_ssize_t M = a.shape[0], K = a.shape[1], N = b.shape[1]
    cdef BSource src
    cdef real *apack
    cdef int status = 0
    src.kind = 0
    src.ldb = N
    with nogil:
        apack = alloc_aligned(round_up(M, mr_of(&out[0, 0])) * K, &out[0, 0])
        if apack == NULL:
            status = -1
        else:
            pack_a(&a[0, 0], K, M, K, apack)
            status = gemm_run(apack, 0, M, K, N, &b[0, 0], 0, 0, &src, &out[0, 0], N, 0, 0, 0,
                              NULL, 0, 1, 1, m_block, n_block)
            free(apack)
    if status:
        raise MemoryError("matmul/cython/tiled: could not allocate packing buffers")


@lru_cache(maxsize=256)
def _grid(M, N, dtype_char):
    mr, nr = micro_tile("float32" if dtype_char == "f" else "float64")
    return task_grid(M, N, 1, mr, nr, openmp.omp_get_max_threads())


@register("matmul", "cython", "tiled",
          "BLIS-style packed A/B slivers + AVX-512 MRxNR register micro-kernel, OpenMP tasks")
def matmul_tiled(a, b, out):
    """Stage 4 · tiled.

    Changed since `parallel`: the GotoBLAS/BLIS algorithm (engine in gemm.pxi, micro-kernel
    in microkernel.h). A is packed once into MR-row slivers, B into NR-column slivers per
    KC x NC block, and an MR x NR = 8 x 32 (float32; 8 x 16 float64) block of C lives in 16
    zmm registers across the whole KC loop: per k step 2 vector loads of B, 8 broadcasts of
    A, 16 independent FMAs (>= 8 needed to cover 2 FMA ports x 4 cycles latency).
    Blocks: KC = 256 so one B sliver (256 x 32 x 4 B = 32 KiB) stays in a 48 KiB L1d;
    MC = 256 so the A block (256 KiB) plus the task's B block (<= 1 MiB) sit in a 2 MiB L2
    (the Intel machines of MACHINE_NOTES.md). On the Zen 4 VM (32 KiB L1d, 1 MiB L2) they
    do not fit, yet the kernel in this loop nest still ran at 94-96 % of peak and smaller
    blocks measured no better (numbers in gemm.pxi).
    Tasks (row block x column block) are chosen by a small makespan model (`task_grid`) so
    2 threads get equal work; each thread packs into its own buffer.
    Edges: slivers are zero-padded, the write-back is masked (any M, N, K).
    Dispatch: M < MR (a GEMV-like row, e.g. 1 x 2048 x 1000) skips packing altogether
    (`skinny_run`): packing would cost as much as the product and an MR-row tile would be
    mostly padding. M = 1 streams whole row segments of b, one contiguous column chunk per
    thread (fo_gemv_*); measured against NumPy/OpenBLAS on 1 x 2048 x 1000 float32 (2
    threads, interleaved blocks of 30 calls, min over 300 calls each, loaded AMD EPYC Zen 4
    VM): 0.066 vs 0.061-0.062 ms (0.93x; the previous 64-column strips: 0.76x). 2 <= M < 8
    keeps register accumulators over 64-column strips (fo_skinny_*): 4 x 2048 x 1000 at
    1.1-1.2x.
    Bottleneck removed: memory traffic (each loaded element of B feeds MR FMAs from registers,
    each of A NR FMAs) and the load/store of C per FMA of the earlier stages.
    The micro-kernel prefetches its C tile before its k loop, so the write-back does not wait
    on a C that a large product has evicted since the last KC block: 1 thread, 2048^3,
    93.7 -> 101 GF/s (0.91 -> 1.01x OpenBLAS; numbers in microkernel.h, fo_prefetch_c).
    Still missing: prefetching of the next slivers; A is re-read from its packed copy for each
    column block, and packed up front (~5 % of the time).
    """
    M, N = a.shape[0], b.shape[1]
    if a.dtype.char == "f":
        if M < FO_MR_F:
            skinny_run[float](a, b, out)
        else:
            tiled_run[float](a, b, out, *_grid(M, N, "f"))
    else:
        if M < FO_MR_D:
            skinny_run[double](a, b, out)
        else:
            tiled_run[double](a, b, out, *_grid(M, N, "d"))
