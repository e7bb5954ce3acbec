"""Choosing the implementation when the caller names no stage: the default, or a tuned winner.

What you will find here, top to bottom:

1. The **default** (:func:`best`): the backend's last (most optimised) stage for the dtype.
2. **Problem keys**: an (op, dtype, device, backend, shapes, conv parameters) string naming one
   problem. Tuning results are per problem, like ``torch.backends.cudnn.benchmark``: the best
   kernel for a 3x3 conv on 56x56 images need not be the best one for a 7x7 stem conv.
3. **Timing** (:func:`tune_problem`): run each candidate (backend, stage[, tile variant]) a few
   times on the real arrays, compare medians, keep the default unless another candidate beats
   it by more than ``MARGIN`` (5 %). So a tuned choice is never slower than the untuned default
   beyond timing noise.
4. **The on-disk cache**: one JSON file per machine (CPU model, GPU model, core count, fastops
   version), safe under concurrent processes (lock + merge + atomic replace); a corrupt file is
   ignored with a warning and rewritten, never fatal.
5. **Control**: tuning only times anything inside :func:`autotuning` / :func:`tune`, or when an
   ``fastops.nn`` graph runs for the first time. Plain ``fastops.conv2d(...)`` calls just use a
   cached winner for their shape when there is one. ``FASTOPS_AUTOTUNE=0`` turns all of it off
   (no timing, no cache look-ups: the default everywhere). ``FASTOPS_CACHE_DIR`` moves the cache.

Candidates: every registered implementation of the op on the arrays' device that supports the
dtype, except ``naive`` stages, stages whose ``max_flops`` is below the problem's FLOPs, and the
``numpy`` backend (the borrowed-BLAS baseline fastops is compared with) unless it is the default.
A kernel may expose tile-size variants as a ``variants`` attribute, a mapping
``{label: callable}`` with the kernel's own signature; each variant is timed as a candidate and
a winning variant is returned as a copy of the :class:`~fastops.registry.Implementation` whose
``kernel`` is that callable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import re
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from . import registry

MARGIN = 0.05  # another candidate must beat the default's median by more than this fraction
PRUNE = 2.0  # a candidate whose first timed run is > PRUNE x the best median so far is dropped
REPS = 5  # timed repetitions per candidate (after one untimed warm-up call)
CACHE_FORMAT = 1


# ------------------------------------------------------------------------------ 1. default
def best(op: str, backend: str, dtype) -> registry.Implementation:
    """The untuned default: ``backend``'s last stage that supports ``dtype``."""
    dtype = np.dtype(dtype)
    registry.check_backend(op, backend)
    candidates = [i for i in registry.ladder(op, backend) if i.supports(dtype)]
    if not candidates:
        raise TypeError(f"{op}/{backend}: no stage supports dtype {dtype}")
    return candidates[-1]


def default_for(op: str, device: str, dtype, backend: str | None = None):
    """What ``fastops.api.choose`` returns without tuning (preferred backend, last stage)."""
    from .api import choose

    return choose(op, device, dtype, backend)


