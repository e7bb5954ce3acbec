#!/usr/bin/env python3
"""GPU benchmark of the cupy ladders against the vendor libraries; writes report.json + report.md.

* matmul: every stage of matmul/cupy at n x n x n (default n = 1024, 2048, 4096), float32,
  against cuBLAS through ``cupy.matmul`` (FP32, CUPY_TF32=0): time, GFLOP/s, % of cuBLAS.
* warptile sweep: at the largest n, the warptiled stage under every candidate tile of
  ``_loader.WARPTILES`` (same inputs, same cuBLAS reference), with each compiled kernel's
  registers and blocks per SM; the fastest correct candidate feeds the "best matmul" line,
  and is the one to make the default (``_loader.WARPTILE``). --skip-sweep leaves it out.
* conv2d + bias + ReLU: every stage of conv2d_bias_relu/cupy (the un-fused ones and fused) on
  the ResNet-50 layer set at batch 8, float32, against PyTorch cuDNN
  ``relu(F.conv2d(x, w, b, ...))`` with TF32 off (the like-for-like FP32 comparison) and on.

Timing: CUDA events around each call after warm-up (the first call also compiles), repeated
until about --target-s seconds per entry (3 to 50 repetitions), median reported. fastops
kernels are timed at the kernel entry point (after validation); PyTorch at its Python API, so
its per-call dispatch overhead (microseconds) is included: it matters only for tiny layers.

Usage: python benchmarks/gpu_bench.py [--out DIR] [--sizes 1024,2048,4096] [--batch 8]
                                     [--budget-s 240] [--skip-matmul] [--skip-sweep] [--skip-conv]
Exits with status 2 and a "no GPU" message when CuPy or a CUDA GPU is missing.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

TARGET_PCT_OF_CUBLAS = 80.0  # the matmul goal: best stage >= 0.8x cuBLAS at the largest n
# A timed entry whose max |error| / max |cuBLAS result| passes this is wrong, not slow: it is
# reported but can never be "best". FP32 rounding at n = 4096 is orders of magnitude below.
MAX_REL_ERR = 1e-3

# (name, C, H=W, K, kernel, stride, padding, groups): ResNet-50's conv shapes.
RESNET_LAYERS = [
    ("3x3 C64 56x56 K64", 64, 56, 64, 3, 1, 1, 1),
    ("3x3 C128 28x28 K128", 128, 28, 128, 3, 1, 1, 1),
    ("3x3 C256 14x14 K256", 256, 14, 256, 3, 1, 1, 1),
    ("3x3 C512 7x7 K512", 512, 7, 512, 3, 1, 1, 1),
    ("1x1 C256 56x56 K64", 256, 56, 64, 1, 1, 0, 1),
    ("stem 7x7/2 C3 224x224 K64", 3, 224, 64, 7, 2, 3, 1),
    ("depthwise 3x3 C128 56x56", 128, 56, 128, 3, 1, 1, 128),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-out",
                        help="folder for report.json and report.md (default: $OUT or ./gpu-out)")
    parser.add_argument("--sizes", default="1024,2048,4096",
                        help="matmul sizes n (n x n x n), comma-separated")
    parser.add_argument("--batch", type=int, default=8, help="conv batch size (default 8)")
    parser.add_argument("--target-s", type=float, default=0.3,
                        help="seconds of timed calls per entry (default 0.3)")
    parser.add_argument("--budget-s", type=float, default=240,
                        help="stop starting new entries after this many seconds (default 240)")
    parser.add_argument("--skip-matmul", action="store_true",
                        help="no matmul benchmark (and so no warptile sweep)")
    parser.add_argument("--skip-sweep", action="store_true",
                        help="time only the registered warptiled tile, not every candidate")
    parser.add_argument("--skip-conv", action="store_true")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------ timing
class Timer:
    """Median CUDA-event time of fn() in seconds, for CuPy or PyTorch work."""

    def __init__(self, cupy, torch=None, target_s=0.3):
        self.cupy, self.torch, self.target_s = cupy, torch, target_s

    def _once(self, fn, use_torch):
        if use_torch:
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start, end = self.cupy.cuda.Event(), self.cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return self.cupy.cuda.get_elapsed_time(start, end) / 1e3

    def __call__(self, fn, use_torch=False):
        first = self._once(fn, use_torch)  # warm-up: compiles, picks algorithms, fills caches
        second = self._once(fn, use_torch)
        if second < 0.05:
            for _ in range(3):
                self._once(fn, use_torch)
        reps = max(3, min(50, int(self.target_s / max(second, 1e-6))))
        times = [self._once(fn, use_torch) for _ in range(reps)]
        del first
        return statistics.median(times), reps


# ------------------------------------------------------------------------------ benchmarks
def skip_reason(impl, flops, deadline):
    """Why ``impl`` (None: a sweep entry, no size limit) is not timed on a problem of
    ``flops`` (None: time it)."""
    if impl is not None and not impl.fits(flops):
        return f"max_flops {impl.max_flops:.3g} < {flops:.3g}"
    if time.monotonic() > deadline:
        return "time budget spent"
    return None


def time_matmul(timer, fn, out, ref, t_ref, flops):
    """Time ``fn()``, which writes ``out``; compare ``out`` with the cuBLAS result ``ref``
    (taking ``t_ref`` seconds). NaN-filled first, so a kernel that skips elements shows."""
    out.fill(float("nan"))
    t, reps = timer(fn)
    err = float(abs(out - ref).max()) / float(abs(ref).max())
    return dict(ms=t * 1e3, reps=reps, gflops=flops / t / 1e9, pct_of_cublas=100.0 * t_ref / t,
                rel_err=err)


def warptile_sweep():
    """(name, tile label, kernel(a, b, out), resources()) for every warptiled candidate tile."""
    from fastops.kernels.cuda import _loader
    from fastops.kernels.cuda.matmul import run_warptiled

    def resources(tile):
        fn = _loader.kernel("matmul.cu", "matmul_warptiled", _loader.matmul_defines(tile))
        return kernel_resources(fn, tile.nt)

    return [(name, tile.label, functools.partial(run_warptiled, tile=tile),
             functools.partial(resources, tile)) for name, tile in _loader.WARPTILES.items()]


def kernel_resources(fn, threads):
    """Registers, spilled bytes and resident blocks per SM of a compiled cupy.RawKernel: what
    explains a tile's speed. Best effort: a field CuPy cannot report is left out."""
    found = {}
    for key, get in (("regs", lambda: fn.num_regs), ("spill_bytes", lambda: fn.local_size_bytes),
                     ("blocks_per_sm", lambda: _blocks_per_sm(fn, threads))):
        try:
            found[key] = int(get())
        except Exception:  # noqa: BLE001 - an informative extra, never a reason to fail
            pass
    return found


