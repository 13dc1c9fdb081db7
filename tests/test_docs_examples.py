"""The user-facing documentation runs as written.

Convention for README.md and docs/*.md:

- Every fenced ```python block is executed, top to bottom, each in a fresh namespace, on one torch
  thread.  A block that cannot run in a test (it needs a GPU, a process group, the user's own files)
  is preceded by the line ``<!-- docs-test: skip: <reason> -->``; the reason is required.
- A comment ``# Name(field, ...)`` or ``# Name; ...`` on an assignment ``var = ...`` in a runnable
  block, where ``Name`` is a public class of sharpkit, is a promise: ``var`` must be a ``Name`` and
  have those fields.
- Every ``sharpkit <command> ...`` line of a fenced ```bash block (also after ``torchrun ... -m``)
  must be accepted by sharpkit's own argument parser: the command, every option and every option
  value (choices, numbers) as they are spelled in the docs.  Nothing is run: these commands train
  models or read the user's files.
"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import torch

import sharpkit as sk
from sharpkit.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip:\s*(\S[^>]*?)\s*-->\s*$")
PROMISE = re.compile(r"^(\w+)\s*=.*#\s*([A-Z]\w+)(?:\(([^)]*)\))?")


def _blocks(lang: str) -> list[tuple[str, int, str, str | None]]:
    """(file name, line, code, skip reason) of every fenced block of ``lang`` in the docs."""
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) != lang:
                continue
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            skip = SKIP.search(before)
            found.append((path.name, line, match.group(2), skip.group(1) if skip else None))
    return found


PYTHON_BLOCKS = _blocks("python")
BASH_BLOCKS = _blocks("bash")


def test_docs_have_runnable_python():
    """The README's API section is a runnable block (the convention above is not vacuous)."""
    runnable = [b for b in PYTHON_BLOCKS if b[0] == "README.md" and b[3] is None]
    assert runnable, "README.md has no runnable ```python block"


@pytest.mark.parametrize("name,line,code,skip", PYTHON_BLOCKS,
                         ids=[f"{b[0]}:{b[1]}" for b in PYTHON_BLOCKS])
def test_python_block_runs(name, line, code, skip, one_thread):
    if skip is not None:
        pytest.skip(f"{name}:{line} marked skip: {skip}")
    namespace: dict = {"__name__": f"docs_{name}_{line}"}
    exec(compile(code, f"{name}:{line}", "exec"), namespace)  # noqa: S102 - the docs' own code
    checked = 0
    for text in code.splitlines():
        promise = PROMISE.match(text.strip())
        if not promise or not hasattr(sk, promise.group(2)):
            continue
        var, cls_name, fields = promise.groups()
        value = namespace[var]
        assert isinstance(value, getattr(sk, cls_name)), (
            f"{name}:{line}: {var} is a {type(value).__name__}, the comment says {cls_name}")
        for field in (fields or "").split(","):
            field = field.strip()
            if field:
                assert hasattr(value, field), f"{name}:{line}: {var} ({cls_name}) has no field {field!r}"
        checked += 1
    if name == "README.md":
        assert checked >= 5, f"{name}:{line}: only {checked} result types checked"


def _sharpkit_commands(code: str) -> list[list[str]]:
    """The argv (after ``sharpkit``) of each sharpkit command in a bash block."""
    commands = []
    for logical in code.replace("\\\n", " ").splitlines():
        logical = logical.split(" #", 1)[0].strip()  # trailing comments
        if not logical or logical.startswith("#"):
            continue
        for part in re.split(r"&&|\|\||;", logical):
            words = shlex.split(part)
            if "sharpkit" in words and (words[0] == "sharpkit" or "-m" in words):
                i = words.index("sharpkit")
                if words[0] == "sharpkit" or (i > 0 and words[i - 1] == "-m"):
                    commands.append(words[i + 1:])
    return commands


BASH_COMMANDS = [(name, line, argv) for name, line, code, skip in BASH_BLOCKS if skip is None
                 for argv in _sharpkit_commands(code)]


def test_docs_have_command_lines():
    names = {argv[0] for _, _, argv in BASH_COMMANDS if argv}
    assert {"study", "audit", "sharpness", "spectrum", "landscape"} <= names, names


@pytest.mark.parametrize("name,line,argv", BASH_COMMANDS,
                         ids=[f"{c[0]}:{c[1]}:{c[2][0] if c[2] else ''}" for c in BASH_COMMANDS])
def test_command_line_parses(name, line, argv, capsys):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's error: exit status 2 and one line
        pytest.fail(f"{name}:{line}: `sharpkit {shlex.join(argv)}` is refused by the parser "
                    f"({exc.code}): {capsys.readouterr().err.strip()}")
    assert isinstance(args, argparse.Namespace) and getattr(args, "func", None) is not None, argv


def test_command_line_check_can_fail(capsys):
    """The parser check above rejects a misspelt option (so a passing run means something)."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["spectrum", "--model", "f1", "--topk", "5"])
    assert "--topk" in capsys.readouterr().err
