"""One process versus two (torch.distributed, gloo) on an HVP-heavy measurement.

Script mode (prints a table; the figures quoted anywhere come from it)::

    python benchmarks/bench_distributed.py                     # MLP 40-512-512-10, MNIST-1D train split
    python benchmarks/bench_distributed.py --repeats 7 --hidden 256 --samples 4000

The script starts two worker processes the way torchrun does (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1
and a free port).  In each round, in alternating order, it times

- ``1 proc x 1 thread``: rank 0 alone (under :func:`sharpkit.distributed.suspended`, no sharding,
  one torch thread) while rank 1 waits in a barrier;
- ``1 proc x 2 threads``: the same with two torch threads (all cores of this machine);
- ``2 procs x 1 thread``: both ranks, each on half of the data, sums all-reduced per pass;

for two measurements on the Hessian of the mean cross-entropy over the data:

- ``block``: ``H @ V`` with ``V`` of 8 columns, primal pass recomputed (``cache=False``): every
  product is a full forward + double backward over all samples, the purely data-parallel case;
- ``top-eig``: the top Hessian eigenvalue by Lanczos (``tol=1e-3``), primal passes cached, so
  each matvec is one second backward per batch plus one all-reduce of an ``n``-vector.

Medians over the rounds are reported with the speed-up of 2 processes over each 1-process variant,
and the largest relative difference between the 1- and 2-process results.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

VARIANTS = ("1 proc x 1 thread", "1 proc x 2 threads", "2 procs x 1 thread")


def make_mlp(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _measure(kind: str, model: nn.Module, data, batch: int, V: torch.Tensor):
    from sharpkit.curvature import eigenvalues, hessian

    if kind == "block":
        H = hessian(model, nn.CrossEntropyLoss(), data, cache=False)
        return H @ V
    H = hessian(model, nn.CrossEntropyLoss(), data)
    r = eigenvalues(H, k=1, tol=1e-3, seed=0)
    return torch.as_tensor(r.values, dtype=torch.float64)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from sharpkit import distributed as D
    from sharpkit.data import as_batches, load_mnist1d

    D.init_distributed(timeout=600)
    rank = D.get_rank()
    x, y = load_mnist1d().train
    x, y = x[: args.samples], y[: args.samples]
    data = as_batches((x, y), args.batch)
    model = make_mlp(args.hidden)
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(n, 8, generator=torch.Generator().manual_seed(1))
    times = {(k, v): [] for k in ("block", "top-eig") for v in VARIANTS}
    results = {}
    waits = []
    for rnd in range(args.repeats + 1):  # round 0 warms up
        order = VARIANTS if rnd % 2 else VARIANTS[::-1]
        for kind in ("block", "top-eig"):
            for variant in order:
                dist.barrier()
                if variant.startswith("1 proc"):
                    if rank == 0:
                        torch.set_num_threads(2 if "2 threads" in variant else 1)
                        with D.suspended():
                            t = time.perf_counter()
                            out = _measure(kind, model, data, args.batch, V)
                            dt = time.perf_counter() - t
                    else:
                        c = time.process_time()
                    dist.barrier()
                    if rank != 0:
                        waits.append(time.process_time() - c)
                        continue
                else:
                    torch.set_num_threads(1)
                    t = time.perf_counter()
                    out = _measure(kind, model, data, args.batch, V)
                    dt = time.perf_counter() - t
                if rnd > 0:
                    times[(kind, variant)].append(dt)
                results[(kind, variant)] = out
    if rank == 0:
        print(f"MLP 40-{args.hidden}-{args.hidden}-10 ({n} parameters), {args.samples} MNIST-1D samples in "
              f"batches of {args.batch}, float32; {args.repeats} interleaved rounds, medians")
        for kind in ("block", "top-eig"):
            med = {v: statistics.median(times[(kind, v)]) for v in VARIANTS}
            ref = results[(kind, VARIANTS[0])].double()
            diff = max(
                ((results[(kind, v)].double() - ref).abs().max() / ref.abs().max()).item() for v in VARIANTS[1:]
            )
            print(f"\n{kind}: " + ("H @ V, V of 8 columns, primal pass recomputed" if kind == "block"
                                   else "top Hessian eigenvalue, Lanczos tol 1e-3, cached primal passes"))
            for v in VARIANTS:
                print(f"  {v:<20} {med[v] * 1e3:9.1f} ms")
            print(f"  speed-up of 2 procs: {med[VARIANTS[0]] / med[VARIANTS[2]]:.2f}x over 1 proc x 1 thread, "
                  f"{med[VARIANTS[1]] / med[VARIANTS[2]]:.2f}x over 1 proc x 2 threads; "
                  f"max relative difference {diff:.1e}")
    else:
        print(f"rank 1 CPU time while waiting in barriers: {sum(waits):.3f} s over {len(waits)} waits",
              file=sys.stderr)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--batch", type=int, default=500, help="batch size of the data passes (default 500)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", *sys.argv[1:]],
                                      env=env))
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    sys.exit(main())
