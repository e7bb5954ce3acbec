"""matmul: every registered (backend, stage) per shape, plus NumPy and PyTorch."""
from conftest import run_benchmark

OPS = ("matmul",)


def test_matmul(benchmark, bench_entry, bench_dtype):
    run_benchmark(benchmark, bench_entry, bench_dtype)
