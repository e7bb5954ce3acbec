"""The public ops: validate once, choose an implementation, allocate, call the kernel.

Semantics follow ``numpy.matmul`` and ``torch.nn.functional.conv2d``. Inputs are never modified.
"""
from __future__ import annotations

import itertools

import numpy as np

from . import registry
from .epilogue import add_bias_
from .validation import (array_module, check_conv2d, check_matmul, contiguous,
                         is_cupy_array)


def _device_of(array) -> str:
    return "gpu" if is_cupy_array(array) else "cpu"


def choose(op: str, device: str, dtype, backend: str | None = None,
           stage: str | None = None, plan=None) -> registry.Implementation:
    """The implementation a call would use: named, or the best available for device and dtype.

    With no stage named and the validated ``plan`` given, a tuned winner cached for this
    problem's shapes is used if there is one (see :mod:`fastops.tuning`).
    """
    dtype = np.dtype(dtype)
    if stage is None and plan is not None:
        from . import tuning

        tuned = tuning.choice(op, device, dtype, backend, plan)
        if tuned is not None:
            return tuned
    if backend is None:
        for candidate in registry.BACKEND_PREFERENCE[device]:
            if any(i.supports(dtype) for i in registry.ladder(op, candidate)):
                backend = candidate
                break
        else:
            raise ValueError(f"no {device} backend for {op} with dtype {dtype} on this machine")
    if stage is None:
        from . import tuning

        impl = tuning.best(op, backend, dtype)
    else:
        impl = registry.lookup(op, backend, stage)
    if not impl.supports(dtype):
        raise TypeError(f"{impl.name}: expected dtype in {impl.dtypes}, got {dtype}")
    return impl


def _to_device(arrays, impl):
    """Move arrays to the implementation's device; returns (arrays, back-to-host function)."""
    on_gpu = [is_cupy_array(a) for a in arrays if a is not None]
    if impl.device == "gpu" and not all(on_gpu):
        import cupy  # backend="cupy" with NumPy input: copy in, compute, copy the result back

        return [None if a is None else contiguous(cupy.asarray(a)) for a in arrays], cupy.asnumpy
    if impl.device == "cpu" and any(on_gpu):
        raise TypeError(f"{impl.name} runs on the CPU: expected NumPy arrays, got CuPy arrays "
                        "(use backend='cupy' or cupy.asnumpy)")
    return list(arrays), None


def _empty(like, shape):
    return array_module(like).empty(shape, dtype=like.dtype)


def _result(out, back, original):
    """Hand the result back in the caller's kind: NumPy, CuPy or a torch CPU tensor."""
    if back is not None:
        out = back(out)
    if type(original).__module__.split(".")[0] == "torch":
        import torch

        return torch.from_numpy(out)
    return out


def matmul(a, b, *, backend=None, stage=None):
    """Matrix product with ``numpy.matmul`` semantics (1-D promotion, batch broadcasting).

    a: (..., M, K) or (K,);  b: (..., K, N) or (K,)  ->  (..., M, N), in the inputs' dtype.
    """
    plan = check_matmul(a, b)
    impl = choose("matmul", _device_of(plan.a), plan.a.dtype, backend, stage, plan)
    (a2, b2), back = _to_device([plan.a, plan.b], impl)
    m, k = a2.shape[-2:]
    n = b2.shape[-1]
    out = _empty(a2, plan.batch_shape + (m, n))
    if out.size == 0:
        pass
    elif k == 0:
        out[...] = 0
    elif b2.ndim == 2:
        # The common "linear layer" case: fold every batch row into one (B*M, K) @ (K, N) call.
        a_rows = contiguous(a2).reshape(-1, k)
        impl.kernel(a_rows, contiguous(b2), out.reshape(-1, n))
    else:
        a_b = a2 if a2.shape[:-2] == plan.batch_shape else _broadcast(a2, plan.batch_shape + (m, k))
        b_b = b2 if b2.shape[:-2] == plan.batch_shape else _broadcast(b2, plan.batch_shape + (k, n))
        for index in itertools.product(*map(range, plan.batch_shape)):
            impl.kernel(contiguous(a_b[index]), contiguous(b_b[index]), out[index])
    return _result(out.reshape(plan.out_shape), back, a)


def _broadcast(array, shape):
    return array_module(array).broadcast_to(array, shape)


def _conv(op, x, w, bias, stride, padding, dilation, groups, backend, stage):
    plan = check_conv2d(x, w, bias, stride, padding, dilation, groups,
                        bias_required=op == "conv2d_bias_relu")
    impl = choose(op, _device_of(plan.x), plan.x.dtype, backend, stage, plan)
    (xd, wd, bd), back = _to_device([plan.x, plan.w, plan.bias], impl)
    out = _empty(xd, plan.out_shape)
    if out.size:
        if op == "conv2d":
            impl.kernel(xd, wd, out, plan.params)
            if bd is not None:
                add_bias_(out, bd)
        else:
            impl.kernel(xd, wd, bd, out, plan.params)
    if plan.unbatched:
        out = out[0]
    return _result(out, back, x)


def conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, *, backend=None,
           stage=None):
    """2-D convolution (cross-correlation) as ``torch.nn.functional.conv2d``.

    x: (N, C, H, W) or (C, H, W);  w: (K, C/groups, kH, kW);  bias: (K,) or None
    -> (N, K, Ho, Wo). padding: int, pair, 'valid' or 'same' (stride 1 only).
    """
    return _conv("conv2d", x, w, bias, stride, padding, dilation, groups, backend, stage)


def conv2d_bias_relu(x, w, bias, stride=1, padding=0, dilation=1, groups=1, *, backend=None,
                     stage=None):
    """relu(conv2d(x, w, bias, ...)); the ``fused`` stages do it in one pass over the output."""
    return _conv("conv2d_bias_relu", x, w, bias, stride, padding, dilation, groups, backend, stage)


def implementations(op=None):
    """What is registered on this machine: a list of (op, backend, stage, summary) records."""
    return registry.implementations(op)
