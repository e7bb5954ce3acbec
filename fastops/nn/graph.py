"""The inference graph: nodes in topological order, an optimisation pass, per-shape plans.

Life of a graph:

1. **Build**: from containers (:meth:`Graph.from_module`) or from a PyTorch model
   (:func:`fastops.nn.from_torch`). A node is (name, layer, input names); the graph has one
   input (``"input"``) and one output.
2. **Optimise** (once, before the first run, :meth:`Graph.optimized`): fold every BatchNorm2d
   that follows a conv into that conv's weights and bias (in float64); fuse a ReLU into the
   conv before it (one ``conv2d_bias_relu`` kernel), into a Linear, or into a residual Add;
   drop Identity nodes. The user's layers are never modified: folded layers are new objects.
3. **Plan** (once per input shape and dtype, on the first run or at :meth:`Graph.prepare`):
   each layer validates its shapes, packs its weights (contiguous, in the run dtype, W^T for
   Linear; shared between plans), picks its kernel — a tuned winner for that exact problem
   (timed now if not cached, see :mod:`fastops.tuning`) or the default — and returns a runner.
   Liveness is computed so a value is dropped after its last use and elementwise layers may
   write into an input that dies with them.
   When tuning changed any layer's kernel, the whole network is then timed with the tuned
   kernels and with every layer on its default, interleaved; the tuned plan is kept only if
   it wins end to end (per-layer timings miss thread-pool hand-overs and cache effects
   between layers). The decision is cached too.
4. **Run**: call the runners in order. No validation, no dispatch, no weight copies per call.

A graph is not thread-safe (plans keep scratch buffers); use one graph per thread.
"""
from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .layers import Add, BatchNorm2d, Conv2d, Identity, Layer, Linear, ReLU, fold_batchnorm

INPUT = "input"


@dataclass
class Node:
    name: str
    layer: Layer
    inputs: tuple


class _Builder:
    """Collects nodes while containers emit themselves; names them ``<n>_<layer type>``."""

    def __init__(self):
        self.nodes = []

    def add(self, layer, inputs, name=None):
        if len(inputs) != layer.n_inputs:
            raise ValueError(f"{type(layer).__name__} takes {layer.n_inputs} input(s), "
                             f"got {len(inputs)}")
        name = name or f"{len(self.nodes)}_{type(layer).__name__.lower()}"
        self.nodes.append(Node(name, layer, tuple(inputs)))
        return name


class _PlanContext:
    """What a layer's ``plan`` may ask of the graph while it is being planned."""

    def __init__(self, graph, node, overwritable, record, default_only=False):
        self.graph, self.node, self._overwritable = graph, node, overwritable
        self._record, self._default_only = record, default_only

    def pack(self, layer, name, array, dtype):
        """``array`` as a C-contiguous ``dtype`` array, made once per graph and dtype."""
        key = (id(layer), name, np.dtype(dtype).str)
        packed = self.graph._packed.get(key)
        if packed is None:
            packed = np.ascontiguousarray(array, dtype=dtype)
            self.graph._packed[key] = packed
        return packed

    def choose(self, op, plan):
        """The kernel for this problem: tuned (timed now if needed) or the default."""
        from .. import api, tuning

        dtype = plan.a.dtype if op == "matmul" else plan.x.dtype
        default = api.choose(op, "cpu", dtype, self.graph.backend)
        tune = self.graph.autotune
        if tune is None:
            tune = tuning.enabled()
        if self._default_only or not tune:
            return default
        impl = tuning.choice(op, "cpu", dtype, self.graph.backend, plan, tune=True) or default
        self._record.append((tuning.problem_key(op, "cpu", dtype, self.graph.backend, plan),
                             impl.name, default.name))
        return impl

    def note(self, layer, impl):
        self.graph._chosen[self.node.name] = impl.name

    def may_overwrite(self, index: int) -> bool:
        """Whether input ``index`` dies at this node (so the layer may write into it)."""
        return self._overwritable[index]


