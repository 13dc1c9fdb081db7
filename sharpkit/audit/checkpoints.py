"""Checkpoint files: discovery, formats, content hash, step/epoch parsing, display names, fit
against a model.

Formats (chosen by suffix, then by content):

- ``torch.save`` state dicts (``.pt``, ``.pth``, ``.bin``), always read with ``weights_only=True``;
- safetensors (``.safetensors``);
- Lightning-style ``.ckpt``: a dict whose ``"state_dict"`` entry holds the weights under a prefix
  such as ``"model."`` (stripped automatically, as are DDP's ``"module."`` and torch.compile's
  ``"_orig_mod."``).
- Training scripts' dicts (``.pth.tar`` too): the weights under the first of :data:`WEIGHT_ENTRIES`
  (``"state_dict"``, ``"model_state_dict"``, ``"model"``, ``"net"``, ``"network"``), or under the
  entry the caller names (``entry="model_ema"``).  Other entries holding weights (an EMA copy) are
  listed in :attr:`LoadedCheckpoint.weights`, so that a report says what was measured; the
  ``"epoch"`` and ``"step"``/``"global_step"`` stored beside them are read
  (:attr:`LoadedCheckpoint.saved_step`).  Objects beside the
  weights that weights_only=True refuses to rebuild (a Namespace or a Path in
  ``"hyper_parameters"``) are read as inert stand-ins, their code never run; a file holding a
  whole pickled model is refused with a message saying so.

Every failure is raised as :class:`CheckpointError` with a message naming the file and the
problem, so that the audit can record it in an error row and go on with the other checkpoints.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "CHECKPOINT_SUFFIXES",
    "find_checkpoints",
    "file_sha256",
    "load_state_dict",
    "load_checkpoint",
    "read_checkpoint",
    "LoadedCheckpoint",
    "WEIGHT_ENTRIES",
    "fit_state_dict",
    "parse_step",
    "display_names",
    "error_summary",
]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pth.tar", ".pt.tar")
# Entries of a checkpoint dict that hold the model's weights, the first present taken.
WEIGHT_ENTRIES = ("state_dict", "model_state_dict", "model", "net", "network")
# Entries holding the step / epoch a training script saved beside the weights.
_SAVED_STEP_ENTRIES = ("global_step", "step", "iteration", "iter")
_SAVED_EPOCH_ENTRIES = ("epoch",)

# How many offending keys an error message lists before summarising the rest.
_MAX_LISTED = 6


class CheckpointError(ValueError):
    """A checkpoint that cannot be measured (missing, unreadable, corrupt, not fitting, non-finite)."""


def checkpoint_suffix(path: str | os.PathLike) -> str | None:
    """The checkpoint suffix ``path``'s name ends with (the longest: ``.pth.tar``), in any case;
    None for other files."""
    name = Path(path).name.lower()
    found = [s for s in CHECKPOINT_SUFFIXES if name.endswith(s) and len(name) > len(s)]
    return max(found, key=len) if found else None


def _is_broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def _refuse_broken_link(path: Path) -> None:
    """CheckpointError for a symbolic link whose target is gone (a run's last.ckpt after cleanup)."""
    if _is_broken_link(path):
        raise CheckpointError(f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)")


def _is_checkpoint_file(path: Path) -> bool:
    # A link to a checkpoint that is gone (a run's last.ckpt after cleanup) is listed, so that the
    # audit reports it instead of silently measuring one checkpoint less.
    return (path.is_file() or _is_broken_link(path)) and checkpoint_suffix(path) is not None


def _checkpoints_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_checkpoint_file(p))


