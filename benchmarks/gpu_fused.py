"""GPU figures of the fused HVP engine and the CE-HVP kernel (issue 5), written to benchmarks/results/.

    python benchmarks/gpu_fused.py [--out benchmarks/results/gpu_fused_<device>.json] [--quick]

1. Per-vector HVP cost in forward-pass units on the F1-style MLP (784 -> 5 x 512 -> 10, BatchNorm
   eval, ReLU) and the wide MLP (4 x 4096), batch 4096, k in {1, 4, 16, 64}: sharpkit's fused engine
   (cached primal pass; also with a CUDA graph), torch.func vmap(jvp(grad)), and PyHessian-style double
   backward (interleaved, medians; float32).  Issue target: fused k = 16 at least 2x faster per vector
   than torch.func on the F1-style MLP.
2. The CE-HVP op alone against eager PyTorch at N = 16384, C in {10, 1000, 50257}: time and peak extra
   memory (bytes allocated above what was held before the call), for each usable backend (cuda,
   triton, cupy).  Issue target at C = 50257: >= 2x faster with <= 0.5x the extra memory of eager.

Every figure is from one run of this script on one device; the JSON records device name, date,
command, torch/Triton versions and the pass/fail of both targets.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import datetime, timezone

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_fused import eager_ce_hvp, hvp_variants, mlp, timed, write_json  # noqa: E402

from sharpkit.curvature.fused import FusedEngine  # noqa: E402
from sharpkit.kernels import _backend  # noqa: E402
from sharpkit.kernels.ce_hvp import ce_hvp  # noqa: E402
from sharpkit.params import FlatParams  # noqa: E402


def hvp_section(label, model, X, Y, ks, repeats, device, dtype) -> list[dict]:
    loss_fn = nn.CrossEntropyLoss()
    names = ["forward", "fused", "fused-ggn", "torch.func", "double-backward"]
    rows = []
    for k in ks:
        torch.manual_seed(k)
        try:
            variants, V = hvp_variants(model, loss_fn, X, Y, k, device, dtype, names)
        except torch.cuda.OutOfMemoryError as exc:
            rows.append({"model": label, "k": k, "error": f"out of memory: {exc}"})
            torch.cuda.empty_cache()
            continue
        flat = FlatParams(model)
        graphed = FusedEngine("hessian", model, loss_fn, flat, flat.get().to(device, dtype), dtype=dtype,
                              device=device, cache=True, cuda_graph=True)
        variants["fused+graph"] = lambda: graphed.batch_matmat(0, X, Y, V)
        ref = variants["fused"]()
        check = {}
        for n in ("fused+graph", "torch.func", "double-backward"):
            try:
                other = variants[n]().detach()
                check[n] = ((ref - other).norm() / other.norm()).item()
            except torch.cuda.OutOfMemoryError:
                variants.pop(n)
                check[n] = "out of memory"
                torch.cuda.empty_cache()
        for fn in variants.values():  # warm-up (Triton compilation, cuBLAS heuristics, graph capture)
            fn()
        times = {n: [] for n in variants}
        for _ in range(repeats):
            for n, fn in variants.items():
                if n == "forward":
                    with torch.no_grad():
                        times[n].append(timed(fn, device))
                else:
                    times[n].append(timed(fn, device))
        fwd = statistics.median(times["forward"])
        row = {"model": label, "batch": int(X.shape[0]), "k": k, "forward_s": fwd,
               "median_s": {n: statistics.median(t) for n, t in times.items()},
               "per_vector_forward_units": {n: statistics.median(t) / k / fwd for n, t in times.items()
                                            if n != "forward"},
               "rel_diff_fused_vs": check, "repeats": repeats}
        rows.append(row)
        print(row, flush=True)
        del variants, V, graphed
        torch.cuda.empty_cache()
    return rows


def peak_extra(fn, device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


def ce_case(n, c, k, usable, repeats, device, dtype) -> dict:
    z = torch.randn(n, c, device=device, dtype=dtype)
    r = torch.randn(n, k, c, device=device, dtype=dtype)
    s = torch.full((n,), 1.0 / n, device=device, dtype=dtype)
    variants = {"eager": lambda: eager_ce_hvp(z, r, s)}
    for b in usable:
        variants[b] = (lambda b=b: ce_hvp(z, r, s, backend=b))
    want = variants["eager"]()
    err = {}
    for b in usable:
        got = variants[b]()
        err[b] = ((got - want).abs().max() / want.abs().max()).item()
        del got
    del want
    for fn in variants.values():
        fn()
    times = {m: [] for m in variants}
    for _ in range(repeats):
        for m, fn in variants.items():
            times[m].append(timed(fn, device))
    peaks = {m: peak_extra(fn, device) for m, fn in variants.items()}
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"N": n, "C": c, "k": k, "dtype": str(dtype), "median_s": med, "peak_extra_bytes": peaks,
            "speedup_vs_eager": {b: med["eager"] / med[b] for b in usable},
            "extra_memory_vs_eager": {b: peaks[b] / peaks["eager"] for b in usable},
            "max_rel_diff_vs_eager": err, "repeats": repeats,
            "note": "peak extra = peak allocated during the call minus allocated before (includes the output)"}


def ce_section(n, cs, ks, repeats, device, dtype) -> list[dict]:
    usable = [b for b in ("cuda", "triton", "cupy") if _backend.backends()[b] == "ok"]
    rows = []
    for c in cs:
        for k in ks:
            need = 4 * n * k * c * torch.finfo(dtype).bits // 8  # r, out and eager's temporaries
            if need > 0.8 * torch.cuda.mem_get_info(device)[0]:
                rows.append({"N": n, "C": c, "k": k, "skipped": f"needs about {need / 2**30:.1f} GiB"})
                continue
            try:
                rows.append(ce_case(n, c, k, usable, repeats, device, dtype))
            except torch.cuda.OutOfMemoryError as exc:
                rows.append({"N": n, "C": c, "k": k, "skipped": f"out of memory: {str(exc).splitlines()[0]}"})
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    if not torch.cuda.is_available():
        print("gpu_fused.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    default_out = os.path.join(os.path.dirname(__file__), "results",
                               f"gpu_fused_{name.replace(' ', '_').replace('/', '_')}.json")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a smoke run)")
    args = ap.parse_args(argv)
    dtype = torch.float32
    ks = [1, 4, 16] if args.quick else [1, 4, 16, 64]
    repeats = 5 if args.quick else args.repeats
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    payload = {"command": " ".join(["python", *sys.argv]), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "device": name, "torch": torch.__version__, "triton": triton_version, "backends": _backend.backends(),
               "dtype": str(dtype), "hvp": [], "ce_hvp": []}
    torch.manual_seed(0)
    for label, width, depth in [("F1-style MLP 5x512", 512, 5), ("wide MLP 4x4096", 4096, 4)]:
        model = mlp(784, width, depth, 10).to(device, dtype)
        X = torch.randn(4096, 784, device=device, dtype=dtype)
        Y = torch.randint(0, 10, (4096,), device=device)
        payload["hvp"] += hvp_section(label, model, X, Y, ks, repeats, device, dtype)
        write_json(args.out, payload)
        if args.quick:
            break
    payload["ce_hvp"] = ce_section(16384, [10, 1000] if args.quick else [10, 1000, 50257], [1, 4], repeats, device,
                                   dtype)
    f1_16 = [r for r in payload["hvp"] if r.get("model", "").startswith("F1") and r.get("k") == 16 and "median_s" in r]
    ce_big = [r for r in payload["ce_hvp"] if r.get("C") == 50257 and r.get("k") == 1 and "median_s" in r]
    targets = {}
    if f1_16:
        u = f1_16[0]["per_vector_forward_units"]
        targets["fused_k16_speedup_vs_torch_func"] = u["torch.func"] / u["fused"] if "torch.func" in u else None
    if ce_big:
        best = min(ce_big[0]["speedup_vs_eager"], key=lambda b: -ce_big[0]["speedup_vs_eager"][b])
        targets["ce_hvp_C50257_backend"] = best
        targets["ce_hvp_C50257_speedup"] = ce_big[0]["speedup_vs_eager"][best]
        targets["ce_hvp_C50257_extra_memory_ratio"] = ce_big[0]["extra_memory_vs_eager"][best]
    targets["met"] = bool(
        targets.get("fused_k16_speedup_vs_torch_func") and targets["fused_k16_speedup_vs_torch_func"] >= 2.0
        and targets.get("ce_hvp_C50257_speedup", 0) >= 2.0 and targets.get("ce_hvp_C50257_extra_memory_ratio", 9) <= 0.5)
    payload["targets"] = targets
    write_json(args.out, payload)
    print(targets)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