class Graph:
    """A fastops inference graph. Call it with a NumPy array or a torch CPU tensor (N, C, H, W);
    the result comes back in the same kind.

    backend: restrict kernels to one backend (None: the tuner or the default choose).
    autotune: on the first run for a shape, use cached per-layer winners and time the layers
        not cached yet (None: unless FASTOPS_AUTOTUNE=0). False: every layer on its default.
    """

    def __init__(self, nodes, output, *, backend=None, autotune=None, optimized=False):
        self.nodes = list(nodes)
        self.output = output
        self.backend = backend
        self.autotune = autotune
        self._is_optimized = optimized
        self._optimized = self if optimized else None
        self._plans = {}
        self._packed = {}
        self._chosen = {}
        self._check()

    def _check(self):
        known = {INPUT}
        for node in self.nodes:
            for name in node.inputs:
                if name not in known:
                    raise ValueError(f"node {node.name!r} reads {name!r} before it is computed")
            if node.name in known:
                raise ValueError(f"node name {node.name!r} is used twice")
            known.add(node.name)
        if self.output not in known:
            raise ValueError(f"graph output {self.output!r} is not computed by any node")

    @classmethod
    def from_module(cls, module: Layer, **options) -> "Graph":
        builder = _Builder()
        output = module._emit(builder, INPUT)
        return cls(builder.nodes, output, **options)

    # ------------------------------------------------------------------- optimisation
    def optimized(self) -> "Graph":
        """This graph with BatchNorm folded and ReLUs fused (made once, then reused)."""
        if self._optimized is None:
            nodes, output = optimize(self.nodes, self.output)
            self._optimized = Graph(nodes, output, backend=self.backend,
                                    autotune=self.autotune, optimized=True)
        return self._optimized

    # ------------------------------------------------------------------------ running
    def __call__(self, x):
        from ..validation import as_array

        array = as_array(x, "x")
        graph = self if self._is_optimized else self.optimized()
        out = graph._run(array)
        if type(x).__module__.split(".")[0] == "torch":
            import torch

            return torch.from_numpy(out)
        return out

    def prepare(self, x, tune=None):
        """Optimise, plan and (with ``tune``) tune for inputs shaped like ``x``; returns the
        output of that first run. ``tune=None`` keeps the graph's ``autotune`` setting."""
        graph = self if self._is_optimized else self.optimized()
        saved = graph.autotune
        if tune is not None:
            graph.autotune = tune
        graph._plans.pop(self._plan_key(np.asarray(x)), None)
        try:
            return self(x)
        finally:
            graph.autotune = saved

    @staticmethod
    def _plan_key(x):
        return (x.shape, x.dtype.str)

    def _run(self, x):
        if x.dtype not in (np.float32, np.float64):
            raise TypeError(f"x: expected dtype float32 or float64, got {x.dtype}")
        plan = self._plans.get(self._plan_key(x))
        if plan is None:
            return self._first_run(x)
        return self._execute(plan, x)

    def _execute(self, plan, x):
        values = {INPUT: x}
        for name, inputs, run, dead in plan:
            values[name] = run(*[values[i] for i in inputs])
            for d in dead:
                del values[d]
        return values[self.output]

    def _first_run(self, x):
        """Plan (tuning layers if enabled) and run; then, if tuning changed any layer's kernel,
        the end-to-end check below decides between the tuned plan and the all-default one."""
        record = []
        out, plan = self._plan_and_run(x, record)
        if any(tuned != default for _key, tuned, default in record):
            plan = self._accept(x, plan, record)
        self._plans[self._plan_key(x)] = plan
        return out

    def _accept(self, x, tuned_plan, record):
        """Keep the tuned plan only if the whole network runs faster with it than with every
        layer on its default kernel (by more than ``tuning.MARGIN``, medians, interleaved).

        Per-layer timing cannot see what happens between layers (thread-pool hand-overs, which
        kernel left which data in cache), so tuning is accepted end to end; a decision is
        cached under the graph's signature (its problems and their tuned kernels)."""
        import hashlib

        from .. import tuning

        signature = hashlib.sha1(repr(sorted((k, t) for k, t, _d in record)).encode())
        key = f"graph|{signature.hexdigest()[:16]}"
        session = tuning._session.get()
        entry = tuning._load().get(key)
        if entry is not None and not (session is not None and session.retune
                                      and key not in session):
            if entry.get("use") == "tuned":
                return tuned_plan
            return self._plan_and_run(x, [], default_only=True)[1]
        tuned_names = dict(self._chosen)
        start = tuning._cpu_snapshot()
        _out, default_plan = self._plan_and_run(x, [], default_only=True)
        measure = tuning.measure_with()
        runs = {"tuned": lambda: self._execute(tuned_plan, x),
                "default": lambda: self._execute(default_plan, x)}
        winner, medians = tuning.select(["default", "tuned"], runs.get, measure, reps=5,
                                        prune=float("inf"))
        others = tuning.others_cpu(start)
        tuning._store({key: {"backend": "graph", "stage": winner, "use": winner,
                             "medians_s": medians, "layers": len(record), "others_cpu": others,
                             "when": time.strftime("%Y-%m-%dT%H:%M:%S")}},
                      persist=not tuning.busy(others))
        if session is not None:
            session[key] = winner
        if winner == "tuned":
            self._chosen = tuned_names
            return tuned_plan
        return default_plan

    def _plan_and_run(self, x, record, default_only=False):
        """Plan each node on its real inputs and run it; returns (output, plan)."""
        last_use = {}
        for n, node in enumerate(self.nodes):
            for name in node.inputs:
                last_use[name] = n
        last_use[self.output] = len(self.nodes)
        plan = []
        values = {INPUT: x}
        for n, node in enumerate(self.nodes):
            inputs = [values[i] for i in node.inputs]
            # An input may be overwritten if it dies here, is not the caller's array, and is
            # not passed twice to this node.
            overwritable = [last_use[i] == n and i != INPUT and node.inputs.count(i) == 1
                            and _owns_memory(values[i], values) for i in node.inputs]
            ctx = _PlanContext(self, node, overwritable, record, default_only)
            run = node.layer.plan(inputs, ctx)
            values[node.name] = run(*inputs)
            dead = tuple(sorted({i for i in node.inputs if last_use[i] == n}))
            for d in dead:
                del values[d]
            plan.append((node.name, node.inputs, run, dead))
        return values[self.output], plan

    def reference(self, x):
        """The un-optimised graph in float64 through the oracle: the correctness reference."""
        from ..validation import as_array

        values = {INPUT: np.asarray(as_array(x, "x"), dtype=np.float64)}
        for node in self.nodes:
            values[node.name] = node.layer.reference(*[values[i] for i in node.inputs])
        return values[self.output]

    # ------------------------------------------------------------------------ reporting
    def kernels(self) -> dict:
        """{node name: 'op/backend/stage'} chosen for the nodes planned so far."""
        graph = self if self._is_optimized else self.optimized()
        return dict(graph._chosen)

    def __repr__(self):
        lines = [f"Graph({len(self.nodes)} nodes, output={self.output!r})"]
        for node in self.nodes:
            lines.append(f"  {node.name} = {node.layer!r}({', '.join(node.inputs)})")
        return "\n".join(lines)


