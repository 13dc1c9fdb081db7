"""``sharpkit study``: the large- vs small-batch study with a report, from the command line."""
from __future__ import annotations

import argparse
import textwrap
import re
import sys
import time

from ..sharpness.solvers import SOLVERS

__all__ = ["add_parser", "config_from_args"]



def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "study",
        help="reproduce the large- vs small-batch sharpness study (MNIST-1D by default) with an HTML report",
        description=textwrap.fill(
            "Train small-batch (SB) and large-batch (LB) models over several seeds, measure their "
            "ε-sharpness and Hessian spectrum, sweep batch sizes, warm-start LB from SB, track sharpness "
            "along training, and write results.json, CSV tables, PNG figures and report.html to --out. "
            "Re-running with the same --out resumes.", width=100
        ),
        epilog=(
            "exit codes:\n"
            "  0  the study ran (a claim not reproduced is a result, not a failure)\n"
            "  1  a training diverged (one line names it and its folder)\n"
            "  2  unusable data, model or options, reported before any training\n"
            "  130 interrupted (finished trainings and measurements are kept: re-run to resume)\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", default="mnist1d", help="mnist1d (default), digits, or a .npz/.pt file of tensors")
    p.add_argument("--num-samples", type=int, default=None,
                   help="MNIST-1D samples to generate (80%% train); default 10000, 4000 with --quick")
    p.add_argument("--model", default=None,
                   help="comma-separated: f1 and c1 (here 5 x 128, and 32 channels with hidden 256x128; c1 narrower with --quick), "
                        "sized ones such as 'f1(width=64,depth=3)' or 'c1(channels=16,hidden=128x64)', or module:factory "
                        "(called as factory(input_shape, num_classes)); default f1,c1")
    p.add_argument("--sb", type=int, default=None, help="small batch size (default: min(256, LB // 16))")
    p.add_argument("--lb", type=int, default=None, help="large batch size (default: 10%% of the training set)")
    p.add_argument("--seeds", default=None, help="number of seeds (e.g. 5) or a comma-separated list (e.g. 0,3,7); default 5, 2 with --quick")
    p.add_argument("--epochs", type=int, default=None, help="epoch cap at the small batch (default 40, 8 with --quick); the large batch gets 3x (4x with --quick), "
                        "batch sizes in between a geometric interpolation")
    p.add_argument("--device", default="auto", help="auto (GPU when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--eps", default=None, help="comma-separated ε values (default 1e-3,5e-4)")
    p.add_argument("--solvers", default=None, help=f"comma-separated ε-sharpness solvers from {SOLVERS} (default lbfgsb,apgd)")
    p.add_argument("--sweep", default=None, help="comma-separated batch sizes for the sweep (default: SB, 2SB, 4SB, ... LB)")
    p.add_argument("--warm-epochs", default=None, help="comma-separated k for the warm-start experiment (LB training from the SB run's weights after "
                        "k epochs; default 0,1,2,5,10,20, 0,1,2,4 with --quick)")
    p.add_argument("--quick", action="store_true", help="same pipeline, smaller (2 seeds, short training): about 1 minute on a 2-core CPU")
    p.add_argument("--out", default="sharpkit-study", help="output directory (default sharpkit-study/); reused to resume")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of the measurements (default: every available core on an idle machine, 1 on a busy one); training always uses one, so the trained models do not depend on it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run, _parser=p)
    return p


def _ints(text: str, what: str, parser) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        parser.error(f"{what} must be comma-separated integers, got {text!r}")
    if not vals:
        parser.error(f"{what} is empty")
    return vals


