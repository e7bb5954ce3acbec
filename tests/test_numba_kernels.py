"""Numba-specific checks: tile-boundary tails, SIMD in the assembly, thread safety.

The generic, registry-parametrised correctness tests live in test_correctness.py; these cover
what only the Numba kernels have (tile sizes MR/NR/KC/MC/NC, the threading layer, fast-math).
"""
from __future__ import annotations

import re

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from fastops import oracle  # noqa: E402
from fastops.kernels.numba import _common  # noqa: E402
from fastops.kernels.numba import conv2d as nconv  # noqa: E402
from fastops.kernels.numba import conv2d_bias_relu as nfused  # noqa: E402
from fastops.kernels.numba import matmul as nmm  # noqa: E402
from fastops.testing import assert_close  # noqa: E402
from fastops.validation import check_conv2d  # noqa: E402

from conftest import run_concurrently  # noqa: E402

DTYPES = [np.float32, np.float64]
MATMUL_STAGES = [nmm.matmul_naive, nmm.matmul_vectorized, nmm.matmul_parallel, nmm.matmul_tiled]
CONV_STAGES = [nconv.conv2d_naive, nconv.conv2d_vectorized, nconv.conv2d_parallel,
               nconv.conv2d_tiled]


def _check_matmul(kernel, m, k, n, dtype, rng):
    a = rng.standard_normal((m, k)).astype(dtype)  # (M, K)
    b = rng.standard_normal((k, n)).astype(dtype)  # (K, N)
    out = np.full((m, n), np.nan, dtype=dtype)  # garbage in: the kernel must overwrite it all
    kernel(a, b, out)
    assert_close(out, oracle.matmul(a, b), oracle.matmul(abs(a), abs(b)), k, dtype,
                 f"{kernel.__name__} {m}x{k}x{n}")


