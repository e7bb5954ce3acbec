"""The report: ``report.json`` (the data), ``report.md``, ``report.html``, and the two PNGs.

``report.json`` schema (``schema_version`` 1; keys are only ever added):

* ``schema``: ``"fastops-bench"``; ``schema_version``: 1
* ``created`` (ISO 8601 time), ``git_commit`` (or null), ``fastops_version``, ``command``
* ``mode`` (``quick`` | ``full`` | ``tiny``), ``dtype``
* ``timing``: budget_s, min_repeats, max_repeats, method (how times were taken)
* ``machine``: :func:`fastops.bench.machine.machine_info` plus ``peaks`` (fp32_gflops,
  fp64_gflops, dram_gbs, method, cache_file, …)
* ``shapes``: one object per (op, shape): op, name, dims, flops, min_bytes
* ``results``: one object per (op, shape, backend, stage):
  op, shape, backend, stage, kind (``fastops`` | ``baseline``), device, position, summary,
  status (``ok`` | ``skipped`` | ``error`` | ``wrong``), reason;
  when timed: first_call_ms, median_ms, min_ms, q1_ms, q3_ms, iqr_ms, repeats, number
  (calls per sample); always: flops, intensity (FLOP/byte), and, null when not measurable:
  gflops, pct_peak, speedup_prev, speedup_naive (over the backend's first stage),
  vs_numpy, vs_torch (baseline median / this median: > 1 means faster than the baseline)
* ``skipped``: human-readable notes (one per stage with skipped shapes)
* ``unavailable_backends``: backend -> reason
* ``wall_s`` (seconds the whole command took), ``load_avg`` ({start, end}: 1-minute load
  average, context for noise; written by the CLI)
* ``compare`` (only with ``--compare``): see :mod:`fastops.bench.compare`
"""
from __future__ import annotations

import base64
import html
import json
import subprocess
import sys
import time
from pathlib import Path

SCHEMA = "fastops-bench"
SCHEMA_VERSION = 1
RESULT_KEYS = ("op", "shape", "backend", "stage", "kind", "device", "position", "summary",
               "status", "reason", "flops", "intensity", "gflops", "pct_peak", "speedup_prev",
               "speedup_naive", "vs_numpy", "vs_torch")
TIMING_KEYS = ("first_call_ms", "median_ms", "min_ms", "q1_ms", "q3_ms", "iqr_ms", "repeats",
               "number")


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        if done.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def build(entries, settings, machine: dict, notes: list[str], unavailable: dict,
          argv=None) -> dict:
    from .. import __version__

    cases = list(dict.fromkeys(e.case for e in entries))
    itemsize = 4 if settings.dtype == "float32" else 8
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": git_commit(),
        "fastops_version": __version__,
        "command": " ".join(argv if argv is not None else sys.argv),
        "mode": settings.mode, "dtype": settings.dtype,
        "timing": {"budget_s": settings.budget_s, "min_repeats": settings.min_repeats,
                   "max_repeats": settings.max_repeats, "checked": settings.check,
                   "method": "first call timed separately; entries of one shape interleaved "
                             "round-robin; one untimed call after a thread-pool switch; "
                             "kernels called directly with out allocated once; median/min/IQR"},
        "machine": machine,
        "shapes": [{"op": c.op, "name": c.name, "dims": list(c.dims), "flops": c.flops,
                    "min_bytes": c.min_bytes(itemsize)} for c in cases],
        "results": [e.as_dict() for e in entries],
        "skipped": notes,
        "unavailable_backends": unavailable,
    }


# ---------------------------------------------------------------------------------- formatting
def _f(value, fmt="{:.3g}", none="—"):
    if value is None:
        return none
    return fmt.format(value)


def _ms(v):
    if v is None:
        return "—"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _x(v):
    return "—" if v is None else f"{v:.2f}×" if v < 10 else f"{v:.3g}×"


TABLE_HEAD = ("backend", "stage", "median ms", "min ms", "IQR ms", "GFLOP/s", "% peak",
              "× prev stage", "× naive", "× NumPy", "× PyTorch", "1st call ms", "what the stage does")


def table_rows(report: dict, op: str, shape: str) -> list[tuple]:
    rows = []
    for r in report["results"]:
        if r["op"] != op or r["shape"] != shape or r["status"] == "skipped":
            continue
        if r["status"] == "ok":
            cells = (_ms(r["median_ms"]), _ms(r["min_ms"]), _ms(r["iqr_ms"]),
                     _f(r["gflops"], "{:.1f}"), _f(r["pct_peak"], "{:.0f} %"),
                     _x(r["speedup_prev"]), _x(r["speedup_naive"]), _x(r["vs_numpy"]),
                     _x(r["vs_torch"]), _ms(r["first_call_ms"]))
        else:
            cells = (r["status"].upper(),) + ("—",) * 9
        rows.append((r["backend"], r["stage"]) + cells + (r["summary"],))
    return rows


def _groups(report: dict):
    """(op, [shape, …]) in run order."""
    ops: dict = {}
    for s in report["shapes"]:
        ops.setdefault(s["op"], []).append(s)
    return ops.items()


