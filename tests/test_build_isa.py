"""A Cython build moved to a CPU without the instruction sets it was compiled for must be
refused at import (with a warning) and fastops must fall back to another backend — never SIGILL."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fastops import backends

pytestmark = pytest.mark.skipif("cython" not in backends.available(),
                                reason="cython backend not available here")


def test_missing_isa_logic():
    from fastops.kernels.cython import missing_isa

    assert missing_isa(["avx2", "fma"], {"avx2", "fma", "sse4_2"}) == []
    assert missing_isa(["avx512f", "avx2"], {"avx2"}) == ["avx512f"]
    assert missing_isa(None, {"avx2"}) == []  # no record: nothing to compare
    assert missing_isa(["avx512f"], None) == []  # no /proc/cpuinfo: nothing to compare


def test_build_record_matches_this_cpu():
    from fastops.kernels.cython import _build_isa, cpu_flags, missing_isa

    assert missing_isa(_build_isa.REQUIRED_CPU_FLAGS, cpu_flags()) == []


def test_foreign_build_is_refused_and_numba_takes_over():
    code = textwrap.dedent("""
        import sys, types, warnings
        fake = types.ModuleType("fastops.kernels.cython._build_isa")
        fake.MARCH_FLAGS = ["-march=future"]
        fake.REQUIRED_CPU_FLAGS = ["avx2", "avx9000"]
        sys.modules[fake.__name__] = fake
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastops
            from fastops import backends, api
            impls = fastops.implementations()
        assert any("avx9000" in str(w.message) for w in caught), caught
        assert "cython" in backends.unavailable(), backends.unavailable()
        assert "avx9000" in backends.unavailable()["cython"]
        assert not [i for i in impls if i.backend == "cython"]
        print(api.choose("matmul", "cpu", "float32").backend)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] in ("numba", "numpy")
