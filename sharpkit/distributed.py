"""Scale-out under ``torch.distributed``: sharded data passes reduced with sample weights.

Every sharpkit data pass has the same shape: iterate over the batches, accumulate *weighted sums*
(``sum_b w_b * loss_b``, ``sum_b w_b * grad_b``, ``sum_b w_b * HVP_b``, ``w_b`` the batch's samples
or :class:`sharpkit.objective.DataWeights`' weight) and divide once by the total weight.  Under a process group each rank iterates over its own share of the batches
(:func:`shard`) and the sums are added across ranks (:func:`sharded_pass`: a small header that says
whether every rank finished with sums of one shape, then the sums), so
every rank ends the pass holding exactly the single-process result.  Everything downstream of a
pass (Lanczos, Hutch++, scipy's L-BFGS-B, the sign-ascent solvers) then runs identically on every
rank from identical numbers; no further communication is needed.

Launch with torchrun, which sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``::

    torchrun --nproc_per_node=4 -m sharpkit audit ...

Without a process group (or with a group of one) every function here is a no-op, so the same code
runs single-process unchanged.

Failures: a pass that raises on one rank must not leave the others waiting in a collective
forever.  :func:`sharded_pass` (and :func:`agree` for work outside a data pass, such as loading a
checkpoint) catches the local exception, still takes part in the collective with an error flag,
and then every rank raises: the failing rank its own exception (with its rank noted), the others a
short :class:`PeerFailure` naming the failing rank, so the cause is reported once.  A rank that
dies outright is covered by torchrun (which stops the other workers) and by the process-group
timeout (:func:`init_distributed`'s ``timeout``).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import zlib
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from .params import canonical_device

__all__ = [
    "PeerFailure",
    "launched_by_torchrun",
    "init_distributed",
    "resolve",
    "is_distributed",
    "suspended",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "shard",
    "uses_batch_statistics",
    "local_data",
    "count_samples",
    "all_reduce_sum_",
    "sharded_pass",
    "agree",
    "broadcast_",
    "broadcast_object",
    "barrier",
    "main_process_computes",
    "launcher_session",
]

T = TypeVar("T")
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class PeerFailure(RuntimeError):
    """Another rank failed during a collective step; that rank reports the cause."""


# --------------------------------------------------------------------------- process group


def launched_by_torchrun() -> bool:
    """True when the torchrun environment variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``) are all set."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def init_distributed(backend: str | None = None, timeout: datetime.timedelta | float | None = None) -> bool:
    """Initialise the default process group from the torchrun environment (idempotent).

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default ``nccl`` when CUDA is available, else ``gloo``.
        timeout: how long a collective may wait for the other ranks before it fails (a
            ``timedelta`` or seconds; default 10 minutes).  This is the last guard against a rank
            that died without torchrun noticing.

    Returns:
        True when a group of more than one process is active afterwards.

    Raises:
        RuntimeError: no group is initialised and the torchrun variables are missing.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if not launched_by_torchrun():
        missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
        raise RuntimeError(
            f"distributed=True but no process group is initialised and {', '.join(missing)} "
            "is not set: launch with torchrun (e.g. torchrun --nproc_per_node=2 -m sharpkit ...) "
            "or call torch.distributed.init_process_group first"
        )
    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    elif not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        # One GPU per process: torchrun's LOCAL_RANK picks it.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_world_size() > 1


# > 0 inside suspended(): this process then works alone despite the process group.
_suspended = 0


def is_distributed() -> bool:
    """True when a process group of more than one process is initialised (and not
    :func:`suspended`)."""
    return _suspended == 0 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def suspended():
    """Inside this block the process works alone: measurements neither shard their data nor
    communicate (for work one rank does by itself while the others wait, such as rank 0 training a
    model whose weights it then broadcasts).  Collectives issued explicitly with
    ``torch.distributed`` are not affected; ranks are still reported by :func:`get_rank`."""
    global _suspended
    _suspended += 1
    try:
        yield
    finally:
        _suspended -= 1


def resolve(distributed: bool | None) -> bool:
    """Whether a measurement shards its data: ``None`` (default) follows :func:`is_distributed`;
    ``True`` initialises the group from the torchrun environment if needed; ``False`` never
    shards (every rank then does all the work itself)."""
    if distributed is None:
        return is_distributed()
    if distributed:
        return init_distributed()
    return False


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the one process that writes files and shows
    progress."""
    return get_rank() == 0


# --------------------------------------------------------------------------- data


