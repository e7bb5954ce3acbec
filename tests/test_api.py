"""The public API contract: numpy.matmul / torch conv2d semantics, layouts, dispatch."""
from __future__ import annotations

import numpy as np
import pytest

import fastops
from fastops import oracle, registry
from fastops.testing import assert_close

from conftest import DTYPES, cpu_impls, impl_id


def best_impls(op):
    """The last (best) stage of each CPU backend: the fast paths users get by default."""
    by_backend = {}
    for impl in cpu_impls(op):
        by_backend[impl.backend] = impl
    return list(by_backend.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shapes", [
    ((5,), (5,)), ((5,), (5, 3)), ((4, 5), (5,)), ((2, 4, 5), (5, 3)), ((4, 5), (3, 5, 2)),
    ((2, 1, 4, 5), (3, 5, 6)), ((3, 4, 5), (3, 5, 6)), ((1, 4, 5), (2, 1, 5, 2)),
], ids=str)
@pytest.mark.parametrize("impl", best_impls("matmul"), ids=impl_id)
def test_matmul_numpy_semantics(impl, shapes, dtype, rng):
    a = rng.standard_normal(shapes[0]).astype(dtype)
    b = rng.standard_normal(shapes[1]).astype(dtype)
    got = fastops.matmul(a, b, backend=impl.backend, stage=impl.stage)
    expected = np.matmul(a, b)
    assert np.shape(got) == expected.shape
    assert_close(got, oracle.matmul(a, b), oracle.matmul(np.abs(a), np.abs(b)), a.shape[-1],
                 dtype, impl.name)


@pytest.mark.parametrize("impl", best_impls("matmul"), ids=impl_id)
def test_matmul_non_contiguous_inputs(impl, rng):
    base_a = rng.standard_normal((40, 60)).astype(np.float32)
    base_b = rng.standard_normal((70, 30)).astype(np.float32)
    layouts = [
        (base_a[::2, 1::2], base_b[:30, ::2]),  # strided views (20, 30) @ (30, 15)
        (np.asfortranarray(base_a[:, :30]), base_b[:30, :25]),  # Fortran order
        (base_a[:30, :25].T, base_b[:25, :30].T),  # transposed views (25, 30) @ (30, 25)
        (base_a[3:, 5:35], base_b[1:31, 2:]),  # offset views
    ]
    for a, b in layouts:
        a_before, b_before = a.copy(), b.copy()
        got = fastops.matmul(a, b, backend=impl.backend, stage=impl.stage)
        assert_close(got, oracle.matmul(a, b), oracle.matmul(np.abs(a), np.abs(b)), a.shape[1],
                     np.float32, impl.name)
        np.testing.assert_array_equal(a, a_before)
        np.testing.assert_array_equal(b, b_before)


@pytest.mark.parametrize("impl", best_impls("matmul"), ids=impl_id)
def test_matmul_empty_and_zero_k(impl):
    for m, k, n in [(0, 4, 3), (3, 4, 0), (3, 0, 5)]:
        a = np.ones((m, k), np.float32)
        b = np.ones((k, n), np.float32)
        got = fastops.matmul(a, b, backend=impl.backend, stage=impl.stage)
        assert got.shape == (m, n) and got.dtype == np.float32
        assert (got == 0).all()
    got = fastops.matmul(np.ones((0, 3, 4)), np.ones((4, 2)), backend=impl.backend,
                         stage=impl.stage)
    assert got.shape == (0, 3, 2)


@pytest.mark.parametrize("op", ["conv2d", "conv2d_bias_relu"])
def test_conv_layouts_unbatched_empty_and_unmodified(op, rng):
    fn = getattr(fastops, op)
    for impl in best_impls(op):
        kw = dict(backend=impl.backend, stage=impl.stage, padding=1)
        x = rng.standard_normal((2, 6, 9, 8)).astype(np.float64)
        w = rng.standard_normal((4, 6, 3, 3)).astype(np.float64)
        bias = rng.standard_normal(4)
        relu = op == "conv2d_bias_relu"
        # NHWC-stored input viewed as NCHW (non-contiguous), Fortran-order weights
        x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        w_f = np.asfortranarray(w)
        saved = [x_nhwc.copy(), w_f.copy(), bias.copy()]
        got = fn(x_nhwc, w_f, bias, **kw)
        ref = oracle.conv2d(x, w, bias, padding=1, relu=relu)
        abs_ref = oracle.conv2d(x, w, bias, padding=1, absolute=True)
        assert_close(got, ref, abs_ref, 55, np.float64, impl.name)
        for before, after in zip(saved, [x_nhwc, w_f, bias]):
            np.testing.assert_array_equal(before, after)
        # unbatched (C, H, W) input -> (K, Ho, Wo), as torch
        got1 = fn(x[1], w, bias, **kw)
        assert got1.shape == (4, 9, 8)
        assert_close(got1, ref[1], abs_ref[1], 55, np.float64, impl.name)
        # empty batch
        empty = fn(np.empty((0, 6, 9, 8)), w, bias, **kw)
        assert empty.shape == (0, 4, 9, 8) and empty.dtype == np.float64


