"""Run the benchmark: pick entries from the registry, time them shape by shape, derive metrics.

Which entries: every registered implementation of the requested ops (optionally narrowed by
backend and stage names), plus two baselines as extra rows that are *not* registry entries:
PyTorch eager (``torch.matmul``, ``F.conv2d``, ``F.conv2d`` + bias + ``relu_``) when torch is
importable. NumPy is already in the registry as the ``numpy`` backend and serves as the NumPy
baseline.

How kernels are called: directly, as ``impl.kernel(*args)`` with the arguments prepared once
per (entry, shape): inputs validated and C-contiguous, ``out`` allocated once and reused (every
kernel overwrites all of ``out``, so reuse is safe, and allocation stays out of the timing).
This is the kernel's time alone, without the public API's validation and allocation (a few
microseconds, which would dominate the smallest shapes). ``out`` starts as NaN, and after
timing it is checked against the float64 oracle with :func:`fastops.testing.assert_close`, so a
kernel that skipped part of ``out`` or computed garbage is reported as wrong, not as fast.

What is skipped (and said so in the report): an implementation whose ``max_flops`` is below
the shape's FLOPs (slow stages such as naive loops), or that does not support the dtype.
Nothing is extrapolated.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from .. import registry
from . import shapes as shapes_mod
from .timing import Timed, stats_of, time_interleaved

TORCH_SUMMARY = {
    "matmul": "torch.matmul, eager (MKL sgemm)",
    "conv2d": "torch.nn.functional.conv2d, eager (oneDNN)",
    "conv2d_bias_relu": "F.conv2d(x, w, bias) then relu_, eager (oneDNN)",
}


@dataclass
class Entry:
    """One row of the report: an (op, shape, backend, stage)."""

    case: shapes_mod.Case
    backend: str
    stage: str
    summary: str
    kind: str = "fastops"  # 'fastops' (registry) or 'baseline' (torch)
    impl: registry.Implementation | None = None
    position: int = 0
    device: str = "cpu"
    status: str = "pending"  # ok | skipped | error | wrong
    reason: str = ""
    stats: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @property
    def pool(self) -> str:
        if self.device == "gpu":
            return "gpu"
        return {"numpy": "blas", "torch": "torch"}.get(self.backend, "omp")

    def as_dict(self) -> dict:
        d = {"op": self.case.op, "shape": self.case.name, "backend": self.backend,
             "stage": self.stage, "kind": self.kind, "device": self.device,
             "position": self.position, "summary": self.summary, "status": self.status,
             "reason": self.reason}
        d.update(self.stats)
        d.update(self.metrics)
        return d


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def select(ops, backends=None, stages=None, dtype="float32", mode="quick",
           with_torch=True) -> list[Entry]:
    """Every entry to run, in report order (op, shape, then registry order, baselines last)."""
    entries = []
    for op in ops:
        impls = [i for i in registry.implementations(op)
                 if (not backends or i.backend in backends or i.backend == "numpy")
                 and (not stages or i.stage in stages or i.backend == "numpy")]
        for case in shapes_mod.cases(op, mode):
            for impl in impls:
                e = Entry(case, impl.backend, impl.stage, impl.summary, impl=impl,
                          position=impl.position, device=impl.device)
                if not impl.supports(dtype):
                    e.status, e.reason = "skipped", f"dtype {dtype} not supported"
                elif not impl.fits(case.flops):
                    e.status = "skipped"
                    e.reason = f"{case.flops:.3g} FLOPs > max_flops {impl.max_flops:.3g}"
                entries.append(e)
            if with_torch:
                entries.append(Entry(case, "torch", "eager", TORCH_SUMMARY[op], kind="baseline"))
    return entries


# ---------------------------------------------------------------------------------- callables
def make_call(entry: Entry, arrays: dict, dtype):
    """(call, result) for one entry: call() runs it once; result() returns the output (NumPy)."""
    case = entry.case
    if entry.backend == "torch":
        import torch
        import torch.nn.functional as F

        t = {k: torch.from_numpy(v) for k, v in arrays.items()}
        if case.op == "matmul":
            out = torch.empty(case.out_shape, dtype=t["a"].dtype)

            def call():
                torch.matmul(t["a"], t["b"], out=out)

            return call, lambda: out.numpy()
        kw = case.conv_kwargs()
        holder = {}
        if case.op == "conv2d":
            def call():
                holder["out"] = F.conv2d(t["x"], t["w"], None, **kw)
        else:
            def call():
                holder["out"] = torch.relu_(F.conv2d(t["x"], t["w"], t["bias"], **kw))
        return call, lambda: holder["out"].numpy()

    impl = entry.impl
    if entry.device == "gpu":
        import cupy

        dev = {k: cupy.asarray(v) for k, v in arrays.items()}
        out = cupy.full(case.out_shape, cupy.nan, dtype=dtype)
        args = case.kernel_args(dev, out)
        kernel = impl.kernel
        return (lambda: kernel(*args)), (lambda: cupy.asnumpy(out))
    out = np.full(case.out_shape, np.nan, dtype=dtype)
    args = case.kernel_args(arrays, out)
    kernel = impl.kernel
    return (lambda: kernel(*args)), (lambda: out)


def _reference(case: shapes_mod.Case, arrays: dict):
    """float64 oracle result, its |inputs| scale, and the reduction length (for assert_close)."""
    from .. import oracle

    if case.op == "matmul":
        a, b = arrays["a"], arrays["b"]
        return oracle.matmul(a, b), oracle.matmul(np.abs(a), np.abs(b)), a.shape[1]
    s = case.conv
    kw = case.conv_kwargs()
    bias = arrays.get("bias")
    relu = case.op == "conv2d_bias_relu"
    ref = oracle.conv2d(arrays["x"], arrays["w"], bias, relu=relu, **kw)
    scale = oracle.conv2d(arrays["x"], arrays["w"], bias, absolute=True, **kw)
    return ref, scale, (s.c // s.groups) * s.kh * s.kw + (1 if bias is not None else 0)


# ---------------------------------------------------------------------------------- running
@dataclass
class Settings:
    dtype: str = "float32"
    mode: str = "quick"
    budget_s: float = 0.5
    min_repeats: int = 3
    max_repeats: int = 40
    check: bool = True

    @classmethod
    def for_mode(cls, mode: str, dtype: str = "float32", check: bool = True) -> Settings:
        if mode == "full":
            return cls(dtype, mode, budget_s=2.0, min_repeats=5, max_repeats=100, check=check)
        if mode == "tiny":
            return cls(dtype, mode, budget_s=0.01, min_repeats=2, max_repeats=3, check=check)
        return cls(dtype, mode, check=check)


def set_torch_threads():
    import torch

    try:
        import numba

        n = numba.config.NUMBA_NUM_THREADS
    except ImportError:
        n = os.cpu_count() or 1
    torch.set_num_threads(n)  # the same thread count as the fastops OpenMP kernels
    return n


def run_entries(entries: list[Entry], settings: Settings, progress=None) -> None:
    """Time every pending entry, shape by shape (entries of one shape interleaved)."""
    from ..testing import assert_close

    if any(e.backend == "torch" for e in entries):
        set_torch_threads()
    by_case: dict = {}
    for e in entries:
        by_case.setdefault(e.case, []).append(e)
    for case, group in by_case.items():
        todo = [e for e in group if e.status == "pending"]
        if progress:
            progress.start_case(case, len(todo))
        if not todo:
            continue
        arrays = case.inputs(settings.dtype)
        timed, results = [], {}
        for e in todo:
            try:
                call, result = make_call(e, arrays, settings.dtype)
            except Exception as exc:  # noqa: BLE001 - reported as an error row
                e.status, e.reason = "error", f"{type(exc).__name__}: {exc}"
                if progress:
                    progress.advance()
                    progress.advance()
                continue
            t = Timed(e, _guarded(call, e), pool=e.pool, gpu=e.device == "gpu",
                      budget_s=settings.budget_s)
            timed.append(t)
            results[id(e)] = result
        time_interleaved(timed, min_repeats=settings.min_repeats,
                         max_repeats=settings.max_repeats,
                         on_warm=(lambda t: progress.advance()) if progress else None)
        ref = _reference(case, arrays) if settings.check else None
        for t in timed:
            e = t.key
            if e.status == "error" or not t.samples_ms:
                e.status, e.reason = "error", e.reason or "no timing samples"
                if progress:
                    progress.advance()
                continue
            e.stats = stats_of(t).as_dict()
            e.status = "ok"
            if ref is not None:
                try:
                    assert_close(results[id(e)](), ref[0], ref[1], ref[2], settings.dtype,
                                 what=f"{case.op}/{e.backend}/{e.stage} {case.name}")
                except AssertionError as exc:
                    e.status, e.reason = "wrong", f"result check failed: {exc}"
            if progress:
                progress.advance()


def _guarded(call, entry: Entry):
    """A call that records the first exception on the entry and becomes a no-op afterwards."""
    def guarded():
        if entry.status == "error":
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - reported as an error row
            entry.status, entry.reason = "error", f"{type(exc).__name__}: {exc}"

    return guarded


# ---------------------------------------------------------------------------------- metrics
def derive_metrics(entries: list[Entry], peaks: dict, dtype: str) -> None:
    """GFLOP/s, % of measured peak, intensity, speedups vs previous stage / naive / baselines."""
    itemsize = np.dtype(dtype).itemsize
    peak = peaks.get("fp32_gflops" if dtype == "float32" else "fp64_gflops")
    ok = {(e.case, e.backend, e.stage): e for e in entries if e.status == "ok"}
    ladders: dict = {}
    for impl in registry.implementations():
        ladders.setdefault((impl.op, impl.backend), []).append(impl.stage)

    def median(case, backend, stage):
        e = ok.get((case, backend, stage))
        return e.stats["median_ms"] if e else None

    def ratio(other, mine):
        return None if other is None or mine is None else other / mine

    for e in entries:
        case = e.case
        m = {"flops": case.flops, "intensity": case.intensity(itemsize), "gflops": None,
             "pct_peak": None, "speedup_prev": None, "speedup_naive": None,
             "vs_numpy": None, "vs_torch": None}
        if e.status == "ok":
            med = e.stats["median_ms"]
            m["gflops"] = case.flops / (med * 1e-3) / 1e9
            m["pct_peak"] = 100 * m["gflops"] / peak if peak else None
            ladder = ladders.get((case.op, e.backend), [])
            if e.kind == "fastops" and e.stage in ladder:
                i = ladder.index(e.stage)
                if i > 0:
                    m["speedup_prev"] = ratio(median(case, e.backend, ladder[i - 1]), med)
                    m["speedup_naive"] = ratio(median(case, e.backend, ladder[0]), med)
            numpy_stages = ladders.get((case.op, "numpy"), [])
            if numpy_stages:
                m["vs_numpy"] = ratio(median(case, "numpy", numpy_stages[-1]), med)
            m["vs_torch"] = ratio(median(case, "torch", "eager"), med)
        e.metrics = m


def skipped_notes(entries: list[Entry]) -> list[str]:
    """One line per (op, backend, stage) with skips: 'numba/naive: run at N=256 only (…)'."""
    notes = []
    groups: dict = {}
    for e in entries:
        groups.setdefault((e.case.op, e.backend, e.stage), []).append(e)
    for (op, backend, stage), group in groups.items():
        skipped = [e for e in group if e.status == "skipped"]
        if not skipped:
            continue
        ran = [e.case.name for e in group if e.status in ("ok", "wrong")]
        where = f"run at {', '.join(ran)} only" if ran else "not run at any shape"
        notes.append(f"{op} {backend}/{stage}: {where} ({skipped[0].reason}; skipped "
                     f"{', '.join(e.case.name for e in skipped)})")
    return notes


def best_per_case(entries: list[Entry]) -> list[dict]:
    """For the summary: per (op, shape) the fastest fastops entry and the baselines."""
    rows = []
    by_case: dict = {}
    for e in entries:
        by_case.setdefault(e.case, []).append(e)
    for case, group in by_case.items():
        mine = [e for e in group if e.status == "ok" and e.kind == "fastops"
                and e.backend != "numpy"]
        best = min(mine, key=lambda e: e.stats["median_ms"]) if mine else None

        def base(backend):
            found = [e for e in group if e.backend == backend and e.status == "ok"]
            return found[-1].stats["median_ms"] if found else math.nan

        rows.append({"op": case.op, "shape": case.name, "best": best,
                     "numpy_ms": base("numpy"), "torch_ms": base("torch")})
    return rows