def enabled() -> bool:
    """False when ``FASTOPS_AUTOTUNE`` is 0/false/off: no timing and no cached winners."""
    return os.environ.get("FASTOPS_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


# ------------------------------------------------------------------------- 2. problem keys
def _shape(a) -> str:
    return "x".join(str(int(d)) for d in a.shape)


def problem_key(op: str, device: str, dtype, backend: str | None, plan) -> str:
    """A string naming one problem, e.g. ``conv2d_bias_relu|float32|cpu|*|x1x64x56x56|...``.

    ``plan`` is the validated :class:`~fastops.validation.ConvPlan` or ``MatmulPlan``.
    """
    head = f"{op}|{np.dtype(dtype).name}|{device}|{backend or '*'}"
    if op == "matmul":
        return f"{head}|a{_shape(plan.a)}|b{_shape(plan.b)}"
    p = plan.params
    conv = (f"s{p.stride_h},{p.stride_w}|p{p.pad_top},{p.pad_bottom},{p.pad_left},{p.pad_right}"
            f"|d{p.dil_h},{p.dil_w}|g{p.groups}")
    return f"{head}|x{_shape(plan.x)}|w{_shape(plan.w)}|{conv}"


def _flops(op: str, plan) -> float:
    from .validation import conv2d_flops

    if op == "matmul":
        batch = int(np.prod(plan.batch_shape)) if plan.batch_shape else 1
        return 2.0 * batch * plan.a.shape[-2] * plan.a.shape[-1] * plan.b.shape[-1]
    return float(conv2d_flops(plan.x.shape, plan.w.shape, plan.out_shape))


def _runner(op: str, plan):
    """fn(kernel) that calls ``kernel`` once on the plan's arrays into a scratch output."""
    from .validation import contiguous, is_cupy_array

    first = plan.a if op == "matmul" else plan.x
    if is_cupy_array(first):
        import cupy as xp
    else:
        xp = np
    if op == "matmul":
        a, b = plan.a, plan.b
        if b.ndim == 2:  # the linear-layer case the API folds into one (B*M, K) @ (K, N) call
            a = contiguous(a).reshape(-1, a.shape[-1])
        else:  # batched: time the first matrix pair, every pair has the same shape
            a = contiguous(a.reshape((-1,) + a.shape[-2:])[0])
            b = contiguous(b.reshape((-1,) + b.shape[-2:])[0])
        out = xp.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
        return lambda kernel: kernel(a, b, out)
    out = xp.empty(plan.out_shape, dtype=plan.x.dtype)
    if op == "conv2d":
        return lambda kernel: kernel(plan.x, plan.w, out, plan.params)
    bias = plan.bias if plan.bias is not None else xp.zeros(plan.w.shape[0], plan.x.dtype)
    return lambda kernel: kernel(plan.x, plan.w, bias, out, plan.params)


# ------------------------------------------------------------------------------ 3. timing
def candidates(op: str, device: str, dtype, backend: str | None, flops: float):
    """[(label, Implementation)] worth timing, the default first."""
    dtype = np.dtype(dtype)
    default = default_for(op, device, dtype, backend)
    found = []
    for impl in registry.implementations(op, backend=backend, device=device):
        if not impl.supports(dtype) or impl.stage == "naive":
            continue
        if impl.backend == "numpy" and default.backend != "numpy":
            continue  # the BLAS baseline is what fastops is measured against, not a kernel
        if not impl.fits(flops) and impl != default:
            continue
        found.append((f"{impl.backend}/{impl.stage}", impl))
        for variant, kernel in (getattr(impl.kernel, "variants", None) or {}).items():
            found.append((f"{impl.backend}/{impl.stage}[{variant}]",
                          dataclasses.replace(impl, kernel=kernel)))
    default_label = f"{default.backend}/{default.stage}"
    found.sort(key=lambda c: c[0] != default_label)  # stable: the default first
    if not found or found[0][0] != default_label:
        found.insert(0, (default_label, default))
    return found


def pick(medians: dict, default: str, margin: float = MARGIN) -> str:
    """The winner among ``{label: median seconds}``: the fastest, but only if it beats the
    default by more than ``margin``; otherwise the default (never slower beyond noise)."""
    fastest = min(medians, key=medians.get)
    if fastest != default and medians[fastest] < medians[default] * (1.0 - margin):
        return fastest
    return default


def measure_with(clock=time.perf_counter, sync=None):
    """A ``measure(run, reps) -> [seconds]`` function: ``reps`` timed calls of ``run()``."""

    def measure(run, reps):
        times = []
        for _ in range(reps):
            start = clock()
            run()
            if sync is not None:
                sync()
            times.append(clock() - start)
        return times

    return measure


def select(labels, run_of, measure, reps: int = REPS, margin: float = MARGIN,
           prune: float = PRUNE):
    """Time ``labels`` (the default first) and return (winner, {label: median or None}).

    ``run_of(label)`` gives a zero-argument callable running that candidate once; ``measure``
    times it (tests pass a fake). Three phases:

    1. each candidate gets one untimed warm-up call (JIT compile, first touch of its scratch
       memory, the switch of thread pools: one 4 ms scheduler tick on this 2-core machine),
       then one timed probe;
    2. a candidate whose probe is more than ``prune`` times the best probe is dropped (None),
       so a stage 10x slower than the default costs two calls, not ``reps`` (the default is
       never dropped);
    3. the survivors run ``reps - 1`` more times *interleaved* (A B C A B C ...), so a burst of
       load from other processes hits every candidate alike instead of one block; medians.
    """
    runs, times, medians = {}, {}, {}
    for n, label in enumerate(labels):
        run = run_of(label)
        try:
            run()  # warm-up, untimed
            times[label] = measure(run, 1)
        except Exception as exc:  # noqa: BLE001 - a failing candidate is not a winner
            if n == 0:
                raise
            warnings.warn(f"fastops tuning: {label} failed ({type(exc).__name__}: {exc}); skipped",
                          RuntimeWarning, stacklevel=2)
            medians[label] = None
            continue
        runs[label] = run
    best_probe = min(t[0] for t in times.values())
    for label in list(runs):
        if label != labels[0] and times[label][0] > prune * best_probe:
            medians[label] = None
            del runs[label]
    for _ in range(max(reps - 1, 0)):
        for label, run in runs.items():
            times[label] += measure(run, 1)
    for label in runs:
        medians[label] = statistics.median(times[label])
    timed = {k: v for k, v in medians.items() if v is not None}
    return pick(timed, labels[0], margin), {label: medians.get(label) for label in labels}


def tune_problem(op: str, device: str, dtype, backend: str | None, plan, *, measure=None,
                 reps: int = REPS) -> registry.Implementation:
    """Time the candidates for one problem on the plan's arrays, store and return the winner."""
    if device != "cpu":  # GPU arrays: time with a device sync after each call
        import cupy

        measure = measure or measure_with(sync=cupy.cuda.Device().synchronize)
    measure = measure or measure_with()
    start = _cpu_snapshot()
    flops = _flops(op, plan)
    cands = candidates(op, device, dtype, backend, flops)
    by_label = dict(cands)
    if len(cands) == 1:
        winner, medians = cands[0][0], {cands[0][0]: None}
    else:
        run = _runner(op, plan)
        winner, medians = select([c[0] for c in cands],
                                 lambda label: (lambda: run(by_label[label].kernel)), measure,
                                 reps=reps)
    impl = by_label[winner]
    key = problem_key(op, device, dtype, backend, plan)
    entry = {"backend": impl.backend, "stage": impl.stage,
             "variant": _variant_of(winner), "default": cands[0][0],
             "medians_s": medians, "candidates": sorted(by_label), "gflops": flops / 1e9,
             "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    entry["others_cpu"] = others = others_cpu(start)
    _store({key: entry}, persist=not busy(others))
    session = _session.get()
    if session is not None:
        session[key] = winner
    return impl


BUSY_CPUS = 0.25  # other processes using more than this many CPUs on average = a busy machine
_warned_busy = False


def _cpu_snapshot():
    """(wall s, CPU-seconds used by the whole machine, CPU-seconds used by this process), from
    /proc/stat and os.times(); None where /proc/stat does not exist (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    mine = os.times()
    return time.perf_counter(), busy, mine.user + mine.system


def others_cpu(start) -> float | None:
    """Average number of CPUs other processes used since the ``_cpu_snapshot()`` ``start``
    (None if unknown, or if under 0.2 s passed: /proc/stat counts in 10 ms ticks)."""
    end = _cpu_snapshot()
    if start is None or end is None or end[0] - start[0] < 0.2:
        return None
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0]))


def busy(others) -> bool:
    """Whether timings taken while other processes used ``others`` CPUs should not be kept.

    On a busy machine multi-threaded kernels stall on descheduled threads and single-threaded
    ones win timings they lose on a quiet machine (seen here: a ResNet-18 tuned under load ran
    3.4x slower once the machine was quiet). Such results are used by this process only, not
    written to the cache, with a warning (once per process)."""
    global _warned_busy
    if others is None or others <= BUSY_CPUS:
        return False
    if not _warned_busy:
        _warned_busy = True
        warnings.warn(f"fastops tuning: other processes used {others:.1f} CPUs while timing; "
                      "the results are used by this process but not cached (tune again on a "
                      "quiet machine)", RuntimeWarning, stacklevel=4)
    return True


def _variant_of(label: str):
    match = re.search(r"\[(.*)\]$", label)
    return match.group(1) if match else None


def _resolve(op: str, entry: dict, dtype):
    """The Implementation a cache entry names, or None if it is not registered here anymore."""
    try:
        impl = registry.lookup(op, entry["backend"], entry["stage"])
    except (KeyError, ValueError, TypeError):
        return None
    if not impl.supports(dtype):
        return None
    variant = entry.get("variant")
    if variant:
        kernel = (getattr(impl.kernel, "variants", None) or {}).get(variant)
        if kernel is None:
            return None
        impl = dataclasses.replace(impl, kernel=kernel)
    return impl


class _Tuned(dict):
    """{problem key: winner} timed inside one :func:`autotuning` block; ``retune``: re-time
    problems even when cached (once per block)."""

    def __init__(self, retune=False):
        super().__init__()
        self.retune = retune


class _Session(threading.local):
    """Per-thread stack of the active :func:`autotuning` blocks."""

    def __init__(self):
        self.stack = []

    def get(self):
        return self.stack[-1] if self.stack else None


_session = _Session()


@contextlib.contextmanager
def autotuning(retune: bool = False):
    """Inside this block, calls that name no stage tune their problem if it is not cached yet
    (``retune=True``: even if it is, e.g. after timing on a busy machine).

    Yields a dict that fills with ``{problem key: winning 'backend/stage'}``.
    """
    tuned = _Tuned(retune)
    _session.stack.append(tuned)
    try:
        yield tuned
    finally:
        _session.stack.pop()


def choice(op: str, device: str, dtype, backend: str | None, plan, tune: bool | None = None):
    """The tuned implementation for this problem, or None (then the caller uses the default).

    Called by ``fastops.api.choose`` when no stage is named. A cached winner is returned if it
    is still registered; otherwise the problem is timed when ``tune`` is true (default: only
    inside :func:`autotuning`), and None is returned when not.
    """
    if not enabled():
        return None
    dtype = np.dtype(dtype)
    key = problem_key(op, device, dtype, backend, plan)
    entry = _load().get(key)
    wants = _wants_tuning(tune)
    session = _session.get()
    if wants and session is not None and session.retune and key not in session:
        entry = None  # re-time it, once in this block
    if entry is not None:
        impl = _resolve(op, entry, dtype)
        # Only when asked to tune: is the entry stale (timed before a stage was added)?
        stale = wants and sorted(entry.get("candidates", [])) != _candidate_labels(
            op, device, dtype, backend, plan)
        if impl is not None and not stale:
            return impl
    if wants:
        return tune_problem(op, device, dtype, backend, plan)
    return None


def _wants_tuning(tune) -> bool:
    return _session.get() is not None if tune is None else bool(tune)


def _candidate_labels(op, device, dtype, backend, plan):
    """The labels tuning would time now: a cached entry timed with another set is stale (a
    backend or stage was added since), and is re-timed when tuning is requested."""
    return sorted(label for label, _ in candidates(op, device, dtype, backend, _flops(op, plan)))


def tune(model_or_fn, *example_inputs, retune: bool = False, **kwargs) -> dict:
    """Pre-tune a model: run it once on example inputs with autotuning on.

    ``model_or_fn`` is a ``fastops.nn`` graph (its layers are tuned at ``prepare``) or any
    callable that calls fastops ops (each op call with no stage names is tuned on its shape).
    Returns ``{problem key: 'backend/stage'}`` for the problems timed during this call (empty
    when everything was already cached, or when ``FASTOPS_AUTOTUNE=0``). ``retune=True``
    re-times every problem the model meets, replacing the cached winners.
    """
    if not enabled():
        return {}
    with autotuning(retune) as tuned:
        prepare = getattr(model_or_fn, "prepare", None)
        if prepare is not None:
            prepare(*example_inputs, tune=True, **kwargs)
        else:
            model_or_fn(*example_inputs, **kwargs)
    return dict(tuned)


# ------------------------------------------------------------------------ 4. on-disk cache
def cache_dir() -> Path:
    """``$FASTOPS_CACHE_DIR``, else the user cache dir (``$XDG_CACHE_HOME`` or ~/.cache)/fastops."""
    if os.environ.get("FASTOPS_CACHE_DIR"):
        return Path(os.environ["FASTOPS_CACHE_DIR"]).expanduser()
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "fastops" / "cache"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastops"


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


@functools.lru_cache(maxsize=None)
def gpu_model() -> str | None:
    """The CUDA device name when the CuPy backend is available here, else None."""
    from . import backends

    if "cupy" not in backends.available():
        return None
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props.get("name", b"")
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - no usable GPU: the key simply has none
        return None


def machine() -> dict:
    """What tuning results depend on: the processors, the core count and the fastops version."""
    from . import __version__

    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "gpu": gpu_model(),
            "fastops": __version__}


def machine_key() -> str:
    """``<cpu model slug>-<hash of machine()>``: the cache file's name."""
    from . import __version__

    return _machine_key(__version__)


@functools.lru_cache(maxsize=None)
def _machine_key(_version) -> str:
    info = machine()
    digest = hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "-", info["cpu"].lower()).strip("-")[:40] or "cpu"
    return f"{slug}-{digest}"


def cache_path() -> Path:
    return cache_dir() / f"tune-{machine_key()}.json"


_memory: dict = {}  # path -> {problem key: entry}: the cache file, read once per process
_memory_lock = threading.Lock()


def _read(path: Path) -> dict:
    """The entries of the cache file; {} (with a warning) if it is missing or corrupt."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        warnings.warn(f"fastops: cannot read tuning cache {path} ({exc}); tuning from scratch",
                      RuntimeWarning, stacklevel=3)
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise ValueError(f"expected format {CACHE_FORMAT}")
        entries = data["entries"]
        if not isinstance(entries, dict) or not all(
                isinstance(e, dict) and "backend" in e and "stage" in e for e in entries.values()):
            raise ValueError("malformed entries")
        return entries
    except (ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"fastops: ignoring corrupt tuning cache {path} ({exc}); it will be "
                      "rewritten", RuntimeWarning, stacklevel=3)
        return {}


def _load() -> dict:
    path = cache_path()
    with _memory_lock:
        return _load_locked(path)


def _load_locked(path) -> dict:
    if path not in _memory:
        _memory[path] = _read(path)
    return _memory[path]


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on ``path`` + '.lock' (POSIX flock; best effort elsewhere)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic replace below still keeps the file whole
        yield
        return
    with open(str(path) + ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _store(new_entries: dict, persist: bool = True) -> None:
    """Merge entries into the cache file: lock, re-read (other processes may have written),
    merge, write a temp file in the same directory and ``os.replace`` it over the old one, so a
    reader sees the old file or the new one, never half of one. Failures only warn.
    ``persist=False``: keep them in this process's memory only."""
    path = cache_path()
    with _memory_lock:
        _load_locked(path).update(new_entries)
    if not persist:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path):
            entries = _read(path)
            entries.update(new_entries)
            data = {"format": CACHE_FORMAT, "machine": machine(), "entries": entries}
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        with _memory_lock:
            _memory[path] = {**entries, **_memory.get(path, {})}
    except OSError as exc:
        warnings.warn(f"fastops: cannot write tuning cache {path} ({exc}); results are kept for "
                      "this process only", RuntimeWarning, stacklevel=3)


def cache_info() -> dict:
    """For the CLI: where the cache is, for which machine, and what it holds."""
    path = cache_path()
    with _memory_lock:
        _memory.pop(path, None)  # re-read: other processes may have tuned since
    return {"path": str(path), "enabled": enabled(), "machine": machine(),
            "entries": dict(_load())}


def clear_cache() -> None:
    """Delete this machine's cache file and forget what was loaded."""
    path = cache_path()
    with _memory_lock:
        _memory.pop(path, None)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