def find_checkpoints(specs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files, directories and glob patterns into checkpoint files.

    - A file is taken as given, whatever its suffix.
    - A directory gives its checkpoint files (suffixes ``CHECKPOINT_SUFFIXES``, in any case,
      symbolic links included: a broken one gets an error row); its subdirectories are not
      searched.
    - A glob pattern (``*``, ``?``, ``[...]``; ``**`` matches any number of directories) gives the
      checkpoint files it matches, and those of the directories it matches; other files
      (``log.txt``) are left out, as in a directory.

    A spec that yields no checkpoint file (a missing file, a directory without checkpoint files,
    a pattern matching none) is kept as given, so that the audit reports it in an error row
    (:func:`describe_checkpoint` says why) instead of silently measuring less than was asked.
    Order: as given, each directory's and pattern's files sorted by path; duplicates (same
    absolute path) removed.
    """
    found: list[Path] = []
    for spec in specs:
        spec = os.fspath(spec)
        path = Path(spec)
        if path.is_dir():
            matched = _checkpoints_in(path)
        elif path.exists():
            matched = [path]
        elif glob.has_magic(spec):
            matched = []
            for hit in map(Path, glob.glob(spec, recursive=True)):
                if hit.is_dir():
                    matched += _checkpoints_in(hit)
                elif _is_checkpoint_file(hit):
                    matched.append(hit)
            matched = sorted(set(matched))
        else:
            matched = []
        found += matched or [path]
    seen, unique = set(), []
    for p in found:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


@contextlib.contextmanager
def _reading(path: str | os.PathLike) -> Iterator[None]:
    """Errors of reading ``path`` as :class:`CheckpointError` naming the file and the cause."""
    try:
        yield
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except PermissionError:
        raise CheckpointError(f"{path}: file is not readable (permission denied)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read file ({exc.strerror or exc})") from None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes (the checkpoint's identity in the results store)."""
    digest = hashlib.sha256()
    with _reading(path), open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(path: str | os.PathLike, entry: str | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU.

    Lightning-style files (a dict with ``"state_dict"``) and training scripts' wrappers
    (``{"model": state_dict, "optimizer": ..., "epoch": 3}``, see :data:`WEIGHT_ENTRIES`) are
    unwrapped, or ``entry`` is taken where given; prefixes are stripped later by
    :func:`fit_state_dict`, which knows the model's names.
    """
    return read_checkpoint(path, entry).state


def load_checkpoint(path: str | os.PathLike, entry: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """``(state dict, sha256)`` of :func:`read_checkpoint`."""
    loaded = read_checkpoint(path, entry)
    return loaded.state, loaded.sha256


@dataclass
class LoadedCheckpoint:
    """What :func:`read_checkpoint` read from one file.

    ``state``: the weights; ``sha256``: the hex SHA-256 of the very bytes they were read from;
    ``entry``: the dict entry that held them (None: the file is the state dict itself);
    ``others``: other entries holding weights, not taken (an EMA copy: ``"model_ema"``);
    ``saved_step``/``saved_epoch``: the step and epoch stored beside the weights (None where absent).
    """

    state: dict[str, torch.Tensor]
    sha256: str
    entry: str | None = None
    others: tuple[str, ...] = ()
    saved_step: int | None = None
    saved_epoch: int | None = None

    @property
    def weights(self) -> str | None:
        """Where the weights were taken from, in words; None for a file that is a state dict."""
        if self.entry is None:
            return None
        text = f"entry {self.entry!r}"
        if self.others:
            text += f" (also in the file, not measured: {', '.join(map(repr, self.others))})"
        return text


def read_checkpoint(path: str | os.PathLike, entry: str | None = None) -> LoadedCheckpoint:
    """Read the weights of a checkpoint file, and what the file says about them.

    The file is read once and hashed from those bytes, so that a file rewritten after it was hashed
    (a training run still writing ``last.ckpt``) is never keyed by its former content.

    ``entry``: the entry of a checkpoint dict holding the weights to measure (``"model_ema"``);
    default None: the first of :data:`WEIGHT_ENTRIES` present, or the file itself where it is a
    state dict.  A file without that entry is a :class:`CheckpointError` listing the entries it has.
    """
    path = Path(path)
    _refuse_broken_link(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: file is not readable (permission denied)")
    with _reading(path):
        data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    try:
        loaded = _parse_checkpoint(path, data, entry)
    except CheckpointError as exc:
        exc.sha256 = sha  # the content the error belongs to
        raise
    loaded.sha256 = sha
    return loaded


def _parse_checkpoint(path: Path, data: bytes, entry: str | None = None) -> LoadedCheckpoint:
    is_safetensors = checkpoint_suffix(path) == ".safetensors"
    try:
        if is_safetensors:
            from safetensors.torch import load

            raw = load(data)
        else:
            raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or a pickle weights_only refuses
        kind = "safetensors" if is_safetensors else "torch.save (weights_only=True)"
        reason = error_summary(exc)
        if not is_safetensors:
            raw = _load_without_objects(data)
            pickled = _pickled_model(raw, entry)
            if pickled is not None:  # torch.save(model) or {"model": model}: the object, no state dict
                reason = (f"the file pickles a {pickled} not a state dict (weights_only=True does not "
                          "run the code that would rebuild it); save model.state_dict() instead")
            elif raw is not None:
                found = _weights(path, raw, entry, missing_ok=True)
                if found is not None:  # the weights beside objects the audit does not need
                    return found
        raise CheckpointError(f"{path}: cannot load as {kind}: {reason}") from None
    return _weights(path, raw, entry)


def _pickled_model(raw, entry: str | None) -> str | None:
    """How a whole pickled object stands where the weights should be (``"torch.nn...Sequential
    object,"`` / ``"...Sequential object under 'model',"``), or None."""
    if isinstance(raw, _Opaque):
        return f"{raw._global} object,"
    if isinstance(raw, Mapping):
        for name in (entry,) if entry is not None else WEIGHT_ENTRIES:
            if isinstance(raw.get(name), _Opaque):
                return f"{raw[name]._global} object under {name!r},"
    return None


def _is_weights(value) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _saved_count(raw: Mapping, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = raw.get(name)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value.item())
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _weights(path: Path, raw, entry: str | None, missing_ok: bool = False) -> LoadedCheckpoint | None:
    """The weights of a loaded file: the entry named, the first of :data:`WEIGHT_ENTRIES`, or the
    file's own tensors; with the other entries that hold weights, and the saved step and epoch."""
    if isinstance(raw, Mapping) and (entry is not None or any(_is_weights(raw.get(w)) for w in WEIGHT_ENTRIES)):
        if entry is None:
            entry = next(w for w in WEIGHT_ENTRIES if _is_weights(raw.get(w)))
        elif not _is_weights(raw.get(entry)):
            if missing_ok:
                return None
            holding = [str(k) for k, v in raw.items() if _is_weights(v)]
            what = "no entry" if entry not in raw else "an entry that holds no weights,"
            raise CheckpointError(
                f"{path}: {what} {entry!r} (entries holding weights: {', '.join(map(repr, holding)) or 'none'}; "
                f"all entries: {_listing(sorted(map(str, raw)))})"
            )
        others = tuple(str(k) for k, v in raw.items() if k != entry and _is_weights(v))
        return LoadedCheckpoint(
            _tensors(path, raw[entry]), "", entry, others,
            _saved_count(raw, _SAVED_STEP_ENTRIES), _saved_count(raw, _SAVED_EPOCH_ENTRIES),
        )
    if entry is not None:
        if missing_ok:
            return None
        raise CheckpointError(f"{path}: no entry {entry!r}: the file is not a dict of entries "
                              f"(found {type(raw).__name__})")
    if missing_ok:  # (objects beside tensors at the top: not a state dict the audit can trust)
        return None
    return LoadedCheckpoint(_tensors(path, raw), "")


class _Opaque:
    """An inert stand-in for a pickled object weights_only=True refuses to rebuild (a Namespace of
    hyper-parameters beside a Lightning state dict): made from nothing, running none of its code."""

    _global = "object"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _load_without_objects(data: bytes):
    """The torch.save file with each global weights_only=True refuses replaced by an inert
    :class:`_Opaque` (still weights_only: nothing of the file's code runs); None where that fails.
    A Lightning checkpoint whose ``hyper_parameters`` hold a Namespace, an enum, a Path or a loss
    module keeps its state dict; a whole pickled model comes back as one ``_Opaque``."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:  # torch < 2.6
        return None
    try:
        names = finder(io.BytesIO(data))
        stubs = [(type(name.rpartition(".")[2] or name, (_Opaque,), {"_global": name}), name) for name in names]
        if not stubs:
            return None
        with torch.serialization.safe_globals(stubs):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:
        return None


def _tensors(path: Path, raw) -> dict[str, torch.Tensor]:
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(raw).__name__}")
    tensors = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        if {"state", "param_groups"} <= set(raw):  # the optimizer.pt beside a Hugging Face checkpoint
            raise CheckpointError(f"{path}: holds an optimizer's state (param_groups, state), not a model's weights")
        raise CheckpointError(f"{path}: holds no tensors (keys: {_listing(sorted(map(str, raw)))})")
    return tensors


# Terminal escapes (torch bolds part of its weights_only message) would leak into reports.
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The reason in torch's weights_only refusal follows this marker; the text before it is advice.
_UNPICKLER_MARKER = "WeightsUnpickler error:"


def error_summary(exc: BaseException, limit: int = 300) -> str:
    """The informative part of an exception's message (a loader's, torch's), as one line.

    Terminal escapes are removed; of torch's weights_only refusal only the reason is kept (the
    rest is advice); otherwise the first sentence (torch follows it with generic hints).
    """
    text = _ANSI_RE.sub("", str(exc)).strip()
    if _UNPICKLER_MARKER in text:
        text = text.split(_UNPICKLER_MARKER, 1)[1].strip()
    # A sentence ends at a line break or at ". " after a word (not after an initial like "e.g.").
    first = re.split(r"\n|(?<=[^.\s]{2})\.\s", text, maxsplit=1)[0].strip().rstrip(".")
    return (first or type(exc).__name__)[:limit]


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _strip_prefix(state: dict[str, torch.Tensor], wanted: set[str], source: str) -> tuple[dict[str, torch.Tensor], str]:
    """Remove the key prefix (``model.``, ``module.``, ``net.``...) that makes most names match:
    ``(state, prefix removed)``.

    Raises :class:`CheckpointError` when several prefixes match equally well (a Lightning
    checkpoint holding ``model.`` and ``ema.`` copies): measuring either silently could measure
    the wrong weights.
    """
    if set(state) & wanted == wanted:
        return state, ""
    candidates = {""}
    for key in state:
        parts = key.split(".")
        candidates.update(".".join(parts[:i]) + "." for i in range(1, len(parts)))
    scores = {p: sum(1 for k in state if k.startswith(p) and k[len(p):] in wanted) for p in candidates}
    top = max(scores.values())
    if top <= scores[""]:
        return state, ""
    best = sorted(p for p, s in scores.items() if s == top)
    if len(best) > 1:
        raise CheckpointError(
            f"{source}: the model's weights appear under several prefixes ({', '.join(map(repr, best))}), "
            "equally well matched; save the copy to measure on its own"
        )
    # Keys outside the prefix (a Lightning module's loss weights, say) are not the model's.
    return {k[len(best[0]):]: v for k, v in state.items() if k.startswith(best[0])}, best[0]


def fit_state_dict(
    state: dict[str, torch.Tensor], model: nn.Module, source: str = "checkpoint", data_classes: int | None = None,
    notes: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Match ``state`` to ``model.state_dict()``: strip a prefix, check names, shapes and finiteness.

    Returns the tensors in the model's order, cast to each model tensor's dtype.  A BatchNorm
    ``num_batches_tracked`` the checkpoint lacks (older torch, or weights saved without it) takes
    the model's value, as ``load_state_dict(strict=True)`` does: it never changes the loss.
    Raises :class:`CheckpointError` naming the missing, unexpected and mis-shaped keys, or the
    first tensor holding NaN/inf.

    ``data_classes``: the classes the model was built for when they were counted from the data's
    labels (default None: not); a mis-shaped key with that many rows in the model gets the error
    to say so, since the data, not the checkpoint, then chose the output layer's size.

    ``notes``: where given, a list that gets what was done to the names (``"prefix 'module.'
    removed"``), so that a report can say how the weights were matched.
    """
    reference = model.state_dict()
    state, prefix = _strip_prefix(state, set(reference), source)
    if prefix and notes is not None:
        notes.append(f"prefix {prefix!r} removed")
    state = {**{k: reference[k].clone() for k in reference if k not in state and _is_batch_count(k, model)}, **state}
    # A tied tensor saved under one of its names (safetensors' save_model keeps one name per
    # tensor): its other names take that value, as loading it into the model would.
    for names in _tied_names(model):
        present = [k for k in names if k in state]
        state.update({k: state[present[0]] for k in names if present and k not in state})
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
        if data_classes is not None and any(
            reference[k].shape[:1] == (data_classes,) != state[k].shape[:1]
            for k in reference if k in state and state[k].shape != reference[k].shape
        ):
            problems.append(f"the model was built for {data_classes} classes found in the data's labels")
    reparametrized = [k for k in (*missing, *unexpected) if ".parametrizations." in k or k.endswith(("weight_g", "weight_v"))]
    if missing and unexpected and reparametrized:
        # weight_norm/spectral_norm store a weight as other tensors (original0/1, weight_g/v).
        side = "checkpoint" if any(k in unexpected for k in reparametrized) else "model"
        problems.append(f"the {side} has reparametrized weights ({reparametrized[0]}): build the model with the same "
                        "torch.nn.utils.parametrizations (weight_norm, spectral_norm) the checkpoint was saved from")
    if problems:
        raise CheckpointError(f"{source}: state dict does not fit the model; " + "; ".join(problems))
    fitted = {}
    for k, ref in reference.items():
        t = state[k]
        if t.is_floating_point() or t.is_complex():
            if not bool(torch.isfinite(t).all()):
                bad = "NaN" if bool(torch.isnan(t).any()) else "inf"
                raise CheckpointError(f"{source}: tensor {k!r} contains {bad}; sharpness of a non-finite model is undefined")
        fitted[k] = t.to(ref.dtype)
    # Names of one tensor (tied weights) must hold one value: loading would keep the last name's,
    # a stacked audit the first name's.
    for first, *others in _tied_names(model):
        for k in others:
            if not torch.equal(state[first], state[k]):
                raise CheckpointError(
                    f"{source}: {first!r} and {k!r} are one tensor in the model (tied) but differ in the checkpoint"
                )
    return fitted


def _tied_names(model: nn.Module) -> list[list[str]]:
    """The state-dict names of each tensor the model holds under several names (tied weights), in
    state-dict order."""
    names: dict[int, list[str]] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), []).append(k)
    return [group for group in names.values() if len(group) > 1]


