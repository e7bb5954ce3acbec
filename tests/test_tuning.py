"""fastops.tuning: the never-slower rule, the on-disk cache (corrupt files, concurrent writers),
and the API using a cached winner."""
from __future__ import annotations

import json
import multiprocessing
import os
import time
import warnings

import numpy as np
import pytest

import fastops
from fastops import api, registry, tuning
from fastops.validation import check_conv2d

REAL_OTHERS_CPU = tuning.others_cpu  # the autouse fixture replaces it with "unknown"


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTOPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTOPS_AUTOTUNE", "1")
    monkeypatch.setattr("fastops.tuning.others_cpu", lambda start: None)  # load: unknown
    return tmp_path / "cache"


def fake_measure(medians):
    """A measure() returning the given seconds per run, keyed by the candidate's run object."""
    calls = []

    def measure(run, reps):
        calls.append((run.label, reps))
        return [medians[run.label]] * reps

    return measure, calls


def labelled(label):
    def run():
        pass

    run.label = label
    return run


# --------------------------------------------------------------------- never slower rule
def test_pick_keeps_default_unless_clearly_faster():
    assert tuning.pick({"d": 1.00, "x": 0.97}, "d") == "d"  # 3 % faster: within noise
    assert tuning.pick({"d": 1.00, "x": 0.94}, "d") == "x"  # 6 % faster: a real win
    assert tuning.pick({"d": 1.00, "x": 1.50}, "d") == "d"
    assert tuning.pick({"d": 1.00, "x": 0.90, "y": 0.80}, "d") == "y"
    assert tuning.pick({"d": 1.00, "x": 0.90}, "d", margin=0.2) == "d"


def test_select_with_fake_timer_never_picks_a_slower_candidate():
    medians = {"default": 10e-3, "close": 9.8e-3, "slow": 30e-3, "fast": 7e-3}
    measure, calls = fake_measure(medians)
    winner, seen = tuning.select(list(medians), labelled, measure, reps=5)
    assert winner == "fast"
    assert seen["slow"] is None  # pruned after its probe: > 2x the best probe
    assert calls.count(("slow", 1)) == 1  # ... so it got no further timed runs
    assert calls.count(("fast", 1)) == 5
    winner, _ = tuning.select(["default", "close", "slow"], labelled, measure, reps=5)
    assert winner == "default"


def test_select_skips_a_failing_candidate_but_not_a_failing_default():
    def run_of(label):
        def run():
            if label != "default":
                raise RuntimeError("boom")
        run.label = label
        return run

    measure, _ = fake_measure({"default": 1.0, "broken": 0.1})
    with pytest.warns(RuntimeWarning, match="broken failed"):
        winner, seen = tuning.select(["default", "broken"], run_of, measure)
    assert winner == "default" and seen["broken"] is None

    def failing(label):
        def run():
            raise RuntimeError("default broken")
        return run

    with pytest.raises(RuntimeError):
        tuning.select(["default", "x"], failing, measure)


def test_tune_problem_default_first_and_stored(monkeypatch, rng):
    monkeypatch.setattr(tuning, "_runner", lambda op, plan: lambda kernel: None)  # no real runs
    x = rng.standard_normal((1, 4, 10, 10)).astype(np.float32)
    w = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    plan = check_conv2d(x, w, None, 1, 1, 1, 1)
    default = api.choose("conv2d", "cpu", np.float32)
    measured = []

    def measure(run, reps):
        measured.append(reps)
        return [1.0] * reps  # every candidate ties: the default must win

    impl = tuning.tune_problem("conv2d", "cpu", np.float32, None, plan, measure=measure)
    assert impl.name == default.name
    entry = tuning.cache_info()["entries"][tuning.problem_key("conv2d", "cpu", np.float32,
                                                               None, plan)]
    assert entry["default"] == f"{default.backend}/{default.stage}"
    assert all("naive" not in c and not c.startswith("numpy/") or c == entry["default"]
               for c in entry["candidates"])


