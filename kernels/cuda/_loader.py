"""Loading the CUDA C chapters: find CuPy and a GPU, read the sources, compile once per device.

The kernels live as plain ``.cu`` text beside this file and are compiled at run time by NVRTC
through :class:`cupy.RawModule`, as CuPy itself does. Three things happen here and nowhere else:

* :func:`require_cupy` is called at import time by each kernel module; it raises ImportError
  with the reason ("CuPy not installed", "no CUDA GPU available: ...") so that
  :mod:`fastops.backends` records the ``cupy`` backend as unavailable instead of registering it.
* Compile-time constants (tile sizes, the conv element type) are ``-D`` defines built from the
  tables below: :data:`MATMUL_DEFINES`, :data:`WARPTILES`, :data:`CONV_TILES` and
  :data:`PIPELINED_TILES`. The Python launchers read the same tables to size their grids, and
  ``tests/test_cuda.py`` compiles every source with ``nvcc`` for exactly the variants in
  :data:`BUILD_VARIANTS` (every warptile candidate and pipelined conv tile included), so the
  three cannot drift apart. :func:`check_warptile` writes down
  what the warptiled kernel assumes of its tile.
* :func:`kernel` compiles a (source, defines) pair once per device and caches the module in a
  dict keyed by (device id, source text, options): no recompilation per call.

This module imports CuPy lazily, so it (and the nvcc compile check) works without CuPy.
"""
from __future__ import annotations

import functools
import re
import threading
from importlib import resources
from typing import NamedTuple