def _blocks_per_sm(fn, threads):
    import cupy

    return cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, 0)


def bench_matmul(cupy, registry, timer, sizes, deadline, log, sweep=()):
    """The ladder at every n in ``sizes`` and, at the largest n, every ``sweep`` entry (see
    warptile_sweep). Returns (ladder rows, sweep rows)."""
    rows, sweep_rows = [], []
    for n in sizes:
        rng = cupy.random.default_rng(n)
        a = rng.standard_normal((n, n), dtype=cupy.float32)
        b = rng.standard_normal((n, n), dtype=cupy.float32)
        ref = cupy.empty((n, n), cupy.float32)
        out = cupy.empty((n, n), cupy.float32)
        flops = 2.0 * n ** 3
        t_ref, reps = timer(lambda: cupy.matmul(a, b, out=ref))
        rows.append(dict(size=n, stage="cuBLAS (cupy.matmul)", ms=t_ref * 1e3, reps=reps,
                         gflops=flops / t_ref / 1e9, pct_of_cublas=100.0, rel_err=0.0))
        log(f"matmul {n}: cuBLAS {t_ref * 1e3:.3f} ms, {flops / t_ref / 1e12:.2f} TFLOP/s")
        for impl in registry.ladder("matmul", "cupy"):
            row = dict(size=n, stage=impl.stage)
            skipped = skip_reason(impl, flops, deadline)
            if skipped:
                row["skipped"] = skipped
            else:
                row.update(time_matmul(timer, lambda: impl.kernel(a, b, out), out, ref, t_ref,
                                       flops))
                log(f"matmul {n}: {impl.stage:<11} {row['ms']:9.3f} ms  "
                    f"{row['pct_of_cublas']:6.1f}% of cuBLAS  max rel err {row['rel_err']:.2e}")
            rows.append(row)
        for name, label, kernel, resources in (sweep if n == max(sizes) else ()):
            row = dict(size=n, stage="warptiled", config=name, tile=label)
            skipped = skip_reason(None, flops, deadline)
            if skipped:
                row["skipped"] = skipped
                sweep_rows.append(row)
                continue
            try:
                row.update(time_matmul(timer, lambda: kernel(a, b, out), out, ref, t_ref, flops))
            except Exception as exc:  # noqa: BLE001 - candidates were never run on a GPU before
                # the sweep: one that fails to compile or launch is reported, the others run.
                row["failed"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                log(f"matmul {n}: warptiled[{name}] failed: {row['failed']}")
            else:
                row.update(resources())  # after the timed calls, which compiled the kernel
                log(f"matmul {n}: warptiled[{name:<13}] {row['ms']:9.3f} ms  "
                    f"{row['pct_of_cublas']:6.1f}% of cuBLAS  max rel err {row['rel_err']:.2e}  "
                    f"{row.get('regs', '?')} regs, {row.get('blocks_per_sm', '?')} blocks/SM")
            sweep_rows.append(row)
        del a, b, ref, out
        cupy.get_default_memory_pool().free_all_blocks()
    return rows, sweep_rows


def best_matmul(rows, sweep_rows):
    """The fastest correct fastops entry (ladder stage or sweep candidate) at the largest n
    that was timed, with whether it meets the target; None if nothing was timed."""
    timed = [r for r in rows + sweep_rows if "ms" in r and not r["stage"].startswith("cuBLAS")]
    if not timed:
        return None
    n = max(r["size"] for r in timed)
    correct = [r for r in timed if r["size"] == n and r["rel_err"] <= MAX_REL_ERR]
    if not correct:
        return dict(size=n, error=f"no entry at n = {n} within max rel err {MAX_REL_ERR:g}")
    best = dict(min(correct, key=lambda r: r["ms"]))
    best["target_pct_of_cublas"] = TARGET_PCT_OF_CUBLAS
    best["meets_target"] = best["pct_of_cublas"] >= TARGET_PCT_OF_CUBLAS
    return best


def _entry_name(row):
    return f"{row['stage']}[{row['config']}]" if "config" in row else row["stage"]


def best_matmul_line(best):
    if "error" in best:
        return f"best matmul: {best['error']}"
    verdict = "met" if best["meets_target"] else "not met"
    return (f"best matmul at n = {best['size']}: {_entry_name(best)}, {best['ms']:.3f} ms, "
            f"{best['gflops']:.0f} GFLOP/s, {best['pct_of_cublas']:.1f}% of cuBLAS "
            f"(target {best['target_pct_of_cublas']:.0f}%: {verdict})")


def bench_conv(cupy, registry, timer, torch, batch, deadline, log):
    from fastops.validation import check_conv2d, conv2d_flops

    F = torch.nn.functional if torch is not None else None
    rows = []
    for name, c, hw, k, ks, stride, pad, groups in RESNET_LAYERS:
        rng = cupy.random.default_rng(c * hw + k)
        x = rng.standard_normal((batch, c, hw, hw), dtype=cupy.float32)
        w = rng.standard_normal((k, c // groups, ks, ks), dtype=cupy.float32) * (
            1.0 / (c // groups * ks * ks) ** 0.5)
        w = cupy.ascontiguousarray(w.astype(cupy.float32))
        bias = rng.standard_normal(k, dtype=cupy.float32)
        plan = check_conv2d(x, w, bias, stride, pad, 1, groups)
        out = cupy.empty(plan.out_shape, cupy.float32)
        flops = conv2d_flops(x.shape, w.shape, plan.out_shape)
        layer = dict(layer=name, shape=dict(n=batch, c=c, h=hw, w=hw, k=k, kernel=ks,
                                            stride=stride, padding=pad, groups=groups),
                     gflop=flops / 1e9, entries=[])
        ref = None
        if torch is not None:
            xt, wt, bt = (torch.from_dlpack(v) for v in (x, w, bias))

            def torch_call():
                return F.relu(F.conv2d(xt, wt, bt, stride=stride, padding=pad, groups=groups))

            for tf32 in (False, True):
                torch.backends.cudnn.allow_tf32 = tf32
                t, reps = timer(torch_call, use_torch=True)
                label = "cuDNN TF32" if tf32 else "cuDNN FP32"
                layer["entries"].append(dict(impl=f"PyTorch {label}", ms=t * 1e3, reps=reps,
                                             gflops=flops / t / 1e9))
                log(f"conv {name}: PyTorch {label} {t * 1e3:.3f} ms")
            torch.backends.cudnn.allow_tf32 = False
            ref = cupy.from_dlpack(torch_call().contiguous())
            torch.cuda.synchronize()
        for impl in registry.ladder("conv2d_bias_relu", "cupy"):
            entry = dict(impl=f"fastops {impl.stage}")
            skipped = skip_reason(impl, flops, deadline)
            if skipped:
                entry["skipped"] = skipped
            else:
                out.fill(float("nan"))
                t, reps = timer(lambda: impl.kernel(x, w, bias, out, plan.params))
                entry.update(ms=t * 1e3, reps=reps, gflops=flops / t / 1e9)
                if ref is not None:
                    scale = float(cupy.abs(ref).max()) or 1.0
                    entry["rel_err_vs_torch"] = float(cupy.abs(out - ref).max()) / scale
                log(f"conv {name}: fastops {impl.stage:<13} {t * 1e3:9.3f} ms  "
                    f"err {entry.get('rel_err_vs_torch', float('nan')):.2e}")
            layer["entries"].append(entry)
        fp32 = next((e for e in layer["entries"] if e["impl"] == "PyTorch cuDNN FP32"), None)
        if fp32 is not None:
            for e in layer["entries"]:
                if "ms" in e:
                    e["speed_vs_cudnn_fp32"] = fp32["ms"] / e["ms"]
        rows.append(layer)
        del x, w, bias, out, ref
        cupy.get_default_memory_pool().free_all_blocks()
    return rows


# ------------------------------------------------------------------------------ report
def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def write_markdown(report, path: Path):
    lines = ["# fastops GPU benchmark", ""]
    env = report["environment"]
    lines += [f"- device: {env.get('gpu')}", f"- CUDA runtime {env.get('cuda_runtime')}, "
              f"driver {env.get('cuda_driver')}, CuPy {env.get('cupy')}, "
              f"PyTorch {env.get('torch')}, Python {env.get('python')}",
              f"- timing: {report['method']}", ""]
    if report.get("error"):
        lines += [f"**{report['error']}**", ""]
    if report.get("best_matmul"):
        lines += [f"**{best_matmul_line(report['best_matmul'])}**", ""]
    if report.get("matmul"):
        lines += ["## matmul (float32, n x n x n) vs cuBLAS", "",
                  "| n | stage | ms | GFLOP/s | % of cuBLAS | max rel err |",
                  "|---:|---|---:|---:|---:|---:|"]
        for r in report["matmul"]:
            if "skipped" in r:
                lines.append(f"| {r['size']} | {r['stage']} | skipped: {r['skipped']} | | | |")
            else:
                lines.append(f"| {r['size']} | {r['stage']} | {r['ms']:.3f} | "
                             f"{r['gflops']:.0f} | {r['pct_of_cublas']:.1f} | "
                             f"{r['rel_err']:.1e} |")
        lines.append("")
    if report.get("warptile_sweep"):
        sweep = report["warptile_sweep"]
        lines += [f"## warptiled tile sweep (n = {sweep[0]['size']}) vs cuBLAS", "",
                  "Every candidate of kernels/cuda/_loader.py WARPTILES on the same inputs; "
                  "the fastest correct one is the one to make the default (WARPTILE).", "",
                  "| config | tile | ms | GFLOP/s | % of cuBLAS | max rel err | registers | "
                  "blocks/SM |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in sweep:
            if "ms" not in r:
                why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r['failed']}"
                lines.append(f"| {r['config']} | {r['tile']} | {why} | | | | | |")
            else:
                regs = _fmt(r.get("regs"), "d")
                if r.get("spill_bytes"):
                    regs += f" ({r['spill_bytes']} B spilled)"
                lines.append(f"| {r['config']} | {r['tile']} | {r['ms']:.3f} | "
                             f"{r['gflops']:.0f} | {r['pct_of_cublas']:.1f} | "
                             f"{r['rel_err']:.1e} | {regs} | "
                             f"{_fmt(r.get('blocks_per_sm'), 'd')} |")
        lines.append("")
    if report.get("conv"):
        lines += [f"## conv2d + bias + ReLU (float32, batch {report['args']['batch']}) "
                  "vs PyTorch cuDNN", "",
                  "| layer | GFLOP | implementation | ms | GFLOP/s | speed vs cuDNN FP32 | "
                  "max rel err vs PyTorch |", "|---|---:|---|---:|---:|---:|---:|"]
        for layer in report["conv"]:
            for e in layer["entries"]:
                if "skipped" in e:
                    lines.append(f"| {layer['layer']} | {layer['gflop']:.2f} | {e['impl']} | "
                                 f"skipped: {e['skipped']} | | | |")
                    continue
                lines.append(
                    f"| {layer['layer']} | {layer['gflop']:.2f} | {e['impl']} | {e['ms']:.3f} | "
                    f"{e['gflops']:.0f} | {_fmt(e.get('speed_vs_cudnn_fp32'), '.2f')}x | "
                    f"{_fmt(e.get('rel_err_vs_torch'), '.1e')} |")
        lines.append("")
    path.write_text("\n".join(lines))


def environment(cupy, torch):
    env = dict(python=platform.python_version(), platform=platform.platform(),
               cupy_tf32=os.environ.get("CUPY_TF32", "unset"))
    if cupy is not None:
        env["cupy"] = cupy.__version__
        try:
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            env["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            env["sm_count"] = props.get("multiProcessorCount")
            env["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            env["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
        except Exception as exc:  # noqa: BLE001
            env["gpu"] = f"unknown ({exc})"
    if torch is not None:
        env["torch"] = torch.__version__
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def save_report(report, out_dir: Path):
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    write_markdown(report, out_dir / "report.md")


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CUPY_TF32", "0")  # cuBLAS in true FP32, like the fastops kernels
    start = time.monotonic()

    def log(msg):
        print(f"[{time.monotonic() - start:6.1f}s] {msg}", flush=True)

    report = dict(args=vars(args), method="CUDA events, warm-up then median of 3-50 calls",
                  environment={}, matmul=[], warptile_sweep=[], best_matmul=None, conv=[])
    cupy = torch = None
    try:
        import cupy

        if not cupy.cuda.is_available():
            raise RuntimeError("cupy.cuda.is_available() is False")
    except Exception as exc:  # noqa: BLE001 - any failure here means "no GPU to benchmark"
        report["error"] = f"no GPU: {type(exc).__name__}: {exc}"
    if "error" not in report:
        import fastops  # noqa: F401 - registers the backends
        from fastops import backends, registry

        if "cupy" in backends.unavailable():
            report["error"] = f"no GPU: cupy backend unavailable: {backends.unavailable()['cupy']}"
    if "error" in report:
        report["environment"] = environment(None, None)
        print(report["error"], file=sys.stderr)
        save_report(report, out_dir)
        return 2
    try:
        import torch

        if not torch.cuda.is_available():
            log("PyTorch sees no GPU: the conv comparison column is left out")
            torch = None
        else:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = False
    except ImportError:
        log("PyTorch not installed: the conv comparison column is left out")
    report["environment"] = environment(cupy, torch)
    log(f"device: {report['environment'].get('gpu')}")
    timer = Timer(cupy, torch, args.target_s)
    deadline = start + args.budget_s
    try:
        if not args.skip_matmul:
            sizes = [int(s) for s in args.sizes.split(",") if s]
            sweep = () if args.skip_sweep else warptile_sweep()
            report["matmul"], report["warptile_sweep"] = bench_matmul(
                cupy, registry, timer, sizes, deadline, log, sweep)
            report["best_matmul"] = best_matmul(report["matmul"], report["warptile_sweep"])
            if report["best_matmul"]:
                log(best_matmul_line(report["best_matmul"]))
            # Saved now as well: if the conv part overruns gpu_check.sh's timeout (which kills
            # this process, so `finally` never runs), the sweep's table is not lost.
            save_report(report, out_dir)
        if not args.skip_conv:
            report["conv"] = bench_conv(cupy, registry, timer, torch, args.batch, deadline, log)
    finally:
        report["elapsed_s"] = time.monotonic() - start
        save_report(report, out_dir)
        log(f"wrote {out_dir / 'report.json'} and {out_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
