"""Cython backend: the edges of the packed GEMM engine and of the conv paths, ISA safety,
threads, leaks, and that the `vectorized` stage really is vectorised.

Every result is checked against the float64 oracle with fastops.testing.assert_close.
"""
from __future__ import annotations

import gc
import shutil
import subprocess
import tracemalloc

import numpy as np
import pytest

import fastops
from fastops import oracle, registry
from fastops.testing import assert_close
from fastops.validation import check_conv2d

from conftest import run_concurrently

mm = pytest.importorskip("fastops.kernels.cython.matmul")
cv = pytest.importorskip("fastops.kernels.cython.conv2d")

DTYPES = [np.float32, np.float64]


def check_matmul(kernel, a, b, what=""):
    out = np.full((a.shape[0], b.shape[1]), np.nan, dtype=a.dtype)
    kernel(a, b, out)
    assert_close(out, oracle.matmul(a, b), oracle.matmul(np.abs(a), np.abs(b)), a.shape[1],
                 a.dtype, what)


def check_conv(kernel, x, w, stride=1, padding=0, dilation=1, groups=1, bias=None, what=""):
    plan = check_conv2d(x, w, bias, stride, padding, dilation, groups)
    out = np.full(plan.out_shape, np.nan, dtype=x.dtype)
    red = w.shape[1] * w.shape[2] * w.shape[3]
    if bias is None:
        kernel(x, w, out, plan.params)
        ref = oracle.conv2d(x, w, None, stride, padding, dilation, groups)
    else:
        kernel(x, w, bias, out, plan.params)
        ref = oracle.conv2d(x, w, bias, stride, padding, dilation, groups, relu=True)
        red += 1
    absref = oracle.conv2d(x, w, bias, stride, padding, dilation, groups, absolute=True)
    assert_close(out, ref, absref, red, x.dtype, what)


def tiles(dtype):
    mr, nr = mm.micro_tile(np.dtype(dtype).name)
    return mr, nr, mm.GEMM_BLOCKS["KC"], mm.GEMM_BLOCKS["MC"]


def around(n):
    return sorted({max(1, n - 1), n, n + 1})


tiled = registry.lookup("matmul", "cython", "tiled").kernel


# ---------------------------------------------------------------------------- matmul edges
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_tails_at_every_tile_boundary(dtype, rng):
    mr, nr, kc, mc = tiles(dtype)
    sizes_m = around(mr) + around(2 * mr) + around(mc) + [13]
    sizes_n = around(nr) + around(2 * nr) + [31, 97]
    sizes_k = around(kc) + [1, 7]
    for m in sizes_m:
        for n in sizes_n:
            for k in sizes_k:
                a = rng.standard_normal((m, k)).astype(dtype)
                b = rng.standard_normal((k, n)).astype(dtype)
                check_matmul(tiled, a, b, f"tiled {m}x{k}x{n}")