def _is_batch_count(key: str, model: nn.Module) -> bool:
    """Whether ``key`` is a BatchNorm layer's ``num_batches_tracked`` buffer (torch fills it in when a
    state dict lacks it; only the running averages' momentum=None mode reads it, which sharpkit
    never updates)."""
    prefix, _, name = key.rpartition(".")
    if name != "num_batches_tracked":
        return False
    try:
        return isinstance(model.get_submodule(prefix), nn.modules.batchnorm._NormBase)
    except AttributeError:
        return False


# step/epoch in names such as "epoch=3-step=1200.ckpt", "ckpt_step_500.pt", "model-e07.pt", "iter1000",
# "weights.epoch.3.pt": a keyword, then "=", "_", "-", "." or nothing, then the number.
_STEP_RE = re.compile(r"(?<![a-z])(?:global_step|step|iteration|iter|it)[=_\-.]?(\d+)", re.IGNORECASE)
_EPOCH_RE = re.compile(r"(?<![a-z])(?:epoch|ep)[=_\-.]?(\d+)", re.IGNORECASE)
# A bare "e" ("model-e07", "model.e5") only after a separator: "lr1e", "2.5e" and "1.e" begin exponents.
# Its number must end the word: "e12ab" is not epoch 12.
_BARE_EPOCH_RE = re.compile(r"(?<![a-z0-9])(?<!\d\.)e[=_\-.]?(\d+)(?![a-z0-9])", re.IGNORECASE)
# Hugging Face's "checkpoint-500/" directories.
_CHECKPOINT_DIR_RE = re.compile(r"(?<![a-z])(?:checkpoint|ckpt)[=_\-.]?(\d+)", re.IGNORECASE)
# Scientific notation (lr1e-3, wd5e-4, 2.5E+2, 1.e-3) is a hyper-parameter, never a step or an epoch.
_SCIENTIFIC_RE = re.compile(r"\d(?:\.\d*)?e[-+]?\d+", re.IGNORECASE)
# A hexadecimal hash or id of 8+ characters with digits and letters ("f1-b320-s0-fc2e6e997992ccb6",
# a study's run folder) holds no step or epoch, whatever its "2e6" or "e99" look like.
_HASH_RE = re.compile(r"(?<![a-z0-9])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{8,}(?![a-z0-9])", re.IGNORECASE)


