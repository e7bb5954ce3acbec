"""fastops.workspace: the scratch-buffer pool behind the Cython conv kernels."""
from __future__ import annotations

import threading

import numpy as np

from fastops import workspace


def test_borrow_is_aligned_sized_and_reused():
    workspace.clear()
    with workspace.borrow(1000, np.float32) as a:
        assert a.dtype == np.float32 and a.shape == (1000,)
        assert a.ctypes.data % workspace.ALIGN == 0
    assert len(workspace._free) == 1
    idle = workspace._free[0]
    with workspace.borrow(500, np.float64) as b:  # 4000 bytes fit the idle buffer: reused
        assert workspace._free == [] and b.shape == (500,) and b.dtype == np.float64
        assert b.ctypes.data % workspace.ALIGN == 0
        assert idle.ctypes.data <= b.ctypes.data < idle.ctypes.data + workspace.ALIGN
    with workspace.borrow(2000, np.float32) as c:  # too big for it: a new buffer
        assert workspace._free == [idle] and c.shape == (2000,)
    workspace.clear()


def test_pool_keeps_limits():
    workspace.clear()
    for n in range(workspace.KEEP_BUFFERS + 3):
        with workspace.borrow(1024 * (n + 1), np.uint8):
            pass
    assert len(workspace._free) <= workspace.KEEP_BUFFERS
    assert sum(b.nbytes for b in workspace._free) <= workspace.KEEP_BYTES
    workspace.clear()
    assert workspace._free == []


def test_concurrent_borrowers_never_share():
    workspace.clear()
    barrier = threading.Barrier(4)
    seen, errors = [], []

    def worker(i):
        with workspace.borrow(4096, np.float32) as buf:
            buf[:] = i
            barrier.wait()  # all four hold a buffer at once
            seen.append(buf.ctypes.data)
            if not np.all(buf == i):
                errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(seen)) == 4
    workspace.clear()


def test_borrowing_nothing_leaves_the_pool_alone():
    workspace.clear()
    with workspace.borrow(1000, np.float32):
        pass
    idle = list(workspace._free)
    with workspace.borrow(0, np.float64) as empty:
        assert empty.shape == (0,) and empty.dtype == np.float64
        assert workspace._free == idle  # the idle buffer stays available to others
    assert workspace._free == idle
    workspace.clear()
