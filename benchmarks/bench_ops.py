"""CPU benchmarks of sk.ops: the fused box_ascent_step per backend against the unfused torch chain,
and GaussianSubspace products (entries generated on the fly) against a materialised A.

Two ways to run it:

    python benchmarks/bench_ops.py [--sizes 1e6 1e7] [--rounds 15] [--subspace-n 100000] [--json PATH]
        interleaves the variants round by round (this machine's speed drifts) and prints medians
        and the ratio to the unfused chain: the figure quoted as "C++ vs unfused torch";
    python -m pytest benchmarks/bench_ops.py --benchmark-enable
        the same variants as pytest-benchmark cases (one after the other, so compare with care).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from typing import Callable

import torch

import sharpkit as sk
from sharpkit.files import atomic_write_text
from sharpkit.kernels._backend import cpp_module

EPS, STEP = 1e-3, 1e-4


def _box_inputs(n: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen, dtype=dtype)
    y = EPS * (2 * torch.rand(n, generator=gen, dtype=dtype) - 1)
    g = torch.randn(n, generator=gen, dtype=dtype)
    return x, y, g


def unfused_chain(x, y, g, eps=EPS, step=STEP):
    """What one writes without the fused op: sign, add, clamp with per-element bounds, add."""
    bound = eps * (x.abs() + 1)
    y_new = torch.clamp(y + step * torch.sign(g), -bound, bound)
    return y_new, x + y_new


def box_variants(n: int, dtype=torch.float32) -> dict[str, Callable[[], object]]:
    x, y, g = _box_inputs(n, dtype)
    out = (torch.empty_like(x), torch.empty_like(x))
    usable = sk.ops.backends()
    variants = {
        "torch unfused chain": lambda: unfused_chain(x, y, g),
        "sk torch (reference)": lambda: sk.ops.box_ascent_step(x, y, g, EPS, STEP, backend="torch"),
    }
    if usable["cpp"] == "ok":
        variants["sk cpp"] = lambda: sk.ops.box_ascent_step(x, y, g, EPS, STEP, backend="cpp")
        variants["sk cpp, out="] = lambda: sk.ops.box_ascent_step(x, y, g, EPS, STEP, backend="cpp", out=out)
    return variants


def subspace_variants(n: int, p: int = 100, reference: bool = False) -> dict[str, Callable[[], object]]:
    seed = 1
    z = torch.randn(p)
    g = torch.randn(n)
    variants = {}
    usable = sk.ops.backends()
    if usable["cpp"] == "ok":
        fused = sk.ops.GaussianSubspace(n, p, seed, backend="cpp")
        variants["cpp matvec (fused Philox)"] = lambda: fused.matvec(z)
        variants["cpp rmatvec (fused Philox)"] = lambda: fused.rmatvec(g)
    blocked = sk.ops.GaussianSubspace(n, p, seed, backend="torch")
    if reference:  # the torch definition, integer Philox in tensor ops: slow, optional
        variants["torch matvec (blocked reference)"] = lambda: blocked.matvec(z)
        variants["torch rmatvec (blocked reference)"] = lambda: blocked.rmatvec(g)
    # The materialised A: the floor a stored matrix gives, at n * p * 4 bytes of memory.
    A = (fused if usable["cpp"] == "ok" else blocked).materialize()
    variants["materialised A @ z"] = lambda: A @ z
    variants["materialised A.T @ g"] = lambda: A.T @ g
    return variants


def interleaved_medians(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per variant, running every variant once per round in a shuffled order."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    rng = random.Random(0)
    names = list(variants)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _atomic_write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7], help="box_ascent_step sizes")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per size (median taken)")
    parser.add_argument("--subspace-n", type=int, default=100_000, help="rows of the subspace (0: skip)")
    parser.add_argument("--subspace-p", type=int, default=100, help="columns of the subspace")
    parser.add_argument("--subspace-rounds", type=int, default=5)
    parser.add_argument("--subspace-reference", action="store_true",
                        help="also time the torch reference backend (integer Philox in torch ops; slow)")
    parser.add_argument("--json", help="also write the figures to this JSON file (atomically)")
    args = parser.parse_args(argv)

    results: dict = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min_at_start": os.getloadavg(),
        "has_openmp": cpp_module()[0].has_openmp if cpp_module()[0] is not None else None,
        "box_ascent_step": {},
        "subspace": {},
    }
    print(f"torch threads: {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}; "
          f"medians of {args.rounds} interleaved rounds")
    for size in args.sizes:
        n = int(size)
        med = interleaved_medians(box_variants(n), args.rounds)
        base = med["torch unfused chain"]
        print(f"\nbox_ascent_step, n = {n:.0e}, float32 (mode='sign')")
        print(f"{'variant':<26}{'median ms':>11}{'speed-up vs unfused':>22}{'GB/s (5 arrays)':>17}")
        for name, t in med.items():
            gbs = 5 * n * 4 / t / 1e9
            print(f"{name:<26}{t * 1e3:>11.2f}{base / t:>21.2f}x{gbs:>17.1f}")
        results["box_ascent_step"][str(n)] = {k: {"median_s": v, "speedup_vs_unfused": base / v} for k, v in med.items()}

    if args.subspace_n > 0:
        n, p = args.subspace_n, args.subspace_p
        med = interleaved_medians(subspace_variants(n, p, args.subspace_reference), args.subspace_rounds, warmup=1)
        print(f"\nGaussianSubspace n = {n}, p = {p}, float32 (materialised A: {n * p * 4 / 1e6:.0f} MB)")
        print(f"{'variant':<36}{'median ms':>11}{'entries/s':>14}")
        for name, t in med.items():
            print(f"{name:<36}{t * 1e3:>11.1f}{n * p / t:>14.3g}")
        results["subspace"] = {"n": n, "p": p, **{k: {"median_s": v} for k, v in med.items()}}

    if args.json:
        _atomic_write_json(args.json, results)
        print(f"\nwrote {args.json}")
    return 0


# ---- pytest-benchmark cases (python -m pytest benchmarks/bench_ops.py --benchmark-enable) -------------

try:
    import pytest
except ImportError:  # script mode needs no pytest
    pytest = None

if pytest is not None:
    _BOX_CASES = [(n, v) for n in (10**6, 10**7) for v in
                  ("torch unfused chain", "sk torch (reference)", "sk cpp", "sk cpp, out=")]

    @pytest.mark.parametrize("n,variant", _BOX_CASES, ids=[f"{n:.0e}-{v}" for n, v in _BOX_CASES])
    def test_box_ascent_step(benchmark, n, variant):
        variants = box_variants(n)
        if variant not in variants:
            pytest.skip(f"{variant}: backend unusable here")
        benchmark.group = f"box_ascent_step n={n:.0e}"
        benchmark(variants[variant])

    _SUB_CASES = ["cpp matvec (fused Philox)", "cpp rmatvec (fused Philox)", "materialised A @ z",
                  "materialised A.T @ g"]

    @pytest.mark.parametrize("variant", _SUB_CASES)
    def test_subspace(benchmark, variant):
        variants = subspace_variants(100_000, 100)
        if variant not in variants:
            pytest.skip(f"{variant}: backend unusable here")
        benchmark.group = "GaussianSubspace n=1e5 p=100"
        benchmark.pedantic(variants[variant], rounds=5, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