@pytest.mark.parametrize("stage", ["naive", "vectorized", "parallel", "tiled"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_stage_small_and_prime_shapes(stage, dtype, rng):
    kernel = registry.lookup("matmul", "cython", stage).kernel
    for m, k, n in [(1, 1, 1), (1, 5, 3), (3, 1, 7), (17, 19, 23), (37, 41, 43)]:
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        check_matmul(kernel, a, b, f"{stage} {m}x{k}x{n}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiled_huge_k(dtype, rng):
    for m, n in [(3, 5), (9, 33)]:  # the skinny path and the packed path
        a = rng.standard_normal((m, 20000)).astype(dtype)
        b = rng.standard_normal((20000, n)).astype(dtype)
        check_matmul(tiled, a, b, f"K=20000 {m}x{n}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_and_model_shapes(dtype, rng):
    for m, k, n in [(1, 2048, 1000), (64, 512, 512), (2, 300, 1000)]:
        a = rng.standard_normal((m, k)).astype(dtype)
        b = rng.standard_normal((k, n)).astype(dtype)
        check_matmul(tiled, a, b, f"{m}x{k}x{n}")


def test_nan_and_inf_propagate(rng):
    a = rng.standard_normal((20, 30)).astype(np.float32)
    b = rng.standard_normal((30, 40)).astype(np.float32)
    a[3, 4] = np.nan
    b[5, 7] = np.inf
    check_matmul(tiled, a, b, "nan/inf")


def test_empty_batch_and_k_zero_through_api():
    for dtype in DTYPES:
        out = fastops.matmul(np.ones((0, 4, 5), dtype), np.ones((5, 6), dtype), backend="cython")
        assert out.shape == (0, 4, 6)
        out = fastops.matmul(np.ones((3, 0), dtype), np.ones((0, 2), dtype), backend="cython")
        assert out.shape == (3, 2) and not out.any()
        x = np.ones((0, 3, 8, 8), dtype)
        w = np.ones((4, 3, 3, 3), dtype)
        assert fastops.conv2d(x, w, backend="cython").shape == (0, 4, 6, 6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch_direct_kernel_calls(dtype):
    """The API skips empty outputs, but fastops.nn calls kernels directly: an empty batch must
    return, not divide by a zero task count (the ocvec path once died of SIGFPE here). Every
    conv engine: ocvec (32 -> 32 channels, 3x3), implicit GEMM (8 channels; 1x1), strided
    phases (the stem), depthwise."""
    fused = registry.lookup("conv2d_bias_relu", "cython", "fused").kernel
    cases = [  # x shape, w shape, stride, padding, groups
        ((0, 32, 14, 14), (32, 32, 3, 3), 1, 1, 1),
        ((0, 8, 14, 14), (8, 8, 3, 3), 1, 1, 1),
        ((0, 16, 9, 9), (16, 16, 1, 1), 1, 0, 1),
        ((0, 3, 20, 20), (8, 3, 7, 7), 2, 3, 1),
        ((0, 8, 9, 9), (8, 1, 3, 3), 1, 1, 8),
    ]
    for xs, ws, stride, padding, groups in cases:
        x, w = np.ones(xs, dtype), np.ones(ws, dtype)
        bias = np.ones(ws[0], dtype)
        plan = check_conv2d(x, w, bias, stride, padding, 1, groups)
        for impl in registry.ladder("conv2d", "cython"):
            impl.kernel(plan.x, plan.w, np.empty(plan.out_shape, dtype), plan.params)
        fused(plan.x, plan.w, plan.bias, np.empty(plan.out_shape, dtype), plan.params)


def misaligned(shape, dtype, rng):
    """A C-contiguous array whose data starts at an odd byte offset (not even 4-aligned)."""
    n = int(np.prod(shape))
    raw = np.empty(n * np.dtype(dtype).itemsize + 1, dtype=np.uint8)
    arr = raw[1:].view(dtype).reshape(shape)
    arr[...] = rng.standard_normal(shape)
    assert arr.ctypes.data % 2 == 1 and arr.flags.c_contiguous
    return arr


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_buffers(dtype, rng):
    # Direct kernel calls on arrays at odd byte offsets: kernels must not assume alignment.
    a = misaligned((19, 45), dtype, rng)
    b = misaligned((45, 37), dtype, rng)
    for impl in registry.ladder("matmul", "cython"):
        out = misaligned((19, 37), dtype, rng)
        impl.kernel(a, b, out)
        assert_close(out, oracle.matmul(a, b), oracle.matmul(np.abs(a), np.abs(b)), 45, dtype,
                     f"{impl.name} misaligned")
    x = misaligned((2, 4, 9, 10), dtype, rng)
    w = misaligned((8, 4, 3, 3), dtype, rng)
    plan = check_conv2d(x, w, None, 1, 1, 1, 1)
    for impl in registry.ladder("conv2d", "cython"):
        out = misaligned(plan.out_shape, dtype, rng)
        impl.kernel(x, w, out, plan.params)
        assert_close(out, oracle.conv2d(x, w, None, 1, 1), oracle.conv2d(x, w, None, 1, 1,
                     absolute=True), 36, dtype, f"{impl.name} misaligned")
    # The ocvec conv variant (its broadcasts and masked stores) on misaligned x, w and out
    # (where the build has it; otherwise the same call runs the implicit GEMM).
    x = misaligned((2, 32, 5, 14), dtype, rng)
    w = misaligned((32, 32, 3, 3), dtype, rng)
    plan = check_conv2d(x, w, None, 1, 1, 1, 1)
    assert cv.use_ocvec(2, 32, 32, 3, 3, 1, 1, 1, 1, 5, 14,
                        64 // np.dtype(dtype).itemsize) == cv.ocvec_available()
    out = misaligned(plan.out_shape, dtype, rng)
    cv.conv2d_tiled(x, w, out, plan.params)
    assert_close(out, oracle.conv2d(x, w, None, 1, 1), oracle.conv2d(x, w, None, 1, 1,
                 absolute=True), 288, dtype, "ocvec misaligned")
    # Strided views through the API: validation hands the kernels contiguous copies.
    big = rng.standard_normal((90, 100)).astype(dtype)
    a_view, b_view = big[1:41:2, 3:48], big[::2, 1::2][:45, :37]  # (20, 45), (45, 37) strided
    got = fastops.matmul(a_view, b_view, backend="cython")
    assert_close(got, oracle.matmul(a_view, b_view),
                 oracle.matmul(np.abs(a_view), np.abs(b_view)), 45, dtype, "views")


# ---------------------------------------------------------------------------- conv edges
CONV_CASES = [
    # x shape, w shape, stride, padding, dilation, groups
    ((1, 1, 1, 1), (1, 1, 1, 1), 1, 0, 1, 1),
    ((2, 3, 9, 11), (5, 3, 3, 3), 1, 1, 1, 1),
    ((1, 4, 10, 12), (6, 2, 3, 2), (2, 1), 1, (1, 2), 2),
    ((2, 6, 8, 8), (6, 1, 3, 3), 1, 1, 1, 6),  # depthwise
    ((1, 8, 7, 7), (16, 1, 3, 3), 2, 1, 1, 8),  # depthwise, multiplier 2, stride 2
    ((2, 3, 4, 2), (3, 1, 3, 3), 1, (2, 1), 1, 3),  # depthwise, no interior column
    ((1, 4, 9, 12), (4, 1, 3, 5), (1, 2), (0, 3), (2, 1), 4),  # depthwise, strided, dilated
    ((1, 3, 20, 20), (9, 3, 7, 7), 2, 3, 1, 1),  # stem-like
    ((1, 16, 5, 6), (33, 16, 1, 1), 1, 0, 1, 1),  # 1x1 plain-matrix path, M = 4*MR + 1
    ((1, 5, 13, 13), (9, 5, 3, 3), 1, "same", 2, 1),  # asymmetric "same" + dilation
    ((1, 4, 9, 9), (8, 4, 1, 1), 2, 0, 1, 1),  # 1x1 strided: image path
    ((3, 29, 11, 7), (31, 29, 3, 3), 1, 2, 1, 1),  # K = 261: KC + 5 reduction rows
    ((1, 2, 40, 41), (7, 2, 2, 3), 3, (0, 2), 1, 1),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_every_stage(case, dtype, rng):
    xs, ws, stride, padding, dilation, groups = case
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal(ws).astype(dtype)
    bias = rng.standard_normal(ws[0]).astype(dtype)
    for impl in registry.ladder("conv2d", "cython"):
        check_conv(impl.kernel, x, w, stride, padding, dilation, groups, what=impl.name)
    for impl in registry.ladder("conv2d_bias_relu", "cython"):
        check_conv(impl.kernel, x, w, stride, padding, dilation, groups, bias, what=impl.name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_depthwise_register_path_every_width(dtype, rng):
    """The direct depthwise kernel (depthwise.h) works on blocks of 1-4 vectors of output
    columns with a masked last store: sweep the output width across every block shape, with
    vertical stride, dilation, asymmetric ("same" with even reach) padding, a channel
    multiplier of 2 and the fused epilogue."""
    fused = registry.lookup("conv2d_bias_relu", "cython", "fused").kernel
    lanes = 64 // np.dtype(dtype).itemsize
    for wo in sorted({1, 2, lanes - 1, lanes, lanes + 1, 3 * lanes, 4 * lanes - 1, 4 * lanes,
                      4 * lanes + 1, 7 * lanes + 3}):
        x = rng.standard_normal((2, 3, 5, wo)).astype(dtype)
        w = rng.standard_normal((6, 1, 3, 3)).astype(dtype)
        bias = rng.standard_normal(6).astype(dtype)
        check_conv(cv.conv2d_tiled, x, w, 1, 1, 1, 3, what=f"dw width {wo}")
        x_wide = rng.standard_normal((2, 3, 5, wo + 4)).astype(dtype)  # Wo = wo here too
        check_conv(cv.conv2d_tiled, x_wide, w, (2, 1), (2, 1), (2, 3), 3,
                   what=f"dw width {wo} strided/dilated")
        check_conv(cv.conv2d_tiled, x, w, 1, "same", (1, 2), 3,
                   what=f"dw width {wo} asymmetric 'same' padding")
        check_conv(fused, x, w, 1, 1, 1, 3, bias, what=f"dw width {wo} fused")


@pytest.mark.parametrize("dense", [None, False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_path_paddings_strides_and_image_blocks(dtype, dense, rng):
    """Convs read B in place from a zero-padded copy of the image split into stride phases
    (gemm.pxi kind 2), or copy its dense columns from there (kind 3, forced or chosen by
    use_dense): every padding side alone (incl. none at the bottom with some on the
    left), strides 1-3 with dilation, groups, more than KC reduction rows, outputs narrower
    than a tile, and small outputs whose tasks span several images (with the fused
    epilogue)."""
    from fastops.validation import ConvParams

    fused = registry.lookup("conv2d_bias_relu", "cython", "fused").kernel
    cases = [  # x shape, w shape, (top, bottom, left, right), dilation, groups, stride
        ((2, 3, 6, 7), (5, 3, 3, 3), (0, 0, 2, 1), (1, 1), 1, (1, 1)),
        ((1, 4, 5, 5), (9, 4, 3, 2), (1, 0, 0, 0), (1, 1), 1, (1, 1)),
        ((3, 4, 9, 8), (6, 2, 3, 3), (2, 1, 0, 3), (2, 1), 2, (1, 1)),
        ((1, 80, 4, 4), (10, 80, 3, 3), (1, 1, 1, 1), (1, 1), 1, (1, 1)),  # 720 rows: 2 KC blocks
        ((2, 80, 3, 3), (136, 80, 3, 3), (1, 1, 1, 1), (1, 1), 1, (1, 1)),  # dense, 2 KC blocks
        ((40, 5, 3, 3), (17, 5, 3, 3), (1, 1, 1, 1), (1, 1), 1, (1, 1)),  # 40 images of 9 px
        ((2, 6, 1, 1), (8, 6, 1, 1), (0, 0, 0, 0), (1, 1), 1, (1, 1)),  # 1x1 in place
        ((1, 3, 23, 22), (9, 3, 7, 7), (3, 2, 3, 3), (1, 1), 1, (2, 2)),  # stem-like phases
        ((2, 4, 11, 13), (6, 2, 3, 3), (1, 0, 2, 1), (2, 1), 2, (3, 2)),  # odd strides
        ((1, 8, 9, 9), (5, 8, 1, 1), (0, 0, 0, 0), (1, 1), 1, (2, 2)),  # 1x1 downsampling
        ((1, 3, 10, 12), (4, 3, 2, 3), (0, 1, 1, 0), (3, 2), 1, (1, 2)),  # dilation > stride
        ((3, 8, 5, 5), (140, 8, 3, 3), (1, 1, 1, 1), (1, 1), 1, (1, 1)),  # auto: dense
        ((2, 4, 7, 6), (272, 2, 3, 3), (1, 0, 2, 1), (1, 2), 2, (2, 1)),  # dense, 2 groups
        ((8, 16, 7, 7), (512, 16, 3, 3), (1, 1, 1, 1), (1, 1), 1, (1, 1)),  # dense: row halves
    ]
    previous = cv.dense_override
    cv.dense_override = dense
    try:
        run_direct_cases(cases, dtype, rng)
    finally:
        cv.dense_override = previous


@pytest.mark.parametrize("dtype", DTYPES)
def test_ocvec_variant_tails_paddings_and_segments(dtype, rng):
    """The ocvec variant (output channels in the lanes, ocvec.h), forced on: output widths
    for every segment width (7, 14, 28) and around them, so a row's last segment sticks out
    past Wo; output channels around the lane count L (a partial last block); kernel heights
    1, 3, 5 with vertical dilation; paddings of 0, 1 and more than the kernel reaches (rows
    with no real tap at all), asymmetric; groups; a reduction long enough for several
    weight records per row; tiles that run across image boundaries; x read in place (no
    padded copy) where the kernel skips every padding tap. Both the plain conv and the fused
    bias + ReLU."""
    if not cv.ocvec_available():
        pytest.skip("no ocvec kernel in this build (needs AVX-512)")
    fused = registry.lookup("conv2d_bias_relu", "cython", "fused").kernel
    lanes = 64 // np.dtype(dtype).itemsize
    cases = [  # x shape, K, kH, padding, dilation, groups
        ((2, 3, 7, 7), lanes + 1, 3, 1, 1, 1),
        ((1, 4, 14, 14), lanes - 1, 3, 1, 1, 1),
        ((1, 2, 5, 28), 2 * lanes, 3, 1, 1, 1),
        ((2, 5, 4, 56), 3, 3, 1, 1, 1),
        ((1, 3, 6, 57), 5, 3, (1, 1), 1, 1),
        ((3, 4, 9, 13), lanes, 5, (2, 1), (2, 1), 1),  # dilation 2 down, 1 across
        ((1, 6, 8, 20), 7, 1, (0, 1), 1, 1),  # kH = 1
        ((1, 4, 5, 29), 9, 3, (4, 1), 1, 1),  # rows with no real tap (padding 4 > reach)
        ((2, 4, 6, 9), 6, 3, (0, 0), 1, 1),  # no padding: Wo = W - 2
        ((1, 8, 7, 15), 2 * lanes + 6, 3, (1, 2), 1, 2),  # wider left/right padding, groups
        ((1, 2, 3, 1), 4, 3, 1, 1, 1),  # a 1-wide input with padding: Wo = 1
        ((2, 64, 6, 6), lanes, 3, 1, 1, 1),  # 1152-long reduction, several rows of records
        ((9, 4, 1, 5), lanes + 2, 3, 1, 1, 1),  # one-row images: a tile spans 4 images
        # x read in place (no padded copy: <= 1 padding column each side, whole segments)
        ((1, 4, 9, 14), lanes, 5, (2, 1), 1, 1),  # 2 padding rows, kH = 5
        ((2, 4, 9, 28), lanes + 1, 3, (2, 1), (2, 1), 1),  # dilated rows
        ((3, 4, 5, 14), 2 * lanes, 3, 1, 1, 2),  # odd rows: 2-row tiles span images; groups
        ((2, 3, 4, 56), 5, 3, 1, 1, 1),  # 28-pixel halves, one edge each
        ((1, 4, 6, 12), lanes, 3, (1, 2), 1, 1),  # 2 padding columns: the padded copy again
    ]
    previous = cv.ocvec_override
    cv.ocvec_override = True
    try:
        for xs, k, kh, padding, dilation, groups in cases:
            x = rng.standard_normal(xs).astype(dtype)
            w = rng.standard_normal((k, xs[1] // groups, kh, 3)).astype(dtype)
            bias = rng.standard_normal(k).astype(dtype)
            what = f"ocvec {xs} K={k} kH={kh} pad={padding} dil={dilation} g={groups}"
            assert cv.use_ocvec(xs[0], xs[1] // groups, k // groups, kh, 3, 1, 1, 1, 1, 1, 1)
            check_conv(cv.conv2d_tiled, x, w, 1, padding, dilation, groups, what=what)
            check_conv(fused, x, w, 1, padding, dilation, groups, bias, what=what + " fused")
    finally:
        cv.ocvec_override = previous


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepack_hook_matches_per_call(dtype, rng):
    """fastops.nn's prepack / run_packed hook on conv2d/tiled and the fused stage: the same
    bits as the per-call path, whether the ocvec reorder applies (packed.ocvec set) or not
    (few channels, 1x1: None, the call runs the GEMM), with groups and with a call whose rows
    do not fit ocvec's segments although the weights were packed for it."""
    fused = registry.lookup("conv2d_bias_relu", "cython", "fused").kernel
    cases = [  # x shape, w shape, padding, groups, packed for ocvec?
        ((2, 32, 6, 14), (32, 32, 3, 3), 1, 1, True),
        ((1, 64, 5, 7), (64, 32, 3, 3), 1, 2, True),  # 2 groups of 32 -> 32
        ((1, 32, 5, 20), (32, 32, 3, 3), 1, 1, True),  # rows of 20: the GEMM runs
        ((1, 8, 6, 14), (16, 8, 3, 3), 1, 1, False),  # few channels
        ((1, 32, 6, 14), (32, 32, 1, 1), 0, 1, False),  # 1x1
    ]
    for xs, ws, padding, groups, ocvec in cases:
        x = rng.standard_normal(xs).astype(dtype)
        w = rng.standard_normal(ws).astype(dtype)
        bias = rng.standard_normal(ws[0]).astype(dtype)
        plan = check_conv2d(x, w, bias, 1, padding, 1, groups)
        packed = cv.conv2d_tiled.prepack(plan.w, plan.params)
        assert (packed.ocvec is not None) == (ocvec and cv.ocvec_available()), (xs, ws)
        for kernel, args in ((cv.conv2d_tiled, ()), (fused, (plan.bias,))):
            direct = np.empty(plan.out_shape, dtype)
            kernel(plan.x, plan.w, *args, direct, plan.params)
            via_pack = np.full(plan.out_shape, np.nan, dtype)
            kernel.run_packed(plan.x, kernel.prepack(plan.w, plan.params), *args, via_pack,
                              plan.params)
            np.testing.assert_array_equal(via_pack, direct, err_msg=f"{xs} {ws}")


def test_ocvec_choice():
    """ocvec only where its kernel applies (kW = 3, unit stride and horizontal dilation, not
    depthwise) and, by default, where it measured faster than the implicit GEMM."""
    use = cv.use_ocvec  # N, C/g, K/g, kH, kW, sH, sW, dH, dW, Ho, Wo
    if not cv.ocvec_available():
        assert not use(8, 128, 128, 3, 3, 1, 1, 1, 1, 28, 28)
        pytest.skip("no ocvec kernel in this build (needs AVX-512)")
    assert use(8, 128, 128, 3, 3, 1, 1, 1, 1, 28, 28)
    assert use(1, 512, 512, 3, 3, 1, 1, 1, 1, 7, 7)  # res5
    assert use(1, 64, 64, 3, 3, 1, 1, 1, 1, 56, 56)  # res2
    assert not use(1, 8, 64, 3, 3, 1, 1, 1, 1, 28, 28)  # few input channels
    assert not use(1, 64, 24, 3, 3, 1, 1, 1, 1, 28, 28)  # few output channels
    assert not use(1, 64, 40, 3, 3, 1, 1, 1, 1, 28, 28)  # output channels not in whole vectors
    assert use(1, 64, 40, 3, 3, 1, 1, 1, 1, 28, 28, lanes=8)  # ... they are for float64
    assert not use(1, 64, 64, 3, 3, 1, 1, 1, 1, 20, 20)  # rows of 20: segments of 7 stick out
    assert not use(8, 128, 128, 3, 3, 2, 2, 1, 1, 14, 14)  # stride 2
    assert not use(8, 64, 64, 1, 1, 1, 1, 1, 1, 56, 56)  # 1 x 1
    assert not use(8, 64, 64, 3, 3, 1, 1, 1, 2, 56, 56)  # horizontal dilation
    assert not use(8, 1, 1, 3, 3, 1, 1, 1, 1, 56, 56)  # depthwise
    assert [cv.ocvec_segment_width(wo) for wo in (56, 28, 14, 7, 20, 1)] == [28, 28, 14, 7, 7, 7]


def test_dense_grid_balances_partial_tiles():
    """dense_grid (the dense path's task split) covers the problem with micro-tile multiples,
    and for res5 3x3 C512 7x7 at batch 8 (392 columns = 12.25 tiles of 32) splits the rows
    rather than the columns into 224 + 168 (7 vs 5.25 tiles: one thread idle a quarter of
    the time); at batch 1 the layers keep their one-row-block splits."""
    mr, nr = cv.micro_tile("float32")
    for M, N, outer, threads in [(512, 392, 1, 2), (256, 1568, 1, 2), (128, 6272, 1, 2),
                                 (136, 18, 1, 2), (136, 9, 2, 4), (512, 49, 1, 1)]:
        mb, nb = cv.dense_grid(M, N, outer, mr, nr, threads)
        assert mb % mr == 0 and nb % nr == 0 and 0 < nb <= cv.GEMM_BLOCKS["NC_MAX"]
        assert mb < M + mr and nb < N + nr
    if (mr, nr) == (8, 32):
        assert cv.dense_grid(512, 392, 1, mr, nr, 2) == (256, 416)
        assert cv.dense_grid(512, 49, 1, mr, nr, 2)[0] == 512
        assert cv.dense_grid(128, 784, 1, mr, nr, 2)[0] == 128


def run_direct_cases(cases, dtype, rng):
    from fastops.validation import ConvParams

    fused = registry.lookup("conv2d_bias_relu", "cython", "fused").kernel
    for xs, ws, (pt, pb, pl, pr), (dh, dw), groups, (sh, sw) in cases:
        x = rng.standard_normal(xs).astype(dtype)
        w = rng.standard_normal(ws).astype(dtype)
        bias = rng.standard_normal(ws[0]).astype(dtype)
        p = ConvParams(sh, sw, pt, pb, pl, pr, dh, dw, groups)
        xpad = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        ref = oracle.conv2d(xpad, w, None, (sh, sw), 0, (dh, dw), groups)
        absref = oracle.conv2d(xpad, w, None, (sh, sw), 0, (dh, dw), groups, absolute=True)
        red = ws[1] * ws[2] * ws[3]
        out = np.full(ref.shape, np.nan, dtype)
        cv.conv2d_tiled(x, w, out, p)
        assert_close(out, ref, absref, red, dtype, f"direct {xs} {ws} {(pt, pb, pl, pr)}")
        out = np.full(ref.shape, np.nan, dtype)
        fused(x, w, bias, out, p)
        ref_f = np.maximum(ref + bias[None, :, None, None], 0)
        assert_close(out, ref_f, absref + np.abs(bias)[None, :, None, None], red + 1, dtype,
                     f"direct fused {xs} {ws}")


def test_conv_asymmetric_padding_params(rng):
    from fastops.validation import ConvParams

    x = rng.standard_normal((1, 3, 10, 9)).astype(np.float32)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    p = ConvParams(1, 2, 0, 2, 1, 0, 1, 1, 1)  # top 0, bottom 2, left 1, right 0
    ref_x = np.pad(x, ((0, 0), (0, 0), (0, 2), (1, 0)))
    ho, wo = 10, 4
    for impl in registry.ladder("conv2d", "cython"):
        out = np.full((1, 8, ho, wo), np.nan, np.float32)
        impl.kernel(x, w, out, p)
        assert_close(out, oracle.conv2d(ref_x, w, None, (1, 2)),
                     oracle.conv2d(ref_x, w, None, (1, 2), absolute=True), 27, np.float32,
                     impl.name)


@pytest.mark.parametrize("stage", ["vectorized", "parallel"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_wide_grid_stages_random_geometry(stage, dtype, rng):
    """The vectorized / parallel stages read every tap at one offset in the padded, phase-
    split copy and drop the junk columns: random strides (phases), dilations, asymmetric
    paddings and groups, each against the oracle; the output starts as NaN, so a pixel left
    unwritten fails."""
    from fastops.validation import ConvParams

    kernel = registry.lookup("conv2d", "cython", stage).kernel
    for _ in range(25):
        groups = int(rng.choice([1, 2, 3]))
        cg, kg = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        kh, kw = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        sh, sw, dh, dw = (int(v) for v in rng.integers(1, 4, size=4))
        pt, pb, pl, pr = (int(v) for v in rng.integers(0, 4, size=4))
        n, h, wd = int(rng.integers(1, 3)), int(rng.integers(1, 14)), int(rng.integers(1, 14))
        ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        wo = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
        if ho < 1 or wo < 1:
            continue
        x = rng.standard_normal((n, groups * cg, h, wd)).astype(dtype)
        w = rng.standard_normal((groups * kg, cg, kh, kw)).astype(dtype)
        out = np.full((n, groups * kg, ho, wo), np.nan, dtype)
        kernel(x, w, out, ConvParams(sh, sw, pt, pb, pl, pr, dh, dw, groups))
        xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        what = f"{stage} x{x.shape} w{w.shape} s{sh, sw} p{pt, pb, pl, pr} d{dh, dw} g{groups}"
        assert_close(out, oracle.conv2d(xp, w, None, (sh, sw), 0, (dh, dw), groups),
                     oracle.conv2d(xp, w, None, (sh, sw), 0, (dh, dw), groups, absolute=True),
                     cg * kh * kw, dtype, what)


def test_wide_grid_nan_stays_in_its_pixels(rng):
    """A NaN in the input reaches exactly the outputs whose window covers it, although the
    wide-grid stages also compute junk columns that read across row ends."""
    x = rng.standard_normal((1, 2, 7, 7)).astype(np.float32)
    x[0, 1, 3, 6] = np.nan  # last column: its row neighbour on the wide grid is junk
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    for stage in ("vectorized", "parallel"):
        check_conv(registry.lookup("conv2d", "cython", stage).kernel, x, w, 1, 1,
                   what=f"{stage} NaN")


def test_fused_relu_keeps_nan(rng):
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    x[0, 1, 2, 3] = np.nan
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    fused = registry.lookup("conv2d_bias_relu", "cython", "fused").kernel
    check_conv(fused, x, w, 1, 1, 1, 1, bias, what="fused NaN")
    dw = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    check_conv(fused, x, dw, 1, 1, 1, 4, bias[:4], what="fused depthwise NaN")


# ---------------------------------------------------------------------------- ISA safety
def test_isa_decision_logic():
    ok, msg = mm.isa_decision({"avx2", "fma", "avx512f"}, {"avx2", "fma", "avx512f"})
    assert ok and msg is None
    ok, msg = mm.isa_decision({"avx2", "fma", "avx512f"}, {"avx2", "fma"})
    assert not ok and "avx512f" in msg and "FASTOPS_PORTABLE" in msg
    ok, msg = mm.isa_decision(set(), set())
    assert ok


def test_this_build_runs_on_this_cpu():
    assert mm.compiled_isa() <= mm.runtime_isa()
    assert mm.isa_decision(mm.compiled_isa(), mm.runtime_isa())[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_portable_micro_kernel_path(dtype, rng):
    """The fallback used when the CPU lacks the build's ISA computes the same results."""
    previous = (mm.set_simd(False), cv.set_simd(False))
    try:
        mr, nr, kc, _mc = tiles(dtype)
        for m, k, n in [(mr + 1, kc + 3, nr - 1), (2 * mr, 5, 2 * nr + 1), (2, 33, 70)]:
            a = rng.standard_normal((m, k)).astype(dtype)
            b = rng.standard_normal((k, n)).astype(dtype)
            check_matmul(tiled, a, b, "portable")
        x = rng.standard_normal((1, 5, 9, 9)).astype(dtype)
        w = rng.standard_normal((mr + 3, 5, 3, 3)).astype(dtype)
        bias = rng.standard_normal(mr + 3).astype(dtype)
        check_conv(registry.lookup("conv2d_bias_relu", "cython", "fused").kernel, x, w, 1, 1,
                   bias=bias, what="portable fused")
    finally:
        mm.set_simd(previous[0])
        cv.set_simd(previous[1])


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_vectorized_stage_emits_packed_fma():
    """The `vectorized` stage's claim: the compiled module contains packed (ps/pd on xmm, ymm
    or zmm registers) FMA instructions, not only scalar ones."""
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", mm.__file__],
                         capture_output=True, text=True, check=True).stdout
    packed = [line for line in asm.splitlines()
              if "vfmadd" in line and ("ps" in line.split()[1] or "pd" in line.split()[1])
              and "mm" in line]
    assert packed, "no packed FMA instruction in the built matmul module"


# ---------------------------------------------------------------------------- threads, leaks
def test_concurrent_calls_from_4_threads(rng):
    a = rng.standard_normal((70, 300)).astype(np.float32)
    b = rng.standard_normal((300, 90)).astype(np.float32)
    x = rng.standard_normal((2, 16, 12, 12)).astype(np.float32)
    w = rng.standard_normal((24, 16, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    ref_mm = oracle.matmul(a, b)
    ref_cv = oracle.conv2d(x, w, bias, 1, 1, relu=True)
    def work():
        for _ in range(10):
            got = fastops.matmul(a, b, backend="cython", stage="tiled")
            assert np.allclose(got, ref_mm, rtol=1e-4, atol=1e-3)
            got = fastops.conv2d_bias_relu(x, w, bias, padding=1, backend="cython",
                                           stage="fused")
            assert np.allclose(got, ref_cv, rtol=1e-4, atol=1e-3)

    run_concurrently(work, threads=4)


def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_no_leak_over_many_calls(rng):
    a = rng.standard_normal((96, 400)).astype(np.float32)
    b = rng.standard_normal((400, 300)).astype(np.float32)
    out = np.empty((96, 300), np.float32)
    x = rng.standard_normal((1, 32, 14, 14)).astype(np.float32)
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32)
    plan = check_conv2d(x, w, bias, 1, 1, 1, 1)
    cout = np.empty(plan.out_shape, np.float32)
    fused = registry.lookup("conv2d_bias_relu", "cython", "fused").kernel

    def burst(n):
        for _ in range(n):
            tiled(a, b, out)
            fused(x, w, bias, cout, plan.params)

    burst(50)
    gc.collect()
    tracemalloc.start()
    rss0 = _rss_kib()
    snap0 = tracemalloc.take_snapshot()
    burst(400)
    gc.collect()
    snap1 = tracemalloc.take_snapshot()
    rss1 = _rss_kib()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
    assert grown < 64 * 1024, f"Python allocations grew by {grown} B"
    # The packing buffers are malloc'd per call (1.3 MiB for this conv): a leak would add
    # hundreds of MiB over 400 calls.
    assert rss1 - rss0 < 16 * 1024, f"RSS grew by {rss1 - rss0} KiB"
