"""conv2d in Numba: from seven nested loops to an implicit GEMM on the matmul micro-kernel.

What you will learn, stage by stage:

1. ``naive``: the seven textbook loops (n, k, ho, wo, c, kh, kw) with a bounds test per tap.
2. ``vectorized``: the innermost loop runs along a contiguous output row with independent
   iterations (SIMD), and padding is handled by computing, once per tap, the range of output
   positions whose input is inside the image, instead of testing every element.
3. ``parallel``: the (image, output channel) planes shared out over the cores with ``prange``.
4. ``tiled``: convolution as an implicit GEMM. Per image and group, out (Kg, Ho*Wo) =
   w (Kg, Cg*kH*kW) @ patches (Cg*kH*kW, Ho*Wo). The patch matrix is never built whole: each
   KC x NC block is gathered into NR-wide panels (L2-sized) just before the matmul micro-kernel
   (:func:`fastops.kernels.numba.matmul.micro_kernel`) holds a 6 x 32 block of the output in
   registers across the block.

Every stage handles groups (depthwise included), stride, dilation and asymmetric padding.
Calling convention (fastops.registry): ``kernel(x, w, out, p)`` with x (N, C, H, W),
w (K, C/groups, kH, kW), out (N, K, Ho, Wo), p a ConvParams. No bias: the API adds it (the
fused bias + ReLU stage lives in conv2d_bias_relu.py and reuses :func:`conv_gemm` below).
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, prange

from fastops.registry import register

from ._common import FASTMATH, jit, serialised
from .matmul import MR, NR, micro_kernel, padded_rows, tile_grid

# ---------------------------------------------------------------------------------- helpers


@jit()
def valid_range(out_len, in_len, stride, offset):
    """[lo, hi): the output positions o with 0 <= o * stride + offset < in_len.

    Replaces a bounds test per element by one computation per (tap, axis): taps that fall in
    the padding simply get a shorter loop.
    """
    lo = 0 if offset >= 0 else (-offset + stride - 1) // stride
    last = in_len - 1 - offset  # largest o * stride allowed
    hi = 0 if last < 0 else min(out_len, last // stride + 1)
    return lo, max(lo, hi)


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
    Still missing: SIMD, threads, reuse of inputs and weights in registers.
    """
    # x: (N, C, H, W)  w: (K, C/groups, kH, kW)  out: (N, K, Ho, Wo)
    _conv_naive(x, w, out, p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w,
                p.groups)


# ---------------------------------------------------------------------------------- stage 2
@jit(fastmath=FASTMATH)
def _conv_plane(x, w, out, n, k, sh, sw, pt, pl, dh, dw, groups):
    """out[n, k] (Ho, Wo) = sum over taps (c, i, j) of w[k, c, i, j] * shifted input window.

    Loop order c, i, j, ho, wo: the output plane (56 x 56 x 4 B = 12 KiB float32 at ResNet's
    largest) stays in L1 while every tap adds one scaled, shifted copy of an input plane; the
    wo loop is contiguous in out (and in x when stride_w = 1) with independent iterations.
    """
    h, wid = x.shape[2], x.shape[3]
    cg, kh, kw = w.shape[1], w.shape[2], w.shape[3]
    ho_n, wo_n = out.shape[2], out.shape[3]
    g = k // (w.shape[0] // groups)
    for ho in range(ho_n):
        for wo in range(wo_n):
            out[n, k, ho, wo] = 0.0
    for c in range(cg):
        ci = g * cg + c
        for i in range(kh):
            ho_lo, ho_hi = valid_range(ho_n, h, sh, i * dh - pt)
            for j in range(kw):
                wo_lo, wo_hi = valid_range(wo_n, wid, sw, j * dw - pl)
                wv = w[k, c, i, j]
                iw0 = j * dw - pl
                for ho in range(ho_lo, ho_hi):
                    ih = ho * sh + i * dh - pt
                    if sw == 1:  # contiguous in x too: plain SIMD loads
                        for wo in range(wo_lo, wo_hi):
                            out[n, k, ho, wo] += wv * x[n, ci, ih, wo + iw0]
                    else:  # strided input, still independent iterations
                        for wo in range(wo_lo, wo_hi):
                            out[n, k, ho, wo] += wv * x[n, ci, ih, wo * sw + iw0]


