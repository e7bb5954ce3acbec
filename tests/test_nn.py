"""fastops.nn: graph optimisation (BN folding, ReLU fusion), layers, and conversion from torch.

The graph is checked against its own un-optimised float64 reference (every conv and matmul
through the fastops.oracle), so these tests need no torch; those comparing with PyTorch skip
when it is not installed (CI runs without it).
"""
from __future__ import annotations

import numpy as np
import pytest

import fastops
import fastops.nn as fnn
from fastops import oracle
from fastops.nn import zoo
from fastops.testing import assert_close

try:
    import torch
except ImportError:  # CI: no torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (optional)")


@pytest.fixture(autouse=True)
def no_tuning(monkeypatch, tmp_path):
    """Keep tests fast and the user's cache clean: no timing, a private cache dir."""
    monkeypatch.setenv("FASTOPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FASTOPS_AUTOTUNE", "0")
    monkeypatch.setattr("fastops.tuning.others_cpu", lambda start: None)  # load: unknown



def conv(rng, c_in, c_out, k, stride=1, padding=0, bias=True, groups=1):
    w = rng.standard_normal((c_out, c_in // groups, k, k)) / np.sqrt(c_in * k * k / groups)
    b = rng.standard_normal(c_out) * 0.1 if bias else None
    return fnn.Conv2d(w, b, stride, padding, groups=groups)


def bn(rng, c):
    return fnn.BatchNorm2d(rng.uniform(-0.5, 0.5, c), rng.uniform(0.5, 2.0, c),
                           rng.uniform(0.5, 1.5, c), rng.uniform(-0.5, 0.5, c), eps=1e-5)


def small_net(rng, c=8):
    block = fnn.BasicBlock(conv(rng, c, c, 3, padding=1, bias=False), bn(rng, c),
                           conv(rng, c, c, 3, padding=1, bias=False), bn(rng, c))
    down = fnn.BasicBlock(conv(rng, c, 2 * c, 3, 2, 1, bias=False), bn(rng, 2 * c),
                          conv(rng, 2 * c, 2 * c, 3, padding=1), bn(rng, 2 * c),
                          fnn.Sequential(conv(rng, c, 2 * c, 1, 2, bias=False), bn(rng, 2 * c)))
    return fnn.Sequential(conv(rng, 3, c, 5, 2, 2), bn(rng, c), fnn.ReLU(),
                          fnn.MaxPool2d(3, 2, 1), block, down,
                          conv(rng, 2 * c, 2 * c, 3, padding=1, groups=2), fnn.ReLU(),
                          fnn.GlobalAvgPool2d(), fnn.Flatten(),
                          fnn.Linear(rng.standard_normal((10, 2 * c)), rng.standard_normal(10)))


def assert_net_close(got, ref, dtype, what):
    """A whole network compounds rounding layer by layer: compare relative to the output scale
    (1e-4 for float32, ~800 u; 1e-11 for float64). A wrong fold or fusion is off by O(1)."""
    got = np.asarray(got, dtype=np.float64)
    tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-11
    scale = np.abs(ref).max()
    err = np.abs(got - ref).max()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} * {scale:.3g}"


# ------------------------------------------------------------------------- optimisation
def test_optimiser_folds_batchnorm_and_fuses_relu():
    net = small_net(np.random.default_rng(0))
    graph = fnn.compile(net).optimized()
    kinds = [type(n.layer).__name__ for n in graph.nodes]
    assert "BatchNorm2d" not in kinds and "ReLU" not in kinds, kinds
    convs = [n.layer for n in graph.nodes if isinstance(n.layer, fnn.Conv2d)]
    assert [c.relu for c in convs] == [True, True, False, True, False, False, True]
    assert all(c.bias is not None for c in convs)  # folded BN always leaves a bias
    adds = [n.layer for n in graph.nodes if isinstance(n.layer, fnn.Add)]
    assert [a.relu for a in adds] == [True, True]


def test_optimiser_keeps_batchnorm_when_conv_output_is_shared(rng):
    c1 = conv(rng, 3, 4, 3, padding=1)
    b = bn(rng, 4)
    nodes = [fnn.Node("c", c1, ("input",)), fnn.Node("bn", b, ("c",)),
             fnn.Node("sum", fnn.Add(), ("c", "bn"))]  # c is read twice: cannot fold
    graph = fnn.Graph(nodes, "sum", autotune=False)
    kinds = [type(n.layer).__name__ for n in graph.optimized().nodes]
    assert kinds == ["Conv2d", "BatchNorm2d", "Add"]
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    assert_net_close(graph(x), graph.reference(x), np.float32, "shared conv output")


def test_optimiser_does_not_modify_user_layers(rng):
    c1, b1 = conv(rng, 3, 4, 3), bn(rng, 4)
    w_before = c1.weight.copy()
    net = fnn.Sequential(c1, b1, fnn.ReLU())
    net(rng.standard_normal((1, 3, 5, 5)).astype(np.float32))
    np.testing.assert_array_equal(c1.weight, w_before)
    assert c1.relu is False


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_graph_matches_float64_oracle_reference(dtype):
    rng = np.random.default_rng(1)
    net = small_net(rng)
    graph = fnn.compile(net, autotune=False)
    x = rng.standard_normal((2, 3, 29, 31)).astype(dtype)
    got = graph(x)
    assert got.shape == (2, 10) and got.dtype == dtype
    assert_net_close(got, graph.reference(x), dtype, "small net")
    again = graph(x)  # second run: the cached plan, same answer
    np.testing.assert_array_equal(again, got)


def test_folded_conv_bn_relu_within_oracle_bound(rng):
    """One folded layer against the rigorous per-element bound of fastops.testing."""
    c1, b1 = conv(rng, 6, 5, 3, stride=2, padding=1), bn(rng, 5)
    graph = fnn.compile(fnn.Sequential(c1, b1, fnn.ReLU()), autotune=False)
    x = rng.standard_normal((2, 6, 11, 9)).astype(np.float32)
    got = graph(x)
    folded = fnn.fold_batchnorm(c1, b1)
    x64 = x.astype(np.float64)
    ref = oracle.conv2d(x64, folded.weight, folded.bias, 2, 1, relu=True)
    abs_ref = oracle.conv2d(x64, folded.weight, folded.bias, 2, 1, absolute=True)
    # +1 in the length: the folded weight is rounded once to float32
    assert_close(got, ref, abs_ref, 6 * 9 + 1, np.float32, "conv+bn+relu folded")
    # and the fold itself is the un-fused conv -> bn -> relu in float64
    np.testing.assert_allclose(ref, graph.reference(x), rtol=1e-12, atol=1e-12)


def test_batch_of_one_and_several_share_packed_weights(rng):
    graph = fnn.compile(small_net(rng), autotune=False)
    x = rng.standard_normal((3, 3, 20, 20)).astype(np.float32)
    batched = graph(x)
    packed = len(graph.optimized()._packed)
    single = graph(x[1:2])
    assert len(graph.optimized()._packed) == packed  # the second shape re-used the packs
    assert_net_close(single, batched[1:2].astype(np.float64), np.float32, "batch 1 vs 3")


# ------------------------------------------------------------------------------ layers
@pytest.mark.parametrize("args", [
    dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2), dict(kernel_size=3, stride=1),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    dict(kernel_size=2, stride=2, ceil_mode=True),
], ids=str)
def test_maxpool_matches_reference(args, rng):
    pool = fnn.MaxPool2d(**args)
    x = rng.standard_normal((2, 3, 9, 12)).astype(np.float32)
    x[0, 1, 4, 5] = np.nan  # NaN propagates, as in torch
    got = pool(x)
    ref = pool.reference(x)
    np.testing.assert_array_equal(got, ref.astype(np.float32))
    if torch is not None:
        expected = torch.nn.functional.max_pool2d(torch.from_numpy(x), **args).numpy()
        np.testing.assert_array_equal(got, expected)


