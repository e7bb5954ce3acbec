"""``from_torch``: a ``torch.nn`` model as a fastops graph, through ``torch.fx`` tracing.

Tracing (``torch.fx.symbolic_trace``) turns the model's ``forward`` into a graph of calls, so
any wiring is understood, not just a fixed block structure: a ResNet ``BasicBlock`` whose
forward does ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))`` becomes conv,
batchnorm, relu, conv, batchnorm, (conv, batchnorm,) add, relu nodes, and the graph optimiser
then folds and fuses them. The forward must be traceable: no Python control flow on tensor
values (control flow on module attributes, like ``if self.downsample is not None``, is fine).

Supported:
  modules    nn.Conv2d (zeros padding), nn.BatchNorm2d (running statistics, i.e. eval mode),
             nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear,
             nn.Identity, nn.Dropout (identity at inference), nn.Sequential (traced through)
  functions  + / torch.add / operator.iadd of two tensors, torch.relu / F.relu / .relu(),
             torch.flatten / .flatten()

Anything else raises ``NotImplementedError`` naming the layer or call. The weights are copied
(in float64) when converting, so later changes to the torch model do not reach the graph.
"""
from __future__ import annotations

import operator

from .graph import INPUT, Graph, Node
from . import layers as L


def _module_layer(name, module):
    import torch.nn as tnn

    if isinstance(module, tnn.Conv2d):
        if module.padding_mode != "zeros":
            raise NotImplementedError(f"from_torch: {name} (Conv2d) uses padding_mode="
                                      f"{module.padding_mode!r}; only 'zeros' is supported")
        padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        return L.Conv2d(_np(module.weight), None if module.bias is None else _np(module.bias),
                        stride=tuple(module.stride), padding=padding,
                        dilation=tuple(module.dilation), groups=module.groups)
    if isinstance(module, tnn.BatchNorm2d):
        if module.running_mean is None or module.running_var is None:
            raise NotImplementedError(f"from_torch: {name} (BatchNorm2d) has no running "
                                      "statistics (track_running_stats=False)")
        return L.BatchNorm2d(_np(module.running_mean), _np(module.running_var),
                             None if module.weight is None else _np(module.weight),
                             None if module.bias is None else _np(module.bias), module.eps)
    if isinstance(module, tnn.ReLU):
        return L.ReLU()
    if isinstance(module, tnn.MaxPool2d):
        if module.return_indices:
            raise NotImplementedError(f"from_torch: {name} (MaxPool2d) with return_indices")
        return L.MaxPool2d(module.kernel_size, module.stride, module.padding, module.dilation,
                           module.ceil_mode)
    if isinstance(module, tnn.AdaptiveAvgPool2d):
        return L.AdaptiveAvgPool2d(module.output_size)
    if isinstance(module, tnn.Flatten):
        return L.Flatten(module.start_dim, module.end_dim)
    if isinstance(module, tnn.Linear):
        return L.Linear(_np(module.weight), None if module.bias is None else _np(module.bias))
    if isinstance(module, (tnn.Identity, tnn.Dropout)):
        return L.Identity()
    raise NotImplementedError(f"from_torch: unsupported layer {name!r} of type "
                              f"{type(module).__module__}.{type(module).__name__}")


def _np(tensor):
    return tensor.detach().cpu().double().numpy()


def _function_layer(node):
    """The layer for a call_function / call_method node, or NotImplementedError."""
    import torch
    import torch.nn.functional as F

    target, args, kwargs = node.target, node.args, dict(node.kwargs)
    kwargs.pop("inplace", None)
    if node.op == "call_method":
        what = f"method .{target}()"
        if target in ("relu", "relu_") and len(args) == 1 and not kwargs:
            return L.ReLU(), args
        if target in ("add", "add_", "__add__", "__iadd__") and len(args) == 2 and not kwargs:
            return L.Add(), args
        if target == "flatten":
            return L.Flatten(*args[1:], **kwargs), args[:1]
    else:
        what = f"function {getattr(target, '__name__', target)}"
        if target in (operator.add, operator.iadd, torch.add) and len(args) == 2 and not kwargs:
            return L.Add(), args
        if target in (torch.relu, F.relu) and len(args) == 1 and not kwargs:
            return L.ReLU(), args
        if target is torch.flatten:
            return L.Flatten(*args[1:], **kwargs), args[:1]
    raise NotImplementedError(f"from_torch: unsupported {what} at node {node.name!r} "
                              f"(args {node.args}, kwargs {node.kwargs})")


def from_torch(module, *, backend=None, autotune=None) -> Graph:
    """Convert a ``torch.nn.Module`` (inference, eval-mode semantics) into a :class:`Graph`.

    BatchNorm uses the running statistics whatever ``module.training`` says: call
    ``module.eval()`` on the torch side to compare outputs.
    """
    import torch.fx
    import torch.nn as tnn

    if not isinstance(module, tnn.Module):
        raise TypeError(f"from_torch: expected a torch.nn.Module, got {type(module).__name__}")
    root = module
    if not isinstance(module, tnn.Sequential) and type(module).__module__.startswith("torch.nn"):
        # A single built-in layer: trace it as a one-layer Sequential so it stays a call_module.
        root = tnn.Sequential(module)
    try:
        traced = torch.fx.symbolic_trace(root)
    except Exception as exc:  # noqa: BLE001 - report which model failed and why
        raise NotImplementedError(f"from_torch: cannot trace {type(module).__name__} with "
                                  f"torch.fx ({type(exc).__name__}: {exc})") from exc

    nodes, names, output = [], {}, None
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise NotImplementedError(f"from_torch: expected a model with one input, got "
                                  f"{len(placeholders)}")
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            names[node] = INPUT
            continue
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, torch.fx.Node):
                raise NotImplementedError("from_torch: expected the model to return one tensor")
            output = names[result]
            continue
        if node.op == "call_module":
            layer = _module_layer(node.target, traced.get_submodule(node.target))
            args = node.args[:1]
            if len(node.args) != 1 or node.kwargs:
                raise NotImplementedError(f"from_torch: module {node.target!r} is called with "
                                          "extra arguments")
        elif node.op in ("call_function", "call_method"):
            layer, args = _function_layer(node)
        else:
            raise NotImplementedError(f"from_torch: unsupported graph node {node.op} "
                                      f"{node.target!r}")
        for arg in args:
            if not isinstance(arg, torch.fx.Node):
                raise NotImplementedError(f"from_torch: node {node.name!r} "
                                          f"({node.target}) has a non-tensor operand {arg!r}")
        name = node.name
        nodes.append(Node(name, layer, tuple(names[a] for a in args)))
        names[node] = name
    return Graph(nodes, output, backend=backend, autotune=autotune)