@jit(fastmath=FASTMATH)
def _conv_vectorized(x, w, out, sh, sw, pt, pl, dh, dw, groups):
    for n in range(x.shape[0]):
        for k in range(w.shape[0]):
            _conv_plane(x, w, out, n, k, sh, sw, pt, pl, dh, dw, groups)


@register("conv2d", "numba", "vectorized", "tap-outer loops, SIMD along output rows, "
          "padding as valid ranges")
def conv2d_vectorized(x, w, out, p):
    """Stage 2 · vectorized.

    Changed since `naive`: the loops are reordered so the innermost one runs along an output
    row (wo), contiguous in ``out`` and, for stride 1, in ``x``, with independent iterations;
    fast-math lets LLVM emit packed FMAs. Padding is handled by a valid [lo, hi) range per tap
    and axis (:func:`valid_range`), so the inner loop has no branch.
    Bottleneck removed: scalar, branchy arithmetic.
    Still missing: one core only; each tap re-reads and re-writes the whole output plane
    (an L1 round trip per FMA), and each weight is used for only one plane.
    """
    # x: (N, C, H, W)  w: (K, C/groups, kH, kW)  out: (N, K, Ho, Wo)
    _conv_vectorized(x, w, out, p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h,
                     p.dil_w, p.groups)


