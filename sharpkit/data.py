"""Batches, weighted means, and the embedded data sets.

sharpkit's objective is always the mean loss over all of ``data``:
``f = sum_b w_b * loss_fn(model(X_b), Y_b) / sum_b w_b`` with ``loss_fn`` mean-reduced and
``w_b`` the batch's samples, so an uneven last batch is weighted exactly (for cross-entropy with
class weights or ignored targets, ``w_b`` is the sum the batch's mean divides by:
:class:`sharpkit.objective.DataWeights`).  ``data`` is a ``(inputs, targets)`` tuple of tensors or
any re-iterable of such batches (a DataLoader, a list).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from .files import atomic_save_npz

__all__ = [
    "Batches",
    "BatchSurvey",
    "as_batches",
    "survey_batches",
    "check_finite_inputs",
    "regrouped_count",
    "load_mnist1d",
    "load_digits",
    "load_tensor_file",
    "TensorDataset",
    "regroup_batches",
    "class_index_targets",
    "check_fixed_samples",
    "random_order",
]

Batch = tuple[torch.Tensor, torch.Tensor]


class Batches:
    """A re-iterable view of ``data`` as ``(inputs, targets)`` batches, with sample counts.

    A single ``(X, Y)`` pair becomes one batch, or batches of ``batch_size`` rows when given.
    A one-shot iterator (a generator) is read once into memory so that it can be replayed;
    re-iterables (DataLoader, list) are iterated afresh on every pass.  Integer targets are
    yielded as int64 (:func:`class_index_targets`), and inputs or targets that carry an autograd
    graph without it.  A DataLoader that draws other samples on every pass (with replacement, or
    shuffled with ``drop_last=True`` and an incomplete last batch) is refused when iterated
    (:func:`check_fixed_samples`): no measurement over it would be a function of the parameters.
    """

    # This process's share under torch.distributed: (rank, world_size), or None for all the data.
    _shard: tuple[int, int] | None = None
    # True when the source already is this rank's part (user-sharded); iterated as given.
    _presharded: bool = False
    # Never split a batch between ranks (batch statistics matter).
    _keep_batches: bool = False
    # The source was a one-shot iterator, read into memory here (an empty one may have been used up).
    _one_shot: bool = False

    def __init__(self, data: Any, batch_size: int | None = None):
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(data, Batches):
            if batch_size is not None:
                if data.is_sharded:
                    raise ValueError("sharded batches cannot be split again: give batch_size before sharding")
                self._source, self._split = data, batch_size  # its batches, split into batch_size rows
                return
            self._source, self._split, self._one_shot = data._source, data._split, data._one_shot
            self._shard, self._presharded, self._keep_batches = data._shard, data._presharded, data._keep_batches
            return
        _check_data_kind(data)
        if _is_tensor_pair(data):
            x, y = data
            if x.dim() == 0 or y.dim() == 0:
                raise ValueError(f"inputs and targets need a first (sample) dimension, got shapes {tuple(x.shape)} "
                                 f"and {tuple(y.shape)}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"inputs and targets disagree on the number of samples: {x.shape[0]} vs {y.shape[0]}"
                )
            # (converted once, not per pass)
            self._source: Iterable = [(_constant(x), class_index_targets(_constant(y)))]
            self._split = batch_size
        elif isinstance(data, Iterable):
            self._one_shot = iter(data) is data
            self._source = list(data) if self._one_shot else data
            self._split = batch_size
        else:
            raise TypeError(
                f"data must be an (inputs, targets) tuple of tensors or an iterable of batches, got {type(data).__name__}"
            )

    def single_pair(self) -> Batch | None:
        """The one ``(X, Y)`` pair these batches are, given without ``batch_size`` (sharding splits
        its rows across ranks, see :meth:`shard`), else None."""
        if self._split is None and isinstance(self._source, list) and len(self._source) == 1 \
                and _is_tensor_pair(self._source[0]):
            return self._source[0]
        return None

    @property
    def is_sharded(self) -> bool:
        """True when iteration yields only this rank's share of the data (see :meth:`shard`);
        sums over such batches must be reduced across ranks
        (:func:`sharpkit.distributed.sharded_pass`)."""
        return self._shard is not None

    def shard(self, rank: int, world_size: int, presharded: bool = False, keep_batches: bool = False) -> "Batches":
        """The share of rank ``rank`` among ``world_size`` processes, as new :class:`Batches`.

        Batch ``j`` of the full sequence (after ``batch_size`` splitting, empty batches skipped)
        goes to rank ``j % world_size``, whole; a single ``(X, Y)`` pair without ``batch_size`` is
        split by rows into ``world_size`` contiguous parts instead, unless ``keep_batches`` (where
        the samples of a batch interact, as with BatchNorm's batch statistics: splitting a batch
        would change the objective).  No
        sample is repeated or dropped; a shard may be empty (iterating it then yields nothing
        rather than raising).  ``presharded=True`` declares the source to be this rank's part
        already (iterated as is).
        """
        if not (isinstance(world_size, int) and world_size >= 1):
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        if self._shard is not None:
            raise ValueError("these batches are already sharded")
        out = Batches(self)
        out._shard, out._presharded, out._keep_batches = (rank, world_size), presharded, keep_batches
        return out

    def __iter__(self) -> Iterator[Batch]:
        if self._shard is None or self._presharded:
            yield from self._iter_all(allow_empty=self._presharded)
            return
        rank, world = self._shard
        if not self._keep_batches and self.single_pair() is not None:
            # One (X, Y) pair: split its rows, so that every rank gets work.
            for x, y in self._iter_all(allow_empty=True):
                n = x.shape[0]
                lo, hi = rank * n // world, (rank + 1) * n // world
                if hi > lo:
                    yield x[lo:hi], y[lo:hi]
            return
        for j, batch in enumerate(self._iter_all(allow_empty=True)):
            if j % world == rank:
                yield batch

    def _iter_all(self, allow_empty: bool = False) -> Iterator[Batch]:
        seen = False
        check_fixed_samples(self._source)
        for i, batch in enumerate(self._source):
            if not _is_tensor_pair(batch):
                what = type(batch).__name__
                if isinstance(batch, Mapping):
                    what += f" with keys {sorted(map(str, batch))}: map each batch to (inputs, targets)"
                elif isinstance(batch, (tuple, list)):
                    what += f" of {len(batch)}: " + ", ".join(type(b).__name__ for b in batch)
                raise TypeError(f"batch {i} is not an (inputs, targets) pair of tensors (got {what})")
            # Data are constants of every measurement: inputs or targets that carry a graph (a
            # teacher's outputs) must not be differentiated through, nor modified in place.
            x, y = _constant(batch[0]), _constant(batch[1])
            if x.dim() == 0 or y.dim() == 0:
                raise ValueError(f"batch {i}: inputs and targets need a first (sample) dimension, got shapes "
                                 f"{tuple(x.shape)} and {tuple(y.shape)}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"batch {i}: inputs have {x.shape[0]} samples but targets {y.shape[0]}")
            if x.shape[0] == 0:
                continue
            y = class_index_targets(y)
            if self._split is None:
                seen = True
                yield x, y
            else:
                for s in range(0, x.shape[0], self._split):
                    seen = True
                    yield x[s : s + self._split], y[s : s + self._split]
        if not seen and not allow_empty:
            if self._one_shot and not self._source:
                raise ValueError("data is empty: the iterator yielded no batches (a generator or iterator can be "
                                 "read only once: was it used up before?  Pass a list or a DataLoader to measure "
                                 "the same data again)")
            raise ValueError("data is empty: it holds no samples")

    def num_samples(self) -> int:
        """Total number of samples (one pass over the data; this rank's share when sharded —
        :func:`sharpkit.distributed.count_samples` gives the total over all ranks)."""
        return sum(x.shape[0] for x, _ in self)

    def materialize(self, max_samples: int | None = None) -> Batch:
        """All batches concatenated into one ``(X, Y)`` pair (for data that fit in memory); with
        ``max_samples``, only the first that many samples (reading no further batch than needed)."""
        xs, ys, count = [], [], 0
        for x, y in self:
            if max_samples is not None and count + x.shape[0] > max_samples:
                x, y = x[: max_samples - count], y[: max_samples - count]
            xs.append(x)
            ys.append(y)
            count += x.shape[0]
            if max_samples is not None and count >= max_samples:
                break
        return torch.cat(xs), torch.cat(ys)


def as_batches(data: Any, batch_size: int | None = None) -> Batches:
    """Wrap ``data`` as :class:`Batches` (idempotent)."""
    return data if isinstance(data, Batches) and batch_size is None else Batches(data, batch_size)


@dataclass(frozen=True)
class BatchSurvey:
    """What one read of :class:`Batches` finds (this rank's batches when they are sharded).

    Attributes:
        sizes: samples in each batch, in iteration order (empty batches are skipped by
            :class:`Batches`, so every size is at least 1).
        layouts: for each batch, a number that is equal for two batches exactly when
            :func:`regroup_batches` may join them (same per-sample shapes, dtypes and devices).
        largest: the first of the batches with the most samples (None when there is none: an
            empty shard).
        input_shape: the shape of the first batch's inputs, samples first (None when no batch).
        weights: each batch's weight in the objective, as the survey's ``weigh`` gave it (the
            batch's samples where none was given; see :class:`sharpkit.objective.DataWeights`).
        head: the first two batches (fewer when there are fewer).
    """

    sizes: tuple[int, ...]
    layouts: tuple[int, ...]
    largest: Batch | None
    input_shape: tuple[int, ...] | None
    weights: tuple[float, ...] = ()
    head: tuple[Batch, ...] = ()

    @property
    def num_batches(self) -> int:
        """Number of batches."""
        return len(self.sizes)

    @property
    def num_samples(self) -> int:
        """Samples in all the batches together."""
        return sum(self.sizes)

    @property
    def largest_size(self) -> int:
        """Samples in the largest batch (0 when there is no batch)."""
        return max(self.sizes, default=0)

    def regrouped_count(self, rows: int) -> int:
        """Number of passes :func:`regroup_batches` makes of these batches with ``rows`` samples
        at most per pass (computed from the sizes, without reading the data)."""
        return regrouped_count(self.sizes, rows, self.layouts)


def check_finite_inputs(inputs: Any, index: int) -> None:
    """``ValueError`` naming batch ``index`` where floating ``inputs`` hold NaN or inf: every loss,
    gradient and product over them would be non-finite."""
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        bad = "NaN" if bool(torch.isnan(inputs).any()) else "inf"
        raise ValueError(f"the data's inputs hold {bad} (batch {index}, counting from 0): every loss and "
                         "product over them would be non-finite")


def survey_batches(batches: Batches, weigh: Callable[[Batch], float] | None = None) -> BatchSurvey:
    """Survey ``batches`` in one read: every batch's size, layout and weight (``weigh(batch)``,
    default its samples), the largest batch and the first batch's input shape.  Raises like
    iteration does (empty data that are not a shard), and ValueError for floating inputs holding
    NaN or inf."""
    weights: list[float] = []
    sizes: list[int] = []
    head: list[Batch] = []
    layouts: list[int] = []
    seen: dict[tuple, int] = {}
    largest: Batch | None = None
    input_shape: tuple[int, ...] | None = None
    for x, y in batches:
        check_finite_inputs(x, len(sizes))  # (targets may hold NaN: a loss can mask missing labels)
        sizes.append(x.shape[0])
        if len(head) < 2:
            head.append((x, y))
        layouts.append(seen.setdefault(_layout(x, y), len(seen)))
        weights.append(float(x.shape[0]) if weigh is None else weigh((x, y)))
        if largest is None:
            input_shape = tuple(x.shape)
        if largest is None or x.shape[0] > largest[0].shape[0]:
            largest = (x, y)
    return BatchSurvey(tuple(sizes), tuple(layouts), largest, input_shape, tuple(weights), tuple(head))


class _Regrouped:
    """The batches of ``source`` regrouped into chunks of at most ``rows`` samples: consecutive
    small batches concatenated, large ones split.  Lazy and re-iterable (one chunk at a time)."""

    def __init__(self, source: Batches, rows: int):
        self.source, self.rows = source, rows

    def __iter__(self):
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        held, held_layout = 0, None
        for x, y in self.source:
            layout = _layout(x, y)
            for s in range(0, x.shape[0], self.rows):
                px, py = x[s : s + self.rows], y[s : s + self.rows]
                if xs and not (held + px.shape[0] <= self.rows and layout == held_layout):
                    yield _concat(xs, ys)
                    xs, ys, held = [], [], 0
                held_layout = layout
                xs.append(px)
                ys.append(py)
                held += px.shape[0]
        if xs:
            yield _concat(xs, ys)


def _layout(x: torch.Tensor, y: torch.Tensor) -> tuple:
    """Per-sample shapes, dtypes and devices of a batch: ``torch.cat`` joins batches of equal
    layouts along the samples without changing either."""
    return (x.shape[1:], x.dtype, x.device, y.shape[1:], y.dtype, y.device)


def regrouped_count(sizes: Sequence[int], rows: int, layouts: Sequence[int] | None = None) -> int:
    """Number of passes :func:`regroup_batches` makes, with at most ``rows`` samples each, of
    batches of ``sizes`` samples (``layouts``: one number per batch, batches of different numbers
    are never joined; None: all joinable), without reading any batch.

    The same rule as the regrouping: a batch is cut into pieces of ``rows`` samples (the last
    smaller); a piece joins the pass being filled when it fits and has the same layout, else
    that pass is closed and the piece starts the next.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    closed, held, held_layout = 0, 0, None
    for i, size in enumerate(sizes):
        if size < 1:
            continue
        layout = None if layouts is None else layouts[i]
        if held and (held + min(size, rows) > rows or layout != held_layout):
            closed, held = closed + 1, 0
        pieces = -(-size // rows)
        # Every piece after the first closes the pass before it (a whole piece of rows fills one).
        closed += pieces - 1
        held = held + size if pieces == 1 else size - (pieces - 1) * rows
        held_layout = layout
    return closed + (held > 0)


def _concat(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))


def regroup_batches(batches: Batches, rows: int) -> Batches:
    """``batches`` as chunks of at most ``rows`` samples (small batches joined, large ones split).

    Only for objectives whose samples do not interact (no batch statistics) and whose loss is a
    (weighted) per-sample mean: the weighted sums are then the same (to float rounding) while
    fewer, larger passes cost less per sample.  A rank's share stays marked as such.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    regrouped = _Regrouped(batches, rows)
    if batches.is_sharded:
        from .distributed import local_data

        return local_data(regrouped)
    return Batches(regrouped)


def _constant(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its graph where it has one (else ``t`` itself)."""
    return t.detach() if t.requires_grad else t


def class_index_targets(targets: Any) -> Any:
    """``targets`` as int64 where they are integer targets of another dtype (uint8, int8, int16,
    int32, ...); floating (MSE, probabilities), bool and int64 targets, and non-tensors, unchanged.

    The one place class-index targets get the dtype every consumer expects: :class:`Batches`
    applies it to each batch it yields, so that the objective, its sample weights, the curvature
    engines (generic and fused), sharpness, landscapes and audits all see int64 class indices.
    Cross-entropy/NLL take uint8 indices but a uint8 compares with ``ignore_index=-100`` as 156,
    gathers and one-hot encodings need int64 indices, and a uint8 index tensor indexes as a mask;
    int8/int16/int32 indices cross-entropy refuses.  Integer values are kept exactly."""
    if isinstance(targets, torch.Tensor) and targets.dtype not in (torch.int64, torch.bool) \
            and not targets.is_floating_point() and not targets.is_complex():
        return targets.long()
    return targets


def _check_data_kind(data: Any) -> None:
    """TypeError for ``data`` that iteration would misread: a dict (its keys), a single tensor (its
    rows), a pair of arrays that are not tensors."""
    if isinstance(data, Mapping):
        raise TypeError(f"data is a {type(data).__name__} (keys {sorted(map(str, data))}): give an (inputs, "
                        "targets) pair of tensors or an iterable of such batches")
    if isinstance(data, torch.Tensor):
        raise TypeError(f"data is one tensor of shape {tuple(data.shape)}: give an (inputs, targets) pair of "
                        "tensors or an iterable of such batches")
    if isinstance(data, (tuple, list)) and len(data) == 2 and not any(isinstance(d, (tuple, list)) for d in data) \
            and any(isinstance(d, np.ndarray) for d in data):
        raise TypeError(f"data is a pair of {type(data[0]).__name__} and {type(data[1]).__name__}: sharpkit takes "
                        "tensors (torch.as_tensor converts arrays)")


# Samplers that draw a random order (a new one on every pass).
_RANDOM_SAMPLERS = (torch.utils.data.RandomSampler, torch.utils.data.SubsetRandomSampler,
                    torch.utils.data.WeightedRandomSampler)


def _samplers(source: Any) -> list:
    """The samplers of a DataLoader (its sampler, its batch sampler and the sampler inside that)."""
    samplers, todo = [], [getattr(source, "sampler", None), getattr(source, "batch_sampler", None)]
    while todo:
        s = todo.pop()
        if s is not None and not any(s is f for f in samplers):
            samplers.append(s)
            todo.append(getattr(s, "sampler", None))
    return samplers


def random_order(data: Any) -> str | None:
    """The name of the sampler that orders ``data`` (a DataLoader, or :class:`Batches` of one) at
    random, a new order on every pass, or None."""
    while isinstance(data, Batches):
        data = data._source
    return next((type(s).__name__ for s in _samplers(data) if isinstance(s, _RANDOM_SAMPLERS)), None)


def check_fixed_samples(source: Any) -> None:
    """ValueError where a DataLoader yields other samples on every pass, so that no measurement over
    it is a function of the parameters: a sampler that draws with replacement or a random subset
    (``WeightedRandomSampler``, ``RandomSampler(replacement=True)`` or with ``num_samples``), or a
    random order with ``drop_last=True`` that leaves out another remainder each pass.  A shuffled
    order of all the samples is fine (the sums do not depend on the order) unless the samples of a
    batch interact (BatchNorm's batch statistics: :class:`sharpkit.objective.Objective` refuses it)."""
    for s in _samplers(source):
        if isinstance(s, torch.utils.data.WeightedRandomSampler) or (
                isinstance(s, torch.utils.data.RandomSampler)
                and (s.replacement or (s._num_samples is not None and s._num_samples != len(s.data_source)))):
            raise ValueError(f"the data's DataLoader draws its samples at random on every pass ({type(s).__name__}"
                             f"{' with replacement' if getattr(s, 'replacement', False) else ''}), so every "
                             "evaluation would see other samples: give a loader over a fixed set of samples "
                             "(shuffle=False, or shuffle=True without a sampler)")
    batch_sampler = getattr(source, "batch_sampler", None)
    if isinstance(batch_sampler, torch.utils.data.BatchSampler) and batch_sampler.drop_last \
            and isinstance(batch_sampler.sampler, _RANDOM_SAMPLERS):
        try:
            total = len(batch_sampler.sampler)
        except TypeError:
            return
        left = total % batch_sampler.batch_size
        if left:
            raise ValueError(f"the data's DataLoader shuffles and drops its last incomplete batch (drop_last=True): "
                             f"every pass leaves out another {left} of its {total} samples, so every evaluation "
                             "would see other samples: use drop_last=False (the objective weighs an uneven last "
                             "batch exactly) or shuffle=False")


def _is_tensor_pair(obj: Any) -> bool:
    return (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and isinstance(obj[0], torch.Tensor)
        and isinstance(obj[1], torch.Tensor)
    )


def to_device(batch: Batch, device: torch.device | str | None, dtype: torch.dtype | None = None) -> Batch:
    """Move a batch to ``device``; floating inputs are cast to ``dtype`` when given (targets keep theirs
    unless they are floating, as for MSE).

    A tensor created under ``torch.inference_mode()`` that arrives unchanged (already on ``device``
    in ``dtype``) is copied into a normal tensor: autograd refuses to save an inference tensor for
    backward, and every measurement differentiates through the batch."""
    x, y = batch
    x = x.to(device=device, dtype=dtype if (dtype is not None and x.is_floating_point()) else None)
    y = y.to(device=device, dtype=dtype if (dtype is not None and y.is_floating_point()) else None)
    return _normal(x), _normal(y)


def _normal(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a normal copy of it where it is an inference tensor (made outside inference mode:
    a clone taken inside would be one again)."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


class TensorDataset:
    """Train and test tensors of one data set, with a name for reports."""

    def __init__(self, name: str, x_train, y_train, x_test, y_test, num_classes: int):
        self.name = name
        self.x_train, self.y_train = x_train, y_train
        self.x_test, self.y_test = x_test, y_test
        self.num_classes = num_classes

    @property
    def train(self) -> Batch:
        return self.x_train, self.y_train

    @property
    def test(self) -> Batch:
        return self.x_test, self.y_test

    def __repr__(self) -> str:
        return (
            f"TensorDataset({self.name!r}, train={tuple(self.x_train.shape)}, "
            f"test={tuple(self.x_test.shape)}, classes={self.num_classes})"
        )


def _cache_dir() -> Path:
    root = os.environ.get("SHARPKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sharpkit"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_cached_mnist1d(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays at ``path``, or None where there are none or the file is unreadable or
    incomplete (a damaged cache is generated again, not a reason to stop)."""
    if not path.exists():
        return None
    try:
        with open(path, "rb") as fh, np.load(fh) as npz:
            arrays = {k: npz[k] for k in ("x", "y", "x_test", "y_test")}
    except Exception as exc:  # zip, pickle or key errors of a damaged file
        warnings.warn(f"the cached MNIST-1D file {path} is unreadable ({type(exc).__name__}); generating it again")
        return None
    return arrays


def load_mnist1d(num_samples: int = 5000, seed: int = 42, cache: bool = True) -> TensorDataset:
    """MNIST-1D (Greydanus 2020), generated offline by the ``mnist1d`` package.

    ``num_samples`` sequences of length 40 in 10 classes, split 80/20 into train/test as the
    package does (the package default is 5000 -> 4000 train / 1000 test).  The generated arrays are
    cached under ``$SHARPKIT_CACHE`` (default ``~/.cache/sharpkit``) keyed by the arguments.
    Inputs are float32 of shape ``(N, 40)``, targets int64.
    """
    if num_samples < 10:
        raise ValueError(f"num_samples must be >= 10, got {num_samples}")
    key = hashlib.sha1(f"mnist1d-v1-{num_samples}-{seed}".encode()).hexdigest()[:12]
    path = _cache_dir() / f"mnist1d-{num_samples}-{seed}-{key}.npz"
    arrays = _read_cached_mnist1d(path) if cache else None
    if arrays is None:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = num_samples
        args.seed = seed
        made = make_dataset(args)
        arrays = {k: np.asarray(made[k]) for k in ("x", "y", "x_test", "y_test")}
        if cache:
            atomic_save_npz(path, arrays)
    return TensorDataset(
        "mnist1d",
        torch.as_tensor(arrays["x"], dtype=torch.float32),
        torch.as_tensor(arrays["y"], dtype=torch.int64),
        torch.as_tensor(arrays["x_test"], dtype=torch.float32),
        torch.as_tensor(arrays["y_test"], dtype=torch.int64),
        num_classes=10,
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """scikit-learn's 8x8 digits (1797 images, shipped with the package) as flat 64-vectors in [0, 1]."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = torch.as_tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return TensorDataset("digits", x[train], y[train], x[test], y[test], num_classes=10)


def load_tensor_file(path: str | os.PathLike) -> TensorDataset:
    """A data set from a ``.npz`` or ``.pt`` file.

    Expected keys: ``x_train``, ``y_train`` and optionally ``x_test``, ``y_test`` (``x``/``y`` are
    accepted for the training split, not both spellings at once).  Without a test split the
    training data double as test data and the name says so.  ``.npz`` files are read without
    pickle and ``.pt`` files with ``weights_only=True``: a file holding other objects is refused.
    Floating inputs keep their dtype, others (uint8 images, bool) become float32.  Integer or bool
    training targets are class labels (int64; ``num_classes`` is the largest plus one), floating ones
    regression targets (kept in their dtype).

    Raises ValueError naming the file and the key for: missing keys, a test split given by one key
    only, inputs and targets of a split with different numbers of samples, an empty split, complex
    or non-numeric arrays, and test labels that are not whole numbers where the training labels are
    classes.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    if path.suffix == ".npz":
        raw = _read_npz(path)
    elif path.suffix in (".pt", ".pth"):
        try:
            raw = torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as exc:
            if "unsupported global" not in str(exc).lower():
                raise  # (not a torch.save file: torch's own message says what it found)
            raise ValueError(f"{path}: refused: the file holds objects other than tensors and plain containers "
                             "(data files are read with weights_only=True; save a dict of tensors)") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a dict of tensors, got {type(raw).__name__}")
    else:
        raise ValueError(f"{path}: unsupported data file type {path.suffix!r} (use .npz or .pt)")
    for long, short in (("x_train", "x"), ("y_train", "y")):
        if long in raw and short in raw:
            raise ValueError(f"{path}: holds both {long} and {short}: which is the training split is ambiguous")
    x_key, y_key = ("x_train" if "x_train" in raw else "x"), ("y_train" if "y_train" in raw else "y")
    if raw.get(x_key) is None or raw.get(y_key) is None:
        raise ValueError(f"{path}: needs keys x_train and y_train (or x and y); found {sorted(raw)}")
    has_test = [raw.get(k) is not None for k in ("x_test", "y_test")]
    if has_test[0] != has_test[1]:
        given, missing = ("x_test", "y_test") if has_test[0] else ("y_test", "x_test")
        raise ValueError(f"{path}: holds {given} but not {missing}: give both for a test split, or neither")
    x, y = (_file_tensor(path, k, raw[k]) for k in (x_key, y_key))
    name = path.stem
    if has_test[0]:
        x_test, y_test = (_file_tensor(path, k, raw[k]) for k in ("x_test", "y_test"))
    else:
        x_test, y_test, name = x, y, f"{path.stem} (no test split)"
    splits = (("train", x_key, y_key, x, y), ("test", "x_test", "y_test", x_test, y_test))
    for split, xk, yk, xs, ys in splits:
        if xs.dim() == 0 or ys.dim() == 0:
            raise ValueError(f"{path}: x_{split} and y_{split} need a first (sample) dimension, got shapes "
                             f"{tuple(xs.shape)} and {tuple(ys.shape)}")
        if xs.shape[0] != ys.shape[0]:
            raise ValueError(f"{path}: {xk} has {xs.shape[0]} samples but {yk} {ys.shape[0]}")
        if xs.shape[0] == 0:
            raise ValueError(f"{path}: the {split}ing split is empty" if split == "train" else
                             f"{path}: the test split is empty (leave out x_test and y_test for none)")
    # Floating inputs keep their precision (a float64 measurement must not see them rounded through
    # float32; the passes cast them to the measurement's dtype); others (uint8 images) become float32.
    x, x_test = (t if t.is_floating_point() else t.float() for t in (x, x_test))
    if y.is_floating_point():  # regression targets (in either split)
        if not y_test.is_floating_point():
            y_test = y_test.to(y.dtype)
        return TensorDataset(name, x, y, x_test, y_test, 0)
    if y_test.is_floating_point():
        if not bool((y_test == y_test.round()).all()):
            raise ValueError(f"{path}: y_train holds class labels (integers) but y_test values that are not whole "
                             "numbers")
        if bool((y_test.abs() >= 2 ** 53).any()):
            raise ValueError(f"{path}: y_test holds labels too large to be class indices")
    y, y_test = y.long(), y_test.long()
    # (Labels outside [0, num_classes) are named where they are used: the measurement, the study.)
    num_classes = max(int(max(y.max(), y_test.max())) + 1, 0)
    return TensorDataset(name, x, y, x_test, y_test, num_classes)


def _read_npz(path: Path) -> dict[str, Any]:
    """The arrays of a ``.npz`` file (never unpickled; the file closed again)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():  # an object array in an archive, or no archive at all
            raise ValueError(f"{path}: cannot load: not a .npz archive of numeric arrays (object arrays would need "
                             "unpickling, which data files never get)") from exc
        raise ValueError(f"{path}: cannot load the .npz file ({exc})") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: cannot load the .npz file ({type(exc).__name__}: {exc})") from exc


def _file_tensor(path: Path, key: str, value: Any) -> torch.Tensor:
    """``value`` of a data file's ``key`` as a dense, real, numeric tensor without a graph; ValueError
    naming both otherwise."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "c":
        raise ValueError(f"{path}: {key} holds complex numbers; data must be real")
    if isinstance(value, np.ndarray) and value.dtype.kind not in "biuf":
        raise ValueError(f"{path}: {key} holds {value.dtype} values; data must be numbers (integers, floats "
                         "or bools)")
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: {key} is not an array of numbers ({type(value).__name__}: {exc})") from None
    if t.is_complex():
        raise ValueError(f"{path}: {key} holds complex numbers; data must be real")
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.detach()


def load_dataset(spec: str, **kwargs: Any) -> TensorDataset:
    """Resolve a data-set spec: ``mnist1d``, ``digits`` or a path to a ``.npz``/``.pt`` file."""
    if spec == "mnist1d":
        return load_mnist1d(**kwargs)
    if spec in ("digits", "sklearn-digits"):
        return load_digits(**kwargs)
    if spec.endswith((".npz", ".pt", ".pth")):
        return load_tensor_file(spec)
    raise ValueError(f"unknown data set {spec!r}: use mnist1d, digits, or a .npz/.pt file")

