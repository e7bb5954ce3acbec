"""Choosing the stage when the caller names none.

Default: the backend's last (most optimised) stage that supports the dtype.
"""
from __future__ import annotations

import numpy as np

from . import registry


def best(op: str, backend: str, dtype) -> registry.Implementation:
    dtype = np.dtype(dtype)
    candidates = [i for i in registry.ladder(op, backend) if i.supports(dtype)]
    if not candidates:
        registry.lookup(op, backend, "")  # raises the "unknown backend" error with the list
        raise TypeError(f"{op}/{backend}: no stage supports dtype {dtype}")
    return candidates[-1]
