"""Shared plumbing for the Numba kernels: threading layer, fast-math flags, stack arrays.

Nothing here computes a multiply-add; it is the machinery every Numba chapter relies on.

* **Threading layer.** Numba runs ``prange`` loops on one of three layers. ``workqueue`` aborts
  the process when two Python threads enter parallel code at once, ``omp`` (GNU OpenMP) and
  ``tbb`` are safe. The layer is fixed the first time any parallel kernel runs, so it is chosen
  here, at import, before any kernel module compiles: ``omp`` first, then ``tbb``; only when
  neither loads do we fall back to ``workqueue`` and serialise parallel kernels with a lock
  (:func:`serialised`).
* **Fast-math flags.** ``reassoc`` lets LLVM reorder a sum so it can keep several partial sums
  in SIMD lanes, ``contract`` fuses ``a * b + c`` into one FMA. ``nnan``/``ninf`` are left out on
  purpose: they would let LLVM assume there is no NaN/Inf, and NaN must propagate as in the
  reference.
* **Stack arrays.** A register-blocked micro-kernel keeps its accumulators in local arrays.
  ``np.empty`` puts them on the heap, where LLVM must keep loading and storing them (measured:
  39-50 GFLOP/s on one thread for a 4x32..6x32 float32 tile, and 7 GFLOP/s for 8x16 where it
  gave up vectorising). :func:`stack_vector` allocates them with an LLVM ``alloca`` instead, which
  LLVM's SROA pass turns into registers: 107-114 GFLOP/s (about 78 % of this core's FP32 peak),
  same code, same machine (``/tmp`` probe, 2000-4000 repeats of a kc=256 tile in L1).
"""
from __future__ import annotations

import functools
import threading

import numba
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic

# Flags for the SIMD stages: everything except the "no NaN / no Inf" assumptions (see above).
FASTMATH = {"contract", "reassoc", "nsz", "arcp"}

_SAFE_LAYERS = ("omp", "tbb")


def _layer_loads(name: str) -> bool:
    try:
        if name == "omp":
            from numba.np.ufunc import omppool  # noqa: F401
        elif name == "tbb":
            from numba.np.ufunc import tbbpool  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - a missing shared library is "not available"
        return False


def _choose_threading_layer() -> str:
    """Pick (and, if still possible, set) the layer parallel kernels will run on."""
    from numba.np.ufunc import parallel

    if parallel._is_initialized:  # someone already ran parallel code: the layer is fixed
        return numba.threading_layer()
    requested = str(config.THREADING_LAYER)
    if requested in ("omp", "tbb", "workqueue"):  # an explicit NUMBA_THREADING_LAYER wins
        return requested
    for name in _SAFE_LAYERS:
        if _layer_loads(name):
            config.THREADING_LAYER = name
            return name
    config.THREADING_LAYER = "workqueue"
    return "workqueue"


THREADING_LAYER = _choose_threading_layer()
_parallel_lock = threading.Lock()


def serialised(kernel):
    """``kernel`` itself on a thread-safe layer; on ``workqueue``, a version holding a lock.

    Used on every kernel that contains a ``prange``, so concurrent calls from several Python
    threads are correct whatever layer this machine has.
    """
    if THREADING_LAYER in _SAFE_LAYERS:
        return kernel

    @functools.wraps(kernel)
    def locked(*args):
        with _parallel_lock:
            return kernel(*args)

    return locked


@intrinsic
def stack_vector(typingctx, length, dtype):
    """A 1-D array of ``length`` (a compile-time constant) elements on the stack, uninitialised.

    stack_vector(NR, x.dtype) -> array (NR,) of x's dtype. Must not outlive the function.
    """
    if not isinstance(length, types.IntegerLiteral):
        raise numba.errors.TypingError("stack_vector: length must be a compile-time constant")
    count = length.literal_value
    array_type = types.Array(dtype.dtype, 1, "C")

    def codegen(context, builder, signature, args):
        element = context.get_value_type(dtype.dtype)
        data = cgutils.alloca_once(builder, element, size=count)  # entry-block alloca
        array = context.make_array(array_type)(context, builder)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(element))
        context.populate_array(array, data=data,
                               shape=[context.get_constant(types.intp, count)],
                               strides=[itemsize], itemsize=itemsize, meminfo=None)
        return array._getvalue()

    return array_type(length, dtype), codegen


def jit(**options):
    """``numba.njit`` with the project defaults: cached on disk, GIL released, no bounds checks."""
    return numba.njit(cache=True, nogil=True, **options)
