"""The float64 reference oracle every implementation is checked against.

Written independently of every backend: matmul in float64 through NumPy, conv2d as a sum over
kernel taps of strided views (no im2col matrix). Also returns the "absolute" reference
(the same computation on |inputs|), which scales the rounding-error bound per output element.
"""
from __future__ import annotations

import numpy as np

from .validation import check_conv2d


def matmul(a, b):
    """float64 numpy.matmul of the inputs (same shape semantics as fastops.matmul)."""
    return np.matmul(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))


def _conv_taps(x64, w64, plan):
    p = plan.params
    n, c, h, w_ = x64.shape
    k, cg, kh, kw = w64.shape
    _n, _k, ho, wo = plan.out_shape
    g = p.groups
    xpad = np.pad(x64, ((0, 0), (0, 0), (p.pad_top, p.pad_bottom), (p.pad_left, p.pad_right)))
    out = np.zeros((n, g, k // g, ho, wo))
    wg = w64.reshape(g, k // g, cg, kh, kw)
    for i in range(kh):
        for j in range(kw):
            top, left = i * p.dil_h, j * p.dil_w
            patch = xpad[:, :, top:top + p.stride_h * (ho - 1) + 1:p.stride_h,
                         left:left + p.stride_w * (wo - 1) + 1:p.stride_w]
            patch = patch.reshape(n, g, cg, ho, wo)
            out += np.einsum("ngchw,gkc->ngkhw", patch, wg[:, :, :, i, j])
    return out.reshape(n, k, ho, wo)


def conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, *, relu=False,
           absolute=False):
    """float64 conv2d (+ bias, + ReLU if asked) with torch semantics.

    absolute=True computes the conv of |x| and |w| (+|bias|), the scale for error bounds.
    """
    plan = check_conv2d(x, w, bias, stride, padding, dilation, groups)
    x64 = np.asarray(plan.x, dtype=np.float64)
    w64 = np.asarray(plan.w, dtype=np.float64)
    b64 = None if plan.bias is None else np.asarray(plan.bias, dtype=np.float64)
    if absolute:
        x64, w64 = np.abs(x64), np.abs(w64)
        b64 = None if b64 is None else np.abs(b64)
    out = _conv_taps(x64, w64, plan)
    if b64 is not None:
        out += b64.reshape(1, -1, 1, 1)
    if relu:
        out = np.maximum(out, 0)
    return out[0] if plan.unbatched else out
