"""Single measurements from the command line: ``sharpkit sharpness``, ``spectrum`` and ``landscape``.

Each loads a model (``--model f1|c1|f1(width=..)|module:factory``), optionally a checkpoint into it, and data
(``--data mnist1d|digits|FILE|module:function``), runs one measurement from the Python API and writes
its result as JSON (and, for ``landscape --plot``, a PNG).  Output files are written atomically, as
strict JSON: non-finite numbers (a NaN standard error, an overflowing loss) are written as ``null``.

Bad input exits with status 2 and one line on stderr: options are checked by argparse, their
combinations before anything is loaded, and the model is run once on one batch of the data before
measuring, so that a model that does not fit its data is reported as such rather than as a
traceback from deep inside a solver.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from .audit.store import json_safe
from .inputs import LOSSES, check_class_targets, check_model_runs, default_device, resolve_data, resolve_device, resolve_model_classes
from .distributed import PeerFailure, agree, is_main_process

EXIT_USAGE = 2
DENSITY_STEPS = 80  # Lanczos steps of each spectral-density run (sk.spectral_density's default)


class UsageError(Exception):
    """Bad input found past argument parsing: reported as one line, exit status 2."""


def _input_error(option: str, value: str, exc: BaseException) -> UsageError:
    """``exc`` as a usage error naming the option, unless its message already names the value
    (resolve_data's and the checkpoint loader's messages do)."""
    text = _one_line(exc)
    return UsageError(text if value in text else f"{option} {value}: {text}")


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch's can run to many lines), with its type
    where the message alone would be unclear."""
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    if isinstance(exc, (ValueError, OSError, UsageError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# argparse types: a bad value stops at parsing, with argparse's "argument --x: ..." and exit 2.


def _positive(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be > 0 and finite, got {text}")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or a positive integer, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:  # the measurements refuse it too, but only after the data and model are loaded
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _trace_matvecs(text: str) -> int:
    value = int(text)
    if value != 0 and value < 3:  # Hutch++ splits its budget in three parts
        raise argparse.ArgumentTypeError(f"must be 0 (off) or at least 3 (Hutch++), got {text}")
    return value


def _device_arg(text: str) -> str:
    """A device this machine has: checked at parsing, not after the data are loaded."""
    try:
        resolve_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _output_path(text: str) -> str:
    """A file path that can be written: checked before measuring, so that a long run is not lost
    to a typo in the output path."""
    if not text:
        raise argparse.ArgumentTypeError("empty path, expected a file path")
    if text.endswith(("/", os.sep)):  # Path() drops the separator: "new/" was written as a file "new"
        raise argparse.ArgumentTypeError(f"{text}: ends with '{text[-1]}', expected a file path, not a folder")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory, expected a file path")
    ancestor = path.absolute().parent  # the nearest existing folder (missing ones are created)
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: {ancestor} is not writable")
    return text


def _device(spec: str | None) -> torch.device:
    return torch.device(spec) if spec is not None else default_device()


# ---------------------------------------------------------------------------------------------
# Inputs


def _common(p: argparse.ArgumentParser, checkpoint: bool = True, bn_default: str = "eval",
            bn_help: str = "BatchNorm: running statistics (eval, default) or each batch's statistics (train)",
            seed_help: str = "seed of the model's initialisation and of the measurement's random draws "
                             "(default 0)") -> None:
    p.add_argument("--model", required=True, help="f1, c1 (the paper's sizes), f1(width=W,depth=D), c1(channels=C,hidden=H1xH2) "
                   "or module:factory (built with the data's input shape)")
    if checkpoint:
        p.add_argument("--checkpoint", help="state dict to load (torch.save, safetensors or Lightning .ckpt)")
    p.add_argument("--data", default="mnist1d",
                   help="mnist1d (default), digits (scikit-learn's 8x8 digits), a .npz/.pt/.pth file (keys x_train, "
                   "y_train) or module:function returning (inputs, targets) or a DataLoader; files and built-in sets "
                   "give their training split")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="split the data into batches of at most this many samples (default: tensor data in one "
                   "batch, a DataLoader's batches as it makes them)")
    p.add_argument("--loss", choices=sorted(LOSSES), default="cross_entropy",
                   help="mean-reduced loss (default cross_entropy)")
    p.add_argument("--bn", choices=("eval", "train"), default=bn_default, help=bn_help)
    p.add_argument("--device", type=_device_arg, default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="precision of the model and the data (default float32)")
    p.add_argument("--seed", type=_seed, default=0, help=seed_help)
    p.add_argument("--out", type=_output_path, help="write the result as JSON to this file (default: print it)")


class _Data(NamedTuple):
    """``--data`` loaded: its batches, the class count a file or built-in set declares, and the first
    two samples of the first batch of each sample layout (the model is probed on each: batches
    padded to their own length are fine, a batch the model cannot take is a usage error up front)."""

    batches: Any
    num_classes: int | None
    layouts: list[tuple[int, tuple[torch.Tensor, torch.Tensor]]]


def _load_data(args: argparse.Namespace) -> _Data:
    """``--data`` as :class:`_Data`; an unusable spec or file is a :class:`UsageError`."""
    try:
        # (no description: the loop below is the one read of the data before measuring)
        batches, _, num_classes = resolve_data(args.data, args.batch_size, describe=False)
        layouts: dict[tuple, tuple[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for index, (x, y) in enumerate(batches):
            key = (tuple(x.shape[1:]), x.dtype, tuple(y.shape[1:]), y.dtype)
            if key not in layouts:
                layouts[key] = (index, (x[:2].clone(), y[:2].clone()))  # (a view would keep the whole batch)
    except Exception as exc:  # corrupt files fail in zip, pickle, numpy or torch; a user's loader in anything
        raise _input_error("--data", args.data, exc) from exc
    if not layouts:
        raise UsageError(f"--data {args.data}: holds no samples")
    try:  # before a model sized by the targets, or a checkpoint for it, is blamed
        for _, (_, y) in layouts.values():
            check_class_targets(LOSSES[args.loss](), y)
    except ValueError as exc:
        raise UsageError(f"--data {args.data} with --loss {args.loss}: {exc}") from exc
    return _Data(batches, num_classes, list(layouts.values()))


def _load_model(args: argparse.Namespace, data: _Data, checkpoint: str | None,
                option: str = "--checkpoint") -> nn.Module:
    """The model (with ``checkpoint``, given as ``option``, loaded when given) on the requested
    device/dtype, checked to run on every layout of the data with the loss."""
    from .audit.checkpoints import fit_state_dict, load_state_dict

    batches, num_classes = data.batches, data.num_classes

    try:
        # (data_classes: the classes counted from the data's labels where they sized the model, so that a
        # checkpoint with another output width is told why it does not fit)
        model, _, data_classes = resolve_model_classes(args.model, batches, num_classes, seed=args.seed)
    except Exception as exc:  # the user's factory may raise anything
        raise _input_error("--model", args.model, exc) from exc
    # In the requested dtype before the checkpoint is loaded: a float64 checkpoint measured in float64
    # must not pass through the factory's float32 on the way.
    model = model.to(device=_device(args.device), dtype=getattr(torch, args.dtype))
    if checkpoint:
        try:
            # Under torchrun a checkpoint one rank cannot read stops every rank, reported once.
            with agree(f"loading {checkpoint}"):
                model.load_state_dict(fit_state_dict(load_state_dict(checkpoint), model, source=checkpoint,
                                                     data_classes=data_classes))
        except PeerFailure:
            raise  # another rank could not read it: that rank says why, this one stops quietly
        except Exception as exc:  # unreadable or not fitting the model
            raise _input_error(option, checkpoint, exc) from exc
    _probe(model, LOSSES[args.loss](), data, args)
    return model


def _probe(model: nn.Module, loss_fn: nn.Module, data: _Data, args: argparse.Namespace) -> None:
    """The model and the loss run on the first batch of each sample layout of the data
    (:func:`sharpkit.inputs.check_model_runs`)."""
    for index, batch in data.layouts:
        try:
            check_model_runs(model, loss_fn, [batch], _device(args.device), getattr(torch, args.dtype), args.bn)
        except ValueError as exc:
            where = f" at batch {index} (the first with these sample shapes)" if index else ""
            raise UsageError(f"model and data do not fit{where}: {_one_line(exc)}") from exc


# ---------------------------------------------------------------------------------------------
# Outputs


def _say(message: str) -> None:
    """Progress on stderr, from rank 0 only under torchrun."""
    if is_main_process():
        print(message, file=sys.stderr)


def _emit(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if not is_main_process():  # every rank holds the same result; rank 0 writes it
        return
    # Strict JSON (jq, JSON.parse and most readers refuse NaN/Infinity): non-finite numbers as null,
    # and allow_nan=False so that one slipping through fails here rather than in the reader.
    text = json.dumps(json_safe(result), indent=2, default=_jsonable, allow_nan=False)
    if args.out:
        from .files import atomic_write_text

        try:
            atomic_write_text(args.out, text + "\n")
        except OSError as exc:
            print(text)  # the measurement is done: keep it on stdout rather than lose it
            raise UsageError(f"cannot write --out {args.out}: {_one_line(exc)} (result printed instead)") from exc
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist()) if obj.numel() <= 64 else f"<tensor of shape {tuple(obj.shape)}>"
    return str(obj)


# ---------------------------------------------------------------------------------------------
# sharpness


def _sharpness_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options ``--kind`` uses, with their defaults filled in; an option given that the
    measurement would ignore is a :class:`UsageError` (it must neither run silently as something
    else nor be recorded as used)."""
    given = {name: getattr(args, name) for name in ("solver", "restarts", "first_step", "ascent_dtype", "norm",
                                                    "subspace_dim")
             if getattr(args, name) is not None}
    if args.standard:
        given["standard"] = True

    def reject(names: tuple[str, ...], why: str) -> None:
        for name in names:
            if name in given:
                raise UsageError(f"--{name.replace('_', '-')} {why}")

    if args.kind == "keskar":
        reject(("norm", "standard"), "applies to the adaptive kinds, not to --kind keskar")
        solver = given.get("solver", "lbfgsb")
        options: dict[str, Any] = {"solver": solver, "subspace_dim": args.subspace_dim}
        if solver == "lbfgsb":
            reject(("restarts", "first_step", "ascent_dtype"), "applies to --solver pga/apgd; lbfgsb (the paper's "
                   "protocol) starts once at y = 0 and needs exact values")
            return options
    else:
        reject(("subspace_dim",), "applies to --kind keskar")
        options = {"norm": given.get("norm", "linf"), "adaptive": not args.standard}
        if args.kind == "adaptive-average":
            reject(("solver", "restarts", "first_step", "ascent_dtype"), "applies to --kind keskar and adaptive-worst; "
                   "adaptive-average averages --max-iter random draws")
            return options
        solver = given.get("solver", "apgd")
        if solver == "lbfgsb":
            raise UsageError("--solver lbfgsb applies to --kind keskar; adaptive-worst is maximised by pga or apgd")
        options.update(solver=solver, ascent_dtype=given.get("ascent_dtype"))
        if options["norm"] == "l2":  # the ℓ2 ball's ascent starts at y = 0 by a sign step, then at random points
            reject(("first_step",), "applies to the box (--norm linf); with --norm l2 the runs after the first "
                   "start at random points")
            options["restarts"] = given.get("restarts", 1)
            return options
    options.update(restarts=given.get("restarts", 1), first_step=given.get("first_step", "gradient"),
                   ascent_dtype=given.get("ascent_dtype"))
    return options


def _sharpness(args: argparse.Namespace) -> int:
    import sharpkit as sk

    options = _sharpness_options(args)  # before loading anything: a bad combination fails fast
    if args.max_iter is None:
        args.max_iter = 10 if args.kind == "keskar" else 20
    loaded = _load_data(args)
    data = loaded.batches
    model = _load_model(args, loaded, args.checkpoint)
    loss_fn = LOSSES[args.loss]()
    rows = []
    for eps in args.epsilon:
        start = time.perf_counter()
        if args.kind == "keskar":
            r = sk.keskar_sharpness(model, loss_fn, data, epsilon=eps, max_iter=args.max_iter, seed=args.seed,
                                    bn=args.bn, **options)
        else:
            r = sk.adaptive_sharpness(model, loss_fn, data, rho=eps, kind=args.kind.split("-")[1],
                                      max_iter=args.max_iter, seed=args.seed, bn=args.bn, **options)
        radius = "epsilon" if args.kind == "keskar" else "rho"
        # (points whose loss was not finite were left out of the maximum: the solver warned, and
        # the saved results keep the count)
        rows.append({radius: eps, "value": r.value, "loss": r.loss, "max_loss": r.max_loss,
                     "num_evals": r.num_evals, "nonfinite_evals": r.info.get("nonfinite_evals", 0),
                     "seconds": time.perf_counter() - start})
        _say(f"{args.kind} {radius}={eps:g}: value={r.value:.6g} (loss {r.loss:.6g} -> {r.max_loss:.6g})")
    _emit(args, {"measure": args.kind, "model": args.model, "checkpoint": args.checkpoint, "data": args.data,
                 "loss_fn": args.loss, "bn": args.bn, "seed": args.seed, "max_iter": args.max_iter, **options,
                 "results": rows})
    return 0


# ---------------------------------------------------------------------------------------------
# spectrum and landscape


def _spectrum(args: argparse.Namespace) -> int:
    import sharpkit as sk

    loaded = _load_data(args)
    data = loaded.batches
    model = _load_model(args, loaded, args.checkpoint)
    make = sk.ggn if args.operator == "ggn" else sk.hessian
    op = make(model, LOSSES[args.loss](), data, bn=args.bn)
    result: dict[str, Any] = {"operator": args.operator, "model": args.model, "checkpoint": args.checkpoint,
                              "data": args.data, "bn": args.bn, "seed": args.seed}
    if args.k > op.shape[0]:  # before a progress bar opens: the error is then the only line
        raise UsageError(f"--k {args.k}: the model has only {op.shape[0]} trainable parameters (eigenvalues)")
    shown = _ProductProgress(op, enabled=args.progress and is_main_process())
    with shown.stage("eigenvalues", None):
        eig = sk.eigenvalues(shown, k=args.k, which=args.which, tol=args.tol, seed=args.seed)
    result["eigenvalues"] = [float(v) for v in eig.values]
    _say("eigenvalues: " + ", ".join(f"{v:.6g}" for v in result["eigenvalues"]))
    if args.trace:
        with shown.stage("trace", args.trace):
            est = sk.trace(shown, method="hutch++", num_matvecs=args.trace, seed=args.seed)
        result["trace"] = {"value": float(est.value), "stderr": float(est.stderr), "num_matvecs": est.num_matvecs}
        _say(f"trace: {est.value:.6g} ± {est.stderr:.2g}")
    if args.density:
        # (each run takes at most DENSITY_STEPS products: a bound for the bar)
        with shown.stage("density", args.density * min(DENSITY_STEPS, op.shape[0])):
            dens = sk.spectral_density(shown, num_runs=args.density, lanczos_steps=DENSITY_STEPS, seed=args.seed)
        result["density"] = {"grid": [float(v) for v in dens.grid], "density": [float(v) for v in dens.density]}
    result["num_matvecs"] = op.num_matvecs
    _emit(args, result)
    return 0


class _ProductProgress:
    """A curvature operator seen through a progress bar: ``op @ V`` advances the current stage's
    bar by the number of vectors (products are the unit of work of every spectrum measure)."""

    def __init__(self, op: Any, enabled: bool):
        self._op, self._enabled, self._bar = op, enabled, None

    def __getattr__(self, name: str) -> Any:  # shape, dtype, device, preferred_block_size ...
        return getattr(self._op, name)

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        out = self._op @ V
        if self._bar is not None:
            self._bar.update(1 if V.dim() == 1 else V.shape[1])
        return out

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None):
        with _progress_bar(total, name, "product", self._enabled) as self._bar:
            yield
            if self._bar is not None and self._bar.total and self._bar.n < self._bar.total:
                self._bar.total = self._bar.n  # fewer than the bound (a Lanczos run that broke down early)
                self._bar.refresh()
        self._bar = None


@contextlib.contextmanager
def _progress_bar(total: int | None, desc: str, unit: str, enabled: bool):
    """A tqdm bar on stderr (None when not ``enabled``), closed on exit; on an error it is cleared,
    so that the error, not a half bar, is what stays on the terminal."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


def _plot_format(path: str) -> str:
    """The image format ``--plot`` asks for by its suffix (png without one): a UsageError, before
    anything is measured, for a suffix matplotlib cannot write (rather than PNG bytes in a .pdf)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix:
        return "png"
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if suffix not in formats:
        raise UsageError(f"--plot {path}: cannot write .{suffix} images; use one of "
                         + ", ".join(f".{f}" for f in sorted(formats)))
    return suffix


def _landscape(args: argparse.Namespace) -> int:
    import sharpkit as sk

    plot_format = _plot_format(args.plot) if args.plot else None  # before loading anything
    loaded = _load_data(args)  # once, for both end points
    data = loaded.batches
    model_a = _load_model(args, loaded, args.a, "--a")
    model_b = _load_model(args, loaded, args.b, "--b")
    # float64: the recorded alphas are the decimal ones asked for (0.1, not float32's 0.10000000149)
    alphas = np.linspace(args.alpha_min, args.alpha_max, args.points, dtype=np.float64).tolist()
    loss_fn = LOSSES[args.loss]()
    with _progress_bar(len(alphas), "landscape", "point", args.progress and is_main_process()) as bar:
        curve = sk.interpolate(model_a, model_b, loss_fn, data, alphas, path=args.path, bn=args.bn,
                               on_point=None if bar is None else (lambda *_: bar.update(1)))
    losses = [float(v) for v in curve.loss]
    accuracies = [float(v) for v in curve.accuracy]
    # Accuracy is null where it is undefined at every point (a regression loss), else one value a point.
    accuracy = None if all(math.isnan(v) for v in accuracies) else accuracies
    result = {"path": args.path, "model": args.model, "a": args.a, "b": args.b, "data": args.data, "bn": args.bn,
              "alphas": alphas, "loss": losses, "accuracy": accuracy}
    if args.plot and is_main_process():
        try:
            _plot_curve(result, Path(args.plot), plot_format)
        except OSError as exc:
            _emit(args, result)  # keep the curve: only the plot was lost
            raise UsageError(f"cannot write --plot {args.plot}: {_one_line(exc)}") from exc
    _emit(args, result)
    return 0


def _plot_curve(result: dict[str, Any], path: Path, fmt: str = "png") -> None:
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
    fig.savefig(buf, format=fmt, dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# registration


def _reported(command: str, fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``fn(args)``, with bad input reported as one line and exit status 2: a :class:`UsageError`
    (inputs, option combinations, outputs) or a ``ValueError``, which is how the measurement
    functions reject their arguments (``k`` above the parameter count, a non-finite loss ...).
    Running out of memory is one line too, with exit status 1 (the inputs are fine, the device too
    small for them).  Anything else, a ``TypeError`` included, is a bug and keeps its traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (UsageError, ValueError) as exc:
            print(f"sharpkit {command}: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (torch.OutOfMemoryError, MemoryError) as exc:  # a setting too large for the device, not a bug
            hint = "" if args.batch_size else "; --batch-size splits the data into smaller passes"
            print(f"sharpkit {command}: error: out of memory ({_one_line(exc)}){hint}", file=sys.stderr)
            return 1

    return run


_EXIT_CODES = """\
exit codes:
  0  measured
  1  out of memory (the inputs are fine, the device too small for them: --batch-size splits the
     data), or another rank of a torchrun launch failed (that rank reports the cause)
  2  bad input, one line naming it: arguments, data, model or checkpoint, a model that does not run
     on the data, a loss that is not finite at the checkpoint ...
  130 interrupted
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    documented = {"epilog": _EXIT_CODES, "formatter_class": argparse.RawDescriptionHelpFormatter}
    p = sub.add_parser("sharpness", help="epsilon-sharpness (Keskar) or adaptive sharpness of one model",
                       **documented)
    _common(p)
    p.add_argument("--kind", choices=("keskar", "adaptive-worst", "adaptive-average"), default="keskar")
    p.add_argument("--epsilon", type=_positive, nargs="+", default=[1e-3],
                   help="keskar: box size epsilon; adaptive: radius rho of the --norm ball; several allowed "
                   "(default 1e-3)")
    p.add_argument("--solver", choices=("lbfgsb", "pga", "apgd"), default=None,
                   help="ascent solver: keskar default lbfgsb (the paper's protocol), adaptive-worst default apgd "
                   "(lbfgsb does not apply there)")
    p.add_argument("--subspace-dim", type=_positive_int, default=None,
                   help="keskar: random subspace dimension p (default: full space)")
    p.add_argument("--max-iter", type=_positive_int, default=None,
                   help="solver iterations, or random draws for adaptive-average (default: 10 for keskar, the "
                   "paper's protocol; 20 for the adaptive kinds, as sk.adaptive_sharpness)")
    p.add_argument("--restarts", type=_positive_int, default=None,
                   help="pga/apgd runs (default 1; on the box the second starts with the other first step, "
                   "the rest at random points; with --norm l2 all but the first start at random points)")
    p.add_argument("--first-step", choices=("gradient", "sign"), default=None,
                   help="pga/apgd first step on the box (default gradient: the largest 3%% of the gradient to "
                   "the edge)")
    p.add_argument("--ascent-dtype", choices=("bfloat16", "float16"), default=None,
                   help="pga/apgd: take the ascent's steps under autocast to this precision; the reported losses "
                   "stay exact (faster where the hardware has fast low-precision matrix products: GPU tensor cores, "
                   "CPUs with AVX-512 BF16 or AMX; default full precision)")
    p.add_argument("--norm", choices=("linf", "l2"), default=None,
                   help="adaptive: norm of the perturbation ball (default linf)")
    p.add_argument("--standard", action="store_true", help="adaptive: c = 1 (standard sharpness) instead of c = |w|")
    p.set_defaults(func=_reported("sharpness", _sharpness))

    p = sub.add_parser("spectrum", help="top eigenvalues, trace and spectral density of the Hessian or GGN",
                       **documented)
    _common(p)
    p.add_argument("--operator", choices=("hessian", "ggn"), default="hessian",
                   help="the Hessian (default) or the generalized Gauss-Newton matrix")
    p.add_argument("--k", type=_positive_int, default=1, help="number of eigenvalues (default 1)")
    p.add_argument("--which", choices=("LA", "SA", "LM"), default="LA",
                   help="largest (LA, default), smallest (SA) or largest in magnitude (LM) eigenvalues")
    p.add_argument("--tol", type=_positive, default=1e-3,
                   help="relative residual at which an eigenpair counts as converged (default 1e-3)")
    p.add_argument("--trace", type=_trace_matvecs, default=0, metavar="MATVECS",
                   help="also estimate the trace (Hutch++, at least 3 matvecs; default 0: off)")
    p.add_argument("--density", type=_non_negative_int, default=0, metavar="RUNS",
                   help=f"also the spectral density (stochastic Lanczos quadrature runs of {DENSITY_STEPS} "
                   "products each; default 0: off)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar of the curvature products on stderr")
    p.set_defaults(func=_reported("spectrum", _spectrum))

    p = sub.add_parser("landscape", help="1-D loss/accuracy curve between two checkpoints (Keskar Fig. 2/3)",
                       **documented)
    # Batch statistics by default, the authors' protocol: running statistics of two networks do not
    # combine along a path, so sk.interpolate refuses "eval" unless A and B hold the same ones.
    _common(p, checkpoint=False, bn_default="train",
            bn_help="BatchNorm: each batch's statistics at every point (train, default, as in Keskar et al.; "
            "tensor data in one batch unless --batch-size) or running statistics, which A and B must then "
            "share (eval)",
            seed_help="seed of the model's initialisation, which the checkpoints then replace (default 0)")
    p.add_argument("--a", required=True, help="checkpoint at alpha = 0 (x_a; Keskar et al.: the small-batch minimizer)")
    p.add_argument("--b", required=True, help="checkpoint at alpha = 1 (x_b; Keskar et al.: the large-batch minimizer)")
    p.add_argument("--path", choices=("linear", "sin"), default="linear",
                   help="linear (default): (1 - alpha) x_a + alpha x_b; sin: cos(alpha pi/2) x_a + sin(alpha pi/2) x_b")
    p.add_argument("--alpha-min", type=_finite, default=-1.0, help="first alpha (default -1)")
    p.add_argument("--alpha-max", type=_finite, default=2.0, help="last alpha (default 2)")
    p.add_argument("--points", type=_positive_int, default=25,
                   help="evenly spaced points from --alpha-min to --alpha-max (default 25; 1: --alpha-min alone)")
    p.add_argument("--plot", type=_output_path,
                   help="also plot the curve to this image file (format by suffix: .png, .pdf, .svg ...; png without)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar of the points on stderr")
    p.set_defaults(func=_reported("landscape", _landscape))
