"""The registry is the single source of names, and every stage keeps the project's rules."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import fastops
from fastops import backends, registry

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
CPU_LADDER = ["naive", "vectorized", "parallel", "tiled"]


def test_names_are_unique_and_ladders_ordered():
    impls = fastops.implementations()
    names = [i.name for i in impls]
    assert len(names) == len(set(names))
    for op in registry.OPS:
        for backend in {i.backend for i in impls if i.op == op}:
            positions = [i.position for i in registry.ladder(op, backend)]
            assert positions == list(range(len(positions)))


@pytest.mark.parametrize("backend", ["numba", "cython"])
def test_cpu_backends_have_the_full_ladder(backend):
    if backend not in backends.available():
        pytest.skip(f"{backend} not available here: {backends.unavailable().get(backend)}")
    for op in ("matmul", "conv2d"):
        assert [i.stage for i in registry.ladder(op, backend)] == CPU_LADDER
    assert [i.stage for i in registry.ladder("conv2d_bias_relu", backend)] == CPU_LADDER + ["fused"]


def test_every_kernel_stage_opens_with_a_lesson():
    for impl in fastops.implementations():
        if impl.backend == "numpy":
            continue
        lesson = impl.lesson
        assert len(lesson) > 80, f"{impl.name}: docstring too thin to be a lesson: {lesson!r}"


def test_numba_naive_is_limited_to_small_problems():
    for impl in fastops.implementations():
        if impl.stage == "naive":
            assert impl.max_flops is not None, f"{impl.name} needs max_flops"


# A call of another library's multiply-add kernel (prose that merely names one is fine).
FORBIDDEN = re.compile(
    r"\b(np|numpy|cupy|cp|scipy\.linalg|torch)\.(dot|matmul|einsum|tensordot|inner|vdot|mm|bmm"
    r"|conv2d|blas\.\w+)\(|\bcublas\w*\(|\bcudnn\w*\(|\bcblas_\w+\("
    r"|^\s*(import|from)\s+(torch|scipy)\b", re.MULTILINE)


def test_no_borrowed_flops_in_kernels():
    """No fastops kernel calls BLAS or another library's kernel: grep and AST-check kernels/."""
    sources = [p for p in KERNELS.rglob("*") if p.suffix in {".py", ".pyx", ".pxd", ".pxi",
                                                              ".cu", ".cuh", ".h", ".c"}]
    sources = [p for p in sources if not (p.suffix == ".c" and p.with_suffix(".pyx").exists())]
    for path in sources:
        text = path.read_text()
        code = "\n".join(line.split("#")[0] if path.suffix in {".py", ".pyx"} else line
                         for line in text.splitlines())
        match = FORBIDDEN.search(code)
        assert match is None, f"{path.relative_to(KERNELS)} calls {match.group(0)!r}"
        if path.suffix == ".py":
            for node in ast.walk(ast.parse(text)):
                assert not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult)), (
                    f"{path.relative_to(KERNELS)}:{node.lineno} uses the @ operator")