def shard(
    data: Any,
    batch_size: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    keep_batches: bool = False,
):
    """This rank's share of ``data`` as :class:`~sharpkit.data.Batches`.

    Without a process group (and ``rank``/``world_size`` not given) this is just
    :func:`~sharpkit.data.as_batches`.  Otherwise batch ``j`` of the full sequence goes to rank
    ``j % world_size``, whole; a single ``(X, Y)`` pair without ``batch_size`` is split by rows
    into ``world_size`` contiguous parts instead — unless ``keep_batches`` (set it when BatchNorm
    uses batch statistics, see :func:`uses_batch_statistics`: splitting a batch would change its
    statistics; a single batch then stays whole on rank 0).  Nothing is padded or repeated, so
    sample weights stay exact; shards may be uneven, and a rank may hold no samples at all.  Data
    that are already sharded are returned as they are.
    """
    from .data import as_batches

    batches = as_batches(data, batch_size)
    if batches.is_sharded:
        return batches
    if rank is None and world_size is None and not is_distributed():
        return batches
    _check_same_order(data)
    world = get_world_size() if world_size is None else int(world_size)
    r = get_rank() if rank is None else int(rank)
    return batches.shard(r, world, keep_batches=keep_batches)


def _samplers(loader: Any) -> list:
    """The samplers that order a DataLoader's samples (its sampler, its batch sampler and the
    sampler inside that)."""
    found, todo = [], [getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)]
    while todo:
        s = todo.pop()
        if s is None or any(s is f for f in found):
            continue
        found.append(s)
        todo.append(getattr(s, "sampler", None))
    return found


def _check_same_order(data: Any) -> None:
    """Sharding deals batch j to rank j % world, so every rank must iterate the same sequence.  A
    DataLoader that shuffles from the global random state draws another order on each rank (DDP
    scripts seed ranks apart): samples would be counted twice or missed with the right total.  So
    would one whose sampler already hands each rank its own part (``DistributedSampler``)."""
    from .data import Batches

    while isinstance(data, Batches):
        data = data._source
    for sampler in _samplers(data):
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            raise ValueError(
                "a DataLoader with a DistributedSampler yields only this rank's part, which sharding would split "
                "again: pass the DataLoader without it (sharpkit shards the full data exactly, nothing padded or "
                "dropped), or mark this rank's part with sharpkit.distributed.local_data (a DistributedSampler "
                "pads its last part with repeated samples unless drop_last=True, which drops samples instead)"
            )
        if isinstance(sampler, torch.utils.data.Sampler) and hasattr(sampler, "generator") \
                and sampler.generator is None:
            kind = "shuffle=True" if isinstance(sampler, torch.utils.data.RandomSampler) \
                and sampler is getattr(data, "sampler", None) else f"a {type(sampler).__name__}"
            raise ValueError(
                f"a DataLoader with {kind} draws its order from each process's global random state, so the "
                "ranks would see different sequences: pass shuffle=False, a generator seeded alike on every rank "
                "(DataLoader(..., generator=torch.Generator().manual_seed(0)), or the sampler's generator=), or "
                "this rank's own part through sharpkit.distributed.local_data"
            )


def uses_batch_statistics(model: torch.nn.Module, bn: str | None = None) -> bool:
    """True when a BatchNorm module of ``model`` normalises with the batch's own statistics (it is
    in training mode, or keeps no running statistics), so that the samples of a batch interact and
    batches must not be split or joined.  ``bn`` ("eval"/"train") judges the model as the
    measurement policy of :func:`sharpkit.params.measurement_mode` will set it; None (default)
    reads each module's current mode."""
    from .params import is_batchnorm

    def batch_stats(m: torch.nn.Module) -> bool:
        training = m.training if bn is None else bn == "train"
        return training or m.running_mean is None

    return any(is_batchnorm(m) and batch_stats(m) for m in model.modules())


def local_data(data: Any, batch_size: int | None = None):
    """Mark ``data`` as this rank's own part (a user-sharded iterable, e.g. a DataLoader with a
    ``DistributedSampler`` that does not pad): it is iterated as given and the sums of each pass
    are still reduced across ranks.

    ``torch.utils.data.DistributedSampler`` pads the last shard with repeated samples unless
    ``drop_last=True`` (which drops samples instead), so neither gives the exact objective over the
    full data set; :func:`shard` does.
    """
    from .data import as_batches

    batches = as_batches(data, batch_size)
    return batches if batches.is_sharded else batches.shard(get_rank(), get_world_size(), presharded=True)