def config_from_args(args: argparse.Namespace):
    """A :class:`~sharpkit.study.pipeline.StudyConfig` from parsed flags.

    Malformed flags -> ``parser.error`` (usage and exit 2); a ``--model`` factory that cannot be
    imported or called -> ``ValueError`` (one line and exit 2 from the command).
    """
    from .pipeline import default_config, quick_config

    parser = args._parser
    over: dict = {"data": args.data, "device": args.device}
    if args.num_samples is not None:
        if args.num_samples < 100:
            parser.error(f"--num-samples must be >= 100, got {args.num_samples}")
        if args.data != "mnist1d":  # was ignored without a word
            parser.error(f"--num-samples applies to --data mnist1d only (it generates that many samples), "
                         f"not to --data {args.data}")
        over["num_samples"] = args.num_samples
    if args.model is not None:
        # Commas inside parentheses separate a spec's sizes, not models: f1(width=64,depth=3),c1
        models = tuple(m.strip() for m in re.split(r",(?![^()]*\))", args.model) if m.strip())
        if not models:
            parser.error("--model is empty")
        from .models import resolve_factory

        for m in models:
            resolve_factory(m)  # ValueError naming the spec when it cannot be imported
        over["models"] = models
    for name in ("sb", "lb"):
        v = getattr(args, name)
        if v is not None:
            if v < 2:
                parser.error(f"--{name} must be >= 2 (BatchNorm needs two samples), got {v}")
            over[name] = v
    if args.sb is not None and args.lb is not None and args.sb >= args.lb:
        parser.error(f"--sb ({args.sb}) must be smaller than --lb ({args.lb})")
    if args.seeds is not None:
        if "," in args.seeds:
            seeds = _ints(args.seeds, "--seeds", parser)
            if len(set(seeds)) != len(seeds) or min(seeds) < 0:
                parser.error(f"--seeds must be distinct non-negative integers, got {args.seeds!r}")
        else:
            (count,) = _ints(args.seeds, "--seeds", parser)
            if count < 1:
                parser.error(f"--seeds must be >= 1, got {count}")
            seeds = tuple(range(count))
        over["seeds"] = seeds
    if args.epochs is not None:
        if args.epochs < 1:
            parser.error(f"--epochs must be >= 1, got {args.epochs}")
        over["max_epochs"] = args.epochs
    if args.eps is not None:
        try:
            eps = tuple(float(v) for v in args.eps.split(",") if v.strip())
        except ValueError:
            parser.error(f"--eps must be comma-separated numbers, got {args.eps!r}")
        if not eps or any(not (e > 0 and e < float("inf")) for e in eps):
            parser.error(f"--eps values must be positive and finite, got {args.eps!r}")
        over["eps"] = eps
    if args.solvers is not None:
        solvers = tuple(s.strip() for s in args.solvers.split(",") if s.strip())
        bad = [s for s in solvers if s not in SOLVERS]
        if not solvers or bad:
            parser.error(f"--solvers must be chosen from {', '.join(SOLVERS)}; got {args.solvers!r}")
        over["solvers"] = solvers
    if args.sweep is not None:
        sweep = _ints(args.sweep, "--sweep", parser)
        if min(sweep) < 2:
            parser.error("--sweep batch sizes must be >= 2")
        over["sweep"] = sweep
    if args.warm_epochs is not None:
        ks = _ints(args.warm_epochs, "--warm-epochs", parser)
        if min(ks) < 0:
            parser.error("--warm-epochs must be >= 0")
        over["warm_epochs"] = ks
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.device != "auto":
        import torch

        from ..inputs import resolve_device

        try:
            dev = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device {args.device!r} is not a device name (auto, cpu, cuda, cuda:0 ...)")
        if dev.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device} requested but CUDA is not available here")
        try:  # a device this torch build or machine lacks (mps, xla, cuda:3 of one GPU) or meta
            resolve_device(dev)
        except ValueError as exc:
            parser.error(f"--device {args.device}: {exc}")
    config = (quick_config if args.quick else default_config)(**over)
    late = [k for k in over.get("warm_epochs", ()) if k > config.max_epochs]
    if late:  # (the defaults' k beyond a shorter cap are dropped: 5, 10, 20 under --epochs 4)
        parser.error(f"--warm-epochs {late[0]} exceeds the small batch's epoch cap {config.max_epochs} (--epochs): "
                     "the SB run has no iterate after that many epochs to warm-start from")
    return config


def _run(args: argparse.Namespace) -> int:
    from .pipeline import run_study

    t = time.perf_counter()
    try:
        config = config_from_args(args)
        results = run_study(config, args.out, progress=not args.no_progress, threads=args.threads)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"sharpkit study: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # a training diverged (a traceback before): a failure of the run, not of its flags
        print(f"sharpkit study: error: {exc}", file=sys.stderr)
        return 1
    from ..distributed import is_main_process

    if not is_main_process():  # under torchrun rank 0 reports
        return 0
    print(f"sharpkit study: wrote {args.out}/report.html, results.json, CSV tables and "
          f"{len(results.get('figures', []))} figures in {time.perf_counter() - t:.0f} s")
    if config.quick:
        print("  (--quick: smoke-test scale, models not trained to convergence; run without --quick for the study)")
    models = results["summary"]["models"]
    # (one column for every verdict: "same direction (too few seeds to test)" is 37 characters)
    width = max((len(v["verdict"]) for s in models.values() for v in s["verdicts"]), default=0)
    for spec, s in models.items():
        for v in s["verdicts"]:
            print(f"  [{spec}] {v['verdict']:<{width}} {v['claim']}")
    from .report import measure_commands

    commands = measure_commands(results)
    if commands:
        print("  measure its checkpoints with the other commands (sharpness, spectrum, landscape, audit) on its "
              "training split and with its model sizes (plain --model f1/c1 there is the paper's size):")
        for line in commands:
            print(f"    {line}")
    return 0