# ------------------------------------------------------------------------------- cache
def test_cache_location_and_machine_key(monkeypatch, private_cache):
    info = tuning.cache_info()
    assert info["path"].startswith(str(private_cache))
    assert os.path.basename(info["path"]).startswith("tune-")
    assert info["machine"]["fastops"] == fastops.__version__
    path = tuning.cache_path()
    monkeypatch.setattr(fastops, "__version__", "999.0")
    assert tuning.cache_path() != path  # a new version tunes afresh


def test_corrupt_cache_is_ignored_with_warning_and_rewritten(private_cache):
    path = tuning.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{ this is not json", encoding="utf-8")
    with pytest.warns(RuntimeWarning, match="corrupt tuning cache"):
        assert tuning.cache_info()["entries"] == {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuning._store({"k": {"backend": "numpy", "stage": "im2col"}})
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["entries"] == {"k": {"backend": "numpy", "stage": "im2col"}}
    path.write_text(json.dumps({"format": 1, "entries": {"k": "not a dict"}}), encoding="utf-8")
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert tuning.cache_info()["entries"] == {}


def _writer(cache_dir, worker, count):
    os.environ["FASTOPS_CACHE_DIR"] = cache_dir
    for i in range(count):
        tuning._store({f"w{worker}-{i}": {"backend": "numpy", "stage": "im2col", "i": i}})


def test_concurrent_writers_lose_nothing(private_cache):
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    procs = [ctx.Process(target=_writer, args=(str(private_cache), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    entries = tuning.cache_info()["entries"]
    assert sorted(entries) == sorted(f"w{w}-{i}" for w in range(4) for i in range(15))
    leftovers = [p for p in os.listdir(private_cache) if p.endswith(".tmp")]
    assert leftovers == []


# ------------------------------------------------------------------ the API and the cache
def conv_problem(rng):
    x = rng.standard_normal((1, 3, 9, 9)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    return x, w, check_conv2d(x, w, None, 1, 1, 1, 1)


def fake_stage(monkeypatch, stage="fake", variants=None):
    """Register (for this test only) a conv2d stage that runs the numpy kernel."""
    base = registry.lookup("conv2d", "numpy", "im2col")

    def kernel(x, w, out, p):
        base.kernel(x, w, out, p)

    if variants:
        kernel.variants = variants
    impl = registry.Implementation("conv2d", "numpy", stage, "test double", kernel,
                                   position=99)
    monkeypatch.setitem(registry._IMPLS, ("conv2d", "numpy", stage), impl)
    return impl


def test_api_uses_cached_winner_for_that_shape_only(monkeypatch, rng):
    x, w, plan = conv_problem(rng)
    fake = fake_stage(monkeypatch)
    default = api.choose("conv2d", "cpu", np.float32)  # the fake if numpy is all there is
    other = fake if default.name != fake.name else registry.lookup("conv2d", "numpy", "im2col")
    key = tuning.problem_key("conv2d", "cpu", np.float32, None, plan)
    tuning._store({key: {"backend": other.backend, "stage": other.stage}})
    assert api.choose("conv2d", "cpu", np.float32, plan=plan).name == other.name
    plan2 = check_conv2d(np.zeros((2, 3, 9, 9), np.float32), w, None, 1, 1, 1, 1)  # batch 2
    assert api.choose("conv2d", "cpu", np.float32, plan=plan2).name == default.name
    assert api.choose("conv2d", "cpu", np.float32, stage=default.stage,
                      backend=default.backend, plan=plan).name == default.name  # named wins
    monkeypatch.setenv("FASTOPS_AUTOTUNE", "0")
    assert api.choose("conv2d", "cpu", np.float32, plan=plan).name == default.name
    np.testing.assert_allclose(fastops.conv2d(x, w, padding=1),
                               fastops.conv2d(x, w, padding=1, backend=default.backend,
                                              stage=default.stage), rtol=1e-5, atol=1e-5)


def test_stale_entry_for_missing_stage_is_ignored(rng):
    _x, _w, plan = conv_problem(rng)
    key = tuning.problem_key("conv2d", "cpu", np.float32, None, plan)
    tuning._store({key: {"backend": "nonexistent", "stage": "warp9"}})
    assert api.choose("conv2d", "cpu", np.float32, plan=plan).name == \
        api.choose("conv2d", "cpu", np.float32).name


def test_tune_a_function_times_once_then_uses_the_cache(rng):
    x, w, plan = conv_problem(rng)
    tuned = fastops.tuning.tune(lambda a: fastops.conv2d_bias_relu(a, w, np.zeros(4, np.float32),
                                                                   padding=1), x)
    assert list(tuned) == [tuning.problem_key("conv2d_bias_relu", "cpu", np.float32, None,
                                              check_conv2d(x, w, np.zeros(4, np.float32), 1, 1,
                                                           1, 1))]
    assert fastops.tuning.tune(lambda a: fastops.conv2d_bias_relu(
        a, w, np.zeros(4, np.float32), padding=1), x) == {}
    assert len(fastops.tuning.tune(lambda a: fastops.conv2d_bias_relu(
        a, w, np.zeros(4, np.float32), padding=1), x, retune=True)) == 1
    # outside tune(), a plain call never times anything
    before = tuning.cache_info()["entries"]
    fastops.conv2d(x[:, :, :5], w)
    assert tuning.cache_info()["entries"] == before


def test_autotune_off_means_no_timing(monkeypatch, rng, private_cache):
    monkeypatch.setenv("FASTOPS_AUTOTUNE", "0")
    x, w, _plan = conv_problem(rng)
    assert fastops.tuning.tune(lambda a: fastops.conv2d(a, w), x) == {}
    assert not tuning.cache_path().exists()


def test_tile_variants_are_candidates(monkeypatch, rng):
    _x, _w, plan = conv_problem(rng)
    base = registry.lookup("conv2d", "numpy", "im2col").kernel
    impl = fake_stage(monkeypatch, "tiles", variants={"t8": lambda x, w, o, p: base(x, w, o, p),
                                                      "t16": lambda x, w, o, p: base(x, w, o, p)})
    labels = [label for label, _ in tuning.candidates("conv2d", "cpu", np.float32, "numpy", 1e3)]
    assert labels[0] == "numpy/tiles"  # the default (last stage) first
    assert {"numpy/tiles[t8]", "numpy/tiles[t16]"} <= set(labels)
    key = tuning.problem_key("conv2d", "cpu", np.float32, "numpy", plan)
    tuning._store({key: {"backend": "numpy", "stage": "tiles", "variant": "t16"}})
    chosen = api.choose("conv2d", "cpu", np.float32, backend="numpy", plan=plan)
    assert chosen.stage == "tiles" and chosen.kernel is impl.kernel.variants["t16"]


def test_timings_from_a_busy_machine_are_not_cached(monkeypatch, rng):
    monkeypatch.setattr(tuning, "_warned_busy", False)
    monkeypatch.setattr(tuning, "others_cpu", lambda start: 1.5)  # another process took 1.5 CPUs
    _x, _w, plan = conv_problem(rng)
    with pytest.warns(RuntimeWarning, match="not cached"):
        impl = tuning.tune_problem("conv2d", "cpu", np.float32, None, plan,
                                   measure=lambda run, reps: [1.0] * reps)
    key = tuning.problem_key("conv2d", "cpu", np.float32, None, plan)
    assert tuning._load()[key]["stage"] == impl.stage  # this process uses it ...
    assert not tuning.cache_path().exists()  # ... but it is not written for the next one
    assert key not in tuning.cache_info()["entries"]


def test_others_cpu_measures_other_processes_only():
    start = tuning._cpu_snapshot()
    if start is None:
        pytest.skip("no /proc/stat here")
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:  # this process busy: must not count as "others"
        pass
    others = REAL_OTHERS_CPU(start)
    assert others is not None and others < 2.0
