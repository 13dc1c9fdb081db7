"""Curvature benchmark: sharpkit against PyHessian, curvlinops and hessian-eigenthings on the same
model and data, in one run (script mode; prints a table).

    python benchmarks/bench_curvature.py [--samples 256] [--repeats 3] [--models f1,cnn]

Per model (F1-style MLP 5 x 512 BN ReLU, and a small BN CNN, both on MNIST-1D inputs):

* HVP cost, k = 1 and k = 8 vectors, in units of one forward pass (``model(X)`` without grad) on
  the same data: time per vector / forward time.  All variants are interleaved round by round and
  every figure is a median over rounds (this machine's speed drifts by tens of percent).
* time to the top-5 eigenvalues at tol 1e-3: ``sk.eigenvalues(H, k=5, tol=1e-3)`` against
  PyHessian's ``eigenvalues(top_n=5, tol=1e-3)``, with their relative disagreement;
* time to the top eigenvalue at relative error <= 1e-3 (error against a tol=1e-8 Lanczos value);
* time to the trace at 1% standard error: sharpkit's Hutchinson with ``rtol=0.01`` gives the number
  m of probes needed; every tool then runs its Hutchinson with m probes (the estimator, hence m, is
  the same for all).

``--small-batches`` (instead of the above): the top eigenvalue (tol 1e-3) and a Hutch++ trace of
64 products of untrained F1-style MLPs (widths 128 and 512) on the MNIST-1D training split, with
the data as one batch, as a list of batches of 128 (joined into larger passes by default, and as
given with ``regroup=False``) and as a DataLoader of batches of 128.

Peers that are not installed, or fail on this torch, are reported as such (with the error).
Install them without letting pip replace torch:
``pip install --no-deps pyhessian curvlinops-for-pytorch hessian-eigenthings backpack-for-pytorch einconv unfoldNd linear_operator``
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import torch
from torch import nn

import sharpkit as sk
from sharpkit.study.models import make_c1, make_f1

CE = nn.CrossEntropyLoss()


def build(name: str, X: torch.Tensor, Y: torch.Tensor, steps: int, seed: int = 0) -> nn.Module:
    """The model, trained briefly (Adam) so that BatchNorm statistics and curvature are realistic."""
    torch.manual_seed(seed)
    if name == "f1":
        model = make_f1((40,), 10)
    else:
        model = make_c1((40,), 10, channels=16, hidden=(64,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (min(128, X.shape[0]),), generator=g)
        opt.zero_grad()
        CE(model(X[idx]), Y[idx]).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def interleave(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per variant over ``repeats`` rounds; the order rotates every round."""
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            times[k].append(timed(variants[k])[0])
    return {k: statistics.median(v) for k, v in times.items()}


# ---- peers ---------------------------------------------------------------------------------------

class Peers:
    """Each available peer's HVP (k vectors as one call where it supports blocks), top eigenvalue and
    Hutchinson trace, on its own copy of the model."""

    def __init__(self, model: nn.Module, X: torch.Tensor, Y: torch.Tensor):
        self.errors: dict[str, str] = {}
        self.hvp: dict[str, Callable[[torch.Tensor], Any]] = {}
        self.objs: dict[str, Any] = {}
        n = sum(p.numel() for p in model.parameters())
        self.n = n
        try:
            from pyhessian import hessian as PyHessian
            from pyhessian.utils import hessian_vector_product

            m = copy.deepcopy(model)
            ph = PyHessian(m, CE, data=(X, Y), cuda=False)
            params = ph.params

            def ph_hvp(V: torch.Tensor, ph=ph, params=params):
                for j in range(V.shape[1]):
                    vs = list(torch.split(V[:, j], [p.numel() for p in params]))
                    hessian_vector_product(ph.gradsH, params, [v.view_as(p) for v, p in zip(vs, params)])

            self.hvp["pyhessian"] = ph_hvp
            self.objs["pyhessian"] = ph
        except Exception as exc:  # report, do not hide
            self.errors["pyhessian"] = _why(exc)
        try:
            from curvlinops import HessianLinearOperator

            m = copy.deepcopy(model)
            params = [p for p in m.parameters() if p.requires_grad]
            cl = HessianLinearOperator(m, CE, params, [(X, Y)], check_deterministic=False)
            self.hvp["curvlinops"] = lambda V, cl=cl: cl @ V
            self.objs["curvlinops"] = cl
        except Exception as exc:
            self.errors["curvlinops"] = _why(exc)
        try:
            import hessian_eigenthings as he

            m = copy.deepcopy(model)
            op = he.HessianOperator(m, [(X, Y)], he.supervised_loss(CE))

            def he_hvp(V: torch.Tensor, op=op):
                for j in range(V.shape[1]):
                    op.matvec(V[:, j])

            self.hvp["hessian-eigenthings"] = he_hvp
            self.objs["hessian-eigenthings"] = op
        except Exception as exc:
            self.errors["hessian-eigenthings"] = _why(exc)

    def check(self, V: torch.Tensor, ref: torch.Tensor) -> None:
        """Drop a peer whose product disagrees with sharpkit's (so no figure of a wrong answer)."""
        for name in list(self.hvp):
            try:
                if name == "pyhessian":
                    from pyhessian.utils import hessian_vector_product

                    ph = self.objs[name]
                    vs = [v.view_as(p) for v, p in zip(torch.split(V[:, 0], [p.numel() for p in ph.params]), ph.params)]
                    out = torch.cat([h.reshape(-1) for h in hessian_vector_product(ph.gradsH, ph.params, vs)])
                elif name == "curvlinops":
                    out = (self.objs[name] @ V[:, :1])[:, 0]
                else:
                    out = self.objs[name].matvec(V[:, 0])
                err = float((out - ref[:, 0]).norm() / ref[:, 0].norm())
                if not err < 1e-3:
                    raise RuntimeError(f"its HVP differs from sharpkit's by {err:.2e} (relative)")
            except Exception as exc:
                self.errors[name] = _why(exc)
                del self.hvp[name]


