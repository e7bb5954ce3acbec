# cython: language_level=3
"""conv2d in Cython: from seven textbook loops to an implicit GEMM on the packed micro-kernel.

out (N, K, Ho, Wo) = x (N, C, H, W) (*) w (K, C/groups, kH, kW), torch semantics: stride,
dilation, asymmetric zero padding, groups (depthwise included), no bias (the API adds it).

1. naive       - seven nested loops, a bounds test per tap; one thread.
2. vectorized  - each image copied once into zero-padded planes split by stride phase (the
                 "wide grid"), so every tap is one offset and one contiguous axpy over the
                 whole output plane (junk columns dropped at the store): packed FMAs.
3. parallel    - the same, input and output planes (image, channel) over OpenMP threads.
4. tiled       - implicit GEMM: out[g] (K/g, Ho*Wo) = W[g] (K/g, C/g*kH*kW) @ im2col(x[g]),
                 where the im2col matrix is never built: the micro-kernel reads its rows in
                 place from a zero-padded copy of the image split into stride phases (each
                 row of im2col is then one contiguous run), or, without AVX-512, from
                 slivers packed block by block straight from the image (gemm.pxi).
                 Convs with 3-wide kernel rows at unit stride (every 3x3 ResNet layer) take
                 the "ocvec" direct kernel instead (ocvec.h): output channels in the vector
                 lanes, 28-pixel register tiles, padding taps skipped, as oneDNN does.
                 Depthwise convolutions take a direct path (they have no reduction to block).

Every kernel runs with the GIL released; ``def`` wrappers unpack ConvParams and dispatch on
dtype to ``cdef ... nogil`` cores written once over the fused type ``real``.
"""
from functools import lru_cache

from cython.parallel cimport prange
from libc.string cimport memcpy, memset

import numpy as np

from fastops import workspace
from fastops.registry import register

include "gemm.pxi"


cdef struct Geom:
    # Shapes and hyper-parameters of one call, unpacked once from ConvParams.
    Py_ssize_t N, C, H, W, K, kh, kw, Ho, Wo, groups, Cg, Kg
    int sh, sw, pt, pl, dh, dw


cdef Geom geometry(x, w, out, p):
    cdef Geom g
    g.N, g.C, g.H, g.W = x.shape
    g.K, g.Cg, g.kh, g.kw = w.shape
    g.Ho, g.Wo = out.shape[2], out.shape[3]
    g.sh, g.sw, g.pt, g.pl = p.stride_h, p.stride_w, p.pad_top, p.pad_left
    g.dh, g.dw, g.groups = p.dil_h, p.dil_w, p.groups
    g.Kg = g.K // g.groups
    return g


# ---------------------------------------------------------------------------- shared helpers
# Row-axpy planes: out[oh, lo:hi] += w * x[ih, ...] per (channel, tap, output row), padding
# worked out per row. The tiled stage uses them for depthwise convs its register kernel
# does not cover (stride_w > 1, or no AVX-512), where they also apply bias + ReLU.
cdef inline void row_axpy(real *dst, const real *row, real wv, Py_ssize_t iw0, int sw, int W,
                          Py_ssize_t Wo) noexcept nogil:
    """dst[t] += wv * row[iw0 + t*sw] over the output columns t whose input column is inside
    the image (the others read zero padding and contribute nothing)."""
    cdef Py_ssize_t lo, hi, t
    cdef const real *src
    valid_range(iw0, sw, W, Wo, &lo, &hi)
    src = row + iw0
    if sw == 1:  # the common case: unit stride, vectorised
        for t in range(lo, hi):
            dst[t] += wv * src[t]
    else:
        for t in range(lo, hi):
            dst[t] += wv * src[t * sw]


cdef void plane_direct(const real *x, const real *w, real *out, const Geom *g, Py_ssize_t n,
                       Py_ssize_t k, const real *bias, int relu) noexcept nogil:
    """out[n, k] (Ho, Wo) = sum over its group's channels and taps of row axpys, then the
    optional bias + ReLU epilogue on each finished row while it is still in L1."""
    cdef Py_ssize_t grp = k // g.Kg, ci, r, s, oh, ih, t
    cdef const real *xc
    cdef real *orow
    cdef real v
    for oh in range(g.Ho):
        orow = out + ((n * g.K + k) * g.Ho + oh) * g.Wo
        for t in range(g.Wo):
            orow[t] = 0
        for ci in range(g.Cg):
            xc = x + (n * g.C + grp * g.Cg + ci) * g.H * g.W
            for r in range(g.kh):
                ih = oh * g.sh - g.pt + r * g.dh
                if ih < 0 or ih >= g.H:
                    continue
                for s in range(g.kw):
                    row_axpy(orow, xc + ih * g.W, w[((k * g.Cg + ci) * g.kh + r) * g.kw + s],
                             s * g.dw - g.pl, g.sw, <int> g.W, g.Wo)
        if bias != NULL or relu:
            for t in range(g.Wo):
                v = orow[t] + (bias[k] if bias != NULL else 0)
                if relu and not (v > 0) and v == v:  # max(v, 0) with NaN kept, as numpy
                    v = 0
                orow[t] = v


