"""What machine the numbers come from, and how fast it can go: measured, not looked up.

:func:`machine_info` collects the CPU model and SIMD flags (``/proc/cpuinfo``), thread counts,
the BLAS libraries loaded in this process and their thread pools (threadpoolctl), the GPU if
CuPy sees one, library versions and the environment variables that change BLAS behaviour.

:func:`peaks` returns the roofline ceilings fastops measured on *this* machine:

* **compute**: a Numba kernel of independent fused multiply-adds on 128 register-resident
  accumulators (8 zmm registers in float32: enough to cover FMA latency × FMA ports), run on
  1 thread and then on every Numba thread at once; the best of several trials. float32 and
  float64. The threads are Python threads around a ``nogil`` kernel rather than ``prange``:
  inside a prange body Numba 0.68 kept the accumulators in memory and emitted scalar code
  (12 GFLOP/s on 2 threads against 230 with threads; measured on the 2-vCPU Zen 4 dev box).
* **DRAM bandwidth**: a STREAM triad ``a[i] = b[i] + s * c[i]`` over 3 × 128 MiB float64
  arrays with ``prange`` (24 bytes moved per element, write-allocate traffic not counted).

The measurement runs in a subprocess (so its thread pools and JIT flags stay out of the
benchmark process), with ``NUMBA_CPU_FEATURES`` set to the host's features minus
``prefer-256-bit``: LLVM otherwise emits 256-bit FMAs on some AVX-512 CPUs and the "peak"
would be half the real one. Results are cached per machine in
``$XDG_CACHE_HOME/fastops/machine-<hash>.json`` (default ``~/.cache``), keyed by CPU model,
flags and thread count; a measurement taken while other processes kept the cores busy (load
average above half the CPU count) is used but not cached. Without Numba the compute peak is an *estimate* (cores × clock × FLOP
per cycle from the SIMD flags) and is labelled as such.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "neon", "asimd", "sve")
PEAK_SCHEMA = 1


# ----------------------------------------------------------------------------- the CPU
def cpu() -> dict:
    """CPU model, SIMD flags, logical CPUs, clock (from /proc/cpuinfo where it exists)."""
    model, flags, mhz = platform.processor() or platform.machine(), [], None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = value.split()
        elif key == "cpu MHz" and mhz is None:
            mhz = float(value)
    info = {"model": model, "machine": platform.machine(), "logical_cpus": os.cpu_count(),
            "simd": [f for f in SIMD_FLAGS if f in flags], "mhz": mhz}
    try:
        import llvmlite.binding as llvm

        info["llvm_cpu"] = llvm.get_host_cpu_name()
    except Exception:  # noqa: BLE001 - optional detail
        pass
    return info


def threads() -> dict:
    info = {"os_cpu_count": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    try:
        import numba

        info["numba_threads"] = numba.config.NUMBA_NUM_THREADS
        try:
            info["numba_threading_layer"] = numba.threading_layer()  # the one actually in use
        except ValueError:  # no parallel kernel has run yet: the configured preference
            info["numba_threading_layer"] = f"{numba.config.THREADING_LAYER} (not started)"
    except ImportError:
        pass
    return info


def blas() -> list[dict]:
    """The BLAS / OpenMP pools loaded in this process (threadpoolctl), one dict each."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("user_api", "internal_api", "version", "architecture", "threading_layer",
            "num_threads", "prefix", "filepath")
    return [{k: pool.get(k) for k in keep if pool.get(k) is not None} for pool in threadpool_info()]


