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

Agreement: sharding is exact only when every rank measures the same thing: the same model
(parameters, buffers, architecture), loss and arguments, and so evaluates the same points.
:func:`check_same` compares such inputs across ranks once, by :func:`digest` (raising on every rank
and naming what differs), and :func:`sharded_pass`'s ``same=`` compares the point or directions
of every pass in its header, so that ranks that drift apart stop before their sums are mixed.

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
import functools
import hashlib
import os
import pickle
import re
import types
import zlib
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .params import canonical_device, is_batchnorm

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
    "digest",
    "check_same",
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

    ``same``: tensors that must hold the same values on every rank for the sums to mean anything
    (the point the pass evaluates, the directions of a product).  Their :func:`digest` travels in
    the header; ranks that hold other values (another model, epsilon, seed, subspace, solver or
    path coordinate: a silent mixture of two measurements otherwise) raise a ``RuntimeError`` on
    every rank and nothing is exchanged.  Digested when the pass starts, before the block runs.
    """

    def __init__(self, accumulators: Sequence[torch.Tensor] = (), enabled: bool = True, what: str = "a data pass",
                 same: Sequence[torch.Tensor] = ()):
        self.accumulators = list(accumulators)
        self.enabled = enabled and is_distributed()
        self.what = what
        # Digested now: the block may change the tensors (a caller accumulating into its point).  A
        # failure here is reported on exit, after the header, like one inside the block.
        self._error: Exception | None = None
        try:
            self.same = _digests_of(list(same)) if self.enabled else 0
        except Exception as exc:  # noqa: BLE001 - raised on exit, the other ranks told
            self.same, self._error = 0, exc

    def __enter__(self) -> "sharded_pass":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.enabled:
            return False
        if exc is not None and not isinstance(exc, Exception):
            return False  # KeyboardInterrupt, SystemExit: the process is going away anyway
        own = self._error if exc is None else None  # (the block's own exception comes first)
        world, rank = get_world_size(), get_rank()
        layout = _layout(self.accumulators)
        # [numel, -numel, signature, -signature, digest, -digest, failed on rank 0, 1, ...] reduced
        # with MAX: the ranks agree on a quantity exactly when the maximum of it equals minus the
        # maximum of its negation (every value below 2**53, so exact in float64).
        header = torch.zeros(_HEADER + world, dtype=torch.float64, device=_comm_device(torch.device("cpu")))
        header[:_HEADER] = torch.tensor([layout[0], -layout[0], layout[1], -layout[1], self.same, -self.same],
                                        dtype=torch.float64)
        if exc is not None or own is not None:
            header[_HEADER + rank] = 1.0
        dist.all_reduce(header, op=dist.ReduceOp.MAX)
        header = header.cpu()
        failed = [r for r in range(world) if header[_HEADER + r].item() > 0]
        if failed:
            if exc is not None:
                exc.add_note(f"(raised on rank {rank} of {world} during {self.what})")
                return False
            if own is not None:
                own.add_note(f"(raised on rank {rank} of {world} while digesting the values of {self.what})")
                raise own
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
        if header[4].item() != -header[5].item():
            # Every rank is here (the header is the same everywhere): one more collective names them.
            groups: dict[int, list[int]] = {}
            for r, d in enumerate(gather_objects(self.same)):
                groups.setdefault(d, []).append(r)
            kinds = [_ranks_phrase(g) for g in groups.values()]
            verb = "hold" if len(groups[next(iter(groups))]) > 1 else "holds"
            where = (f"{kinds[0]} {verb} one point, {kinds[1]} another" if len(kinds) == 2
                     else f"{len(kinds)} different points ({' / '.join(kinds)})")
            raise RuntimeError(
                f"the ranks disagree on what {self.what} evaluates: {where} (the parameters or directions of the "
                "pass), so the sums would mix several measurements; nothing was exchanged.  Every rank must "
                "measure the same model (parameters, buffers, dtype) with the same loss and arguments (epsilon, "
                f"subspace_dim, solver, seed, alphas, ...); this is rank {rank} of {world}"
            )
        if self.accumulators:
            all_reduce_sum_(self.accumulators)
        return False


_HEADER = 6  # header entries before the per-rank failure flags


def _ranks_phrase(ranks: Sequence[int]) -> str:
    """"rank 2" or "ranks 0, 1" for error messages."""
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


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


# --------------------------------------------------------------------------- agreement

_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")
_DIGEST_MASK = (1 << 52) - 1  # digests fit a float64 exactly (the pass header)
_DIGEST_CHUNK = 1 << 18  # 16-bit limbs weighed per step: bounded temporaries (and sums below 2**53)
_PASS_SAMPLE = 1 << 16  # elements of a pass's ``same`` tensors digested (evenly spaced)
_DIGEST_DEPTH = 6  # nesting followed into containers and objects


def without_addresses(text: str) -> str:
    """``text`` (a repr) with the object addresses (`` at 0x7f...``) taken out: they differ between
    processes and runs, so they are never part of a digest or a results key."""
    return _ADDRESS_RE.sub("", text)


def _mix(*parts: Any) -> int:
    """52 bits of a hash of ``parts``' repr (which holds only ints and strings here)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & _DIGEST_MASK


