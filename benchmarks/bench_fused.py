"""Fused batched HVP engine against generic autograd, per vector, in forward-pass units.

Script mode (``python benchmarks/bench_fused.py [options]``).  On one model and one batch it times

* ``forward``         the model's forward pass (no grad): the unit;
* ``fused``           sharpkit's FusedEngine, exact Hessian, primal pass cached (warm);
* ``fused-cold``      the same without the cache (every call redoes forward and backward);
* ``fused-ggn``       FusedEngine, Gauss-Newton, warm;
* ``torch.func``      vmap over the k directions of jvp(grad(f)) (forward-over-reverse), written here;
* ``double-backward`` PyHessian-style: grad with create_graph once (cached, not timed), then one
                      reverse pass of <g, v> per direction (retain_graph);

interleaving the variants within each repeat and reporting medians (this machine's speed drifts).
Per-vector cost = median call time / k / median forward time.  The CE-HVP section times the loss
Hessian product alone (the fused op against the eager chain softmax -> product -> sum -> broadcast),
with peak extra memory on CUDA (gpu_fused.py is the GPU script with the issue's full sizes).

Results go to ``--out`` (JSON, written atomically) and stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from sharpkit.curvature.fused import FusedEngine  # noqa: E402
from sharpkit.files import atomic_write_text  # noqa: E402
from sharpkit.kernels.ce_hvp import CEHessian, ce_hvp  # noqa: E402
from sharpkit.params import FlatParams  # noqa: E402


def mlp(d_in: int, width: int, depth: int, classes: int, bn: bool = True) -> nn.Sequential:
    """Flatten -> depth x [Linear(width), (BatchNorm1d), ReLU] -> Linear(classes) (F1 of Keskar et al.)."""
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = d_in
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width)] + ([nn.BatchNorm1d(width)] if bn else []) + [nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, classes))
    model = nn.Sequential(*layers)
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def hvp_variants(model, loss_fn, X, Y, k, device, dtype, names):
    """{name: zero-argument callable computing the k products (or the forward)}, and the directions."""
    flat = FlatParams(model)
    x = flat.get().to(device, dtype)
    V = torch.randn(flat.n, k, device=device, dtype=dtype)
    buffers = {n: b for n, b in model.named_buffers()}

    def f(xx):
        return loss_fn(functional_call(model, {**flat.as_dict(xx), **buffers}, (X,)), Y)

    variants = {}
    variants["forward"] = lambda: model(X)
    warm = FusedEngine("hessian", model, loss_fn, flat, x, dtype=dtype, device=device, cache=True)
    cold = FusedEngine("hessian", model, loss_fn, flat, x, dtype=dtype, device=device, cache=False)
    ggn = FusedEngine("ggn", model, loss_fn, flat, x, dtype=dtype, device=device, cache=True)
    warm.batch_matmat(0, X, Y, V[:, :1])  # build the cached primal pass outside the timing
    ggn.batch_matmat(0, X, Y, V[:, :1])
    variants["fused"] = lambda: warm.batch_matmat(0, X, Y, V)
    variants["fused-cold"] = lambda: cold.batch_matmat(0, X, Y, V)
    variants["fused-ggn"] = lambda: ggn.batch_matmat(0, X, Y, V)

    def generic():
        return vmap(lambda v: jvp(grad(f), (x,), (v,))[1], in_dims=1, out_dims=1)(V)

    variants["torch.func"] = generic

    xr = x.clone().requires_grad_(True)
    g = torch.autograd.grad(f(xr), xr, create_graph=True)[0]  # cached gradient graph, as PyHessian

    def double_backward():
        return torch.stack([torch.autograd.grad(g, xr, V[:, j], retain_graph=True)[0] for j in range(k)], 1)

    variants["double-backward"] = double_backward
    return {n: variants[n] for n in names}, V


def bench_hvp(label, model, loss_fn, X, Y, ks, repeats, device, dtype, names) -> list[dict]:
    rows = []
    for k in ks:
        torch.manual_seed(k)
        variants, V = hvp_variants(model, loss_fn, X, Y, k, device, dtype, names)
        with torch.no_grad():
            ref = variants["fused"]()
        check = {}
        for n in ("torch.func", "double-backward"):
            if n in variants:
                other = variants[n]().detach()
                check[n] = ((ref - other).norm() / other.norm()).item()
                if n == "double-backward" and "torch.func" in variants:  # the two baselines, for scale
                    base = variants["torch.func"]().detach()
                    check["torch.func vs double-backward"] = ((base - other).norm() / other.norm()).item()
        times = {n: [] for n in variants}
        for _ in range(repeats):
            for n, fn in variants.items():  # interleaved
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
        units = "  ".join(f"{n}={v:6.2f}" for n, v in row["per_vector_forward_units"].items())
        print(f"[{label} N={X.shape[0]} k={k:3d}] fwd={fwd * 1e3:8.1f} ms  per-vector fwd units: {units}  "
              f"check={ {n: f'{v:.1e}' for n, v in check.items()} }", flush=True)
    return rows


def eager_ce_hvp(z, r, s):
    p = torch.softmax(z, dim=-1)
    return s[:, None, None] * (p[:, None, :] * r - p[:, None, :] * (p[:, None, :] * r).sum(-1, keepdim=True))


def bench_ce(n, cs, k, repeats, device, dtype) -> list[dict]:
    rows = []
    for c in cs:
        z = torch.randn(n, c, device=device, dtype=dtype)
        r = torch.randn(n, k, c, device=device, dtype=dtype)
        s = torch.full((n,), 1.0 / n, device=device, dtype=dtype)
        head = CEHessian(z, s)
        buf = r.clone()
        variants = {
            "eager": lambda: eager_ce_hvp(z, r, s),
            "fused": lambda: ce_hvp(z, r, s),
            "fused-inplace": lambda: head.apply_(buf.copy_(r)) if device.type == "cpu" else ce_hvp(
                z, buf, s, lse=head.lse, out=buf),
        }
        err = ((variants["fused"]() - variants["eager"]()).abs().max() / variants["eager"]().abs().max()).item()
        times = {n: [] for n in variants}
        peaks = {}
        for _ in range(repeats):
            for name, fn in variants.items():
                times[name].append(timed(fn, device))
        if device.type == "cuda":
            for name, fn in variants.items():
                torch.cuda.synchronize(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                out = fn()
                torch.cuda.synchronize(device)
                peaks[name] = torch.cuda.max_memory_allocated(device) - base
                del out
        row = {"N": n, "C": c, "k": k, "dtype": str(dtype), "median_s": {m: statistics.median(t) for m, t in times.items()},
               "peak_extra_bytes": peaks, "max_rel_diff": err, "repeats": repeats}
        rows.append(row)
        print(f"[ce_hvp N={n} C={c} k={k}] " + "  ".join(f"{m}={v * 1e3:8.2f} ms" for m, v in row["median_s"].items())
              + (f"  peak extra: {peaks}" if peaks else "") + f"  max rel diff {err:.1e}", flush=True)
        del z, r, buf, head
    return rows


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--input-dim", type=int, default=784, help="input features (784: MNIST, as Keskar's F1)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4096, help="batch of the F1-style MLP")
    ap.add_argument("--ks", default="1,4,16,64", help="numbers of directions k")
    ap.add_argument("--f1-k64-batch", type=int, default=None,
                    help="a smaller batch for k=64 on the F1 MLP (CPU time); default: --batch")
    ap.add_argument("--wide-batch", type=int, default=4096, help="batch of the wide (4 x 4096) MLP")
    ap.add_argument("--wide-ks", default=None, help="k values for the wide MLP (default: --ks)")
    ap.add_argument("--models", default="f1,wide")
    ap.add_argument("--variants", default="forward,fused,fused-cold,fused-ggn,torch.func,double-backward")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ce-n", type=int, default=16384)
    ap.add_argument("--ce-classes", default="10,1000,50257")
    ap.add_argument("--ce-k", type=int, default=1)
    ap.add_argument("--skip-ce", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_fused.json"))
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    names = args.variants.split(",")
    ks = [int(v) for v in args.ks.split(",")]
    loss_fn = nn.CrossEntropyLoss()
    payload = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype, "hvp": [], "ce_hvp": [],
    }
    for which in [m for m in args.models.split(",") if m and m != "none"]:
        if which == "f1":
            model = mlp(args.input_dim, 512, 5, args.classes).to(device, dtype)
            groups = [(args.batch, [k for k in ks if k != 64 or args.f1_k64_batch is None])]
            if args.f1_k64_batch is not None and 64 in ks:
                groups.append((args.f1_k64_batch, [64]))
            label = "F1-style MLP 5x512"
        else:
            model = mlp(args.input_dim, 4096, 4, args.classes).to(device, dtype)
            wide_ks = [int(v) for v in args.wide_ks.split(",")] if args.wide_ks else ks
            groups = [(args.wide_batch, wide_ks)]
            label = "wide MLP 4x4096"
        for batch, group_ks in groups:
            X = torch.randn(batch, args.input_dim, device=device, dtype=dtype)
            Y = torch.randint(0, args.classes, (batch,), device=device)
            payload["hvp"] += bench_hvp(label, model, loss_fn, X, Y, group_ks, args.repeats, device, dtype, names)
            write_json(args.out, payload)
    if not args.skip_ce:
        payload["ce_hvp"] = bench_ce(args.ce_n, [int(c) for c in args.ce_classes.split(",")], args.ce_k,
                                     args.repeats, device, dtype)
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
