"""The layers of a ``fastops.nn`` inference graph, and the containers that wire them.

A layer holds its parameters as NumPy arrays and knows two ways to run:

* ``plan(inputs, ctx)`` returns a *runner*, a function of the input arrays, built once per input
  shape and dtype when the graph first sees that shape. The runner is the fast path: conv and
  linear layers call the chosen kernel directly (validated once, weights packed once), the
  others are NumPy elementwise passes and reductions (pooling and adding are not BLAS work).
* ``reference(*inputs)`` computes the layer in float64 through :mod:`fastops.oracle` (convs,
  matmuls) and plain NumPy, un-fused: what the optimised graph is tested against.

Containers (:class:`Sequential`, :class:`Residual`) are not layers; they only say how layers
connect. Calling one compiles it into a :class:`fastops.nn.Graph` (once) and runs that.
"""
from __future__ import annotations

import math

import numpy as np

from .. import oracle
from ..validation import check_conv2d, conv_output_size


def _param(array, name: str) -> np.ndarray:
    """A parameter as a float64 master copy (folding and packing start from full precision)."""
    from ..validation import as_array

    arr = np.array(as_array(array, name), dtype=np.float64, copy=True)
    return arr


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


class Layer:
    """Base class: one node of the graph. ``n_inputs`` arrays in, one array out."""

    n_inputs = 1

    def plan(self, inputs, ctx):  # pragma: no cover - every layer overrides it
        raise NotImplementedError

    def reference(self, *inputs):  # pragma: no cover
        raise NotImplementedError

    # Containers call this to add the layer to a graph under construction.
    def _emit(self, builder, *inputs):
        return builder.add(self, inputs)

    def __call__(self, x):
        from .graph import Graph

        if not hasattr(self, "_graph"):
            self._graph = Graph.from_module(self)
        return self._graph(x)

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return ""


# --------------------------------------------------------------------------------- conv
class Conv2d(Layer):
    """conv2d (+ bias) (+ ReLU when ``relu=True``, which the optimiser sets when it fuses).

    weight: (K, C/groups, kH, kW);  bias: (K,) or None. Hyper-parameters as torch.
    """

    def __init__(self, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                 relu=False):
        self.weight = _param(weight, "weight")
        if self.weight.ndim != 4:
            raise ValueError(f"Conv2d weight: expected shape (K, C/groups, kH, kW), got "
                             f"{self.weight.shape}")
        self.bias = None if bias is None else _param(bias, "bias")
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.relu = relu

    def extra_repr(self):
        k, cg, kh, kw = self.weight.shape
        return (f"{cg * self.groups}->{k}, {kh}x{kw}, stride={self.stride}, padding="
                f"{self.padding}, bias={self.bias is not None}, relu={self.relu}")

    def with_(self, **changes) -> "Conv2d":
        """A copy with some fields replaced (the optimiser never mutates the user's layers)."""
        fields = dict(weight=self.weight, bias=self.bias, stride=self.stride,
                      padding=self.padding, dilation=self.dilation, groups=self.groups,
                      relu=self.relu)
        fields.update(changes)
        return Conv2d(**fields)

    def plan(self, inputs, ctx):
        (x,) = inputs
        dtype = x.dtype
        w = ctx.pack(self, "weight", self.weight, dtype)
        bias = None if self.bias is None else ctx.pack(self, "bias", self.bias, dtype)
        if self.relu and bias is None:
            bias = ctx.pack(self, "bias0", np.zeros(self.weight.shape[0]), dtype)
        op = "conv2d_bias_relu" if self.relu else "conv2d"
        plan = check_conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups,
                            bias_required=self.relu)
        impl = ctx.choose(op, plan)
        kernel, params, out_shape = impl.kernel, plan.params, plan.out_shape
        # A backend may offer a one-time weight pre-pack (e.g. into its register-tile layout):
        # kernel.prepack(w, params) -> packed, then kernel.run_packed(x, packed, [bias,] out, p).
        prepack = getattr(kernel, "prepack", None)
        if prepack is not None and hasattr(kernel, "run_packed"):
            w, kernel = prepack(w, params), kernel.run_packed
        ctx.note(self, impl)

        if op == "conv2d_bias_relu":
            def run(x):
                out = np.empty(out_shape, dtype)
                kernel(_c(x), w, bias, out, params)
                return out
        else:
            def run(x):
                out = np.empty(out_shape, dtype)
                kernel(_c(x), w, out, params)
                if bias is not None:
                    np.add(out, bias.reshape(1, -1, 1, 1), out=out)
                return out
        return run

    def reference(self, x):
        out = oracle.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                            self.groups)
        return np.maximum(out, 0) if self.relu else out


def _c(x):
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


