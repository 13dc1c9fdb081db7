"""Precision at a well-fitted minimum: float32 Hessian products and top eigenvalue of a network
trained to near-zero loss, sharpkit against PyHessian, curvlinops and hessian-eigenthings, each
against the float64 values of the same network.

    python benchmarks/bench_precision.py [--samples 512] [--width 128] [--activation gelu] [--target-loss 1e-6]

An MLP (40 -> width -> width -> 10, GELU by default) is trained full-batch with Adam on MNIST-1D training
samples until its mean cross-entropy falls below ``--target-loss``.  Most samples then have a
largest softmax probability within float32 rounding of 1, the regime where the Hessian of the loss
is a sum of tiny terms.  The reference is computed in float64 by torch.func alone (forward over
reverse on ``F.cross_entropy``; scipy's eigsh for the eigenvalue), independent of every tool.
Printed: per tool, the relative error of its float32 products ``H V`` (4 fixed vectors) and of its
float32 top eigenvalue.

The default activation is smooth: with ReLU, pre-activations within rounding of 0 take another
side of the kink in float32 than in float64, and the two precisions then differ by about 1% in
their Jacobians alone (a different piecewise-linear network, not a loss of precision).
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

import sharpkit as sk

CE = nn.CrossEntropyLoss()


ACTIVATIONS = {"gelu": nn.GELU, "tanh": nn.Tanh, "relu": nn.ReLU}


def train(X: torch.Tensor, Y: torch.Tensor, width: int, activation: str, target: float, max_steps: int,
          seed: int) -> tuple[nn.Module, int]:
    torch.manual_seed(seed)
    act = ACTIVATIONS[activation]
    model = nn.Sequential(nn.Linear(X.shape[1], width), act(), nn.Linear(width, width), act(), nn.Linear(width, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(1, max_steps + 1):
        opt.zero_grad()
        loss = CE(model(X), Y)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                if float(F.cross_entropy(model.double()(X.double()), Y)) < target:
                    model.float()
                    return model, step
            model.float()
    return model, max_steps


def float64_hvp(model: nn.Module, X: torch.Tensor, Y: torch.Tensor):
    """``V -> H V`` in float64 by torch.func on F.cross_entropy (V: (n,) float64)."""
    m64 = copy.deepcopy(model).double()
    names = [n for n, _ in m64.named_parameters()]
    shapes = [p.shape for _, p in m64.named_parameters()]
    sizes = [p.numel() for _, p in m64.named_parameters()]
    x0 = torch.cat([p.detach().reshape(-1) for p in m64.parameters()])
    X64 = X.double()

    def loss(x: torch.Tensor) -> torch.Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(x, sizes), shapes)}
        return F.cross_entropy(functional_call(m64, params, (X64,)), Y)

    g = grad(loss)
    return (lambda v: jvp(g, (x0,), (v,))[1]), x0.numel()


def top_eig_float64(hvp, n: int) -> float:
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = LinearOperator((n, n), matvec=lambda v: hvp(torch.from_numpy(np.asarray(v).reshape(-1))).numpy(),
                        dtype=np.float64)
    return float(eigsh(op, k=1, which="LA", tol=1e-10, return_eigenvectors=False)[0])


def tools(model: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> dict:
    """Per tool: (V (n, k) float32 -> H V (n, k), top eigenvalue) in float32, or the error text."""
    out: dict = {}
    for engine in ("fused", "generic"):
        H = sk.hessian(model, CE, (X, Y), engine=engine)
        out[f"sharpkit ({engine})"] = (lambda V, H=H: H.matmat(V),
                                       lambda H=H: float(sk.eigenvalues(H, k=1, tol=1e-8).values[0]))
    try:
        from pyhessian import hessian as PyHessian
        from pyhessian.utils import hessian_vector_product

        ph = PyHessian(copy.deepcopy(model), CE, data=(X, Y), cuda=False)

        def ph_mm(V: torch.Tensor, ph=ph) -> torch.Tensor:
            cols = []
            for j in range(V.shape[1]):
                vs = [v.view_as(p) for v, p in zip(torch.split(V[:, j], [p.numel() for p in ph.params]), ph.params)]
                cols.append(torch.cat([h.reshape(-1) for h in hessian_vector_product(ph.gradsH, ph.params, vs)]))
            return torch.stack(cols, 1)

        out["PyHessian"] = (ph_mm, lambda ph=ph: float(ph.eigenvalues(maxIter=1000, tol=1e-8, top_n=1)[0][0]))
    except Exception as exc:  # report, do not hide
        out["PyHessian"] = f"{type(exc).__name__}: {exc}"
    try:
        from curvlinops import HessianLinearOperator
        from scipy.sparse.linalg import eigsh

        m = copy.deepcopy(model)
        cl = HessianLinearOperator(m, CE, [p for p in m.parameters()], [(X, Y)], check_deterministic=False)
        out["curvlinops"] = (lambda V, cl=cl: cl @ V,
                             lambda cl=cl: float(eigsh(cl.to_scipy() if hasattr(cl, "to_scipy") else cl, k=1,
                                                       which="LA", tol=1e-8, return_eigenvectors=False)[0]))
    except Exception as exc:
        out["curvlinops"] = f"{type(exc).__name__}: {exc}"
    try:
        import hessian_eigenthings as he

        op = he.HessianOperator(copy.deepcopy(model), [(X, Y)], he.supervised_loss(CE))
        out["hessian-eigenthings"] = (
            lambda V, op=op: torch.stack([op.matvec(V[:, j]) for j in range(V.shape[1])], 1),
            lambda op=op: float(he.lanczos(op, k=1, which="LA", tol=1e-8, max_iter=300, seed=0).eigenvalues[0]))
    except Exception as exc:
        out["hessian-eigenthings"] = f"{type(exc).__name__}: {exc}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=512, help="MNIST-1D training samples (default 512)")
    ap.add_argument("--width", type=int, default=128, help="hidden width (default 128)")
    ap.add_argument("--activation", choices=sorted(ACTIVATIONS), default="gelu")
    ap.add_argument("--target-loss", type=float, default=1e-6, help="train until the mean loss is below (1e-6)")
    ap.add_argument("--max-steps", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = sk.load_mnist1d()
    X, Y = data.x_train[: args.samples], data.y_train[: args.samples]
    t0 = time.perf_counter()
    model, steps = train(X, Y, args.width, args.activation, args.target_loss, args.max_steps, args.seed)
    with torch.no_grad():
        z = model.double()(X.double())
        model.float()
        loss64 = float(F.cross_entropy(z, Y))
        top2 = z.topk(2, 1).values
        margin = top2[:, 0] - top2[:, 1]
        right = float((z.argmax(1) == Y).double().mean())
        loss32 = float(F.cross_entropy(model(X), Y))
    print(f"# {datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}  {platform.processor() or platform.machine()}  "
          f"torch {torch.__version__}  command: python {' '.join(sys.argv)}")
    print(f"# model 40-{args.width}-{args.width}-10 {args.activation}, {args.samples} samples, {steps} Adam steps "
          f"({time.perf_counter() - t0:.0f} s): loss {loss64:.3e} (float32 evaluation: {loss32:.3e}), "
          f"train accuracy {right:.4f}")
    print(f"# logit margin: median {float(margin.median()):.1f}, min {float(margin.min()):.1f}; "
          f"samples with p_max within float32 rounding of 1 (margin > 17): {float((margin > 17).double().mean()):.0%}")
    hvp64, n = float64_hvp(model, X, Y)
    V = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = torch.stack([hvp64(V[:, j]) for j in range(V.shape[1])], 1)
    lam = top_eig_float64(hvp64, n)
    print(f"# float64 reference (torch.func + scipy eigsh): |H V| = {float(ref.norm()):.3e}, lambda_max = {lam:.6e}")
    print(f"{'tool (float32)':<24} {'H V rel. error':>15} {'lambda_max':>14} {'rel. error':>11}")
    for name, entry in tools(model, X, Y).items():
        if isinstance(entry, str):
            print(f"{name:<24} unavailable: {entry}")
            continue
        mm, eig = entry
        try:
            err = float((mm(V.float()).double() - ref).norm() / ref.norm())
        except Exception as exc:
            print(f"{name:<24} failed: {type(exc).__name__}: {exc}")
            continue
        if eig is None:
            print(f"{name:<24} {err:>15.2e} {'-':>14} {'-':>11}")
            continue
        try:
            value = eig()
            print(f"{name:<24} {err:>15.2e} {value:>14.6e} {abs(value - lam) / abs(lam):>11.2e}")
        except Exception as exc:
            print(f"{name:<24} {err:>15.2e} failed: {type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
