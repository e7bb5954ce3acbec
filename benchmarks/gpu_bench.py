#!/usr/bin/env python3
"""GPU benchmark of the cupy ladders against the vendor libraries; writes report.json + report.md.

* matmul: every stage of matmul/cupy at n x n x n (default n = 1024, 2048, 4096), float32,
  against cuBLAS through ``cupy.matmul`` (FP32, CUPY_TF32=0): time, GFLOP/s, % of cuBLAS.
* conv2d + bias + ReLU: every stage of conv2d_bias_relu/cupy (the un-fused ones and fused) on
  the ResNet-50 layer set at batch 8, float32, against PyTorch cuDNN
  ``relu(F.conv2d(x, w, b, ...))`` with TF32 off (the like-for-like FP32 comparison) and on.

Timing: CUDA events around each call after warm-up (the first call also compiles), repeated
until about --target-s seconds per entry (3 to 50 repetitions), median reported. fastops
kernels are timed at the kernel entry point (after validation); PyTorch at its Python API, so
its per-call dispatch overhead (microseconds) is included: it matters only for tiny layers.

Usage: python benchmarks/gpu_bench.py [--out DIR] [--sizes 1024,2048,4096] [--batch 8]
Exits with status 2 and a "no GPU" message when CuPy or a CUDA GPU is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

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
    parser.add_argument("--skip-matmul", action="store_true")
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
    """Why ``impl`` is not timed on a problem of ``flops`` (None: time it)."""
    if not impl.fits(flops):
        return f"max_flops {impl.max_flops:.3g} < {flops:.3g}"
    if time.monotonic() > deadline:
        return "time budget spent"
    return None


def bench_matmul(cupy, registry, timer, sizes, deadline, log):
    rows = []
    for n in sizes:
        rng = cupy.random.default_rng(n)
        a = rng.standard_normal((n, n), dtype=cupy.float32)
        b = rng.standard_normal((n, n), dtype=cupy.float32)
        ref = cupy.empty((n, n), cupy.float32)
        out = cupy.empty((n, n), cupy.float32)
        flops = 2.0 * n ** 3
        t_ref, reps = timer(lambda: cupy.matmul(a, b, out=ref))
        scale = float(cupy.abs(ref).max())
        rows.append(dict(size=n, stage="cuBLAS (cupy.matmul)", ms=t_ref * 1e3, reps=reps,
                         gflops=flops / t_ref / 1e9, pct_of_cublas=100.0, rel_err=0.0))
        log(f"matmul {n}: cuBLAS {t_ref * 1e3:.3f} ms, {flops / t_ref / 1e12:.2f} TFLOP/s")
        for impl in registry.ladder("matmul", "cupy"):
            row = dict(size=n, stage=impl.stage)
            skipped = skip_reason(impl, flops, deadline)
            if skipped:
                row["skipped"] = skipped
            else:
                out.fill(float("nan"))
                t, reps = timer(lambda: impl.kernel(a, b, out))
                err = float(cupy.abs(out - ref).max()) / scale
                row.update(ms=t * 1e3, reps=reps, gflops=flops / t / 1e9,
                           pct_of_cublas=100.0 * t_ref / t, rel_err=err)
                log(f"matmul {n}: {impl.stage:<11} {t * 1e3:9.3f} ms  "
                    f"{100 * t_ref / t:6.1f}% of cuBLAS  max rel err {err:.2e}")
            rows.append(row)
        del a, b, ref, out
        cupy.get_default_memory_pool().free_all_blocks()
    return rows


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


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CUPY_TF32", "0")  # cuBLAS in true FP32, like the fastops kernels
    start = time.monotonic()

    def log(msg):
        print(f"[{time.monotonic() - start:6.1f}s] {msg}", flush=True)

    report = dict(args=vars(args), method="CUDA events, warm-up then median of 3-50 calls",
                  environment={}, matmul=[], conv=[])
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
        (out_dir / "report.json").write_text(json.dumps(report, indent=2))
        write_markdown(report, out_dir / "report.md")
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
            report["matmul"] = bench_matmul(cupy, registry, timer, sizes, deadline, log)
        if not args.skip_conv:
            report["conv"] = bench_conv(cupy, registry, timer, torch, args.batch, deadline, log)
    finally:
        report["elapsed_s"] = time.monotonic() - start
        (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
        write_markdown(report, out_dir / "report.md")
        log(f"wrote {out_dir / 'report.json'} and {out_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