class BatchNorm2d(Layer):
    """Inference batch norm with running statistics: (x - mean) / sqrt(var + eps) * gamma + beta.

    After a conv the optimiser folds it into the conv's weights and bias; standalone it is one
    fused multiply-add pass with a per-channel scale and shift.
    """

    def __init__(self, running_mean, running_var, weight=None, bias=None, eps=1e-5):
        self.mean = _param(running_mean, "running_mean")
        self.var = _param(running_var, "running_var")
        c = self.mean.shape[0]
        self.gamma = np.ones(c) if weight is None else _param(weight, "weight")
        self.beta = np.zeros(c) if bias is None else _param(bias, "bias")
        self.eps = float(eps)

    def extra_repr(self):
        return f"{self.mean.shape[0]}, eps={self.eps}"

    def scale_shift(self):
        """(scale, shift) per channel, float64: bn(x) = x * scale + shift."""
        scale = self.gamma / np.sqrt(self.var + self.eps)
        return scale, self.beta - self.mean * scale

    def plan(self, inputs, ctx):
        scale, shift = self.scale_shift()
        scale = ctx.pack(self, "scale", scale, inputs[0].dtype).reshape(1, -1, 1, 1)
        shift = ctx.pack(self, "shift", shift, inputs[0].dtype).reshape(1, -1, 1, 1)

        def run(x):
            out = np.multiply(x, scale)
            np.add(out, shift, out=out)
            return out
        return run

    def reference(self, x):
        shape = (1, -1, 1, 1)
        return ((x - self.mean.reshape(shape)) / np.sqrt(self.var.reshape(shape) + self.eps)
                * self.gamma.reshape(shape) + self.beta.reshape(shape))


def fold_batchnorm(conv: Conv2d, bn: BatchNorm2d) -> Conv2d:
    """conv followed by bn (running stats) as one conv, computed in float64.

    bn(conv(x, W) + b) = conv(x, W * s) + (b - mean) * s + beta, s = gamma / sqrt(var + eps),
    with W scaled along its output-channel axis K.
    """
    if bn.mean.shape[0] != conv.weight.shape[0]:
        raise ValueError(f"BatchNorm2d has {bn.mean.shape[0]} channels, the conv before it "
                         f"{conv.weight.shape[0]}")
    scale, shift = bn.scale_shift()
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return conv.with_(weight=conv.weight * scale.reshape(-1, 1, 1, 1), bias=bias)


# ------------------------------------------------------------------------- elementwise
class ReLU(Layer):
    """max(x, 0); NaN stays NaN (np.maximum propagates it, as torch.relu)."""

    def plan(self, inputs, ctx):
        overwrite = ctx.may_overwrite(0)

        def run(x):
            return np.maximum(x, 0, out=x) if overwrite else np.maximum(x, 0)
        return run

    def reference(self, x):
        return np.maximum(x, 0)


class Add(Layer):
    """a + b (the residual connection), then ReLU when ``relu=True`` (set by the optimiser)."""

    n_inputs = 2

    def __init__(self, relu=False):
        self.relu = relu

    def extra_repr(self):
        return f"relu={self.relu}"

    def plan(self, inputs, ctx):
        a, b = inputs
        if a.shape != b.shape:
            raise ValueError(f"Add: expected equal shapes, got {a.shape} and {b.shape}")
        into = 0 if ctx.may_overwrite(0) else 1 if ctx.may_overwrite(1) else None
        relu = self.relu

        def run(a, b):
            out = (a, b)[into] if into is not None else np.empty_like(a)
            np.add(a, b, out=out)
            if relu:
                np.maximum(out, 0, out=out)
            return out
        return run

    def reference(self, a, b):
        out = a + b
        return np.maximum(out, 0) if self.relu else out


class Identity(Layer):
    """Passes its input through (nn.Identity, and nn.Dropout in inference)."""

    def plan(self, inputs, ctx):
        return lambda x: x

    def reference(self, x):
        return x