def count_samples(batches: Any, reduce: bool | None = None) -> int:
    """Total number of samples over all ranks (one pass over the local shard, one :func:`sharded_pass`).

    Raises ValueError on every rank when all the data together hold no sample.
    """
    from .data import as_batches

    batches = as_batches(batches)
    reduce = batches.is_sharded if reduce is None else reduce
    count = torch.zeros(1, dtype=torch.float64)
    with sharded_pass([count], enabled=reduce):
        count += batches.num_samples()
    total = int(round(count.item()))
    if total == 0:
        raise ValueError("data is empty: it holds no samples" + (" on any rank" if reduce else ""))
    return total


# --------------------------------------------------------------------------- collectives


def _comm_device(like: torch.device) -> torch.device:
    """Where the collective runs: gloo works on host memory, NCCL on the current GPU."""
    backend = dist.get_backend()
    if backend == "nccl":
        return canonical_device("cuda")
    if backend == "gloo":
        return torch.device("cpu")
    return like


def all_reduce_sum_(tensors: Sequence[torch.Tensor], dtype: torch.dtype = torch.float64) -> None:
    """Add ``tensors`` across ranks, in place, with one fused collective.

    The tensors are packed into one contiguous buffer of ``dtype`` (default float64, so that sums
    of float32 partial results are added without further rounding), reduced once, and copied back
    into each tensor in its own dtype.  Every rank receives the same values.  A no-op without a
    process group of more than one process.
    """
    if not is_distributed():
        return
    tensors = list(tensors)
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"all_reduce_sum_ expects tensors, got {type(t).__name__}")
        if t.is_complex():
            raise TypeError("all_reduce_sum_ does not support complex tensors")
    parts = tensors
    if not parts:
        return
    device = _comm_device(parts[0].device)
    buf = torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in parts])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    offset = 0
    with torch.no_grad():
        for t in parts:
            n = t.numel()
            t.copy_(buf[offset : offset + n].view(t.shape))
            offset += n


class sharded_pass(contextlib.AbstractContextManager):
    """A data pass whose accumulators are summed across ranks on exit, failure-safe.

    ::

        total = torch.zeros((), dtype=torch.float64); grad = torch.zeros(n)
        with sharded_pass([total, grad]):
            for batch in local_batches:
                ...  # total += n_b * loss_b; grad += n_b / N * g_b
        # here total and grad hold the sums over all ranks

    The accumulators must exist (with the same shapes on every rank) before the pass starts.  On
    exit the ranks first exchange a small header (one collective): whether the block raised on
    each rank, and the shapes of the accumulators.  An exception inside the block does not skip
    that step: then every rank raises — the failing rank its own exception, the others
    :class:`PeerFailure` — and the sums are not exchanged.  Ranks whose accumulators differ (they
    took different code paths: a collective mismatch, which the backends report by aborting the
    process or not at all) raise a ``RuntimeError`` naming the shapes on every rank.  Otherwise
    the sums are added (a second collective).  With ``enabled=False`` or without a process group
    it does nothing.
    """

    def __init__(self, accumulators: Sequence[torch.Tensor] = (), enabled: bool = True, what: str = "a data pass"):
        self.accumulators = list(accumulators)
        self.enabled = enabled and is_distributed()
        self.what = what

    def __enter__(self) -> "sharded_pass":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.enabled:
            return False
        if exc is not None and not isinstance(exc, Exception):
            return False  # KeyboardInterrupt, SystemExit: the process is going away anyway
        world, rank = get_world_size(), get_rank()
        layout = _layout(self.accumulators)
        # [numel, -numel, signature, -signature, failed on rank 0, 1, ...] reduced with MAX: the
        # ranks agree on the layout exactly when the maximum of each equals minus that of its negation.
        header = torch.zeros(4 + world, dtype=torch.float64, device=_comm_device(torch.device("cpu")))
        header[:4] = torch.tensor([layout[0], -layout[0], layout[1], -layout[1]], dtype=torch.float64)
        if exc is not None:
            header[4 + rank] = 1.0
        dist.all_reduce(header, op=dist.ReduceOp.MAX)
        header = header.cpu()
        failed = [r for r in range(world) if header[4 + r].item() > 0]
        if failed:
            if exc is not None:
                exc.add_note(f"(raised on rank {rank} of {world} during {self.what})")
                return False
            who = ", ".join(str(r) for r in failed)
            raise PeerFailure(
                f"rank {who} failed during {self.what}; its error is reported by that process (this is rank {rank})"
            )
        if header[0].item() != -header[1].item() or header[2].item() != -header[3].item():
            shapes = [tuple(t.shape) for t in self.accumulators]
            most, least = int(header[0].item()), int(-header[1].item())
            other = most if most != layout[0] else least
            raise RuntimeError(
                f"the ranks disagree on the sums of {self.what}: rank {rank} of {world} adds {layout[0]} values "
                f"shaped {shapes}, another rank {f'adds {other} values' if other != layout[0] else 'as many, shaped otherwise'} (they "
                "took different code paths, so the sums would not give the single-process result; nothing was "
                "exchanged)"
            )
        if self.accumulators:
            all_reduce_sum_(self.accumulators)
        return False