_weights_cache: dict[torch.device, torch.Tensor] = {}


def _limb_weights(device: torch.device) -> torch.Tensor:
    """Two rows of position weights in [1, 65536] for one chunk of limbs (periods 65521 and 65519,
    so that moved or swapped values change the sums)."""
    w = _weights_cache.get(device)
    if w is None:
        idx = torch.arange(_DIGEST_CHUNK, dtype=torch.int64, device=device)
        w = torch.stack([(idx * 40503) % 65521 + 1, (idx * 52757) % 65519 + 1])
        _weights_cache[device] = w
    return w


def _tensor_digest(t: torch.Tensor, sample: int | None = None) -> int:
    """Digest of a tensor's dtype, shape and exact bits (every element, or ``sample`` evenly spaced
    ones), the same on every device and thread count: integer arithmetic only (a floating-point
    sum's rounding would depend on the reduction order), on the tensor's own device."""
    if isinstance(t, torch.nn.parameter.UninitializedTensorMixin):
        return _mix("uninitialized", type(t).__name__)
    t = t.detach()
    head = (str(t.dtype), tuple(t.shape))
    if t.device.type == "meta":
        return _mix("meta", head)
    if t.is_sparse:
        t = t.to_dense()
    if t.is_quantized:
        t = t.int_repr()
    flat = t.reshape(-1)
    if sample is not None and flat.numel() > sample:
        step = -(-flat.numel() // sample)
        flat = torch.cat([flat[::step], flat[-1:]])
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    flat = flat.contiguous()
    if flat.element_size() == 1:
        limbs = flat.view(torch.uint8)
    else:  # 16-bit limbs of the bits (for 2-, 4- and 8-byte elements)
        limbs = flat.view(torch.int16)
    weights = _limb_weights(flat.device)
    sums = []
    for start in range(0, limbs.numel(), _DIGEST_CHUNK):
        part = limbs[start:start + _DIGEST_CHUNK].to(torch.int64) & 0xFFFF
        # (< 2**16 * 2**16 per product, < 2**52 per chunk: exact in int64)
        sums.append((part * weights[:, : part.numel()]).sum(1))
    values = torch.stack(sums).reshape(-1).tolist() if sums else []
    return _mix(head, limbs.numel(), values)


def _function_digest(fn: Any, depth: int) -> int:
    """A function by its module, name and code: byte code, the names it reads (``torch.relu`` and
    ``torch.tanh`` differ there only), constants and defaults; not the values it closes over (a
    loss that counts its calls or knows its rank is still the same loss)."""
    code = getattr(fn, "__code__", None)
    parts = [getattr(fn, "__module__", None), getattr(fn, "__qualname__", type(fn).__qualname__)]
    if code is not None:
        parts += [_code_digest(code, depth), digest(getattr(fn, "__defaults__", None), depth + 1),
                  digest(getattr(fn, "__kwdefaults__", None), depth + 1)]
    return _mix("function", *parts)


def _code_digest(code: types.CodeType, depth: int) -> int:
    """A code object by content (byte code, names, constants with nested code), not by the file and
    line it was compiled from."""
    return _mix("code", code.co_code.hex(), code.co_names, code.co_varnames, digest(code.co_consts, depth + 1))


def is_torch_code(obj: Any) -> bool:
    """Whether a class or function is torch's own (or Python's): its code goes with the torch
    version, so results keys name it without digesting its code."""
    return (getattr(obj, "__module__", None) or "").split(".")[0] in ("torch", "builtins")


def class_digest(cls: type, _depth: int = 0) -> int:
    """A class by its qualified name and the code of every method defined in it and in its bases
    outside torch (``forward`` and the helpers it calls on ``self``): an edited model or loss class
    changes it.  torch's own classes count by name only (the torch version decides their code)."""
    parts = []
    for klass in cls.__mro__:
        if is_torch_code(klass):
            continue
        for name, attr in sorted(vars(klass).items()):
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            elif isinstance(attr, property):
                attr = attr.fget
            if isinstance(attr, types.FunctionType):
                parts.append((klass.__qualname__, name, _function_digest(attr, _depth + 1)))
    return _mix("class", cls.__module__, cls.__qualname__, parts)


def digest(value: Any, _depth: int = 0) -> int:
    """A 52-bit digest of ``value`` that is equal on two ranks exactly when they hold the same thing
    (up to hash collisions): tensors by dtype, shape and bits (wherever they live); numbers,
    strings and dtypes by value; devices by type only (ranks use one GPU each); lists, tuples,
    dicts and sets by their items; functions by code, names read, constants and defaults;
    ``functools.partial`` by function and arguments; modules and other objects by class (with the
    code of its methods outside torch, :func:`class_digest`) and attributes (a module's tensors, its
    public settings such as ``reduction``, ``ignore_index``, ``label_smoothing``).
    Used by :func:`check_same` and :func:`sharded_pass`'s ``same``."""
    if _depth > _DIGEST_DEPTH:
        return _mix("deep", type(value).__qualname__)
    d = _depth + 1
    if isinstance(value, torch.Tensor):
        return _tensor_digest(value)
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return _mix(type(value).__name__, repr(value))
    if isinstance(value, (np.generic, np.ndarray)):
        arr = np.ascontiguousarray(value)
        return _mix("ndarray", str(arr.dtype), arr.shape, hashlib.blake2b(arr.tobytes(), digest_size=8).hexdigest())
    if isinstance(value, torch.dtype):
        return _mix("dtype", str(value))
    if isinstance(value, torch.device):
        return _mix("device", value.type)
    if isinstance(value, types.CodeType):
        return _code_digest(value, d)
    if isinstance(value, (list, tuple)):
        return _mix(type(value).__name__, [digest(v, d) for v in value])
    if isinstance(value, (set, frozenset)):
        return _mix("set", sorted(digest(v, d) for v in value))
    if isinstance(value, dict):
        return _mix("dict", sorted((digest(k, d), digest(v, d)) for k, v in value.items()))
    if isinstance(value, functools.partial):
        return _mix("partial", digest(value.func, d), digest(value.args, d), digest(value.keywords, d))
    if isinstance(value, types.MethodType):
        return _mix("method", type(value.__self__).__qualname__, _function_digest(value.__func__, d))
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        return _function_digest(value, d)
    if isinstance(value, torch.nn.Module):
        settings = {k: v for k, v in vars(value).items() if not k.startswith("_") and k != "training"}
        tensors = {k: _tensor_digest(t) for k, t in value.state_dict(keep_vars=True).items()}
        return _mix("module", class_digest(type(value), d), digest(settings, d), sorted(tensors.items()))
    if hasattr(value, "__dict__"):
        return _mix("object", class_digest(type(value), d),
                    digest({k: v for k, v in vars(value).items() if not k.startswith("_")}, d))
    return _mix("other", type(value).__qualname__, without_addresses(repr(value)))


def _digests_of(tensors: Sequence[torch.Tensor]) -> int:
    """One digest of ``tensors`` for a pass header (0 for none): ``_PASS_SAMPLE`` evenly spaced
    elements of each, enough to tell apart the points of two measurements at a cost far below
    the pass's own (the whole model is compared once, by :func:`check_same`)."""
    if not tensors:
        return 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sharded_pass(same=...) takes tensors, got {type(t).__name__}")
    return _mix("same", [_tensor_digest(t, sample=_PASS_SAMPLE) for t in tensors]) or 1


def _describe(value: Any) -> str:
    """A short description of ``value`` for an error message (a module with its settings)."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')} {tuple(value.shape)}"
    if isinstance(value, torch.nn.Module) and not list(value.children()):
        settings = [f"{k}={_describe(v)}" for k, v in vars(value).items() if not k.startswith("_") and k != "training"]
        settings += [f"{k}={_describe(t)}" for k, t in value.state_dict(keep_vars=True).items()]
        text = f"{type(value).__name__}({', '.join(settings)})"
    else:
        text = without_addresses(repr(value))
    return text if len(text) <= 100 else text[:97] + "..."


def _model_items(model: torch.nn.Module) -> dict[str, tuple[int, str]]:
    """``{item: (digest, description)}`` of what a measurement reads from ``model``: every module
    (its type, settings as ``extra_repr`` shows them, and its type's forward code), every parameter
    (values, dtype, shape, requires_grad) and every buffer."""
    forwards: dict[type, int] = {}
    items = {}
    for name, m in model.named_modules():
        forward = forwards.setdefault(type(m), _function_digest(type(m).forward, 1))
        settings = without_addresses(m.extra_repr())
        label = f"module {name!r}" if name else "the model's root module"
        items[label] = (_mix("module", type(m).__module__, type(m).__qualname__, settings, forward),
                        f"{type(m).__name__}({settings})")
    for name, p in model.named_parameters():
        frozen = "" if p.requires_grad else ", frozen"
        items[f"parameter {name!r}"] = (_mix(_tensor_digest(p), p.requires_grad), _describe(p) + frozen)
    # BatchNorm in training mode normalises with each batch's statistics and only writes its
    # running ones (in a measurement, copies of them, which each rank's batches move otherwise).
    written = {id(b) for m in model.modules() if is_batchnorm(m) and m.training for b in m.buffers(recurse=False)}
    for name, b in model.named_buffers():
        if id(b) not in written:
            items[f"buffer {name!r}"] = (_tensor_digest(b), _describe(b))
    return items


def check_same(what: str, model: torch.nn.Module | None = None, loss_fn: Any = None, **config: Any) -> None:
    """Raise on every rank unless every rank holds the same ``model`` (architecture, parameters,
    buffers), ``loss_fn`` and ``config`` values (compared by :func:`digest`); a no-op without a
    process group.

    A sharded measurement adds every rank's share of the sums: ranks that measure different
    models, losses or arguments would silently return a mixture of several measurements (or wait
    for each other forever, where one stops sooner).  One small collective (every rank's digests);
    the ``RuntimeError`` names ``what`` and each item that differs, with what each rank holds.
    Failure-safe: an exception while digesting on one rank is raised there and as
    :class:`PeerFailure` on the others.  Devices are compared by type only (one GPU per rank).
    """
    if not is_distributed():
        return
    rank, world = get_rank(), get_world_size()
    error: Exception | None = None
    items: dict[str, tuple[int, str]] = {}
    try:
        if model is not None:
            items.update(_model_items(model))
        if loss_fn is not None:
            items["loss_fn"] = (digest(loss_fn), _describe(loss_fn))
        for key, value in config.items():
            items[key] = (digest(value), _describe(value))
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        error = exc
    everyone = gather_objects(("error", None) if error is not None else ("ok", items))
    if error is not None:
        error.add_note(f"(raised on rank {rank} of {world} while comparing {what} across ranks)")
        raise error
    failed = [r for r, (status, _) in enumerate(everyone) if status == "error"]
    if failed:
        raise PeerFailure(f"rank {', '.join(map(str, failed))} failed while comparing {what} across ranks; its error "
                          f"is reported by that process (this is rank {rank})")
    names = list(dict.fromkeys(name for _, held in everyone for name in held))
    differ = []
    for name in names:
        held = [got.get(name) for _, got in everyone]
        groups: dict[Any, list[int]] = {}
        for r, h in enumerate(held):
            groups.setdefault(None if h is None else h[0], []).append(r)
        if len(groups) == 1:
            continue
        descriptions = {None if key is None else held[ranks[0]][1] for key, ranks in groups.items()}
        if len(descriptions) == 1 and None not in descriptions:  # alike but for the values
            kinds = list(groups.values())
            where = (f"other values on {_ranks_phrase(kinds[1])} than on {_ranks_phrase(kinds[0])}" if len(kinds) == 2
                     else f"different values on {' / '.join(_ranks_phrase(r) for r in kinds)}")
            differ.append(f"{name} ({descriptions.pop()}): {where}")
        else:
            parts = [f"{_ranks_phrase(ranks)}: {'missing' if key is None else held[ranks[0]][1]}"
                     for key, ranks in groups.items()]
            differ.append(f"{name} [{'; '.join(parts)}]")
    if differ:
        shown = "; ".join(differ[:6]) + (f"; and {len(differ) - 6} more" if len(differ) > 6 else "")
        raise RuntimeError(
            f"the ranks disagree on {what}: {shown}.  A sharded measurement adds every rank's share of the data, "
            "so every rank must hold the same model, loss and arguments (load or broadcast the same weights on "
            "every rank; seed them alike); nothing was measured"
        )


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
