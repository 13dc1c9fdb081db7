"""Batched versus one-at-a-time audits of small MNIST-1D MLP checkpoints.

Script mode (prints a table; the figures quoted anywhere come from it)::

    python benchmarks/bench_audit.py                       # 16 and 64 checkpoints
    python benchmarks/bench_audit.py --counts 16 --repeats 5 --metrics keskar,top-eig
    python benchmarks/bench_audit.py --device cuda --counts 16 64     # on a GPU

The checkpoints are saved along one short Adam run of an MLP ``40 -> 100 -> 100 -> 10`` on the
MNIST-1D training split (4000 samples).  Each repeat audits them once one at a time
(``group_size=1``: :class:`sharpkit.objective.Objective` per checkpoint) and once batched
(``group_size=count``: all stacked under vmap); the two variants are
interleaved and the medians reported, because this machine's speed drifts.  The rows of both
variants are compared metric by metric.  Both regroup ``--batch-size`` batches into larger passes
(the MLP has no BatchNorm), so the batch size mostly changes the stacked variant's chunks.

``--pass-rates`` instead times one loss-and-gradient pass over the 4000 samples for ``--counts``
checkpoints, as arithmetic rates: one at a time (:class:`sharpkit.objective.Objective`), stacked
(the audit's :class:`sharpkit.audit.batched.StackedObjective` under vmap), stacked by hand-written
batched GEMMs, and one large float32 GEMM (4000 x 512 by 512 x 512, the machine's practical peak).
The peak over the one-at-a-time rate bounds what stacking can gain for compute-bound checkpoints.

``--bound`` bounds the whole audit the same way, per metric and for all of them together.  It
records the matrix products of the one-at-a-time audit (shapes and counts, forward and backward;
batching the same checkpoints runs the same products, stacked) and puts two floors under the
time of any audit doing that arithmetic: all of it at the fastest float32 GEMM rate this machine
reaches (large square products), and each product shape at the best rate its stacked copies reach
in any of four arrangements.  Both leave every elementwise operation out, and the rates are the
best seen between the audits (this machine's speed drifts), so the one-at-a-time time over a
floor is an upper bound on what batching can gain.

Under pytest (``pytest benchmarks/bench_audit.py``) a small pytest-benchmark case times each variant.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import sharpkit as sk

METRICS = "keskar,adaptive,top-eig,trace"


def make_mlp(hidden: int = 100) -> nn.Module:
    return nn.Sequential(nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def make_checkpoints(folder: Path, count: int, hidden: int = 100, every: int = 10, seed: int = 0) -> list[Path]:
    """``count`` checkpoints saved every ``every`` Adam steps (batch 128) of one MNIST-1D run."""
    ds = sk.load_mnist1d()
    x, y = ds.train
    torch.manual_seed(seed)
    model = make_mlp(hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for step in range(1, count * every + 1):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            path = folder / f"step_{step:05d}.pt"
            torch.save(model.state_dict(), path)
            paths.append(path)
    return paths


def run_variant(paths, hidden: int, metrics: str, group_size: int | None, batch_size: int | None = None,
                device: str = "cpu"):
    """Audit ``paths``; returns (seconds, rows)."""
    t0 = time.perf_counter()
    rows = sk.audit(paths, lambda: make_mlp(hidden), "mnist1d", metrics=metrics, group_size=group_size,
                    batch_size=batch_size, device=device)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, rows


def max_rel_diff(a: list[dict], b: list[dict], names: list[str]) -> dict[str, float]:
    """Largest |a - b| / max(|a|, |b|, tiny) over the checkpoints, per metric."""
    out = {}
    for m in names:
        worst = 0.0
        for ra, rb in zip(a, b):
            va, vb = ra[m], rb[m]
            worst = max(worst, abs(va - vb) / max(abs(va), abs(vb), 1e-12))
        out[m] = worst
    return out


def _median_seconds(fn, repeats: int = 20) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def pass_rates(count: int, hidden: int) -> None:
    """One loss-and-gradient pass of ``count`` MLP checkpoints over MNIST-1D's 4000 training
    samples, four ways, in ms and GFLOP/s (2 x 3 multiply-adds per weight per sample)."""
    from sharpkit.audit.batched import StackedObjective, stack_checkpoints
    from sharpkit.data import as_batches
    from sharpkit.objective import Objective

    x, y = sk.load_mnist1d().train
    torch.manual_seed(0)
    models = [make_mlp(hidden).eval() for _ in range(count)]
    ce = nn.CrossEntropyLoss()
    objectives = [Objective(m, ce, (x, y)) for m in models]
    points = [o.x0() for o in objectives]

    def one_at_a_time():
        for o, w in zip(objectives, points):
            o.loss_and_grad(w)

    X, frozen = stack_checkpoints(models[0], [m.state_dict() for m in models], torch.device("cpu"), torch.float32)
    stacked = StackedObjective(models[0], ce, as_batches((x, y)), X, frozen)

    layers = [i for i, m in enumerate(models[0]) if isinstance(m, nn.Linear)]
    weights = [torch.stack([m[i].weight.detach() for m in models]) for i in layers]
    biases = [torch.stack([m[i].bias.detach() for m in models]) for i in layers]

    def by_hand():
        ws = [w.clone().requires_grad_(True) for w in weights]
        bs = [b.clone().requires_grad_(True) for b in biases]
        h = x.expand(count, -1, -1)
        for j, (w, b) in enumerate(zip(ws, bs)):
            h = torch.baddbmm(b[:, None], h, w.transpose(1, 2))
            if j < len(ws) - 1:
                h = h.relu()
        loss = nn.functional.cross_entropy(h.reshape(-1, h.shape[-1]), y.repeat(count), reduction="sum") / len(y)
        torch.autograd.grad(loss, ws + bs)

    a, b = torch.randn(4000, 512), torch.randn(512, 512)
    macs = sum(w[0].numel() for w in weights) * len(x) * count
    peak_t = _median_seconds(lambda: a @ b)
    print(f"one loss-and-gradient pass, {count} checkpoints of MLP 40-{hidden}-{hidden}-10, 4000 samples, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows = {"one at a time (Objective)": _median_seconds(one_at_a_time),
            "stacked (StackedObjective, vmap)": _median_seconds(lambda: stacked.loss_and_grad(X)),
            "stacked by hand (baddbmm)": _median_seconds(by_hand)}
    for name, t in rows.items():
        print(f"{name:34} {t * 1e3:8.2f} ms  {6 * macs / t / 1e9:7.1f} GFLOP/s")
    peak = 2 * a.shape[0] * a.shape[1] * b.shape[1] / peak_t / 1e9
    print(f"{'float32 GEMM 4000x512 @ 512x512':34} {peak_t * 1e3:8.2f} ms  {peak:7.1f} GFLOP/s")
    print(f"stacking can gain at most {peak / (6 * macs / rows['one at a time (Objective)'] / 1e9):.2f}x on these passes "
          "(the GEMM peak over the one-at-a-time rate)")


def _best_rate(fn, flops: float, seconds: float = 0.3) -> float:
    """The best GFLOP/s of ``fn`` (doing ``flops``) over repeated calls for about ``seconds``."""
    fn()
    best, runs, t0 = 0.0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or runs < 3:
        t = time.perf_counter()
        fn()
        best = max(best, flops / (time.perf_counter() - t) / 1e9)
        runs += 1
    return best


def gemm_peak() -> float:
    """The fastest float32 matrix-product rate seen here, in GFLOP/s (best of several large shapes)."""
    best = 0.0
    for m, k, n in ((4000, 512, 512), (4096, 1024, 1024), (2048, 2048, 2048)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        best = max(best, _best_rate(lambda: a @ b, 2 * m * k * n))
    return best


def stacked_shape_rate(m: int, k: int, n: int, count: int) -> float:
    """The best GFLOP/s of ``count`` products ``(m, k) @ (k, n)`` in any of four arrangements: one
    batched product, a loop, and one product with a shared right or left factor (rows or columns
    stacked).  The shared-factor forms are only open to products with a common operand, such as
    the first layer's input; taking them for every product makes the rate an optimistic one."""
    a, b = torch.randn(count, m, k), torch.randn(count, k, n)
    flops = 2 * count * m * k * n
    return max(_best_rate(lambda: torch.bmm(a, b), flops),
               _best_rate(lambda: [a[i] @ b[i] for i in range(count)], flops),
               _best_rate(lambda: a.reshape(count * m, k) @ b[0], flops),
               _best_rate(lambda: a[0] @ b.transpose(0, 1).reshape(k, count * n), flops))


