"""Checkpoint files: discovery, formats, content hash, step/epoch parsing, fit against a model.

Formats (chosen by suffix, then by content):

- ``torch.save`` state dicts (``.pt``, ``.pth``, ``.bin``), always read with ``weights_only=True``;
- safetensors (``.safetensors``);
- Lightning-style ``.ckpt``: a dict whose ``"state_dict"`` entry holds the weights under a prefix
  such as ``"model."`` (stripped automatically, as is DDP's ``"module."``).

Every failure is raised as :class:`CheckpointError` with a message naming the file and the
problem, so that the audit can record it in an error row and go on with the other checkpoints.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "CHECKPOINT_SUFFIXES",
    "find_checkpoints",
    "file_sha256",
    "load_state_dict",
    "fit_state_dict",
    "parse_step",
]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")

# How many offending keys an error message lists before summarising the rest.
_MAX_LISTED = 6


class CheckpointError(ValueError):
    """A checkpoint that cannot be measured (missing, unreadable, corrupt, not fitting, non-finite)."""


def find_checkpoints(specs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files, directories (their checkpoint files, not recursive) and glob patterns.

    A spec that names nothing existing and matches no file is kept as given, so that the audit
    reports it as missing instead of silently dropping it.  Order: as given, directories and
    globs sorted by name; duplicates (same resolved path) removed.
    """
    found: list[Path] = []
    for spec in specs:
        spec = os.fspath(spec)
        path = Path(spec)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
        elif path.exists():
            found.append(path)
        elif glob.has_magic(spec):
            found += sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
        else:
            found.append(path)
    seen, unique = set(), []
    for p in found:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes (the checkpoint's identity in the results store)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except PermissionError:
        raise CheckpointError(f"{path}: file is not readable (permission denied)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    return digest.hexdigest()


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU.

    Lightning-style files (a dict with ``"state_dict"``) and wrappers ``{"model": state_dict}`` /
    ``{"model_state_dict": ...}`` are unwrapped; prefixes are stripped later by
    :func:`fit_state_dict`, which knows the model's names.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: file is not readable (permission denied)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or a pickle weights_only refuses
        kind = "safetensors" if path.suffix == ".safetensors" else "torch.save (weights_only=True)"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot load as {kind}: {reason[:300]}") from None
    if isinstance(raw, Mapping):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            inner = raw.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                raw = inner
                break
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(raw).__name__}")
    tensors = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (keys: {_listing(sorted(map(str, raw)))})")
    return tensors


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _strip_prefix(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Remove the key prefix (``model.``, ``module.``, ``net.``...) that makes most names match."""
    if set(state) & wanted == wanted:
        return state
    candidates = {""}
    for key in state:
        parts = key.split(".")
        candidates.update(".".join(parts[:i]) + "." for i in range(1, len(parts)))

    def score(prefix: str) -> int:
        return sum(1 for k in state if k.startswith(prefix) and k[len(prefix):] in wanted)

    best = max(sorted(candidates), key=lambda p: (score(p), -len(p)))
    if not best or score(best) <= score(""):
        return state
    # Keys outside the prefix (a Lightning module's loss weights, say) are not the model's.
    return {k[len(best):]: v for k, v in state.items() if k.startswith(best)}


def fit_state_dict(
    state: dict[str, torch.Tensor], model: nn.Module, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Match ``state`` to ``model.state_dict()``: strip a prefix, check names, shapes and finiteness.

    Returns the tensors in the model's order, cast to each model tensor's dtype.  Raises
    :class:`CheckpointError` naming the missing, unexpected and mis-shaped keys, or the first
    tensor holding NaN/inf.
    """
    reference = model.state_dict()
    state = _strip_prefix(state, set(reference))
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    misshaped = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(reference[k].shape)})"
        for k in reference
        if k in state and state[k].shape != reference[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_listing(misshaped)}")
    if problems:
        raise CheckpointError(f"{source}: state dict does not fit the model; " + "; ".join(problems))
    fitted = {}
    for k, ref in reference.items():
        t = state[k]
        if t.is_floating_point() or t.is_complex():
            if not bool(torch.isfinite(t).all()):
                bad = "NaN" if bool(torch.isnan(t).any()) else "inf"
                raise CheckpointError(f"{source}: tensor {k!r} contains {bad}; sharpness of a non-finite model is undefined")
        fitted[k] = t.to(ref.dtype) if ref.is_floating_point() else t.to(ref.dtype)
    return fitted


# step/epoch in names such as "epoch=3-step=1200.ckpt", "ckpt_step_500.pt", "model-e07.pt", "iter1000".
_STEP_RE = re.compile(r"(?:^|[^a-z])(?:global_step|step|iter|iteration|it)[=_\-]?(\d+)", re.IGNORECASE)
_EPOCH_RE = re.compile(r"(?:^|[^a-z])(?:epoch|ep|e)[=_\-]?(\d+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"(\d+)")


def parse_step(name: str) -> tuple[int | None, int | None]:
    """``(step, epoch)`` parsed from a checkpoint's file name; ``None`` where absent.

    ``step``/``iter``/``global_step`` and ``epoch``/``ep``/``e`` followed by a number are
    recognised (``=``, ``_``, ``-`` or nothing between).  A name with neither but exactly one
    number (``ckpt_0040.pt``) takes that number as its step.
    """
    stem = Path(name).name
    for suffix in CHECKPOINT_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    step_m, epoch_m = _STEP_RE.search(stem), _EPOCH_RE.search(stem)
    step = int(step_m.group(1)) if step_m else None
    epoch = int(epoch_m.group(1)) if epoch_m else None
    if step is None and epoch is None:
        numbers = _NUMBER_RE.findall(stem)
        if len(numbers) == 1:
            step = int(numbers[0])
    return step, epoch


@dataclass
class Checkpoint:
    """One checkpoint as the audit sees it: where it is, its identity, its parsed position."""

    path: Path
    sha256: str | None = None
    step: int | None = None
    epoch: int | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        return self.path.name


def describe_checkpoint(path: Path) -> Checkpoint:
    """Hash the file and parse its step/epoch; a missing/unreadable file gets ``error`` set."""
    step, epoch = parse_step(path.name)
    ck = Checkpoint(path=path, step=step, epoch=epoch)
    try:
        if path.is_dir():
            raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
        ck.sha256 = file_sha256(path)
    except CheckpointError as exc:
        ck.error = str(exc)
    return ck
