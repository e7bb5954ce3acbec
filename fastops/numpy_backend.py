"""The `numpy` backend: what a Python user would write with NumPy alone.

matmul is ``numpy.matmul`` (OpenBLAS sgemm/dgemm underneath); conv2d is im2col followed by one
``numpy.matmul`` per group. This is the baseline fastops must beat; it is the only backend
allowed to borrow NumPy's BLAS. (The float64 oracle in :mod:`fastops.oracle` is separate.)
"""
from __future__ import annotations

import numpy as np

from .registry import register
from .validation import ConvParams


@register("matmul", "numpy", "blas", "numpy.matmul (OpenBLAS gemm)")
def matmul_numpy(a, b, out):
    """numpy.matmul: the vendor BLAS, as a NumPy user calls it."""
    np.matmul(a, b, out=out)


def im2col(x, kh: int, kw: int, p: ConvParams, out_h: int, out_w: int):
    """x (N, C, H, W) -> columns (N, C, kH, kW, Ho, Wo): one strided copy per kernel tap."""
    xp = np.pad(x, ((0, 0), (0, 0), (p.pad_top, p.pad_bottom), (p.pad_left, p.pad_right)))
    n, c = x.shape[:2]
    cols = np.empty((n, c, kh, kw, out_h, out_w), dtype=x.dtype)
    for i in range(kh):
        top = i * p.dil_h
        for j in range(kw):
            left = j * p.dil_w
            cols[:, :, i, j] = xp[:, :, top:top + p.stride_h * (out_h - 1) + 1:p.stride_h,
                                  left:left + p.stride_w * (out_w - 1) + 1:p.stride_w]
    return cols


@register("conv2d", "numpy", "im2col", "im2col copy + numpy.matmul per group")
def conv2d_numpy(x, w, out, p):
    """im2col + GEMM: the textbook NumPy convolution, (K, C*kH*kW) @ (C*kH*kW, Ho*Wo)."""
    n, c = x.shape[:2]
    k, cg, kh, kw = w.shape
    _n, _k, ho, wo = out.shape
    g = p.groups
    cols = im2col(x, kh, kw, p, ho, wo).reshape(n, g, cg * kh * kw, ho * wo)
    wmat = w.reshape(g, k // g, cg * kh * kw)
    np.matmul(wmat, cols, out=out.reshape(n, g, k // g, ho * wo))