def gpu() -> dict | None:
    try:
        import cupy

        if not cupy.cuda.is_available():
            return None
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        return {"name": name.decode() if isinstance(name, bytes) else name,
                "count": cupy.cuda.runtime.getDeviceCount(),
                "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
                "compute_capability": f"{props['major']}.{props['minor']}",
                "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion()}
    except Exception:  # noqa: BLE001 - no CuPy, no driver: no GPU
        return None


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("fastops", "numpy", "numba", "llvmlite", "Cython", "torch", "cupy-cuda13x",
                 "cupy-cuda12x", "cupy", "threadpoolctl", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def tuning_cache() -> str | None:
    """Where fastops.tuning keeps its autotune cache, if it exposes one."""
    try:
        from .. import tuning
    except ImportError:
        return None
    for name in ("cache_path", "CACHE_PATH", "cache_file", "CACHE_FILE", "cache_dir"):
        value = getattr(tuning, name, None)
        if value is not None:
            try:
                return str(value() if callable(value) else value)
            except Exception:  # noqa: BLE001 - informational only
                return None
    return None


def machine_info(with_torch: bool = False) -> dict:
    """Everything `fastops info` prints (no measurement: see :func:`peaks`)."""
    if with_torch:
        try:
            import torch  # noqa: F401 - loads its BLAS/OpenMP pools so threadpoolctl lists them
        except ImportError:
            pass
    import numpy  # noqa: F401 - make sure OpenBLAS is loaded before asking threadpoolctl

    from .. import backends

    return {
        "cpu": cpu(), "threads": threads(), "blas": blas(), "gpu": gpu(), "versions": versions(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                               "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                               "NUMBA_NUM_THREADS", "NUMBA_CPU_FEATURES",
                                               "GOMP_SPINCOUNT", "OMP_WAIT_POLICY",
                                               "OPENBLAS_THREAD_TIMEOUT")},
        "backends": {"available": backends.available(), "unavailable": backends.unavailable()},
        "tuning_cache": tuning_cache(), "platform": platform.platform(),
    }


# ----------------------------------------------------------------------------- peaks
def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastops"


def machine_key() -> str:
    c, t = cpu(), threads()
    ident = json.dumps([c["model"], c.get("llvm_cpu"), c["simd"], c["logical_cpus"],
                        t.get("numba_threads"), PEAK_SCHEMA])
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def peaks(remeasure: bool = False) -> dict:
    """Measured FP32/FP64 compute peak (GFLOP/s) and DRAM bandwidth (GB/s), cached per machine."""
    path = cache_dir() / f"machine-{machine_key()}.json"
    if not remeasure and path.exists():
        try:
            data = json.loads(path.read_text())
            data["cache_file"], data["cached"] = str(path), True
            return data
        except (OSError, ValueError):
            pass
    load_before = _load()
    data = _measure_in_subprocess()
    data["cpu_model"] = cpu()["model"]
    data["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    data["load_avg"] = load_before  # before: afterwards it counts the measurement's own threads
    busy = data["load_avg"] > 0.5 * (os.cpu_count() or 1)
    if busy:
        data["method"] += (f"; machine busy (load {data['load_avg']:.1f}): peaks may be low, "
                           "not cached")
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=2))
        except OSError:
            pass
    data["cache_file"], data["cached"] = str(path), False
    return data


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _measure_in_subprocess() -> dict:
    env = dict(os.environ)
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features().flatten()
        if "+avx512f" in features and "NUMBA_CPU_FEATURES" not in env:
            env["NUMBA_CPU_FEATURES"] = features + ",-prefer-256-bit"
    except Exception:  # noqa: BLE001 - no llvmlite: the subprocess falls back to estimates
        pass
    try:
        done = subprocess.run([sys.executable, "-m", "fastops.bench.machine", "--measure"],
                              env=env, capture_output=True, text=True, timeout=300, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        data = _measure()  # same thing in-process
        data["note"] = f"subprocess measurement failed ({type(exc).__name__}); measured in-process"
        return data


def _estimate_peak() -> float:
    """cores × clock × FLOP/cycle from the SIMD flags (2 FMA ports assumed): not a measurement."""
    c = cpu()
    per_cycle = 64 if "avx512f" in c["simd"] else 32 if "fma" in c["simd"] else 8
    return (c["logical_cpus"] or 1) * (c["mhz"] or 2000.0) / 1e3 * per_cycle


def _measure() -> dict:
    try:
        import numba  # noqa: F401
    except ImportError:
        est = _estimate_peak()
        return {"fp32_gflops": est, "fp64_gflops": est / 2, "dram_gbs": _numpy_triad(),
                "method": "estimate: numba missing; compute peak = cores x clock x FLOP/cycle "
                          "from SIMD flags (not measured); bandwidth = single-thread NumPy triad"}
    import numba

    n_threads = numba.config.NUMBA_NUM_THREADS
    out = {"threads": n_threads, "method": "measured: numba FMA kernel + prange STREAM triad"}
    for dtype in ("float32", "float64"):
        one = _fma_gflops(dtype, 1)
        out[f"fp{dtype[-2:]}_gflops_1thread"] = one
        out[f"fp{dtype[-2:]}_gflops"] = max(one, _fma_gflops(dtype, n_threads))
    out["dram_gbs"] = _triad_gbs()
    out["numba_cpu_features_override"] = "NUMBA_CPU_FEATURES" in os.environ
    return out


def _fma_kernels():
    import numba
    import numpy as np

    fm = {"contract", "nsz", "arcp", "reassoc"}

    def make(dtype):
        # 128 accumulators, each an independent chain acc = acc * m + c: the loop over j
        # vectorises into 128/lanes FMAs with no dependency between them, so the FMA units
        # never wait on latency. Values converge to c / (1 - m) = 0.1: no overflow, no denormals.
        @numba.njit(fastmath=fm, nogil=True, cache=False)
        def fma(n_iter):
            acc = np.empty(128, dtype)
            for j in range(128):
                acc[j] = 1.0 + j * 1e-3
            m, c = dtype(0.99999), dtype(1e-6)
            for _ in range(n_iter):
                for j in range(128):
                    acc[j] = acc[j] * m + c
            return acc.sum()

        return fma

    return {"float32": make(np.float32), "float64": make(np.float64)}


_KERNELS = {}


def _fma_gflops(dtype: str, n_threads: int, trial_s: float = 0.25, trials: int = 5) -> float:
    if not _KERNELS:
        _KERNELS.update(_fma_kernels())
    kernel = _KERNELS[dtype]
    kernel(10)  # compile
    t0 = time.perf_counter()
    kernel(20000)
    per_iter = (time.perf_counter() - t0) / 20000
    n_iter = max(1000, int(trial_s / per_iter))
    best = 0.0
    for _ in range(trials):
        workers = [threading.Thread(target=kernel, args=(n_iter,)) for _ in range(n_threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - t0
        best = max(best, 2 * 128 * n_iter * n_threads / elapsed / 1e9)
    return best


def _triad_gbs(n: int = 1 << 24, trials: int = 7) -> float:
    import numba
    import numpy as np

    @numba.njit(parallel=True, fastmath={"contract"}, cache=False)
    def triad(a, b, c, s):
        for i in numba.prange(a.size):
            a[i] = b[i] + s * c[i]

    a, b, c = np.zeros(n), np.ones(n), np.full(n, 2.0)
    triad(a, b, c, 3.0)
    best = min(_elapsed(triad, a, b, c, 3.0) for _ in range(trials))
    return 3 * 8 * n / best / 1e9


def _numpy_triad(n: int = 1 << 24, trials: int = 5) -> float:
    import numpy as np

    a, b, c = np.zeros(n), np.ones(n), np.full(n, 2.0)

    def triad(a, b, c, s):
        np.multiply(c, s, out=a)
        np.add(a, b, out=a)  # two passes over a: counted as one triad, so a lower bound

    best = min(_elapsed(triad, a, b, c, 3.0) for _ in range(trials))
    return 3 * 8 * n / best / 1e9


def _elapsed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


if __name__ == "__main__":
    if "--measure" in sys.argv:
        print(json.dumps(_measure()))
    else:
        print(json.dumps(peaks(remeasure="--remeasure" in sys.argv), indent=2))
