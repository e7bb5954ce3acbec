"""Bad input gets a clear ValueError/TypeError naming expected and received — before any kernel.

The table is run against every registered backend's best stage (so a kernel never sees bad
input), and against a poisoned registry entry that fails the test if any kernel is reached.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastops

F32 = np.float32
X = np.zeros((1, 4, 8, 8), F32)
W = np.zeros((6, 4, 3, 3), F32)
B = np.zeros(6, F32)

MATMUL_BAD = [
    ((np.zeros((2, 3), np.int64), np.zeros((3, 2), np.int64)), TypeError, "int64"),
    ((np.zeros((2, 3), np.float16), np.zeros((3, 2), np.float16)), TypeError, "float16"),
    ((np.zeros((2, 3), np.complex64), np.zeros((3, 2), np.complex64)), TypeError, "complex64"),
    ((np.zeros((2, 3), object), np.zeros((3, 2), object)), TypeError, "object"),
    ((np.zeros((2, 3), F32), np.zeros((3, 2), np.float64)), TypeError, "float64"),
    ((np.zeros((2, 3), F32), np.zeros((4, 2), F32)), ValueError, "K=3"),
    ((np.float32(1.0), np.zeros((3, 2), F32)), ValueError, "ndim=0"),
    ((np.zeros((2, 2, 3), F32), np.zeros((3, 3, 2), F32)), ValueError, "broadcast"),
    (("abc", np.zeros((3, 2), F32)), TypeError, "str"),
    ((None, np.zeros((3, 2), F32)), TypeError, "NoneType"),
]

CONV_BAD = [
    (dict(x=X.astype(np.int32)), TypeError, "int32"),
    (dict(x=X.astype(np.float16), w=W.astype(np.float16)), TypeError, "float16"),
    (dict(w=W.astype(np.float64)), TypeError, "float64"),
    (dict(bias=B.astype(np.float64)), TypeError, "float64"),
    (dict(x=X[0, 0]), ValueError, "ndim=2"),
    (dict(w=W[0]), ValueError, "ndim=3"),
    (dict(w=np.zeros((6, 3, 3, 3), F32)), ValueError, "got 3"),
    (dict(groups=3, w=np.zeros((6, 1, 3, 3), F32)), ValueError, "divide the input channels C=4"),
    (dict(groups=4, w=np.zeros((6, 1, 3, 3), F32)), ValueError, "output channels K=6"),
    (dict(groups=0), ValueError, "positive"),
    (dict(groups=1.5), TypeError, "1.5"),
    (dict(bias=np.zeros(5, F32)), ValueError, "(6,)"),
    (dict(stride=0), ValueError, "stride"),
    (dict(stride=(1, -1)), ValueError, "stride"),
    (dict(stride=1.0), TypeError, "stride"),
    (dict(stride=True), TypeError, "stride"),
    (dict(dilation=0), ValueError, "dilation"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(padding=(1, 2, 3)), TypeError, "padding"),
    (dict(padding="full"), ValueError, "'full'"),
    (dict(padding="same", stride=2), ValueError, "stride 1"),
    (dict(w=np.zeros((6, 4, 11, 11), F32)), ValueError, "kernel larger"),
    (dict(w=np.zeros((6, 4, 3, 3), F32), dilation=5), ValueError, "kernel larger"),
    (dict(x=np.zeros((1, 0, 8, 8), F32), w=np.zeros((6, 0, 3, 3), F32)), ValueError, "non-empty"),
]


def _best_backends(op):
    backends = sorted({i.backend for i in fastops.implementations(op) if i.device == "cpu"})
    return [None] + backends


@pytest.mark.parametrize("backend", _best_backends("matmul"), ids=str)
@pytest.mark.parametrize("args,error,text", MATMUL_BAD, ids=lambda v: str(v)[:40])
def test_matmul_bad_input(args, error, text, backend):
    with pytest.raises(error, match=None) as info:
        fastops.matmul(*args, backend=backend)
    assert text in str(info.value), str(info.value)


@pytest.mark.parametrize("op", ["conv2d", "conv2d_bias_relu"])
@pytest.mark.parametrize("change,error,text", CONV_BAD, ids=lambda v: str(v)[:40])
def test_conv_bad_input(op, change, error, text):
    for backend in _best_backends(op):
        args = dict(x=X, w=W, bias=B, stride=1, padding=1, dilation=1, groups=1)
        args.update(change)
        with pytest.raises(error) as info:
            getattr(fastops, op)(**args, backend=backend)
        assert text in str(info.value), f"{backend}: {info.value}"


def test_fused_requires_bias():
    with pytest.raises(TypeError, match="bias"):
        fastops.conv2d_bias_relu(X, W, None)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="expected one of") as info:
        fastops.matmul(np.ones((2, 2), F32), np.ones((2, 2), F32), backend="fortran")
    assert "numpy" in str(info.value)
    with pytest.raises(ValueError, match="expected one of") as info:
        fastops.conv2d(X, W, backend="numpy", stage="warp-speed")
    assert "im2col" in str(info.value)
    with pytest.raises(ValueError, match="unknown op"):
        fastops.implementations("fft")


def test_bad_input_never_reaches_a_kernel(monkeypatch):
    """Replace every kernel by one that fails the test; bad calls must still raise cleanly."""
    from dataclasses import replace

    from fastops import registry

    def poisoned(*_args, **_kwargs):
        raise AssertionError("a kernel ran on invalid input")

    fastops.implementations()  # load backends
    monkeypatch.setattr(registry, "_IMPLS", {k: replace(v, kernel=poisoned)
                                             for k, v in registry._IMPLS.items()})
    for args, error, _text in MATMUL_BAD:
        with pytest.raises(error):
            fastops.matmul(*args)
    for change, error, _text in CONV_BAD:
        args = dict(x=X, w=W, bias=B, padding=1)
        args.update(change)
        with pytest.raises(error):
            fastops.conv2d_bias_relu(**args)