def _layout(tensors: Sequence[torch.Tensor]) -> tuple[int, int]:
    """``(total elements, a 31-bit signature of the shapes)`` of ``tensors``: equal on two ranks
    when they are about to add the same sums."""
    shapes = repr([tuple(t.shape) for t in tensors]).encode()
    return sum(t.numel() for t in tensors), zlib.crc32(shapes) & 0x7FFFFFFF


def agree(what: str = "this step") -> sharded_pass:
    """A failure-safe step outside a data pass (loading a checkpoint, checking inputs): if the
    block raises on any rank, every rank raises on exit instead of some waiting forever in the
    next collective.  One small collective; a no-op without a process group."""
    return sharded_pass((), what=what)


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values (in place, one collective per
    tensor).  A no-op without a process group."""
    if not is_distributed():
        return
    for t in tensors:
        device = _comm_device(t.device)
        buf = t.detach().to(device).contiguous()
        dist.broadcast(buf, src=src)
        with torch.no_grad():
            t.copy_(buf)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device(torch.device("cpu")))
    return box[0]


def gather_objects(obj: Any) -> list:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` without a process
    group): for decisions that must be the same on all ranks but depend on each rank's data."""
    if not is_distributed():
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


# A side group for waiting while rank 0 works alone (it may take longer than the default
# group's timeout, which guards ordinary collectives).
_waiting_group = None
_waiting_group_for = None  # the default group it was made in (a group dies with its default group)
WAIT_TIMEOUT = datetime.timedelta(hours=24)


def _wait_group():
    global _waiting_group, _waiting_group_for
    default = dist.distributed_c10d._get_default_group()
    if _waiting_group is None or _waiting_group_for is not default:
        _waiting_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
        _waiting_group_for = default
    return _waiting_group


def main_process_computes(fn: Callable[[], T], what: str = "work on rank 0") -> T:
    """``fn()`` run by rank 0 alone (under :func:`suspended`: its measurements do not shard),
    its picklable result handed to every rank.

    For work that is not data-parallel, such as training a model that all ranks then measure: the
    other ranks wait (up to 24 hours, in a side group, so that the default group's shorter timeout
    keeps guarding ordinary collectives).  If ``fn`` raises on rank 0, rank 0 re-raises it and the
    others raise :class:`PeerFailure`.  Without a process group it is just ``fn()``.
    """
    if not is_distributed():
        return fn()
    group = _wait_group()
    box: list[Any] = [None]
    error: BaseException | None = None
    if is_main_process():
        try:
            with suspended():
                value = fn()
            pickle.dumps(value)  # an unpicklable result fails here, reported like fn's own errors
            box[0] = ("ok", value)
        except Exception as exc:  # noqa: BLE001 - handed to the other ranks, then re-raised
            error, box[0] = exc, ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(box, src=0, group=group)
    status, value = box[0]
    if error is not None:
        raise error
    if status == "error":
        raise PeerFailure(f"rank 0 failed during {what}; its error is reported by that process")
    return value


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def launcher_session(backend: str | None = None, timeout: datetime.timedelta | float | None = None):
    """For entry points (``python -m sharpkit`` under torchrun): when the torchrun variables say
    ``WORLD_SIZE > 1`` and no group exists yet, initialise one, and destroy it on exit.  Yields
    whether a group of several processes is active.  Outside torchrun it does nothing."""
    global _waiting_group, _waiting_group_for  # the gloo group for waits dies with the process group
    started = False
    if (
        launched_by_torchrun()
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
        and dist.is_available()
        and not dist.is_initialized()
    ):
        init_distributed(backend, timeout)
        started = True
    try:
        yield is_distributed()
    finally:
        if started and dist.is_initialized():
            _waiting_group = _waiting_group_for = None
            dist.destroy_process_group()
