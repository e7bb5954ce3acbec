"""Loading the CUDA C chapters: find CuPy and a GPU, read the sources, compile once per device.

The kernels live as plain ``.cu`` text beside this file and are compiled at run time by NVRTC
through :class:`cupy.RawModule`, as CuPy itself does. Three things happen here and nowhere else:

* :func:`require_cupy` is called at import time by each kernel module; it raises ImportError
  with the reason ("CuPy not installed", "no CUDA GPU available: ...") so that
  :mod:`fastops.backends` records the ``cupy`` backend as unavailable instead of registering it.
* Compile-time constants (tile sizes, the conv element type) are ``-D`` defines built from the
  tables below: :data:`MATMUL_DEFINES` and :data:`CONV_TILES`. The Python launchers read the
  same tables to size their grids, and ``tests/test_cuda.py`` compiles every source with
  ``nvcc`` for exactly the variants in :data:`BUILD_VARIANTS`, so the three cannot drift apart.
* :func:`kernel` compiles a (source, defines) pair once per device and caches the module in a
  dict keyed by (device id, source text, options): no recompilation per call.

This module imports CuPy lazily, so it (and the nvcc compile check) works without CuPy.
"""
from __future__ import annotations

import re
import threading
from importlib import resources
from typing import NamedTuple

