"""Single measurements from the command line: ``sharpkit sharpness``, ``spectrum`` and ``landscape``.

Each loads a model (``--model f1|c1|module:factory``), optionally a checkpoint into it, and data
(``--data mnist1d|digits|FILE|module:function``), runs one measurement from the Python API and writes
its result as JSON (and, for ``landscape``, a CSV and a PNG).  Output files are written atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .audit import LOSSES
from .distributed import agree, is_main_process


def _common(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    p.add_argument("--model", required=True, help="f1, c1 or module:factory (built with the data's input shape)")
    if checkpoint:
        p.add_argument("--checkpoint", help="state dict to load (torch.save, safetensors or Lightning .ckpt)")
    p.add_argument("--data", default="mnist1d", help="mnist1d (default), digits, a .npz/.pt file or module:function")
    p.add_argument("--batch-size", type=int, default=None, help="split tensor data into batches of this size")
    p.add_argument("--loss", choices=sorted(LOSSES), default="cross_entropy")
    p.add_argument("--bn", choices=("eval", "train"), default="eval", help="BatchNorm policy (default: eval)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the result as JSON to this file (default: print it)")


def _device(spec: str | None) -> torch.device:
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {spec}: CUDA is not available on this machine")
    return dev


def _load(args: argparse.Namespace, checkpoint: str | None) -> tuple[nn.Module, Any]:
    """The model (with ``checkpoint`` loaded when given) on the requested device/dtype, and the batches."""
    from .audit import resolve_data, resolve_model
    from .audit.checkpoints import fit_state_dict, load_state_dict

    batches, _, num_classes = resolve_data(args.data, args.batch_size)
    model, _ = resolve_model(args.model, batches, num_classes, seed=args.seed)
    if checkpoint:
        # Under torchrun a checkpoint one rank cannot read stops every rank, reported once.
        with agree(f"loading {checkpoint}"):
            model.load_state_dict(fit_state_dict(load_state_dict(checkpoint), model, source=checkpoint))
    model = model.to(device=_device(args.device), dtype=getattr(torch, args.dtype))
    return model, batches


def _say(message: str) -> None:
    """Progress on stderr, from rank 0 only under torchrun."""
    if is_main_process():
        print(message, file=sys.stderr)


def _emit(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if not is_main_process():  # every rank holds the same result; rank 0 writes it
        return
    text = json.dumps(result, indent=2, default=_jsonable)
    if args.out:
        from .files import atomic_write_text

        atomic_write_text(args.out, text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 64 else f"<tensor of shape {tuple(obj.shape)}>"
    return str(obj)


def _sharpness(args: argparse.Namespace) -> int:
    import sharpkit as sk

    model, data = _load(args, args.checkpoint)
    loss_fn = LOSSES[args.loss]()
    rows = []
    for eps in args.epsilon:
        start = time.perf_counter()
        if args.kind == "keskar":
            r = sk.keskar_sharpness(
                model, loss_fn, data, epsilon=eps, subspace_dim=args.subspace_dim, solver=args.solver,
                max_iter=args.max_iter, seed=args.seed, bn=args.bn, restarts=args.restarts, first_step=args.first_step,
            )
        else:
            r = sk.adaptive_sharpness(
                model, loss_fn, data, rho=eps, norm=args.norm, kind=args.kind.split("-")[1],
                adaptive=not args.standard, max_iter=args.max_iter, seed=args.seed, bn=args.bn,
                restarts=args.restarts, first_step=args.first_step,
            )
        rows.append(
            {"epsilon" if args.kind == "keskar" else "rho": eps, "value": r.value, "loss": r.loss,
             "max_loss": r.max_loss, "num_evals": r.num_evals, "seconds": time.perf_counter() - start}
        )
        _say(f"{args.kind} eps={eps:g}: value={r.value:.6g} (loss {r.loss:.6g} -> {r.max_loss:.6g})")
    _emit(args, {"measure": args.kind, "model": args.model, "checkpoint": args.checkpoint, "data": args.data,
                 "solver": args.solver if args.kind == "keskar" else "apgd", "subspace_dim": args.subspace_dim,
                 "bn": args.bn, "seed": args.seed, "restarts": args.restarts, "first_step": args.first_step,
                 "results": rows})
    return 0


def _spectrum(args: argparse.Namespace) -> int:
    import sharpkit as sk

    model, data = _load(args, args.checkpoint)
    make = sk.ggn if args.operator == "ggn" else sk.hessian
    op = make(model, LOSSES[args.loss](), data, bn=args.bn)
    result: dict[str, Any] = {"operator": args.operator, "model": args.model, "checkpoint": args.checkpoint,
                              "data": args.data, "bn": args.bn, "seed": args.seed}
    eig = sk.eigenvalues(op, k=args.k, which=args.which, tol=args.tol, seed=args.seed)
    result["eigenvalues"] = [float(v) for v in eig.values]
    _say("eigenvalues: " + ", ".join(f"{v:.6g}" for v in result["eigenvalues"]))
    if args.trace:
        est = sk.trace(op, method="hutch++", num_matvecs=args.trace, seed=args.seed)
        result["trace"] = {"value": float(est.value), "stderr": float(est.stderr), "num_matvecs": est.num_matvecs}
        _say(f"trace: {est.value:.6g} ± {est.stderr:.2g}")
    if args.density:
        dens = sk.spectral_density(op, num_runs=args.density, seed=args.seed)
        result["density"] = {"grid": [float(v) for v in dens.grid], "density": [float(v) for v in dens.density]}
    result["num_matvecs"] = op.num_matvecs
    _emit(args, result)
    return 0


def _landscape(args: argparse.Namespace) -> int:
    import sharpkit as sk

    model_a, data = _load(args, args.a)
    model_b, _ = _load(args, args.b)
    alphas = torch.linspace(args.alpha_min, args.alpha_max, args.points).tolist()
    curve = sk.interpolate(model_a, model_b, LOSSES[args.loss](), data, alphas, path=args.path)
    result = {"path": args.path, "a": args.a, "b": args.b, "data": args.data,
              "alphas": [float(a) for a in curve.alphas], "loss": [float(v) for v in curve.loss],
              "accuracy": None if curve.accuracy is None else [float(v) for v in curve.accuracy]}
    if args.plot and is_main_process():
        _plot_curve(result, Path(args.plot))
    _emit(args, result)
    return 0


def _plot_curve(result: dict[str, Any], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["alphas"], result["loss"], "b-", label="loss")
    ax.set_xlabel("alpha  (0 = A, 1 = B)")
    ax.set_ylabel("loss", color="b")
    if result["accuracy"] is not None:
        ax2 = ax.twinx()
        ax2.plot(result["alphas"], result["accuracy"], "r-", label="accuracy")
        ax2.set_ylabel("accuracy", color="r")
    ax.set_title(f"{result['path']} path between {Path(result['a']).name} and {Path(result['b']).name}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _reported(command: str, fn):
    """``fn(args)``, with bad input found past argument parsing (an unusable checkpoint or data
    file, options the model does not allow) reported as one line and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            print(f"sharpkit {command}: error: {exc}", file=sys.stderr)
            return 2

    return run


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sharpness", help="epsilon-sharpness (Keskar) or adaptive sharpness of one model")
    _common(p)
    p.add_argument("--kind", choices=("keskar", "adaptive-worst", "adaptive-average"), default="keskar")
    p.add_argument("--epsilon", type=_positive, nargs="+", default=[1e-3],
                   help="box size epsilon (Keskar) or radius rho (adaptive); several allowed (default 1e-3)")
    p.add_argument("--solver", choices=("lbfgsb", "pga", "apgd"), default="lbfgsb",
                   help="Keskar solver (default lbfgsb: the paper's protocol)")
    p.add_argument("--subspace-dim", type=_positive_int, default=None, help="random subspace dimension p (default: full space)")
    p.add_argument("--max-iter", type=_positive_int, default=10, help="solver iterations (default 10)")
    p.add_argument("--restarts", type=_positive_int, default=1,
                   help="pga/apgd runs (default 1; the second starts with the other first step, the rest at random points)")
    p.add_argument("--first-step", choices=("gradient", "sign"), default="gradient",
                   help="pga/apgd first step on the box (default gradient: the largest 3%% of the gradient to the edge)")
    p.add_argument("--norm", choices=("linf", "l2"), default="linf", help="adaptive sharpness norm")
    p.add_argument("--standard", action="store_true", help="adaptive sharpness with c = 1 instead of c = |w|")
    p.set_defaults(func=_reported("sharpness", _sharpness))

    p = sub.add_parser("spectrum", help="top eigenvalues, trace and spectral density of the Hessian or GGN")
    _common(p)
    p.add_argument("--operator", choices=("hessian", "ggn"), default="hessian")
    p.add_argument("--k", type=int, default=1, help="number of eigenvalues (default 1)")
    p.add_argument("--which", choices=("LA", "SA", "LM"), default="LA")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--trace", type=int, default=0, metavar="MATVECS", help="also estimate the trace (Hutch++)")
    p.add_argument("--density", type=int, default=0, metavar="RUNS", help="also the spectral density (SLQ runs)")
    p.set_defaults(func=_reported("spectrum", _spectrum))

    p = sub.add_parser("landscape", help="1-D loss/accuracy curve between two checkpoints (Keskar Fig. 2/3)")
    _common(p, checkpoint=False)
    p.add_argument("--a", required=True, help="checkpoint at alpha = 0")
    p.add_argument("--b", required=True, help="checkpoint at alpha = 1")
    p.add_argument("--path", choices=("linear", "sin"), default="linear")
    p.add_argument("--alpha-min", type=float, default=-1.0)
    p.add_argument("--alpha-max", type=float, default=2.0)
    p.add_argument("--points", type=int, default=25)
    p.add_argument("--plot", help="also write the curve as a PNG")
    p.set_defaults(func=_reported("landscape", _landscape))