# ------------------------------------------------------------------------------ pooling
class MaxPool2d(Layer):
    """Max pooling as torch ``max_pool2d`` (padding counts as -inf; ``ceil_mode`` supported).

    Separable: a max over the kW taps along rows, then over the kH taps along columns, each
    tap a strided view, so a 3x3 window costs 3 + 3 ``np.maximum`` passes instead of 9.
    Planes are processed in chunks that fit L2 (512 KiB of padded input, a quarter of this
    machine's 2 MiB) so the passes re-read cache, not DRAM.
    """

    CHUNK_BYTES = 512 * 1024

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride if stride is not None else kernel_size)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.ceil_mode = bool(ceil_mode)
        kh, kw = self.kernel_size
        if self.padding[0] > kh // 2 or self.padding[1] > kw // 2:
            raise ValueError(f"MaxPool2d: padding {self.padding} must be at most half the kernel "
                             f"size {self.kernel_size}")

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"ceil_mode={self.ceil_mode}")

    def _out_size(self, size, axis):
        k, s, p, d = (self.kernel_size[axis], self.stride[axis], self.padding[axis],
                      self.dilation[axis])
        span = size + 2 * p - d * (k - 1) - 1
        if span < 0:
            raise ValueError(f"MaxPool2d: window {k} (dilation {d}) larger than the padded "
                             f"input {size + 2 * p}")
        out = (-(-span // s) if self.ceil_mode else span // s) + 1
        if self.ceil_mode and (out - 1) * s >= size + p:  # the last window must start inside
            out -= 1
        return out

    def plan(self, inputs, ctx):
        (x,) = inputs
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.kernel_size, self.stride, self.padding,
                                                  self.dilation)
        ho, wo = self._out_size(h, 0), self._out_size(w, 1)
        # Padded extent: enough rows/cols for every window (ceil_mode may reach past pad).
        hp = max(h + ph, (ho - 1) * sh + dh * (kh - 1) + 1)
        wp = max(w + pw, (wo - 1) * sw + dw * (kw - 1) + 1)
        planes = n * c
        chunk = max(1, min(planes, self.CHUNK_BYTES // (hp * wp * x.itemsize)))
        dtype = x.dtype
        padded = ph or pw or hp > h + ph or wp > w + pw
        # padded chunk (chunk, hp, wp): borders stay -inf, the interior is overwritten per chunk
        buf = np.full((chunk, hp, wp), -np.inf, dtype) if padded else None
        rows = np.empty((chunk, hp, wo), dtype)  # after the max along W

        def run(x):
            src = _c(x).reshape(planes, h, w)
            out = np.empty((n, c, ho, wo), dtype)
            dst = out.reshape(planes, ho, wo)
            for start in range(0, planes, chunk):
                stop = min(start + chunk, planes)
                m = stop - start
                if padded:
                    buf[:m, ph:ph + h, pw:pw + w] = src[start:stop]
                    xp = buf[:m]
                else:
                    xp = src[start:stop]
                r = rows[:m]
                for j in range(kw):  # max along W: (m, hp, wp) -> (m, hp, wo)
                    tap = xp[:, :, j * dw:j * dw + sw * (wo - 1) + 1:sw]
                    if j == 0:
                        r[...] = tap
                    else:
                        np.maximum(r, tap, out=r)
                o = dst[start:stop]
                for i in range(kh):  # max along H: (m, hp, wo) -> (m, ho, wo)
                    tap = r[:, i * dh:i * dh + sh * (ho - 1) + 1:sh]
                    if i == 0:
                        o[...] = tap
                    else:
                        np.maximum(o, tap, out=o)
            return out
        return run

    def reference(self, x):
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (self.kernel_size, self.stride, self.padding,
                                                  self.dilation)
        ho, wo = self._out_size(h, 0), self._out_size(w, 1)
        out = np.full((n, c, ho, wo), -np.inf)
        for i in range(ho):
            for j in range(wo):
                for a in range(kh):
                    for b in range(kw):
                        r, s = i * sh - ph + a * dh, j * sw - pw + b * dw
                        if 0 <= r < h and 0 <= s < w:
                            out[:, :, i, j] = np.maximum(out[:, :, i, j], x[:, :, r, s])
        return out


class AdaptiveAvgPool2d(Layer):
    """torch ``adaptive_avg_pool2d``: output cell (i, j) averages rows
    [floor(i*H/oh), ceil((i+1)*H/oh)) and the matching columns. (1, 1) is the global average."""

    def __init__(self, output_size=(1, 1)):
        size = _pair(output_size)
        if any(s is None for s in size):
            raise NotImplementedError("AdaptiveAvgPool2d: output_size None is not supported")
        self.output_size = size

    def extra_repr(self):
        return f"output_size={self.output_size}"

    def plan(self, inputs, ctx):
        (x,) = inputs
        n, c, h, w = x.shape
        oh, ow = self.output_size
        if (oh, ow) == (1, 1):
            def run(x):  # one reduction over the contiguous H*W axis (pairwise summation)
                return _c(x).reshape(n, c, h * w).mean(axis=2, dtype=x.dtype).reshape(n, c, 1, 1)
            return run
        return lambda x: self._adaptive(x).astype(x.dtype, copy=False)

    def _adaptive(self, x):
        n, c, h, w = x.shape
        oh, ow = self.output_size
        out = np.empty((n, c, oh, ow), dtype=x.dtype)
        for i in range(oh):
            r0, r1 = (i * h) // oh, math.ceil((i + 1) * h / oh)
            for j in range(ow):
                s0, s1 = (j * w) // ow, math.ceil((j + 1) * w / ow)
                out[:, :, i, j] = x[:, :, r0:r1, s0:s1].mean(axis=(2, 3))
        return out

    def reference(self, x):
        return self._adaptive(np.asarray(x, dtype=np.float64))


class GlobalAvgPool2d(AdaptiveAvgPool2d):
    """Mean over H and W: (N, C, H, W) -> (N, C, 1, 1)."""

    def __init__(self):
        super().__init__((1, 1))


class Flatten(Layer):
    """Reshape dims start_dim..end_dim into one (a view: activations are C-contiguous)."""

    def __init__(self, start_dim=1, end_dim=-1):
        self.start_dim, self.end_dim = start_dim, end_dim

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"

    def _shape(self, shape):
        nd = len(shape)
        s, e = self.start_dim % nd, self.end_dim % nd
        return shape[:s] + (int(np.prod(shape[s:e + 1])),) + shape[e + 1:]

    def plan(self, inputs, ctx):
        shape = self._shape(inputs[0].shape)
        return lambda x: _c(x).reshape(shape)

    def reference(self, x):
        return x.reshape(self._shape(x.shape))


# ------------------------------------------------------------------------------- linear
class Linear(Layer):
    """x @ W^T + b (+ ReLU when ``relu=True``), W: (out, in) as torch.

    Runs as ``fastops.matmul``'s kernel on (rows, in) @ (in, out): W^T is transposed once into
    a contiguous (in, out) panel when the graph is prepared, never per call.
    """

    def __init__(self, weight, bias=None, *, relu=False):
        self.weight = _param(weight, "weight")
        if self.weight.ndim != 2:
            raise ValueError(f"Linear weight: expected shape (out, in), got {self.weight.shape}")
        self.bias = None if bias is None else _param(bias, "bias")
        self.relu = relu

    def extra_repr(self):
        return f"{self.weight.shape[1]}->{self.weight.shape[0]}, relu={self.relu}"

    def plan(self, inputs, ctx):
        from ..validation import check_matmul

        (x,) = inputs
        dtype = x.dtype
        fan_out, fan_in = self.weight.shape
        if x.shape[-1] != fan_in:
            raise ValueError(f"Linear: expected input (..., {fan_in}), got {x.shape}")
        wt = ctx.pack(self, "weight_t", self.weight.T, dtype)  # (in, out) contiguous
        bias = None if self.bias is None else ctx.pack(self, "bias", self.bias, dtype)
        lead = x.shape[:-1]
        rows = int(np.prod(lead))
        impl = ctx.choose("matmul", check_matmul(np.empty((rows, fan_in), dtype), wt))
        ctx.note(self, impl)
        kernel, relu = impl.kernel, self.relu

        def run(x):
            out = np.empty((rows, fan_out), dtype)
            if rows:
                kernel(_c(x).reshape(rows, fan_in), wt, out)
            if bias is not None:
                np.add(out, bias, out=out)
            if relu:
                np.maximum(out, 0, out=out)
            return out.reshape(lead + (fan_out,))
        return run

    def reference(self, x):
        out = oracle.matmul(x, self.weight.T)
        if self.bias is not None:
            out = out + self.bias
        return np.maximum(out, 0) if self.relu else out


# ---------------------------------------------------------------------------- containers
class Sequential(Layer):
    """Layers (or containers) applied one after another."""

    def __init__(self, *layers):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for layer in layers:
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: expected fastops.nn layers, got "
                                f"{type(layer).__name__}")
        self.layers = list(layers)

    def _emit(self, builder, x):
        for layer in self.layers:
            x = layer._emit(builder, x)
        return x

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __repr__(self):
        inner = "\n".join("  " + repr(layer).replace("\n", "\n  ") for layer in self.layers)
        return f"Sequential(\n{inner}\n)"


class Residual(Layer):
    """out = body(x) + shortcut(x), then ReLU when ``relu`` (a ResNet BasicBlock's tail).

    ``shortcut`` None is the identity (x itself); a ResNet downsample is a Sequential of a
    strided 1x1 Conv2d and a BatchNorm2d.
    """

    def __init__(self, body, shortcut=None, relu=True):
        self.body, self.shortcut, self.relu = body, shortcut, relu

    def _emit(self, builder, x):
        main = self.body._emit(builder, x)
        side = x if self.shortcut is None else self.shortcut._emit(builder, x)
        out = builder.add(Add(), (main, side))
        return builder.add(ReLU(), (out,)) if self.relu else out

    def __repr__(self):
        return (f"Residual(relu={self.relu},\n  body={self.body!r},\n"
                f"  shortcut={self.shortcut!r})").replace("\n", "\n  ")


def BasicBlock(conv1, bn1, conv2, bn2, downsample=None):
    """ResNet's BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))."""
    return Residual(Sequential(conv1, bn1, ReLU(), conv2, bn2), downsample, relu=True)
