"""The benchmark report: a tiny end-to-end run, the JSON schema, the figures, --compare logic,
the timing protocol and the README updater. Fast: tiny shapes, stubbed machine peaks."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from fastops import registry
from fastops.bench import compare, machine, report, runner, shapes, timing
from fastops.cli import main

STUB_PEAKS = {"fp32_gflops": 200.0, "fp64_gflops": 100.0, "dram_gbs": 20.0,
              "method": "stub (tests)", "cached": True}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `fastops bench --tiny` over every op and every registered backend."""
    out = tmp_path_factory.mktemp("bench-out")
    mp = pytest.MonkeyPatch()
    mp.setattr(machine, "peaks", lambda remeasure=False: dict(STUB_PEAKS))
    try:
        rc = main(["bench", "--tiny", "--out", str(out), "--no-progress"])
    finally:
        mp.undo()
    assert rc == 0
    return out, json.loads((out / "report.json").read_text())


def test_report_files_exist(tiny_run):
    out, _ = tiny_run
    for name in ("report.json", "report.md", "report.html", "ladder.png", "roofline.png"):
        assert (out / name).stat().st_size > 0, name


def test_report_json_schema(tiny_run):
    _, data = tiny_run
    for key in ("schema", "schema_version", "created", "git_commit", "fastops_version",
                "command", "mode", "dtype", "timing", "machine", "shapes", "results", "skipped",
                "unavailable_backends"):
        assert key in data, key
    assert data["schema"] == report.SCHEMA and data["schema_version"] == report.SCHEMA_VERSION
    assert data["mode"] == "tiny" and data["dtype"] == "float32"
    assert {"fp32_gflops", "dram_gbs"} <= set(data["machine"]["peaks"])
    assert {"cpu", "threads", "blas", "versions"} <= set(data["machine"])
    for row in data["results"]:
        assert set(report.RESULT_KEYS) <= set(row)
        assert row["status"] in ("ok", "skipped", "error", "wrong")
        if row["status"] in ("ok", "wrong"):
            assert set(report.TIMING_KEYS) <= set(row)
            assert row["min_ms"] <= row["median_ms"]
        if row["status"] == "ok":
            assert row["gflops"] > 0 and row["intensity"] > 0


def test_report_has_every_registered_stage(tiny_run):
    _, data = tiny_run
    ran = {(r["op"], r["shape"], r["backend"], r["stage"]) for r in data["results"]}
    for op in registry.OPS:
        for case in shapes.cases(op, "tiny"):
            for impl in registry.implementations(op):
                assert (op, case.name, impl.backend, impl.stage) in ran, impl.name
            if runner.torch_available():
                assert (op, case.name, "torch", "eager") in ran
    # The NumPy backend is the baseline: it must have been measured, not skipped.
    numpy_rows = [r for r in data["results"] if r["backend"] == "numpy"]
    assert numpy_rows and all(r["status"] == "ok" for r in numpy_rows)


def test_markdown_lists_every_measured_stage(tiny_run):
    out, data = tiny_run
    md = (out / "report.md").read_text()
    assert "| backend | stage | median ms |" in md
    for r in data["results"]:
        if r["status"] == "ok":
            assert f"| {r['backend']} | {r['stage']} |" in md


def test_pngs_are_valid_images(tiny_run):
    from PIL import Image

    out, _ = tiny_run
    for name in ("ladder.png", "roofline.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        with Image.open(path) as img:
            img.verify()
            assert img.size[0] > 300 and img.size[1] > 200
        import matplotlib.image

        assert matplotlib.image.imread(str(path)).ndim == 3


def test_html_embeds_both_figures(tiny_run):
    out, _ = tiny_run
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "<table>" in page


# ---------------------------------------------------------------------------------- compare
def _synthetic(median, iqr, shape="N=64", stage="tiled"):
    return {"dtype": "float32", "git_commit": "abc", "created": "then", "results": [
        {"op": "matmul", "shape": shape, "backend": "numba", "stage": stage, "status": "ok",
         "median_ms": median, "iqr_ms": iqr}]}


def test_compare_flags_a_regression():
    result = compare.compare(_synthetic(15.0, 0.2), _synthetic(10.0, 0.2))
    assert result["regressions"] == 1
    assert result["rows"][0]["verdict"] == "regression"
    assert result["rows"][0]["ratio"] == pytest.approx(1.5)


def test_compare_ignores_noise():
    # 8 % slower with a tight IQR: under the 10 % floor.
    assert compare.compare(_synthetic(10.8, 0.1), _synthetic(10.0, 0.1))["regressions"] == 0
    # 30 % slower but each run's IQR is 25 % of its median: within 2 × combined noise.
    noisy = compare.compare(_synthetic(13.0, 3.25), _synthetic(10.0, 2.5))
    assert noisy["regressions"] == 0 and noisy["rows"][0]["verdict"] == "same"


def test_compare_flags_an_improvement_and_skips_unmatched():
    result = compare.compare(_synthetic(5.0, 0.05), _synthetic(10.0, 0.1))
    assert result["improvements"] == 1 and result["regressions"] == 0
    assert compare.compare(_synthetic(5.0, 0.05, shape="N=128"), _synthetic(10.0, 0.1))["rows"] == []


def test_compare_section_in_markdown(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_synthetic(10.0, 0.1)))
    cmp = compare.compare_files(_synthetic(20.0, 0.1), old)
    text = "\n".join(report.compare_markdown(cmp))
    assert "1 regression(s)" in text and "**regression**" in text