def _peaks_line(report: dict) -> str:
    p = report["machine"]["peaks"]
    return (f"Measured peaks: FP32 {p.get('fp32_gflops', 0):.0f} GFLOP/s, FP64 "
            f"{p.get('fp64_gflops', 0):.0f} GFLOP/s, DRAM {p.get('dram_gbs', 0):.1f} GB/s "
            f"({p.get('method', '?')}). % peak is against the {report['dtype']} peak.")


def markdown(report: dict) -> str:
    m = report["machine"]
    cpu = m["cpu"]
    blas = ", ".join(f"{b.get('internal_api')} {b.get('version')} "
                     f"({b.get('architecture', '?')}, {b.get('num_threads')} threads)"
                     for b in m.get("blas", []) if b.get("user_api") == "blas") or "?"
    lines = [
        f"# fastops benchmark ({report['mode']}, {report['dtype']})", "",
        f"- {report['created']}, commit `{report['git_commit']}`, fastops "
        f"{report['fastops_version']}; command `{report['command']}`",
        f"- CPU: {cpu['model']} ({cpu.get('llvm_cpu', '?')}), {cpu['logical_cpus']} logical "
        f"CPUs, SIMD {' '.join(cpu['simd'])}; threads: numba "
        f"{m['threads'].get('numba_threads')} ({m['threads'].get('numba_threading_layer')} "
        f"layer), OMP_NUM_THREADS="
        f"{m['threads'].get('OMP_NUM_THREADS')}; BLAS: {blas}",
        f"- GPU: {m['gpu']['name'] if m.get('gpu') else 'none'}",
        f"- {_peaks_line(report)}",
        f"- Timing: {report['timing']['method']}; budget {report['timing']['budget_s']} s "
        f"per entry, {report['timing']['min_repeats']}–{report['timing']['max_repeats']} "
        "samples. Ratios (×) are speedups: a median of the reference divided by this one's, "
        "so > 1 means faster. 'naive' = the backend's first stage; FLOPs count 2 × "
        "multiply-adds only (bias and ReLU not counted), all taps of a conv included: kernels "
        "that skip the taps on zero padding (cython's ocvec variant, oneDNN) do less work, "
        "so on small images their GFLOP/s can pass the FMA peak.",
    ]
    env = {k: v for k, v in m.get("env", {}).items() if v is not None}
    lines.append("- Environment: " + (", ".join(f"{k}={v}" for k, v in env.items()) or "none set")
                 + ("; `fastops bench` sets OPENBLAS_THREAD_TIMEOUT=4 and GOMP_SPINCOUNT=30000 "
                    "unless given, so idle OpenBLAS / OpenMP threads stop spinning quickly and do "
                    "not stall the kernel timed next (see fastops/cli.py for the measurements)"
                    if "OPENBLAS_THREAD_TIMEOUT" in env else ""))
    if report.get("load_avg"):
        lines.append(f"- Wall time {report.get('wall_s')} s. 1-minute load average before the "
                     f"run {report['load_avg']['start']} on {cpu['logical_cpus']} CPUs (above "
                     "~0.5, other processes were competing for the cores: parallel stages "
                     f"suffer most); {report['load_avg']['end']} at the end, which includes "
                     "the benchmark's own threads")
    if report.get("unavailable_backends"):
        lines.append("- Backends not available here: " + "; ".join(
            f"{b} ({why})" for b, why in report["unavailable_backends"].items()))
    lines.append("")
    for op, shapes in _groups(report):
        lines += [f"## {op}", ""]
        for s in shapes:
            lines += [f"### {op} {s['name']} — {s['flops'] / 1e6:.4g} MFLOP, "
                      f"intensity {s['flops'] / s['min_bytes']:.3g} FLOP/B", ""]
            lines.append("| " + " | ".join(TABLE_HEAD) + " |")
            lines.append("|" + "|".join(["---"] * 2 + ["---:"] * 10 + ["---"]) + "|")
            for row in table_rows(report, op, s["name"]):
                lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
            lines.append("")
        problems = [r for r in report["results"]
                    if r["op"] == op and r["status"] in ("error", "wrong")]
        for r in problems:
            lines.append(f"- **{r['status']}** {r['backend']}/{r['stage']} at {r['shape']}: "
                         f"{r['reason'][:300]}")
        if problems:
            lines.append("")
    if report.get("skipped"):
        lines += ["## Skipped (max_flops or dtype; nothing is extrapolated)", ""]
        lines += [f"- {note}" for note in report["skipped"]] + [""]
    if report.get("compare"):
        lines += compare_markdown(report["compare"])
    lines += ["![ladder](ladder.png)", "", "![roofline](roofline.png)", ""]
    return "\n".join(lines)


