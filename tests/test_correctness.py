"""Every registered (op, backend, stage) against the float64 oracle, float32 and float64.

Parametrised over the registry: a new stage is tested the moment it registers. Shapes include
1, primes and sizes that are not multiples of any tile; conv cases cover stride, padding
(symmetric, asymmetric 'same', 'valid'), dilation, groups and depthwise.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastops
from fastops import oracle
from fastops.testing import assert_close
from fastops.validation import check_conv2d, conv2d_flops

from conftest import DTYPES, cpu_impls, impl_id, too_big

MATMUL_SHAPES = [  # (M, K, N)
    (1, 1, 1), (1, 7, 1), (3, 5, 7), (2, 1, 3), (17, 31, 13), (1, 300, 41), (41, 300, 1),
    (64, 64, 64), (65, 67, 129), (97, 33, 257), (128, 129, 96), (13, 1031, 17), (257, 61, 251),
]

# (N, C, H, W, K, kH, kW, stride, padding, dilation, groups)
CONV_CASES = [
    (1, 3, 8, 8, 4, 3, 3, 1, 1, 1, 1),
    (2, 5, 11, 9, 6, 3, 3, 2, 1, 1, 1),
    (1, 4, 13, 12, 5, 3, 3, 1, 2, 2, 1),
    (2, 6, 9, 10, 4, 3, 3, 1, 1, 1, 2),
    (1, 8, 10, 10, 8, 3, 3, 1, 1, 1, 8),  # depthwise
    (1, 4, 7, 7, 8, 3, 3, 2, 1, 1, 4),  # depthwise, channel multiplier 2, stride 2
    (2, 16, 7, 5, 9, 1, 1, 1, 0, 1, 1),  # 1x1
    (1, 3, 9, 8, 5, 4, 2, 1, "same", 1, 1),  # even kernel: asymmetric padding
    (1, 3, 9, 8, 5, 3, 3, 1, "same", 2, 1),
    (1, 2, 6, 7, 3, 5, 3, 1, "valid", 1, 1),
    (1, 3, 12, 11, 4, 3, 3, (2, 3), (2, 0), (1, 2), 1),  # pairs
    (1, 3, 19, 17, 8, 7, 7, 2, 3, 1, 1),  # stem-like 7x7/2
    (1, 33, 13, 11, 35, 3, 3, 1, 1, 1, 1),  # channel tails
    (3, 17, 5, 23, 19, 3, 3, 1, 1, 1, 1),
    (1, 2, 2, 2, 3, 3, 3, 1, 1, 1, 1),  # kernel larger than the input, fits with padding
    (1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1),
    (1, 64, 6, 6, 32, 3, 3, 1, 1, 1, 1),
]


def conv_case_id(case):
    n, c, h, w, k, kh, kw, s, p, d, g = case
    return f"n{n}c{c}h{h}w{w}k{k}_{kh}x{kw}_s{s}p{p}d{d}g{g}".replace(" ", "")


def make_conv(case, dtype, rng):
    n, c, h, w, k, kh, kw, stride, padding, dilation, groups = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((k, c // groups, kh, kw)).astype(dtype)
    bias = rng.standard_normal(k).astype(dtype)
    return x, wt, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def conv_problem(impl, case, dtype, rng):
    """Inputs of a CONV_CASES case, skipping stages limited to smaller problems.

    Returns x, w, bias, the conv keyword arguments, and the reduction length per output
    (C/groups * kH * kW, +1 for the bias term) that scales the error bound.
    """
    x, wt, bias, kw = make_conv(case, dtype, rng)
    plan = check_conv2d(x, wt, None, **kw)
    if too_big(impl, conv2d_flops(x.shape, wt.shape, plan.out_shape)):
        pytest.skip(f"{impl.name} is limited to {impl.max_flops:.0e} FLOPs")
    return x, wt, bias, kw, wt[0].size + 1


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", cpu_impls("matmul"), ids=impl_id)
def test_matmul_matches_oracle(impl, shape, dtype, rng):
    m, k, n = shape
    if too_big(impl, 2 * m * n * k):
        pytest.skip(f"{impl.name} is limited to {impl.max_flops:.0e} FLOPs")
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    got = fastops.matmul(a, b, backend=impl.backend, stage=impl.stage)
    assert_close(got, oracle.matmul(a, b), oracle.matmul(np.abs(a), np.abs(b)), k, dtype,
                 impl.name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
@pytest.mark.parametrize("impl", cpu_impls("conv2d"), ids=impl_id)
def test_conv2d_matches_oracle(impl, case, dtype, rng):
    x, wt, bias, kw, reduction = conv_problem(impl, case, dtype, rng)
    for b in (None, bias):
        got = fastops.conv2d(x, wt, b, **kw, backend=impl.backend, stage=impl.stage)
        assert_close(got, oracle.conv2d(x, wt, b, **kw),
                     oracle.conv2d(x, wt, b, **kw, absolute=True), reduction, dtype, impl.name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CONV_CASES, ids=conv_case_id)
@pytest.mark.parametrize("impl", cpu_impls("conv2d_bias_relu"), ids=impl_id)
def test_conv2d_bias_relu_matches_oracle(impl, case, dtype, rng):
    x, wt, bias, kw, reduction = conv_problem(impl, case, dtype, rng)
    got = fastops.conv2d_bias_relu(x, wt, bias, **kw, backend=impl.backend, stage=impl.stage)
    ref = oracle.conv2d(x, wt, bias, **kw, relu=True)
    if ref.size >= 16:
        assert (ref == 0).any() and (ref > 0).any(), "the case must exercise both sides of ReLU"
    assert_close(got, ref, oracle.conv2d(x, wt, bias, **kw, absolute=True), reduction, dtype,
                 impl.name)
    assert (np.asarray(got) >= 0).all()


@pytest.mark.parametrize("impl", cpu_impls("matmul"), ids=impl_id)
def test_matmul_propagates_nan_and_inf(impl, rng):
    a = rng.standard_normal((9, 21)).astype(np.float32)
    b = rng.standard_normal((21, 18)).astype(np.float32)
    a[2, 5] = np.nan
    b[7, 11] = np.inf
    b[3, 4] = -np.inf
    got = fastops.matmul(a, b, backend=impl.backend, stage=impl.stage)
    with np.errstate(invalid="ignore"):
        ref = oracle.matmul(a, b)
        abs_ref = oracle.matmul(np.abs(a), np.abs(b))
    assert_close(got, ref, abs_ref, 21, np.float32, impl.name)


@pytest.mark.parametrize("op", ["conv2d", "conv2d_bias_relu"])
def test_conv_propagates_nan(op, rng):
    for impl in cpu_impls(op):
        x = rng.standard_normal((1, 4, 9, 9)).astype(np.float32)
        w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
        bias = rng.standard_normal(6).astype(np.float32)
        x[0, 1, 4, 4] = np.nan
        fn = getattr(fastops, op)
        got = fn(x, w, bias, padding=1, backend=impl.backend, stage=impl.stage)
        ref = oracle.conv2d(x, w, bias, padding=1, relu=op == "conv2d_bias_relu")
        assert np.array_equal(np.isnan(got), np.isnan(ref)), impl.name
        assert np.isnan(got).sum() == 6 * 9, impl.name  # 3x3 neighbourhood, all 6 channels