# ---------------------------------------------------------------------------------- stage 3
@jit(fastmath=FASTMATH, parallel=True)
def _conv_parallel(x, w, out, sh, sw, pt, pl, dh, dw, groups):
    k_out = w.shape[0]
    for plane in prange(x.shape[0] * k_out):  # (image, output channel) planes are independent
        _conv_plane(x, w, out, plane // k_out, plane % k_out, sh, sw, pt, pl, dh, dw, groups)


_conv_parallel_safe = serialised(_conv_parallel)


@register("conv2d", "numba", "parallel", "vectorized planes split over threads with prange")
def conv2d_parallel(x, w, out, p):
    """Stage 3 · parallel.

    Changed since `vectorized`: the (image, output channel) planes are a ``prange``, so each
    core computes whole output planes with the same SIMD loop.
    Bottleneck removed: one idle core.
    Still missing: register reuse. Every FMA still loads and stores its output element, and
    every input plane is streamed once per output channel (K times).
    """
    # x: (N, C, H, W)  w: (K, C/groups, kH, kW)  out: (N, K, Ho, Wo)
    _conv_parallel_safe(x, w, out, p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h,
                        p.dil_w, p.groups)


# ---------------------------------------------------------------------------------- stage 4
# Blocks of the implicit GEMM (per image and group: M = Kg output channels, N = Ho*Wo pixels,
# K = Cg*kH*kW taps). A KC x NC block of gathered patches is NC/NR panels of KC x NR:
# 256 x 256 x 4 B = 256 KiB float32 (512 KiB float64), well inside the 2 MiB L2, where it is
# reused by every group of MR output channels. Up to MC output channels share one gathered
# block: the gather is the expensive part (one index computation and a bounds test per value),
# so it is amortised over as many FMAs as possible (2 * MC per gathered value).
CONV_KC = 256
CONV_NC = 256
CONV_MC = 512


@jit()
def _zero_padded(x, pt, pb, pl, pr):
    """x (N, C, H, W) copied into a zero border: (N, C, H + pt + pb, W + pl + pr).

    One pass over the input (a ninth of what an im2col of a 3x3 conv would write) buys a
    gather with no bounds tests: every window of every tap is inside the padded image.
    """
    n_img, c_in, h, wid = x.shape
    xp = np.zeros((n_img, c_in, h + pt + pb, wid + pl + pr), dtype=x.dtype)
    for n in range(n_img):
        for c in range(c_in):
            for ih in range(h):
                for iw in range(wid):
                    xp[n, c, pt + ih, pl + iw] = x[n, c, ih, iw]
    return xp


@jit()
def _tap_offsets(c0, cg, kh, kw, dh, dw, hp, wp):
    """(Cg*kH*kW,) flat offset in a padded image (C, Hp, Wp) of each tap of channels c0.. .

    Computed once per group: three integer divisions per tap per panel in the gather loop
    cost more than the copy itself.
    """
    offsets = np.empty(cg * kh * kw, dtype=np.int64)
    for c in range(cg):
        for i in range(kh):
            for j in range(kw):
                offsets[(c * kh + i) * kw + j] = (c0 + c) * hp * wp + i * dh * wp + j * dw
    return offsets


@jit(fastmath=FASTMATH)
def _gather_patches(ximg, wp, tap_offset, r0, kc, pix0, cols, wo_n, sh, sw, bpk):
    """Pack patch-matrix rows r0..r0+kc, pixels pix0..pix0+cols into NR-wide panels.

    ximg: one zero-padded image, flattened (C * Hp * Wp,); tap_offset: (Cg*kH*kW,) flat offset
    of each tap (channel, kernel row, kernel column) of this group, see :func:`_tap_offsets`;
    bpk: (>= ceil(cols/NR), >= kc, NR), bpk[panel, p, j] = ximg at tap r0 + p of pixel
    pix0 + panel*NR + j. Columns past the last pixel are left as they are (the caller zeroes
    them once).

    The NR pixels of a panel are split into runs along output rows; within a run the values
    of one tap are equally spaced in ximg (contiguous for stride 1), so each (tap, run) is a
    branch-free copy loop. Measured on res3 (C128 28x28, a 256 x 256 block, min of 9): 1.5 ns
    per value with a bounds test per value, 1.1 ns with these runs (short runs of <= 28 values
    spend much of their time in the vector loop's scalar remainder).
    """
    run_j = np.empty(NR, dtype=np.int64)  # (NR,) first panel column of each run
    run_src = np.empty(NR, dtype=np.int64)  # (NR,) flat offset of its first window, tap (0, 0)
    run_len = np.empty(NR, dtype=np.int64)  # (NR,) pixels in the run
    for panel in range((cols + NR - 1) // NR):
        first = pix0 + panel * NR
        end = min(first + NR, pix0 + cols)
        runs = 0
        pix = first
        while pix < end:  # one run per output row the panel touches
            ho, wo = pix // wo_n, pix % wo_n
            length = min(wo_n - wo, end - pix)
            run_j[runs] = pix - first
            run_src[runs] = ho * sh * wp + wo * sw
            run_len[runs] = length
            runs += 1
            pix += length
        for p in range(kc):
            tap = tap_offset[r0 + p]
            for q in range(runs):
                src = run_src[q] + tap
                j0 = run_j[q]
                if sw == 1:  # contiguous: a SIMD copy
                    for t in range(run_len[q]):
                        bpk[panel, p, j0 + t] = ximg[src + t]
                else:
                    for t in range(run_len[q]):
                        bpk[panel, p, j0 + t] = ximg[src + t * sw]


@jit(fastmath=FASTMATH, parallel=True)
def conv_gemm(x, w, out, sh, sw, pt, pb, pl, pr, dh, dw, groups, bias, relu, threads):
    """out[n, g*Kg:(g+1)*Kg] = epilogue(W_g @ patches_g(x[n])) for every image n and group g.

    x: (N, C, H, W); w: (K, Cg, kH, kW); out: (N, K, Ho, Wo); bias: (K,) or empty (none);
    relu: apply max(., 0) (NaN kept) in the epilogue. The shared engine of conv2d ``tiled``
    and conv2d_bias_relu ``fused``: bias and ReLU are applied by the micro-kernel while it
    writes the last K block of its 6 x 32 output tile, so the output is never re-read.
    """
    n_img, c_in, h, wid = x.shape
    k_out, cg, kh, kw = w.shape
    ho_n, wo_n = out.shape[2], out.shape[3]
    kg = k_out // groups
    taps = cg * kh * kw  # GEMM reduction length
    pixels = ho_n * wo_n
    wmat = w.reshape(k_out, taps)  # A of every group's GEMM, read in place, row-major
    outmat = out.reshape(n_img, k_out, pixels)
    mc, nc = tile_grid(kg, pixels, CONV_MC, CONV_NC, 2 * threads)
    tiles_m = (kg + mc - 1) // mc
    tiles_n = (pixels + nc - 1) // nc
    per_image = groups * tiles_m * tiles_n
    kc_max = min(CONV_KC, taps)
    xp = _zero_padded(x, pt, pb, pl, pr)  # (N, C, Hp, Wp)
    hp, wp = xp.shape[2], xp.shape[3]
    for tile in prange(n_img * per_image):
        n = tile // per_image
        g = tile % per_image // (tiles_m * tiles_n)
        row0 = g * kg + tile % (tiles_m * tiles_n) // tiles_n * mc  # first output channel
        rows = min(mc, (g + 1) * kg - row0)
        pix0 = tile % tiles_n * nc
        cols = min(nc, pixels - pix0)
        bpk = np.zeros(((cols + NR - 1) // NR, kc_max, NR), dtype=x.dtype)  # L2: B block
        ximg = xp[n].reshape(c_in * hp * wp)
        tap_offset = _tap_offsets(g * cg, cg, kh, kw, dh, dw, hp, wp)
        # the group's last, short block of output channels, zero-padded to MR rows
        edge = row0 + rows - rows % MR
        w_edge = padded_rows(wmat, edge, rows % MR)
        out_n = outmat[n]  # (K, Ho*Wo)
        for k0 in range(0, taps, CONV_KC):
            kc = min(CONV_KC, taps - k0)
            _gather_patches(ximg, wp, tap_offset, k0, kc, pix0, cols, wo_n, sh, sw, bpk)
            for r in range(row0, row0 + rows, MR):
                amat, a_row0 = (wmat, r) if r + MR <= row0 + rows else (w_edge, 0)
                for c in range(0, cols, NR):
                    micro_kernel(amat, a_row0, k0, bpk[c // NR], 0, kc, out_n, r, pix0 + c,
                                 min(MR, row0 + rows - r), min(NR, cols - c), k0 > 0, bias,
                                 k0 + kc >= taps, relu)


@register("conv2d", "numba", "tiled", "implicit GEMM: patch panels gathered per L2 block, "
          "6x32 register-blocked micro-kernel")
def conv2d_tiled(x, w, out, p):
    """Stage 4 · tiled.

    Changed since `parallel`: convolution becomes an implicit GEMM per image and group,
    out (Kg, Ho*Wo) = w (Kg, Cg*kH*kW) @ patches (Cg*kH*kW, Ho*Wo), computed by the matmul
    ``tiled`` micro-kernel: a 6-channel x 32-pixel block of the output lives in registers for a
    KC = 256-tap reduction. The patch matrix is never materialised: each tile gathers its
    KC x NC block (256 x 256 x 4 B = 256 KiB float32, in L2) into NR-wide panels right before
    use, and reuses it for up to MC = 512 output channels. Tiles (image, group, channel block,
    pixel block) are shared out with ``prange``.
    Why implicit GEMM rather than register-blocking the direct loops: the GEMM micro-kernel
    already runs at about 78 % of FP32 peak on one core, and its B panel turns every tap of
    every stride/dilation/padding case into the same contiguous NR-wide load.
    Bottleneck removed: output round trips (each output element is written once per 256 taps
    instead of once per tap) and input re-streaming (a gathered value feeds up to 2 * MC FLOPs).
    Measured (res3 C128 28x28 K128 3x3 pad 1, batch 1, float32, min of 9, quiet machine):
    61 GFLOP/s on 1 thread, 93 on 2; the gather alone is about a third of the 1-thread time.
    Still missing: the gather costs about 1 ns per value, noticeable when Kg is small
    (64 channels: 128 FLOPs per gathered value); depthwise (Kg = 1) wastes 5 of 6 rows.
    """
    # x: (N, C, H, W)  w: (K, C/groups, kH, kW)  out: (N, K, Ho, Wo)
    _conv_gemm_safe(x, w, out, p.stride_h, p.stride_w, p.pad_top, p.pad_bottom, p.pad_left,
                    p.pad_right, p.dil_h, p.dil_w, p.groups, np.empty(0, dtype=out.dtype), False,
                    get_num_threads())


_conv_gemm_safe = serialised(conv_gemm)
