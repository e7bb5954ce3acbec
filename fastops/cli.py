"""The ``fastops`` command: ``fastops bench`` (the benchmark report) and ``fastops info``.

    fastops bench [--op OP ...] [--backend B ...] [--stage S ...] [--dtype float32|float64]
                  [--quick | --full] [--out DIR] [--compare OLD.json] [--no-torch]
    fastops info [--json] [--peaks]

Names of ops, backends and stages are checked against the registry (plus the ``torch``
baseline); an unknown name is an argparse error (exit code 2) that lists the valid ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastops", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="time every registered stage; write the report",
                           description="Time every registered (op, backend, stage) plus the "
                           "NumPy and PyTorch baselines; write report.md/.json/.html, "
                           "ladder.png and roofline.png.")
    bench.add_argument("--op", nargs="+", metavar="OP", help="ops to run (default: all)")
    bench.add_argument("--backend", nargs="+", metavar="B",
                       help="fastops backends to run (default: all available); the NumPy and "
                       "PyTorch baselines are always run")
    bench.add_argument("--stage", nargs="+", metavar="S", help="stages to run (default: all)")
    bench.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    mode = bench.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="a few shapes, < 3 minutes (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="square matmuls 128…2048, model matmuls, ResNet-50 convs b1 and b8")
    mode.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                      help=argparse.SUPPRESS)  # seconds-fast shapes for the test-suite
    bench.set_defaults(mode="quick")
    bench.add_argument("--out", default="bench-out", metavar="DIR",
                       help="output directory (default: bench-out/)")
    bench.add_argument("--compare", metavar="OLD.json",
                       help="flag regressions against an earlier report.json")
    bench.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    bench.add_argument("--no-check", action="store_true",
                       help="skip the correctness check of each result against the oracle")
    bench.add_argument("--budget", type=float, metavar="SECONDS",
                       help="timing budget per entry (default: 0.5 quick, 2 full)")
    bench.add_argument("--remeasure-peaks", action="store_true",
                       help="measure the machine's peaks again instead of using the cache")
    bench.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)

    info = sub.add_parser("info", help="backends, CPU, threads, BLAS, GPU, versions")
    info.add_argument("--json", action="store_true", help="print the information as JSON")
    info.add_argument("--peaks", action="store_true",
                      help="also show the measured peaks (measures them if not cached)")
    return parser


def _validate_names(parser, args) -> None:
    from . import registry

    if args.op:
        for op in args.op:
            if op not in registry.OPS:
                parser.error(f"unknown op {op!r}; expected one of: {', '.join(registry.OPS)}")
    ops = args.op or list(registry.OPS)
    impls = [i for op in ops for i in registry.implementations(op)]
    valid_backends = sorted({i.backend for i in impls})
    if args.backend:
        from .backends import unavailable

        missing = unavailable()
        for b in args.backend:
            if b == "torch":
                continue  # the baseline, always selectable
            if b not in valid_backends:
                what = (f"backend {b!r} is not available here ({missing[b]})" if b in missing
                        else f"unknown backend {b!r}")
                parser.error(f"{what}; expected one of: {', '.join(valid_backends + ['torch'])}")
    if args.stage:
        chosen = [i for i in impls if not args.backend or i.backend in args.backend]
        valid_stages = list(dict.fromkeys(i.stage for i in chosen))
        for s in args.stage:
            if s not in valid_stages:
                parser.error(f"unknown stage {s!r}; expected one of: {', '.join(valid_stages)}")


class _Progress:
    """rich progress bar: one step per entry warmed up, one per entry timed."""

    def __init__(self, total_entries: int, console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=False)
        self.task = self.bar.add_task("starting", total=2 * total_entries)

    def start_case(self, case, n):
        self.bar.update(self.task, description=f"{case.op} {case.name} ({n} entries)")

    def advance(self):
        self.bar.advance(self.task)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.update(self.task, description="done")
        return self.bar.__exit__(*exc)


def cmd_bench(parser, args, argv=None) -> int:
    from rich.console import Console

    from . import backends, registry
    from .bench import compare, machine, report, runner

    _validate_names(parser, args)
    err = Console(stderr=True)
    out = _wide_console()
    started = time.perf_counter()
    load_start = _loadavg()
    with_torch = not args.no_torch and runner.torch_available()
    if not args.no_torch and not with_torch:
        err.print("[yellow]PyTorch is not importable: no PyTorch baseline[/]")
    fastops_backends = [b for b in (args.backend or []) if b != "torch"]
    ops = args.op or list(registry.OPS)
    settings = runner.Settings.for_mode(args.mode, args.dtype, check=not args.no_check)
    if args.budget:
        settings.budget_s = args.budget

    cpus = os.cpu_count() or 1
    if load_start is not None and load_start > 0.5 * cpus:
        err.print(f"[yellow]warning: the 1-minute load average is {load_start} on {cpus} CPUs: "
                  "other processes are competing for the cores, so timings (parallel stages "
                  "most) will be inflated and noisy; the report records the load.[/]")
    err.print("measuring / loading the machine's peaks …")
    peaks = machine.peaks(remeasure=args.remeasure_peaks)
    entries = runner.select(ops, fastops_backends or None, args.stage, args.dtype, args.mode,
                            with_torch)
    todo = sum(e.status == "pending" for e in entries)
    if args.no_progress:
        runner.run_entries(entries, settings)
    else:
        with _Progress(todo, err) as progress:
            runner.run_entries(entries, settings, progress)
    runner.derive_metrics(entries, peaks, args.dtype)
    info = machine.machine_info(with_torch=with_torch)
    info["peaks"] = peaks
    data = report.build(entries, settings, info, runner.skipped_notes(entries),
                        backends.unavailable(),
                        argv=["fastops"] + list(sys.argv[1:] if argv is None else argv))
    data["wall_s"] = round(time.perf_counter() - started, 1)
    data["load_avg"] = {"start": load_start, "end": _loadavg()}
    if args.compare:
        data["compare"] = compare.compare_files(data, args.compare)
    paths = report.write_all(data, args.out)
    _print_summary(out, entries, data)
    if args.compare:
        _print_compare(out, data["compare"])
    out.print(f"wrote {', '.join(str(p) for p in paths.values())} in {data['wall_s']} s")
    return 0


def _loadavg():
    """1-minute load average (other processes share the cores: context for noisy numbers)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _wide_console():
    """A console that does not squeeze the tables to 80 columns when output is not a tty."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def _print_summary(console, entries, data) -> None:
    from rich.table import Table

    from .bench.runner import best_per_case

    peak = data["machine"]["peaks"].get("fp32_gflops" if data["dtype"] == "float32"
                                        else "fp64_gflops")
    table = Table(title=f"fastops bench ({data['mode']}, {data['dtype']}): fastest fastops "
                        f"stage per shape (measured peak {peak:.0f} GFLOP/s)")
    for col, just in (("op", "left"), ("shape", "left"), ("best backend · stage", "left"),
                      ("ms", "right"), ("GFLOP/s", "right"), ("% peak", "right"),
                      ("× NumPy", "right"), ("× PyTorch", "right")):
        table.add_column(col, justify=just)
    for row in best_per_case(entries):
        best = row["best"]
        if best is None:
            table.add_row(row["op"], row["shape"], "—", "", "", "", "", "")
            continue
        m = best.metrics
        table.add_row(row["op"], row["shape"], f"{best.backend} · {best.stage}",
                      f"{best.stats['median_ms']:.3g}", f"{m['gflops']:.1f}",
                      f"{m['pct_peak']:.0f}" if m["pct_peak"] else "—",
                      f"{m['vs_numpy']:.2f}" if m["vs_numpy"] else "—",
                      f"{m['vs_torch']:.2f}" if m["vs_torch"] else "—")
    console.print(table)
    bad = [e for e in entries if e.status in ("error", "wrong")]
    for e in bad:
        console.print(f"[red]{e.status}[/] {e.case.op} {e.case.name} {e.backend}/{e.stage}: "
                      f"{e.reason[:200]}")


def _print_compare(console, cmp) -> None:
    from rich.table import Table

    table = Table(title=f"new/old vs {cmp['old_file']}: {cmp['regressions']} regression(s), "
                        f"{cmp['improvements']} improvement(s)")
    for col in ("op", "shape", "backend · stage", "old ms", "new ms", "new/old", "verdict"):
        table.add_column(col)
    for r in cmp["rows"]:
        if r["verdict"] == "same":
            continue
        color = "red" if r["verdict"] == "regression" else "green"
        table.add_row(r["op"], r["shape"], f"{r['backend']} · {r['stage']}",
                      f"{r['old_ms']:.3g}", f"{r['new_ms']:.3g}", f"{r['ratio']:.3g}",
                      f"[{color}]{r['verdict']}[/]")
    console.print(table)


def cmd_info(args) -> int:
    from .bench import machine

    info = machine.machine_info(with_torch=True)
    if args.peaks:
        info["peaks"] = machine.peaks()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = _wide_console()
    cpu, thr = info["cpu"], info["threads"]
    console.print(f"[bold]CPU[/]: {cpu['model']} (LLVM: {cpu.get('llvm_cpu', '?')}), "
                  f"{cpu['logical_cpus']} logical CPUs, {cpu['mhz'] or '?'} MHz")
    console.print(f"[bold]SIMD[/]: {' '.join(cpu['simd']) or 'none detected'}")
    console.print(f"[bold]threads[/]: os.cpu_count={thr['os_cpu_count']}, numba="
                  f"{thr.get('numba_threads')} ({thr.get('numba_threading_layer')} layer), "
                  f"OMP_NUM_THREADS={thr['OMP_NUM_THREADS']}, OMP_WAIT_POLICY="
                  f"{thr['OMP_WAIT_POLICY']}")
    table = Table(title="thread pools (threadpoolctl)")
    for col in ("user_api", "internal_api", "version", "architecture", "num_threads", "library"):
        table.add_column(col)
    for pool in info["blas"]:
        table.add_row(*(str(pool.get(k, "")) for k in ("user_api", "internal_api", "version",
                                                      "architecture", "num_threads")),
                      str(pool.get("filepath", "")).rsplit("/", 1)[-1])
    console.print(table)
    console.print(f"[bold]GPU[/]: {info['gpu'] or 'none (CuPy missing or no CUDA device)'}")
    console.print("[bold]versions[/]: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    console.print("[bold]env[/]: " + ", ".join(f"{k}={v}" for k, v in info["env"].items()))
    console.print(f"[bold]backends available[/]: {', '.join(info['backends']['available'])}")
    for name, why in info["backends"]["unavailable"].items():
        console.print(f"  [yellow]{name} unavailable[/]: {why}")
    if info["tuning_cache"]:
        console.print(f"[bold]autotune cache[/]: {info['tuning_cache']}")
    console.print(f"[bold]peak cache[/]: {machine.cache_dir()}/machine-{machine.machine_key()}.json")
    if args.peaks:
        p = info["peaks"]
        console.print(f"[bold]measured peaks[/]: FP32 {p['fp32_gflops']:.0f} GFLOP/s, FP64 "
                      f"{p['fp64_gflops']:.0f} GFLOP/s, DRAM {p['dram_gbs']:.1f} GB/s "
                      f"({p['method']}{', cached' if p.get('cached') else ''})")
    return 0


# Idle thread pools spin, and on 2 cores a spinning pool stalls the next kernel of another pool
# by whole scheduler ticks. The interleaved benchmark switches pools every round, so it sets:
# * OPENBLAS_THREAD_TIMEOUT=4: OpenBLAS workers busy-wait 2^28 cycles (~0.1 s) after every call
#   (measured: 0.1 s of CPU burnt in a 0.3 s sleep after one numpy.matmul); 2^4 cycles makes
#   them sleep at once. NumPy's own time did not change measurably (N=256 sgemm 0.191 vs
#   0.198 ms median, N=64 5.7 vs 5.7 us).
# * GOMP_SPINCOUNT=30000: PyTorch bundles its own libgomp, Numba/Cython use the system one, so
#   two OpenMP runtimes alternate; with libgomp's default 300000 spins, res3 conv2d_bias_relu
#   medians interleaved were 24 ms (numba tiled) and 40 ms (torch) against minima of 1.4 and
#   1.1 ms; with 30000 they were 1.38 and 1.11 ms, and each kernel timed alone was unchanged
#   within noise (numba tiled 1.46 vs 1.59, torch 1.09 vs 1.09, cython tiled 1.46 vs 1.49 ms).
# OpenBLAS and libgomp read these when they load, so `fastops bench` re-executes itself once
# with them set; set them yourself to override (e.g. 28 and 300000, the libraries' defaults).
BENCH_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4", "GOMP_SPINCOUNT": "30000"}


def _reexec_with_bench_env(argv) -> None:
    missing = {k: v for k, v in BENCH_ENV.items() if k not in os.environ}
    if not missing or os.environ.get("FASTOPS_BENCH_REEXEC"):
        return
    env = dict(os.environ, FASTOPS_BENCH_REEXEC="1", **missing)
    os.execve(sys.executable, [sys.executable, "-m", "fastops", *argv], env)


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        if argv is None:  # a real command line (not a call from Python, e.g. the tests)
            _reexec_with_bench_env(sys.argv[1:])
        return cmd_bench(parser, args, argv)
    return cmd_info(args)


if __name__ == "__main__":
    sys.exit(main())
