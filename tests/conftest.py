"""Shared test fixtures: the registry is the source of what to test."""
from __future__ import annotations

import numpy as np
import pytest

import fastops
from fastops import registry

DTYPES = [np.float32, np.float64]


def cpu_impls(op):
    return [i for i in registry.implementations(op) if i.device == "cpu"]


def impl_id(impl):
    return f"{impl.backend}-{impl.stage}"


def too_big(impl, flops) -> bool:
    return not impl.fits(flops)


def run_concurrently(work, threads: int = 4) -> None:
    """Run ``work()`` in ``threads`` Python threads at once; re-raise the first failure."""
    import threading

    errors = []

    def guarded():
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - reported by the calling thread
            errors.append(exc)

    pool = [threading.Thread(target=guarded) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def pytest_report_header(config):
    from fastops import backends

    lines = [f"fastops backends: {', '.join(backends.available())}"]
    for name, why in backends.unavailable().items():
        lines.append(f"  unavailable: {name}: {why[:120]}")
    lines.append(f"implementations: {len(fastops.implementations())}")
    return lines
