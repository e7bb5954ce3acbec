"""The registry: the single source of implementation names.

Every kernel registers exactly once with its (op, backend, stage) and a one-line summary. Tests,
benchmarks, the CLI and the report all read this registry; nothing else lists stages.

A backend's kernel modules call :func:`register` at import time, so a backend that fails to
import (no compiler output, no CuPy, ...) simply is not here: the registry says what *this*
machine has. :mod:`fastops.backends` does the importing and records why a backend is missing.

Kernel calling conventions (inputs are already validated, C-contiguous, one dtype):

* ``matmul``: ``kernel(a, b, out)`` with ``a`` (M, K), ``b`` (K, N), ``out`` (M, N).
* ``conv2d``: ``kernel(x, w, out, p)`` with ``x`` (N, C, H, W), ``w`` (K, C/groups, kH, kW),
  ``out`` (N, K, Ho, Wo) and ``p`` a :class:`fastops.validation.ConvParams`. No bias: the
  API adds it in a separate pass.
* ``conv2d_bias_relu``: ``kernel(x, w, bias, out, p)``, ``bias`` (K,).

``out`` is freshly allocated by the caller (contents undefined); the kernel overwrites all of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

OPS = ("matmul", "conv2d", "conv2d_bias_relu")

# Best-first preference when the caller does not name a backend (per device).
BACKEND_PREFERENCE = {"cpu": ("cython", "numba", "numpy"), "gpu": ("cupy",)}


@dataclass(frozen=True)
class Implementation:
    """One registered (op, backend, stage)."""

    op: str
    backend: str
    stage: str
    summary: str  # one line: what this stage changes
    kernel: Callable = field(repr=False, compare=False)
    device: str = "cpu"  # "cpu" (NumPy arrays) or "gpu" (CuPy arrays)
    dtypes: tuple = ("float32", "float64")
    # Largest problem (in FLOPs) the stage is practical for; None = no limit. Tests and the
    # benchmark use it to keep slow stages (naive loops) on sizes they can finish.
    max_flops: float | None = None
    position: int = 0  # rank in its (op, backend) ladder, 0 = first stage

    @property
    def name(self) -> str:
        return f"{self.op}/{self.backend}/{self.stage}"

    @property
    def lesson(self) -> str:
        """The stage's docstring: what changed, which bottleneck it removes, what it lacks."""
        import inspect

        return inspect.getdoc(self.kernel) or ""

    def fits(self, flops: float) -> bool:
        """Whether a problem of ``flops`` is within this stage's practical size (max_flops)."""
        return self.max_flops is None or flops <= self.max_flops

    def supports(self, dtype) -> bool:
        import numpy as np

        return np.dtype(dtype).name in self.dtypes


_IMPLS: dict[tuple[str, str, str], Implementation] = {}


def register(op: str, backend: str, stage: str, summary: str, *, device: str = "cpu",
             dtypes: tuple = ("float32", "float64"), max_flops: float | None = None):
    """Decorator: register ``fn`` as the kernel of (op, backend, stage).

    Stages of one (op, backend) must be registered in ladder order (the order of the file).
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if "\n" in summary:
        raise ValueError("a registry summary is one line")

    def decorate(fn: Callable) -> Callable:
        key = (op, backend, stage)
        if key in _IMPLS:
            raise ValueError(f"{op}/{backend}/{stage} is registered twice")
        position = sum(1 for (o, b, _s) in _IMPLS if o == op and b == backend)
        _IMPLS[key] = Implementation(op, backend, stage, summary, fn, device, tuple(dtypes),
                                     max_flops, position)
        return fn

    return decorate


def implementations(op: str | None = None, backend: str | None = None,
                    device: str | None = None) -> list[Implementation]:
    """Registered implementations, grouped by op then backend, each ladder in order."""
    from . import backends

    backends.load_all()
    if op is not None and op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    found = [i for i in _IMPLS.values()
             if (op is None or i.op == op) and (backend is None or i.backend == backend)
             and (device is None or i.device == device)]
    backend_rank = {b: n for n, b in enumerate(BACKEND_PREFERENCE["cpu"][::-1]
                                              + BACKEND_PREFERENCE["gpu"][::-1])}
    return sorted(found, key=lambda i: (OPS.index(i.op), backend_rank.get(i.backend, 99),
                                        i.backend, i.position))


def ladder(op: str, backend: str) -> list[Implementation]:
    """The stages of one (op, backend) in ladder order."""
    return implementations(op, backend)


def check_backend(op: str, backend: str) -> None:
    """ValueError, listing the valid names, unless ``backend`` has stages of ``op`` here."""
    from . import backends

    backends.load_all()
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    available = sorted({b for (o, b, _s) in _IMPLS if o == op})
    if backend not in available:
        missing = backends.unavailable()
        why = f" ({backend} is not available here: {missing[backend]})" if backend in missing else ""
        raise ValueError(f"unknown backend {backend!r} for {op}; expected one of {available}{why}")


def lookup(op: str, backend: str, stage: str) -> Implementation:
    """The implementation of (op, backend, stage); ValueError listing the valid names if none."""
    check_backend(op, backend)
    stages = [i.stage for i in ladder(op, backend)]
    if stage not in stages:
        raise ValueError(f"unknown stage {stage!r} for {op}/{backend}; expected one of {stages}")
    return _IMPLS[(op, backend, stage)]


def derive_unfused_conv_bias_relu(backend: str) -> None:
    """Register conv2d_bias_relu for each conv2d stage of ``backend`` as three separate passes.

    conv2d_bias_relu/<backend>/<stage> = conv2d/<backend>/<stage>, then a bias pass, then a
    ReLU pass over the output. These are the un-fused comparison points for the ``fused``
    stage, which the backend registers itself afterwards (so it comes last in the ladder).
    """
    from .epilogue import add_bias_, relu_

    for impl in [i for i in _IMPLS.values() if i.op == "conv2d" and i.backend == backend]:
        conv = impl.kernel

        def unfused(x, w, bias, out, p, _conv=conv):
            _conv(x, w, out, p)
            add_bias_(out, bias)
            relu_(out)

        unfused.__doc__ = (f"conv2d/{backend}/{impl.stage}, then a separate bias pass and a "
                           "separate ReLU pass over the output (three passes, not fused).")
        register("conv2d_bias_relu", backend, impl.stage,
                 f"{impl.stage} conv2d + separate bias and ReLU passes", device=impl.device,
                 dtypes=impl.dtypes, max_flops=impl.max_flops)(unfused)
