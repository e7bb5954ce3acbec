"""Timing done right, for kernels that run for microseconds to seconds on a noisy shared machine.

How one set of competitors (every entry of one shape) is timed, by :func:`time_interleaved`:

1. **First call, timed separately** (``first_call_ms``): it includes Numba's JIT compilation or
   cache load, CuPy's kernel compilation, thread-pool start-up. It is reported, never mixed in.
2. A second untimed call estimates the per-call time ``t``. Calls shorter than
   ``target_sample_s`` are batched: one *sample* is ``number`` back-to-back calls, divided.
3. **Interleaved round-robin**: rounds go A B C A B C …, so drift (another process, clock
   changes) hits every competitor alike. Each entry gets ``repeats`` samples, between
   ``min_repeats`` and ``max_repeats``, as many as its ``budget_s`` allows; a slow entry takes
   part in fewer rounds, spread evenly across the whole run rather than bunched at the start.
4. **Thread-pool switches**: within a round the entries are grouped by the thread pool they use
   (NumPy's OpenBLAS, the OpenMP pool of Numba/Cython, PyTorch's own OpenMP). Two spinning
   pools on 2 cores stall each other for a scheduler tick (~4–8 ms, MACHINE_NOTES), so after a
   switch one untimed call lets the previous pool go to sleep before timing starts.
5. Statistics: median (the headline), min, inter-quartile range (the noise), over samples.
   GPU entries are timed with CUDA events around the call and a synchronisation per sample.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Timed:
    """Something to time: ``call()`` runs it once; ``pool`` names its thread pool ('blas',
    'omp', 'torch', 'gpu'); ``gpu`` selects CUDA-event timing."""

    key: object
    call: Callable[[], object]
    pool: str = "omp"
    gpu: bool = False
    budget_s: float = 0.5
    # filled in by time_interleaved
    first_call_ms: float = math.nan
    samples_ms: list = field(default_factory=list)
    number: int = 1
    estimate_s: float = math.nan


@dataclass(frozen=True)
class Stats:
    first_call_ms: float
    median_ms: float
    min_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int
    number: int

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    def as_dict(self) -> dict:
        return {"first_call_ms": self.first_call_ms, "median_ms": self.median_ms,
                "min_ms": self.min_ms, "q1_ms": self.q1_ms, "q3_ms": self.q3_ms,
                "iqr_ms": self.iqr_ms, "repeats": self.repeats, "number": self.number}


def stats_of(t: Timed) -> Stats:
    s = np.asarray(t.samples_ms, dtype=np.float64)
    q1, med, q3 = np.percentile(s, [25, 50, 75])
    return Stats(t.first_call_ms, float(med), float(s.min()), float(q1), float(q3), len(s),
                 t.number)


def _gpu_sync():
    import cupy

    cupy.cuda.Device().synchronize()


def _run_once_s(t: Timed, number: int = 1) -> float:
    """Wall (CPU) or event (GPU) seconds for ``number`` back-to-back calls."""
    if t.gpu:
        import cupy

        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        _gpu_sync()
        start.record()
        for _ in range(number):
            t.call()
        end.record()
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / 1e3
    t0 = time.perf_counter()
    for _ in range(number):
        t.call()
    return time.perf_counter() - t0


def time_interleaved(entries: list[Timed], *, min_repeats: int = 3, max_repeats: int = 50,
                     target_sample_s: float = 2e-3, on_warm: Callable | None = None,
                     on_sample: Callable | None = None) -> None:
    """Time every entry (see the module docstring); fills ``first_call_ms``/``samples_ms``.

    ``on_warm(entry)`` is called after each entry's first call, ``on_sample()`` after each
    timed sample (progress reporting).
    """
    # Group by pool so a round switches pools as rarely as possible (stable order otherwise).
    pools = list(dict.fromkeys(t.pool for t in entries))
    entries = sorted(entries, key=lambda t: pools.index(t.pool))

    previous_pool = None
    for t in entries:
        t.first_call_ms = _run_once_s(t) * 1e3  # compile / cache load / pool start-up
        t.estimate_s = max(_run_once_s(t), 1e-7)
        previous_pool = t.pool
        if on_warm:
            on_warm(t)
    plan = {}
    for t in entries:
        t.number = max(1, math.ceil(target_sample_s / t.estimate_s))
        sample_s = t.number * t.estimate_s
        plan[id(t)] = int(min(max_repeats, max(min_repeats, t.budget_s // sample_s)))
    rounds = max(plan.values(), default=0)

    for r in range(rounds):
        for t in entries:
            want = plan[id(t)]
            # Take part in round r if the evenly spread schedule has a sample here.
            if (r + 1) * want // rounds == r * want // rounds:
                continue
            if t.pool != previous_pool:
                _run_once_s(t)  # untimed: let the previous library's pool go quiet
                previous_pool = t.pool
            t.samples_ms.append(_run_once_s(t, t.number) * 1e3 / t.number)
            if on_sample:
                on_sample()

