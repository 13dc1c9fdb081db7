"""Batch sharpness audits of many checkpoints (``sk.audit`` and ``sharpkit audit``).

Checkpoints of one architecture are measured together: their parameters are stacked and the
model runs under ``torch.func.vmap``, so one pass over the data serves a whole group (losses,
gradients for the ascent of ε-sharpness, Hessian-vector products for Lanczos and Hutchinson).
How many are stacked follows from free memory; on a CPU, where stacking measured slower than
compute-bound single passes, the plan measures one checkpoint at a time once the passes are large.
Where samples are independent (``bn="eval"``) the data are regrouped into passes of up to
``STACKED_ROWS`` samples, small batches joined, except where that would change the objective (a
model whose samples interact, a loss that is not a per-sample mean:
:func:`sharpkit.objective.probe_largest_batch`).  Each finished checkpoint's row is appended durably to a JSONL store keyed by
the checkpoint's content hash and everything that changes its values (metric options, the data's
content, the model's architecture, the loss and its options), so an interrupted audit resumes
where it stopped and a changed setting is never served old rows.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .. import __version__
from .. import distributed as _dist
from ..curvature.engines import check_hessian_computable
from ..inputs import (
    LOSSES,
    check_model_runs,
    identity,
    resolve_data,
    resolve_device,
    resolve_model,
    resolve_model_classes,
)
from ..objective import REGROUP_MAX_ROWS, batches_stay_whole, survey_weights
from ..params import FlatParams, convert_working_precision, measurement_mode, private_copy
from ..sharpness._checks import measured_dtype
from ..sharpness.solvers import check_autocast
from .checkpoints import (
    Checkpoint,
    CheckpointError,
    describe_checkpoint,
    display_names,
    find_checkpoints,
    fit_state_dict,
    read_checkpoint,
)
from .metrics import METRICS, MetricConfig, run_metrics
from .store import ResultStore, json_safe, row_key

__all__ = ["audit", "MetricConfig", "METRICS", "ResultStore", "resolve_data", "resolve_model", "LOSSES"]

def audit(
    checkpoints: str | os.PathLike | Iterable[str | os.PathLike],
    model: Any,
    data: Any,
    metrics: str | Sequence[str] = ("keskar",),
    out: str | os.PathLike | None = None,
    loss_fn: Callable | str = "cross_entropy",
    epsilon: float = 1e-3,
    subspace_dim: int = 100,
    rho: float = 2e-3,
    adaptive_scale: bool = True,
    adaptive_norm: str = "linf",
    solver: str = "apgd",
    max_iter: int | None = None,
    restarts: int = 1,
    first_step: str = "gradient",
    ascent_dtype: str | None = None,
    k: int = 1,
    lanczos_steps: int = 20,
    trace_samples: int = 20,
    seed: int = 0,
    bn: str = "eval",
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    group_size: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    memory_fraction: float = 0.25,
    entry: str | None = None,
) -> list[dict[str, Any]]:
    """Measure the sharpness of many checkpoints of one architecture; one row per checkpoint.

    Args:
        checkpoints: files, directories (their ``.pt/.pth/.bin/.ckpt/.safetensors`` files, not
            recursively) or glob patterns (matched directories expanded, ``**`` any depth); see
            :func:`~sharpkit.audit.checkpoints.find_checkpoints`.  One that yields no checkpoint
            file gets an error row.
        model: the architecture: an ``nn.Module`` (left exactly as found), a zero-argument factory,
            or a spec (``f1``, ``c1``, ``module:factory``).
        data: training data: ``(inputs, targets)``, an iterable of batches, ``"mnist1d"``,
            ``"digits"``, a ``.pt``/``.npz`` file or ``"module:function"``.
        metrics: names from ``METRICS`` (``keskar``, ``keskar-subspace``, ``adaptive``,
            ``top-eig``, ``trace``), a list or a comma-separated string.
        out: JSONL results file; rows already there (same checkpoint content, same
            configuration, data, model and loss) are reused, not recomputed.  The model and loss
            match by their layers, settings and the code of their classes and functions outside
            torch (:func:`~sharpkit.inputs.identity`): an edited ``forward`` is measured anew.
            A file that is not an audit results file is refused (``ValueError``), never truncated.
            The file is locked while the audit runs: another audit of it is refused
            (``ValueError``) at once.
            ``None``: nothing is written.
        loss_fn: mean-reduced ``loss_fn(outputs, targets)`` or ``"cross_entropy"`` / ``"mse"``.
        epsilon, subspace_dim, rho, adaptive_scale, adaptive_norm, solver, max_iter, restarts, first_step,
            ascent_dtype, k, lanczos_steps, trace_samples, seed: metric options, see
            :class:`~sharpkit.audit.metrics.MetricConfig`.  ``solver="lbfgsb"`` (scipy, one problem
            at a time) measures one checkpoint at a time; ``"apgd"`` (default) and ``"pga"`` batch.
        bn: ``"eval"`` (running statistics, default) or ``"train"`` (batch statistics).
        device, dtype: where and in what precision to measure (default: CPU, the model's dtype).
            Checkpoints are loaded in ``dtype`` where given (a float64 checkpoint keeps its values
            under ``dtype=torch.float64`` whatever the factory's precision), else in the model's.
        group_size: checkpoints measured together; ``None`` chooses it from free memory (on a CPU:
            1 when the data batches hold more than 400 samples on average, where stacking measured
            slower); 1 measures one at a time on :class:`sharpkit.objective.Objective`.
        batch_size: split tensor data into batches of this many samples (default: one batch).
        progress: show a progress bar with ETA on stderr.
        memory_fraction: share of free memory the automatic group size may use (default 0.25).
        entry: the entry of the checkpoint dicts holding the weights to measure, such as
            ``"model_ema"`` or ``"state_dict_ema"`` for the EMA copies; default None: the file
            itself where it is a state dict, else the first entry of ``"state_dict"``,
            ``"model_state_dict"``, ``"model"``, ``"net"``, ``"network"`` holding weights (each
            row's ``weights`` says which, and names other entries holding weights).  A file
            without that entry gets an error row.

    Returns:
        One dict per checkpoint path in the order found: ``key``, ``checkpoint``, ``name`` (the
        shortest path suffix telling the files apart), ``sha256``, ``step``, ``epoch``, ``status``
        (``"ok"`` or ``"error"``), ``error``, ``loss``, one entry per metric, ``details`` (per
        metric: evaluation counts, eigenvalues, ``nonfinite_evals`` where an ascent skipped points whose
        loss was not finite),
        ``config``, ``weights`` (where in the file the weights were found and how their names were
        matched, e.g. ``"entry 'model' (also in the file, not measured: 'model_ema'); prefix
        'module.' removed"``; None for a plain state dict) and ``saved_step``/``saved_epoch``
        (those the file stores beside its weights: Lightning's ``global_step``/``epoch``, a
        script's ``{"step": ..., "epoch": ...}``).  ``step`` and ``epoch`` are read from the
        path (:func:`~sharpkit.audit.checkpoints.parse_step`); where the path gives none, the
        saved ones stand in.  Non-finite numbers are ``None``, as in the store.  Identical files under
        several paths are measured once and each path gets its own row.  Bad checkpoints
        (missing, unreadable, corrupt, not fitting the model, NaN/inf weights) get
        ``status="error"`` and a message; the others are still measured.

    Raises:
        ValueError: unusable arguments, found before anything is measured: unknown options,
            ``subspace_dim`` above the model's parameter count (with ``keskar-subspace``), an
            unknown or absent ``device``, data that cannot be read, a model factory that raises, a
            model that does not run on the data, an ``out`` that cannot be written or is not a
            results file.
    """
    config = MetricConfig(
        metrics=metrics, epsilon=epsilon, subspace_dim=subspace_dim, rho=rho, adaptive_scale=adaptive_scale,
        adaptive_norm=adaptive_norm, solver=solver, max_iter=max_iter, restarts=restarts,
        first_step=first_step, ascent_dtype=ascent_dtype, k=k, lanczos_steps=lanczos_steps,
        trace_samples=trace_samples, seed=seed,
    )
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = [checkpoints]
    paths = find_checkpoints(checkpoints)
    if not paths:
        raise ValueError("no checkpoints given")
    if isinstance(loss_fn, str):
        if loss_fn not in LOSSES:
            raise ValueError(f"unknown loss {loss_fn!r}: use one of {sorted(LOSSES)} or pass a callable")
        loss_fn = LOSSES[loss_fn]()
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r} (use float32 or float64)")
        dtype = getattr(torch, dtype)
    device = resolve_device(device)
    ascent_dtype = config.ascent_dtype if config.has_ascent() else None  # (ignored otherwise, like epsilon)
    if ascent_dtype is not None:  # the device (and an explicit dtype) before any data are read
        check_autocast(ascent_dtype, device, dtype if dtype is not None else torch.float32)
    # Under torch.distributed only rank 0 reads and writes the store; the other ranks follow its plan.
    # Opened before the data are read, so that an unusable results file is reported at once (on
    # every rank: the others must not wait for rank 0 in the next collective).
    with _dist.agree("opening the results file"):
        store = ResultStore(out) if out is not None and _dist.is_main_process() else None

    # The store locks its file until the audit ends, however it ends: a second audit of the same
    # file is refused at once instead of measuring and appending every row again.
    try:
        batches, data_desc, num_classes = resolve_data(data, batch_size)
        net, model_desc, data_classes = resolve_model_classes(model, batches, num_classes, seed)
        if net is model:  # checkpoints are loaded into a private copy, never into the user's model
            net = private_copy(net)
        if "keskar-subspace" in config.metrics:
            # A = n x p needs p <= n: beyond, AᵀA is singular and the values meaningless.
            n = FlatParams(net).n
            if config.subspace_dim > n:
                raise ValueError(f"subspace_dim must be at most the number of parameters n={n}, "
                                 f"got {config.subspace_dim}")
        if {"top-eig", "trace"} & set(config.metrics):
            check_hessian_computable(net)
        # The model's trainable precision, but float32 for a 16-bit model (whose sharpness would be
        # rounding noise, often exactly 0), and an explicit 16-bit dtype refused: measured_dtype.
        explicit = dtype is not None
        dtype = measured_dtype(net, dtype) or FlatParams(net).dtype
        if explicit:
            # Checkpoints are loaded in the precision asked for, not rounded to the model's first: a
            # float64 checkpoint audited with dtype=float64 through a float32 factory was 4.6e-11 off.
            convert_working_precision(net, dtype)
        if ascent_dtype is not None:
            check_autocast(ascent_dtype, device, dtype)
        check_model_runs(net, loss_fn, batches, device, dtype, bn)
        # Everything that changes a row's values identifies it: the data's content, the architecture
        # (repr included), the loss with its options.
        key_config = {
            **config.key(), "data": data_desc, "model": model_desc, "loss": identity(loss_fn, tensors=True), "bn": bn,
            "dtype": str(dtype).replace("torch.", ""), "batch_size": batch_size,
            **({"entry": entry} if entry is not None else {}),  # (absent by default: earlier rows keep their keys)
        }
        runner = _Runner(net, loss_fn, batches, config, key_config, device, dtype, bn, store, data_classes, entry)
        return runner.run(paths, group_size, progress, memory_fraction)
    finally:
        if store is not None:
            store.close()


# Rows (checkpoints x samples) of one evaluation pass where samples are independent (bn="eval"):
# the data are regrouped to about this many (small batches joined, large ones split), so that one
# checkpoint's passes are large enough to amortise the per-call overhead and a stacked group's
# activations stay near CPU cache size (measured on the MNIST-1D MLP of benchmarks/bench_audit.py:
# stacked, 16 x 1000 was faster than 16 x 4000 and than 16 x 250; one at a time, passes of 4000
# samples were 4.4x faster than batches of 100).
STACKED_ROWS = REGROUP_MAX_ROWS  # 16384, the cap Objective(regroup=True) uses too


class _Runner:
    """One audit: resolve checkpoints to rows, measure the pending ones group by group."""

    def __init__(self, model, loss_fn, batches, config, key_config, device, dtype, bn, store, data_classes=None,
                 entry=None):
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        self.entry = entry
        # What each content's file said about its weights (row key -> weights, saved_step, saved_epoch).
        self._content: dict[str, dict[str, Any]] = {}
        self.config, self.key_config = config, key_config
        self.device, self.dtype, self.bn, self.store = device, dtype, bn, store
        # Classes the model was built for, counted from the data's labels (None: not from the data).
        self.data_classes = data_classes
        # Each rank measures on its share of the data; every pass sums over ranks (sharpkit.distributed).
        # Samples of a batch interact where BatchNorm uses batch statistics, or (one pair that sharding
        # would split by rows) where the model mixes them otherwise: batches stay as given.
        self.batch_statistics = _dist.uses_batch_statistics(model, bn)
        keep = self.batch_statistics or (_dist.is_distributed() and batches_stay_whole(model, batches, device, dtype, bn))
        self.local_batches = _dist.shard(batches, keep_batches=keep)
        self.survey, self.weights = survey_weights(self.local_batches, loss_fn, self.local_batches.is_sharded)
        self.keep_graphs = True
        # Samples per checkpoint in one pass when the data may be regrouped (GroupPlan.pass_rows).
        self.pass_rows: int | None = None

    @staticmethod
    def _position(ck: Checkpoint, content: dict[str, Any]) -> dict[str, Any]:
        """The fields of a row that belong to the path, not to the content measured: the step and
        epoch the path names, else those saved in the file (``content``, a row or
        :attr:`_content`'s entry)."""
        step = ck.step if ck.step is not None else content.get("saved_step")
        epoch = ck.epoch if ck.epoch is not None else content.get("saved_epoch")
        return {"checkpoint": str(ck.path), "name": ck.name, "step": step, "epoch": epoch}

    def _base_row(self, ck: Checkpoint, key: str) -> dict[str, Any]:
        content = {"weights": None, "saved_step": None, "saved_epoch": None, **self._content.get(key, {})}
        return {
            "key": key, **self._position(ck, content), "sha256": ck.sha256, "config": self.key_config,
            **content, "sharpkit": __version__,
        }

    def _write(self, row: dict[str, Any]) -> dict[str, Any]:
        row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if self.store is not None:
            self.store.append(row)
        return json_safe(row)  # as the store holds it, so that a resumed audit returns the same

    def _error_row(self, ck: Checkpoint, key: str, message: str, store: bool = True) -> dict[str, Any]:
        """An error row; written to the store unless ``store`` is False (an error that a re-run may
        not meet, which must not be served again)."""
        row = {**self._base_row(ck, key), "status": "error", "error": message}
        if not store:
            row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            return json_safe(row)
        return self._write(row)

    def _row_for(self, ck: Checkpoint, row: dict[str, Any]) -> dict[str, Any]:
        """``row``, measured or stored for ``ck``'s content and configuration, as ``ck``'s own row:
        its path, name, step and epoch (an error message naming the measured file names ``ck``)."""
        own = {"weights": None, "saved_step": None, "saved_epoch": None,  # (rows stored before these fields)
               **row, **self._position(ck, row)}
        if row.get("error") and row.get("checkpoint") != own["checkpoint"]:
            own["error"] = row["error"].replace(str(row.get("checkpoint")), own["checkpoint"])
        return own

    def run(self, paths: list[Path], group_size: int | None, progress: bool, memory_fraction: float):
        cks = [describe_checkpoint(p, name) for p, name in zip(paths, display_names(paths))]
        # Rows are keyed by content and configuration: a file listed twice under different paths
        # (or two identical files, like the shared epoch_0.pt of two runs) is measured and stored
        # once, and every path still gets its own row.
        keys = [self._key(ck.path, ck.sha256) for ck in cks]
        rows: dict[str, dict[str, Any]] = {}
        pending: list[tuple[Checkpoint, str]] = []
        planned: set[str] = set()
        for ck, key in zip(cks, keys):
            if key in rows or key in planned:
                continue
            # A row keyed by the path (a file that could not be read) is never served again: why it
            # cannot be read now (missing, unreadable, a directory) is told afresh.
            done = self.store.get(key) if self.store is not None and ck.sha256 is not None else None
            if done is not None:
                rows[key] = done
            else:
                pending.append((ck, key))
                planned.add(key)
        if _dist.is_distributed():
            # Only rank 0 read the store: every rank measures what it found pending.
            rows, todo = _dist.broadcast_object((rows, [k for _, k in pending]))
            pending = [(ck, k) for ck, k in pending if k in set(todo)]
        with measurement_mode(self.model, self.bn):
            if pending:
                from .batched import estimate_group_size

                # Unsharded, the survey of the weights serves the plan too (no second read).
                plan = estimate_group_size(
                    self.model, self.survey if not self.local_batches.is_sharded else self.batches,
                    self.device, self.dtype,
                    self.config.vectors_per_checkpoint(), memory_fraction=memory_fraction,
                    regroup_rows=None if self.batch_statistics else STACKED_ROWS, loss_fn=self.loss_fn,
                )
                plan = _dist.broadcast_object(plan)  # free memory differs between ranks
                self.keep_graphs, self.pass_rows = plan.keep_graphs, plan.pass_rows
                group_size = group_size or plan.group_size
                if self.config.solver == "lbfgsb":
                    group_size = 1  # scipy's L-BFGS-B drives one problem at a time
            bar = None
            if progress and pending and _dist.is_main_process():
                from tqdm.auto import tqdm

                bar = tqdm(total=len(pending), unit="ckpt", desc="audit", dynamic_ncols=True)
            try:
                group: list[tuple[Any, str, dict[str, torch.Tensor]]] = []
                i = -1
                while i + 1 < len(pending):
                    i += 1
                    ck, key = pending[i]
                    if ck.error is not None:
                        rows[key] = self._error_row(ck, key, ck.error)
                        bar and bar.update(1)
                    else:
                        state, error, sha, content = None, None, None, {}
                        try:
                            with _dist.agree(f"loading {ck.path}"):
                                try:
                                    loaded = read_checkpoint(ck.path, self.entry)
                                except CheckpointError as exc:
                                    sha = getattr(exc, "sha256", None)
                                    raise
                                sha = loaded.sha256
                                content = {"weights": loaded.weights, "saved_step": loaded.saved_step,
                                           "saved_epoch": loaded.saved_epoch}
                                notes = [loaded.weights] if loaded.weights else []
                                state = fit_state_dict(loaded.state, self.model, str(ck.path),
                                                       data_classes=self.data_classes, notes=notes)
                                content["weights"] = "; ".join(notes) or None
                        except CheckpointError as exc:
                            error = str(exc)
                        shas = _dist.gather_objects(sha)
                        if len(set(shas)) > 1:  # ranks read different contents: nothing to key a row by
                            rows[key] = self._error_row(ck, key, f"{ck.path}: the file changed while the audit read "
                                                        "it; re-run the audit to measure it", store=False)
                            bar and bar.update(1)
                            state = error = None
                        elif sha != ck.sha256:
                            # Rewritten since it was hashed (a training run still writing it): the row
                            # belongs to the content read, never to the content listed.
                            key = self._rekey(ck, sha, key, cks, keys, rows, pending, planned, bar)
                            if key is None:  # that content is measured or stored already
                                state = error = None
                                bar and bar.update(1)
                        if key is not None and content:
                            self._content[key] = content
                        if error is not None:
                            rows[key] = self._error_row(ck, key, error)
                            bar and bar.update(1)
                        elif state is not None:
                            group.append((ck, key, state))
                    if group and (len(group) >= group_size or i == len(pending) - 1):
                        for row in self._measure(group):
                            rows[row["key"]] = row
                        bar and bar.update(len(group))
                        group = []
            finally:
                if bar is not None:
                    bar.close()
        return [self._row_for(ck, rows[key]) for ck, key in zip(cks, keys)]

    def _key(self, path: Path, sha256: str | None) -> str:
        """A row's key: the checkpoint's content (its path where it could not be read) and the
        configuration."""
        return row_key(sha256 or "path:" + os.path.abspath(path), self.key_config)

    def _rekey(self, ck, sha, key, cks, keys, rows, pending, planned, bar) -> str | None:
        """``ck`` was read with content ``sha``, not the content it was listed with: its key
        (``keys``, ``ck.sha256``) follows the content read.  Returns the new key, or None where
        that content has a row already (measured in this audit, stored, or still to come).
        Another path listed with the former content (an identical file) still needs that row:
        it is measured from that path."""
        new = self._key(ck.path, sha)
        ck.sha256 = sha
        for j, other in enumerate(cks):
            if other is ck:
                keys[j] = new
        others = [other for other, k in zip(cks, keys) if k == key]
        if key not in rows and others:
            pending.append((others[0], key))
            if bar is not None:
                bar.total += 1
        elif not others:
            planned.discard(key)
        if new in rows or new in planned:
            return None
        done = _dist.broadcast_object(self.store.get(new) if self.store is not None and sha is not None else None)
        if done is not None:
            rows[new] = done
            return None
        planned.add(new)
        return new

    def _measure(self, group) -> list[dict[str, Any]]:
        """Measure one group (stacked under vmap, or alone on Objective when it has one member)."""
        t0 = time.perf_counter()
        states = [s for _, _, s in group]
        if len(group) == 1:
            from ..objective import Objective
            from .batched import SingleObjective

            self.model.load_state_dict(states[0])  # (a private model: measurement_mode restores it)
            objective = Objective(self.model, self.loss_fn, self.local_batches, self.device, self.dtype,
                                  regroup=self.pass_rows or False)
            engine = SingleObjective(objective, keep_graphs=self.keep_graphs)
        else:
            from .batched import StackedObjective, stack_checkpoints

            X, frozen = stack_checkpoints(self.model, states, self.device, self.dtype)
            # Samples are independent unless BatchNorm uses batch statistics: then the stacked
            # activations are kept near cache size by regrouping the data.
            max_rows = None if self.pass_rows is None else max(64, min(STACKED_ROWS // len(group), self.pass_rows))
            engine = StackedObjective(
                self.model, self.loss_fn, self.local_batches, X, frozen, self.weights,
                keep_graphs=self.keep_graphs, max_rows=max_rows,
            )
        # A checkpoint whose loss is not finite (finite weights that overflow) has no sharpness:
        # report it and measure the rest of the group without it.
        losses = engine.loss(engine.X)
        finite = torch.isfinite(losses).tolist()
        if not all(finite):
            rows = [
                self._error_row(ck, key, f"{ck.path}: the loss at this checkpoint is {float(f)}; sharpness is undefined")
                for (ck, key, _), f, ok in zip(group, losses.tolist(), finite) if not ok
            ]
            rest = [g for g, ok in zip(group, finite) if ok]
            return rows + (self._measure(rest) if rest else [])
        results = run_metrics(engine, self.config, loss0=losses)
        seconds = (time.perf_counter() - t0) / len(group)
        rows = []
        for (ck, key, _), res in zip(group, results):
            values = [res["loss"]] + [res[m] for m in self.config.metrics]
            row = {**self._base_row(ck, key), "group_size": len(group), "seconds": round(seconds, 4)}
            if all(v == v and abs(v) != float("inf") for v in values):
                row.update(status="ok", error=None, **res)
            else:
                row.update(status="error", error="the loss or a metric is not finite at this checkpoint", **res)
            rows.append(self._write(row))
        return rows
