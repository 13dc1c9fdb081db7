"""``sharpkit audit``: batch sharpness audits of checkpoints from the command line."""
from __future__ import annotations

import argparse
import os
import re
import sys

__all__ = ["add_parser", "main", "as_flags", "EXIT_OK", "EXIT_FAILED_CHECKPOINTS", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILED_CHECKPOINTS = 1
EXIT_USAGE = 2

_EPILOG = """\
exit codes:
  0  every checkpoint was measured (or already had an ok row in --out)
  1  at least one checkpoint has status "error" (missing, unreadable or corrupt file, state dict
     not fitting the model, NaN/inf weights, non-finite loss); the others were still measured
  2  bad arguments (unknown metric or device, unusable --model or --data, a model that does not
     run on the data, --out or --report not writable, --report naming the --out file, --out not an
     audit results file or being written by another audit ...), reported before anything is measured
  130 interrupted (rows already written stay valid; re-run the command to resume)

A file, directory or pattern that yields no checkpoint file (missing, empty, matching nothing) gets
an error row, like an unreadable checkpoint.

Each row's step and epoch are read from the path (epoch=3-step=1200.ckpt, ckpt_step_500.pt,
checkpoint-500/); where the path names none, from the "global_step"/"step" and "epoch" a checkpoint
dict stores beside its weights (kept in --out as saved_step/saved_epoch).  The weights of a checkpoint
dict are its "state_dict", "model_state_dict", "model", "net" or "network" entry (the first present),
or --entry's; each row's "weights" in --out says which, and names other entries holding weights (an
EMA copy), which are not measured.

Results are appended to --out (JSONL), one line per checkpoint content and configuration, keyed by
the file's SHA-256 and everything that changes the values (metric options, the data's content, the
model's architecture, the loss): re-running the same command skips finished checkpoints.  Identical
files under several paths are measured once and stored in one --out line; each path gets its own
row (name, step, epoch) in the printed table, the --report and sk.audit's returned rows.  Non-finite
numbers are written as null.

examples:
  sharpkit audit runs/sb/ runs/lb/ --model f1 --data mnist1d --metrics keskar,top-eig --out audit.jsonl
  sharpkit audit 'ckpts/epoch=*.ckpt' --model mypkg.nets:make_net --data mypkg.data:train_loader \\
      --metrics keskar,keskar-subspace,adaptive,top-eig,trace --out audit.jsonl --report audit.html
"""


# sk.audit's argument names as this command spells them, for the messages of its ValueErrors.
FLAGS = {
    "subspace_dim": "--p", "group_size": "--group-size", "max_iter": "--max-iter", "batch_size": "--batch-size",
    "lanczos_steps": "--lanczos-steps", "trace_samples": "--trace-samples", "first_step": "--first-step",
    "adaptive_norm": "--adaptive-norm", "ascent_dtype": "--ascent-dtype", "restarts": "--restarts",
    "epsilon": "--epsilon", "rho": "--rho", "k": "--k", "solver": "--solver",
}
# An argument name where it names the argument: "max_iter must ...", "k=5 ...", "solver 'lbfgsb'",
# "lanczos_steps >= 5", not inside a word, a path or another name ("the ascent solver", "k-th").
_FLAG_RE = re.compile(
    r"(?<![\w./-])(" + "|".join(sorted(map(re.escape, FLAGS), key=len, reverse=True)) + r")"
    r"(?:=(['\"]?)([^\s,;:'\"]*)\2|(?= must\b| >=| <=)| '([^']*)'(?![/\w]))"
)


def as_flags(message: str) -> str:
    """``message`` with sk.audit's argument names written as this command's flags:
    ``subspace_dim must be at most ...`` -> ``--p must be at most ...``, ``k=5`` -> ``--k 5``.
    Messages about the ``--model``/``--data`` specs, and what the user's own code raised (after
    "raised"), are the user's words: left as they are."""

    def flag(m: re.Match) -> str:
        value = m.group(3) if m.group(3) is not None else m.group(4)
        return FLAGS[m.group(1)] + ("" if value is None else f" {value}")

    if message.startswith(("model spec ", "data spec ")):
        return message
    head, raised, tail = message.partition(" raised ")
    return _FLAG_RE.sub(flag, head) + raised + tail


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``audit`` on the ``sharpkit`` command's subparsers."""
    from .metrics import METRICS

    p = subparsers.add_parser(
        "audit",
        help="measure the sharpness of many checkpoints, batched across checkpoints",
        description="Measure sharpness metrics of many checkpoints of one architecture. Checkpoints "
        "can be measured in groups: their parameters are stacked and the model runs under vmap, so one "
        "pass over the data serves the whole group. The group size follows from free memory; on a CPU, "
        "where stacking measured slower once passes are large, checkpoints go one at a time when "
        "passes hold more than 400 samples.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT_OR_DIR_OR_GLOB",
                   help="checkpoint files (.pt/.pth/.bin torch.save state dicts, .safetensors, Lightning .ckpt), "
                   "directories holding them (not searched recursively), or glob patterns (quoted; ** matches any "
                   "depth; matched directories are expanded; files without a checkpoint suffix are skipped)")
    p.add_argument("--model", required=True, help="f1, c1 (the paper's sizes), f1(width=W,depth=D), c1(channels=C,hidden=H1xH2), "
                   "or MODULE:FACTORY returning the nn.Module")
    p.add_argument("--data", default="mnist1d",
                   help="mnist1d (default), digits, a .pt/.npz file of tensors, or MODULE:FUNCTION returning a "
                   "DataLoader or (inputs, targets); the training split is used")
    p.add_argument("--metrics", default="keskar", help=f"comma-separated, from {','.join(METRICS)} (default: keskar)")
    p.add_argument("--out", default="audit.jsonl", help="JSONL results file, appended to and resumed (default: audit.jsonl)")
    p.add_argument("--report", default=None, help="write a self-contained HTML report here")
    p.add_argument("--loss", default="cross_entropy", choices=("cross_entropy", "mse"), help="loss (default: cross_entropy)")
    p.add_argument("--epsilon", type=float, default=1e-3, help="box size of keskar metrics (default: 1e-3)")
    p.add_argument("--p", dest="subspace_dim", type=int, default=100, help="subspace dimension of keskar-subspace (default: 100)")
    p.add_argument("--rho", type=float, default=2e-3, help="radius rho of adaptive sharpness, in the --adaptive-norm ball (default: 2e-3)")
    p.add_argument("--no-adaptive-scale", dest="adaptive_scale", action="store_false",
                   help="adaptive: use c = 1 (standard sharpness) instead of c = |w|")
    p.add_argument("--adaptive-norm", default="linf", choices=("linf", "l2"), help="adaptive: norm of the perturbation set (default: linf)")
    p.add_argument("--solver", default="apgd", choices=("apgd", "pga", "lbfgsb"),
                   help="ascent solver (default: apgd); lbfgsb (scipy, the paper's protocol) measures one checkpoint at a time")
    p.add_argument("--max-iter", type=int, default=None,
                   help="ascent iterations (default: 10 for the keskar metrics, the paper's protocol; 20 for adaptive, "
                   "as sk.adaptive_sharpness)")
    p.add_argument("--restarts", type=int, default=1,
                   help="apgd/pga runs (default: 1; on the box the second starts with the other first step, the rest at "
                   "random points; with --adaptive-norm l2 all but the first start at random points)")
    p.add_argument("--first-step", default="gradient", choices=("gradient", "sign"),
                   help="apgd/pga first step on the box (default: gradient, the largest 3%% of the gradient to the edge)")
    p.add_argument("--ascent-dtype", default=None, choices=("bfloat16", "float16"),
                   help="apgd/pga: take the ascent's steps under autocast to this precision, the reported losses still "
                   "exact (faster where the hardware has fast low-precision matrix products; default: full precision)")
    p.add_argument("--k", type=int, default=1, help="top-eig: eigenvalues to report (default: 1)")
    p.add_argument("--lanczos-steps", type=int, default=20, help="top-eig: Lanczos iterations (default: 20)")
    p.add_argument("--trace-samples", type=int, default=20, help="trace: Hutchinson probes (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subspace, Lanczos start and probes (default: 0)")
    p.add_argument("--bn", default="eval", choices=("eval", "train"), help="BatchNorm statistics (default: eval)")
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:1 ... (default: cuda if available, like the other commands)")
    p.add_argument("--dtype", default=None, choices=("float32", "float64"), help="precision (default: the model's)")
    p.add_argument("--group-size", type=int, default=None,
                   help="checkpoints measured together (default: from free memory, and 1 on a CPU with passes of "
                   "more than 400 samples; 1 = one at a time)")
    p.add_argument("--batch-size", type=int, default=None, help="split tensor data into batches of this size")
    p.add_argument("--entry", default=None, metavar="NAME",
                   help="the entry of the checkpoint dicts holding the weights to measure, e.g. model_ema or "
                   "state_dict_ema for EMA copies (default: the file itself where it is a state dict, else the first "
                   "of state_dict, model_state_dict, model, net, network)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=main)
    return p


def _same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file (links followed; neither need exist)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def main(args: argparse.Namespace) -> int:
    from ..distributed import is_main_process
    from ..inputs import default_device
    from . import audit
    from .metrics import MetricConfig
    from .report import format_table, write_html
    from .store import check_output_file

    try:
        metrics = MetricConfig(metrics=args.metrics).metrics
        # Checked now: results or a report that cannot be written must not wait for the measuring
        # (only rank 0 writes --out under torchrun).
        if is_main_process():
            check_output_file(args.out, "--out")
        if args.report:
            check_output_file(args.report, "--report")
            if _same_file(args.report, args.out):  # the report would replace the results, rows lost
                raise ValueError(f"--report {args.report} is the --out results file; give the report another name")
        rows = audit(
            args.checkpoints, model=args.model, data=args.data, metrics=metrics, out=args.out,
            loss_fn=args.loss, epsilon=args.epsilon, subspace_dim=args.subspace_dim, rho=args.rho,
            adaptive_scale=args.adaptive_scale, adaptive_norm=args.adaptive_norm, solver=args.solver, max_iter=args.max_iter,
            restarts=args.restarts, first_step=args.first_step, ascent_dtype=args.ascent_dtype, k=args.k,
            lanczos_steps=args.lanczos_steps, trace_samples=args.trace_samples, seed=args.seed, bn=args.bn,
            device=args.device if args.device is not None else str(default_device()),
            dtype=args.dtype, group_size=args.group_size, batch_size=args.batch_size,
            progress=args.progress, entry=args.entry,
        )
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"sharpkit audit: error: {as_flags(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    failed = sum(r["status"] == "error" for r in rows)
    if not is_main_process():  # under torchrun every rank holds the same rows; rank 0 reports them
        return EXIT_FAILED_CHECKPOINTS if failed else EXIT_OK
    print(format_table(rows, metrics))
    beside = [r for r in rows if r.get("weights") and "not measured" in r["weights"]]
    if beside:  # an EMA copy the user may have meant
        print(f"note: {len(beside)} checkpoint(s) hold other weights beside those measured, e.g. {beside[0]['name']}: "
              f"{beside[0]['weights']}; --entry NAME measures another entry", file=sys.stderr)
    if args.report:
        path = write_html(args.report, rows, metrics)
        print(f"report: {path}", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(rows)} checkpoints failed (rows with status 'error' in {args.out})", file=sys.stderr)
        return EXIT_FAILED_CHECKPOINTS
    return EXIT_OK