cdef void planes_run(const real[:, :, :, ::1] x, const real[:, :, :, ::1] w,
                    real[:, :, :, ::1] out,
                     Geom g, bint threads, const real[::1] bias, bint relu):
    """Every output plane by `plane_direct`; planes on one thread or over the OpenMP team."""
    cdef Py_ssize_t t
    cdef const real *px = &x[0, 0, 0, 0]
    cdef const real *pw = &w[0, 0, 0, 0]
    cdef real *po = &out[0, 0, 0, 0]
    cdef const real *pb = &bias[0] if bias is not None else NULL
    with nogil:
        if threads:
            for t in prange(g.N * g.K, schedule="static"):
                plane_direct(px, pw, po, &g, t // g.K, t % g.K, pb, relu)
        else:
            for t in range(g.N * g.K):
                plane_direct(px, pw, po, &g, t // g.K, t % g.K, pb, relu)


# ---------------------------------------------------------------------------- 1 naive
cdef void naive_core(const real *x, const real *w, real *out, const Geom *g) noexcept nogil:
    cdef Py_ssize_t n, k, oh, ow, ci, r, s, ih, iw, grp
    cdef real acc
    for n in range(g.N):
        for k in range(g.K):
            grp = k // g.Kg
            for oh in range(g.Ho):
                for ow in range(g.Wo):
                    acc = 0
                    for ci in range(g.Cg):
                        for r in range(g.kh):
                            ih = oh * g.sh - g.pt + r * g.dh
                            for s in range(g.kw):
                                iw = ow * g.sw - g.pl + s * g.dw
                                if 0 <= ih < g.H and 0 <= iw < g.W:  # else: zero padding
                                    acc += (x[((n * g.C + grp * g.Cg + ci) * g.H + ih) * g.W + iw]
                                            * w[((k * g.Cg + ci) * g.kh + r) * g.kw + s])
                    out[((n * g.K + k) * g.Ho + oh) * g.Wo + ow] = acc


cdef void naive_run(const real[:, :, :, ::1] x, const real[:, :, :, ::1] w,
                    real[:, :, :, ::1] out,
                    Geom g):
    with nogil:
        naive_core(&x[0, 0, 0, 0], &w[0, 0, 0, 0], &out[0, 0, 0, 0], &g)


@register("conv2d", "cython", "naive", "seven nested loops with a padding test per tap",
          max_flops=3e8)
def conv2d_naive(x, w, out, p):
    """Stage 1 · naive.

    The definition: for every output element (n, k, oh, ow), a sum over the input channels of
    its group and the kH x kW taps, with a bounds test standing in for the zero padding.
    One thread, GIL released.
    Bottleneck: a branch per multiply-add, scattered reads of x (a new row per tap), a serial
    reduction chain: no SIMD.
    Still missing: vectorisation, threads, any reuse of x or w from registers.
    """
    # x: (N, C, H, W)  w: (K, C/groups, kH, kW)  out: (N, K, Ho, Wo)
    g = geometry(x, w, out, p)
    if x.dtype.char == "f":
        naive_run[float](x, w, out, g)
    else:
        naive_run[double](x, w, out, g)


# ---------------------------------------------------------------------------- 2 vectorized
cdef struct WideGrid:
    # One call's padded, phase-split input ("wide grid"; see conv2d_vectorized).
    Py_ssize_t Hq, Wq  # rows and columns of one phase plane = rows (>= Ho), columns (>= Wo)
    Py_ssize_t chan  # sh * sw * Hq * Wq: the phase planes of one input channel
    Py_ssize_t taps  # Cg * kH * kW taps per output channel


cdef WideGrid wide_grid(const Geom *g, Py_ssize_t pad_bottom, Py_ssize_t pad_right):
    cdef WideGrid q
    q.Hq = (g.H + g.pt + pad_bottom + g.sh - 1) // g.sh
    q.Wq = (g.W + g.pl + pad_right + g.sw - 1) // g.sw
    q.chan = g.sh * g.sw * q.Hq * q.Wq
    q.taps = g.Cg * g.kh * g.kw
    return q


cdef void split_plane(const real *x, real *xq, const Geom *g, const WideGrid *q) noexcept nogil:
    """xq (sh, sw, Hq, Wq) = the stride phases of one zero-padded input plane x (H, W):
    xq[a, b, i, j] = xpad[a + sh*i, b + sw*j], xpad = x placed at (pad_top, pad_left) in
    zeros. Per row one copy_run (gemm.pxi: zero prefix, copied middle, zero suffix).
    The same layout as the tiled stage's `pad_phases`, one plane at a time so that the
    caller chooses one thread or the team."""
    cdef Py_ssize_t a, b, i, ih
    cdef real *row
    for a in range(g.sh):
        for b in range(g.sw):
            for i in range(q.Hq):
                row = xq + ((a * g.sw + b) * q.Hq + i) * q.Wq
                ih = a + g.sh * i - g.pt
                if ih < 0 or ih >= g.H:
                    memset(row, 0, q.Wq * sizeof(real))
                else:
                    copy_run(row, x + ih * g.W, b - g.pl, g.sw, <int> g.W, q.Wq)


cdef void tap_offsets(Py_ssize_t *offs, const Geom *g, const WideGrid *q) noexcept nogil:
    """offs (groups, taps): tap (c, r, s) of group grp reads the wide output pixel
    f = oh * Wq + ow from xq_image[offs[grp, (c*kH + r)*kW + s] + f]. Channel, phase (the
    tap's offset modulo the stride), row and column shift all fold into this one integer."""
    cdef Py_ssize_t grp, c, r, s
    for grp in range(g.groups):
        for c in range(g.Cg):
            for r in range(g.kh):
                for s in range(g.kw):
                    offs[((grp * g.Cg + c) * g.kh + r) * g.kw + s] = (
                        (grp * g.Cg + c) * q.chan
                        + ((r * g.dh) % g.sh * g.sw + (s * g.dw) % g.sw) * q.Hq * q.Wq
                        + (r * g.dh) // g.sh * q.Wq + (s * g.dw) // g.sw)


cdef void plane_wide(const real *xq, const real *wk, const Py_ssize_t *offs, real *acc,
                     real *out, const Geom *g, const WideGrid *q) noexcept nogil:
    """out (Ho, Wo) = sum over the taps t of wk[t] * xq[offs[t] : offs[t] + Ho*Wq], cropped.

    xq: one image's phase planes; wk: (taps,) the weights of one output channel; offs:
    (taps,) its group's tap offsets; acc: (Ho*Wq,) scratch, the plane on the wide grid.
    Each tap is ONE axpy over the whole wide plane (Ho*Wq = 840 values at res3 3x3 28x28,
    3248 at res2 56x56): both operands contiguous, no bounds, no per-row set-up, so gcc's
    vector loop runs full zmm width and the scalar tail is a few elements per tap, not per
    row. The plane (3.3 KiB float32 at res3, 13 KiB at res2) stays in L1 across the taps.
    The Wq - Wo junk columns per row (reading the padding or the next row) are dropped by
    the final copy."""
    cdef Py_ssize_t wide = g.Ho * q.Wq, t, f, oh
    cdef const real *src
    cdef real wv
    for f in range(wide):
        acc[f] = 0
    for t in range(q.taps):
        wv = wk[t]
        src = xq + offs[t]
        for f in range(wide):
            acc[f] += wv * src[f]
    for oh in range(g.Ho):
        memcpy(out + oh * g.Wo, acc + oh * q.Wq, g.Wo * sizeof(real))


cdef wide_run(const real[:, :, :, ::1] x, const real[:, :, :, ::1] w, real[:, :, :, ::1] out,
              Geom g, Py_ssize_t pad_bottom, Py_ssize_t pad_right, bint threads):
    """Stages 2 and 3: split every (image, channel) plane into xq (N, C, sh, sw, Hq, Wq) +
    slack, then every (image, output channel) plane by plane_wide; on one thread, or both
    loops over the OpenMP team with one acc row per thread."""
    cdef WideGrid q = wide_grid(&g, pad_bottom, pad_right)
    cdef Py_ssize_t image = g.C * q.chan, wide = g.Ho * q.Wq, t, n, k
    # The last tap's junk columns read up to (kW-1)*dW // sW past the last phase plane.
    cdef Py_ssize_t slack = g.kw * g.dw
    cdef int team = openmp.omp_get_max_threads() if threads else 1
    # One acc row per thread, rows a whole number of cache lines apart plus one spare line,
    # so no two threads ever write the same line. With rows packed back to back (res3: 840
    # floats, so the two rows shared one line, written by both threads on every tap) res3 on
    # 2 threads took 27-30 ms, slower than one thread (8 ms; loaded machine); padded: 4 ms.
    cdef Py_ssize_t lanes = 64 // sizeof(real), row = round_up(wide, lanes) + lanes
    dtype = np.float32 if real is float else np.float64
    cdef real[::1] xq_store = np.empty(g.N * image + slack, dtype=dtype)
    cdef real[:, ::1] acc_store = np.empty((team, row), dtype=dtype)
    cdef Py_ssize_t[::1] offs_store = np.empty(g.groups * q.taps, dtype=np.intp)
    cdef const real *px = &x[0, 0, 0, 0]
    cdef const real *pw = &w[0, 0, 0, 0]
    cdef real *po = &out[0, 0, 0, 0]
    cdef real *xq = &xq_store[0]
    cdef real *acc = &acc_store[0, 0]
    cdef Py_ssize_t *offs = &offs_store[0]
    with nogil:
        memset(xq + g.N * image, 0, slack * sizeof(real))
        tap_offsets(offs, &g, &q)
        if threads:
            for t in prange(g.N * g.C, schedule="static", num_threads=team):
                split_plane(px + t * g.H * g.W, xq + t * q.chan, &g, &q)
            for t in prange(g.N * g.K, schedule="static", num_threads=team):
                n = t // g.K
                k = t % g.K
                plane_wide(xq + n * image, pw + k * q.taps, offs + k // g.Kg * q.taps,
                           acc + openmp.omp_get_thread_num() * row, po + t * g.Ho * g.Wo,
                           &g, &q)
        else:
            for t in range(g.N * g.C):
                split_plane(px + t * g.H * g.W, xq + t * q.chan, &g, &q)
            for t in range(g.N * g.K):
                n = t // g.K
                k = t % g.K
                plane_wide(xq + n * image, pw + k * q.taps, offs + k // g.Kg * q.taps, acc,
                           po + t * g.Ho * g.Wo, &g, &q)


def run_wide(x, w, out, p, threads):
    g = geometry(x, w, out, p)
    if x.dtype.char == "f":
        wide_run[float](x, w, out, g, p.pad_bottom, p.pad_right, threads)
    else:
        wide_run[double](x, w, out, g, p.pad_bottom, p.pad_right, threads)


@register("conv2d", "cython", "vectorized",
          "padded wide-grid copy, then one contiguous SIMD axpy per tap over a whole plane",
          max_flops=5e9)
def conv2d_vectorized(x, w, out, p):
    """Stage 2 · vectorized.

    Changed since `naive`: each image is first copied once into zero-padded planes split by
    stride phase (`split_plane`; phase (a, b) holds padded rows a, a+sh, ... and columns
    b, b+sw, ...), the "wide grid". There every tap (c, r, s) becomes ONE offset
    (`tap_offsets`): output pixel f = oh*Wq + ow reads xq[offset + f], Wq >= Wo being the
    phase-plane width. The loops are reordered to (image, output channel), taps, pixels, and
    the innermost loop is an axpy over the whole wide output plane,
    acc[f] += w[k, t] * xq[offs[t] + f], contiguous in both arrays, branch-free, so gcc
    (-O3 -march=native -ffp-contract=fast) emits zmm FMAs. The Wq - Wo junk columns of each
    row (7 % at res3) are computed and dropped in the store. Stride, dilation, asymmetric
    padding and groups (depthwise) are all in the offsets.
    Bottleneck removed: short rows and per-row set-up. The previous version of this stage
    updated one output row (28 values at res3) per (channel, tap, row), working out the
    valid columns for every row: with a 16-lane vector loop that is 1 full vector + a 12-
    element tail, plus the range arithmetic, for 28 FMAs. Measured (float32, batch 1,
    1 thread, median of 9 calls; old and new builds run in alternating processes, 3 rounds,
    on the shared 2-core VM): res3 3x3 C128 28x28 K128 5.0-5.2 -> 27-34 GFLOP/s, res2 3x3
    C64 56x56 K64 8.2-8.7 -> 32-35, stem 7x7/2 C3 224x224 K64 5.9-6.1 -> 18-23.
    Still missing: one core; every FMA loads and stores its output element (each tap
    re-reads and re-writes the whole plane from L1) and each loaded input feeds one FMA:
    no register blocking over output channels or taps.
    """
    # x: (N, C, H, W)  w: (K, C/groups, kH, kW)  out: (N, K, Ho, Wo)
    run_wide(x, w, out, p, False)


# ---------------------------------------------------------------------------- 3 parallel
@register("conv2d", "cython", "parallel",
          "vectorized wide-grid planes, OpenMP prange over (image, channel) planes",
          max_flops=1e10)
def conv2d_parallel(x, w, out, p):
    """Stage 3 · parallel.

    Changed since `vectorized`: the padding copy (N x C input planes) and the N x K output
    planes are `prange` loops (static schedule: every plane costs the same), each thread
    with its own wide-plane accumulator row (acc_store[thread]), so there is no write
    sharing. A plane is a large unit (res3: 1152 taps x 840 pixels, ~1 M FMAs), so the
    team's start-up and the uneven last planes are noise.
    Bottleneck removed: the idle second core. Measured as for `vectorized` (2 threads;
    before: the row-axpy planes on 2 threads): res3 6.7-9.3 -> 50-63 GFLOP/s, res2
    11.7-15.9 -> 54-63, stem 13.7-15.9 -> 33-39, i.e. 1.5-2.3x the one-thread stage.
    Still missing: the arithmetic intensity is unchanged: per FMA one load of x, one load
    and one store of acc; every input plane is streamed once per output channel (K times).
    """
    # x: (N, C, H, W)  w: (K, C/groups, kH, kW)  out: (N, K, Ho, Wo)
    run_wide(x, w, out, p, True)


# ---------------------------------------------------------------------------- 4 tiled
cdef void pad_phases(const real *x, real *xq, Py_ssize_t planes, Py_ssize_t H, Py_ssize_t W,
                     int sh, int sw, Py_ssize_t Hq, Py_ssize_t Wq, Py_ssize_t pt,
                     Py_ssize_t pl, Py_ssize_t slack) noexcept nogil:
    """xq (planes, sh, sw, Hq, Wq) + `slack` zeros: phase (a, b) of plane t holds the
    zero-padded image xp[t, a + sh*i, b + sw*j] (xp = x placed at (pt, pl)). For stride 1
    that is just the padded plane. One pass over the image, parallel over the planes.

    Scheduled "guided", not "static": a static split made the calling thread wait at the end
    for the other thread's half, and that thread, asleep since the last parallel region on
    this 2-vCPU VM, started ~1 ms late: the pass took 1.0-1.5 ms instead of 0.2-0.4 on ONE
    thread for res2-res5 at batch 8 (timed inside the call, 20 calls, 2 threads). "dynamic"
    with chunks of 8 planes fixed that but split the 24 large planes of the stem at batch 8
    into 16 + 8: guided gives large chunks first and small ones at the end (stem 7x7/2 b8,
    whole conv: 144 -> 166 GF/s)."""
    cdef Py_ssize_t t, a, b_, i, ih
    cdef real *row
    for t in prange(planes, schedule="guided"):
        for a in range(sh):
            for b_ in range(sw):
                for i in range(Hq):
                    row = xq + (((t * sh + a) * sw + b_) * Hq + i) * Wq
                    ih = a + sh * i - pt
                    if ih < 0 or ih >= H:
                        memset(row, 0, Wq * sizeof(real))
                        continue
                    # Row i of phase (a, b_): row[j] = x[t, ih, b_ + sw*j - pl] or 0 in the
                    # padding, by masked vector loads/stores (gemm.pxi copy_run; stride 1
                    # and 2), not memset + memcpy + memset: libc calls on 30-60 element
                    # rows made this pass 8 % of res2 3x3 C64 56x56 at batch 8 (perf).
                    # Measured interleaved, 2 threads, vs the libc version: res2 b1 / b8
                    # 0.94 -> 0.97 / 0.95 -> 0.97 x torch, stem 7x7/2 b1 +10 %.
                    copy_run(row, x + (t * H + ih) * W, b_ - pl, sw, <int> W, Wq)
    memset(xq + planes * sh * sw * Hq * Wq, 0, slack * sizeof(real))


cdef enum:
    DIRECT_COLUMNS = 1024  # padded-grid columns per task the image blocking aims at
    DENSE_MIN_ROWS = 128  # output channels per group for the dense path (use_dense)


dense_override = None
# dense_grid's costs, in micro-tiles (MR x NR over one reduction block). Copying one NR-column
# sliver costs ~1.7 tiles: perf (1 thread) put the copy at 2.7 % of res5 3x3 C512 7x7 at
# batch 8 (64 row slivers per copied sliver) and 5.3 % of res4 C256 14x14 (32 per sliver).
# A task has a fixed cost too (run table, weights re-streamed into L2): res3 C128 28x28 at
# batch 1 in 7 tasks of 128 columns measured 0.90 vs 0.92-0.93 x torch in 2 of 416.
DENSE_COPY_TILES = 1.7
DENSE_TASK_TILES = 4.0


def use_dense(Kg, N, P, Pp, nr):
    """Kind 3 (dense columns, B packed per task) instead of kind 2 (padded grid read in
    place)? When it saves >= 5 % of the micro-tiles and there are >= DENSE_MIN_ROWS output
    channels per group to amortise the copy (each packed element then feeds >= 128 FMAs)."""
    if dense_override is not None:  # tests and benchmarks force one path
        return bool(dense_override)
    dense, grid = tile_cost(N * P, nr), N * tile_cost(Pp, nr)
    # With >= 512 rows the copy costs ~3 % and the contiguous slivers stream better than
    # C/g * kH * kW scattered plane rows: res5 3x3 C512 7x7 at batch 1 (2 tiles either way)
    # measured 1.26 vs 1.20 x torch (2 threads, interleaved).
    return Kg >= DENSE_MIN_ROWS and (dense <= 0.95 * grid or Kg >= 512 and dense <= grid)


@lru_cache(maxsize=256)
def dense_grid(M, N, outer, mr, nr, threads):
    """(m_block, n_block) for the dense path (kind 3): the split of outer x M x N whose
    modelled makespan is smallest. Unlike task_grid it charges a half-width last tile half
    (tile_cost), the column copy per task (DENSE_COPY_TILES per sliver, so every m split
    pays it again) and a fixed cost per task, and it simulates the dynamic schedule (each task
    to the least loaded thread, in task order). The 7x7 outputs of res5 at batch 8 are
    392 columns = 12.25 tiles: task_grid split them 224 + 168 columns (7 vs 5.25 tiles, one
    thread idle 25 % of the time); this picks 2 row halves x all 392 columns (12.25 tiles
    each): 0.82 -> 0.88 and 0.89 -> 0.93 x torch in two interleaved runs (2 threads, best
    medians, old and new split patched into one build); every batch-1 ResNet
    layer keeps its old split."""
    m_slivers = (M + mr - 1) // mr
    n_slivers = (N + nr - 1) // nr
    best = None
    for ms in range(1, min(m_slivers, 8) + 1):
        mb = (m_slivers + ms - 1) // ms * mr
        for ns in range(max(1, (N + NC_MAX - 1) // NC_MAX), min(n_slivers, 64) + 1):
            nb = (n_slivers + ns - 1) // ns * nr
            loads = [0.0] * threads
            for _ in range(outer):
                for m0 in range(0, M, mb):
                    rows = min(mb, M - m0)
                    for n0 in range(0, N, nb):
                        tiles = tile_cost(min(nb, N - n0), nr)
                        i = loads.index(min(loads))
                        loads[i] += ((rows + mr - 1) // mr + DENSE_COPY_TILES) * tiles
                        loads[i] += DENSE_TASK_TILES
            span = max(loads)
            # Fewer tasks first (ms, ns ascending); a finer split must win by > 1 %.
            if best is None or span < 0.99 * best[0]:
                best = (span, mb, nb)
    return best[1], best[2]


def tile_cost(cols, nr):
    """Micro-tiles of nr columns covering `cols`; a last tile of at most half a tile costs
    half (the direct micro-kernel then runs one vector of columns)."""
    rest = cols % nr
    return cols // nr + (0 if rest == 0 else 0.5 if 2 * rest <= nr else 1)


cdef direct_gemm_run(const real[:, :, :, ::1] x, const real[:, :, :, ::1] w,
                    real[:, :, :, ::1] out,
                     Geom g, Py_ssize_t pb_, Py_ssize_t pr, const real[::1] bias, bint relu):
    """Conv with B read in place from the zero-padded image, split into stride phases
    (gemm.pxi kind 2). With stride (sh, sw) the padded plane is cut into sh x sw phase
    planes (Hq, Wq), phase (a, b) = rows a, a+sh, ..., columns b, b+sw, ...; tap (r, s)
    reads phase ((r*dh) % sh, (s*dw) % sw) shifted by ((r*dh) // sh, (s*dw) // sw), so every
    row of B is again one contiguous run, over the grid j' = oh * Wq + ow."""
    cdef Py_ssize_t red = g.Cg * g.kh * g.kw
    cdef Py_ssize_t Hp = g.H + g.pt + pb_, Wp = g.W + g.pl + pr
    cdef Py_ssize_t Hq = (Hp + g.sh - 1) // g.sh, Wq = (Wp + g.sw - 1) // g.sw
    cdef Py_ssize_t plane = g.sh * g.sw * Hq * Wq  # one channel's phase planes
    cdef Py_ssize_t P = g.Ho * g.Wo, Pp = g.Ho * Wq
    cdef Py_ssize_t slack = (g.kw - 1) * g.dw // g.sw + 64, q, c, r, s_
    cdef const real *pbias = &bias[0] if bias is not None else NULL
    cdef const real *xsrc = &x[0, 0, 0, 0]
    cdef BSource src
    cdef int status = 0
    cdef int[::1] boff = np.empty(red, dtype=np.int32)
    cdef real[::1] xq_store
    cdef Py_ssize_t m_block, n_block
    # Row p = (c, r, s) of B starts at boff[p] in the group's phase planes.
    for c in range(g.Cg):
        for r in range(g.kh):
            for s_ in range(g.kw):
                q = (c * g.kh + r) * g.kw + s_
                boff[q] = <int> (c * plane
                                 + ((r * g.dh) % g.sh * g.sw + (s_ * g.dw) % g.sw) * Hq * Wq
                                 + (r * g.dh) // g.sh * Wq + (s_ * g.dw) // g.sw)
    src.kind = 2
    src.Wo = <int> g.Wo
    src.Wp = Wq
    src.boff = &boff[0]
    dense = use_dense(g.Kg, g.N, P, Pp, FO_DIRECT_NV * 64 // sizeof(real))
    # Nothing to pad or split, nothing read past the image: use x itself (not for the dense
    # copy, which reads up to a tile width past each run).
    in_place = (Hp == g.H and Wp == g.W and g.kw == 1 and g.sh == 1 and g.sw == 1
                and not dense)
    if not in_place:
        xq_store = np.empty(g.N * g.C * plane + slack, dtype=np.asarray(x).dtype)
        with nogil:
            pad_phases(xsrc, &xq_store[0], g.N * g.C, g.H, g.W, g.sh, g.sw, Hq, Wq, g.pt,
                       g.pl, slack)
        xsrc = &xq_store[0]
    # Small outputs: a task covers several images (enough for ~1024 columns), so a weight
    # block loaded into L2 serves all their tiles.
    src.images_per_task = max(1, min(g.N, DIRECT_COLUMNS // Pp))
    src.b_image_stride = g.C * plane
    src.c_image_stride = g.K * P
    src.P = P
    src.kc_direct = direct_kc(red)
    cols = Pp
    if dense:
        src.kind = 3
        cols = g.N * P
        m_block, n_block = dense_grid(g.Kg, cols, g.groups, mr_of(&out[0, 0, 0, 0]),
                                      FO_DIRECT_NV * 64 // sizeof(real),
                                      openmp.omp_get_max_threads())
    else:
        m_block, n_block = _grid(g.Kg, Pp, ((g.N + src.images_per_task - 1)
                                            // src.images_per_task) * g.groups,
                                 "f" if real is float else "d")
    with nogil:
        status = gemm_run(&w[0, 0, 0, 0], red, g.Kg, red, cols, xsrc, g.C * plane,
                          g.Cg * plane, &src, &out[0, 0, 0, 0], P, g.K * P, g.Kg * P,
                          g.Kg * red, pbias, relu, g.N, g.groups, m_block, n_block)
    if status:
        raise MemoryError("conv2d/cython/tiled: could not allocate packing buffers")


# ---------------------------------------------------------------------------- ocvec variant
cdef extern from "ocvec.h" nogil:
    enum:
        FO_HAVE_OCVEC
        FO_OCVEC_PIXELS
    ctypedef struct fo_ocseg:
        long x, o
        int n, r0, r1, left, right
    void fo_ocvec_tile_f(int segw, long C, long kh, long plane, long rstride, const float *xq,
                         const float *wr, const fo_ocseg *seg, float *out, long P, long k0,
                         long kmax, const float *bias, int relu)
    void fo_ocvec_tile_d(int segw, long C, long kh, long plane, long rstride, const double *xq,
                         const double *wr, const fo_ocseg *seg, double *out, long P, long k0,
                         long kmax, const double *bias, int relu)
    void fo_ocvec_pack_f(const float *w, long red, long k0, long kmax, long L, float *wr)
    void fo_ocvec_pack_d(const double *w, long red, long k0, long kmax, long L, double *wr)


ocvec_override = None
# Input and output channels per group from which the ocvec variant replaces the implicit
# GEMM (use_ocvec).
OCVEC_MIN_CHANNELS = 32


def ocvec_segment_width(Wo):
    """Pixels per segment of the 28-pixel ocvec tile for output rows of Wo columns: 28, 14 or
    7 (then 1, 2 or 4 segments, each in one output row), whichever computes fewest unused
    columns (a row's last segment may stick out past Wo); ties to the longer segment."""
    return min((28, 14, 7), key=lambda s: -(-Wo // s) * s - Wo)


def ocvec_available():
    """Whether this build has the ocvec kernel (AVX-512) and may run it (SIMD enabled)."""
    return bool(FO_HAVE_OCVEC and fo_simd_enabled)


def use_ocvec(N, Cg, Kg, kh, kw, sh, sw, dh, dw, Ho, Wo, lanes=16):
    """The ocvec variant for this conv? Its kernel needs kW = 3 with unit horizontal stride
    and dilation, unit vertical stride, and AVX-512; it is chosen where it measured faster
    than the implicit GEMM (see conv2d_tiled): >= 32 input and output channels per group,
    whole vectors of output channels (`lanes` per vector: 16 float32, 8 float64) and output
    rows cut into whole segments. Below that the GEMM won: 8 input channels 106 vs 131
    GF/s, 24 output channels 112 vs 157, rows of 20 (segments of 7) 152 vs 164."""
    if not ocvec_available():
        return False
    if not (kw == 3 and sw == 1 and dw == 1 and sh == 1 and Cg > 1):
        return False
    if ocvec_override is not None:  # tests and benchmarks force it on (where it fits) or off
        return bool(ocvec_override)
    return (Cg >= OCVEC_MIN_CHANNELS and Kg >= OCVEC_MIN_CHANNELS and Kg % lanes == 0
            and Wo % ocvec_segment_width(Wo) == 0)


cdef ocvec_run(const real[:, :, :, ::1] x, const real[:, :, :, ::1] w, real[:, :, :, ::1] out,
               Geom g, Py_ssize_t pad_bottom, Py_ssize_t pad_right, const real[::1] bias,
               bint relu, const real[::1] wr_all):
    """Conv by fo_ocvec_tile (ocvec.h): output channels in the vector lanes, every 28-pixel
    tile accumulated over the whole reduction in registers, padding taps skipped. wr_all:
    None, or the weights already reordered for every block (ocvec_prepack)."""
    if g.N * g.Ho * g.Wo == 0:  # an empty batch: nothing to compute (and no tiles to split)
        return
    cdef WideGrid q = wide_grid(&g, pad_bottom, pad_right)  # stride 1: one plane (Hq, Wq)
    cdef Py_ssize_t L = 64 // sizeof(real)  # output channels per tile
    cdef int segw = ocvec_segment_width(g.Wo)
    cdef Py_ssize_t segs = FO_OCVEC_PIXELS // segw
    cdef Py_ssize_t per_row = (g.Wo + segw - 1) // segw
    # Segments over all images (image-major), so tiles run on across image boundaries:
    # 7 x 7 outputs at batch 8 fill 14 tiles of 4 rows, not 8 x 2 tiles with 7 of 8 rows.
    cdef Py_ssize_t nchunks = g.N * g.Ho * per_row, tiles = (nchunks + segs - 1) // segs
    cdef Py_ssize_t red = q.taps, blocks = (g.Kg + L - 1) // L
    # Read x itself, no padded copy, when the kernel never touches the padding: rows are
    # always skipped by r0 / r1, and with at most one padding column each side (equal) the
    # only padding columns a segment could read are its broadcast 0 at the left edge and
    # segw + 1 at the right edge, which the kernel skips if every segment of a tile agrees
    # (one segment per tile, or segments that are whole rows). The 3x3 'same' ResNet convs.
    cdef bint direct = (g.pl == pad_right and g.pl <= 1
                        and (segw == g.Wo or segs == 1) and g.Wo % segw == 0)
    cdef Py_ssize_t Wrow = g.W if direct else q.Wq  # row stride of what the kernel reads
    cdef Py_ssize_t plane = g.H * g.W if direct else q.Hq * q.Wq
    cdef Py_ssize_t image = g.C * plane
    # Padded copy: a row's last segment reads up to segw + 1 columns past its start, the
    # last row of the last plane included: keep that inside the buffer.
    cdef Py_ssize_t slack = 0 if direct else segw + 2 + 64
    cdef int threads = openmp.omp_get_max_threads()
    # Tasks (group, channel block, run of tiles), runs only as fine as needed for >= 8 tasks
    # per thread; consecutive tasks share a channel block (its weights in cache).
    cdef Py_ssize_t units = g.groups * blocks
    cdef Py_ssize_t runs = min(tiles, max(1, (8 * threads + units - 1) // units))
    cdef Py_ssize_t run = (tiles + runs - 1) // runs
    runs = (tiles + run - 1) // run
    cdef Py_ssize_t i, n, oh, ow0, r
    dtype = np.float32 if real is float else np.float64
    # The segments of every tile (the same for all channel blocks and groups); x and o
    # count from image 0 of the group's input planes / output channels.
    seg_store = np.zeros(tiles * segs * sizeof(fo_ocseg), dtype=np.uint8)
    cdef fo_ocseg *seg = <fo_ocseg *> <size_t> seg_store.ctypes.data
    for i in range(nchunks):
        n = i // (g.Ho * per_row)
        oh = i // per_row % g.Ho
        ow0 = (i % per_row) * segw
        if direct:  # real coordinates: row oh - pt, column ow0 - pl (may start before x)
            seg[i].x = n * image + (oh - g.pt) * Wrow + ow0 - g.pl
        else:  # padded coordinates
            seg[i].x = n * image + oh * Wrow + ow0
        seg[i].o = n * g.K * g.Ho * g.Wo + oh * g.Wo + ow0
        seg[i].n = <int> min(segw, g.Wo - ow0)
        seg[i].r0 = <int> g.kh
        seg[i].r1 = 0
        for r in range(g.kh):  # the kernel rows that read a real input row
            if 0 <= oh - g.pt + r * g.dh < g.H:
                seg[i].r0 = <int> min(seg[i].r0, r)
                seg[i].r1 = <int> (r + 1)
        seg[i].left = ow0 - g.pl < 0  # broadcast 0 = column ow0 - pl of the input
        seg[i].right = ow0 + segw + 1 - g.pl >= g.W  # broadcast segw + 1
    cdef real[::1] xq_store
    cdef real[::1] wr_store
    with workspace.borrow(0 if direct else g.N * image + slack, dtype) as xq_arr, \
            workspace.borrow(0 if wr_all is not None else threads * round_up(red * L, 16),
                             dtype) as wr_arr:
        xq_store = xq_arr
        wr_store = wr_arr
        ocvec_loops(&x[0, 0, 0, 0], &w[0, 0, 0, 0], &out[0, 0, 0, 0],
                    &bias[0] if bias is not None else NULL, relu,
                    NULL if direct else &xq_store[0],
                    &wr_store[0] if wr_all is None else NULL,
                    &wr_all[0] if wr_all is not None else NULL, seg, &g, &q, segw, segs,
                    red, blocks, L, plane, Wrow, slack, units, tiles, run, runs, threads)


cdef inline void ocvec_pack_block(const real *pw, Py_ssize_t grp, Py_ssize_t kb,
                                  Py_ssize_t Kg, Py_ssize_t red, Py_ssize_t L,
                                  real *dst) noexcept nogil:
    """dst (red, L) = block kb (L output channels) of group grp of the weights pw (K, red),
    reordered for the ocvec kernel (fo_ocvec_pack_*): the one reorder both the per-call tasks
    and ocvec_prepack use."""
    if real is float:
        fo_ocvec_pack_f(pw + grp * Kg * red, red, kb * L, Kg, L, dst)
    else:
        fo_ocvec_pack_d(pw + grp * Kg * red, red, kb * L, Kg, L, dst)


cdef ocvec_pack_all(const real[:, :, :, ::1] w, real[::1] wr, Py_ssize_t groups,
                    Py_ssize_t L):
    """wr = every (group, block of L output channels) of w reordered as the tasks of
    ocvec_loops would, blocks one after the other (see ocvec_prepack)."""
    cdef Py_ssize_t Kg = w.shape[0] // groups, red = w.shape[1] * w.shape[2] * w.shape[3]
    cdef Py_ssize_t blocks = (Kg + L - 1) // L, t
    cdef const real *pw = &w[0, 0, 0, 0]
    cdef real *pr = &wr[0]
    with nogil:
        for t in prange(groups * blocks, schedule="guided"):
            ocvec_pack_block(pw, t // blocks, t % blocks, Kg, red, L, pr + t * red * L)


class PackedConvWeights:
    """Conv weights w (K, C/g, kH, kW) with the tiled stage's one-time work done: `ocvec` is
    the reordered weights of the ocvec variant (every block, as its tasks would make them on
    each call), or None where that variant cannot run. Made by ocvec_prepack."""

    __slots__ = ("w", "ocvec")

    def __init__(self, w, ocvec):
        self.w = w
        self.ocvec = ocvec


def ocvec_prepack(w, p):
    """fastops.nn's prepack hook (kernel.prepack) for conv2d/tiled and conv2d_bias_relu/fused:
    reorder the weights for the ocvec variant once per model instead of in every call. Whether
    a call then runs ocvec still depends on its input (rows cut into whole segments); if not,
    the packed weights are simply not used. At batch 1 the per-call reorder is a large part of
    the work: res5 3x3 C512 7x7 reorders 9.4 MB of weights for 0.23 GFLOP."""
    w = np.ascontiguousarray(w)
    K, Cg, kh, kw = w.shape
    lanes = 64 // w.itemsize
    Kg = K // p.groups
    packed = None
    # Wo = 28 stands for "rows that fit": the real rows are checked at each call.
    if use_ocvec(1, Cg, Kg, kh, kw, p.stride_h, p.stride_w, p.dil_h, p.dil_w, 1, 28, lanes):
        packed = np.empty(p.groups * ((Kg + lanes - 1) // lanes) * Cg * kh * kw * lanes,
                          dtype=w.dtype)
        if w.dtype.char == "f":
            ocvec_pack_all[float](w, packed, p.groups, lanes)
        else:
            ocvec_pack_all[double](w, packed, p.groups, lanes)
    return PackedConvWeights(w, packed)


cdef void ocvec_loops(const real *px, const real *pw, real *po, const real *pbias, bint relu,
                      real *xq, real *wr, const real *wr_all, const fo_ocseg *seg,
                      const Geom *gp,
                      const WideGrid *qp, int segw, Py_ssize_t segs, Py_ssize_t red,
                      Py_ssize_t blocks, Py_ssize_t L, Py_ssize_t plane, Py_ssize_t Wrow,
                      Py_ssize_t slack, Py_ssize_t units, Py_ssize_t tiles, Py_ssize_t run,
                      Py_ssize_t runs, int threads) noexcept:
    """ocvec_run's passes: pad the images into xq (unless xq is NULL: the kernel reads x),
    then the tasks (reorder a block of weights into wr, unless wr_all has them all, then run
    its tiles)."""
    cdef Geom g = gp[0]
    cdef WideGrid q = qp[0]
    cdef Py_ssize_t t, u, grp, kb, tile, P = g.Ho * g.Wo
    cdef const real *wt
    cdef real *wbuf
    cdef const real *src = px if xq == NULL else xq
    with nogil:
        if xq != NULL:
            pad_phases(px, xq, g.N * g.C, g.H, g.W, 1, 1, q.Hq, q.Wq, g.pt, g.pl, slack)
        for t in prange(units * runs, schedule="dynamic", num_threads=threads):
            u = t // runs  # (group, block)
            kb = u % blocks
            grp = u // blocks
            # The task reorders its block's weights into this thread's buffer, which its
            # tiles then read from L2 (no separate pass, no barrier: while one thread
            # reorders, the other computes). With runs > 1 a block is reordered once per
            # run; runs > 1 only when there are few blocks, i.e. few weights.
            if wr_all != NULL:
                wt = wr_all + (grp * blocks + kb) * red * L
            else:
                wbuf = wr + openmp.omp_get_thread_num() * round_up(red * L, 16)
                ocvec_pack_block(pw, grp, kb, g.Kg, red, L, wbuf)
                wt = wbuf
            for tile in range((t % runs) * run, min((t % runs) * run + run, tiles)):
                if real is float:
                    fo_ocvec_tile_f(segw, g.Cg, g.kh, plane, g.dh * Wrow,
                                    src + grp * g.Cg * plane,
                                    wt, seg + tile * segs,
                                    po + grp * g.Kg * P, P, kb * L, g.Kg,
                                    pbias + grp * g.Kg if pbias != NULL else NULL, relu)
                else:
                    fo_ocvec_tile_d(segw, g.Cg, g.kh, plane, g.dh * Wrow,
                                    src + grp * g.Cg * plane,
                                    wt, seg + tile * segs,
                                    po + grp * g.Kg * P, P, kb * L, g.Kg,
                                    pbias + grp * g.Kg if pbias != NULL else NULL, relu)


cdef implicit_gemm_run(const real[:, :, :, ::1] x, const real[:, :, :, ::1] w,
                    real[:, :, :, ::1] out,
                       Geom g, const real[::1] bias, bint relu, Py_ssize_t m_block,
                       Py_ssize_t n_block):
    cdef Py_ssize_t red = g.Cg * g.kh * g.kw  # GEMM K: one row of B per (channel, tap)
    cdef Py_ssize_t P = g.Ho * g.Wo  # GEMM N: output pixels of one image
    cdef const real *pb = &bias[0] if bias is not None else NULL
    cdef BSource src
    cdef int status = 0
    # A 1x1, stride-1, unpadded conv reads x[g] as a plain (C/g, H*W) matrix: cheaper packing.
    src.kind = 0 if (g.kh == 1 and g.kw == 1 and g.sh == 1 and g.sw == 1 and g.pt == 0
                     and g.pl == 0 and g.Ho == g.H and g.Wo == g.W) else 1
    src.ldb = g.H * g.W
    src.H, src.W, src.kh, src.kw = g.H, g.W, g.kh, g.kw
    src.sh, src.sw, src.pt, src.pl, src.dh, src.dw, src.Wo = g.sh, g.sw, g.pt, g.pl, g.dh, g.dw, g.Wo
    with nogil:
        # A = the weights, read in place (lda = red): w is already row-major (K, C/g*kH*kW),
        # each row contiguous along the reduction, and rows of group grp start at grp*Kg*red.
        status = gemm_run(&w[0, 0, 0, 0], red, g.Kg, red, P, &x[0, 0, 0, 0], g.C * g.H * g.W,
                          g.Cg * g.H * g.W, &src, &out[0, 0, 0, 0], P, g.K * P, g.Kg * P,
                          g.Kg * red, pb, relu, g.N, g.groups, m_block, n_block)
    if status:
        raise MemoryError("conv2d/cython/tiled: could not allocate packing buffers")


@lru_cache(maxsize=256)
def _grid(Kg, P, outer, dtype_char):
    mr, nr = micro_tile("float32" if dtype_char == "f" else "float64")
    return task_grid(Kg, P, outer, mr, nr, openmp.omp_get_max_threads())


# ---------------------------------------------------------------------------- depthwise
cdef extern from "depthwise.h" nogil:
    enum:
        FO_HAVE_DW
    long fo_dw_buffer_width(long Wo, long kw, long dw, long lanes)
    void fo_dw_planes_f(const float *x, long H, long W, const float *w, long k0, long k1,
                        long kh, long kw, long sh, long pt, long pl, long dh, long dw,
                        float *out, long Ho, long Wo, const float *bias, int relu, float *buf)
    void fo_dw_planes_d(const double *x, long H, long W, const double *w, long k0, long k1,
                        long kh, long kw, long sh, long pt, long pl, long dh, long dw,
                        double *out, long Ho, long Wo, const double *bias, int relu,
                        double *buf)


cdef depthwise_run(const real[:, :, :, ::1] x, const real[:, :, :, ::1] w,
                    real[:, :, :, ::1] out,
                   Geom g, const real[::1] bias, bint relu):
    """Depthwise with the register-accumulating plane kernel of depthwise.h: one task per
    (image, group), i.e. one padded input plane shared by the group's Kg output planes."""
    cdef Py_ssize_t t, n, grp
    cdef int threads = openmp.omp_get_max_threads()
    cdef Py_ssize_t lanes = 64 // sizeof(real)
    cdef Py_ssize_t slot = round_up(g.H * fo_dw_buffer_width(g.Wo, g.kw, g.dw, lanes), lanes)
    cdef const real *px = &x[0, 0, 0, 0]
    cdef const real *pw = &w[0, 0, 0, 0]
    cdef real *po = &out[0, 0, 0, 0]
    cdef const real *pb = &bias[0] if bias is not None else NULL
    cdef real *buffers
    cdef real *buf
    with nogil:
        buffers = alloc_aligned(threads * slot, po)
        if buffers != NULL:
            for t in prange(g.N * g.groups, schedule="static", num_threads=threads):
                buf = buffers + openmp.omp_get_thread_num() * slot
                n = t // g.groups
                grp = t % g.groups
                if real is float:
                    fo_dw_planes_f(px + (n * g.C + grp) * g.H * g.W, g.H, g.W, pw,
                                   grp * g.Kg, (grp + 1) * g.Kg, g.kh, g.kw, g.sh, g.pt, g.pl,
                                   g.dh, g.dw, po + (n * g.K + grp * g.Kg) * g.Ho * g.Wo,
                                   g.Ho, g.Wo, pb, relu, buf)
                else:
                    fo_dw_planes_d(px + (n * g.C + grp) * g.H * g.W, g.H, g.W, pw,
                                   grp * g.Kg, (grp + 1) * g.Kg, g.kh, g.kw, g.sh, g.pt, g.pl,
                                   g.dh, g.dw, po + (n * g.K + grp * g.Kg) * g.Ho * g.Wo,
                                   g.Ho, g.Wo, pb, relu, buf)
            free(buffers)
    if buffers == NULL:
        raise MemoryError("conv2d/cython/tiled: could not allocate depthwise buffers")


def conv2d_tiled_epilogue(x, w, out, p, bias=None, relu=False, prepacked=None):
    """The tiled conv with an optional bias (K,) + ReLU epilogue applied in the write-back
    (micro-kernel registers, or the finished row for depthwise). Used by conv2d/tiled
    (no epilogue) and conv2d_bias_relu/fused."""
    g = geometry(x, w, out, p)
    if g.Cg == 1 and g.sw == 1 and FO_HAVE_DW and fo_simd_enabled:
        # Depthwise (one input channel per group), unit horizontal stride: direct planes with
        # the taps summed in registers (depthwise.h), memory bound.
        if x.dtype.char == "f":
            depthwise_run[float](x, w, out, g, bias, relu)
        else:
            depthwise_run[double](x, w, out, g, bias, relu)
        return
    if g.Cg == 1:
        # Other depthwise convs (strided columns; no AVX-512): the row-axpy planes.
        if x.dtype.char == "f":
            planes_run[float](x, w, out, g, True, bias, relu)
        else:
            planes_run[double](x, w, out, g, True, bias, relu)
        return
    if use_ocvec(g.N, g.Cg, g.Kg, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw, g.Ho, g.Wo,
                 64 // x.itemsize):
        if x.dtype.char == "f":
            ocvec_run[float](x, w, out, g, p.pad_bottom, p.pad_right, bias, relu, prepacked)
        else:
            ocvec_run[double](x, w, out, g, p.pad_bottom, p.pad_right, bias, relu, prepacked)
        return
    # The direct path (B read in place from padded phase planes) needs AVX-512 and int32
    # offsets within one image's planes; otherwise the packed implicit GEMM runs.
    if (FO_HAVE_DIRECT and fo_simd_enabled
            and x.shape[1] * (x.shape[2] + p.pad_top + p.pad_bottom + g.sh)
            * (x.shape[3] + p.pad_left + p.pad_right + g.sw) < 2**31 - 2**20):
        if x.dtype.char == "f":
            direct_gemm_run[float](x, w, out, g, p.pad_bottom, p.pad_right, bias, relu)
        else:
            direct_gemm_run[double](x, w, out, g, p.pad_bottom, p.pad_right, bias, relu)
        return
    m_block, n_block = _grid(g.Kg, g.Ho * g.Wo, g.N * g.groups, x.dtype.char)
    if x.dtype.char == "f":
        implicit_gemm_run[float](x, w, out, g, bias, relu, m_block, n_block)
    else:
        implicit_gemm_run[double](x, w, out, g, bias, relu, m_block, n_block)


@register("conv2d", "cython", "tiled",
          "implicit GEMM: im2col packed on the fly into the AVX-512 micro-kernel; direct depthwise")
def conv2d_tiled(x, w, out, p):
    """Stage 4 · tiled.

    Changed since `parallel`: convolution as an implicit GEMM on the matmul chapter's engine
    (gemm.pxi + microkernel.h). Per group, out (K/g, Ho*Wo) = W (K/g, C/g*kH*kW) @ B where
    row (c, r, s) / column (oh, ow) of B is x[c, oh*sh - pt + r*dh, ow*sw - pl + s*dw] or 0.
    The weights are not packed: w is already row-major (K, C/g*kH*kW), so the micro-kernel
    broadcasts from 8 of its rows in place (packing them, measured: 1 thread, res4 3x3 C256
    14x14 94 -> 77 GF/s, res5 C512 7x7 72 -> 43: a full pass over up to 9.4 MB of weights
    per call costs more than the 8 row streams).
    B is not materialised either. Each image is copied once into zero-padded planes split
    by stride phase (`pad_phases`: phase (a, b) holds padded rows a, a+sh, ... and columns
    b, b+sw, ...), in which row (c, r, s) of B is a single contiguous run starting at
    boff[c, r, s], over the grid j' = oh * Wq + ow of phase-plane width Wq. The "direct"
    8 x 32 micro-kernel loads its B vectors from there (no packing), computes the Wq - Wo
    extra columns of each output row (3-7 % for the ResNet 3x3 layers, 29 % for 7x7
    outputs) and drops them in a masked, segment-wise write-back.
    Tasks are (images, group, channel block, pixel block), sized by `task_grid` so the 2
    threads get equal work even for 7 x 7 outputs; a task spans several images when they
    are small (~1024 grid columns per task), reusing each weight block from L2.
    Measured (1 thread, best of 20 calls, fused bias+ReLU, float32, AMD EPYC Zen 4 VM,
    the two builds run minutes apart on a shared machine):
    res2 3x3 C64 56x56 85 -> 101 GF/s, res3 C128 28x28 92 -> 96, res4 C256 14x14 88 -> 94,
    res5 C512 7x7 79 -> 73 (the extra columns), 1x1 C256 56x56 -> K64 97 -> 108, stem 7x7/2
    C3 224x224 -> K64 74 -> 100, against the earlier packed path (B packed from the image
    per task) and ~100-117 GF/s for the micro-kernel on data in L1. Without AVX-512 (or with
    the intrinsics off) the packed path runs: B packed per task into NR-column slivers
    (runs copied with masked vector loads, zero-filled in the padding).
    Depthwise (one input channel per group) has no reduction to block (C/g * kH * kW = 9
    for 3x3) and is memory bound, so it runs a direct kernel (depthwise.h): each input plane
    is copied once into a zero-padded per-thread buffer, then every output row is computed
    in blocks of up to 4 zmm of columns with all kH x kW taps summed in registers (4
    independent FMA chains) and stored once, bias + ReLU included. Measured on 3x3 C128
    56x56 float32 with bias + ReLU against PyTorch 2.13 eager (2 threads, interleaved blocks,
    loaded machine): 0.16 ms vs 0.22 ms at batch 1 (1.4x), 1.8 vs 3.6 ms at batch 8 (2.0x);
    the row-axpy planes it replaces (`planes_run`: one load + store of the output row per
    tap, the earlier `parallel` stage's method) ran at 0.43x of PyTorch. Strided columns
    (stride_w > 1) or a build without AVX-512 keep those row-axpy planes.
    Small outputs with many channels take the "dense" variant (gemm.pxi kind 3, chosen by
    `use_dense` from a tile count): the images are folded into the GEMM columns
    (N = images x Ho*Wo) and each task copies its dense columns from the padded planes into
    32-column slivers before the micro-kernel runs on them, so 7 x 7 / 14 x 14 outputs fill
    whole tiles; a tile of at most one vector of columns runs half the FMAs. Measured against
    the padded-grid kernel (PyTorch 2.13 eager as the common yardstick, 2 threads,
    interleaved blocks, ratio torch time / ours): res5 3x3 C512 7x7 batch 8 0.67 -> 0.80,
    batch 1 1.20 -> 1.26; res4 C256 14x14 batch 8 0.78 -> 0.83, batch 1 0.88 -> 0.92; res3
    C128 28x28 batch 1 0.85 -> 0.92 (batch 8 about even). With 64 output channels (res2) the
    copy is not amortised: 0.96 vs 1.00, so it keeps the grid.
    Bottleneck removed: arithmetic intensity: each loaded vector of B feeds MR FMAs from a
    register, each weight NR FMAs; out is written once per KC block.
    Still missing: on full tiles the conv runs at ~85-90 % of the micro-kernel's in-cache
    rate (1 thread, res4 C256 14x14 batch 8: 103 GF/s vs 113-116 for fo_ukernel_f_direct
    alone on a hot 512 x 32 sliver with the weights read in place, and 117 for oneDNN);
    software prefetch of the 8 weight rows (16, 32, 64, 128 floats ahead) measured no
    better, nor did fixed KC 256 / 768 / 1024 / 1152 (vs 512) or MC 64 / 128 / 512 for the
    dense variant; equal reduction blocks of <= 640 rows (gemm.pxi direct_kc) gave +2-5 % on
    res2 / res3 (no runt block).
    At batch 8 oneDNN ran res4 / res5 at 200-230 GF/s, this GEMM at 170-200 — which is
    what the ocvec variant below fixed.

    The ocvec variant (ocvec.h, chosen by `use_ocvec`: kW = 3, unit stride and horizontal
    dilation, >= 32 channels per group in and out, whole vectors of output channels, rows
    cut into whole segments). Two findings made the GEMM above lose to oneDNN on the 3x3
    layers: (1) PyTorch measured 119 GF/s on ONE thread for res5 3x3 C512 7x7 at batch 8,
    above the 116.7 GF/s FMA peak this machine measures (a loop of independent zmm FMAs):
    oneDNN does not multiply the zero padding, which is 18 % of that layer's taps (9 % at
    14x14, 5 % at 28x28, 2.4 % at 56x56); (2) the implicit GEMM spends 10 loads per 16 FMAs
    and re-reads and re-writes its C tile per reduction block. So ocvec swaps the roles:
    a register tile of 28 output pixels (segments of 28, 14 or 7 pixels, each in one output
    row; tiles run on across output rows and images) x 16 output channels in the lanes,
    28 zmm accumulators. Per (input channel, kernel row) it loads the 3 weight vectors of the
    row's taps and broadcasts each input value of a segment once, feeding up to 3 pixels
    (0.44 loads per FMA); segments whose input row is padding for that kernel row, and the
    padding columns left and right of a row, are left out. Each tile owns its outputs for
    the whole reduction: written once, bias + ReLU on the way, through two 16 x 16 in-register
    transposes (NCHW rows from pixel-major registers). Each task (group, 16-channel block,
    run of tiles) first reorders its block of weights into a per-thread buffer
    (w[k, c, r, s] -> wr[c, r, s, k], 16 x 16 transposes), which its tiles then read from L2.
    Measured (kernel called directly as `fastops bench` does, 2 threads, interleaved with
    PyTorch 2.13 eager conv + bias + relu_, GF/s and time ratio torch / ours; implicit GEMM
    of this stage for comparison, same runs):
                                  batch 1                       batch 8
                                  ocvec   GEMM   x torch        ocvec   GEMM   x torch
        res2 3x3 C64 56x56         196    195    ~1.0-1.7*       209    200    ~1.0-1.7*
        res3 3x3 C128 28x28        218    196    1.05            225    202    1.03
        res4 3x3 C256 14x14        230    193    1.06            236    205    0.99
        res5 3x3 C512 7x7          222    155    1.31            256    201    1.06
    (* PyTorch's res2 alternates between ~205 and ~115 GF/s from one process to the next.)
    Steps that got there, each measured the same way: a first ocvec kernel with 14 x 2
    tiles and no padding skip beat the GEMM by 3-7 % on res3 / res4 at batch 8; the 3-tap
    unrolled 28-pixel tile with padding skip made it +6-17 % over the GEMM; channel-major
    order (a channel's input rows reused from L1 by all kernel rows) res5 234 -> 245; the
    weight reorder moved into the tasks, res5 b1 155 -> 222 (it had been a separate pass
    of 0.7 ms on one thread for res5's 9.4 MB of weights).
    Where the GEMM stays: few channels (8 in: 106 vs 131 GF/s; 24 out: 112 vs 157), rows
    whose segments would stick out (20 columns: 152 vs 164), strided and 1x1 convs. A
    stride-2 ocvec kernel for the stem (7x7/2, C3: even / odd column phase planes, passes of
    4 and 3 taps, 3 segments of 8 pixels, no spills) was built, tested and dropped: 160 vs
    173 GF/s at batch 1, even at batch 8 (2 threads; one thread 93 vs 95): with 3 input
    channels a tile's reduction is only 21 (channel, row) steps, so its write-back and the
    per-task set-up weigh more than the GEMM's.
    Tried and dropped: B read straight from the unpadded image through per-tap AVX-512 lane
    masks (no padded copy, no padded-grid columns): masked loads cost ~4 % with a constant
    mask and ~12 % with per-row masks from a table (micro-kernel on hot data, 116 -> 103
    GF/s), more than the copy they save; weights packed into MR-row slivers once per call
    (0.97-1.01x).
    """
    conv2d_tiled_epilogue(x, w, out, p)


def conv2d_tiled_run_packed(x, packed, out, p):
    """conv2d/tiled with weights from ocvec_prepack (fastops.nn's run_packed hook)."""
    conv2d_tiled_epilogue(x, packed.w, out, p, prepacked=packed.ocvec)


conv2d_tiled.prepack = ocvec_prepack
conv2d_tiled.run_packed = conv2d_tiled_run_packed
