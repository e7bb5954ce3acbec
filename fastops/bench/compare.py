"""``--compare OLD.json``: per-entry ratio new/old of the median, regressions beyond the noise.

An entry is matched by (op, shape, backend, stage, dtype). Its noise is the relative IQR of
both runs combined, ``sqrt((iqr/median)_old² + (iqr/median)_new²)``; a change counts only if it
exceeds ``max(10 %, 2 × that noise)``: slower by more → ``regression``, faster by more →
``improvement``, otherwise ``same``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

MIN_THRESHOLD = 0.10


def _key(row: dict, dtype: str) -> tuple:
    return (row["op"], row["shape"], row["backend"], row["stage"], dtype)


def _rel_iqr(row: dict) -> float:
    med, iqr = row.get("median_ms"), row.get("iqr_ms")
    if not med or iqr is None or math.isnan(iqr):
        return 0.0
    return iqr / med


def compare(new: dict, old: dict) -> dict:
    """{'rows': [...], 'regressions': n, 'improvements': n, 'old_*': provenance}."""
    old_rows = {_key(r, old.get("dtype", "float32")): r for r in old.get("results", [])
                if r.get("status") == "ok"}
    rows = []
    for r in new.get("results", []):
        if r.get("status") != "ok":
            continue
        o = old_rows.get(_key(r, new.get("dtype", "float32")))
        if o is None:
            continue
        ratio = r["median_ms"] / o["median_ms"]
        noise = math.hypot(_rel_iqr(r), _rel_iqr(o))
        threshold = max(MIN_THRESHOLD, 2 * noise)
        verdict = ("regression" if ratio > 1 + threshold
                   else "improvement" if ratio < 1 / (1 + threshold) else "same")
        rows.append({"op": r["op"], "shape": r["shape"], "backend": r["backend"],
                     "stage": r["stage"], "old_ms": o["median_ms"], "new_ms": r["median_ms"],
                     "ratio": ratio, "threshold": threshold, "verdict": verdict})
    return {"old_commit": old.get("git_commit"), "old_created": old.get("created"),
            "rows": rows,
            "regressions": sum(r["verdict"] == "regression" for r in rows),
            "improvements": sum(r["verdict"] == "improvement" for r in rows)}


def compare_files(new: dict, old_path: str | Path) -> dict:
    old = json.loads(Path(old_path).read_text())
    result = compare(new, old)
    result["old_file"] = str(old_path)
    return result
