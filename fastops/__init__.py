"""fastops: hand-optimised inference kernels (matmul, conv2d, conv2d + bias + ReLU).

Each op is a ladder of stages (naive -> vectorized -> parallel -> tiled -> fused) in Numba and
Cython on the CPU and CUDA C (through CuPy) on the GPU. ``fastops.implementations()`` lists what
this machine has.
"""
from .api import conv2d, conv2d_bias_relu, implementations, matmul
from .tuning import tune

__version__ = "0.1.0"
__all__ = ["matmul", "conv2d", "conv2d_bias_relu", "implementations", "tune", "__version__"]
