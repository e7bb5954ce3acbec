# The packed, register-blocked GEMM engine shared by the Cython matmul and conv2d chapters.
#
# Included (Cython `include`) by matmul.pyx and conv2d.pyx: each extension module gets its own
# copy, since every .pyx in this folder is built as a separate extension. The micro-kernels
# themselves are C intrinsics in microkernel.h.
#
# The loop nest, for C (M, N) += A (M, K) @ B (K, N), after BLIS / GotoBLAS:
#
#   pack all of A once            -> Apack: for each KC block, MR-row slivers (kc x MR)
#   parallel for task in tasks:   (image, group, rows m0:m1, columns n0:n1), one per thread
#     for pc in K step KC:        KC block of the reduction
#       pack B[pc:pc+kc, n0:n1]   -> this thread's buffer: NR-column slivers (kc x NR)
#       for ic in m0:m1 step MC:  the A block Apack[pc, ic:ic+MC] (MC x KC) stays in L2
#         for jr in slivers:      one B sliver (KC x NR) stays in L1 ...
#           for ir in ic step MR: ... while every A sliver of the block streams past it
#             micro-kernel: MR x NR block of C in registers across the kc loop
#
# Block sizes, float32 (double: same bytes, NR = 16 doubles):
#   KC = 256: one B sliver is 256 x 32 x 4 B = 32 KiB, two thirds of the 48 KiB L1d (Intel
#             Emerald Rapids, MACHINE_NOTES.md), leaving room for the A sliver (8 x 256 x 4 B
#             = 8 KiB) streaming past it. On an AMD EPYC Zen 4 VM (L1d 32 KiB, L2 1 MiB)
#             KC = 128 measured no better (1 thread: 128x1152x784 matmul 97 vs 100 GF/s,
#             res3 conv 87 vs 92), so 256 stays.
#   MC = 256: the A block is 256 x 256 x 4 B = 256 KiB and the B block of a task at most
#             KC x NC_MAX = 256 x 1024 x 4 B = 1 MiB: together well inside the 2 MiB L2
#             of the Intel machine; on the Zen 4 VM (1 MiB L2) they do not fit together.
# Measured on the Zen 4 VM whether that costs anything: fo_ukernel_f_simd driven by exactly
# this loop nest (jr over B slivers, ir over A slivers) from a standalone C harness, packed
# operands, 1 thread: 109-112 GF/s with KC = 256, MC = 256, a 1024-column B block, i.e.
# 94-96 % of the 116.7 GF/s FMA peak; a 512-column B block, MC = 128 or KC = 128 all within
# +-2 % of that, and the kernel on one L1-resident B sliver 112-116. The streams are slow
# enough for the hardware prefetchers (B: 128 B per 16 FMA cycles), so the blocks stay. In
# the 2-thread 1024^3 call (interleaved, n_block forced through matmul._grid) 256-, 512-
# and 1024-column task blocks measured within noise too. What the kernel did lose in the
# whole call (93.7 GF/s on one thread at 1024^3 and 2048^3, OpenBLAS 99-103 beside it) was
# its write-back waiting on C, which a large product has evicted by the next KC block: the
# micro-kernel now prefetches its C tile before the k loop (fo_prefetch_c: 99-101 GF/s,
# 1.00-1.01x OpenBLAS). Packing A costs ~5 % (perf: pack_a's share of the kernel's samples).
# matmul packs A once for the whole call (read N / NC times from the packed copy). conv2d
# passes its weights unpacked (lda > 0): they are already row-major along the reduction, and
# the micro-kernel broadcasts from MR row pointers in place. B is packed per task, so with
# tasks split over columns every element of B is packed exactly once.
#
# B comes either from a row-major matrix (matmul) or straight from an image (conv2d,
# "implicit GEMM"): row p of B is the tap (c, r, s) and column j the output pixel (oh, ow),
# so im2col is never materialised, only its KC x NC block, in cache.
#
# The conv's main path (kind 2, gemm_task_direct) does not pack B at all: conv2d.pyx copies
# the image once into zero-padded planes split by stride phase, where every row of B is one
# contiguous run, and fo_ukernel_*_direct loads its two vectors per k step straight from
# there (one int offset per row p). Packing from the image had cost 15-35 % of the conv
# time (measured by skipping the micro-kernel, 1 thread: B packing alone ran at the FLOP
# equivalent of 250 GF/s on res2 3x3 C64 56x56, 211 on the 7x7/2 stem, against ~100 for
# the micro-kernel), more than the 3-7 % of extra columns the padded grid computes.
#
# For small outputs the padded grid wastes more (7x7 outputs: 63 grid columns, 49 real, in
# two 32-column tiles per image), so kind 3 (gemm_task_dense) folds the images into the
# columns (N = images x Ho*Wo) and copies each task's dense columns from the padded planes
# into NR-column slivers, a sliver right before its first use, with whole-vector copies of
# the precomputed runs (fo_copy_runs_*). With >= 128 rows per group the copy is cheap (perf,
# 1 thread: 2.7 % of res5 3x3 C512 7x7 at batch 8, 5.3 % of res4 C256 14x14) and the tiles
# are full: res5 at batch 8 fills 392 of 400 columns (12 tiles and a one-vector tail)
# instead of 49 of 64 per image. conv2d.pyx's use_dense picks it by a tile count.