def matrix_products(run) -> collections.Counter:
    """``{(m, k, n): calls}`` of the float matrix products (mm, addmm, bmm per batch entry) ``run()`` makes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    seen: collections.Counter = collections.Counter()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            op = func.overloadpacket
            if op in (aten.mm, aten.addmm, aten.bmm):
                a, b = args[-2:] if op is aten.addmm else args[:2]
                batch = a.shape[0] if op is aten.bmm else 1
                seen[tuple(a.shape[-2:]) + (b.shape[-1],)] += batch
            return func(*args, **(kwargs or {}))

    with Record():
        run()
    return seen


def audit_bound(count: int, hidden: int, metrics: str, repeats: int) -> None:
    """Per metric (and all together): the one-at-a-time audit's matrix-product arithmetic and
    time, two floors on the time of any audit doing that arithmetic for the ``count``
    checkpoints, and the batched audit's time."""
    print(f"# bound: {count} checkpoints of MLP 40-{hidden}-{hidden}-10, MNIST-1D 4000 samples in one batch, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("# floor at peak: the products' GFLOP at the best large-GEMM rate; floor by shape: each product shape")
    print("# at the best rate its count stacked copies reach (optimistic arrangements, see stacked_shape_rate);")
    print("# both leave out every elementwise operation.  most gain = one-at-a-time s / floor.")
    print(f"{'metrics':>28}  {'GFLOP':>6}  {'one-at-a-time s':>15}  {'GFLOP/s':>7}  {'peak':>5}  "
          f"{'floor at peak s':>15}  {'most gain':>9}  {'floor by shape s':>16}  {'most gain':>9}  "
          f"{'batched s':>9}  {'batched gain':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_checkpoints(Path(tmp), count, hidden)
        for names in [*metrics.split(","), metrics]:
            products = matrix_products(lambda: run_variant(paths, hidden, names, 1))
            flops = {shape: 2 * shape[0] * shape[1] * shape[2] * calls for shape, calls in products.items()}
            total = sum(flops.values()) / 1e9
            rates = {shape: 0.0 for shape in products}
            single_t, batched_t, peaks = [], [], []
            for _ in range(repeats):
                peaks.append(gemm_peak())
                for shape in rates:
                    rates[shape] = max(rates[shape], stacked_shape_rate(*shape, count))
                single_t.append(run_variant(paths, hidden, names, 1)[0])
                batched_t.append(run_variant(paths, hidden, names, count)[0])
            # the best rates seen at any time and the one-at-a-time time at its best: the bounds
            # err towards more gain, not less
            peak, single, batched = max(peaks), min(single_t), min(batched_t)
            at_peak = total / peak
            by_shape = sum(f / 1e9 / rates[shape] for shape, f in flops.items())
            print(f"{names:>28}  {total:6.1f}  {single:15.2f}  {total / single:7.1f}  {peak:5.0f}  "
                  f"{at_peak:15.2f}  {single / at_peak:8.2f}x  {by_shape:16.2f}  {single / by_shape:8.2f}x  "
                  f"{batched:9.2f}  {single / batched:11.2f}x", flush=True)
            print(f"{'':>28}  runs one-at-a-time {['%.2f' % t for t in single_t]}, batched "
                  f"{['%.2f' % t for t in batched_t]}, GEMM peaks {['%.0f' % p for p in peaks]}")
            heavy = sorted(flops, key=flops.get, reverse=True)[:7]
            print(f"{'':>28}  products (m, k, n): GFLOP at best stacked GFLOP/s: "
                  + ", ".join(f"{shape} {flops[shape] / 1e9:.1f} at {rates[shape]:.0f}" for shape in heavy))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per count (default 3)")
    parser.add_argument("--metrics", default=METRICS)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="split the 4000 samples into batches of this size (default: one batch)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the audits run (cpu, cuda)")
    parser.add_argument("--pass-rates", action="store_true", help="time single passes instead (see above)")
    parser.add_argument("--bound", action="store_true",
                        help="bound what batching can gain on this machine, per metric (see above)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pass_rates:
        for count in args.counts:
            pass_rates(count, args.hidden)
        return 0
    if args.bound:
        for count in args.counts:
            audit_bound(count, args.hidden, args.metrics, args.repeats)
        return 0
    names = ["loss", *args.metrics.split(",")]
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, metrics {args.metrics}, "
          f"MLP 40-{args.hidden}-{args.hidden}-10 ({sum(p.numel() for p in make_mlp(args.hidden).parameters())} params), "
          f"MNIST-1D 4000 train samples in batches of {args.batch_size or 4000}, device "
          f"{torch.cuda.get_device_name(args.device) if torch.device(args.device).type == 'cuda' else 'cpu'}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'ckpts':>5}  {'one-at-a-time s':>15}  {'batched s':>9}  {'speedup':>7}  {'group':>5}  max rel diff per metric")
    with tempfile.TemporaryDirectory() as tmp:
        all_paths = make_checkpoints(Path(tmp), max(args.counts), args.hidden)
        for count in args.counts:
            paths = all_paths[:count]
            single_t, batched_t = [], []
            for _ in range(args.repeats):
                t, single_rows = run_variant(paths, args.hidden, args.metrics, 1, args.batch_size, args.device)
                single_t.append(t)
                # all checkpoints stacked (the automatic plan measures one at a time on a CPU when
                # the regrouped passes are large, see sharpkit.audit.batched.CPU_STACK_MAX_BATCH)
                t, batched_rows = run_variant(paths, args.hidden, args.metrics, count, args.batch_size, args.device)
                batched_t.append(t)
            ms, mb = statistics.median(single_t), statistics.median(batched_t)
            diffs = max_rel_diff(single_rows, batched_rows, names)
            group = max(r["group_size"] for r in batched_rows)
            print(f"{count:>5}  {ms:>15.2f}  {mb:>9.2f}  {ms / mb:>6.2f}x  {group:>5}  "
                  + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), flush=True)
            print(f"       runs one-at-a-time {['%.2f' % t for t in single_t]}, batched {['%.2f' % t for t in batched_t]}")
    return 0


# ---- pytest-benchmark cases (small, so that `pytest benchmarks/` stays quick)

def _bench_paths(tmp_path_factory, count=4):
    return make_checkpoints(tmp_path_factory.mktemp("bench_audit"), count, hidden=32)


def test_audit_one_at_a_time(benchmark, tmp_path_factory):
    paths = _bench_paths(tmp_path_factory)
    benchmark.pedantic(run_variant, args=(paths, 32, "keskar,top-eig", 1), rounds=3)


def test_audit_batched(benchmark, tmp_path_factory):
    paths = _bench_paths(tmp_path_factory)
    benchmark.pedantic(run_variant, args=(paths, 32, "keskar,top-eig", None), rounds=3)


if __name__ == "__main__":
    sys.exit(main())
