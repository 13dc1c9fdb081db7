"""The ``sharpkit`` command line.

Each subcommand lives beside the code it drives and registers itself through
``add_parser(subparsers)``, which must set ``func`` (called with the parsed arguments, returning
an exit code).  This file only lists those modules.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from typing import NoReturn

from . import __version__

# Modules providing ``add_parser(subparsers)``, in the order ``--help`` lists them.
COMMAND_MODULES: tuple[str, ...] = ("sharpkit.study.cli", "sharpkit.audit.cli", "sharpkit.measure_cli")


def _backends(args: argparse.Namespace) -> int:
    from .ops import backends

    table = backends()
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        width = max(len(k) for k in table)
        for name, why in table.items():
            print(f"{name:<{width}}  {why}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse's parser, taking every argument that starts like a negative number as a value, not
    as an option: before Python 3.13 argparse recognises only ``-1`` and ``-0.5``, so
    ``--alpha-min -1e-3``, ``--epsilon -1e-3`` or ``--eps -1e-3,5e-4`` stopped with "expected one
    argument" instead of reaching the option's own check.  (The subcommands' parsers are of this
    class too: ``add_subparsers`` makes them with ``type(self)``.)  No option of sharpkit's starts
    with a digit."""

    NEGATIVE_NUMBER = re.compile(r"^-(\.?\d|(inf|infinity|nan)$)", re.IGNORECASE)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = self.NEGATIVE_NUMBER

    def error(self, message: str) -> NoReturn:
        """Bad arguments: one line on stderr and exit status 2, as every other bad input (argparse
        prints its whole usage block first; the usage is one ``--help`` away)."""
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sharpkit",
        description="Measure the sharpness of neural-network minima (Keskar et al. 2017 and successors).",
    )
    parser.add_argument("--version", action="version", version=f"sharpkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("backends", help="list the kernel backends usable here and why the others are not")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_backends)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .distributed import PeerFailure, launcher_session

    try:
        # Under torchrun (WORLD_SIZE > 1) the measurements shard their data over the process group.
        with launcher_session():
            code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe raises here, in the handler below, not at interpreter exit
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except PeerFailure as exc:
        # The failing rank reports the cause; the others stop with one line.
        print(f"sharpkit: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (``sharpkit backends | head``): stop quietly.  Point stdout at
        # devnull so that the interpreter's final flush does not raise again.
        _silence_stdout()
        return 1


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a file
        pass


if __name__ == "__main__":
    sys.exit(main())
