"""GPU benchmarks of sk.ops kernels (needs a CUDA GPU): time per call with triton.testing.do_bench and
bandwidth as a fraction of the measured device-to-device copy bandwidth.

    python benchmarks/gpu_ops.py [--n 1e8] [--dtypes float32 float16 bfloat16] [--out benchmarks/results]

box_ascent_step moves 5 arrays (read x, y, g; write y_new, w), 6 with momentum; its floor is
bytes moved / copy bandwidth, where the copy (dst.copy_(src), 2 arrays) is measured on the same
device and dtype in the same run.  GaussianSubspace products are compute-bound (Philox +
Box-Muller per entry): reported as entries per second and against a materialised A where it fits.
The figures go to benchmarks/results/gpu_ops_<device>_<UTC date>.json with the device, date and command.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys

import torch

import sharpkit as sk
from sharpkit.files import atomic_write_text

EPS, STEP = 1e-3, 1e-4
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _bench(fn) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench: warm-up, L2 flush, CUDA events)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_bandwidth(n: int, dtype: torch.dtype) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.randn(n, device="cuda", dtype=torch.float32).to(dtype)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * n * src.element_size() / (ms * 1e-3)


def bench_box_ascent(n: int, dtype: torch.dtype, copy_bw: float, backends: dict[str, str]) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, device="cuda", generator=gen).to(dtype)
    y = (EPS * (2 * torch.rand(n, device="cuda", generator=gen) - 1)).to(dtype)
    g = torch.randn(n, device="cuda", generator=gen).to(dtype)
    y_prev = torch.zeros_like(y)
    out = (torch.empty_like(x), torch.empty_like(x))
    size = x.element_size()
    rows = []

    def unfused():
        bound = EPS * (x.abs() + 1)
        y_new = torch.clamp(y + STEP * torch.sign(g), -bound, bound)
        return y_new, x + y_new

    cases = [("torch unfused chain", None, unfused, 5)]
    for name in ("cuda", "triton", "cupy"):
        if backends[name] != "ok":
            continue
        cases.append((name, "sign", lambda b=name: sk.ops.box_ascent_step(x, y, g, EPS, STEP, backend=b, out=out), 5))
        cases.append((name, "sign+momentum",
                      lambda b=name: sk.ops.box_ascent_step(x, y, g, EPS, STEP, y_prev=y_prev, momentum=0.75,
                                                            backend=b, out=out), 6))
    for name, variant, fn, arrays in cases:
        ms = _bench(fn)
        bw = arrays * n * size / (ms * 1e-3)
        rows.append({"op": "box_ascent_step", "backend": name, "variant": variant, "n": n, "dtype": str(dtype),
                     "ms": ms, "bytes_moved": arrays * n * size, "bandwidth_GBps": bw / 1e9,
                     "fraction_of_copy_bandwidth": bw / copy_bw})
    return rows


def bench_subspace(n: int, p: int, backends: dict[str, str]) -> list[dict]:
    rows = []
    z = torch.randn(p, device="cuda")
    g = torch.randn(n, device="cuda")
    for name in ("cuda", "triton", "cupy", "torch"):
        if backends[name] != "ok":
            continue
        A = sk.ops.GaussianSubspace(n, p, seed=1, backend=name, device="cuda")
        for what, fn in (("matvec", lambda: A.matvec(z)), ("rmatvec", lambda: A.rmatvec(g))):
            ms = _bench(fn)
            rows.append({"op": f"GaussianSubspace.{what}", "backend": name, "n": n, "p": p, "dtype": "torch.float32",
                         "ms": ms, "entries_per_s": n * p / (ms * 1e-3)})
    free, _ = torch.cuda.mem_get_info()
    if n * p * 4 < free // 3:
        A = sk.ops.GaussianSubspace(n, p, seed=1, device="cuda").materialize()
        for what, fn in (("matvec", lambda: A @ z), ("rmatvec", lambda: A.T @ g)):
            ms = _bench(fn)
            rows.append({"op": f"GaussianSubspace.{what}", "backend": "materialised A", "n": n, "p": p,
                         "dtype": "torch.float32", "ms": ms, "entries_per_s": n * p / (ms * 1e-3)})
        del A
    return rows


def _atomic_write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=float, default=1e8, help="elements for box_ascent_step and the copy")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--subspace-n", type=float, default=1e7, help="rows of the subspace (0: skip)")
    parser.add_argument("--subspace-p", type=int, default=100)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="folder for the JSON figures")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_ops.py needs a CUDA GPU", file=sys.stderr)
        return 2
    backends = sk.ops.backends()
    device = torch.cuda.get_device_name()
    now = datetime.datetime.now(datetime.timezone.utc)
    n = int(args.n)
    result = {
        "device": device,
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "torch": torch.__version__,
        "backends": backends,
        "copy_bandwidth_GBps": {},
        "rows": [],
    }
    print(f"{device}; backends: {backends}")
    for name in args.dtypes:
        dtype = DTYPES[name]
        bw = copy_bandwidth(n, dtype)
        result["copy_bandwidth_GBps"][name] = bw / 1e9
        print(f"\ncopy bandwidth ({name}, n={n:.0e}): {bw / 1e9:.0f} GB/s")
        for row in bench_box_ascent(n, dtype, bw, backends):
            result["rows"].append(row)
            print(f"  box_ascent_step {row['backend']:<20} {row['variant'] or '':<14} {row['ms']:8.3f} ms "
                  f"{row['bandwidth_GBps']:7.0f} GB/s  {100 * row['fraction_of_copy_bandwidth']:5.1f}% of copy")
        torch.cuda.empty_cache()
    if args.subspace_n > 0:
        print(f"\nGaussianSubspace n={int(args.subspace_n):.0e} p={args.subspace_p} float32")
        for row in bench_subspace(int(args.subspace_n), args.subspace_p, backends):
            result["rows"].append(row)
            print(f"  {row['op']:<26} {row['backend']:<15} {row['ms']:9.3f} ms  {row['entries_per_s']:.3g} entries/s")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    path = os.path.join(args.out, f"gpu_ops_{slug}_{now.strftime('%Y%m%dT%H%M%SZ')}.json")
    _atomic_write_json(path, result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