def _why(exc: BaseException) -> str:
    line = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {line[:160]}"


# ---- the benchmark -------------------------------------------------------------------------------

def bench_model(name: str, X: torch.Tensor, Y: torch.Tensor, repeats: int, train_steps: int) -> dict:
    model = build(name, X, Y, train_steps)
    n = sum(p.numel() for p in model.parameters())
    row: dict[str, Any] = {"model": name, "n": n, "samples": X.shape[0]}
    H = sk.hessian(model, CE, (X, Y))  # engine="auto": fused where supported
    Hg = sk.hessian(model, CE, (X, Y), engine="generic")
    row["engine"] = H.engine_info["engine"]
    peers = Peers(model, X, Y)
    g = torch.Generator().manual_seed(0)
    V8 = torch.randn(n, 8, generator=g)
    ref = H @ V8
    torch.testing.assert_close(Hg @ V8, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    peers.check(V8, ref)
    row["peer_errors"] = dict(peers.errors)

    def fwd():
        with torch.no_grad():
            model(X)

    # HVP cost, interleaved: forward, sharpkit (auto / generic), peers; k = 1 and k = 8.
    variants: dict[str, Callable[[], Any]] = {"forward": fwd}
    for k in (1, 8):
        V = V8[:, :k].contiguous()
        variants[f"sharpkit/{k}"] = lambda V=V: H @ V
        if row["engine"] != "generic":
            variants[f"sharpkit-generic/{k}"] = lambda V=V: Hg @ V
        for p, f in peers.hvp.items():
            variants[f"{p}/{k}"] = lambda f=f, V=V: f(V)
    for f in variants.values():  # warm-up (caches, first-call overheads)
        f()
    med = interleave(variants, repeats)
    t_fwd = med["forward"]
    row["forward_s"] = t_fwd
    row["hvp_fwd_units"] = {k: (v / t_fwd) / int(k.split("/")[1]) for k, v in med.items() if k != "forward"}

    # Top-5 eigenvalues at tol 1e-3: sharpkit vs PyHessian, interleaved.
    top5: dict[str, list[float]] = {}

    def sk_top5():
        r = sk.eigenvalues(sk.hessian(model, CE, (X, Y)), k=5, tol=1e-3)
        top5["sharpkit"] = [float(v) for v in r.values]
        top5["sharpkit_matvecs"] = r.num_matvecs

    def ph_top5():
        from pyhessian import hessian as PyHessian

        vals, _ = PyHessian(copy.deepcopy(model), CE, data=(X, Y), cuda=False).eigenvalues(top_n=5, tol=1e-3)
        top5["pyhessian"] = sorted(vals, reverse=True)

    eig_variants = {"sharpkit": sk_top5}
    if "pyhessian" in peers.hvp:
        eig_variants["pyhessian"] = ph_top5
    med5 = interleave(eig_variants, repeats)
    row["top5_s"] = med5
    row["top5"] = top5
    if "pyhessian" in top5:
        row["top5_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(top5["sharpkit"], top5["pyhessian"]))

    # Top eigenvalue at relative error <= 1e-3 against a tight Lanczos value.
    lam = float(sk.eigenvalues(sk.hessian(model, CE, (X, Y)), k=1, tol=1e-8).values[0])
    top1: dict[str, float] = {}

    def sk_top1():
        top1["sharpkit"] = float(sk.eigenvalues(sk.hessian(model, CE, (X, Y)), k=1, tol=1e-3).values[0])

    def ph_top1():
        from pyhessian import hessian as PyHessian

        top1["pyhessian"] = PyHessian(copy.deepcopy(model), CE, data=(X, Y), cuda=False).eigenvalues(top_n=1, tol=1e-3)[0][0]

    def cl_top1():
        from curvlinops import HessianLinearOperator
        from scipy.sparse.linalg import eigsh

        m = copy.deepcopy(model)
        op = HessianLinearOperator(m, CE, list(m.parameters()), [(X, Y)], check_deterministic=False).to_scipy()
        top1["curvlinops"] = float(eigsh(op, k=1, which="LA", tol=1e-3, return_eigenvectors=False)[0])

    def he_top1():
        import hessian_eigenthings as he

        op = he.HessianOperator(copy.deepcopy(model), [(X, Y)], he.supervised_loss(CE))
        top1["hessian-eigenthings"] = float(he.lanczos(op, k=1, which="LA", tol=1e-3, max_iter=60, seed=0).eigenvalues[0])

    t1 = {"sharpkit": sk_top1, "pyhessian": ph_top1, "curvlinops": cl_top1, "hessian-eigenthings": he_top1}
    t1 = {k: f for k, f in t1.items() if k == "sharpkit" or k in peers.hvp}
    med1 = interleave(t1, repeats)
    row["top1_s"] = med1
    row["top1_rel_err"] = {k: abs(v - lam) / abs(lam) for k, v in top1.items()}
    row["lambda_max"] = lam

    # Trace at 1% standard error.
    est = sk.trace(sk.hessian(model, CE, (X, Y)), method="hutchinson", num_matvecs=2000, rtol=0.01, seed=0)
    m = est.num_matvecs
    row["trace"] = {"value": est.value, "stderr": est.stderr, "probes": m}
    tr_vals: dict[str, float] = {}

    def sk_tr():
        tr_vals["sharpkit"] = sk.trace(sk.hessian(model, CE, (X, Y)), method="hutchinson", num_matvecs=m, seed=1).value

    def ph_tr():
        from pyhessian import hessian as PyHessian

        tr_vals["pyhessian"] = float(sum(PyHessian(copy.deepcopy(model), CE, data=(X, Y), cuda=False).trace(maxIter=m, tol=0.0)) / m)

    def cl_tr():
        from curvlinops import HessianLinearOperator, hutchinson_trace

        mm = copy.deepcopy(model)
        op = HessianLinearOperator(mm, CE, list(mm.parameters()), [(X, Y)], check_deterministic=False)
        tr_vals["curvlinops"] = float(hutchinson_trace(op, m))

    def he_tr():
        import hessian_eigenthings as he

        op = he.HessianOperator(copy.deepcopy(model), [(X, Y)], he.supervised_loss(CE))
        tr_vals["hessian-eigenthings"] = float(he.trace(op, num_matvecs=m, method="hutchinson", seed=1).estimate)

    tt = {"sharpkit": sk_tr, "pyhessian": ph_tr, "curvlinops": cl_tr, "hessian-eigenthings": he_tr}
    tt = {k: f for k, f in tt.items() if k == "sharpkit" or k in peers.hvp}
    safe = {}
    for k, f in tt.items():
        try:
            f()
            safe[k] = f
        except Exception as exc:
            row["peer_errors"][f"{k} (trace)"] = _why(exc)
    row["trace_s"] = interleave(safe, max(1, repeats - 1))
    row["trace_values"] = tr_vals
    return row


def report(rows: list[dict]) -> str:
    out = []
    for r in rows:
        out.append(f"\n## {r['model']}: n = {r['n']:,} parameters, {r['samples']} samples, sharpkit engine = {r['engine']}")
        out.append(f"forward pass: {r['forward_s'] * 1e3:.1f} ms (median)")
        out.append("\nHVP cost in forward passes per vector (median of interleaved rounds):")
        out.append(f"{'tool':<22}{'k=1':>10}{'k=8':>10}")
        tools = sorted({k.split('/')[0] for k in r["hvp_fwd_units"]}, key=lambda t: (not t.startswith("sharpkit"), t))
        for t in tools:
            a, b = r["hvp_fwd_units"].get(f"{t}/1"), r["hvp_fwd_units"].get(f"{t}/8")
            out.append(f"{t:<22}{a:>10.2f}{b:>10.2f}")
        out.append("\ntop-5 eigenvalues, tol 1e-3 (median seconds):")
        for t, s in r["top5_s"].items():
            vals = ", ".join(f"{v:.4g}" for v in r["top5"].get(t, []))
            out.append(f"  {t:<20}{s:>8.2f} s   [{vals}]")
        if "pyhessian" in r["top5_s"]:
            out.append(f"  speed-up vs PyHessian: {r['top5_s']['pyhessian'] / r['top5_s']['sharpkit']:.2f}x; "
                       f"max relative difference of the 5 values: {r['top5_rel_diff']:.2e}; "
                       f"sharpkit used {r['top5']['sharpkit_matvecs']} HVPs")
        out.append(f"\ntop eigenvalue (reference {r['lambda_max']:.6g}, Lanczos tol 1e-8), median seconds and relative error:")
        for t, s in r["top1_s"].items():
            out.append(f"  {t:<20}{s:>8.2f} s   rel. err {r['top1_rel_err'].get(t, float('nan')):.1e}")
        tr = r["trace"]
        out.append(f"\ntrace at 1% stderr: {tr['value']:.5g} ± {tr['stderr']:.2g} needs {tr['probes']} Rademacher probes; "
                   "median seconds for that many probes:")
        for t, s in r["trace_s"].items():
            out.append(f"  {t:<20}{s:>8.2f} s   estimate {r['trace_values'].get(t, float('nan')):.5g}")
        if r["peer_errors"]:
            out.append("\nnot measured:")
            for t, e in r["peer_errors"].items():
                out.append(f"  {t}: {e}")
    return "\n".join(out)


def small_batches_table(repeats: int) -> None:
    """Curvature from small batches: joined into larger passes (the default) against as given."""
    ds = sk.load_mnist1d()
    x, y = ds.train
    listed = [(x[i:i + 128], y[i:i + 128]) for i in range(0, len(x), 128)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=128)
    sources = {"one batch": ((x, y), True), "list 128": (listed, True), "list 128 as given": (listed, False),
               "DataLoader 128": (loader, True)}
    print(f"\ncurvature of untrained F1-style MLPs on {len(x)} MNIST-1D samples by data source; "
          f"medians of {repeats} interleaved rounds, seconds (operator construction included)")
    print(f"{'width':>5} {'params':>8} {'measure':9} " + " ".join(f"{k:>18}" for k in sources) + "  passes (list 128)")
    for width in (128, 512):
        torch.manual_seed(0)
        model = make_f1((40,), 10, width=width).eval()
        n = sk.FlatParams(model).n
        measures = {"top-eig": lambda op: float(sk.eigenvalues(op, k=1, tol=1e-3, seed=0).values[0]),
                    "trace": lambda op: float(sk.trace(op, num_matvecs=64, seed=0).value)}
        for label, measure in measures.items():
            times: dict[str, list[float]] = {k: [] for k in sources}
            values, passes = {}, None
            for _ in range(repeats):
                for name, (src, regroup) in sources.items():
                    t = time.perf_counter()
                    op = sk.hessian(model, CE, src, regroup=regroup)
                    values[name] = measure(op)
                    times[name].append(time.perf_counter() - t)
                    if name == "list 128":
                        passes = op.num_batches
            spread = (max(values.values()) - min(values.values())) / max(abs(v) for v in values.values())
            print(f"{width:>5} {n:>8} {label:9} " + " ".join(f"{statistics.median(v):18.3f}" for v in times.values())
                  + f"  {passes:>6}   values agree to {spread:.1e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256, help="MNIST-1D training samples (one batch)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds per comparison (medians)")
    ap.add_argument("--models", default="f1,cnn", help="comma-separated: f1, cnn")
    ap.add_argument("--train-steps", type=int, default=150, help="Adam steps before measuring")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--small-batches", action="store_true",
                    help="only the table of data sources: one batch, batches of 128 joined / as given, a DataLoader")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.small_batches:
        small_batches_table(args.repeats)
        return 0
    ds = sk.load_mnist1d()
    X, Y = ds.x_train[: args.samples].contiguous(), ds.y_train[: args.samples].contiguous()
    print(f"# sharpkit curvature benchmark  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"# command: python benchmarks/bench_curvature.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    rows = []
    for name in args.models.split(","):
        try:
            rows.append(bench_model(name.strip(), X, Y, args.repeats, args.train_steps))
        except Exception:
            traceback.print_exc()
            return 1
        print(report(rows[-1:]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
