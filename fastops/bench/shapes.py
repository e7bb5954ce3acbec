"""The benchmark shape sets, shared by ``fastops bench`` and the pytest-benchmark suites.

A :class:`Case` is one problem of one op: its dimensions, its FLOP count, the minimal number of
bytes any implementation must move (read every input once, write the output once: the
denominator of the roofline's arithmetic intensity), and how to build its kernel arguments.

Sets: ``quick`` (a few shapes, for a < 3 minute run), ``full`` (square matmuls 128…2048, three
model-layer matmuls, the ResNet-50 conv layers at batch 1 and 8) and ``tiny`` (tests only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..validation import check_conv2d, conv2d_flops

CONV_OPS = ("conv2d", "conv2d_bias_relu")


class ConvShape(NamedTuple):
    """A conv2d problem: x (batch, C, H, W), w (K, C/groups, kH, kW), square stride/padding."""

    batch: int
    c: int
    h: int
    w: int
    k: int
    kh: int
    kw: int
    stride: int = 1
    pad: int = 0
    groups: int = 1


@dataclass(frozen=True)
class Case:
    """One problem of one op. ``dims`` is (M, K, N) for matmul, a :class:`ConvShape` for conv."""

    op: str
    name: str
    dims: tuple

    # ------------------------------------------------------------------ sizes
    @property
    def conv(self) -> ConvShape:
        return ConvShape(*self.dims)

    def _conv_plan(self):
        s = self.conv
        # Zero-size dummies are enough for shape arithmetic: check_conv2d only reads shapes.
        x = np.empty((s.batch, s.c, s.h, s.w), np.float32)
        w = np.empty((s.k, s.c // s.groups, s.kh, s.kw), np.float32)
        return check_conv2d(x, w, None, s.stride, s.pad, 1, s.groups)

    @property
    def out_shape(self) -> tuple:
        if self.op == "matmul":
            m, _k, n = self.dims
            return (m, n)
        return self._conv_plan().out_shape

    @property
    def flops(self) -> int:
        """2 × multiply-adds (the bias add and ReLU of the fused op are not counted)."""
        if self.op == "matmul":
            m, k, n = self.dims
            return 2 * m * k * n
        s = self.conv
        return conv2d_flops((s.batch, s.c, s.h, s.w), (s.k, s.c // s.groups, s.kh, s.kw),
                            self.out_shape)

    def min_bytes(self, itemsize: int) -> int:
        """Bytes that must cross memory at least once: every input read, the output written."""
        out = int(np.prod(self.out_shape))
        if self.op == "matmul":
            m, k, n = self.dims
            return itemsize * (m * k + k * n + out)
        s = self.conv
        inputs = s.batch * s.c * s.h * s.w + s.k * (s.c // s.groups) * s.kh * s.kw
        if self.op == "conv2d_bias_relu":
            inputs += s.k
        return itemsize * (inputs + out)

    def intensity(self, itemsize: int) -> float:
        """Arithmetic intensity in FLOP/byte (FLOPs over the minimal bytes moved)."""
        return self.flops / self.min_bytes(itemsize)

    # ------------------------------------------------------------------ arguments
    def inputs(self, dtype, seed: int = 0) -> dict:
        """Random inputs in [-1, 1): {'a','b'} for matmul, {'x','w'(,'bias')} for conv."""
        rng = np.random.default_rng(seed)
        dtype = np.dtype(dtype)

        def rand(*shape):
            return (rng.random(shape, dtype=np.float64) * 2 - 1).astype(dtype)

        if self.op == "matmul":
            m, k, n = self.dims
            return {"a": rand(m, k), "b": rand(k, n)}
        s = self.conv
        arrays = {"x": rand(s.batch, s.c, s.h, s.w), "w": rand(s.k, s.c // s.groups, s.kh, s.kw)}
        if self.op == "conv2d_bias_relu":
            arrays["bias"] = rand(s.k)
        return arrays

    def conv_kwargs(self) -> dict:
        """stride/padding/groups as the public API and torch take them."""
        s = self.conv
        return {"stride": s.stride, "padding": s.pad, "groups": s.groups}

    def kernel_args(self, arrays: dict, out):
        """The positional arguments of a registry kernel (see fastops.registry)."""
        if self.op == "matmul":
            return (arrays["a"], arrays["b"], out)
        params = self._conv_plan().params
        if self.op == "conv2d":
            return (arrays["x"], arrays["w"], out, params)
        return (arrays["x"], arrays["w"], arrays["bias"], out, params)

    @property
    def label(self) -> str:
        return f"{self.op} {self.name}"


# ---------------------------------------------------------------------------------- the sets
def _matmul(m: int, k: int, n: int, name: str | None = None) -> Case:
    return Case("matmul", name or (f"N={m}" if m == k == n else f"{m}x{k}x{n}"), (m, k, n))


def _square(n: int) -> Case:
    return _matmul(n, n, n)


# ResNet-50 layers (NCHW). (label, ConvShape without batch)
RESNET50 = (
    ("res2 3x3 C64 56² K64", dict(c=64, h=56, w=56, k=64, kh=3, kw=3, pad=1)),
    ("res3 3x3 C128 28² K128", dict(c=128, h=28, w=28, k=128, kh=3, kw=3, pad=1)),
    ("res4 3x3 C256 14² K256", dict(c=256, h=14, w=14, k=256, kh=3, kw=3, pad=1)),
    ("res5 3x3 C512 7² K512", dict(c=512, h=7, w=7, k=512, kh=3, kw=3, pad=1)),
    ("1x1 C256 56² K64", dict(c=256, h=56, w=56, k=64, kh=1, kw=1)),
    ("stem 7x7/2 C3 224² K64", dict(c=3, h=224, w=224, k=64, kh=7, kw=7, stride=2, pad=3)),
    ("dw 3x3 C128 56²", dict(c=128, h=56, w=56, k=128, kh=3, kw=3, pad=1, groups=128)),
)


def _conv(op: str, label: str, batch: int, spec: dict) -> Case:
    return Case(op, f"{label} b{batch}", tuple(ConvShape(batch=batch, **spec)))


def _resnet(op: str, labels=None, batches=(1, 8)) -> list[Case]:
    return [_conv(op, label, b, spec) for b in batches for label, spec in RESNET50
            if labels is None or label in labels]


def quick(op: str) -> list[Case]:
    if op == "matmul":
        return [_square(256), _square(1024), _matmul(196, 768, 3072, "196x768x3072 (ViT MLP)")]
    return _resnet(op, {"res3 3x3 C128 28² K128", "dw 3x3 C128 56²"}, batches=(1,))


def full(op: str) -> list[Case]:
    if op == "matmul":
        return [_square(n) for n in (128, 256, 512, 1024, 2048)] + [
            _matmul(1, 2048, 1000, "1x2048x1000 (ResNet fc)"),
            _matmul(64, 512, 512, "64x512x512"),
            _matmul(196, 768, 3072, "196x768x3072 (ViT MLP)"),
        ]
    return _resnet(op)


def tiny(op: str) -> list[Case]:
    """Seconds-fast shapes for the test-suite (not a benchmark)."""
    if op == "matmul":
        return [_square(16), _matmul(8, 24, 12)]
    return [Case(op, "3x3 C4 8² K6 b1", tuple(ConvShape(1, 4, 8, 8, 6, 3, 3, 1, 1, 1))),
            Case(op, "dw 3x3 C4 8² b2", tuple(ConvShape(2, 4, 8, 8, 4, 3, 3, 1, 1, 4)))]


SETS = {"quick": quick, "full": full, "tiny": tiny}


def cases(op: str, mode: str = "quick") -> list[Case]:
    """The shapes of ``op`` in set ``mode`` ('quick', 'full' or 'tiny')."""
    if mode not in SETS:
        raise ValueError(f"unknown shape set {mode!r}; expected one of {sorted(SETS)}")
    return SETS[mode](op)
