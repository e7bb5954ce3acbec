"""Concurrent calls from several Python threads are safe and correct, for every backend."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastops
from fastops import oracle
from fastops.testing import assert_close

from conftest import cpu_impls, impl_id

THREADS = 6


def fast(op):
    return [i for i in cpu_impls(op) if i.max_flops is None]


@pytest.mark.parametrize("impl", fast("matmul"), ids=impl_id)
def test_matmul_concurrent_threads(impl):
    rng = np.random.default_rng(7)
    problems = [(rng.standard_normal((37 + t, 91)).astype(np.float32),
                 rng.standard_normal((91, 45 + 2 * t)).astype(np.float32)) for t in range(THREADS)]

    def work(t):
        a, b = problems[t]
        return [fastops.matmul(a, b, backend=impl.backend, stage=impl.stage) for _ in range(8)]

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(work, range(THREADS)))
    for (a, b), outs in zip(problems, results):
        for got in outs:
            assert_close(got, oracle.matmul(a, b), oracle.matmul(np.abs(a), np.abs(b)), 91,
                         np.float32, impl.name)


@pytest.mark.parametrize("impl", fast("conv2d_bias_relu"), ids=impl_id)
def test_conv_concurrent_threads(impl):
    rng = np.random.default_rng(8)
    # Even threads: small channel counts (the Cython implicit GEMM); odd threads: 32 -> 32
    # channels on 14-wide rows (the Cython ocvec variant, its per-call scratch buffers).
    shapes = [((1, 8, 12 + t, 11), (10, 8, 3, 3)) if t % 2 == 0
              else ((1, 32, 12 + t, 14), (32, 32, 3, 3)) for t in range(THREADS)]
    problems = [(rng.standard_normal(xs).astype(np.float32),
                 rng.standard_normal(ws).astype(np.float32),
                 rng.standard_normal(ws[0]).astype(np.float32)) for xs, ws in shapes]

    def work(t):
        x, w, b = problems[t]
        return [fastops.conv2d_bias_relu(x, w, b, padding=1, backend=impl.backend,
                                         stage=impl.stage) for _ in range(6)]

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(work, range(THREADS)))
    for (x, w, b), outs in zip(problems, results):
        ref = oracle.conv2d(x, w, b, padding=1, relu=True)
        abs_ref = oracle.conv2d(x, w, b, padding=1, absolute=True)
        for got in outs:
            assert_close(got, ref, abs_ref, w[0].size + 1, np.float32, impl.name)
