"""The fastops command line: clear errors for bad names, `fastops info` runs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastops import registry
from fastops.cli import main


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_unknown_op_lists_valid_ops(capsys):
    err = _error(capsys, ["bench", "--op", "matmull"])
    assert "unknown op 'matmull'" in err
    for op in registry.OPS:
        assert op in err


def test_unknown_backend_lists_registered_backends(capsys):
    err = _error(capsys, ["bench", "--backend", "fortran"])
    assert "unknown backend 'fortran'" in err
    for backend in {i.backend for i in registry.implementations()}:
        assert backend in err
    assert "torch" in err


def test_unknown_stage_lists_stages(capsys):
    err = _error(capsys, ["bench", "--op", "matmul", "--stage", "warp-speed"])
    assert "unknown stage 'warp-speed'" in err
    for impl in registry.implementations("matmul"):
        assert impl.stage in err


def test_bad_dtype_and_exclusive_modes(capsys):
    assert "invalid choice" in _error(capsys, ["bench", "--dtype", "float16"])
    assert "not allowed with" in _error(capsys, ["bench", "--quick", "--full"])


def test_info_runs(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CPU" in out and "backends available" in out and "numpy" in out


def test_info_json_via_python_m():
    done = subprocess.run([sys.executable, "-m", "fastops", "info", "--json"],
                          capture_output=True, text=True, timeout=120, check=True)
    info = json.loads(done.stdout)
    assert "numpy" in info["backends"]["available"]
    assert info["cpu"]["logical_cpus"] >= 1 and "numpy" in info["versions"]
    assert {"OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"} <= set(info["env"])