def _owns_memory(array, values) -> bool:
    """True if ``array`` owns its buffer and no other live value is a view of it."""
    return (isinstance(array, np.ndarray) and array.base is None
            and not any(v is not array and getattr(v, "base", None) is array
                        for v in values.values()))


def optimize(nodes, output):
    """Fold BatchNorm into convs, fuse ReLUs, drop Identities. Returns (nodes, output).

    A fusion only happens when the producer's value has no other consumer (otherwise the
    other consumer would see the folded or rectified value).
    """
    uses = Counter(name for node in nodes for name in node.inputs)
    uses[output] += 1
    alias = {}  # removed node name -> the node name now producing its value
    producer = {}  # name -> the (new) Node in the optimised graph
    result = []
    for node in nodes:
        inputs = tuple(alias.get(i, i) for i in node.inputs)
        layer = node.layer
        src = producer.get(inputs[0]) if inputs else None
        sole = src is not None and uses[src.name] == 1
        if isinstance(layer, Identity):
            merged = inputs[0]
        elif (isinstance(layer, BatchNorm2d) and sole and isinstance(src.layer, Conv2d)
              and not src.layer.relu):
            src.layer = fold_batchnorm(src.layer, layer)
            merged = src.name
        elif (isinstance(layer, ReLU) and sole and isinstance(src.layer, (Conv2d, Linear, Add))
              and not src.layer.relu):
            src.layer = copy.copy(src.layer)
            src.layer.relu = True
            merged = src.name
        else:
            new = Node(node.name, layer, inputs)
            producer[node.name] = new
            result.append(new)
            continue
        # The node is gone: whoever read it now reads ``merged``.
        alias[node.name] = merged
        uses[merged] += uses[node.name] - 1
    return result, alias.get(output, output)