def test_maxpool_chunking_covers_every_plane(rng, monkeypatch):
    monkeypatch.setattr(fnn.MaxPool2d, "CHUNK_BYTES", 3 * 12 * 12 * 4)  # 3 planes per chunk
    pool = fnn.MaxPool2d(3, 2, 1)
    x = rng.standard_normal((2, 5, 10, 10)).astype(np.float32)  # 10 planes: chunks 3,3,3,1
    np.testing.assert_array_equal(pool(x), pool.reference(x).astype(np.float32))


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (3, 3)])
def test_adaptive_avgpool(size, rng):
    pool = fnn.AdaptiveAvgPool2d(size)
    x = rng.standard_normal((2, 4, 7, 8))
    np.testing.assert_allclose(pool(x), pool.reference(x), rtol=1e-12)
    if torch is not None:
        expected = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), size).numpy()
        np.testing.assert_allclose(pool(x), expected, rtol=1e-12)


def test_linear_relu_fused_and_pretransposed(rng):
    w, b = rng.standard_normal((7, 5)), rng.standard_normal(7)
    graph = fnn.compile(fnn.Sequential(fnn.Linear(w, b), fnn.ReLU()), autotune=False)
    assert [type(n.layer).__name__ for n in graph.optimized().nodes] == ["Linear"]
    x = rng.standard_normal((4, 5)).astype(np.float32)
    got = graph(x)
    ref = np.maximum(oracle.matmul(x, w.T.astype(np.float32)) + b.astype(np.float32), 0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    packed = [a for (_id, name, _dt), a in graph.optimized()._packed.items() if name == "weight_t"]
    assert packed[0].shape == (5, 7) and packed[0].flags.c_contiguous


def test_graph_rejects_bad_wiring_and_inputs(rng):
    with pytest.raises(ValueError, match="before it is computed"):
        fnn.Graph([fnn.Node("a", fnn.ReLU(), ("b",))], "a")
    with pytest.raises(TypeError, match="fastops.nn layers"):
        fnn.Sequential(fnn.ReLU(), "conv")
    with pytest.raises(TypeError, match="float32 or float64"):
        fnn.Sequential(fnn.ReLU())(np.ones((1, 2, 3, 3), dtype=np.int32))


def test_resnet18_built_without_torch(rng):
    net = zoo.resnet18(num_classes=5, width=8)
    graph = fnn.compile(net, autotune=False)
    x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    assert_net_close(graph(x), graph.reference(x), np.float32, "narrow resnet18")


def test_graph_tunes_on_first_run_when_enabled(monkeypatch, rng):
    from fastops import tuning

    monkeypatch.setenv("FASTOPS_AUTOTUNE", "1")
    graph = fnn.compile(fnn.Sequential(conv(rng, 3, 4, 3, padding=1), fnn.ReLU()))
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    tuned = tuning.tune(graph, x)
    layers = [k for k in tuned if not k.startswith("graph|")]  # + an end-to-end decision
    assert len(layers) == 1 and layers[0].startswith("conv2d_bias_relu|float32|cpu")
    assert tuning.tune(graph, x) == {}  # cached now: nothing re-timed
    assert graph.kernels()["0_conv2d"].startswith("conv2d_bias_relu/")


# ------------------------------------------------------------------------- torch interop
@needs_torch
def test_torch_tensors_in_and_out_of_conv2d(rng):
    x = torch.randn(2, 3, 9, 9)
    w = torch.randn(4, 3, 3, 3)
    b = torch.randn(4)
    got = fastops.conv2d(x, w, b, stride=2, padding=1)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    expected = torch.nn.functional.conv2d(x, w, b, stride=2, padding=1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    fused = fastops.conv2d_bias_relu(x, w, b, padding=1)
    torch.testing.assert_close(fused, torch.relu(torch.nn.functional.conv2d(x, w, b, padding=1)),
                               rtol=1e-4, atol=1e-4)


@needs_torch
def test_from_torch_resnet18_matches_pytorch_eval():
    model = zoo.torch_resnet18(num_classes=16)
    graph = fnn.from_torch(model, autotune=False)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    got = graph(x)
    assert isinstance(got, torch.Tensor) and got.shape == (2, 16)
    with torch.no_grad():
        expected = model(x).double().numpy()
    assert_net_close(got.numpy(), expected, np.float32, "resnet18 vs torch")
    assert_net_close(got.numpy(), graph.reference(x.numpy()), np.float32, "resnet18 vs oracle")
    kinds = {type(n.layer).__name__ for n in graph.optimized().nodes}
    assert "BatchNorm2d" not in kinds and "ReLU" not in kinds


@needs_torch
def test_from_torch_functional_forward_and_single_layer():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding="same")
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            y = torch.add(y, y.relu())
            return self.fc(torch.flatten(torch.nn.functional.relu(y).flatten(2)[:, :, :1], 1))

    with pytest.raises(NotImplementedError, match="getitem"):
        fnn.from_torch(Net())  # slicing is not a supported node: named in the error

    single = torch.nn.Conv2d(3, 4, 3, stride=2).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fnn.from_torch(single)(x), single(x), rtol=1e-4, atol=1e-4)