def test_result_dtype_follows_input(rng):
    for dtype in DTYPES:
        a = rng.standard_normal((8, 8)).astype(dtype)
        assert fastops.matmul(a, a).dtype == dtype
        x = rng.standard_normal((1, 2, 5, 5)).astype(dtype)
        w = rng.standard_normal((3, 2, 3, 3)).astype(dtype)
        assert fastops.conv2d(x, w).dtype == dtype
        assert fastops.conv2d_bias_relu(x, w, np.zeros(3, dtype)).dtype == dtype


def test_default_dispatch_picks_the_preferred_backend_and_last_stage():
    for op in registry.OPS:
        impl = fastops.api.choose(op, "cpu", np.float32)
        order = registry.BACKEND_PREFERENCE["cpu"]
        available = [b for b in order if registry.ladder(op, b)]
        assert impl.backend == available[0]
        if op == "conv2d_bias_relu" and impl.backend != "numpy":
            assert impl.stage == "fused"


def test_implementations_lists_every_op_with_summaries():
    impls = fastops.implementations()
    assert {i.op for i in impls} == set(registry.OPS)
    for impl in impls:
        assert impl.summary and "\n" not in impl.summary
        assert impl.lesson, f"{impl.name} has no docstring (its lesson)"
    assert fastops.implementations("conv2d") == [i for i in impls if i.op == "conv2d"]


def test_accepts_lists_and_torch_tensors():
    got = fastops.matmul([[1.0, 2.0]], [[3.0], [4.0]])
    assert isinstance(got, np.ndarray) and got.tolist() == [[11.0]]
    torch = pytest.importorskip("torch", reason="torch is an optional extra")
    a = torch.randn(5, 7)
    b = torch.randn(7, 3)
    got = fastops.matmul(a, b)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), (a @ b).numpy(), rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    bias = torch.randn(4)
    got = fastops.conv2d_bias_relu(x, w, bias, padding=1)
    ref = torch.relu(torch.nn.functional.conv2d(x, w, bias, padding=1))
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_matches_torch_semantics_when_installed(rng):
    torch = pytest.importorskip("torch", reason="torch is an optional extra")
    F = torch.nn.functional
    cases = [dict(stride=2, padding=3), dict(padding="same", dilation=2), dict(padding="same"),
             dict(stride=(1, 2), padding=(0, 2), dilation=(2, 1)), dict(padding="valid")]
    for kw in cases:
        for kh, kwid in [(3, 3), (4, 2), (7, 7)]:
            if kw.get("padding") == "same" and kw.get("dilation") == 2 and kh == 7:
                continue
            x = rng.standard_normal((2, 4, 15, 14))
            w = rng.standard_normal((6, 2, kh, kwid))
            bias = rng.standard_normal(6)
            got = fastops.conv2d(x, w, bias, groups=2, **kw)
            ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias),
                           groups=2, **kw).numpy()
            assert got.shape == ref.shape, (kw, kh, kwid)
            np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("op", ["matmul", "conv2d", "conv2d_bias_relu"])
def test_read_only_inputs(op, rng):
    """Read-only buffers (np.load(mmap_mode='r'), broadcast views, frozen weights) work."""
    for impl in cpu_impls(op):
        if op == "matmul":
            a = rng.standard_normal((9, 13)).astype(np.float32)
            b = rng.standard_normal((13, 7)).astype(np.float32)
            a.setflags(write=False)
            b.setflags(write=False)
            got = fastops.matmul(a, b, backend=impl.backend, stage=impl.stage)
            assert_close(got, oracle.matmul(a, b), oracle.matmul(np.abs(a), np.abs(b)), 13,
                         np.float32, impl.name)
            continue
        x = rng.standard_normal((1, 3, 7, 6)).astype(np.float32)
        w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
        bias = rng.standard_normal(4).astype(np.float32)
        for arr in (x, w, bias):
            arr.setflags(write=False)
        relu = op == "conv2d_bias_relu"
        got = getattr(fastops, op)(x, w, bias, padding=1, backend=impl.backend, stage=impl.stage)
        assert_close(got, oracle.conv2d(x, w, bias, padding=1, relu=relu),
                     oracle.conv2d(x, w, bias, padding=1, absolute=True), 28, np.float32,
                     impl.name)
