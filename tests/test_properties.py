"""Property tests (hypothesis): random shapes and conv hyper-parameters against the oracle."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastops
from fastops import oracle
from fastops.testing import assert_close
from fastops.validation import conv_output_size

from conftest import cpu_impls, impl_id

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def fast_impls(op):
    """Every non-naive CPU stage (naive loops are covered on the fixed table)."""
    return [i for i in cpu_impls(op) if i.max_flops is None]


@pytest.mark.parametrize("impl", fast_impls("matmul"), ids=impl_id)
@SETTINGS
@given(m=st.integers(1, 80), k=st.integers(1, 300), n=st.integers(1, 80),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31))
def test_matmul_random_shapes(impl, m, k, n, dtype, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    got = fastops.matmul(a, b, backend=impl.backend, stage=impl.stage)
    assert_close(got, oracle.matmul(a, b), oracle.matmul(np.abs(a), np.abs(b)), k, dtype,
                 impl.name)


@st.composite
def conv_problems(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = draw(st.booleans()) and groups == 1
    c = draw(st.integers(1, 6)) * groups
    k = draw(st.integers(1, 6)) * groups
    if depthwise:
        groups, k = c, c * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    h = draw(st.integers(1, 14))
    w = draw(st.integers(1, 14))
    # Keep only problems with a non-empty output (the rest are validation's business).
    if conv_output_size(h, kh, stride[0], padding[0], padding[0], dilation[0]) < 1:
        h = dilation[0] * (kh - 1) + 1
    if conv_output_size(w, kw, stride[1], padding[1], padding[1], dilation[1]) < 1:
        w = dilation[1] * (kw - 1) + 1
    n = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return (n, c, h, w, k, kh, kw), dict(stride=stride, padding=padding, dilation=dilation,
                                         groups=groups), dtype


@pytest.mark.parametrize("impl", fast_impls("conv2d_bias_relu"), ids=impl_id)
@SETTINGS
@given(problem=conv_problems(), seed=st.integers(0, 2**31))
def test_conv_bias_relu_random_problems(impl, problem, seed):
    (n, c, h, w, k, kh, kw), kwargs, dtype = problem
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((k, c // kwargs["groups"], kh, kw)).astype(dtype)
    bias = rng.standard_normal(k).astype(dtype)
    got = fastops.conv2d_bias_relu(x, wt, bias, **kwargs, backend=impl.backend, stage=impl.stage)
    assert_close(got, oracle.conv2d(x, wt, bias, **kwargs, relu=True),
                 oracle.conv2d(x, wt, bias, **kwargs, absolute=True),
                 wt[0].size + 1, dtype, impl.name)