# ------------------------------------------------------------------------------ compile-time
# matmul.cu tile sizes (float32). TILE: the 32 x 32 blocks of stages naive..smem (32 = one warp
# wide, so a warp covers one row of the tile). BT_*: stages blocktiled and vectorized, each of
# 256 threads owning an 8 x 8 block of a 128 x 128 tile of C; the A and B tiles take
# (128*8 + 8*128) * 4 B = 8 KiB of shared memory. WT_*: stage warptiled, 128 threads (4 warps,
# each a 64 x 64 warp tile), BK = 16: 16 KiB of shared memory, 128 accumulators per thread.
# These are siboehm/SGEMM_CUDA's published choices for its kernels 5, 6 and 10 (tuned on an
# A6000); they have not been re-tuned for the H200.
MATMUL_DEFINES = {
    "TILE": 32,
    "BT_BM": 128, "BT_BN": 128, "BT_BK": 8, "BT_TM": 8, "BT_TN": 8,
    "WT_BM": 128, "WT_BN": 128, "WT_BK": 16, "WT_WM": 64, "WT_WN": 64, "WT_WNITER": 4,
    "WT_TM": 8, "WT_TN": 4, "WT_NT": 128,
}
BT_THREADS = (MATMUL_DEFINES["BT_BM"] // MATMUL_DEFINES["BT_TM"]) * (
    MATMUL_DEFINES["BT_BN"] // MATMUL_DEFINES["BT_TN"])


class ConvTile(NamedTuple):
    """Block tile of the implicit-GEMM conv: BM output channels x BN output pixels, BK-deep
    slices of the reduction, each thread computing TM x TN outputs."""

    bm: int
    bn: int
    bk: int
    tm: int
    tn: int

    @property
    def threads(self) -> int:
        return (self.bm // self.tm) * (self.bn // self.tn)


# Implicit-GEMM conv tiles (conv2d.cu, conv2d_bias_relu.cu). "wide": 64 channels x 64 pixels,
# 256 threads of 4 x 4 outputs, for layers with many output channels per group (all dense
# ResNet layers). "narrow": 1 channel x 256 pixels for few channels per group (depthwise:
# K/groups = 1), where a 64-channel tile would waste 63/64 of its multiply-adds on padding.
CONV_TILES = {
    "wide": ConvTile(bm=64, bn=64, bk=16, tm=4, tn=4),
    "narrow": ConvTile(bm=1, bn=256, bk=16, tm=1, tn=1),
}
WIDE_MIN_CHANNELS = 16  # K/groups at or above this uses the wide tile (a guess, not measured)

CONV_DTYPES = {"float32": "float", "float64": "double"}  # numpy name -> C type of REAL


def conv_defines(real: str) -> dict:
    """-D defines of the conv sources for element type ``real`` ("float" or "double")."""
    defines = {"REAL": real}
    for name, tile in CONV_TILES.items():
        for field, value in tile._asdict().items():
            defines[f"{name.upper()}_{field.upper()}"] = value
    return defines


# Every (source, defines) combination the Python modules compile; the nvcc test compiles these.
BUILD_VARIANTS = {
    "matmul.cu": [MATMUL_DEFINES],
    "conv2d.cu": [conv_defines(c) for c in CONV_DTYPES.values()],
    "conv2d_bias_relu.cu": [conv_defines(c) for c in CONV_DTYPES.values()],
}

# NVRTC / nvcc options besides the defines. No fast-math: NaN and Inf must propagate. FMA
# contraction stays on (the default), which the error bound in fastops.testing allows. CuPy
# itself appends -ftz=true (float32 denormals flush to zero), which that bound's underflow
# allowance covers; the target architecture is CuPy's choice for the current device.
BASE_OPTIONS = ("--std=c++17",)


def options(defines: dict) -> tuple:
    return BASE_OPTIONS + tuple(f"-D{k}={v}" for k, v in defines.items())


# ------------------------------------------------------------------------------ sources
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def read_source(filename: str) -> str:
    """The text of a source file shipped in this package (kernels/cuda/)."""
    return resources.files(__package__).joinpath(filename).read_text(encoding="utf-8")


def expanded_source(filename: str, _seen: set | None = None) -> str:
    """``filename`` with each ``#include "x.cuh"`` replaced by that file's text (once each).

    NVRTC is given one self-contained string, so the kernels compile the same way wherever
    the package is installed (no include path to get right).
    """
    seen = set() if _seen is None else _seen

    def paste(match):
        name = match.group(1)
        if name in seen:
            return f"// (#include \"{name}\": already pasted above)"
        seen.add(name)
        return f"// ---- begin {name}\n{expanded_source(name, seen)}\n// ---- end {name}"

    text = _INCLUDE.sub(paste, read_source(filename))
    return text.replace("#pragma once", "")


# ------------------------------------------------------------------------------ CuPy + GPU
def require_cupy():
    """CuPy, if it is installed and sees a CUDA GPU; ImportError saying why not otherwise."""
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA install
        raise ImportError(f"CuPy not installed ({type(exc).__name__}: {exc}); "
                          "pip install cupy-cuda13x") from exc
    try:
        ok = bool(cupy.cuda.is_available())
    except Exception as exc:  # noqa: BLE001
        raise ImportError(f"no CUDA GPU available: {type(exc).__name__}: {exc}") from exc
    if not ok:
        raise ImportError(f"no CUDA GPU available: {_why_no_gpu(cupy)}")
    return cupy


def _why_no_gpu(cupy) -> str:
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - the driver's own words are the best reason
        return f"{type(exc).__name__}: {exc}"
    return f"cupy.cuda.is_available() is False ({count} devices)"


_lock = threading.Lock()
_modules: dict = {}  # (device id, source text, options) -> cupy.RawModule
_functions: dict = {}  # (device id, filename, defines, kernel name) -> cupy.RawKernel


def kernel(filename: str, name: str, defines: dict):
    """The compiled ``extern "C"`` kernel ``name`` of ``filename`` for the current device."""
    import cupy

    device = cupy.cuda.Device().id
    fkey = (device, filename, tuple(defines.items()), name)
    fn = _functions.get(fkey)
    if fn is not None:
        return fn
    with _lock:
        code = expanded_source(filename)
        opts = options(defines)
        mkey = (device, code, opts)
        module = _modules.get(mkey)
        if module is None:
            module = cupy.RawModule(code=code, options=opts)
            _modules[mkey] = module
        fn = _functions[fkey] = module.get_function(name)
    return fn


def cdiv(n: int, d: int) -> int:
    return -(-n // d)


MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y and gridDim.z (gridDim.x allows 2^31 - 1)


def check_grid(grid: tuple, what: str) -> tuple:
    if any(g > MAX_GRID_YZ for g in grid[1:]) or grid[0] >= 2**31:
        raise ValueError(f"{what}: launch grid {grid} exceeds CUDA's limits "
                         f"(x < 2^31, y and z <= {MAX_GRID_YZ})")
    return grid
