"""The CUDA (CuPy) backend: graceful absence, compile checks, CPU emulation, GPU correctness.

Four layers, so that most of the backend is checked on machines without a GPU:

1. Without CuPy or a GPU, fastops imports, lists its implementations, and reports the cupy
   backend as unavailable with a reason.
2. Every ``.cu`` source under kernels/cuda compiles with ``nvcc`` for sm_80 and sm_90, with the
   exact ``-D`` defines the loader uses, and no kernel spills registers (skipped without nvcc);
   the same text also compiles with NVRTC when libnvrtc can be loaded (what CuPy uses).
3. The kernels *run* on the CPU: the expanded CUDA source is compiled with g++ behind a small
   emulation of the CUDA execution model (one std::thread per CUDA thread, std::barrier for
   __syncthreads, a block at a time, so ``__shared__`` is a static array), and the real Python
   launchers in kernels/cuda/*.py drive it through a stand-in ``cupy`` module. Every stage,
   every candidate tile of the warptiled stage and every tile of the pipelined conv stage
   (forced, on shapes that exercise each carry of its im2col counters) and its split-K path
   (S forced to 2, 3 and beyond the reduction's slice count, both stages) is checked against
   the float64 oracle: grids, index math, bounds checks and tile loops are exercised for real.
   Every emulated array sits between guard zones of NaN bytes, so a read past its ends that
   reaches a result, or any write there, fails the test; and the barrier-order test runs each
   shared-memory kernel with its threads serialised between barriers, in thread order and
   reversed, so a missing __syncthreads gives a stale read deterministically. Warp timing
   and the weaker orderings of the real memory model are not exercised (skipped without
   g++). The stand-in device reports an H200's 132 SMs, which the pipelined stage's tile
   choice reads.
4. On a machine with CuPy and a GPU, every registered cupy stage is checked against the
   oracle through the public API: CuPy in -> CuPy out on the same device, NumPy in -> NumPy out;
   every warptile candidate runs through its launcher (what benchmarks/gpu_bench.py sweeps),
   and every tile of the pipelined conv stage through its launchers, split-K included.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import fastops
from fastops import backends, oracle, registry
from fastops.kernels.cuda import _loader
from fastops.testing import assert_close
from fastops.validation import check_conv2d

MATMUL_LADDER = ["naive", "coalesced", "smem", "blocktiled", "vectorized", "warptiled"]
CONV_LADDER = ["naive", "implicit_gemm", "pipelined"]
FUSED_LADDER = CONV_LADDER + ["fused"]
CUDA_DIR = Path(_loader.__file__).parent
KERNEL_MODULES = ("fastops.kernels.cuda.matmul", "fastops.kernels.cuda.conv2d",
                  "fastops.kernels.cuda.conv2d_bias_relu")

# (M, K, N): 1s, primes, non-multiples of every tile (32, 128), K across BK = 8 and 16, and
# K, N multiples of 4 so the float4 paths run with partial tiles.
MATMUL_SHAPES = [(1, 1, 1), (3, 5, 7), (17, 31, 13), (130, 37, 129), (33, 68, 20),
                 (65, 20, 132), (1, 300, 1), (127, 131, 257)]
EMULATED_MATMUL_SHAPES = MATMUL_SHAPES[:6]
# For every warptile candidate: tiny shapes, and shapes that are non-multiples of every tile
# size (BM, BN 64..256; BK 8..32), with partial tiles on the float4 path (K, N % 4 == 0) too.
WARPTILES = _loader.WARPTILES
WARPTILE_SHAPES = [(1, 1, 1), (2, 3, 5), (131, 67, 97), (33, 68, 20), (257, 36, 260)]

# (N, C, H, W, K, kH, kW, stride, padding, dilation, groups)
CONV_CASES = [
    (1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1),
    (2, 3, 7, 9, 5, 3, 3, 1, 1, 1, 1),
    (2, 4, 11, 13, 6, 3, 2, (2, 1), (1, 2), (1, 2), 2),
    (1, 6, 10, 10, 6, 3, 3, 1, 1, 1, 6),               # depthwise: narrow tile
    (3, 8, 9, 7, 16, 1, 1, 1, 0, 1, 1),                 # 1x1, K/groups = 16: wide tile
    (1, 3, 23, 23, 8, 7, 7, 2, 3, 1, 1),                # stem-like 7x7 stride 2
    (2, 64, 9, 9, 70, 3, 3, 1, 1, 1, 1),                # 70 channels: a 64-tile plus a tail
    (1, 32, 8, 8, 64, 3, 3, 1, "same", 2, 2),           # dilation 2, groups 2
    (1, 4, 6, 5, 8, 2, 4, 1, "same", 1, 1),             # even kernel: asymmetric padding
    (2, 16, 7, 7, 32, 3, 3, 2, 1, 1, 4),                # K/groups = 8: narrow tile
]
# Shapes every tile of the pipelined stage is forced through: channel and pixel counts that
# are non-multiples of every tile (32..128), and every way the im2col row counters carry:
# taps 1 (a step of BK = 8 rows is 8 channels), 5 (1x5: one channel + 3 taps), 8 (= BK),
# 9 (3x3: 2 rows + 2 columns), 49 (7x7: 1 row + 1 column). ho*wo = 48 takes the 128-bit
# store path, 63 and 99 runs of pixels that cross images.
PIPELINED_CASES = [
    (1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1),
    (3, 5, 8, 6, 131, 3, 3, 1, 1, 1, 1),                # K > 128 with a tail; ho*wo = 48
    (2, 3, 7, 9, 5, 3, 3, 1, 1, 1, 1),                  # ho*wo = 63
    (2, 4, 11, 13, 6, 3, 2, (2, 1), (1, 2), (1, 2), 2),  # stride, dilation, groups, taps 6
    (1, 6, 10, 10, 6, 3, 3, 1, 1, 1, 6),                # depthwise forced onto a GEMM tile
    (3, 19, 9, 11, 17, 1, 1, 1, 0, 1, 1),               # 1x1, 99 pixels per image
    (1, 3, 23, 23, 8, 7, 7, 2, 3, 1, 1),                # 7x7 stride 2
    (1, 4, 6, 5, 8, 2, 4, 1, "same", 1, 1),             # 8 taps; asymmetric padding
    (2, 7, 5, 11, 67, 1, 5, 1, (0, 2), 1, 1),           # 1x5
    (2, 64, 9, 9, 70, 3, 3, 1, 1, 1, 1),                # 72 slices of the reduction
]


def _case_id(case):
    return "x".join(str(v).replace(" ", "") for v in case)


# ------------------------------------------------------------------------------ checks
def check_matmul(run, shape, rng, what, nan=False):
    """run(a, b) -> NumPy result for float32 NumPy inputs; compared with the float64 oracle."""
    m, k, n = shape
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    if nan:
        a[m // 2, k // 2] = np.nan  # the whole row m // 2 of the result must be NaN
    got = run(a, b)
    ref = oracle.matmul(a, b)
    assert_close(got, ref, oracle.matmul(np.abs(a), np.abs(b)), k, np.float32, what)
    if nan:
        assert np.isnan(got[m // 2]).all(), f"{what}: NaN did not propagate"


def conv_inputs(case, dtype, rng, nan=False):
    n, c, h, w, k, kh, kw, stride, padding, dilation, groups = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((k, c // groups, kh, kw)).astype(dtype)
    bias = rng.standard_normal(k).astype(dtype)
    if nan:
        x[0, 0, h // 2, w // 2] = np.nan
    return x, wt, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def check_conv(run, case, dtype, rng, what, fused=False, nan=False):
    """run(x, w, bias_or_None, kw) -> NumPy result; compared with the float64 oracle."""
    x, wt, bias, kw = conv_inputs(case, dtype, rng, nan)
    b = bias if fused else None
    got = run(x, wt, b, kw)
    ref = oracle.conv2d(x, wt, b, relu=fused, **kw)
    abs_ref = oracle.conv2d(x, wt, b, relu=fused, absolute=True, **kw)
    reduction = (wt.shape[1] * wt.shape[2] * wt.shape[3]) + (1 if fused else 0)
    assert_close(got, ref, abs_ref, reduction, dtype, what)
    if nan:
        assert np.isnan(got).any(), f"{what}: NaN did not propagate"


# ------------------------------------------------------------------------------ 1. no GPU
def test_fastops_imports_and_lists_without_gpu():
    impls = fastops.implementations()
    assert any(i.backend == "numpy" for i in impls)
    missing = backends.unavailable()
    if "cupy" in missing:
        reason = missing["cupy"]
        assert "CuPy not installed" in reason or "no CUDA GPU" in reason, reason
        assert not [i for i in impls if i.backend == "cupy"]
        with pytest.raises(ValueError, match="cupy is not available here"):
            fastops.matmul(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32),
                           backend="cupy", stage="naive")
    else:
        assert [i.stage for i in registry.ladder("matmul", "cupy")] == MATMUL_LADDER
        assert [i.stage for i in registry.ladder("conv2d", "cupy")] == CONV_LADDER
        assert [i.stage for i in registry.ladder("conv2d_bias_relu", "cupy")] == FUSED_LADDER
        assert all(i.device == "gpu" for i in registry.implementations(backend="cupy"))


def test_require_cupy_says_cupy_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(ImportError, match="CuPy not installed"):
        _loader.require_cupy()


def test_require_cupy_says_no_gpu(monkeypatch):
    def no_devices():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(is_available=lambda: False,
                                      runtime=types.SimpleNamespace(getDeviceCount=no_devices))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(ImportError, match="no CUDA GPU available: .*cudaErrorNoDevice"):
        _loader.require_cupy()


def test_every_cuda_source_has_a_build_variant():
    sources = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
    assert sources == sorted(_loader.BUILD_VARIANTS), "each .cu needs its -D variants in _loader"
    for name in sources:
        text = _loader.expanded_source(name)
        assert not re.search(r'^\s*#\s*include', text, re.MULTILINE), f"{name}: include left"
        assert re.search(r'extern "C" __global__', text)


def test_every_warptile_candidate_is_checked_and_built():
    """Each candidate passes check_warptile and is a build variant (so CI's nvcc check and
    the NVRTC check compile it); the registered stage's tile is one of them."""
    variants = _loader.BUILD_VARIANTS["matmul.cu"]
    assert _loader.WARPTILE in WARPTILES.values()
    assert _loader.MATMUL_DEFINES == _loader.matmul_defines(_loader.WARPTILE)
    assert len(set(WARPTILES.values())) == len(WARPTILES), "two candidates are the same tile"
    assert len(variants) == len(WARPTILES)
    for name, tile in WARPTILES.items():
        assert _loader.check_warptile(tile) is tile
        assert _loader.matmul_defines(tile) in variants, name


