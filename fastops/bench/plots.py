"""The two figures of the report (matplotlib, Agg backend: no display needed).

* ``ladder.png``: per op, up to three shapes; for each, one horizontal bar per (backend, stage)
  in ladder order, length = median GFLOP/s on a log axis (a tick marks the best sample),
  annotated with the speedup over the backend's first stage; NumPy and PyTorch bars for reference and the measured peak as a line.
* ``roofline.png``: every measured entry as a point (arithmetic intensity = FLOPs / minimal
  bytes moved, GFLOP/s) under the measured compute and DRAM-bandwidth ceilings, log-log.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BACKEND_COLORS = {"numba": "#1f77b4", "cython": "#2ca02c", "cupy": "#9467bd",
                  "numpy": "#7f7f7f", "torch": "#d62728"}
EXTRA_COLORS = ("#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
OP_MARKERS = {"matmul": "o", "conv2d": "s", "conv2d_bias_relu": "^"}


def _color(backend: str, seen: dict) -> str:
    if backend in BACKEND_COLORS:
        return BACKEND_COLORS[backend]
    if backend not in seen:
        seen[backend] = EXTRA_COLORS[len(seen) % len(EXTRA_COLORS)]
    return seen[backend]


def _chosen_shapes(rows: list[dict], op: str, limit: int = 3) -> list[str]:
    """The shapes with the most measured entries (ties: more FLOPs), shown small to large."""
    counts: dict = {}
    for r in rows:
        if r["op"] == op:
            n_ok, flops = counts.get(r["shape"], (0, r["flops"]))
            counts[r["shape"]] = (n_ok + (r["status"] == "ok"), flops)
    best = sorted(counts, key=lambda s: (-counts[s][0], -counts[s][1]))[:limit]
    return sorted(best, key=lambda s: counts[s][1])


def ladder(report: dict, path) -> None:
    rows = report["results"]
    peak = report["machine"]["peaks"].get(
        "fp32_gflops" if report["dtype"] == "float32" else "fp64_gflops")
    ops = [op for op in dict.fromkeys(r["op"] for r in rows)]
    panels = [(op, shape) for op in ops for shape in _chosen_shapes(rows, op)]
    if not panels:
        fig = plt.figure(figsize=(6, 2))
        fig.text(0.5, 0.5, "no measured entries", ha="center")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    ncols = max(sum(1 for p in panels if p[0] == op) for op in ops)
    heights = [max(sum(1 for r in rows if r["op"] == op and r["shape"] == s) for s in
                   _chosen_shapes(rows, op)) for op in ops]
    fig, axes = plt.subplots(len(ops), ncols, squeeze=False,
                             figsize=(6.2 * ncols, sum(0.32 * h + 1.4 for h in heights)),
                             gridspec_kw={"height_ratios": [0.32 * h + 1.4 for h in heights]})
    seen: dict = {}
    for i, op in enumerate(ops):
        chosen = _chosen_shapes(rows, op)
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(chosen):
                ax.axis("off")
                continue
            group = [r for r in rows if r["op"] == op and r["shape"] == chosen[j]]
            labels, values, colors, notes = [], [], [], []
            first = {r["backend"]: r["stage"] for r in reversed(group) if r["position"] == 0}
            for r in group:
                labels.append(f"{r['backend']} · {r['stage']}")
                ok = r["status"] == "ok"
                values.append(r["gflops"] if ok else 0)
                colors.append(_color(r["backend"], seen))
                if not ok:
                    notes.append(r["status"])
                elif r.get("speedup_naive"):
                    notes.append(f"{r['gflops']:.3g}  (×{r['speedup_naive']:.3g} vs "
                                 f"{first.get(r['backend'], 'first')})")
                else:
                    notes.append(f"{r['gflops']:.3g}")
            y = range(len(group))[::-1]  # first row at the top
            measured = [v for v in values if v > 0]
            floor = min(measured) / 3 if measured else 0.1
            ax.barh(list(y), [v if v > 0 else floor for v in values], color=colors)
            # The best sample as a tick: on a busy machine the gap to the bar is the noise.
            best = [r["flops"] / (r["min_ms"] * 1e-3) / 1e9
                    if r["status"] == "ok" and r.get("min_ms") else 0 for r in group]
            for yy, v, b in zip(y, values, best):
                if b:
                    ax.plot([v, b], [yy, yy], color="black", lw=0.7, marker="|",
                            markersize=8, markevery=[1])
            for yy, v, b, note in zip(y, values, best, notes):
                ax.text(max(v, b, floor) * 1.15, yy, note, va="center", fontsize=7.5)
            ax.set_yticks(list(y))
            ax.set_yticklabels(labels, fontsize=8)
            ax.set_xscale("log")
            top = max(measured + best + [peak or 0]) if measured else 1
            ax.set_xlim(floor, top * 20)
            if peak:
                ax.axvline(peak, color="black", ls=":", lw=1)
                ax.text(peak, len(group) - 0.4, f" peak {peak:.0f}", fontsize=7, va="bottom")
            ax.set_title(f"{op}  {chosen[j]}", fontsize=9.5)
            ax.set_xlabel("GFLOP/s (log): bar = median (value printed), —| = best sample", fontsize=8)
            ax.tick_params(axis="x", labelsize=7.5)
            ax.grid(axis="x", which="major", alpha=0.3)
    fig.suptitle(f"fastops ladder, {report['dtype']} — {report['machine']['cpu']['model']}",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def roofline(report: dict, path) -> None:
    rows = [r for r in report["results"] if r["status"] == "ok"]
    peaks = report["machine"]["peaks"]
    peak = peaks.get("fp32_gflops" if report["dtype"] == "float32" else "fp64_gflops")
    bw = peaks.get("dram_gbs")
    fig, ax = plt.subplots(figsize=(9, 6))
    xs = [r["intensity"] for r in rows] or [1.0]
    lo, hi = min(xs) / 3, max(xs + [(peak or 1) / (bw or 1)]) * 3
    if peak and bw:
        ridge = peak / bw
        ax.plot([lo, ridge, hi], [bw * lo, peak, peak], color="black", lw=1.5)
        ax.text(lo * 1.1, bw * lo * 1.25, f"DRAM {bw:.0f} GB/s", rotation=0, fontsize=8)
        ax.text(hi / 1.1, peak * 1.08, f"peak {peak:.0f} GFLOP/s (measured)", ha="right",
                fontsize=8)
        ax.axvline(ridge, color="black", ls=":", lw=0.8)
        ax.text(ridge * 1.05, peak / 30, f"ridge {ridge:.1f} FLOP/B", fontsize=7, rotation=90)
    seen: dict = {}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        for op, marker in OP_MARKERS.items():
            pts = [r for r in rows if r["backend"] == backend and r["op"] == op]
            if pts:
                ax.scatter([r["intensity"] for r in pts], [r["gflops"] for r in pts],
                           marker=marker, color=_color(backend, seen), alpha=0.75, s=28,
                           edgecolors="white", linewidths=0.4)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=_color(b, seen), label=b)
               for b in dict.fromkeys(r["backend"] for r in rows)]
    handles += [Line2D([], [], ls="", marker=m, color="black", label=op)
                for op, m in OP_MARKERS.items() if any(r["op"] == op for r in rows)]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity (FLOPs / minimal bytes moved)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"fastops roofline, {report['dtype']} — every stage at every shape "
                 "(point height = measured median)", fontsize=10)
    ax.grid(which="both", alpha=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
