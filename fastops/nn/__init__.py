"""fastops.nn: run small CNNs (ResNet-style) on fastops kernels, from PyTorch models or built here.

    import fastops.nn as fnn
    graph = fnn.from_torch(torch_model.eval())   # torch.fx trace -> fastops graph
    y = graph(x)                                 # first run: fold BN, fuse, pack, tune, plan

or, without torch:

    net = fnn.Sequential(fnn.Conv2d(w, b, padding=1), fnn.BatchNorm2d(mean, var, g, beta),
                         fnn.ReLU(), fnn.GlobalAvgPool2d(), fnn.Flatten(), fnn.Linear(W, c))
    y = net(x)

See :mod:`fastops.nn.graph` for what happens before the first run, and :mod:`fastops.tuning`
for the per-layer kernel choice.
"""
from .graph import Graph, Node, optimize
from .layers import (Add, AdaptiveAvgPool2d, BasicBlock, BatchNorm2d, Conv2d, Flatten,
                     GlobalAvgPool2d, Identity, Layer, Linear, MaxPool2d, ReLU, Residual,
                     Sequential, fold_batchnorm)
from .torch_import import from_torch

__all__ = ["Graph", "Node", "optimize", "Layer", "Conv2d", "BatchNorm2d", "ReLU", "Add",
           "Identity", "MaxPool2d", "AdaptiveAvgPool2d", "GlobalAvgPool2d", "Flatten", "Linear",
           "Sequential", "Residual", "BasicBlock", "fold_batchnorm", "from_torch", "compile"]


def compile(module, **options) -> Graph:
    """The graph of a fastops.nn module or container (``Graph`` options: backend, autotune)."""
    return Graph.from_module(module, **options)