_DEFAULT = _loader.WarpTile(bm=128, bn=128, bk=16, wm=64, wn=64, wniter=4, tm=8, tn=4, nt=128)


# (tile, the reason check_warptile must give): one case per assumption of the kernel.
BAD_WARPTILES = [
    (_DEFAULT._replace(tm=0), "positive int"),
    (_DEFAULT._replace(tm=7.5), "positive int"),
    (_DEFAULT._replace(wm=48), "must tile the block tile"),
    (_DEFAULT._replace(nt=256), "one warp per warp tile"),
    (_DEFAULT._replace(wniter=3), "cover the warp tile exactly"),
    (_loader.WarpTile(128, 64, 8, 128, 16, 2, 2, 16, 128), "lane fragments must divide"),
    (_DEFAULT._replace(tn=2, wniter=8), r"TN % 4 == 0"),
    (_DEFAULT._replace(bk=6), r"BK % 4 == BN % 4 == 0"),
    (_loader.WarpTile(128, 128, 4, 32, 32, 1, 8, 4, 512), "same number of float4 chunks"),
    (_DEFAULT._replace(bk=64), "65536 B exceeds"),
    (_DEFAULT._replace(wm=128, nt=64), "256 accumulators"),
]


@pytest.mark.parametrize("tile, reason", BAD_WARPTILES, ids=[r for _, r in BAD_WARPTILES])
def test_check_warptile_rejects(tile, reason):
    _loader.check_warptile(_DEFAULT)  # most cases are one change away from this valid tile
    with pytest.raises(ValueError, match=re.escape(reason)):
        _loader.check_warptile(tile)
    with pytest.raises(ValueError, match=re.escape(reason)):
        _loader.matmul_defines(tile)  # what the launcher calls: a bad tile never compiles


# ------------------------------------------------------------------------------ 2. compile
NVCC = shutil.which("nvcc")
KERNEL_NAME = re.compile(r'extern "C" __global__ void\s+(?:__launch_bounds__\([^\n]*\)\s+)?(\w+)')
VARIANTS = [(src, i) for src, variants in _loader.BUILD_VARIANTS.items()
            for i in range(len(variants))]


_WARPTILE_NAMES = {tuple(_loader.matmul_defines(tile).items()): name
                   for name, tile in WARPTILES.items()}


