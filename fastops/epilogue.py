"""The un-fused epilogue passes: a bias pass and a ReLU pass over a conv output in place.

These are deliberately separate sweeps over memory: they are what the ``fused`` stages remove.
They work on NumPy and CuPy arrays alike (elementwise ufuncs, no multiply-adds borrowed).
"""
from __future__ import annotations

from .validation import array_module


def add_bias_(out, bias) -> None:
    """out (N, K, Ho, Wo) += bias (K,), broadcast over batch and pixels."""
    array_module(out).add(out, bias.reshape(1, -1, 1, 1), out=out)


def relu_(out) -> None:
    """out = max(out, 0) in place; NaN stays NaN, as torch.relu."""
    array_module(out).maximum(out, 0, out=out)
