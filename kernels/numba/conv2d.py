"""conv2d in Numba: from seven nested loops to a register-blocked implicit GEMM.

What you will learn, stage by stage:

1. ``naive``: the seven textbook loops (n, k, ho, wo, c, kh, kw) with a bounds test per tap.
2. ``vectorized``: the input is copied once into a zero-padded "wide grid" (below), after
   which every tap of the kernel is one long, branch-free, contiguous SIMD loop over a whole
   output plane.
3. ``parallel``: the (image, output channel) planes shared out over the cores with ``prange``.
4. ``tiled``: convolution as an implicit GEMM. Per image and group, out (Kg, Ho*Wq) =
   w (Kg, Cg*kH*kW) @ patches (Cg*kH*kW, Ho*Wq), with a 6-channel x 32-pixel block of the
   output held in registers for the whole reduction. The patch matrix is never built, not
   even in panels: on the wide grid each tap's 32 pixels are 32 consecutive input values, so
   the micro-kernel reads them straight from the padded image.

The wide grid. Zero-pad the input (C, Hp, Wp) and compute the output on Ho rows of Wq = Wp
columns instead of Wo (stride 1). Output pixel f = ho * Wq + wo of tap (c, i, j) then reads
flat input element c*Hp*Wp + i*dh*Wq + j*dw + f: the *same* offset for every pixel, so a
tap is a contiguous slice of the flat image, whatever the padding or dilation. The Wq - Wo
"junk" columns at the end of each row (they read across the row edge) are computed and
dropped when storing: 2/28 extra work at ResNet res3 (Wp = 30), 2/56 at res2.
Strides: the padded image is split into its sh x sw phases, xs[c, a, b, r, q] =
xp[c, r*sh + a, q*sw + b] (a space-to-depth copy), on which a strided conv is a stride-1 conv
(tap (i, j) reads phase (i*dh % sh, j*dw % sw) shifted by (i*dh // sh, j*dw // sw)); with
stride 1 there is one phase and xs is just the padded image. See :func:`_split_plane`.

Every stage handles groups (depthwise included), stride, dilation and asymmetric padding.
Calling convention (fastops.registry): ``kernel(x, w, out, p)`` with x (N, C, H, W),
w (K, C/groups, kH, kW), out (N, K, Ho, Wo), p a ConvParams. No bias: the API adds it (the
fused bias + ReLU stage lives in conv2d_bias_relu.py and reuses :func:`conv_gemm` below).

Measured at res3 (C128 28x28 -> K128, 3x3, pad 1, batch 1, float32), median ms on this
2-core AVX-512 machine while other jobs shared it; the stages and ``torch.nn.functional
.conv2d`` ran interleaved in one process (4-6 rounds, one untimed call after each switch,
10 timed calls per round for tiled and torch, 1-5 for the slow stages), same thread count
for both:

=========  ==========  ============  ==========  ===========  ============
threads    naive       vectorized    parallel    tiled        torch eager
=========  ==========  ============  ==========  ===========  ============
1          189 (1.2)   6.6 (35)      6.6 (35)    2.54 (91)    2.06 (112)
2          197-203     6.8 (34)      4.2-4.6     1.46-1.68    1.18-1.44
                                     (50-55)     (138-158)    (161-197)
=========  ==========  ============  ==========  ===========  ============

(GFLOP/s in parentheses.) Each stage is faster than the one before; ``parallel`` gained
1.5-1.9x (by min 1.8-1.9x) on 2 cores shared with other jobs (load average 4-6).
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, prange

from fastops.registry import register

from ._common import FASTMATH, jit, serialised, stack_vector
from .matmul import MR, NR

# ---------------------------------------------------------------------------------- helpers


@jit()
def valid_range(out_len, in_len, stride, offset):
    """[lo, hi): the positions o in [0, out_len) with 0 <= o * stride + offset < in_len.

    Used by the padding copy: one range per row instead of a bounds test per element.
    """
    lo = 0 if offset >= 0 else (-offset + stride - 1) // stride
    last = in_len - 1 - offset  # largest o * stride allowed
    hi = 0 if last < 0 else min(out_len, last // stride + 1)
    return lo, max(lo, hi)


@jit()
def wide_grid(h, wid, sh, sw, pt, pb, pl, pr):
    """(Hq, Wq): rows and columns of one phase of the padded input, which is also the wide
    output grid (Ho rows of Wq >= Wo columns)."""
    return (h + pt + pb + sh - 1) // sh, (wid + pl + pr + sw - 1) // sw


@jit()
def alloc_split(x, sh, sw, hq, wq, kw, dw):
    """Uninitialised phase-split images xs (N, C*sh*sw*Hq*Wq + slack), the slack zeroed.

    The slack: the last tap's junk columns and the micro-kernel's last, partial 32-pixel
    panel read up to Wq + NR values past the last phase plane.
    """
    n_img, c_in = x.shape[0], x.shape[1]
    body = c_in * sh * sw * hq * wq
    slack = wq + NR + kw * dw
    xs = np.empty((n_img, body + slack), dtype=x.dtype)
    for n in range(n_img):
        for e in range(body, body + slack):
            xs[n, e] = 0.0
    return xs


@jit()
def _split_plane(x, n, c, sh, sw, pt, pl, hq, wq, xs):
    """xs[n] phases of channel c: xs[n, ((c*sh + a)*sw + b)*Hq*Wq + r*Wq + q] =
    x[n, c, r*sh + a - pt, q*sw + b - pl], zero outside the image (the padding).

    x: (N, C, H, W); xs: (N, >= C*sh*sw*Hq*Wq). One pass over the input, each row split into
    a zero prefix, a copied middle and a zero suffix (no test per element).
    """
    h, wid = x.shape[2], x.shape[3]
    for a in range(sh):
        for b in range(sw):
            plane = ((c * sh + a) * sw + b) * hq * wq
            q_lo, q_hi = valid_range(wq, wid, sw, b - pl)
            for r in range(hq):
                row = plane + r * wq
                ih = r * sh + a - pt
                if ih < 0 or ih >= h:
                    for q in range(wq):
                        xs[n, row + q] = 0.0
                    continue
                dst = xs[n, row:row + wq]  # views: nonnegative indices, vectorised copies
                src = x[n, c, ih]
                for q in range(q_lo):
                    dst[q] = 0.0
                if sw == 1:  # a contiguous copy (the common case)
                    dst_mid = dst[q_lo:q_hi]
                    src_mid = src[q_lo + b - pl:]
                    for q in range(dst_mid.shape[0]):
                        dst_mid[q] = src_mid[q]
                else:
                    for q in range(q_lo, q_hi):
                        dst[q] = src[q * sw + b - pl]
                for q in range(q_hi, wq):
                    dst[q] = 0.0


@jit()
def tap_offsets(groups, cg, kh, kw, sh, sw, dh, dw, hq, wq):
    """(groups, Cg*kH*kW) offset of each tap (c, i, j) of each group in a phase-split image.

    Output pixel f = ho*Wq + wo of tap t reads xs[n, offsets[g, t] + f]: the whole geometry
    (channel, padding, stride, dilation) folds into one integer per tap, computed once.
    """
    offsets = np.empty((groups, cg * kh * kw), dtype=np.int64)
    for g in range(groups):
        for c in range(cg):
            ci = g * cg + c
            for i in range(kh):
                a, ri = (i * dh) % sh, (i * dh) // sh  # phase row, shift in phase rows
                for j in range(kw):
                    b, qj = (j * dw) % sw, (j * dw) // sw
                    plane = ((ci * sh + a) * sw + b) * hq * wq
                    offsets[g, (c * kh + i) * kw + j] = plane + ri * wq + qj
    return offsets


@jit(fastmath=FASTMATH)
def store_wide(acc, out_plane, f0, count, wq, wo_n, ho_n, bias_value, relu):
    """out_plane[ho*Wo + wo] = epilogue(acc[f - f0]) for the wide pixels f0 <= f < f0 + count
    that are real output pixels (wo < Wo, ho < Ho); junk columns and rows are dropped.

    acc: (>= count,) accumulators on the wide grid; out_plane: (Ho*Wo,) one output channel.
    The epilogue adds ``bias_value`` (of the arrays' dtype, so float32 stays float32) and,
    with ``relu``, applies max(., 0) keeping NaN (as numpy.maximum). One division per call,
    then one branch-free copy loop per output row touched (views, so every index is a
    nonnegative loop counter and LLVM vectorises the loop).
    """
    ho = f0 // wq
    wo = f0 - ho * wq
    j = 0
    while j < count and ho < ho_n:
        run = min(count - j, wq - wo)  # wide pixels left in this row
        if wo < wo_n:
            src = acc[j:j + min(run, wo_n - wo)]
            dst = out_plane[ho * wo_n + wo:]
            for t in range(src.shape[0]):
                v = src[t] + bias_value
                dst[t] = v
                if relu and not (v > 0 or v != v):
                    dst[t] = 0
        j += run
        ho += 1
        wo = 0


# ---------------------------------------------------------------------------------- stage 1
@jit()
def _conv_naive(x, w, out, sh, sw, pt, pl, dh, dw, groups):
    n_img, c_in, h, wid = x.shape
    k_out, cg, kh, kw = w.shape
    ho_n, wo_n = out.shape[2], out.shape[3]
    kg = k_out // groups
    zero = np.zeros(1, dtype=out.dtype)[0]
    for n in range(n_img):
        for k in range(k_out):
            g = k // kg  # this output channel's group reads input channels g*cg .. g*cg+cg-1
            for ho in range(ho_n):
                for wo in range(wo_n):
                    acc = zero
                    for c in range(cg):
                        for i in range(kh):
                            for j in range(kw):
                                ih = ho * sh - pt + i * dh
                                iw = wo * sw - pl + j * dw
                                if 0 <= ih < h and 0 <= iw < wid:  # outside = zero padding
                                    acc += x[n, g * cg + c, ih, iw] * w[k, c, i, j]
                    out[n, k, ho, wo] = acc


@register("conv2d", "numba", "naive", "seven textbook loops, bounds test per tap, one thread",
          max_flops=3e8)
def conv2d_naive(x, w, out, p):
    """Stage 1 · naive.

    The seven loops of the definition, n, k, ho, wo, c, kh, kw, with an ``if`` per tap for the
    zero padding: one output at a time, one serial sum each.
    Bottleneck: the sum is a chain of dependent adds (no SIMD without reassociation), and the
    innermost loops walk kW, kH and C, which hop across the input (row and channel strides).
    Measured at res3: 189-203 ms, 1.1-1.2 GFLOP/s (module docstring).
    Still missing: SIMD, threads, reuse of inputs and weights in registers.
    """
    # x: (N, C, H, W)  w: (K, C/groups, kH, kW)  out: (N, K, Ho, Wo)
    _conv_naive(x, w, out, p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w,
                p.groups)


# ---------------------------------------------------------------------------------- stage 2
@jit(fastmath=FASTMATH)
def conv_plane(ximg, wmat, k, offsets, acc, out_plane, wq, wo_n, ho_n, bias, relu):
    """out_plane (Ho*Wo,) = epilogue(sum over taps t of wmat[k, t] * ximg[offsets[t] + f]).

    ximg: (L,) one phase-split image; wmat: (K, Cg*kH*kW) weights; offsets: (Cg*kH*kW,) this
    group's tap offsets; acc: (Ho*Wq,) scratch, the output plane on the wide grid;
    bias: (K,) added to the plane in the store (zeros for a plain conv), relu: see
    :func:`store_wide`.
    Loop order taps, then pixels: every tap is one axpy over the whole wide plane (840 values
    at res3, 3248 at res2), contiguous in acc and ximg with independent iterations, so the
    vector loop runs full width and its scalar remainder is negligible. The plane (13 KiB
    float32 at res2) stays in L1 across the taps.
    """
    wide = acc.shape[0]
    for f in range(wide):
        acc[f] = 0.0
    for t in range(offsets.shape[0]):
        wv = wmat[k, t]
        src = ximg[offsets[t]:]  # a view starting at the tap: x index = f, nonnegative
        for f in range(wide):
            acc[f] += wv * src[f]
    store_wide(acc, out_plane, 0, wide, wq, wo_n, ho_n, bias[k], relu)


@jit(fastmath=FASTMATH)
def _conv_vectorized(x, w, out, sh, sw, pt, pb, pl, pr, dh, dw, groups):
    n_img, c_in, h, wid = x.shape
    k_out, cg, kh, kw = w.shape
    ho_n, wo_n = out.shape[2], out.shape[3]
    hq, wq = wide_grid(h, wid, sh, sw, pt, pb, pl, pr)
    xs = alloc_split(x, sh, sw, hq, wq, kw, dw)  # (N, C*sh*sw*Hq*Wq + slack)
    for n in range(n_img):
        for c in range(c_in):
            _split_plane(x, n, c, sh, sw, pt, pl, hq, wq, xs)
    offsets = tap_offsets(groups, cg, kh, kw, sh, sw, dh, dw, hq, wq)  # (groups, taps)
    wmat = w.reshape(k_out, cg * kh * kw)
    planes = out.reshape(n_img, k_out, ho_n * wo_n)
    acc = np.empty(ho_n * wq, dtype=out.dtype)  # (Ho*Wq,) one wide output plane
    no_bias = np.zeros(k_out, dtype=out.dtype)
    kg = k_out // groups
    for n in range(n_img):
        for k in range(k_out):
            conv_plane(xs[n], wmat, k, offsets[k // kg], acc, planes[n, k], wq, wo_n, ho_n,
                       no_bias, False)


@register("conv2d", "numba", "vectorized", "padded wide-grid copy, then one contiguous SIMD "
          "axpy per tap over a whole output plane")
def conv2d_vectorized(x, w, out, p):
    """Stage 2 · vectorized.

    Changed since `naive`: the input is first copied into a zero-padded, phase-split image
    (the "wide grid", see the module docstring), which turns every tap (c, i, j) into one
    offset. The loops are then reordered to n, k, taps, pixels: the innermost loop is an axpy,
    ``acc[f] += w[k, t] * xs[offset[t] + f]`` over the whole wide output plane, contiguous in
    both arrays, branch-free, with independent iterations, and fast-math lets LLVM emit
    packed FMAs. Junk columns are dropped when the plane is stored.
    Bottleneck removed: scalar, branchy arithmetic. An earlier version of this stage ran the
    axpy along each output row (28 values at res3) with per-tap valid ranges instead of a
    padded copy; its assembly had only scalar FMAs (``vfmadd213ss``). Likely cause: its input
    index ``wo + j*dw - pl`` may be negative as far as LLVM can tell, so every load carried
    Numba's negative-index wraparound select. It took 96-148 ms (1.6-2.4 GFLOP/s) in runs
    beside this version, which takes 6.6-6.8 ms (34-35 GFLOP/s, one thread), 28x naive: here
    every index in the inner loop is a nonnegative loop counter on a view.
    Still missing: one core only; each tap re-reads and re-writes the whole output plane (an
    L1 load and store per FMA), and each input value loaded feeds one FMA.
    """
    # x: (N, C, H, W)  w: (K, C/groups, kH, kW)  out: (N, K, Ho, Wo)
    _conv_vectorized(x, w, out, p.stride_h, p.stride_w, p.pad_top, p.pad_bottom, p.pad_left,
                     p.pad_right, p.dil_h, p.dil_w, p.groups)


# ---------------------------------------------------------------------------------- stage 3
@jit(fastmath=FASTMATH, parallel=True)
def split_parallel(x, sh, sw, pt, pb, pl, pr, kw, dw):
    """The phase-split copy (see :func:`_split_plane`), (image, channel) planes over threads.

    Returns (xs, Hq, Wq)."""
    n_img, c_in, h, wid = x.shape
    hq, wq = wide_grid(h, wid, sh, sw, pt, pb, pl, pr)
    xs = alloc_split(x, sh, sw, hq, wq, kw, dw)
    for nc in prange(n_img * c_in):
        _split_plane(x, nc // c_in, nc % c_in, sh, sw, pt, pl, hq, wq, xs)
    return xs, hq, wq


@jit(fastmath=FASTMATH, parallel=True)
def conv_planes_parallel(x, w, out, sh, sw, pt, pb, pl, pr, dh, dw, groups, bias, relu):
    """Every (image, output channel) plane by :func:`conv_plane`, planes shared out with
    ``prange``; bias: (K,) (zeros for a plain conv), relu: see :func:`store_wide`."""
    n_img = x.shape[0]
    k_out, cg, kh, kw = w.shape
    ho_n, wo_n = out.shape[2], out.shape[3]
    xs, hq, wq = split_parallel(x, sh, sw, pt, pb, pl, pr, kw, dw)
    offsets = tap_offsets(groups, cg, kh, kw, sh, sw, dh, dw, hq, wq)
    wmat = w.reshape(k_out, cg * kh * kw)
    planes = out.reshape(n_img, k_out, ho_n * wo_n)
    kg = k_out // groups
    for plane in prange(n_img * k_out):  # (image, output channel) planes are independent
        n, k = plane // k_out, plane % k_out
        acc = np.empty(ho_n * wq, dtype=out.dtype)  # per-plane scratch, 3-13 KiB: L1
        conv_plane(xs[n], wmat, k, offsets[k // kg], acc, planes[n, k], wq, wo_n, ho_n, bias,
                   relu)


_conv_planes_safe = serialised(conv_planes_parallel)


@register("conv2d", "numba", "parallel", "vectorized planes split over threads with prange")
def conv2d_parallel(x, w, out, p):
    """Stage 3 · parallel.

    Changed since `vectorized`: the padding copy and the (image, output channel) planes are
    ``prange`` loops, so each core computes whole output planes with the same SIMD axpy.
    A plane is a big enough unit (res3: 1152 taps x 840 pixels, about 1 M FMAs) that the
    threads' start-up and the uneven last planes are noise.
    Bottleneck removed: one idle core. Measured at res3 on 2 threads: 4.2-4.6 ms median
    (3.5-3.7 min), against 6.8 ms for `vectorized` in the same runs: 1.5-1.9x, short of 2x
    because other jobs held part of the second core.
    Still missing: register reuse. Every FMA still loads and stores its output element, and
    every input plane is streamed once per output channel (K times).
    """
    # x: (N, C, H, W)  w: (K, C/groups, kH, kW)  out: (N, K, Ho, Wo)
    _conv_planes_safe(x, w, out, p.stride_h, p.stride_w, p.pad_top, p.pad_bottom, p.pad_left,
                      p.pad_right, p.dil_h, p.dil_w, p.groups,
                      np.zeros(w.shape[0], dtype=out.dtype), False)


# ---------------------------------------------------------------------------------- stage 4
# Tiles of the implicit GEMM on the wide grid (per image and group: M = Kg output channels,
# N = Ho*Wq wide pixels, K = Cg*kH*kW taps). A thread owns a tile of at most CONV_MC x
# CONV_NC outputs and walks it MR-row block by MR-row block: the MR x taps weights of one
# block (res3: 6 x 1152 x 4 B = 27 KiB) stay in L1 while the tile's pixel panels pass by,
# and the input those panels read (res3: 128 channels x (256 + 62) x 4 B = 160 KiB) stays in
# L2 for all the tile's row blocks.
CONV_MC = 96
CONV_NC = 256


@jit()
def thread_work(blocks, panels, outer, tm, tn, threads):
    """The most micro-tiles (MR x NR each) one thread computes when ``blocks`` MR-row blocks
    are cut into tm parts, ``panels`` NR-pixel panels into tn parts, and the outer*tm*tn
    tiles into ``threads`` equal contiguous runs, which is how ``prange`` schedules."""
    tiles = outer * tm * tn
    worst = 0
    for thread in range(threads):
        work = 0
        for tile in range(thread * tiles // threads, (thread + 1) * tiles // threads):
            part_m, part_n = tile % (tm * tn) // tn, tile % tn
            work += (((part_m + 1) * blocks // tm - part_m * blocks // tm)
                     * ((part_n + 1) * panels // tn - part_n * panels // tn))
        worst = max(worst, work)
    return worst


@jit()
def balanced_grid(blocks, panels, outer, threads):
    """(tm, tn): how many parts to cut the ``blocks`` MR-row blocks and the ``panels``
    NR-pixel panels of each of ``outer`` (images x groups) GEMMs into, for ``threads``.

    Starts from tiles of at most CONV_MC x CONV_NC and tries up to 2 * threads more parts in
    each dimension, keeping the split whose busiest thread has the least work (then the
    fewest tiles). The matmul's rule, round (mc, nc) down until there are enough tiles, split
    res3's 128 channels 96 + 32 and gave the two threads work in the ratio 3 : 1.
    """
    tm0 = min(blocks, (blocks * MR + CONV_MC - 1) // CONV_MC)
    tn0 = min(panels, (panels * NR + CONV_NC - 1) // CONV_NC)
    if outer >= 8 * threads:  # many independent GEMMs already share out evenly
        return tm0, tn0
    best_tm, best_tn = tm0, tn0
    best = thread_work(blocks, panels, outer, tm0, tn0, threads)
    for tm in range(tm0, min(blocks, tm0 + 2 * threads) + 1):
        for tn in range(tn0, min(panels, tn0 + 2 * threads) + 1):
            work = thread_work(blocks, panels, outer, tm, tn, threads)
            if work < best or (work == best and tm * tn < best_tm * best_tn):
                best, best_tm, best_tn = work, tm, tn
    return best_tm, best_tn


@jit(fastmath=FASTMATH)
def direct_micro_kernel(amat, a_row0, ximg, offsets, f0, out_n, row0, rows, wq, wo_n, ho_n,
                        bias, relu):
    """out_n[row0:row0+rows] at wide pixels f0..f0+NR = epilogue(amat[a_row0:+MR] @ B), where
    B[t, j] = ximg[offsets[t] + f0 + j] is read in place, never packed.

    amat: (>= a_row0 + MR, taps) weights, row-major, read in place (MR sequential streams);
    ximg: (L,) one phase-split image; offsets: (taps,) this group's tap offsets;
    out_n: (K, Ho*Wo) one image's output planes; bias: (K,); rows <= MR.
    The MR x NR = 6 x 32 accumulators stay in registers for the *whole* reduction (no KC
    split: nothing is packed, so there is no block to size), then each output value is
    written exactly once, bias and ReLU applied on the way (:func:`store_wide`).
    As in the matmul micro-kernel, the six accumulator rows are separate stack vectors named
    one by one, so every index is a compile-time constant and LLVM keeps them in registers.
    """
    dtype = ximg.dtype
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
    xpanel = ximg[f0:]  # (L - f0,) the panel's first pixel at index 0
    for p in range(offsets.shape[0]):
        # one tap: a column of W (MR values) times NR consecutive input values
        a0 = amat[a_row0, p]
        a1 = amat[a_row0 + 1, p]
        a2 = amat[a_row0 + 2, p]
        a3 = amat[a_row0 + 3, p]
        a4 = amat[a_row0 + 4, p]
        a5 = amat[a_row0 + 5, p]
        base = np.uint64(offsets[p])  # unsigned: no negative-index wraparound test per load
        for j in range(NR):
            bj = xpanel[base + np.uint64(j)]
            c0[j] += a0 * bj
            c1[j] += a1 * bj
            c2[j] += a2 * bj
            c3[j] += a3 * bj
            c4[j] += a4 * bj
            c5[j] += a5 * bj
    store_wide(c0, out_n[row0], f0, NR, wq, wo_n, ho_n, bias[row0], relu)
    if rows > 1:
        store_wide(c1, out_n[row0 + 1], f0, NR, wq, wo_n, ho_n, bias[row0 + 1], relu)
    if rows > 2:
        store_wide(c2, out_n[row0 + 2], f0, NR, wq, wo_n, ho_n, bias[row0 + 2], relu)
    if rows > 3:
        store_wide(c3, out_n[row0 + 3], f0, NR, wq, wo_n, ho_n, bias[row0 + 3], relu)
    if rows > 4:
        store_wide(c4, out_n[row0 + 4], f0, NR, wq, wo_n, ho_n, bias[row0 + 4], relu)
    if rows > 5:
        store_wide(c5, out_n[row0 + 5], f0, NR, wq, wo_n, ho_n, bias[row0 + 5], relu)


@jit(fastmath=FASTMATH, parallel=True)
def conv_gemm(x, w, out, sh, sw, pt, pb, pl, pr, dh, dw, groups, bias, relu, threads):
    """out[n, g*Kg:(g+1)*Kg] = epilogue(W_g @ patches_g(x[n])) for every image n and group g.

    x: (N, C, H, W); w: (K, Cg, kH, kW); out: (N, K, Ho, Wo); bias: (K,) (zeros: none);
    relu: apply max(., 0) (NaN kept) in the epilogue. The shared engine of conv2d ``tiled``
    and conv2d_bias_relu ``fused``. Groups with fewer than MR output channels (depthwise:
    Kg = 1) would leave most micro-kernel rows idle, and their convolution is memory bound
    anyway, so they take the plane-by-plane path (:func:`conv_planes_parallel`) instead.
    """
    n_img = x.shape[0]
    k_out, cg, kh, kw = w.shape
    ho_n, wo_n = out.shape[2], out.shape[3]
    kg = k_out // groups
    if kg < MR:
        conv_planes_parallel(x, w, out, sh, sw, pt, pb, pl, pr, dh, dw, groups, bias, relu)
        return
    xs, hq, wq = split_parallel(x, sh, sw, pt, pb, pl, pr, kw, dw)  # (N, L) phase-split images
    offsets = tap_offsets(groups, cg, kh, kw, sh, sw, dh, dw, hq, wq)  # (groups, taps)
    wmat = w.reshape(k_out, cg * kh * kw)  # A of every group's GEMM, read in place
    outmat = out.reshape(n_img, k_out, ho_n * wo_n)
    wide = ho_n * wq  # GEMM columns: pixels of the wide grid
    taps = cg * kh * kw
    blocks = (kg + MR - 1) // MR  # MR-row blocks per group
    panels = (wide + NR - 1) // NR
    # each group's last, short row block (when MR does not divide Kg), zero-padded to MR rows
    w_edge = np.zeros((groups, MR, taps), dtype=w.dtype)
    short = kg % MR
    for g in range(groups):
        for i in range(short):
            for t in range(taps):
                w_edge[g, i, t] = wmat[(g + 1) * kg - short + i, t]
    tm, tn = balanced_grid(blocks, panels, n_img * groups, threads)
    per_image = groups * tm * tn
    for tile in prange(n_img * per_image):
        n = tile // per_image
        g = tile % per_image // (tm * tn)
        part_m, part_n = tile % (tm * tn) // tn, tile % tn
        for block in range(part_m * blocks // tm, (part_m + 1) * blocks // tm):
            r = g * kg + block * MR  # first output channel of the block
            rows = min(MR, (g + 1) * kg - r)
            amat, a_row0 = (wmat, r) if rows == MR else (w_edge[g], 0)
            for panel in range(part_n * panels // tn, (part_n + 1) * panels // tn):
                direct_micro_kernel(amat, a_row0, xs[n], offsets[g], panel * NR, outmat[n], r,
                                    rows, wq, wo_n, ho_n, bias, relu)


@register("conv2d", "numba", "tiled", "implicit GEMM on the wide grid: 6x32 register-blocked "
          "micro-kernel reading the padded input in place")
def conv2d_tiled(x, w, out, p):
    """Stage 4 · tiled.

    Changed since `parallel`: convolution becomes an implicit GEMM per image and group,
    out (Kg, Ho*Wq) = w (Kg, Cg*kH*kW) @ patches (Cg*kH*kW, Ho*Wq) on the wide grid, and a
    6-channel x 32-pixel block of the output lives in registers for the whole reduction
    (:func:`direct_micro_kernel`). On the wide grid a tap's 32 pixels are 32 consecutive
    values of the padded image, so the micro-kernel reads B in place: no im2col, no packed
    panels. Tiles (image, group, channel block, pixel block) are shared out with ``prange``.
    Bottleneck removed: output round trips (each output value is written once, instead of
    loaded and stored once per tap) and input re-loading (each input value loaded from L1
    feeds MR = 6 FMAs, each weight NR = 32).
    Measured at res3: 2.54 ms on 1 thread (91 GFLOP/s; torch 2.06 ms, 0.81x), 1.46-1.68 ms
    median on 2 (138-158 GFLOP/s, 0.80-0.86x torch eager), 2.6-2.9x `parallel`. The
    micro-kernel alone, timed over the same image with no edges and plain stores, runs at
    117 GFLOP/s on one thread (about 80 % of FP32 FMA peak), whatever its shape (6x32, 8x32,
    4x64, 6x48, 12x16 measured within 1 %); the remaining 1-thread gap is junk columns,
    padded edge tiles, the padding copy and the stores. An earlier version gathered patch
    panels (KC = 256 taps x 256 pixels, runs along output rows) and ran the matmul
    micro-kernel on them: 3.7-3.9 ms on 1 thread in runs beside this one.
    Still missing: junk columns cost Wq/Wo - 1 of extra FMAs (7 % at res3, 29 % at 7x7,
    though there the last 32-pixel panel is padded anyway); B loads are unaligned and hop
    across C*kH*kW rows of the image instead of one packed stream.
    """
    # x: (N, C, H, W)  w: (K, C/groups, kH, kW)  out: (N, K, Ho, Wo)
    _conv_gemm_safe(x, w, out, p.stride_h, p.stride_w, p.pad_top, p.pad_bottom, p.pad_left,
                    p.pad_right, p.dil_h, p.dil_w, p.groups, np.zeros(w.shape[0], dtype=out.dtype),
                    False, get_num_threads())


_conv_gemm_safe = serialised(conv_gemm)
