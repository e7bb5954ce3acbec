"""The benchmark behind ``fastops bench``: shapes, timing, machine peaks, report, plots.

Modules: :mod:`~fastops.bench.shapes` (the shape sets), :mod:`~fastops.bench.timing`
(interleaved timing), :mod:`~fastops.bench.machine` (machine info, measured peaks),
:mod:`~fastops.bench.runner` (selecting and timing entries), :mod:`~fastops.bench.report`
(json/md/html), :mod:`~fastops.bench.plots` (ladder.png, roofline.png),
:mod:`~fastops.bench.compare` (regressions against an earlier run).
"""