def _variant_id(v):
    src, i = v
    defines = _loader.BUILD_VARIANTS[src][i]
    return f"{src}-{defines.get('REAL') or _WARPTILE_NAMES[tuple(defines.items())]}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_nvcc_compiles(variant, tmp_path):
    """nvcc: PTX for sm_80 and a cubin for sm_90 whose ptxas report shows no register spills."""
    src, i = variant
    defines = _loader.BUILD_VARIANTS[src][i]
    code = _loader.expanded_source(src)
    path = tmp_path / src
    path.write_text(code)
    entries = KERNEL_NAME.findall(code)
    assert entries
    opts = list(_loader.options(defines))
    ptx = tmp_path / "out.ptx"
    r = subprocess.run([NVCC, "--ptx", "-arch=sm_80", *opts, "-o", str(ptx), str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"nvcc sm_80 failed:\n{r.stderr}"
    ptx_text = ptx.read_text()
    for name in entries:
        assert f".entry {name}(" in ptx_text, f"{name} missing from the PTX"
    r = subprocess.run([NVCC, "--cubin", "-arch=sm_90", "-Xptxas", "-v", *opts,
                        "-o", str(tmp_path / "out.cubin"), str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"nvcc sm_90 failed:\n{r.stderr}"
    report = r.stdout + r.stderr
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == len(entries), report
    assert all(s == ("0", "0") for s in spills), f"register spills:\n{report}"
    assert "warning" not in report.lower(), report


def _nvrtc():
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
        return nvrtc
    except Exception as exc:  # noqa: BLE001 - no CuPy, or no libnvrtc
        pytest.skip(f"NVRTC not loadable here: {type(exc).__name__}: {str(exc)[:120]}")


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_nvrtc_compiles(variant):
    """NVRTC (CuPy's compiler) accepts the same text and options, no GPU needed."""
    nvrtc = _nvrtc()
    src, i = variant
    prog = nvrtc.createProgram(_loader.expanded_source(src), src, (), ())
    try:
        for arch in ("compute_80", "compute_90"):
            try:
                nvrtc.compileProgram(prog, [*_loader.options(_loader.BUILD_VARIANTS[src][i]),
                                            f"-arch={arch}"])
            except Exception as exc:  # noqa: BLE001
                pytest.fail(f"NVRTC {arch}: {exc}\n{nvrtc.getProgramLog(prog)}")
    finally:
        nvrtc.destroyProgram(prog)


# ------------------------------------------------------------------------------ 3. emulation
EMULATION_PRELUDE = r"""
// CPU emulation of the CUDA execution model, enough for fastops' kernels: a block's threads
// are std::threads meeting at a std::barrier; blocks run one after another, so __shared__
// arrays can be function-static. No warp-level operations are used by the kernels.
//
// Barrier-order mode (fastops_emu_set_order(1 or 2)): between two __syncthreads the block's
// threads run one at a time, each up to its next barrier (or its end), in thread order
// (1) or in reverse (2). Every shared-memory race that a barrier should have prevented
// then happens deterministically in one of the two orders: a thread that reads what
// another writes in the same barrier interval runs before the writer in one of them and
// reads the stale value (a missing __syncthreads in a double-buffered loop, a tree
// reduction without its barriers). Free-running threads (0, the default) meet such races
// only by chance.
#include <barrier>
#include <memory>
#include <semaphore>
#include <thread>
#include <vector>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
static dim3 blockIdx, blockDim, gridDim;
static thread_local dim3 threadIdx;
static std::barrier<>* emu_barrier;
static int emu_order = 0;  // 0 free-running, 1 serialised in thread order, 2 in reverse
extern "C" void fastops_emu_set_order(int order) { emu_order = order; }
namespace turnstile {
// Only the thread holding the turn runs, so the state needs no lock; each position waits on
// its own semaphore (waking every thread at each hand-over would cost threads^2 wake-ups).
static std::vector<char> state;  // per position: 0 to run this interval, 1 at the barrier, 2 done
static std::vector<std::binary_semaphore*> go;
static thread_local unsigned pos;
static void pass_on() {  // hand the turn to the next position still to run this interval
    const unsigned n = state.size();
    unsigned p = pos + 1;
    while (p < n && state[p] != 0) ++p;
    if (p == n) {  // every thread is at the barrier or done: the next interval begins
        for (auto& s : state) if (s == 1) s = 0;
        p = 0;
        while (p < n && state[p] != 0) ++p;
    }
    if (p < n) go[p]->release();
}
static void start(unsigned p) { pos = p; go[pos]->acquire(); }
static void sync() { state[pos] = 1; pass_on(); go[pos]->acquire(); }
static void finish() { state[pos] = 2; pass_on(); }
}  // namespace turnstile
static inline void __syncthreads() {
    if (emu_order) turnstile::sync(); else emu_barrier->arrive_and_wait();
}
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
struct alignas(16) float4 { float x, y, z, w; };
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct alignas(16) double2 { double x, y; };
static inline double2 make_double2(double x, double y) { return {x, y}; }
template <class F> static void emulate(dim3 grid, dim3 block, F body) {
    gridDim = grid; blockDim = block;
    const unsigned nt = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = {bx, by, bz};
        std::barrier<> bar(nt);
        emu_barrier = &bar;
        std::vector<std::unique_ptr<std::binary_semaphore>> sems;
        turnstile::state.assign(nt, 0);
        turnstile::go.clear();
        for (unsigned p = 0; p < nt; ++p) {  // position 0 holds the first turn
            sems.push_back(std::make_unique<std::binary_semaphore>(p == 0 ? 1 : 0));
            turnstile::go.push_back(sems.back().get());
        }
        std::vector<std::thread> threads;
        threads.reserve(nt);
        for (unsigned t = 0; t < nt; ++t)
            threads.emplace_back([&, t] {
                threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                if (emu_order) turnstile::start(emu_order == 1 ? t : nt - 1 - t);
                body();
                if (emu_order) turnstile::finish();
            });
        for (auto& th : threads) th.join();
    }
}
"""


class _EmuDevice:
    id = 0
    attributes = {"MultiProcessorCount": 132}  # an H200's, the target of the tile choice

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class EmuArray(np.ndarray):
    """A NumPy array with the two CuPy attributes the launchers use (.data.ptr, .device)."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    @property
    def device(self):
        return _EmuDevice()


GUARD_BYTES = 256  # of 0xFF on each side of every emulated device allocation


class _GuardedBuffer(np.ndarray):
    """The bytes of one emulated device allocation; ``guard_span`` = (first data byte, end)."""


def emu(array):
    """``array`` copied into an emulated device allocation: 64-byte aligned, between guard
    zones of 0xFF bytes. Those bytes are a NaN in float32 and float64, so a kernel that reads
    past an array's ends puts NaN into its result (the oracle check fails), and one that
    writes there is caught by :func:`check_guards` after every launch."""
    host = np.ascontiguousarray(array)
    raw = np.full(host.nbytes + 2 * GUARD_BYTES + 64, 0xFF, np.uint8).view(_GuardedBuffer)
    first = GUARD_BYTES + (-raw.__array_interface__["data"][0]) % 64
    raw.guard_span = (first, first + host.nbytes)
    dev = np.asarray(raw[first:first + host.nbytes]).view(host.dtype).reshape(host.shape)
    dev[...] = host
    return dev.view(EmuArray)


def check_guards(array, kernel):
    """The guard zones around the emulated allocation ``array`` lives in are untouched."""
    base = array
    while base is not None and getattr(base, "guard_span", None) is None:
        base = base.base
    if base is None:
        return
    first, end = base.guard_span
    raw = np.asarray(base)
    for zone, where in ((raw[:first], "before"), (raw[end:], "after")):
        bad = np.flatnonzero(zone != 0xFF)
        assert bad.size == 0, f"{kernel} wrote {bad.size} bytes {where} an array it was passed"


class _EmuKernel:
    last_launch = None  # (kernel name, grid, block) of the latest launch, for the tests
    launches: list = []  # every launch, in order (tests that need more than the last clear it)
    order = 0  # barrier-order mode of the launches (EMULATION_PRELUDE): 0, 1 or 2

    def __init__(self, lib, name, params):
        self.name, self.params = name, params
        self.fn = getattr(lib, f"fastops_launch_{name}")
        self.fn.restype = None
        self.set_order = lib.fastops_emu_set_order

    def __call__(self, grid, block, args):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        _EmuKernel.last_launch = (self.name, grid, block)
        _EmuKernel.launches.append(_EmuKernel.last_launch)
        assert grid[1] <= 65535 and grid[2] <= 65535 and grid[0] < 2**31, grid
        assert np.prod(block) <= 1024, block
        assert len(args) == len(self.params), (
            f"{self.name}: {len(args)} arguments passed, kernel takes {self.params}")
        holders = []
        for value, ptype in zip(args, self.params):
            if "*" in ptype:
                assert isinstance(value, np.ndarray), f"{self.name}: array expected for {ptype}"
                assert ("double" in ptype) == (value.dtype == np.float64), (ptype, value.dtype)
                holders.append(ctypes.c_void_p(value.__array_interface__["data"][0]))
            else:
                assert ptype == "int" and isinstance(value, np.int32), (ptype, type(value))
                holders.append(ctypes.c_int(int(value)))
        argv = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        self.set_order(_EmuKernel.order)
        self.fn(*[ctypes.c_uint(v) for v in grid + block], argv)
        for value in args:
            if isinstance(value, np.ndarray):
                check_guards(value, self.name)


class _EmuModule:
    """Stand-in for cupy.RawModule: builds the CUDA text with g++ behind EMULATION_PRELUDE."""

    build_dir: Path
    built: dict = {}  # digest of (text, defines) -> (library, kernel parameter types)

    def __init__(self, code, options=()):
        defines = [o for o in options if o.startswith("-D")]
        text = EMULATION_PRELUDE + code
        digest = hashlib.sha1((text + " ".join(defines)).encode()).hexdigest()[:16]
        if digest not in self.built:
            self.built[digest] = self._build(code, text, defines, digest)
        self.lib, self.kernels = self.built[digest]

    def _build(self, code, text, defines, digest):
        src = self.build_dir / f"emu_{digest}.cpp"
        src.write_text(text)
        cmd = ["g++", "-std=c++20", "-pthread", "-fno-strict-aliasing", "-w", *defines]
        pre = subprocess.run([*cmd, "-E", "-P", str(src)], capture_output=True, text=True)
        assert pre.returncode == 0, pre.stderr[-3000:]
        cuda_names = set(KERNEL_NAME.findall(code))
        kernels = {}
        for name, params in re.findall(r'extern "C" void\s+(\w+)\s*\(([^)]*)\)\s*\{', pre.stdout):
            if name not in cuda_names:
                continue
            types_ = [re.sub(r"\s+", " ", p.replace("__restrict", "")).strip().rsplit(" ", 1)[0]
                      for p in params.split(",")]
            kernels[name] = [t.replace(" *", "*") for t in types_]
        launchers = []
        for name, ptypes in kernels.items():
            call = ", ".join(f"*({t}*)a[{i}]" for i, t in enumerate(ptypes))
            launchers.append(
                f'extern "C" void fastops_launch_{name}(unsigned gx, unsigned gy, unsigned gz, '
                f"unsigned bx, unsigned by, unsigned bz, void** a) {{ emulate({{gx, gy, gz}}, "
                f"{{bx, by, bz}}, [&] {{ {name}({call}); }}); }}")
        src.write_text(text + "\n" + "\n".join(launchers) + "\n")
        lib = src.with_suffix(".so")
        r = subprocess.run([*cmd, "-O1", "-shared", "-fPIC", str(src), "-o", str(lib)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        return ctypes.CDLL(str(lib)), kernels

    def get_function(self, name):
        assert name in self.kernels, f"no kernel {name!r} in the source; has {list(self.kernels)}"
        return _EmuKernel(self.lib, name, self.kernels[name])


@pytest.fixture
def emulated(tmp_path_factory):
    """The cupy stages, imported against a stand-in cupy that runs kernels on the CPU.

    Returns {(op, stage): Implementation-like record}; the global registry is untouched.
    """
    if shutil.which("g++") is None:
        pytest.skip("g++ not on PATH: cannot emulate the CUDA kernels on the CPU")
    backends.load_all()  # the real import outcome is recorded before anything is patched
    if not hasattr(_EmuModule, "build_dir"):  # compiled libraries are reused across tests
        _EmuModule.build_dir = tmp_path_factory.mktemp("cuda_emulation")
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(is_available=lambda: True, Device=lambda *a: _EmuDevice())
    fake.RawModule = _EmuModule
    # cupy.empty (split-K's workspace). Filled with NaN rather than left uninitialised: a
    # partial that no block writes then shows up as NaN in the sum instead of passing by luck.
    fake.empty = lambda shape, dtype: emu(np.full(shape, np.nan, dtype))
    found = {}

    def collect(op, backend, stage, summary, *, device="cpu", dtypes=(), max_flops=None):
        def decorate(fn):
            assert backend == "cupy" and device == "gpu" and (op, stage) not in found
            found[(op, stage)] = types.SimpleNamespace(kernel=fn, dtypes=dtypes, order=len(found))
            return fn
        return decorate

    mp = pytest.MonkeyPatch()
    try:
        mp.setitem(sys.modules, "cupy", fake)
        for name in KERNEL_MODULES:
            mp.delitem(sys.modules, name, raising=False)
        mp.setattr(registry, "register", collect)
        mp.setattr(_loader, "_modules", {})
        mp.setattr(_loader, "_functions", {})
        for name in KERNEL_MODULES:
            importlib.import_module(name)
        yield found
    finally:
        mp.undo()


def test_emulated_ladders_register_in_order(emulated):
    order = sorted(emulated, key=lambda key: emulated[key].order)
    assert [s for op, s in order if op == "matmul"] == MATMUL_LADDER
    assert [s for op, s in order if op == "conv2d"] == CONV_LADDER
    assert [s for op, s in order if op == "conv2d_bias_relu"] == ["fused"]
    assert emulated[("matmul", "naive")].dtypes == ("float32",)
    assert emulated[("conv2d", "naive")].dtypes == ("float32", "float64")


def _emulated_matmul(kernel):
    def run(a, b):
        out = emu(np.full((a.shape[0], b.shape[1]), np.nan, np.float32))  # kernels must overwrite
        kernel(emu(a), emu(b), out)
        return np.asarray(out)
    return run


@pytest.mark.parametrize("stage", MATMUL_LADDER)
def test_emulated_matmul(emulated, stage, rng):
    run = _emulated_matmul(emulated[("matmul", stage)].kernel)
    for shape in EMULATED_MATMUL_SHAPES:
        check_matmul(run, shape, rng, f"emulated matmul/cupy/{stage} {shape}")
    check_matmul(run, (9, 12, 8), rng, f"emulated matmul/cupy/{stage} NaN", nan=True)


def _misaligned_matmul(kernel, to_device, to_host):
    """run(a, b) through ``kernel`` on views that start 1 or 3 floats past an aligned
    allocation: row lengths that are multiples of 4, base pointers that are not 16-byte
    aligned, so the float4 paths must fall back to scalar accesses."""
    def offset(x, by):
        host = np.zeros(x.size + by, x.dtype)
        host[by:] = x.ravel()
        return to_device(host)[by:].reshape(x.shape)

    def run(a, b):
        out = offset(np.full((a.shape[0], b.shape[1]), np.nan, np.float32), 1)
        a_v, b_v = offset(a, 1), offset(b, 3)
        assert a_v.data.ptr % 16 and b_v.data.ptr % 16 and out.data.ptr % 16
        kernel(a_v, b_v, out)
        return to_host(out)
    return run


@pytest.mark.parametrize("stage", ["vectorized", "warptiled"])
def test_emulated_matmul_misaligned_views(emulated, stage, rng):
    run = _misaligned_matmul(emulated[("matmul", stage)].kernel, emu, np.asarray)
    check_matmul(run, (20, 36, 132), rng, f"emulated matmul/cupy/{stage} misaligned")


def check_warptile_candidate(run_warptiled, tile, on_device, misaligned, rng, what):
    """Candidate ``tile`` through the real launcher ``run_warptiled``: awkward shapes, NaN
    propagation, misaligned views. ``on_device(kernel)`` / ``misaligned(kernel)`` turn a
    kernel(a, b, out) into run(a, b) -> NumPy for the machine under test."""
    kernel = functools.partial(run_warptiled, tile=tile)
    run = on_device(kernel)
    for shape in WARPTILE_SHAPES:
        check_matmul(run, shape, rng, f"{what} {shape}")
    check_matmul(run, (9, 12, 8), rng, f"{what} NaN", nan=True)
    check_matmul(misaligned(kernel), (20, 36, 132), rng, f"{what} misaligned")


@pytest.mark.parametrize("name", list(WARPTILES))
def test_emulated_warptile_candidates(emulated, name, rng):
    """Every candidate tile of the warptiled stage, run on the CPU emulation."""
    tile = WARPTILES[name]
    launcher = sys.modules["fastops.kernels.cuda.matmul"].run_warptiled  # the emulated import
    check_warptile_candidate(launcher, tile, _emulated_matmul,
                             lambda k: _misaligned_matmul(k, emu, np.asarray), rng,
                             f"emulated warptiled[{name}]")
    # The launcher compiled the kernel with this tile's defines, not the default's, and sized
    # the launch by this tile (a grid sized for a larger tile would also give right answers).
    compiled = {key[2] for key in _loader._functions if key[3] == "matmul_warptiled"}
    assert compiled == {tuple(_loader.matmul_defines(tile).items())}
    m, k, n = WARPTILE_SHAPES[-1]
    launcher(emu(np.zeros((m, k), np.float32)), emu(np.zeros((k, n), np.float32)),
             emu(np.empty((m, n), np.float32)), tile)
    assert _EmuKernel.last_launch == ("matmul_warptiled", (_loader.cdiv(m, tile.bm),
                                      _loader.cdiv(n, tile.bn), 1), (tile.nt, 1, 1))


def _emulated_conv(kernel, fused):
    def run(x, w, bias, kw):
        plan = check_conv2d(x, w, bias, kw["stride"], kw["padding"], kw["dilation"],
                            kw["groups"])
        out = emu(np.full(plan.out_shape, np.nan, x.dtype))
        if fused:
            kernel(emu(x), emu(w), emu(bias), out, plan.params)
        else:
            kernel(emu(x), emu(w), out, plan.params)
        return np.asarray(out)
    return run


@pytest.mark.parametrize("stage", CONV_LADDER + ["fused"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_emulated_conv(emulated, stage, dtype, rng):
    fused = stage == "fused"
    op = "conv2d_bias_relu" if fused else "conv2d"
    run = _emulated_conv(emulated[(op, stage)].kernel, fused)
    for case in CONV_CASES:
        check_conv(run, case, dtype, rng, f"emulated {op}/cupy/{stage} {_case_id(case)}",
                   fused=fused)
    check_conv(run, CONV_CASES[1], dtype, rng, f"emulated {op}/cupy/{stage} NaN", fused=fused,
               nan=True)


def _pipelined_runner(emulated_module, fused, tile, misaligned=False, splits=None):
    """run(x, w, bias, kw) through the emulated pipelined / fused launcher with ``tile``
    (and ``splits``-way split-K) forced; ``misaligned`` puts ``out`` 1 element past a
    16-byte boundary."""
    mod = sys.modules[emulated_module]
    launch = mod.run_fused if fused else mod.run_pipelined

    def run(x, w, bias, kw):
        plan = check_conv2d(x, w, bias, kw["stride"], kw["padding"], kw["dilation"],
                            kw["groups"])
        size = int(np.prod(plan.out_shape))
        buf = emu(np.full(size + 1, np.nan, x.dtype))
        out = buf[1:] if misaligned else buf[:size]
        out = out.reshape(plan.out_shape)
        assert (out.data.ptr % 16 != 0) == misaligned
        arrays = (emu(x), emu(w)) + ((emu(bias),) if fused else ())
        launch(*arrays, out, plan.params, tile, splits)
        return np.asarray(out).copy()
    return run


@pytest.mark.parametrize("tile", range(_loader.PIPELINED_SLOTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_emulated_pipelined_every_tile(emulated, dtype, tile, rng):
    """Each tile of the pipelined table, forced through the real launchers of stage pipelined
    and stage fused on awkward shapes (both store paths, every counter carry, NaN)."""
    t = _loader.PIPELINED_TILES[np.dtype(dtype).name][tile]
    for fused, module, kernel in [
            (False, "fastops.kernels.cuda.conv2d", f"conv2d_pipelined_{tile}"),
            (True, "fastops.kernels.cuda.conv2d_bias_relu", f"conv2d_bias_relu_fused_{tile}")]:
        run = _pipelined_runner(module, fused, tile)
        what = f"emulated {kernel} {np.dtype(dtype).name} {t}"
        for case in PIPELINED_CASES:
            check_conv(run, case, dtype, rng, f"{what} {_case_id(case)}", fused=fused)
            # The launch used this tile's kernel and a grid sized by this tile.
            n, _c, _h, _w, k, *_rest, groups = case
            name, grid, block = _EmuKernel.last_launch
            assert name == kernel and block == (t.threads, 1, 1)
            assert grid[1:] == (_loader.cdiv(k // groups, t.bm), groups)
        check_conv(run, PIPELINED_CASES[1], dtype, rng, f"{what} NaN", fused=fused, nan=True)
        # ho*wo % 4 == 0 but out not 16-byte aligned: the scalar store path.
        check_conv(_pipelined_runner(module, fused, tile, misaligned=True), PIPELINED_CASES[1],
                   dtype, rng, f"{what} misaligned out", fused=fused)


@pytest.mark.parametrize("order", [1, 2], ids=["threads-in-order", "threads-reversed"])
def test_emulated_barrier_orders(emulated, order, rng, monkeypatch):
    """Every kernel that shares data through shared memory, with the block's threads run one
    at a time between barriers in thread order and in reverse (EMULATION_PRELUDE): a missing
    or misplaced __syncthreads then gives a stale read, deterministically, in one of the two
    orders. Small shapes: the serialised threads hand over at every barrier."""
    monkeypatch.setattr(_EmuKernel, "order", order)
    what = f"barrier order {order}"
    for stage in MATMUL_LADDER[2:]:  # smem onwards stage tiles in shared memory
        run = _emulated_matmul(emulated[("matmul", stage)].kernel)
        check_matmul(run, (33, 68, 20), rng, f"{what} matmul/{stage}")
    for op, stage in [("conv2d", "implicit_gemm"), ("conv2d", "pipelined"),
                      ("conv2d_bias_relu", "fused")]:
        run = _emulated_conv(emulated[(op, stage)].kernel, fused=op != "conv2d")
        for case in (CONV_CASES[3], CONV_CASES[6]):  # narrow tile (depthwise); 36+ slices
            check_conv(run, case, np.float32, rng, f"{what} {op}/{stage} {_case_id(case)}",
                       fused=op != "conv2d")
    for tile in range(_loader.PIPELINED_SLOTS):
        run = _pipelined_runner("fastops.kernels.cuda.conv2d_bias_relu", True, tile)
        check_conv(run, PIPELINED_CASES[1], np.float64, rng, f"{what} fused tile {tile}",
                   fused=True)
    case, tile, _asks = SPLIT_CASES[0]
    run = _pipelined_runner("fastops.kernels.cuda.conv2d_bias_relu", True, tile, splits=3)
    check_conv(run, case, np.float32, rng, f"{what} split-K", fused=True)


def test_pipelined_tile_table():
    """Every dtype has one tile per kernel slot, largest first, within a block's limits."""
    for dtype, tiles in _loader.PIPELINED_TILES.items():
        assert len(tiles) == _loader.PIPELINED_SLOTS, dtype
        areas = [t.bm * t.bn for t in tiles]
        assert areas == sorted(areas, reverse=True), dtype
        real = np.dtype(dtype).itemsize
        for t in tiles:
            assert t.threads <= 1024 and t.threads % 32 == 0, t
            assert 2 * t.bk * (t.bm + 16 // real + t.bn) * real <= _loader.MAX_STATIC_SMEM, t


# ResNet-50's conv layers at batch 8 (gpu_bench.RESNET_LAYERS): (K/groups, groups, N*Ho*Wo)
# -> the float32 tile the launcher must pick on 132 SMs (index into PIPELINED_TILES).
RESNET50_B8_TILES = [
    ((64, 1, 8 * 56 * 56), 2),    # res2 3x3 K64: 128-row tiles skipped (half padding); 196 blocks
    ((128, 1, 8 * 28 * 28), 3),   # res3: 49 / 98 / 98 blocks for the larger tiles, 196 of 64x64
    ((256, 1, 8 * 14 * 14), 3),   # res4: no tile reaches 132 blocks: the smallest (100)
    ((512, 1, 8 * 7 * 7), 3),     # res5: 56 blocks of 64 x 64, under-filled: split-K below
    ((64, 1, 8 * 112 * 112), 2),  # stem 7x7/2
    ((256, 1, 8 * 56 * 56), 0),   # 1x1 C64 -> K256 at 56x56: 196 x 2 blocks of 128 x 128
]


def test_choose_pipelined_tile(emulated):
    choose = sys.modules["fastops.kernels.cuda.conv2d"].choose_pipelined_tile
    for (kg, groups, pixels), want in RESNET50_B8_TILES:
        assert choose(np.float32, kg, groups, pixels, 132) == want, (kg, pixels)
    assert choose(np.float32, 512, 1, 392, 1) == 0       # one SM: the largest tile
    assert choose(np.float32, 100, 1, 10**6, 132) == 2   # 128 rows > 100 channels: skipped
    assert choose(np.float32, 16, 1, 10**6, 132) == 2    # shorter than every tile: 64 rows
    assert choose(np.float64, 512, 1, 392, 132) == 3     # float64: its own table
    assert choose(np.float64, 512, 1, 10**6, 132) == 0


# The same layers with their reduction R = (C/groups)*kH*kW: (kg, groups, pixels, R) -> (tile,
# blocks of that tile, splits S, blocks with split-K) on 132 SMs, float32. Only res4 and res5
# are split; their S is the smallest that reaches 132 blocks (both far under the cap R / 256).
RESNET50_B8_SPLITS = [
    ((64, 1, 8 * 56 * 56, 64 * 9), (2, 196, 1, 196)),     # res2
    ((128, 1, 8 * 28 * 28, 128 * 9), (3, 196, 1, 196)),   # res3
    ((256, 1, 8 * 14 * 14, 256 * 9), (3, 100, 2, 200)),   # res4: 100 of 132 SMs -> all
    ((512, 1, 8 * 7 * 7, 512 * 9), (3, 56, 3, 168)),      # res5: 56 of 132 SMs -> all
    ((64, 1, 8 * 56 * 56, 256), (2, 196, 1, 196)),        # 1x1 C256 -> K64 at 56x56
    ((64, 1, 8 * 112 * 112, 3 * 49), (2, 784, 1, 784)),    # stem 7x7/2
]


def test_choose_split_k(emulated):
    conv2d = sys.modules["fastops.kernels.cuda.conv2d"]
    for (kg, groups, pixels, reduction), want in RESNET50_B8_SPLITS:
        tile = conv2d.choose_pipelined_tile(np.float32, kg, groups, pixels, 132)
        t = _loader.PIPELINED_TILES["float32"][tile]
        blocks = _loader.cdiv(pixels, t.bn) * _loader.cdiv(kg, t.bm) * groups
        splits = conv2d.choose_split_k(blocks, reduction, 132)
        used, rows = conv2d.split_slices(reduction, t.bk, splits)
        assert (tile, blocks, used, blocks * used) == want, (kg, pixels)
        assert rows % t.bk == 0 and (used == 1 or rows >= conv2d.MIN_SPLIT_ROWS)
    choose = conv2d.choose_split_k
    assert choose(132, 10**6, 132) == 1          # already one block per SM
    assert choose(56, 4608, 1) == 1              # one SM: nothing to fill
    assert choose(1, 10**6, 132) == 132          # one block, a huge reduction
    assert choose(131, 4608, 132) == 2           # one block short: the smallest S that fills
    assert choose(10, 5000, 132) == 14           # 14 ways, 357 rows each
    assert choose(10, 1024, 132) == 4            # capped: 4 splits of 256 rows, 40 blocks
    assert choose(10, 511, 132) == 1             # too short to split in two
    assert choose(0, 4608, 132) == 1             # an empty output: nothing to split
    # float64 picks smaller tiles that already fill the GPU at res4 / res5: no split.
    for kg, pixels in [(256, 1568), (512, 392)]:
        t = _loader.PIPELINED_TILES["float64"][
            conv2d.choose_pipelined_tile(np.float64, kg, 1, pixels, 132)]
        assert choose(_loader.cdiv(pixels, t.bn) * _loader.cdiv(kg, t.bm), kg * 9, 132) == 1


def test_split_slices(emulated):
    """Splits start on BK boundaries, cover R exactly, none empty; too many are clamped."""
    split_slices = sys.modules["fastops.kernels.cuda.conv2d"].split_slices
    assert split_slices(4608, 8, 3) == (3, 1536)
    assert split_slices(2304, 8, 2) == (2, 1152)
    assert split_slices(45, 8, 2) == (2, 24)     # 24 + 21 rows: the tail in the last split
    assert split_slices(45, 8, 4) == (3, 16)     # 6 slices 4 ways: 2 + 2 + 2, clamped to 3
    assert split_slices(45, 8, 100) == (6, 8)    # more splits than slices: one slice each
    assert split_slices(5, 8, 3) == (1, 8)       # R < BK: unsplit
    assert split_slices(45, 8, 1) == (1, 48)
    for reduction in range(1, 80):
        for asked in range(1, 12):
            used, rows = split_slices(reduction, 8, asked)
            assert 1 <= used <= asked and rows % 8 == 0
            assert (used - 1) * rows < reduction <= used * rows  # every split non-empty
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="positive number of splits"):
            split_slices(45, 8, bad)


# Shapes forced through split-K, (case, tile, splits asked): R = 45 (6 BK-slices, the last
# 5 rows) for S = 2, 3, 4 (clamped to 3) and 7 (> 6 slices: clamped to 6); 1x1 with R = 37;
# 5x5 with stride 2, padding 2 and 2 groups (R = 75 per group); 3x3 dilated with asymmetric
# padding (R = 36); ho*wo = 48 with K = 131 (128-bit partial stores, a tail channel tile);
# R = 5 < BK (nothing to split: the one-pass kernel runs).
SPLIT_CASES = [
    ((2, 5, 6, 7, 19, 3, 3, 1, 1, 1, 1), 3, (2, 3, 4, 7)),
    ((3, 37, 4, 5, 20, 1, 1, 1, 0, 1, 1), 2, (2, 3)),
    ((2, 6, 9, 8, 34, 5, 5, 2, 2, 1, 2), 1, (3, 10)),
    ((1, 4, 7, 6, 8, 3, 3, 1, "same", 2, 1), 0, (2,)),
    ((2, 3, 8, 6, 131, 3, 3, 1, 1, 1, 1), 3, (3,)),
    ((2, 5, 4, 4, 7, 1, 1, 1, 0, 1, 1), 3, (2,)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_emulated_split_k(emulated, dtype, rng):
    """Split-K forced (S = 2, 3 and more than the reduction has slices) through the launchers
    of both stages: the partial launch covers groups * S blocks in z, the sum pass follows,
    and the result matches the oracle on awkward shapes, NaN included."""
    conv2d = sys.modules["fastops.kernels.cuda.conv2d"]
    for fused, module, sum_kernel in [
            (False, "fastops.kernels.cuda.conv2d", "conv2d_split_sum"),
            (True, "fastops.kernels.cuda.conv2d_bias_relu", "conv2d_bias_relu_split_sum")]:
        for case, tile, asks in SPLIT_CASES:
            _n, c, _h, _w, _k, kh, kw, *_rest, groups = case
            t = _loader.PIPELINED_TILES[np.dtype(dtype).name][tile]
            for asked in asks:
                used, _rows = conv2d.split_slices(c // groups * kh * kw, t.bk, asked)
                what = (f"emulated split-K {module.rsplit('.', 1)[1]} {np.dtype(dtype).name} "
                        f"tile {tile} S={asked} (used {used}) {_case_id(case)}")
                _EmuKernel.launches.clear()
                run = _pipelined_runner(module, fused, tile, splits=asked)
                check_conv(run, case, dtype, rng, what, fused=fused)
                names = [name for name, *_ in _EmuKernel.launches]
                z = [grid[2] for _name, grid, _block in _EmuKernel.launches]
                if used == 1:
                    prefix = "conv2d_bias_relu_fused" if fused else "conv2d_pipelined"
                    assert names == [f"{prefix}_{tile}"] and z == [groups], what
                else:  # partials always from conv2d.cu: raw sums, no epilogue
                    assert names == [f"conv2d_pipelined_{tile}", sum_kernel], what
                    assert z[0] == groups * used, what
        case, tile, _asks = SPLIT_CASES[0]
        check_conv(_pipelined_runner(module, fused, tile, splits=3), case, dtype, rng,
                   f"emulated split-K {module} NaN", fused=fused, nan=True)
        x, wt, bias, kw = conv_inputs(case, dtype, rng)
        with pytest.raises(ValueError, match="positive number of splits"):
            _pipelined_runner(module, fused, tile, splits=0)(x, wt, bias, kw)


def test_emulated_split_k_chosen(emulated, rng, monkeypatch):
    """The registered stages split by themselves when the tile leaves SMs idle and R is long:
    C64 3x3 on a 5x5 image (R = 576, 1 block of 64 x 64) splits 2 ways on 132 SMs (the cap:
    576 // 256), not on 1 SM."""
    case = (1, 64, 5, 5, 16, 3, 3, 1, 1, 1, 1)
    for stage, op, sum_kernel in [("pipelined", "conv2d", "conv2d_split_sum"),
                                  ("fused", "conv2d_bias_relu", "conv2d_bias_relu_split_sum")]:
        run = _emulated_conv(emulated[(op, stage)].kernel, fused=stage == "fused")
        for dtype in (np.float32, np.float64):
            _EmuKernel.launches.clear()
            check_conv(run, case, dtype, rng, f"{stage} chosen split", fused=stage == "fused")
            (part, _g, _b), (last, _g2, _b2) = _EmuKernel.launches
            assert part == "conv2d_pipelined_3" and _g[2] == 2 and last == sum_kernel
    conv2d_module = sys.modules["fastops.kernels.cuda.conv2d"]
    conv2d_module.sm_count.cache_clear()
    monkeypatch.setattr(_EmuDevice, "attributes", {"MultiProcessorCount": 1})
    _EmuKernel.launches.clear()
    check_conv(_emulated_conv(emulated[("conv2d", "pipelined")].kernel, fused=False), case,
               np.float32, rng, "pipelined, 1 SM: no split")
    # One SM: the largest tile no taller than needed (64 x 128) fills it, unsplit.
    assert [name for name, *_ in _EmuKernel.launches] == ["conv2d_pipelined_2"]
    conv2d_module.sm_count.cache_clear()


def test_emulated_pipelined_reads_the_sm_count(emulated, rng, monkeypatch):
    """The registered stage picks its tile from the device's SM count (the stand-in's
    attributes), and sends K/groups < 16 to the narrow tile."""
    stage = emulated[("conv2d", "pipelined")].kernel
    run = _emulated_conv(stage, fused=False)
    case = (3, 5, 8, 6, 131, 3, 3, 1, 1, 1, 1)
    check_conv(run, case, np.float32, rng, "pipelined, 132 SMs")
    assert _EmuKernel.last_launch[0] == "conv2d_pipelined_3"  # 3 x 3 blocks even at 64 x 64
    conv2d_module = sys.modules["fastops.kernels.cuda.conv2d"]
    conv2d_module.sm_count.cache_clear()
    monkeypatch.setattr(_EmuDevice, "attributes", {"MultiProcessorCount": 1})
    check_conv(run, case, np.float32, rng, "pipelined, 1 SM")
    assert _EmuKernel.last_launch[0] == "conv2d_pipelined_0"
    check_conv(run, CONV_CASES[3], np.float32, rng, "pipelined, depthwise")
    assert _EmuKernel.last_launch[0] == "conv2d_implicit_gemm_narrow"
    fused = _emulated_conv(emulated[("conv2d_bias_relu", "fused")].kernel, fused=True)
    check_conv(fused, case, np.float64, rng, "fused, 1 SM", fused=True)
    assert _EmuKernel.last_launch[0] == "conv2d_bias_relu_fused_0"
    check_conv(fused, CONV_CASES[3], np.float64, rng, "fused, depthwise", fused=True)
    assert _EmuKernel.last_launch[0] == "conv2d_bias_relu_fused_narrow"


# ------------------------------------------------------------------------------ 4. on a GPU
@pytest.fixture(scope="module")
def cp():
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no CUDA GPU: CuPy not installed ({type(exc).__name__})")
    try:
        ok = cupy.cuda.is_available()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no CUDA GPU: {type(exc).__name__}: {exc}")
    if not ok:
        pytest.skip("no CUDA GPU: cupy.cuda.is_available() is False")
    missing = backends.unavailable()
    if "cupy" in missing:
        pytest.fail(f"a GPU is present but the cupy backend failed to load: {missing['cupy']}")
    return cupy


def test_gpu_ladders_registered(cp):
    assert [i.stage for i in registry.ladder("matmul", "cupy")] == MATMUL_LADDER
    assert [i.stage for i in registry.ladder("conv2d", "cupy")] == CONV_LADDER
    assert [i.stage for i in registry.ladder("conv2d_bias_relu", "cupy")] == FUSED_LADDER


@pytest.mark.parametrize("stage", MATMUL_LADDER)
def test_gpu_matmul(cp, stage, rng):
    def on_gpu(a, b):
        da, db = cp.asarray(a), cp.asarray(b)
        got = fastops.matmul(da, db, backend="cupy", stage=stage)
        assert isinstance(got, cp.ndarray) and got.device == da.device
        return cp.asnumpy(got)

    def from_numpy(a, b):
        got = fastops.matmul(a, b, backend="cupy", stage=stage)
        assert isinstance(got, np.ndarray)
        return got

    for shape in MATMUL_SHAPES:
        check_matmul(on_gpu, shape, rng, f"matmul/cupy/{stage} {shape}")
    check_matmul(from_numpy, (45, 67, 89), rng, f"matmul/cupy/{stage} NumPy in")
    check_matmul(on_gpu, (40, 36, 52), rng, f"matmul/cupy/{stage} NaN", nan=True)
    # Batched: per-batch views whose base pointers are not 16-byte aligned (M*K = 3*5).
    a = rng.standard_normal((4, 3, 5)).astype(np.float32)
    b = rng.standard_normal((4, 5, 8)).astype(np.float32)
    got = cp.asnumpy(fastops.matmul(cp.asarray(a), cp.asarray(b), backend="cupy", stage=stage))
    assert_close(got, oracle.matmul(a, b), oracle.matmul(np.abs(a), np.abs(b)), 5, np.float32,
                 f"matmul/cupy/{stage} batched")


@pytest.mark.parametrize("name", list(WARPTILES))
def test_gpu_warptile_candidates(cp, name, rng):
    """Every candidate tile of the warptiled stage on the GPU (what the benchmark sweeps)."""
    from fastops.kernels.cuda.matmul import run_warptiled

    def on_gpu(kernel):
        def run(a, b):
            out = cp.full((a.shape[0], b.shape[1]), cp.nan, cp.float32)
            kernel(cp.asarray(a), cp.asarray(b), out)
            return cp.asnumpy(out)
        return run

    what = f"matmul/cupy/warptiled[{name}]"
    check_warptile_candidate(run_warptiled, WARPTILES[name], on_gpu,
                             lambda k: _misaligned_matmul(k, cp.asarray, cp.asnumpy), rng, what)
    check_matmul(on_gpu(functools.partial(run_warptiled, tile=WARPTILES[name])),
                 (515, 260, 1030), rng, f"{what} several blocks")


def test_gpu_matmul_rejects_float64(cp):
    a = cp.ones((4, 4), cp.float64)
    with pytest.raises(TypeError, match="float32"):
        fastops.matmul(a, a, backend="cupy", stage="warptiled")


@pytest.mark.parametrize("stage", FUSED_LADDER)
@pytest.mark.parametrize("op", ["conv2d", "conv2d_bias_relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_conv(cp, op, stage, dtype, rng):
    if op == "conv2d" and stage == "fused":
        pytest.skip("fused is a conv2d_bias_relu stage only")
    fused = op == "conv2d_bias_relu"
    api = getattr(fastops, op)

    def on_gpu(x, w, bias, kw):
        args = [cp.asarray(x), cp.asarray(w)] + ([cp.asarray(bias)] if fused else [])
        got = api(*args, **kw, backend="cupy", stage=stage)
        assert isinstance(got, cp.ndarray) and got.device == args[0].device
        return cp.asnumpy(got)

    def from_numpy(x, w, bias, kw):
        got = api(x, w, *([bias] if fused else []), **kw, backend="cupy", stage=stage)
        assert isinstance(got, np.ndarray)
        return got

    for case in CONV_CASES:
        check_conv(on_gpu, case, dtype, rng, f"{op}/cupy/{stage} {_case_id(case)}", fused=fused)
    check_conv(from_numpy, CONV_CASES[2], dtype, rng, f"{op}/cupy/{stage} NumPy in", fused=fused)
    check_conv(on_gpu, CONV_CASES[1], dtype, rng, f"{op}/cupy/{stage} NaN", fused=fused,
               nan=True)


def test_gpu_conv_resnet_layer(cp, rng):
    """One realistic layer (C64 56x56 K64 3x3, batch 2) through the fused and un-fused stages."""
    case = (2, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1)
    for stage in FUSED_LADDER:
        def on_gpu(x, w, bias, kw):
            got = fastops.conv2d_bias_relu(cp.asarray(x), cp.asarray(w), cp.asarray(bias), **kw,
                                           backend="cupy", stage=stage)
            return cp.asnumpy(got)
        check_conv(on_gpu, case, np.float32, rng, f"conv2d_bias_relu/cupy/{stage} resnet",
                   fused=True)


@pytest.mark.parametrize("tile", range(_loader.PIPELINED_SLOTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_pipelined_every_tile(cp, dtype, tile, rng):
    """Each tile of the pipelined table forced on the GPU (the emulation test's shapes, plus a
    ResNet-sized layer that takes several blocks of every tile)."""
    from fastops.kernels.cuda.conv2d import run_pipelined
    from fastops.kernels.cuda.conv2d_bias_relu import run_fused

    for fused, launch in [(False, run_pipelined), (True, run_fused)]:
        def on_gpu(x, w, bias, kw, launch=launch, fused=fused):
            plan = check_conv2d(x, w, bias, kw["stride"], kw["padding"], kw["dilation"],
                                kw["groups"])
            out = cp.full(plan.out_shape, cp.nan, x.dtype)
            arrays = [cp.asarray(x), cp.asarray(w)] + ([cp.asarray(bias)] if fused else [])
            launch(*arrays, out, plan.params, tile)
            return cp.asnumpy(out)

        what = f"{launch.__name__}[{tile}] {np.dtype(dtype).name}"
        for case in PIPELINED_CASES + [(2, 64, 28, 28, 192, 3, 3, 1, 1, 1, 1)]:
            check_conv(on_gpu, case, dtype, rng, f"{what} {_case_id(case)}", fused=fused)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_split_k(cp, dtype, rng):
    """Split-K on the GPU: forced S on the emulation's awkward shapes, and a res5-like layer
    (C512 7x7, batch 2: 16 blocks of 64 x 64) split as the launcher chooses, twice, with
    bit-identical results (the partials are summed in a fixed order, no atomics)."""
    from fastops.kernels.cuda.conv2d import run_pipelined
    from fastops.kernels.cuda.conv2d_bias_relu import run_fused

    for fused, launch in [(False, run_pipelined), (True, run_fused)]:
        def on_gpu(x, w, bias, kw, launch=launch, fused=fused, tile=None, splits=None):
            plan = check_conv2d(x, w, bias, kw["stride"], kw["padding"], kw["dilation"],
                                kw["groups"])
            out = cp.full(plan.out_shape, cp.nan, x.dtype)
            arrays = [cp.asarray(x), cp.asarray(w)] + ([cp.asarray(bias)] if fused else [])
            launch(*arrays, out, plan.params, tile, splits)
            return cp.asnumpy(out)

        what = f"{launch.__name__} split-K {np.dtype(dtype).name}"
        for case, tile, asks in SPLIT_CASES:
            for splits in asks:
                check_conv(functools.partial(on_gpu, tile=tile, splits=splits), case, dtype,
                           rng, f"{what} tile {tile} S={splits} {_case_id(case)}", fused=fused)
        case = (2, 512, 7, 7, 512, 3, 3, 1, 1, 1, 1)
        x, wt, bias, kw = conv_inputs(case, dtype, rng)
        first = on_gpu(x, wt, bias, kw)
        assert np.array_equal(first, on_gpu(x, wt, bias, kw), equal_nan=True), what
        check_conv(on_gpu, case, dtype, rng, f"{what} res5-like, chosen", fused=fused)


# ------------------------------------------------------------------------------ the benchmark
def _gpu_bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_report_writer(tmp_path):
    """The report writer and argument parsing work without a GPU (synthetic numbers)."""
    bench = _gpu_bench()
    args = bench.parse_args(["--out", str(tmp_path), "--sizes", "64"])
    report = dict(args=vars(args), method="m", environment=dict(gpu="fake"), matmul=[
        dict(size=64, stage="cuBLAS (cupy.matmul)", ms=1.0, gflops=2.0, pct_of_cublas=100.0,
             rel_err=0.0),
        dict(size=64, stage="naive", skipped="max_flops"),
    ], conv=[dict(layer="3x3", gflop=1.0, entries=[
        dict(impl="PyTorch cuDNN FP32", ms=1.0, gflops=1.0, speed_vs_cudnn_fp32=1.0),
        dict(impl="fastops fused", ms=2.0, gflops=0.5, speed_vs_cudnn_fp32=0.5,
             rel_err_vs_torch=1e-6),
        dict(impl="fastops naive", skipped="time budget spent")])])
    report["warptile_sweep"] = [
        dict(size=64, stage="warptiled", config="a", tile="t", ms=2.0, gflops=1.0,
             pct_of_cublas=50.0, rel_err=1e-7, regs=200, blocks_per_sm=2),
        dict(size=64, stage="warptiled", config="b", tile="t", skipped="time budget spent"),
        dict(size=64, stage="warptiled", config="c", tile="t", failed="CUDADriverError: x"),
        dict(size=64, stage="warptiled", config="d", tile="t", ms=4.0, gflops=0.5,
             pct_of_cublas=25.0, rel_err=1e-7, regs=255, spill_bytes=8)]
    report["best_matmul"] = bench.best_matmul(report["matmul"], report["warptile_sweep"])
    bench.write_markdown(report, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "| 64 | naive | skipped: max_flops" in text and "0.50x" in text
    assert "| a | t | 2.000 | 1 | 50.0 | 1.0e-07 | 200 | 2 |" in text
    assert "| b | t | skipped: time budget spent" in text
    assert "| c | t | failed: CUDADriverError: x |" in text
    assert "| 255 (8 B spilled) | — |" in text
    assert "best matmul at n = 64: warptiled[a], 2.000 ms" in text and "80%: not met" in text


def test_gpu_bench_best_matmul():
    """The best line: fastest correct entry at the largest timed n, cuBLAS and wrong excluded."""
    bench = _gpu_bench()

    def row(size, stage, ms, err=1e-7, **extra):
        return dict(size=size, stage=stage, ms=ms, gflops=1.0, pct_of_cublas=100.0 / ms,
                    rel_err=err, **extra)

    ladder = [row(64, "cuBLAS (cupy.matmul)", 1.0), row(64, "smem", 0.1),
              row(128, "cuBLAS (cupy.matmul)", 1.0), row(128, "smem", 2.0),
              row(128, "warptiled", 1.5), dict(size=128, stage="naive", skipped="max_flops")]
    sweep = [row(128, "warptiled", 1.2, config="good"),
             row(128, "warptiled", 0.5, err=0.3, config="wrong"),
             dict(size=128, stage="warptiled", config="late", skipped="time budget spent")]
    best = bench.best_matmul(ladder, sweep)
    assert (best["size"], best["config"], best["meets_target"]) == (128, "good", True)
    assert bench.best_matmul(ladder, [])["stage"] == "warptiled"
    assert not bench.best_matmul(ladder, [])["meets_target"]  # 1.5x cuBLAS's time: 67%
    assert "error" in bench.best_matmul([], [sweep[1]])
    assert bench.best_matmul(ladder[:1], []) is None


class _EmuRng:
    """cupy.random.default_rng(seed) for benchmarks/gpu_bench.py on the emulation."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def standard_normal(self, shape, dtype):
        return emu(self.rng.standard_normal(shape, dtype=dtype))


def _bench_cupy(**extra):
    """The part of CuPy that gpu_bench.py's timed sections use, on emulated arrays (+ extra)."""
    return types.SimpleNamespace(
        float32=np.float32, random=types.SimpleNamespace(default_rng=_EmuRng),
        empty=lambda shape, dtype: emu(np.empty(shape, dtype)),
        get_default_memory_pool=lambda: types.SimpleNamespace(free_all_blocks=lambda: None),
        **extra)


def test_gpu_bench_sweep_emulated(emulated, tmp_path):
    """bench_matmul + the warptile sweep end to end, on the CPU emulation of the kernels with
    NumPy standing in for CuPy: every candidate is timed (fake clock) and checked against the
    reference; the report has the sweep table and the best line."""
    bench = _gpu_bench()
    fake_cupy = _bench_cupy(matmul=np.matmul)
    warptiled = types.SimpleNamespace(stage="warptiled", fits=lambda flops: True,
                                      kernel=emulated[("matmul", "warptiled")].kernel)
    fake_registry = types.SimpleNamespace(ladder=lambda op, backend: [warptiled])
    clock = iter(range(1000, 0, -1))  # every timed entry is faster than the one before

    def timer(fn, use_torch=False):
        fn()
        return next(clock) * 1e-3, 1

    sweep = bench.warptile_sweep()
    assert [name for name, *_ in sweep] == list(WARPTILES)
    rows, sweep_rows = bench.bench_matmul(fake_cupy, fake_registry, timer, [24, 130],
                                          float("inf"), lambda msg: None, sweep)
    assert [(r["size"], r["stage"]) for r in rows] == [
        (24, "cuBLAS (cupy.matmul)"), (24, "warptiled"),
        (130, "cuBLAS (cupy.matmul)"), (130, "warptiled")]
    assert [(r["size"], r["config"]) for r in sweep_rows] == [(130, n) for n in WARPTILES]
    timed = [r for r in rows if r["stage"] == "warptiled"] + sweep_rows
    assert all(r["rel_err"] < 1e-5 for r in timed), timed  # the emulated kernels computed C
    best = bench.best_matmul(rows, sweep_rows)
    assert best["config"] == list(WARPTILES)[-1]  # the last one timed got the fastest clock
    report = dict(args=dict(batch=8), method="m", environment={}, matmul=rows,
                  warptile_sweep=sweep_rows, best_matmul=best)
    bench.write_markdown(report, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "## warptiled tile sweep (n = 130)" in text
    assert all(f"| {name} | {tile.label} |" in text for name, tile in WARPTILES.items())
    # Budget spent: the sweep's entries are listed as skipped, not timed.
    _, late = bench.bench_matmul(fake_cupy, fake_registry, timer, [24], 0.0, lambda m: None,
                                 sweep)
    assert all(r["skipped"] == "time budget spent" for r in late) and len(late) == len(sweep)
    # A candidate that raises is reported as failed; the ones after it still run.
    def broken(a, b, out):
        raise RuntimeError("too many resources requested for launch")

    _, failed = bench.bench_matmul(fake_cupy, fake_registry, timer, [24], float("inf"),
                                   lambda m: None, [("broken", "t", broken, dict)] + sweep[:1])
    assert failed[0]["failed"] == "RuntimeError: too many resources requested for launch"
    assert "ms" in failed[1] and bench.best_matmul([], failed)["config"] == sweep[0][0]


def test_gpu_bench_conv_emulated(emulated, monkeypatch):
    """bench_conv end to end on the CPU emulation, so the one short GPU run cannot lose its
    conv section to a bug found only there: tiny layers (3x3, depthwise, strided 1x1) through
    the un-fused stages and ``fused``, each checked against the reference (PyTorch's conv when
    CPU PyTorch is installed, standing in for cuDNN), with speeds relative to "cuDNN FP32"."""
    bench = _gpu_bench()
    monkeypatch.setattr(bench, "RESNET_LAYERS", [
        ("3x3 C8 5x5 K16", 8, 5, 16, 3, 1, 1, 1),
        ("depthwise 3x3 C8 5x5", 8, 5, 8, 3, 1, 1, 8),
        ("1x1/2 C6 6x6 K20", 6, 6, 20, 1, 2, 0, 1)])
    fake_cupy = _bench_cupy(abs=np.abs, ascontiguousarray=emu, from_dlpack=emu)

    def unfused(stage):
        def kernel(x, w, bias, out, p):
            emulated[("conv2d", stage)].kernel(x, w, out, p)
            out += bias.reshape(1, -1, 1, 1)
            np.maximum(out, 0, out=out)
        return kernel

    ladder = [types.SimpleNamespace(stage=stage, fits=lambda flops: True, kernel=unfused(stage))
              for stage in CONV_LADDER[1:]]
    ladder.append(types.SimpleNamespace(stage="fused", fits=lambda flops: True,
                                        kernel=emulated[("conv2d_bias_relu", "fused")].kernel))
    fake_registry = types.SimpleNamespace(ladder=lambda op, backend: ladder)

    def timer(fn, use_torch=False):
        fn()
        return 2e-3 if use_torch else 1e-3, 1

    try:
        import torch
    except Exception:  # noqa: BLE001 - CI has no PyTorch: the fastops half only
        torch = None
    fake_torch = None if torch is None else types.SimpleNamespace(
        nn=torch.nn, from_dlpack=lambda a: torch.from_numpy(np.asarray(a)),
        backends=types.SimpleNamespace(cudnn=types.SimpleNamespace(allow_tf32=False)),
        cuda=types.SimpleNamespace(synchronize=lambda: None))
    rows = bench.bench_conv(fake_cupy, fake_registry, timer, fake_torch, 2, float("inf"),
                            lambda msg: None)
    assert [r["layer"] for r in rows] == [layer[0] for layer in bench.RESNET_LAYERS]
    for row in rows:
        impls = [e["impl"] for e in row["entries"]]
        fastops_entries = [f"fastops {stage}" for stage in CONV_LADDER[1:] + ["fused"]]
        assert impls[-len(fastops_entries):] == fastops_entries, impls
        for entry in row["entries"]:
            assert "skipped" not in entry and entry["ms"] > 0, entry
            if torch is not None and entry["impl"].startswith("fastops"):
                assert entry["rel_err_vs_torch"] < 1e-5, (row["layer"], entry)
                assert entry["speed_vs_cudnn_fp32"] == 2.0


def test_gpu_bench_says_no_gpu(tmp_path):
    try:
        import cupy

        if cupy.cuda.is_available():
            pytest.skip("a GPU is present: gpu_check.sh runs the real benchmark")
    except Exception:  # noqa: BLE001 - no CuPy: exactly the case under test
        pass
    bench = _gpu_bench()
    assert bench.main(["--out", str(tmp_path)]) == 2
    assert "no GPU" in (tmp_path / "report.md").read_text()