def _without_numbers_that_are_not_counts(text: str) -> str:
    return _SCIENTIFIC_RE.sub("_", _HASH_RE.sub("_", text))
# A number standing alone ("ckpt_0040", "0040") or after "checkpoint"/"ckpt" ("ckpt0040"); one
# glued to another word names the model or a version, not a step ("resnet18", "v3").
_NUMBER_RE = re.compile(r"(?:(?<=checkpoint)|(?<=ckpt)|(?<![a-z0-9]))(\d+)", re.IGNORECASE)


def _search(pattern: re.Pattern, text: str) -> int | None:
    m = pattern.search(text)
    return int(m.group(1)) if m else None


def _keywords(text: str, directory: bool = False) -> tuple[int | None, int | None]:
    """``(step, epoch)`` named by keywords in one path component."""
    text = _without_numbers_that_are_not_counts(text)
    step = _search(_STEP_RE, text)
    if step is None and directory:
        step = _search(_CHECKPOINT_DIR_RE, text)
    epoch = _search(_EPOCH_RE, text)
    if epoch is None:
        epoch = _search(_BARE_EPOCH_RE, text)
    return step, epoch


def parse_step(path: str | os.PathLike) -> tuple[int | None, int | None]:
    """``(step, epoch)`` of a checkpoint from its path; ``None`` where absent.

    Each of the two is taken from the first of these that gives it:

    1. the file name's keywords: ``step``/``iter``/``it``/``global_step`` and ``epoch``/``ep``/``e``
       followed by a number (``=``, ``_``, ``-``, ``.`` or nothing between: ``epoch=3``,
       ``weights.epoch.3``; scientific notation such as ``lr1e-3`` is skipped, and a bare ``e``
       counts only after a separator: ``model-e07``, ``model.e5``);
    2. the same keywords, or ``checkpoint``/``ckpt`` for the step, in the parent directory's name
       (``checkpoint-500/pytorch_model.bin``, ``epoch_3/step_100.pt``);

    and, when the file name holds no keyword, the step from

    3. the file name's only number (``ckpt_0040.pt``, ``0040.pt``, ``ckpt0040.pt``,
       ``epoch_3/ckpt_000100.pt``), counting only numbers not glued to a word other than
       ``checkpoint``/``ckpt``: the 18 of ``resnet18.pt`` and the 3 of ``model_v3.pt`` name the
       model, not a step;
    4. a parent directory named by a number alone (``000500/model.pt``).

    Keywords in the file name win over its directory: in ``runs/2/epoch_1.pt`` the 2 is not read,
    and in ``epoch_5/epoch_1.pt`` the epoch is 1.
    """
    path = Path(path)
    stem = path.name
    suffix = checkpoint_suffix(path)
    if suffix is not None:  # (both parts of "checkpoint_3.pth.tar")
        stem = stem[: -len(suffix)]
    parent = path.parent.name
    step, epoch = _keywords(stem)
    name_has_keywords = step is not None or epoch is not None
    if parent:
        parent_step, parent_epoch = _keywords(parent, directory=True)
        step = parent_step if step is None else step
        epoch = parent_epoch if epoch is None else epoch
    if step is None and not name_has_keywords:
        numbers = _NUMBER_RE.findall(_without_numbers_that_are_not_counts(stem))
        if len(numbers) == 1:
            step = int(numbers[0])
        elif parent.isdigit():
            step = int(parent)
    return step, epoch


