"""pytest-benchmark suites over the registry (not part of the normal test run).

    pytest benchmarks/ --benchmark-only                    # the quick shape set, float32
    pytest benchmarks/ --benchmark-only --fastops-set full --fastops-dtype float64

One benchmark group per (op, shape), one entry per registered (backend, stage), plus the NumPy
backend and a PyTorch eager baseline when torch is importable. Shapes come from
:mod:`fastops.bench.shapes` and entries from :func:`fastops.bench.runner.select`, exactly as
``fastops bench`` uses them; stages whose ``max_flops`` is below a shape's FLOPs are skipped.
"""
from __future__ import annotations

import os

# Before NumPy / OpenMP load: the same quiet-pool settings `fastops bench` uses (see
# fastops.cli.BENCH_ENV for why and what was measured); set them yourself to override.
_BENCH_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4", "GOMP_SPINCOUNT": "30000"}
for _key, _value in _BENCH_ENV.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402

from fastops.bench import runner  # noqa: E402
from fastops.cli import BENCH_ENV  # noqa: E402

assert BENCH_ENV == _BENCH_ENV, "keep benchmarks/conftest.py in step with fastops.cli.BENCH_ENV"


def pytest_addoption(parser):
    group = parser.getgroup("fastops")
    group.addoption("--fastops-set", default="quick", choices=("tiny", "quick", "full"),
                    help="shape set of fastops.bench.shapes (default: quick)")
    group.addoption("--fastops-dtype", default="float32", choices=("float32", "float64"))
    group.addoption("--fastops-no-torch", action="store_true", help="no PyTorch baseline")


def pytest_generate_tests(metafunc):
    if "bench_entry" not in metafunc.fixturenames:
        return
    config = metafunc.config
    entries = runner.select(metafunc.module.OPS, dtype=config.getoption("--fastops-dtype"),
                            mode=config.getoption("--fastops-set"),
                            with_torch=not config.getoption("--fastops-no-torch")
                            and runner.torch_available())
    params = []
    for e in entries:
        marks = [pytest.mark.skip(reason=e.reason)] if e.status == "skipped" else []
        if e.device == "gpu":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(e, marks=marks,
                                   id=f"{e.case.op}[{e.case.name}]-{e.backend}-{e.stage}"))
    metafunc.parametrize("bench_entry", params)


@pytest.fixture
def bench_dtype(request):
    return request.config.getoption("--fastops-dtype")


def run_benchmark(benchmark, entry, dtype):
    """Warm up (first call timed apart), one untimed call, then let pytest-benchmark time it."""
    import time

    if entry.backend == "torch":
        runner.set_torch_threads()
    call, _result = runner.make_call(entry, entry.case.inputs(dtype), dtype)
    if entry.device == "gpu":
        import cupy

        kernel_call = call

        def call():
            kernel_call()
            cupy.cuda.Device().synchronize()

    t0 = time.perf_counter()
    call()  # JIT compile / cache load / pool start-up
    first_call_ms = (time.perf_counter() - t0) * 1e3
    call()  # untimed: the previous test may have used another library's thread pool
    benchmark.group = f"{entry.case.op} {entry.case.name}"
    benchmark.extra_info.update(op=entry.case.op, shape=entry.case.name, backend=entry.backend,
                                stage=entry.stage, flops=entry.case.flops,
                                first_call_ms=first_call_ms, summary=entry.summary)
    benchmark(call)