# sizes straddling every tile boundary of the tiled stage: MR, NR, KC, NC (float32; float64
# blocks are NC / 2 wide), the row split of narrow outputs (N <= NR), and primes
MR, NR, KC, NC = nmm.MR, nmm.NR, nmm.KC, nmm.NC
TAIL_SHAPES = [(1, 1, 1), (MR - 1, 3, NR - 1), (MR, KC, NR), (MR + 1, KC + 1, NR + 1),
               (2 * MR + 1, KC - 1, 2 * NR - 1), (97, 7, NC + 1), (5 * MR - 1, 2 * KC + 3, 37),
               (MR + 1, KC + 1, NC // 2 + 1), (MR + 1, 2 * KC + 1, 2 * NC + NR + 3),
               (101, 13, NR - 3), (13, 17, 19), (97, 61, 131)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TAIL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matmul_tiles_and_tails(shape, dtype, rng):
    for kernel in MATMUL_STAGES:
        _check_matmul(kernel, *shape, dtype, rng)


# the skinny path of the tiled stage (M < MR): K around its four-row unrolling (k % 4 = 0..3),
# N across its 512-column strips
SKINNY_SHAPES = [(1, 4, 1), (1, 9, 1000), (2, 8, 7), (MR - 1, 11, 1030), (4, 4, 513),
                 (3, 6, 512)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SKINNY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matmul_skinny_path(shape, dtype, rng):
    assert shape[0] < MR  # the tiled stage sends these to _matmul_skinny
    _check_matmul(nmm.matmul_tiled, *shape, dtype, rng)


CONV_CASES = [  # x shape, w shape, stride, padding, dilation, groups
    ((1, 1, 1, 1), (1, 1, 1, 1), 1, 0, 1, 1),
    ((2, 3, 7, 9), (4, 3, 3, 3), 1, 1, 1, 1),
    ((1, 4, 10, 11), (6, 2, 3, 2), (2, 1), (1, 2), (1, 2), 2),  # groups, stride, dilation
    ((2, 8, 9, 9), (8, 1, 3, 3), 1, 1, 1, 8),  # depthwise
    ((1, 5, 8, 13), (7, 5, 2, 4), 1, "same", 1, 1),  # asymmetric padding
    ((1, 3, 9, 10), (5, 3, 3, 3), (3, 2), (2, 0), 1, 1),
    ((1, 16, 12, 12), (13, 16, 3, 3), 1, (0, 2), 2, 1),
    ((1, 20, 9, 35), (40, 20, 3, 3), 1, 1, 1, 1),  # several pixel panels and channel blocks
    # the wide grid and its phase split: strides, unequal strides with dilation, big padding
    ((1, 6, 11, 12), (8, 6, 3, 3), 2, 1, 1, 1),
    ((1, 7, 13, 10), (6, 7, 3, 2), (3, 1), (1, 0), (2, 3), 1),
    ((1, 3, 20, 21), (8, 3, 7, 7), 2, 3, 1, 1),  # stem-like 7x7 stride 2
    ((1, 2, 5, 5), (6, 2, 3, 3), 1, 4, 1, 1),  # padding wider than the kernel
    # groups with fewer than MR output channels take the plane path; 7 = MR + 1 edge rows
    ((1, 8, 9, 9), (8, 2, 3, 3), 1, 1, 1, 4),
    ((2, 4, 10, 9), (8, 1, 3, 3), 2, 1, 1, 4),  # depthwise, channel multiplier 2, stride 2
    ((1, 6, 15, 17), (14, 3, 5, 5), 2, 2, 1, 2),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_stages_and_fused(case, dtype, rng):
    xs, ws, stride, padding, dilation, groups = CONV_CASES[case]
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal(ws).astype(dtype)
    bias = rng.standard_normal(ws[0]).astype(dtype)
    plan = check_conv2d(x, w, bias, stride, padding, dilation, groups)
    args = (stride, padding, dilation, groups)
    reduction = ws[1] * ws[2] * ws[3]
    ref = oracle.conv2d(x, w, None, *args)
    aref = oracle.conv2d(x, w, None, *args, absolute=True)
    for kernel in CONV_STAGES:
        out = np.full(plan.out_shape, np.nan, dtype=dtype)
        kernel(plan.x, plan.w, out, plan.params)
        assert_close(out, ref, aref, reduction, dtype, f"{kernel.__name__} case {case}")
    out = np.full(plan.out_shape, np.nan, dtype=dtype)
    nfused.conv2d_bias_relu_fused(plan.x, plan.w, plan.bias, out, plan.params)
    assert_close(out, oracle.conv2d(x, w, bias, *args, relu=True),
                 oracle.conv2d(x, w, bias, *args, relu=True, absolute=True), reduction + 1,
                 dtype, f"fused case {case}")


@pytest.mark.parametrize("blocks,panels", [(22, 27), (43, 7), (86, 2), (11, 102), (1, 1)])
@pytest.mark.parametrize("threads", [2, 3])
def test_balanced_grid_gives_threads_equal_work(blocks, panels, threads):
    # the ResNet res2..res5 3x3 layers at batch 1: 11..86 row blocks, 2..102 pixel panels
    tm, tn = nconv.balanced_grid(blocks, panels, 1, threads)
    assert 1 <= tm <= blocks and 1 <= tn <= panels
    share = blocks * panels / threads
    worst = nconv.thread_work(blocks, panels, 1, tm, tn, threads)
    if blocks * panels >= 4 * threads:
        assert worst <= 1.15 * share, (tm, tn, worst, share)


def test_fused_relu_keeps_nan(rng):
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    x[0, 1, 2, 3] = np.nan
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bias = -np.abs(rng.standard_normal(4)).astype(np.float32) - 100  # ReLU zeroes the rest
    plan = check_conv2d(x, w, bias, 1, 1, 1, 1)
    out = np.empty(plan.out_shape, dtype=np.float32)
    nfused.conv2d_bias_relu_fused(plan.x, plan.w, plan.bias, out, plan.params)
    expected = oracle.conv2d(x, w, bias, 1, 1, relu=True)
    assert np.array_equal(np.isnan(out), np.isnan(expected)) and np.isnan(out).sum() == 4 * 9
    assert np.all(out[~np.isnan(out)] == 0)


# ------------------------------------------------------------------------------------ SIMD
def _asm(py_func, signature, **options):
    # A fresh, uncached compile of the real kernel source: Numba cannot show the assembly of a
    # function it loaded from its on-disk cache.
    dispatcher = numba.njit(**options)(py_func)
    dispatcher.compile(signature)
    return dispatcher.inspect_asm(signature)


PACKED_FMA = re.compile(r"vfmadd\d+ps\s+[^\n]*%[yz]mm")


def test_vectorized_matmul_emits_packed_fma():
    f32 = numba.float32[:, ::1]
    asm = _asm(nmm._matmul_row.py_func, (f32, f32, f32, numba.int64),
               fastmath=_common.FASTMATH)
    assert PACKED_FMA.search(asm), "expected vfmadd...ps on ymm/zmm registers"


def test_naive_matmul_has_no_packed_fma():
    f32 = numba.float32[:, ::1]
    asm = _asm(nmm._matmul_naive.py_func, (f32, f32, f32))
    assert not PACKED_FMA.search(asm)


def test_micro_kernel_keeps_accumulators_in_registers():
    f32 = numba.float32[:, ::1]
    signature = (f32, numba.int64, numba.int64, f32, numba.int64, numba.int64, f32,
                 numba.int64, numba.int64, numba.int64, numba.int64, numba.boolean,
                 numba.float32[::1], numba.boolean, numba.boolean)
    asm = _asm(nmm.micro_kernel.py_func, signature, fastmath=_common.FASTMATH)
    # MR x NR float32 = 6 x 32 = 12 vectors of 16 lanes (or 24 of 8): one FMA each per k step
    fmas = len(PACKED_FMA.findall(asm))
    assert fmas >= MR * NR // 16, f"found {fmas} packed FMAs"


def test_conv_micro_kernel_keeps_accumulators_in_registers():
    f32, f1, i64 = numba.float32[:, ::1], numba.float32[::1], numba.int64
    signature = (f32, i64, f1, numba.int64[::1], i64, f32, i64, i64, i64, i64, i64, f1,
                 numba.boolean)
    asm = _asm(nconv.direct_micro_kernel.py_func, signature, fastmath=_common.FASTMATH)
    fmas = len(PACKED_FMA.findall(asm))
    assert fmas >= MR * NR // 16, f"found {fmas} packed FMAs"
    assert "Spill" not in asm


def test_vectorized_conv_plane_emits_packed_fma():
    f32, f1, i64 = numba.float32[:, ::1], numba.float32[::1], numba.int64
    signature = (f1, f32, i64, numba.int64[::1], f1, f1, i64, i64, i64, f1, numba.boolean)
    asm = _asm(nconv.conv_plane.py_func, signature, fastmath=_common.FASTMATH)
    assert PACKED_FMA.search(asm), "expected vfmadd...ps on ymm/zmm registers"


# ------------------------------------------------------------------------------- threads
def test_threading_layer_is_thread_safe_or_locked():
    a = np.ones((8, 8), dtype=np.float32)
    out = np.empty((8, 8), dtype=np.float32)
    nmm.matmul_parallel(a, a, out)  # starts the threading layer
    layer = numba.threading_layer()
    assert layer in ("omp", "tbb") or nmm._serialised_parallel is not nmm._matmul_parallel


def test_concurrent_calls_from_python_threads(rng):
    a = rng.standard_normal((70, 90)).astype(np.float32)
    b = rng.standard_normal((90, 110)).astype(np.float32)
    x = rng.standard_normal((1, 8, 12, 12)).astype(np.float32)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    plan = check_conv2d(x, w, None, 1, 1, 1, 1)
    mm_ref = oracle.matmul(a, b), oracle.matmul(abs(a), abs(b))
    conv_ref = oracle.conv2d(x, w, None, 1, 1), oracle.conv2d(x, w, None, 1, 1, absolute=True)
    for kernel in (nmm.matmul_parallel, nmm.matmul_tiled):  # compile before the race
        kernel(a, b, np.empty((70, 110), np.float32))
    nconv.conv2d_tiled(plan.x, plan.w, np.empty(plan.out_shape, np.float32), plan.params)
    def worker():
        for _ in range(20):
            for kernel in (nmm.matmul_parallel, nmm.matmul_tiled):
                out = np.empty((70, 110), np.float32)
                kernel(a, b, out)
                assert_close(out, *mm_ref, 90, np.float32, kernel.__name__)
            out = np.empty(plan.out_shape, np.float32)
            nconv.conv2d_tiled(plan.x, plan.w, out, plan.params)
            assert_close(out, *conv_ref, 72, np.float32, "conv2d_tiled")

    run_concurrently(worker, threads=4)


def test_tile_grid_even_blocks():
    """The tiled matmul's tiles: MR/NR multiples covering the output, the same number of
    tiles for every thread where the column panels allow, rows split only when columns run
    out (each row block re-packs its columns of B): 196 x 3072 on 2 threads is 6 tiles of
    198 x 512, 3 per thread, and B is packed once."""
    from fastops.kernels.numba import matmul as nm

    for m, n in [(196, 3072), (1024, 1024), (256, 256), (64, 512), (7, 5), (1000, 37),
                 (6, 1), (300, 1536), (13, 2 * nm.NC + 1)]:
        for threads in (1, 2, 3, 4):
            mc, nc = nm.tile_grid(m, n, nm.NC, threads)
            assert mc % nm.MR == 0 and nc % nm.NR == 0 and nc <= nm.NC
            rows = [min(mc, m - r) for r in range(0, m, mc)]
            cols = [min(nc, n - c) for c in range(0, n, nc)]
            assert sum(rows) == m and sum(cols) == n and min(rows + cols) > 0
            if len(cols) >= threads:
                assert len(rows) == 1 and len(cols) % threads == 0
            else:
                assert len(rows) * len(cols) >= min(threads, -(-m // nm.MR))
    assert nm.tile_grid(196, 3072, nm.NC, 2) == (198, 512)
    assert nm.tile_grid(1024, 1024, nm.NC, 2) == (1026, 512)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_b_block(dtype, rng):
    """_pack_b copies b[k0:k0+kc, col0:col0+cols] into NR-wide panels, zeros past the last
    column, and leaves the rest of a larger buffer alone."""
    b = rng.standard_normal((40, 100)).astype(dtype)  # (K, N)
    for k0, kc, col0, cols in [(0, 40, 0, 100), (3, 17, 5, 2 * NR + 7), (39, 1, 99, 1),
                               (8, 9, 36, NR)]:
        panels = -(-cols // NR)
        bpk = np.full((panels + 1, kc + 2, NR), 7.0, dtype=dtype)
        nmm._pack_b(b, k0, kc, col0, cols, bpk)
        want = np.zeros((kc, panels * NR), dtype=dtype)
        want[:, :cols] = b[k0:k0 + kc, col0:col0 + cols]
        got = bpk[:panels, :kc].transpose(1, 0, 2).reshape(kc, panels * NR)
        assert np.array_equal(got, want), (k0, kc, col0, cols)
        assert (bpk[panels] == 7.0).all() and (bpk[:, kc:] == 7.0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 3, 5])
def test_tiled_any_thread_count(threads, dtype, rng):
    """The tile split for thread counts other than this machine's: every tile computed once,
    by an iteration with its own packing buffer (odd counts leave uneven or empty shares)."""
    for m, k, n in [(MR, 1, 1), (37, 2 * KC + 5, 3 * NR + 1), (101, KC + 3, NC + 2 * NR + 5),
                    (2 * MR + 1, 7, NR - 3)]:
        a = rng.standard_normal((m, k)).astype(dtype)  # (M, K)
        b = rng.standard_normal((k, n)).astype(dtype)  # (K, N)
        out = np.full((m, n), np.nan, dtype=dtype)
        nmm._matmul_tiled(a, b, out, threads)
        assert_close(out, oracle.matmul(a, b), oracle.matmul(abs(a), abs(b)), k, dtype,
                     f"_matmul_tiled threads={threads} {m}x{k}x{n}")