# ---------------------------------------------------------------------------------- timing
def test_timing_first_call_separate_and_round_robin():
    order = []

    def make(name, first_s):
        state = {"calls": 0}

        def call():
            state["calls"] += 1
            order.append(name)
            time.sleep(first_s if state["calls"] == 1 else 0.002)

        return call

    a = timing.Timed("A", make("A", 0.05), pool="omp", budget_s=0.02)
    b = timing.Timed("B", make("B", 0.0), pool="omp", budget_s=0.02)
    timing.time_interleaved([a, b], min_repeats=4, max_repeats=4, target_sample_s=0)
    assert a.first_call_ms >= 40  # the "compile" is reported apart ...
    stats = timing.stats_of(a)
    assert stats.median_ms < 20 and stats.repeats == 4  # ... and kept out of the samples
    timed = order[4:]  # after the two warm-up calls of each
    assert timed == ["A", "B"] * 4  # interleaved A B A B …


def test_timing_untimed_call_after_pool_switch():
    order = []
    entries = [timing.Timed(name, (lambda n=name: order.append(n)), pool=pool, budget_s=1)
               for name, pool in (("np", "blas"), ("nb", "omp"))]
    timing.time_interleaved(entries, min_repeats=2, max_repeats=2, target_sample_s=0)
    # warm-ups (2 each), then per round: switch to blas -> one untimed + one timed, same for omp
    assert order[4:] == ["np", "np", "nb", "nb"] * 2


def test_slow_entries_get_fewer_rounds_spread_out():
    fast = timing.Timed("fast", lambda: None, budget_s=1)
    slow = timing.Timed("slow", lambda: time.sleep(0.01), budget_s=0.03)
    timing.time_interleaved([fast, slow], min_repeats=2, max_repeats=12, target_sample_s=0)
    assert len(fast.samples_ms) == 12 and 2 <= len(slow.samples_ms) < 12


# ---------------------------------------------------------------------------------- shapes etc.
def test_shape_arithmetic():
    mm = shapes.Case("matmul", "t", (2, 3, 4))
    assert mm.flops == 2 * 2 * 3 * 4 and mm.min_bytes(4) == 4 * (6 + 12 + 8)
    conv = shapes.Case("conv2d", "t", tuple(shapes.ConvShape(1, 4, 8, 8, 6, 3, 3, 1, 1, 1)))
    assert conv.out_shape == (1, 6, 8, 8)
    assert conv.flops == 2 * 6 * 8 * 8 * 4 * 9
    dw = shapes.Case("conv2d", "t", tuple(shapes.ConvShape(1, 4, 8, 8, 4, 3, 3, 2, 1, 4)))
    assert dw.out_shape == (1, 4, 4, 4) and dw.flops == 2 * 4 * 16 * 9


def test_shape_sets():
    quick = [c.name for c in shapes.cases("matmul", "quick")]
    assert "N=256" in quick and "N=1024" in quick
    full = {c.name for c in shapes.cases("conv2d", "full")}
    assert len(full) == 14 and "stem 7x7/2 C3 224² K64 b8" in full
    with pytest.raises(ValueError, match="expected one of"):
        shapes.cases("matmul", "huge")


def test_skipped_note_says_where_it_ran():
    small = shapes.Case("matmul", "N=256", (256, 256, 256))
    big = shapes.Case("matmul", "N=1024", (1024, 1024, 1024))
    entries = [runner.Entry(small, "numba", "naive", "", status="ok"),
               runner.Entry(big, "numba", "naive", "", status="skipped",
                            reason="2.15e+09 FLOPs > max_flops 3e+08")]
    (note,) = runner.skipped_notes(entries)
    assert "numba/naive: run at N=256 only" in note and "N=1024" in note


def test_peaks_cache_and_estimate(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = tmp_path / "fastops" / f"machine-{machine.machine_key()}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"fp32_gflops": 1.0, "fp64_gflops": 0.5, "dram_gbs": 2.0,
                                "method": "cached"}))
    got = machine.peaks()
    assert got["cached"] and got["fp32_gflops"] == 1.0
    assert machine._estimate_peak() > 0


def test_ladder_tables_and_readme_update(tiny_run, tmp_path):
    _, data = tiny_run
    spec = importlib.util.spec_from_file_location(
        "update_readme", Path(__file__).resolve().parents[1] / "scripts" / "update_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report_path = tmp_path / "report.json"
    report_path.write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{mod.START}\nold\n{mod.END}\nafter\n")
    assert mod.main([str(report_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro") and text.endswith("after\n")
    assert "**matmul**" in text and "numpy · blas" in text
    readme.write_text("no markers here\n")
    assert mod.main([str(report_path), "--readme", str(readme)]) == 1


def test_broken_kernels_are_reported_not_timed():
    case = shapes.cases("matmul", "tiny")[0]

    def boom(a, b, out):
        raise RuntimeError("boom")

    def lazy(a, b, out):
        out[1:] = 0  # leaves row 0 untouched: must not pass as a (fast) result

    entries = [runner.Entry(case, "fake", name, "",
                            impl=registry.Implementation("matmul", "fake", name, "", kernel))
               for name, kernel in (("boom", boom), ("lazy", lazy))]
    runner.run_entries(entries, runner.Settings.for_mode("tiny"))
    assert entries[0].status == "error" and "boom" in entries[0].reason
    assert entries[1].status == "wrong" and "check failed" in entries[1].reason
