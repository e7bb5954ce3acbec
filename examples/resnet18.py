"""ResNet-18 end to end: a PyTorch model converted to a fastops graph, checked and timed.

What this shows:

1. ``fastops.nn.from_torch`` traces a ``torch.nn`` ResNet-18 (random weights, eval mode) with
   torch.fx and builds a fastops graph.
2. Before the first run the graph folds each BatchNorm into its conv, fuses conv+bias+ReLU into
   one ``conv2d_bias_relu`` kernel, pre-transposes the classifier's weight and packs weights
   once; ``fastops.tune`` times the candidate kernels per layer shape and caches the winners.
3. The output is compared with PyTorch eval mode (max abs error, float32), then end-to-end
   latency is measured against PyTorch eager with 2 threads (and against the same graph on the
   untuned default kernels), interleaved in blocks (each block starts with an untimed call,
   because switching thread pools costs a scheduler tick on a 2-core machine), medians.

    python examples/resnet18.py            # batch 1 and 8, 10 rounds
    python examples/resnet18.py --quick    # batch 1 only, 3 rounds (a smoke test)

Needs torch (the optional ``bench`` extra). Weights are random: the classes mean nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def timed(fn, x, reps):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 3 rounds")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 8")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (10)")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per block")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-tune", action="store_true", help="use the default kernels")
    parser.add_argument("--retune", action="store_true", help="re-time cached layer shapes")
    parser.add_argument("--backend", default=None, help="restrict fastops to one backend")
    args = parser.parse_args(argv)
    batches = args.batches or ([1] if args.quick else [1, 8])
    rounds = args.rounds or (3 if args.quick else 10)

    try:
        import torch
    except ImportError:
        sys.exit("examples/resnet18.py needs torch (pip install 'fastops[bench]')")
    import fastops
    import fastops.nn as fnn
    from fastops import tuning
    from fastops.nn.zoo import torch_resnet18

    torch.set_num_threads(args.threads)
    print(f"fastops {fastops.__version__}; implementations: "
          f"{', '.join(sorted({i.backend for i in fastops.implementations()}))}; "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    model = torch_resnet18(seed=0)
    graph = fnn.from_torch(model, backend=args.backend, autotune=not args.no_tune)

    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        start = time.perf_counter()
        if args.no_tune:
            got = graph.prepare(x, tune=False)
            tuned = {}
        else:
            tuned = tuning.tune(graph, x, retune=args.retune)
            got = graph(x)
        prepare_s = time.perf_counter() - start
        with torch.no_grad():
            expected = model(x)
        err = (got - expected).abs().max().item()
        scale = expected.abs().max().item()
        ok = err <= 1e-4 * scale
        kernels = graph.kernels()
        used = {}
        for name in kernels.values():
            used[name] = used.get(name, 0) + 1
        print(f"\nbatch {batch}: prepare + first run {prepare_s:.2f} s ({len(tuned)} problems "
              f"timed; cache {tuning.cache_path()})")
        print(f"  max abs error vs PyTorch eval: {err:.3g} (output scale {scale:.3g}, "
              f"{'OK' if ok else 'TOO LARGE'}: bound 1e-4 x scale)")
        print("  kernels: " + ", ".join(f"{n} x{c}" for n, c in sorted(used.items())))

        contenders = {"fastops": graph, "PyTorch eager": model}
        if not args.quick and not args.no_tune:
            # the same graph with every layer on the untuned default kernel: what tuning buys
            untuned = fnn.from_torch(model, backend=args.backend, autotune=False)
            untuned.prepare(x, tune=False)
            contenders = {"fastops": graph, "fastops untuned": untuned, "PyTorch eager": model}
        times = {name: [] for name in contenders}
        with torch.no_grad():
            for _ in range(rounds):
                for name, fn in contenders.items():
                    fn(x)  # untimed: a switch of thread pool / cache contents
                    times[name] += timed(fn, x, args.reps)
        med = {name: statistics.median(t) for name, t in times.items()}
        base = med["PyTorch eager"]
        for name, t in times.items():
            print(f"  {name:16s} {med[name] * 1e3:8.2f} ms median (min {min(t) * 1e3:.2f}, "
                  f"{len(t)} runs)  {med[name] / base:.2f}x PyTorch")
        rows.append((batch, med["fastops"], med.get("fastops untuned"), base, err))
        if not ok:
            raise SystemExit(f"batch {batch}: output differs from PyTorch by {err:.3g}")

    print("\n| batch | fastops ms | untuned ms | PyTorch eager ms | fastops/PyTorch | max abs err |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch, f_med, u_med, t_med, err in rows:
        untuned_ms = "-" if u_med is None else f"{u_med * 1e3:.2f}"
        print(f"| {batch} | {f_med * 1e3:.2f} | {untuned_ms} | {t_med * 1e3:.2f} | "
              f"{f_med / t_med:.2f}x | {err:.2g} |")
    return rows


if __name__ == "__main__":
    main()