from cython.parallel cimport prange, parallel
from libc.stdlib cimport malloc, free
from libc.string cimport memset, memcpy
cimport openmp

import warnings

cdef extern from "stdlib.h" nogil:
    void *aligned_alloc(size_t alignment, size_t size)

cdef extern from "microkernel.h" nogil:
    enum:
        FO_MR_F
        FO_NR_F
        FO_MR_D
        FO_NR_D
        FO_HAS_AVX2
        FO_HAS_FMA
        FO_HAS_AVX512F
    const char *FO_ISA_NAME
    int fo_simd_enabled
    int fo_compiled_isa()
    int fo_runtime_isa()
    void fo_ukernel_f(long kc, const float *Ap, long a_rs, long a_ks, const float *Bp,
                      float *C, long ldc, int mr, int nr, int first, const float *bias,
                      int relu)
    void fo_ukernel_d(long kc, const double *Ap, long a_rs, long a_ks, const double *Bp,
                      double *C, long ldc, int mr, int nr, int first, const double *bias,
                      int relu)
    ctypedef struct fo_seg:
        int lo, hi
        long dest
    enum:
        FO_HAVE_DIRECT
        FO_DIRECT_NV
    void fo_ukernel_f_direct(long kc, const float *Ap, long a_rs, long a_ks, const float *B0,
                             const int *boff, int ncols, float *C, long ldc, const fo_seg *seg,
                             int nseg, int mr, int first, const float *bias, int relu)
    void fo_ukernel_d_direct(long kc, const double *Ap, long a_rs, long a_ks,
                             const double *B0, const int *boff, int ncols, double *C, long ldc,
                             const fo_seg *seg, int nseg, int mr, int first, const double *bias,
                             int relu)
    void fo_prefetch_rows(const char *base, const int *boff, long kc, long elem, long bytes)
    void fo_copy_runs_f(float *dst, const float *row, const long *runs, long q0, long q1)
    void fo_copy_runs_d(double *dst, const double *row, const long *runs, long q0, long q1)
    int fo_copy_run_f(float *dst, const float *row, long iw0, int sw, long W, long run,
                      long lo, long hi)
    int fo_copy_run_d(double *dst, const double *row, long iw0, int sw, long W, long run,
                      long lo, long hi)

ctypedef fused real:
    float
    double

cdef enum:
    # Reduction block of the direct (unpacked-B) conv path. B is not packed, so KC only sets
    # how often the C tile is re-loaded/stored and how much of B the tile touches in L1.
    # Measured alternately on one build each (1 thread, best of 15): 512 vs 256 gave res2-4
    # 101-104 vs 94-101 GF/s and res5 78 vs 73; 1024 fell back (res4 88). The reduction is
    # cut into equal blocks of at most KC_DIRECT (direct_kc): against fixed 512-row blocks
    # (2 threads, interleaved, x torch) res2 3x3 C64 (576 rows: one block, not 512 + 64)
    # 0.98 -> 1.02 at batch 1 and 0.97 -> 1.01 at batch 8, res3 (2 x 576, not 512 + 512 +
    # 128) +2 %, res4 / res5 within 1 %.
    KC_DIRECT = 640
    KC_DIRECT_MAX = 1024  # bound of any block (dense variant's offset table)
    KC = 256
    MC = 256
    NC_MAX = 1024


# ---------------------------------------------------------------------------- ISA safety
_ISA_BITS = {"avx2": FO_HAS_AVX2, "fma": FO_HAS_FMA, "avx512f": FO_HAS_AVX512F}


def compiled_isa():
    """The instruction-set extensions this extension was compiled to use (set of names)."""
    return {name for name, bit in _ISA_BITS.items() if fo_compiled_isa() & bit}