@needs_torch
@pytest.mark.parametrize("layer", ["upsample", "sigmoid", "reflect"])
def test_from_torch_unsupported_layer_is_named(layer):
    nn = torch.nn
    bad = {"upsample": nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2)),
           "sigmoid": nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sigmoid()),
           "reflect": nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))}[layer]
    with pytest.raises(NotImplementedError, match="Upsample|Sigmoid|reflect"):
        fnn.from_torch(bad)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fnn.from_torch(lambda x: x)


def test_backend_weight_prepack_hook_is_used(monkeypatch, rng):
    """A kernel exposing prepack(w, p) and run_packed(...) gets its weights packed once."""
    from fastops import registry

    base = registry.lookup("conv2d", "numpy", "im2col").kernel
    packs = []

    def kernel(x, w, out, p):  # pragma: no cover - the graph must use run_packed instead
        raise AssertionError("the graph should call run_packed")

    def prepack(w, p):
        packs.append(w.shape)
        return ("packed", w)

    def run_packed(x, packed, out, p):
        assert packed[0] == "packed"
        base(x, packed[1], out, p)

    kernel.prepack, kernel.run_packed = prepack, run_packed
    impl = registry.Implementation("conv2d", "numpy", "packed", "test double", kernel, position=99)
    monkeypatch.setitem(registry._IMPLS, ("conv2d", "numpy", "packed"), impl)
    graph = fnn.compile(fnn.Sequential(conv(rng, 3, 4, 3, padding=1)), backend="numpy",
                        autotune=False)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    for _ in range(3):
        got = graph(x)
    assert packs == [(4, 3, 3, 3)]  # once, at planning
    assert_net_close(got, graph.reference(x), np.float32, "prepacked conv")


