"""One correctness helper used by every op test: compare against the float64 oracle.

The bound is rigorous, not a tuned fudge: for a dot product of length L computed in any order
(with or without FMA), |computed - exact| <= L * u * sum|a_i b_i|, u the unit roundoff of the
dtype. So each element is checked against ``(L + 2) * u * abs_ref`` where ``abs_ref`` is the
same op applied to |inputs| (computed in float64). A wrong index or a missed term produces an
error of the order of abs_ref itself, far outside that bound for any L with L*u << 1.
"""
from __future__ import annotations

import numpy as np


def unit_roundoff(dtype) -> float:
    return float(np.finfo(dtype).eps) / 2


def assert_close(got, ref, abs_ref, reduction: int, dtype, what: str = "") -> None:
    """Check ``got`` against float64 ``ref`` within the reduction-length-scaled bound."""
    got = np.asarray(got)
    ref = np.asarray(ref)
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype}, expected {np.dtype(dtype)}"
    got64 = got.astype(np.float64)
    nan_got, nan_ref = np.isnan(got64), np.isnan(ref)
    assert np.array_equal(nan_got, nan_ref), (
        f"{what}: NaN pattern differs ({nan_got.sum()} NaN, expected {nan_ref.sum()})")
    finite = ~nan_ref
    inf_ref = np.isinf(ref) & finite
    assert np.array_equal(got64[inf_ref], ref[inf_ref]), f"{what}: Inf values differ"
    check = finite & ~inf_ref
    tiny = np.finfo(dtype).tiny * (reduction + 2)  # underflow allowance
    bound = (reduction + 2) * unit_roundoff(dtype) * np.asarray(abs_ref)[check] + tiny
    err = np.abs(got64[check] - ref[check])
    if err.size and not np.all(err <= bound):
        worst = int(np.argmax(err - bound))
        idx = np.unravel_index(np.flatnonzero(check)[worst], got.shape)
        raise AssertionError(
            f"{what}: {int((err > bound).sum())} of {err.size} elements outside the bound; "
            f"worst at {idx}: got {got64[idx]!r}, expected {ref[idx]!r} (bound {bound[worst]:.3g})")