def runtime_isa():
    """The instruction-set extensions the running CPU supports (set of names)."""
    return {name for name, bit in _ISA_BITS.items() if fo_runtime_isa() & bit}


def isa_decision(compiled, runtime):
    """(use_simd, warning or None): the intrinsic kernels run only if the CPU has every
    extension the build assumed; otherwise the portable C micro-kernel is used."""
    missing = sorted(set(compiled) - set(runtime))
    if not missing:
        return True, None
    return False, (f"fastops cython kernels were compiled for {sorted(compiled)} but this CPU "
                   f"lacks {missing}; using the portable C micro-kernel. Other compiled code "
                   "may still use those instructions: rebuild here, or with FASTOPS_PORTABLE=1.")


def set_simd(bint enabled):
    """Enable/disable the intrinsic micro-kernels of this module (tests use it to run the
    portable path); returns the previous setting."""
    global fo_simd_enabled
    previous = bool(fo_simd_enabled)
    fo_simd_enabled = 1 if enabled else 0
    return previous


def micro_tile(dtype_name):
    """(MR, NR) of the micro-kernel for 'float32' / 'float64' and the ISA it was built for."""
    if dtype_name == "float32":
        return FO_MR_F, FO_NR_F
    return FO_MR_D, FO_NR_D


ISA_NAME = FO_ISA_NAME.decode()
GEMM_BLOCKS = {"KC": KC, "MC": MC, "NC_MAX": NC_MAX}

_use_simd, _isa_warning = isa_decision(compiled_isa(), runtime_isa())
if _isa_warning:
    warnings.warn(_isa_warning, RuntimeWarning, stacklevel=2)
set_simd(_use_simd)


# ---------------------------------------------------------------------------- geometry
cdef struct BSource:
    # How to read element (p, j) of B. kind 0: matrix, B[p * ldb + j].
    # kind 1: image x (C, H, W) of one group; p = (c * kh + r) * kw + s, j = oh * Wo + ow.
    # kind 2: zero-padded image xp (C, Hp, Wp) read in place (stride-1 conv, no packing):
    #         B[p, j'] = xp[boff[p] + j'] over the padded pixel grid j' = oh * Wp + ow; the
    #         columns with ow >= Wo are computed and dropped by the write-back.
    int kind
    Py_ssize_t ldb
    int H, W, kh, kw, sh, sw, pt, pl, dh, dw, Wo
    Py_ssize_t Wp
    const int *boff
    # kind 2: images per task (the weights block in L2 is reused across all their tiles),
    # and the image strides of B and C the task steps by.
    Py_ssize_t images_per_task, b_image_stride, c_image_stride
    # kind 3: as kind 2, but the columns are the dense output pixels of all images
    # (j = n * P + oh * Wo + ow, P = Ho * Wo), packed per task and KC block (gemm_task_dense).
    Py_ssize_t P
    Py_ssize_t kc_direct  # kinds 2 and 3: reduction block (direct_kc)


cdef inline int mr_of(real *dummy) noexcept nogil:
    if real is float:
        return FO_MR_F
    else:
        return FO_MR_D


cdef inline int nr_of(real *dummy) noexcept nogil:
    if real is float:
        return FO_NR_F
    else:
        return FO_NR_D


cdef inline Py_ssize_t round_up(Py_ssize_t x, Py_ssize_t m) noexcept nogil:
    return (x + m - 1) // m * m