# ------------------------------------------------------------------------------ compile-time
# matmul.cu tile sizes (float32). TILE: the 32 x 32 blocks of stages naive..smem (32 = one warp
# wide, so a warp covers one row of the tile). BT_*: stages blocktiled and vectorized, each of
# 256 threads owning an 8 x 8 block of a 128 x 128 tile of C; the A and B tiles take
# (128*8 + 8*128) * 4 B = 8 KiB of shared memory. These are siboehm/SGEMM_CUDA's published
# choices for its kernels 5 and 6 (tuned on an A6000); they have not been re-tuned for the H200.
# The warptiled stage's WT_* defines come from a WarpTile (below), chosen among candidates.
BLOCKTILE_DEFINES = {
    "TILE": 32,
    "BT_BM": 128, "BT_BN": 128, "BT_BK": 8, "BT_TM": 8, "BT_TN": 8,
}
BT_THREADS = (BLOCKTILE_DEFINES["BT_BM"] // BLOCKTILE_DEFINES["BT_TM"]) * (
    BLOCKTILE_DEFINES["BT_BN"] // BLOCKTILE_DEFINES["BT_TN"])

WARP = 32
MAX_STATIC_SMEM = 48 * 1024  # bytes of static __shared__ per block (more needs an opt-in)
MAX_REGS_PER_THREAD = 255
REGS_PER_SM = 65536  # every sm_80 / sm_90 part; __launch_bounds__(NT) must fit one block


class WarpTile(NamedTuple):
    """Tile of the warptiled stage (the WT_* defines of matmul.cu).

    A block of ``nt`` threads owns a ``bm`` x ``bn`` tile of C and walks K in ``bk``-deep
    slices; each warp owns a ``wm`` x ``wn`` warp tile, covered in ``wmiter`` x ``wniter``
    sub-tiles, and in each sub-tile a lane holds a ``tm`` x ``tn`` fragment.
    """

    bm: int
    bn: int
    bk: int
    wm: int
    wn: int
    wniter: int
    tm: int
    tn: int
    nt: int

    @property
    def wmiter(self) -> int:  # as the WT_WMITER macro computes it (integer division)
        return (self.wm * self.wn) // (WARP * self.tm * self.tn * self.wniter)

    @property
    def results_per_thread(self) -> int:
        return self.wmiter * self.tm * self.wniter * self.tn

    @property
    def smem_bytes(self) -> int:  # As (BK x BM) + Bs (BK x BN), float32
        return 4 * self.bk * (self.bm + self.bn)

    @property
    def label(self) -> str:
        return (f"{self.bm}x{self.bn}x{self.bk} warp {self.wm}x{self.wn} (wniter {self.wniter}) "
                f"thread {self.tm}x{self.tn}, {self.nt} threads")

    def defines(self) -> dict:
        return {f"WT_{field.upper()}": value for field, value in self._asdict().items()}


def check_warptile(tile: WarpTile) -> WarpTile:
    """``tile`` if matmul_warptiled (matmul.cu) computes correct results with it; otherwise
    ValueError saying which assumption of the kernel it breaks.

    The kernel's static_asserts catch some of these only at compile time, and the integer
    division in WT_WMITER would let others through silently (rows of C left unwritten). The
    last rule (registers) is necessary, not sufficient: the nvcc test checks for real spills.
    """
    t = tile
    if not all(isinstance(v, int) and v > 0 for v in t):
        raise ValueError(f"warptile {t}: every size must be a positive int")
    rules = [
        (t.bm % t.wm == 0 and t.bn % t.wn == 0,
         "warp tiles (WM x WN) must tile the block tile (BM % WM == BN % WN == 0)"),
        (t.nt == WARP * (t.bm // t.wm) * (t.bn // t.wn),
         "one warp per warp tile: NT == 32 * (BM / WM) * (BN / WN)"),
        ((t.wm * t.wn) % (WARP * t.tm * t.tn * t.wniter) == 0 and t.wmiter >= 1,
         "32 lanes x TM x TN fragments x WMITER x WNITER sub-tiles must cover the warp tile "
         "exactly: (WM * WN) % (32 * TM * TN * WNITER) == 0"),
        (t.wmiter >= 1 and t.wm % t.wmiter == 0 and t.wn % t.wniter == 0,
         "sub-tiles must divide the warp tile (WM % WMITER == WN % WNITER == 0)"),
        (t.wmiter >= 1 and (t.wm // t.wmiter) % t.tm == 0 and (t.wn // t.wniter) % t.tn == 0,
         "lane fragments must divide a sub-tile (WSUBM % TM == WSUBN % TN == 0)"),
        (t.tn % 4 == 0, "C is stored as float4: TN % 4 == 0"),
        (t.bk % 4 == 0 and t.bn % 4 == 0,
         "tiles are loaded as float4 along K (A) and N (B): BK % 4 == BN % 4 == 0"),
        ((t.bm * t.bk // 4) % t.nt == 0 and (t.bk * t.bn // 4) % t.nt == 0,
         "every thread loads the same number of float4 chunks: (BM*BK/4) % NT == "
         "(BK*BN/4) % NT == 0"),
        (t.nt <= 1024, "at most 1024 threads per block"),
        (t.smem_bytes <= MAX_STATIC_SMEM,
         f"As + Bs = 4*BK*(BM+BN) = {t.smem_bytes} B exceeds the {MAX_STATIC_SMEM} B of "
         "static shared memory a block may declare"),
        (t.results_per_thread + t.wmiter * t.tm + t.wniter * t.tn
         <= min(MAX_REGS_PER_THREAD, REGS_PER_SM // t.nt),
         f"{t.results_per_thread} accumulators + the A and B fragments cannot fit in the "
         f"{min(MAX_REGS_PER_THREAD, REGS_PER_SM // t.nt)} registers a thread of a "
         f"{t.nt}-thread block may use: certain spills"),
    ]
    for ok, reason in rules:
        if not ok:
            raise ValueError(f"warptile {t.label}: {reason}")
    return tile


# Candidate tiles for the warptiled stage, to be timed against each other on the target GPU by
# the sweep in benchmarks/gpu_bench.py (at 4096^3, beside cuBLAS). They were chosen from what
# is published for this kernel on Ampere-class GPUs and all lie in siboehm's kernel-10
# autotuning space (scripts/kernel_10_autotuner.sh: BK 8..64, BM, BN 64..256, 128 or 256
# threads); none was measured here (no GPU where this was written). Register counts are
# ptxas's (nvcc 13.0, -arch=sm_90); the blocks per SM follow from them and the 65536 registers
# of an SM (the sweep reports the real figure). Every candidate is compile-checked by CI
# (BUILD_VARIANTS) and run on the CPU emulation by tests/test_cuda.py.
WARPTILES = {
    # siboehm/SGEMM_CUDA kernel 10's A6000 setting: the stage's default until a sweep on the
    # GPU picks another. 223 registers: 2 blocks of 4 warps per SM; 128 results per thread.
    "siboehm-a6000": WarpTile(bm=128, bn=128, bk=16, wm=64, wn=64, wniter=4, tm=8, tn=4, nt=128),
    # Kernel 10's published A100 setting: half the block tile, 4 x 4 fragments, 64 results per
    # thread. 167 registers: 3 blocks per SM, more warps to hide latency with.
    "siboehm-a100": WarpTile(bm=64, bn=128, bk=16, wm=32, wn=64, wniter=1, tm=4, tn=4, nt=128),
    # Kernel 11's A6000 setting (there with double-buffered loads, here without): a 128 x 256
    # block of 8 warps, each 128 x 32 in 8 x 8 fragments. Twice the block tile, so 3/4 of the
    # default's global loads per FMA ((128 + 256) / (128 * 256)); 182 registers: 1 block
    # (8 warps) per SM.
    "siboehm-k11": WarpTile(bm=128, bn=256, bk=16, wm=128, wn=32, wniter=1, tm=8, tn=8, nt=256),
    # The default's warp tile (64 x 64, 8 x 4 fragments) in a 128 x 256 block of 8 warps: the
    # larger block without changing the warp-level code path. 219 registers: 1 block per SM.
    "wide-256t": WarpTile(bm=128, bn=256, bk=16, wm=64, wn=64, wniter=4, tm=8, tn=4, nt=256),
    # The default with BK = 32: half the __syncthreads() per FMA, 32 KiB of shared memory.
    # 248 registers, close to the 255 cap: 2 blocks per SM.
    "bk32": WarpTile(bm=128, bn=128, bk=32, wm=64, wn=64, wniter=4, tm=8, tn=4, nt=128),
    # BK = 8 with 256 threads of 64 results (8 warps of 64 x 32): 109 registers, 2 blocks
    # (16 warps) per SM: latency hidden by more warps rather than by more work per thread.
    "bk8-256t": WarpTile(bm=128, bn=128, bk=8, wm=64, wn=32, wniter=2, tm=8, tn=4, nt=256),
}
WARPTILE = WARPTILES["siboehm-a6000"]  # the registered stage's tile


@functools.lru_cache(maxsize=None)
def matmul_defines(tile: WarpTile = WARPTILE) -> dict:
    """All -D defines of matmul.cu with the warptiled stage's tile set to ``tile`` (checked).

    Cached per tile, so the launcher pays for the check once; the dict is shared: read only.
    """
    return {**BLOCKTILE_DEFINES, **check_warptile(tile).defines()}


MATMUL_DEFINES = matmul_defines(WARPTILE)


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


# Implicit-GEMM conv tiles of stage implicit_gemm (conv2d.cu). "wide": 64 channels x 64
# pixels, 256 threads of 4 x 4 outputs, for layers with many output channels per group (all
# dense ResNet layers). "narrow": 1 channel x 256 pixels for few channels per group
# (depthwise: K/groups = 1), where a 64-channel tile would waste 63/64 of its multiply-adds on
# padding. The later stages (pipelined, fused) keep using the narrow tile for such layers.
CONV_TILES = {
    "wide": ConvTile(bm=64, bn=64, bk=16, tm=4, tn=4),
    "narrow": ConvTile(bm=1, bn=256, bk=16, tm=1, tn=1),
}
WIDE_MIN_CHANNELS = 16  # K/groups at or above this uses the wide tile (a guess, not measured)

CONV_DTYPES = {"float32": "float", "float64": "double"}  # numpy name -> C type of REAL

# Tiles of stage pipelined (conv_pipelined.cuh), per dtype, largest first: the launcher takes
# the first that still puts at least one block on every SM (conv2d.choose_pipelined_tile), and
# splits the reduction when none does (conv2d.choose_split_k).
# Tile i is compiled as kernel <prefix>_<i> with the PIPE<i>_* defines. Every tile has 256
# threads or fewer and BK = 8 (siboehm's kernel 6: 128 x 128 x 8, 8 x 8 per thread).
#   float32: 8 x 8 outputs per thread for the 128 x 128 tile (64 accumulators: 16 FMAs per
#   128-bit shared load), 8 x 4 / 4 x 8 for the half tiles, 4 x 4 for 64 x 64.
#   float64: a double takes two registers, so 8 x 8 doubles (128 registers of accumulators)
#   would leave too few for the fragments and the staged loads; the float64 tiles use 4 x 4
#   (32 registers of accumulators; the largest tile is 64 x 64), except 32 x 64, where ptxas
#   spilled 8 bytes at 4 x 4 (96 registers, nvcc 13.0 sm_90) and 2 x 4 with 256 threads does not.
PIPELINED_TILES = {
    "float32": (
        ConvTile(bm=128, bn=128, bk=8, tm=8, tn=8),
        ConvTile(bm=128, bn=64, bk=8, tm=8, tn=4),
        ConvTile(bm=64, bn=128, bk=8, tm=4, tn=8),
        ConvTile(bm=64, bn=64, bk=8, tm=4, tn=4),
    ),
    "float64": (
        ConvTile(bm=64, bn=64, bk=8, tm=4, tn=4),
        ConvTile(bm=64, bn=32, bk=8, tm=4, tn=4),
        ConvTile(bm=32, bn=64, bk=8, tm=2, tn=4),
        ConvTile(bm=32, bn=32, bk=8, tm=4, tn=4),
    ),
}
PIPELINED_SLOTS = 4  # kernels <prefix>_0 .. _3 in conv2d.cu and conv2d_bias_relu.cu


def conv_defines(real: str) -> dict:
    """-D defines of the conv sources for element type ``real`` ("float" or "double")."""
    defines = {"REAL": real}
    for name, tile in CONV_TILES.items():
        for field, value in tile._asdict().items():
            defines[f"{name.upper()}_{field.upper()}"] = value
    dtype = {c: name for name, c in CONV_DTYPES.items()}[real]
    for i, tile in enumerate(PIPELINED_TILES[dtype]):
        for field, value in tile._asdict().items():
            defines[f"PIPE{i}_{field.upper()}"] = value
    return defines


# Every (source, defines) combination the Python modules compile; the nvcc test compiles these.
BUILD_VARIANTS = {
    "matmul.cu": [matmul_defines(tile) for tile in WARPTILES.values()],
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