def display_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The shortest path suffixes that tell ``paths`` apart, all with the same number of parts.

    One file, or files of one directory: their names.  ``runs/sb/epoch_1.pt`` beside
    ``runs/lb/epoch_1.pt``: ``sb/epoch_1.pt`` and ``lb/epoch_1.pt`` (and ``sb/epoch_2.pt``, so
    that every row says which run it belongs to).
    """
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    depth = 1
    while len({q[-depth:] for q in parts}) < len(parts) and any(len(q) > depth for q in parts):
        depth += 1
    return [os.path.join(*q[-depth:]) for q in parts]


@dataclass
class Checkpoint:
    """One checkpoint as the audit sees it: where it is, how reports name it, its identity, its
    parsed position, and why it cannot be measured (``error``)."""

    path: Path
    name: str = ""
    sha256: str | None = None
    step: int | None = None
    epoch: int | None = None
    error: str | None = None

    def __post_init__(self):
        self.name = self.name or self.path.name


def describe_checkpoint(path: Path, name: str | None = None) -> Checkpoint:
    """Hash the file and parse its step/epoch; a missing/unreadable file gets ``error`` set.

    ``name``: how reports call it (default: the file name; see :func:`display_names`).  A path
    that is a directory or a glob pattern is what :func:`find_checkpoints` kept when it yielded no
    checkpoint file; the error says so.
    """
    step, epoch = parse_step(os.path.abspath(path))
    ck = Checkpoint(path=path, name=name or "", step=step, epoch=epoch)
    suffixes = ", ".join(CHECKPOINT_SUFFIXES)
    try:
        _refuse_broken_link(path)
        if path.is_dir():
            raise CheckpointError(
                f"{path}: directory holds no checkpoint files ({suffixes}); its subdirectories are not "
                f"searched: name them, or use a pattern such as '{path / '*'}'"
            )
        if not path.exists() and glob.has_magic(str(path)):
            raise CheckpointError(f"{path}: pattern matches no checkpoint file ({suffixes})")
        ck.sha256 = file_sha256(path)
    except CheckpointError as exc:
        ck.error = str(exc)
    return ck