cdef inline Py_ssize_t direct_kc(Py_ssize_t red) noexcept nogil:
    """The reduction block of the direct paths: red rows in equal blocks of <= KC_DIRECT."""
    cdef Py_ssize_t blocks = (red + KC_DIRECT - 1) // KC_DIRECT
    return round_up((red + blocks - 1) // blocks, 16)


cdef inline real *alloc_aligned(Py_ssize_t count, real *dummy) noexcept nogil:
    # 64-byte alignment: packed slivers are read with aligned zmm loads.
    return <real *> aligned_alloc(64, <size_t> round_up(count * sizeof(real), 64))


# ---------------------------------------------------------------------------- packing
cdef void pack_a(const real *a, Py_ssize_t lda, Py_ssize_t M, Py_ssize_t K,
                 real *apack) noexcept nogil:
    """A (M, K) row-major -> Apack: KC blocks, each Mpad x kc as MR-row slivers (kc x MR),
    zero rows below M. Sliver `ir` of the block at `pc` starts at apack + pc*Mpad + ir*kc."""
    cdef int MR = mr_of(apack)
    cdef Py_ssize_t Mpad = round_up(M, MR), nsl = Mpad // MR
    cdef Py_ssize_t t, pc, ir, p, kc, i
    cdef real *dst
    cdef const real *src
    # One (KC block, sliver) per iteration: independent, so the packing runs in parallel too.
    for t in prange(((K + KC - 1) // KC) * nsl, schedule="static"):
        pc = (t // nsl) * KC
        ir = (t % nsl) * MR
        kc = min(KC, K - pc)
        dst = apack + pc * Mpad + ir * kc
        for i in range(MR):
            if ir + i < M:
                src = a + (ir + i) * lda + pc
                for p in range(kc):
                    dst[p * MR + i] = src[p]
            else:
                for p in range(kc):
                    dst[p * MR + i] = 0


cdef inline void valid_range(Py_ssize_t iw0, int sw, int W, Py_ssize_t run, Py_ssize_t *lo,
                             Py_ssize_t *hi) noexcept nogil:
    """[lo, hi): the t < run whose input column iw0 + t*sw lies inside 0 .. W-1 (the rest of
    the run falls in the left/right zero padding)."""
    cdef Py_ssize_t l = 0, h = 0
    if sw == 1:  # the common case, without the integer divisions (~25 cycles each)
        l = min(max(-iw0, 0), run)
        lo[0] = l
        hi[0] = max(min(W - iw0, run), l)
        return
    if iw0 < 0:
        l = (-iw0 + sw - 1) // sw
    if iw0 <= W - 1:
        h = (W - 1 - iw0) // sw + 1
    l = min(l, run)
    lo[0] = l
    hi[0] = max(min(h, run), l)


cdef inline void copy_run(real *dst, const real *row, Py_ssize_t iw0, int sw, int W,
                          Py_ssize_t run) noexcept nogil:
    """dst[t] = row[iw0 + t*sw] for t < run, zero where the column falls in the padding.
    AVX-512 masked loads/stores for stride 1 and 2 (microkernel.h), else scalar loops."""
    cdef Py_ssize_t lo, hi, t
    valid_range(iw0, sw, W, run, &lo, &hi)
    if real is float:
        if fo_copy_run_f(dst, row, iw0, sw, W, run, lo, hi):
            return
    else:
        if fo_copy_run_d(dst, row, iw0, sw, W, run, lo, hi):
            return
    for t in range(lo):
        dst[t] = 0
    if sw == 1:
        memcpy(dst + lo, row + iw0 + lo, (hi - lo) * sizeof(real))
    else:
        for t in range(lo, hi):
            dst[t] = row[iw0 + t * sw]
    for t in range(hi, run):
        dst[t] = 0


cdef void pack_b(const real *b, const BSource *src, Py_ssize_t pc, Py_ssize_t kc,
                 Py_ssize_t n0, Py_ssize_t n1, real *bpack) noexcept nogil:
    """B[pc:pc+kc, n0:n1] -> bpack as NR-column slivers (kc x NR), zero columns past n1."""
    cdef int NR = nr_of(bpack)
    cdef Py_ssize_t nsl = (n1 - n0 + NR - 1) // NR
    cdef Py_ssize_t p, q, sl, j, jend, t, run, oh, ow, ih, taps
    cdef int c, r, s
    cdef real *dst
    cdef const real *chan
    taps = src.kh * src.kw
    for p in range(kc):
        q = pc + p
        if src.kind == 1:
            c = q // taps
            r = (q % taps) // src.kw
            s = q % src.kw
            chan = b + c * src.H * src.W
            # Output pixel (oh, ow) of column n0; later columns advance it without dividing.
            oh = n0 // src.Wo
            ow = n0 - oh * src.Wo
        for sl in range(nsl):
            dst = bpack + sl * kc * NR + p * NR
            j = n0 + sl * NR
            jend = min(j + NR, n1)
            if src.kind == 0:
                memcpy(dst, b + q * src.ldb + j, (jend - j) * sizeof(real))
                t = jend - j
            else:
                # Split the sliver into runs that stay inside one output row (oh fixed).
                t = 0
                while j < jend:
                    run = min(src.Wo - ow, jend - j)
                    ih = oh * src.sh - src.pt + r * src.dh
                    if ih < 0 or ih >= src.H:
                        memset(dst + t, 0, run * sizeof(real))
                    else:
                        copy_run(dst + t, chan + ih * src.W, ow * src.sw - src.pl + s * src.dw,
                                 src.sw, src.W, run)
                    t += run
                    j += run
                    ow += run
                    if ow == src.Wo:
                        ow = 0
                        oh += 1
            if t < NR:
                memset(dst + t, 0, (NR - t) * sizeof(real))


# ---------------------------------------------------------------------------- driver
cdef inline void ukernel(Py_ssize_t kc, const real *ap, Py_ssize_t a_rs, Py_ssize_t a_ks,
                         const real *bp, real *c, Py_ssize_t ldc, int mr, int nr, int first,
                         const real *bias, int relu) noexcept nogil:
    if real is float:
        fo_ukernel_f(kc, ap, a_rs, a_ks, bp, c, ldc, mr, nr, first, bias, relu)
    else:
        fo_ukernel_d(kc, ap, a_rs, a_ks, bp, c, ldc, mr, nr, first, bias, relu)


cdef enum:
    MAX_SEGS = 66  # segments of one tile: <= NR (32) + 2, with room for any ISA's NR


cdef int tile_segments(const BSource *src, Py_ssize_t j0, Py_ssize_t ncols,
                       fo_seg *seg) noexcept nogil:
    """Kind 2: split the tile's padded-grid columns [j0, j0 + ncols) into runs that stay in
    one output row and are real output columns (ow < Wo); dest = oh * Wo + ow in out."""
    cdef Py_ssize_t j = j0, jend = j0 + ncols, oh = j0 // src.Wp, ow, run, valid
    cdef int n = 0
    ow = j0 - oh * src.Wp
    while j < jend:
        run = min(src.Wp - ow, jend - j)
        valid = min(run, src.Wo - ow)
        if valid > 0:
            seg[n].lo = <int> (j - j0)
            seg[n].hi = <int> (j - j0 + valid)
            seg[n].dest = oh * src.Wo + ow
            n += 1
        j += run
        ow = 0
        oh += 1
    return n


cdef void gemm_task_direct(const real *a, Py_ssize_t lda, Py_ssize_t M, Py_ssize_t K,
                           const real *b, const BSource *src, real *c, Py_ssize_t ldc,
                           Py_ssize_t m0, Py_ssize_t m1, Py_ssize_t n0, Py_ssize_t n1,
                           Py_ssize_t images, const real *bias, int relu) noexcept nogil:
    """Kind 2 (B read in place from the padded image): the loop nest of gemm_task without
    pack_b, over `images` consecutive images inside the A block loop, so that a block of
    weights (MC x KC, in L2) serves every image's tiles: with 7 x 7 outputs (2 tiles per
    image) re-streaming all the weights per image made res5 at batch 8 memory bound.
    Columns are the padded pixel grid; the write-back segments are recomputed per tile.
    A is the weights, read in place (lda > 0)."""
    cdef int MR = mr_of(c), NR = FO_DIRECT_NV * (64 // sizeof(real))
    # Row blocks hold whole MR slivers: the micro-kernel steps MR rows at a time and must not
    # cross into the next block (MR = 6 on AVX2 does not divide MC = 256).
    cdef Py_ssize_t mc = (MC // MR) * MR
    cdef Py_ssize_t pb, pc, kc, ib, ic, iend, j0, ir, ncols, img
    cdef const real *bi
    cdef real *ci
    cdef int first, last, nseg
    cdef fo_seg seg[MAX_SEGS]
    cdef Py_ssize_t kcb = src.kc_direct
    for pb in range((K + kcb - 1) // kcb):
        pc = pb * kcb
        kc = min(kcb, K - pc)
        first = pc == 0
        last = pc + kc == K
        for ib in range((m1 - m0 + mc - 1) // mc):
            ic = m0 + ib * mc
            iend = min(ic + mc, m1)
            for img in range(images):
                bi = b + img * src.b_image_stride
                ci = c + img * src.c_image_stride
                j0 = n0
                while j0 < n1:
                    ncols = min(NR, n1 - j0)
                    nseg = tile_segments(src, j0, ncols, seg)
                    if j0 + NR < n1:  # the next tile's rows, into L2 (fo_prefetch_rows)
                        fo_prefetch_rows(<const char *> (bi + j0 + NR), src.boff + pc, kc,
                                         sizeof(real), min(NR, n1 - j0 - NR) * sizeof(real))
                    ir = ic
                    while ir < iend:
                        if real is float:
                            fo_ukernel_f_direct(kc, a + ir * lda + pc, lda, 1, bi + j0,
                                                src.boff + pc, <int> ncols, ci + ir * ldc,
                                                ldc, seg, nseg, <int> min(MR, M - ir), first,
                                                bias + ir if (last and bias != NULL) else NULL,
                                                relu and last)
                        else:
                            fo_ukernel_d_direct(kc, a + ir * lda + pc, lda, 1, bi + j0,
                                                src.boff + pc, <int> ncols, ci + ir * ldc,
                                                ldc, seg, nseg, <int> min(MR, M - ir), first,
                                                bias + ir if (last and bias != NULL) else NULL,
                                                relu and last)
                        ir += MR
                    j0 += NR


cdef int dense_segments(const BSource *src, Py_ssize_t j0, Py_ssize_t ncols,
                        fo_seg *seg) noexcept nogil:
    """Kind 3: split the tile's dense columns [j0, j0 + ncols) at image boundaries; the
    pixels of one image are contiguous in out, dest = n * c_image_stride + pixel."""
    cdef Py_ssize_t j = j0, jend = j0 + ncols, n, pix, run
    cdef int k = 0
    while j < jend:
        n = j // src.P
        pix = j - n * src.P
        run = min(src.P - pix, jend - j)
        seg[k].lo = <int> (j - j0)
        seg[k].hi = <int> (j - j0 + run)
        seg[k].dest = n * src.c_image_stride + pix
        k += 1
        j += run
    return k


cdef void gemm_task_dense(const real *a, Py_ssize_t lda, Py_ssize_t M, Py_ssize_t K,
                          const real *b, const BSource *src, real *c, Py_ssize_t ldc,
                          Py_ssize_t m0, Py_ssize_t m1, Py_ssize_t n0, Py_ssize_t n1,
                          const real *bias, int relu, real *bpack,
                          long *runs) noexcept nogil:
    """Kind 3: the padded-grid columns of kind 2 are dropped before the micro-kernel sees
    them. The task's columns n0:n1 of B (dense output pixels of all images,
    j = n * P + oh * Wo + ow) are copied per KC block from the padded phase planes into
    `bpack` as NR-column slivers (kc x NR, row p at p * NR), one contiguous run per
    (row p, image, output row, sliver); each sliver is copied right before the first row
    block uses it (still in L1/L2 for the micro-kernels that follow), then the direct
    micro-kernel reads it with boff[p] = p * NR. Tiles are full across output rows and
    images: 7 x 7 outputs at batch 8 fill 392 / 416 columns instead of 49 / 64."""
    cdef int MR = mr_of(c), NR = FO_DIRECT_NV * (64 // sizeof(real))
    cdef Py_ssize_t mc = (MC // MR) * MR
    cdef Py_ssize_t nsl = (n1 - n0 + NR - 1) // NR
    cdef Py_ssize_t pb, pc, kc, ib, ic, iend, sl, j0, ir, ncols, p, q, nruns = 0, j, n, pix
    cdef Py_ssize_t oh, ow, run, q0, q1
    cdef int first, last, nseg
    cdef fo_seg seg[MAX_SEGS]
    cdef int dboff[KC_DIRECT_MAX]
    cdef const real *row
    cdef real *dst
    cdef real *bsl
    # runs (3 longs each, the thread's buffer): the runs of the task's columns, cut at
    # output rows, images and slivers; the same for every row p of B. Source offset in the
    # padded planes (relative to the row's boff), column within the sliver, length.
    # Sliver sl owns runs[first_run(sl) : first_run(sl + 1)], found by a scan (runs ordered).
    j = n0
    while j < n1:
        n = j // src.P
        pix = j - n * src.P
        oh = pix // src.Wo
        ow = pix - oh * src.Wo
        run = min(src.Wo - ow, n1 - j, NR - (j - n0) % NR)
        runs[3 * nruns] = n * src.b_image_stride + oh * src.Wp + ow
        runs[3 * nruns + 1] = j - n0
        runs[3 * nruns + 2] = run
        nruns += 1
        j += run
    for p in range(src.kc_direct):
        dboff[p] = <int> (p * NR)
    for pb in range((K + src.kc_direct - 1) // src.kc_direct):
        pc = pb * src.kc_direct
        kc = min(src.kc_direct, K - pc)
        first = pc == 0
        last = pc + kc == K
        for ib in range((m1 - m0 + mc - 1) // mc):
            ic = m0 + ib * mc
            iend = min(ic + mc, m1)
            q0 = 0
            for sl in range(nsl):
                j0 = n0 + sl * NR
                ncols = min(NR, n1 - j0)
                bsl = bpack + sl * src.kc_direct * NR
                if ib == 0:  # copy the sliver: kc rows of its runs
                    q1 = q0
                    while q1 < nruns and runs[3 * q1 + 1] < sl * NR + NR:
                        q1 += 1
                    for p in range(kc):
                        row = b + src.boff[pc + p]
                        dst = bsl + p * NR - sl * NR
                        if real is float:
                            fo_copy_runs_f(dst, row, runs, q0, q1)
                        else:
                            fo_copy_runs_d(dst, row, runs, q0, q1)
                    q0 = q1
                nseg = dense_segments(src, j0, ncols, seg)
                ir = ic
                while ir < iend:
                    if real is float:
                        fo_ukernel_f_direct(kc, a + ir * lda + pc, lda, 1, bsl, dboff,
                                            <int> ncols, c + ir * ldc, ldc, seg, nseg,
                                            <int> min(MR, M - ir), first,
                                            bias + ir if (last and bias != NULL) else NULL,
                                            relu and last)
                    else:
                        fo_ukernel_d_direct(kc, a + ir * lda + pc, lda, 1, bsl, dboff,
                                            <int> ncols, c + ir * ldc, ldc, seg, nseg,
                                            <int> min(MR, M - ir), first,
                                            bias + ir if (last and bias != NULL) else NULL,
                                            relu and last)
                    ir += MR


cdef void gemm_task(const real *apack, Py_ssize_t lda, Py_ssize_t M, Py_ssize_t K, const real *b,
                    const BSource *src, real *c, Py_ssize_t ldc, Py_ssize_t m0, Py_ssize_t m1,
                    Py_ssize_t n0, Py_ssize_t n1, const real *bias, int relu,
                    real *bpack) noexcept nogil:
    """C[m0:m1, n0:n1] = A[m0:m1] @ B[:, n0:n1] (+ bias, ReLU): one task, one thread.

    lda == 0: `apack` is packed (pack_a). lda > 0: `apack` is A itself, row-major with row
    stride lda, read in place by the micro-kernel (8 unit-stride row streams)."""
    cdef int MR = mr_of(bpack), NR = nr_of(bpack)
    cdef Py_ssize_t Mpad = round_up(M, MR)
    # Row blocks hold whole MR slivers, so a block starts on a packed sliver (see above).
    cdef Py_ssize_t mc = (MC // MR) * MR
    cdef Py_ssize_t pb, pc, kc, ib, ic, iend, jr, ir, nsl = (n1 - n0 + NR - 1) // NR
    cdef int first, last
    cdef const real *ap
    for pb in range((K + KC - 1) // KC):
        pc = pb * KC
        kc = min(KC, K - pc)
        first = pc == 0
        last = pc + kc == K
        pack_b(b, src, pc, kc, n0, n1, bpack)
        for ib in range((m1 - m0 + mc - 1) // mc):
            ic = m0 + ib * mc
            iend = min(ic + mc, m1)
            for jr in range(nsl):
                ir = ic
                while ir < iend:
                    if lda == 0:
                        ap = apack + pc * Mpad + ir * kc
                    else:
                        ap = apack + ir * lda + pc
                    ukernel(kc, ap, 1 if lda == 0 else lda, MR if lda == 0 else 1,
                            bpack + jr * kc * NR,
                            c + ir * ldc + n0 + jr * NR, ldc, <int> min(MR, M - ir),
                            <int> min(NR, n1 - n0 - jr * NR), first,
                            bias + ir if (last and bias != NULL) else NULL, relu and last)
                    ir += MR


cdef int gemm_run(const real *apack, Py_ssize_t lda, Py_ssize_t M, Py_ssize_t K, Py_ssize_t N,
                  const real *b, Py_ssize_t b_image_stride, Py_ssize_t b_group_stride,
                  const BSource *src, real *c, Py_ssize_t ldc, Py_ssize_t c_image_stride,
                  Py_ssize_t c_group_stride, Py_ssize_t a_group_stride, const real *bias,
                  int relu, Py_ssize_t images, Py_ssize_t groups, Py_ssize_t m_block,
                  Py_ssize_t n_block) noexcept nogil:
    """Run every task (image, group, m block, n block) over the OpenMP threads.

    Each thread packs B into its own buffer (KC x n_block). Returns -1 if the allocation
    failed (the caller raises MemoryError)."""
    cdef Py_ssize_t m_tasks = (M + m_block - 1) // m_block
    cdef Py_ssize_t n_tasks = (N + n_block - 1) // n_block
    cdef Py_ssize_t per_image = groups * m_tasks * n_tasks
    cdef Py_ssize_t t, img, g, rest, m0, n0, img_tasks = images, ipt = 1
    if src.kind == 2:  # tasks take blocks of images_per_task images
        ipt = src.images_per_task
        img_tasks = (images + ipt - 1) // ipt
    elif src.kind == 3:  # the images are folded into the columns (N = images * P)
        img_tasks = 1
    cdef int threads = openmp.omp_get_max_threads()
    cdef Py_ssize_t slot = KC * round_up(n_block, nr_of(c))
    if src.kind == 2:
        slot = 16
    elif src.kind == 3:  # B block, one sliver of slack (copy spill), run table (3 n_block)
        slot = (src.kc_direct * round_up(n_block, FO_DIRECT_NV * (64 // sizeof(real)))
                + 64 + round_up(3 * n_block * sizeof(long) // sizeof(real), 16))
    # One B packing buffer per thread, allocated up front (a worksharing loop must be reached
    # by every thread, so no thread may bail out inside the parallel region).
    cdef real *buffers = alloc_aligned(threads * slot, c)
    cdef real *bpack
    if buffers == NULL:
        return -1
    # Tasks are equal-sized except at the edges; dynamic scheduling absorbs those and the
    # stalls of a shared machine.
    for t in prange(img_tasks * per_image, schedule="dynamic", num_threads=threads):
        bpack = buffers + openmp.omp_get_thread_num() * slot
        img = t // per_image
        rest = t % per_image
        g = rest // (m_tasks * n_tasks)
        rest = rest % (m_tasks * n_tasks)
        m0 = (rest // n_tasks) * m_block
        n0 = (rest % n_tasks) * n_block
        if src.kind == 3:
            gemm_task_dense(apack + g * a_group_stride, lda, M, K, b + g * b_group_stride, src,
                            c + g * c_group_stride, ldc, m0, min(m0 + m_block, M), n0,
                            min(n0 + n_block, N), bias + g * M if bias != NULL else NULL,
                            relu, bpack, <long *> (bpack + 64 + src.kc_direct * round_up(
                                n_block, FO_DIRECT_NV * (64 // sizeof(real)))))
        elif src.kind == 2:
            gemm_task_direct(apack + g * a_group_stride, lda, M, K,
                             b + img * ipt * b_image_stride + g * b_group_stride, src,
                             c + img * ipt * c_image_stride + g * c_group_stride, ldc,
                             m0, min(m0 + m_block, M), n0, min(n0 + n_block, N),
                             min(ipt, images - img * ipt),
                             bias + g * M if bias != NULL else NULL, relu)
        else:
            gemm_task(apack + g * a_group_stride, lda, M, K,
                      b + img * b_image_stride + g * b_group_stride, src,
                      c + img * c_image_stride + g * c_group_stride, ldc,
                      m0, min(m0 + m_block, M), n0, min(n0 + n_block, N),
                      bias + g * M if bias != NULL else NULL, relu, bpack)
    free(buffers)
    return 0


def task_grid(Py_ssize_t M, Py_ssize_t N, Py_ssize_t outer, int mr, int nr, int threads,
              double m_split_cost=0.02):
    """(m_block, n_block) splitting an outer x M x N problem (outer = images x groups) into
    tasks for `threads` threads.

    Minimises the modelled makespan: rounds of tasks x padded micro-tiles per task, plus a
    charge of m_split_cost per tile and m split for re-packing B (every extra m split re-packs
    the same columns).
    Blocks are multiples of the micro-tile; n blocks are capped at NC_MAX so a task's B block
    stays in L2."""
    cdef Py_ssize_t best_m = M, best_n = N
    cdef double best = -1, cost
    cdef Py_ssize_t ms, ns, mb, nb, tasks, rounds, tiles
    m_slivers = (M + mr - 1) // mr
    n_slivers = (N + nr - 1) // nr
    for ms in range(1, min(m_slivers, 8) + 1):
        mb = (m_slivers + ms - 1) // ms * mr
        for ns in range(max(1, (N + NC_MAX - 1) // NC_MAX), min(n_slivers, 64) + 1):
            nb = (n_slivers + ns - 1) // ns * nr
            tasks = outer * ((M + mb - 1) // mb) * ((N + nb - 1) // nb)
            rounds = (tasks + threads - 1) // threads
            tiles = (mb // mr) * (nb // nr)
            cost = rounds * tiles * (1.0 + m_split_cost * ms) + 0.5 * tasks / threads
            if best < 0 or cost < best:
                best, best_m, best_n = cost, mb, nb
    return best_m, best_n