def test_tuned_plan_must_win_end_to_end(monkeypatch, rng):
    """Layers tuned to a non-default kernel are kept only if the whole graph is faster."""
    from fastops import registry, tuning
    from fastops.validation import check_conv2d

    monkeypatch.setenv("FASTOPS_AUTOTUNE", "1")
    base = registry.lookup("conv2d", "numpy", "im2col")
    fake = registry.Implementation("conv2d", "numpy", "fake", "test double",
                                   lambda x, w, out, p: base.kernel(x, w, out, p), position=99)
    monkeypatch.setitem(registry._IMPLS, ("conv2d", "numpy", "fake"), fake)  # the new default
    layer = conv(rng, 3, 4, 3, padding=1)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    plan = check_conv2d(x, layer.weight.astype(np.float32), layer.bias.astype(np.float32),
                        1, 1, 1, 1)
    key = tuning.problem_key("conv2d", "cpu", np.float32, "numpy", plan)
    tuning._store({key: {"backend": "numpy", "stage": "im2col", "candidates": tuning.
                         _candidate_labels("conv2d", "cpu", np.float32, "numpy", plan)}})
    monkeypatch.setattr(tuning, "measure_with", lambda: lambda run, reps: [1.0] * reps)  # a tie
    graph = fnn.compile(fnn.Sequential(layer), backend="numpy", autotune=True)
    got = graph(x)
    assert graph.kernels()["0_conv2d"] == "conv2d/numpy/fake"  # the tie keeps the default
    decisions = [e for k, e in tuning.cache_info()["entries"].items() if k.startswith("graph|")]
    assert [d["use"] for d in decisions] == ["default"]

    def no_timing():
        raise AssertionError("the cached decision should be used")

    monkeypatch.setattr(tuning, "measure_with", no_timing)
    again = fnn.compile(fnn.Sequential(layer), backend="numpy", autotune=True)
    np.testing.assert_array_equal(again(x), got)
    assert again.kernels()["0_conv2d"] == "conv2d/numpy/fake"
