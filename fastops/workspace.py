"""Reusable scratch buffers for the compiled kernels.

The Cython conv kernels need large per-call scratch arrays (the zero-padded copy of the input,
reordered weights): 3.7 MB for a ResNet-50 res3 3x3 layer at batch 8. Fresh from np.empty each
call, such an array is new pages from the kernel (glibc serves large blocks with mmap and
returns them on free), and touching them costs page faults and zeroing: ``perf`` put
exc_page_fault + clear_page + unmap at ~9 % of that layer's time on one thread. A workspace
keeps a few freed buffers and hands them out again, so a model calling the same layers over
and over touches warm, mapped memory.

Thread-safe: a buffer is owned by one caller between :func:`borrow` and its return, so
concurrent calls never share scratch memory.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np

# Buffers kept for reuse, at most this many and this many bytes in all (the rest are freed).
KEEP_BUFFERS = 6
KEEP_BYTES = 256 * 2**20
ALIGN = 64  # bytes: every view starts on a cache line (and a zmm boundary)

_lock = threading.Lock()
_free: list[np.ndarray] = []  # idle uint8 buffers, any order


def _take(nbytes: int) -> np.ndarray:
    """The smallest idle buffer of at least nbytes (removed from the pool), or a new one."""
    with _lock:
        fits = [i for i, b in enumerate(_free) if b.nbytes >= nbytes]
        if fits:
            best = min(fits, key=lambda i: _free[i].nbytes)
            return _free.pop(best)
    return np.empty(nbytes, dtype=np.uint8)


def _give(buf: np.ndarray) -> None:
    """Back to the pool; the largest buffers beyond the limits are dropped (freed)."""
    with _lock:
        _free.append(buf)
        _free.sort(key=lambda b: b.nbytes)
        while len(_free) > KEEP_BUFFERS or sum(b.nbytes for b in _free) > KEEP_BYTES:
            _free.pop(0 if len(_free) > KEEP_BUFFERS else -1)


@contextmanager
def borrow(count: int, dtype):
    """A 1-D array of `count` elements of `dtype`, 64-byte aligned, uninitialised, owned by
    the caller until the with-block ends."""
    dtype = np.dtype(dtype)
    if count == 0:  # nothing to lend (e.g. a kernel that reads its input in place): leave
        yield np.empty(0, dtype=dtype)  # the pool's buffers to callers that need them
        return
    buf = _take(count * dtype.itemsize + ALIGN)
    try:
        start = (-buf.ctypes.data) % ALIGN
        yield buf[start:start + count * dtype.itemsize].view(dtype)
    finally:
        _give(buf)


def clear() -> None:
    """Free every idle buffer (tests, or a caller that wants the memory back)."""
    with _lock:
        _free.clear()
