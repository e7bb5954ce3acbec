"""conv2d and conv2d + bias + ReLU: every registered (backend, stage) per ResNet-50 shape,
plus NumPy and PyTorch."""
from conftest import run_benchmark

OPS = ("conv2d", "conv2d_bias_relu")


def test_conv(benchmark, bench_entry, bench_dtype):
    run_benchmark(benchmark, bench_entry, bench_dtype)
