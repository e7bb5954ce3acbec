"""Cython kernels: one extension per op (matmul, conv2d, conv2d_bias_relu), stages in ladder order.

Importing this package first checks that the running CPU has every instruction-set extension
the extensions were compiled for (``-march=native`` by default, recorded by setup.py in
``_build_isa.py``). If not — a build copied to an older machine — importing the kernels could
die of SIGILL, so this raises ImportError instead (with a warning): fastops then records the
cython backend as unavailable and falls back to the portable Numba backend, which JIT-compiles
for the CPU it runs on. Rebuild with ``FASTOPS_PORTABLE=1`` for a build that runs anywhere.
"""
from __future__ import annotations

import warnings


def cpu_flags() -> set[str] | None:
    """The running CPU's feature flags from /proc/cpuinfo (None where that is unavailable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def missing_isa(required, available) -> list[str]:
    """The required ISA flags the CPU lacks ([] when compatible or when either is unknown)."""
    if required is None or available is None:
        return []
    return sorted(set(required) - set(available))


def _check_build_isa() -> None:
    try:
        from ._build_isa import MARCH_FLAGS, REQUIRED_CPU_FLAGS
    except ImportError:
        return  # built without setup.py's record: nothing to compare
    missing = missing_isa(REQUIRED_CPU_FLAGS, cpu_flags())
    if missing:
        message = (f"fastops' Cython kernels were built with {' '.join(MARCH_FLAGS)} for a CPU "
                   f"with {', '.join(missing)}, which this CPU lacks; the cython backend is "
                   "disabled (falling back to numba). Reinstall with FASTOPS_PORTABLE=1.")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        raise ImportError(message)


_check_build_isa()
