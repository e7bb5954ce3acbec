"""Argument validation and normalisation: the one boundary between users and kernels.

Everything a kernel assumes is established here, before any compiled code runs: dtypes are
float32 or float64 and equal, ranks and shapes agree, conv hyper-parameters are legal, and the
arrays handed down are C-contiguous. Errors name what was expected and what was received.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class ConvParams(NamedTuple):
    """Normalised conv2d hyper-parameters (all Python ints, padding possibly asymmetric)."""

    stride_h: int
    stride_w: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    dil_h: int
    dil_w: int
    groups: int


def is_cupy_array(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "cupy"


def array_module(arr):
    """numpy for a NumPy array, cupy for a CuPy array (CuPy is only imported when one is seen)."""
    if is_cupy_array(arr):
        import cupy

        return cupy
    return np


def as_array(obj, name: str):
    """A NumPy/CuPy array for ``obj`` (no copy when it already is one); TypeError otherwise."""
    if isinstance(obj, np.ndarray) or is_cupy_array(obj):
        return obj
    if type(obj).__module__.split(".")[0] == "torch":
        if obj.requires_grad:
            obj = obj.detach()
        if obj.device.type != "cpu":
            raise TypeError(f"{name}: expected a CPU torch tensor, got one on {obj.device}")
        return obj.numpy()  # shares memory, no copy
    if isinstance(obj, (str, bytes)) or obj is None:
        raise TypeError(f"{name}: expected an array, got {type(obj).__name__}")
    try:
        return np.asarray(obj)
    except Exception as exc:  # noqa: BLE001 - report what we were given
        raise TypeError(f"{name}: expected an array, got {type(obj).__name__} ({exc})") from exc


def check_float_dtype(arr, name: str):
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {arr.dtype}")


def check_same_dtype(**arrays):
    dtypes = {name: a.dtype for name, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        got = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise TypeError(f"expected all inputs to share one dtype (float32 or float64), got {got}")


def contiguous(arr):
    """C-contiguous version of arr; the same object if it already is (never modified)."""
    if arr.flags.c_contiguous:
        return arr
    return array_module(arr).ascontiguousarray(arr)


# ---------------------------------------------------------------------------------- matmul
class MatmulPlan(NamedTuple):
    a: object  # (..., M, K) broadcast-ready, 1-D promoted
    b: object  # (..., K, N)
    out_shape: tuple  # final shape, after removing promoted dims
    batch_shape: tuple


def check_matmul(a, b) -> MatmulPlan:
    a = as_array(a, "a")
    b = as_array(b, "b")
    check_float_dtype(a, "a")
    check_float_dtype(b, "b")
    check_same_dtype(a=a, b=b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: expected inputs of at least 1 dimension, got a.ndim={a.ndim}, "
                         f"b.ndim={b.ndim} (scalars are not allowed, as in numpy.matmul)")
    a_vec, b_vec = a.ndim == 1, b.ndim == 1
    a2 = a.reshape(1, -1) if a_vec else a
    b2 = b.reshape(-1, 1) if b_vec else b
    if a2.shape[-1] != b2.shape[-2]:
        raise ValueError(f"matmul: inner dimensions differ: a has K={a2.shape[-1]} "
                         f"(shape {a.shape}), b expects K={b2.shape[-2]} (shape {b.shape})")
    try:
        batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: batch dimensions do not broadcast: a {a.shape}, b {b.shape}") from None
    m, n = a2.shape[-2], b2.shape[-1]
    out_shape = tuple(batch) + ((m,) if not a_vec else ()) + ((n,) if not b_vec else ())
    return MatmulPlan(a2, b2, out_shape, tuple(batch))


# ---------------------------------------------------------------------------------- conv2d
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _pair(value, name: str, minimum: int):
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return pair


class ConvPlan(NamedTuple):
    x: object  # (N, C, H, W) C-contiguous
    w: object  # (K, C/groups, kH, kW) C-contiguous
    bias: object  # (K,) C-contiguous, or None
    params: ConvParams
    out_shape: tuple  # (N, K, Ho, Wo)
    unbatched: bool  # input was (C, H, W): drop the batch dim of the result


def conv_output_size(size: int, k: int, stride: int, pad_lo: int, pad_hi: int, dil: int) -> int:
    """Output length along one axis, as torch: floor((L + pads - dil*(k-1) - 1) / stride) + 1."""
    return (size + pad_lo + pad_hi - dil * (k - 1) - 1) // stride + 1


def check_conv2d(x, w, bias, stride, padding, dilation, groups, *, bias_required=False) -> ConvPlan:
    x = as_array(x, "x")
    w = as_array(w, "w")
    check_float_dtype(x, "x")
    check_float_dtype(w, "w")
    arrays = {"x": x, "w": w}
    if bias is None:
        if bias_required:
            raise TypeError("bias: expected an array of shape (K,), got None")
    else:
        bias = as_array(bias, "bias")
        check_float_dtype(bias, "bias")
        arrays["bias"] = bias
    check_same_dtype(**arrays)
    if is_cupy_array(x) != is_cupy_array(w) or (bias is not None and is_cupy_array(bias) != is_cupy_array(x)):
        raise TypeError("expected x, w and bias all NumPy or all CuPy arrays, got a mix")

    unbatched = x.ndim == 3
    if unbatched:
        x = x.reshape((1,) + x.shape)
    if x.ndim != 4:
        raise ValueError(f"x: expected shape (N, C, H, W) or (C, H, W), got ndim={x.ndim} shape {x.shape}")
    if w.ndim != 4:
        raise ValueError(f"w: expected shape (K, C/groups, kH, kW), got ndim={w.ndim} shape {w.shape}")
    n, c, h, width = x.shape
    k, cg, kh, kw = w.shape
    if not _is_int(groups):
        raise TypeError(f"groups: expected an int, got {groups!r}")
    groups = int(groups)
    if groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups}")
    if c < 1 or k < 1 or kh < 1 or kw < 1:
        raise ValueError(f"expected non-empty channels and kernel, got x {x.shape}, w {w.shape}")
    if c % groups:
        raise ValueError(f"groups={groups} must divide the input channels C={c}")
    if k % groups:
        raise ValueError(f"groups={groups} must divide the output channels K={k}")
    if cg * groups != c:
        raise ValueError(f"w: expected shape[1] = C/groups = {c // groups}, got {cg} "
                         f"(x has C={c}, groups={groups})")
    if bias is not None and bias.shape != (k,):
        raise ValueError(f"bias: expected shape ({k},), got {bias.shape}")

    sh, sw = _pair(stride, "stride", 1)
    dh, dw = _pair(dilation, "dilation", 1)
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            if (sh, sw) != (1, 1):
                raise ValueError(f"padding='same' requires stride 1, got stride={stride!r}")
            # As torch: the total padding dil*(k-1) is split with the extra on the bottom/right.
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        else:
            raise ValueError(f"padding: expected an int, a pair, 'valid' or 'same', got {padding!r}")
    else:
        ph, pw = _pair(padding, "padding", 0)
        pads = (ph, ph, pw, pw)

    ho = conv_output_size(h, kh, sh, pads[0], pads[1], dh)
    wo = conv_output_size(width, kw, sw, pads[2], pads[3], dw)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"kernel larger than the padded input: effective kernel "
            f"{dh * (kh - 1) + 1}x{dw * (kw - 1) + 1} vs padded input "
            f"{h + pads[0] + pads[1]}x{width + pads[2] + pads[3]}")
    params = ConvParams(sh, sw, *pads, dh, dw, groups)
    return ConvPlan(contiguous(x), contiguous(w), None if bias is None else contiguous(bias),
                    params, (n, k, ho, wo), unbatched)


def conv2d_flops(x_shape, w_shape, out_shape) -> int:
    """2 * multiply-adds of a direct conv: N*K*Ho*Wo * (C/groups)*kH*kW."""
    n, k, ho, wo = out_shape
    _k, cg, kh, kw = w_shape
    return 2 * n * k * ho * wo * cg * kh * kw