def compare_markdown(cmp: dict) -> list[str]:
    lines = [f"## Compared with {cmp.get('old_file', 'old run')} (commit "
             f"`{cmp.get('old_commit')}`, {cmp.get('old_created')})", "",
             f"{cmp['regressions']} regression(s), {cmp['improvements']} improvement(s) beyond "
             "noise (threshold max(10 %, 2 × combined IQR/median)).", "",
             "| op | shape | backend | stage | old ms | new ms | new/old | threshold | verdict |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in cmp["rows"]:
        verdict = f"**{r['verdict']}**" if r["verdict"] != "same" else "same"
        lines.append(f"| {r['op']} | {r['shape']} | {r['backend']} | {r['stage']} | "
                     f"{_ms(r['old_ms'])} | {_ms(r['new_ms'])} | {r['ratio']:.3g} | "
                     f"±{100 * r['threshold']:.0f} % | {verdict} |")
    return lines + [""]


def ladder_tables(report: dict) -> str:
    """Compact per-op tables for the README: GFLOP/s per stage at each shape."""
    out = []
    for op, shapes in _groups(report):
        names = [s["name"] for s in shapes]
        out += [f"**{op}** ({report['dtype']}, GFLOP/s, median; × = speedup over NumPy)", "",
                "| backend · stage | " + " | ".join(names) + " |",
                "|---|" + "---:|" * len(names)]
        seen = list(dict.fromkeys((r["backend"], r["stage"]) for r in report["results"]
                                  if r["op"] == op))
        for backend, stage in seen:
            cells = []
            for name in names:
                r = next((r for r in report["results"] if r["op"] == op and r["shape"] == name
                          and r["backend"] == backend and r["stage"] == stage), None)
                if r is None or r["status"] == "skipped":
                    cells.append("—")
                elif r["status"] != "ok":
                    cells.append(r["status"])
                else:
                    vs = f" ({r['vs_numpy']:.2f}×)" if r.get("vs_numpy") and backend != "numpy" else ""
                    cells.append(f"{r['gflops']:.1f}{vs}")
            out.append(f"| {backend} · {stage} | " + " | ".join(cells) + " |")
        out.append("")
    p = report["machine"]["peaks"]
    out.append(f"Measured on {report['machine']['cpu']['model']} "
               f"({report['machine']['cpu']['logical_cpus']} CPUs; measured peak FP32 "
               f"{p.get('fp32_gflops', 0):.0f} GFLOP/s, DRAM {p.get('dram_gbs', 0):.1f} GB/s), "
               f"`{report['command']}`, commit `{report['git_commit']}`, {report['created']}. "
               "— = not run (slow stage beyond its max_flops).")
    return "\n".join(out)


def html_report(report: dict, out_dir: Path) -> str:
    def img(name):
        path = out_dir / name
        if not path.exists():
            return ""
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<h2>{name}</h2><img alt="{name}" src="data:image/png;base64,{data}">'

    parts = [f"<h1>fastops benchmark ({report['mode']}, {report['dtype']})</h1>",
             f"<p>{html.escape(report['created'])} — commit <code>{report['git_commit']}</code>"
             f" — {html.escape(report['machine']['cpu']['model'])}</p>",
             f"<p>{html.escape(_peaks_line(report))}</p>"]
    for op, shapes in _groups(report):
        parts.append(f"<h2>{op}</h2>")
        for s in shapes:
            parts.append(f"<h3>{op} {html.escape(s['name'])} — {s['flops'] / 1e6:.4g} MFLOP</h3>")
            parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in TABLE_HEAD) + "</tr>")
            for row in table_rows(report, op, s["name"]):
                parts.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row)
                             + "</tr>")
            parts.append("</table>")
    if report.get("skipped"):
        parts.append("<h2>Skipped</h2><ul>" + "".join(
            f"<li>{html.escape(n)}</li>" for n in report["skipped"]) + "</ul>")
    if report.get("compare"):
        cmp = report["compare"]
        parts.append(f"<h2>Comparison</h2><p>{cmp['regressions']} regression(s), "
                     f"{cmp['improvements']} improvement(s)</p><table><tr><th>op</th>"
                     "<th>shape</th><th>backend</th><th>stage</th><th>new/old</th>"
                     "<th>verdict</th></tr>" + "".join(
                         f"<tr><td>{r['op']}</td><td>{html.escape(r['shape'])}</td>"
                         f"<td>{r['backend']}</td><td>{r['stage']}</td>"
                         f"<td>{r['ratio']:.3g}</td><td>{r['verdict']}</td></tr>"
                         for r in cmp["rows"]) + "</table>")
    parts += [img("ladder.png"), img("roofline.png")]
    style = ("body{font-family:sans-serif;max-width:1400px;margin:auto}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
             "padding:2px 6px}td:nth-child(n+3){text-align:right}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fastops benchmark"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_all(report: dict, out_dir) -> dict:
    """Write report.json, report.md, ladder.png, roofline.png, report.html into ``out_dir``."""
    from . import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in
             ("report.json", "report.md", "ladder.png", "roofline.png", "report.html")}
    paths["report.json"].write_text(json.dumps(report, indent=1, default=_json_default))
    paths["report.md"].write_text(markdown(report))
    plots.ladder(report, paths["ladder.png"])
    plots.roofline(report, paths["roofline.png"])
    paths["report.html"].write_text(html_report(report, out_dir))
    return paths


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)
