"""The study: train SB and LB models over seeds, measure them, sweep, warm-start, track, report.

Work is organised in steps (a training, a measurement) whose keys spell out everything they
depend on.  Finished trainings live in ``DIR/runs/<id>/`` (per-epoch checkpoint, final weights,
warm-start snapshots) and finished measurements in ``DIR/cache/``; a re-run with the same DIR
reuses them, and an interrupted run loses at most the epoch or measurement in flight.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from .. import distributed as _dist
from ..data import TensorDataset, as_batches, load_dataset
from ..landscape import evaluate, interpolate, slice_1d
from ..params import FlatParams
from . import measure
from .models import build_model
from .noise_scale import gradient_noise_scale
from .store import StepCache, atomic_torch_save, key_id
from .train import TrainConfig, train

__all__ = ["StudyConfig", "Study", "run_study", "default_config", "quick_config"]

EVAL_CHUNK = 4096  # samples per forward pass in evaluations and measurements


@dataclass
class StudyConfig:
    """Everything that defines a study.  Batch sizes, epochs and sample counts are in samples/epochs.

    sb/lb: small and large batch (None: LB = 10% of the training set, SB = min(256, LB // 16)).
    max_epochs/patience/min_rel_improvement: training stops when the epoch loss has not improved
    by 1% (relative) for ``patience`` epochs, or at the cap.  The cap is ``max_epochs`` at the
    small batch and ``lb_epochs_factor`` times that at the large batch (geometric in between):
    a large batch takes ``LB/SB`` times fewer steps per epoch and needs more epochs to converge,
    while its epochs cost less.  eps/solvers/subspace_dim/
    sharpness_iters: the ε-sharpness protocol (paper: ε in {1e-3, 5e-4}, L-BFGS-B, 10 iterations,
    p = 100).  sharpness_samples/curvature_samples: training samples used by ε-sharpness and by
    the Hessian measurements (None: all).  sweep: batch sizes of the Fig. 4 sweep (None: powers of
    two times SB up to LB).  warm_epochs: k of Fig. 5.  track_every: epochs between top-eigenvalue
    estimates along training (Fig. 6), at the small batch's cap (scaled with the cap).  sweep_models: models that get the sweep, warm start and
    noise scale (None: the first).
    """

    data: str = "mnist1d"
    num_samples: int = 10000
    models: tuple[str, ...] = ("f1", "c1")
    f1_width: int = 128
    f1_depth: int = 5
    c1_channels: int = 32
    c1_hidden: tuple[int, ...] = (256, 128)
    sb: int | None = None
    lb: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    max_epochs: int = 40
    lb_epochs_factor: float = 3.0
    patience: int = 5
    min_rel_improvement: float = 0.01
    lr: float = 1e-3
    eps: tuple[float, ...] = (1e-3, 5e-4)
    solvers: tuple[str, ...] = ("lbfgsb", "apgd")
    subspace_dim: int = 100
    sharpness_iters: int = 10
    sharpness_samples: int | None = 4096
    curvature_samples: int | None = 2048
    eig_tol: float = 1e-3
    trace_matvecs: int = 30
    bn: str = "eval"
    sweep: tuple[int, ...] | None = None
    sweep_models: tuple[str, ...] | None = None
    warm_epochs: tuple[int, ...] = (0, 1, 2, 5, 10, 20)
    track_every: int = 4
    curve_points: int = 25
    device: str = "auto"
    quick: bool = False

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_config(**overrides: Any) -> StudyConfig:
    return dataclasses.replace(StudyConfig(), **overrides)


def quick_config(**overrides: Any) -> StudyConfig:
    """The same pipeline, smaller: 2 seeds, narrower nets, fewer epochs and samples."""
    base = StudyConfig(
        num_samples=4000,
        f1_width=128,
        c1_channels=16,
        c1_hidden=(128, 64),
        seeds=(0, 1),
        max_epochs=8,
        lb_epochs_factor=4.0,
        patience=3,
        sharpness_samples=1024,
        curvature_samples=512,
        trace_matvecs=12,
        eig_tol=1e-2,
        warm_epochs=(0, 1, 2, 4),
        track_every=2,
        quick=True,
    )
    return dataclasses.replace(base, **overrides)


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available")
    return dev


class Study:
    """One study in ``out_dir``.  ``run()`` does (or reuses) every step and returns the raw results;
    :mod:`sharpkit.study.report` turns them into tables, figures, verdicts and HTML."""

    def __init__(self, config: StudyConfig, out_dir: str | os.PathLike, progress: bool = True, log=None):
        self.config = config
        self.out = Path(out_dir)
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if not _dist.is_main_process():  # under torchrun rank 0 alone reports progress
            self.progress, self.log = False, (lambda msg: None)
        self.device = _device(config.device)
        self.loss_fn = nn.CrossEntropyLoss()
        self.cache = StepCache(self.out / "cache")
        self.stats = {"trainings_run": 0, "trainings_reused": 0, "unavailable": []}
        self._load_data()

    # ------------------------------------------------------------------ data and models
    def _load_data(self) -> None:
        c = self.config
        kwargs = {"num_samples": c.num_samples} if c.data == "mnist1d" else {}
        ds: TensorDataset = load_dataset(c.data, **kwargs)
        if ds.num_classes < 2:
            raise ValueError(f"data set {c.data!r} has no class labels; the study needs a classification task")
        self.ds = ds
        self.data_key = {"data": c.data, **kwargs}
        self.train_xy = (ds.x_train.to(self.device), ds.y_train.to(self.device))
        self.test_xy = (ds.x_test.to(self.device), ds.y_test.to(self.device))
        n = ds.x_train.shape[0]
        self.n_train = n
        self.lb = c.lb if c.lb is not None else max(2, int(round(0.1 * n)))
        self.sb = c.sb if c.sb is not None else max(2, min(256, self.lb // 16))
        for name, b in (("sb", self.sb), ("lb", self.lb)):
            if not 1 <= b <= n:
                raise ValueError(f"--{name} {b} must be between 1 and the {n} training samples")
        if self.sb >= self.lb:
            raise ValueError(f"the small batch ({self.sb}) must be smaller than the large batch ({self.lb})")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(12345)).to(self.device)

        def subset(k):
            if k is None or k >= n:
                return self.train_xy, n
            return (self.train_xy[0][perm[:k]], self.train_xy[1][perm[:k]]), k

        # Measurements read the data in chunks of EVAL_CHUNK samples (bounded memory on large data
        # sets); with bn="eval" the objective does not depend on the chunking.
        (sx, sy), self.sharp_n = subset(c.sharpness_samples)
        (cx, cy), self.curv_n = subset(c.curvature_samples)
        self.sharp_xy = as_batches((sx, sy), EVAL_CHUNK)
        self.curv_xy = as_batches((cx, cy), EVAL_CHUNK)
        self.train_eval = as_batches(self.train_xy, EVAL_CHUNK)
        self.test_eval = as_batches(self.test_xy, EVAL_CHUNK)
        self.input_shape = tuple(ds.x_train.shape[1:])

    def model_kwargs(self, spec: str) -> dict:
        c = self.config
        if spec == "f1":
            return {"width": c.f1_width, "depth": c.f1_depth}
        if spec == "c1":
            return {"channels": c.c1_channels, "hidden": tuple(c.c1_hidden)}
        return {}

    def new_model(self, spec: str, seed: int) -> nn.Module:
        m = build_model(spec, self.input_shape, self.ds.num_classes, seed, **self.model_kwargs(spec))
        return m.to(self.device)

    # ------------------------------------------------------------------ trainings
    def epoch_cap(self, batch: int) -> int:
        """The epoch cap at ``batch``: ``max_epochs`` at SB, ``lb_epochs_factor`` times that at LB."""
        c = self.config
        t = min(max(math.log(batch / self.sb) / math.log(self.lb / self.sb), 0.0), 1.0)
        return max(1, int(round(c.max_epochs * c.lb_epochs_factor ** t)))

    def train_key(self, spec: str, batch: int, seed: int, start: dict | None = None, track: bool = False,
                  snapshots: tuple[int, ...] = ()) -> dict:
        c = self.config
        cap = self.epoch_cap(batch)
        every = max(1, int(round(c.track_every * cap / c.max_epochs)))
        return {
            "kind": "train", "data": self.data_key, "model": spec, "model_kwargs": self.model_kwargs(spec),
            "batch": batch, "seed": seed, "max_epochs": cap, "patience": c.patience,
            "min_rel_improvement": c.min_rel_improvement, "lr": c.lr, "start": start,
            "track": ({"every": every, "samples": self.curv_n, "tol": c.eig_tol, "bn": c.bn} if track else None),
            "snapshots": sorted(snapshots),
        }

    def trained(self, key: dict) -> tuple[nn.Module, dict]:
        """The trained model for ``key`` (trained now or loaded from DIR/runs) and its run record.

        Under torch.distributed training is not sharded: rank 0 trains (or loads) the model alone
        and every rank receives its weights, so that all ranks measure the same model."""
        if not _dist.is_distributed():
            return self._trained(key)

        def on_rank0():
            model, record = self._trained(key)
            return {k: v.detach().cpu() for k, v in model.state_dict().items()}, record

        state, record = _dist.main_process_computes(on_rank0, f"training {key['model']} b={key['batch']}")
        model = self.new_model(key["model"], key["seed"])
        model.load_state_dict(state)
        return model.eval(), record

    def _trained(self, key: dict) -> tuple[nn.Module, dict]:
        run_dir = self.run_dir(key)
        final = run_dir / "final.pt"
        model = self.new_model(key["model"], key["seed"])
        if final.exists():
            state = torch.load(final, map_location=self.device, weights_only=False)
            if state.get("key") == key:
                model.load_state_dict(state["model"])
                self.stats["trainings_reused"] += 1
                return model.eval(), state["record"]
        if key["start"] is not None:
            snap = self.out / key["start"]["snapshot"]
            if not snap.exists():
                raise FileNotFoundError(f"warm-start snapshot {snap} is missing; remove its SB run directory to redo it")
            model.load_state_dict(torch.load(snap, map_location=self.device, weights_only=True))
        hook = self._epoch_hook(key, run_dir)
        cfg = TrainConfig(key["batch"], key["max_epochs"], key["patience"], key["min_rel_improvement"], key["lr"])
        desc = f"train {key['model']} b={key['batch']} seed={key['seed']}" + (
            f" warm k={key['start']['epoch']}" if key["start"] else "")
        bar = _bar(total=cfg.max_epochs, desc=desc, unit="ep", enabled=self.progress)
        t = time.perf_counter()
        try:
            with _training_threads():
                res = train(model, self.loss_fn, self.train_xy, cfg, key["seed"], self.device,
                            checkpoint=run_dir / "checkpoint.pt", on_epoch=hook, progress=bar)
        finally:
            bar.close()
        record = {
            "epochs": res.epochs, "stopped": res.stopped, "history": res.history,
            "seconds": time.perf_counter() - t, "resumed_from_epoch": res.resumed_from, "run_dir": run_dir.name,
        }
        atomic_torch_save({"key": key, "model": model.state_dict(), "record": record}, final)
        self.stats["trainings_run"] += 1
        return model.eval(), record

    def _epoch_hook(self, key: dict, run_dir: Path):
        c = self.config
        snapshots = set(key["snapshots"])
        track = key["track"] is not None
        state: dict[str, Any] = {"v0": None}

        def hook(epoch: int, model: nn.Module, entry: dict) -> dict | None:
            out: dict[str, Any] = {}
            if epoch in snapshots:
                atomic_torch_save(model.state_dict(), run_dir / f"epoch{epoch}.pt")
            if track and epoch % key["track"]["every"] == 0:
                loss, acc = evaluate(model, self.loss_fn, self.curv_xy, bn=c.bn)
                out.update(eval_loss=loss, eval_acc=acc)
                try:
                    info, vec = measure.top_eigen(model, self.loss_fn, self.curv_xy, c.bn, c.eig_tol, seed=epoch,
                                                  v0=state["v0"])
                    state["v0"] = vec
                    out.update(lambda_max=info["value"], matvecs=info["num_matvecs"], warm=info["warm"])
                except measure.Unavailable as exc:
                    self._unavailable(str(exc))
            return out

        return hook

    def snapshot_path(self, sb_key: dict, epoch: int) -> str:
        """Where the SB run ``sb_key`` keeps its weights after ``epoch`` epochs, relative to DIR."""
        return f"{self.run_dir(sb_key).relative_to(self.out).as_posix()}/epoch{epoch}.pt"

    def run_dir(self, key: dict) -> Path:
        return self.out / "runs" / f"{key['model']}-b{key['batch']}-s{key['seed']}-{key_id(key)}"

    # ------------------------------------------------------------------ measurements
    def _unavailable(self, msg: str) -> None:
        if msg not in self.stats["unavailable"]:
            self.stats["unavailable"].append(msg)
            self.log(f"skipped: {msg}")

    def cached(self, key: dict, compute) -> Any:
        """``compute()`` once per key (cached in DIR/cache); None when the API it needs is missing."""
        # Under torch.distributed rank 0 decides (its cache is the one written), every rank computes.
        hit = _dist.broadcast_object(self.cache.get(key) if _dist.is_main_process() else None)
        if hit is not None:
            return hit
        try:
            value = compute()
        except measure.Unavailable as exc:
            self._unavailable(str(exc))
            return None
        return self.cache.put(key, value) if _dist.is_main_process() else value

    def measure_eval(self, model, tkey) -> dict:
        def compute():
            tr = evaluate(model, self.loss_fn, self.train_eval, bn="eval")
            te = evaluate(model, self.loss_fn, self.test_eval, bn="eval")
            return {"train_loss": tr[0], "train_acc": tr[1], "test_loss": te[0], "test_acc": te[1]}

        return self.cached({"kind": "eval", "run": key_id(tkey)}, compute)

    def measure_sharpness(self, model, tkey, eps: float, solver: str, subspace: int | None, seed: int) -> dict | None:
        c = self.config
        key = {"kind": "sharpness", "run": key_id(tkey), "eps": eps, "solver": solver, "subspace_dim": subspace,
               "max_iter": c.sharpness_iters, "samples": self.sharp_n, "bn": c.bn, "seed": seed}
        return self.cached(key, lambda: measure.keskar(model, self.loss_fn, self.sharp_xy, eps, solver, subspace,
                                                       c.sharpness_iters, seed, c.bn))

    def measure_curvature(self, model, tkey, seed: int) -> dict:
        c = self.config
        base = {"run": key_id(tkey), "samples": self.curv_n, "bn": c.bn, "seed": seed}
        eig = self.cached({"kind": "eig", "tol": c.eig_tol, **base},
                          lambda: measure.top_eigen(model, self.loss_fn, self.curv_xy, c.bn, c.eig_tol, seed)[0])
        tr = self.cached({"kind": "trace", "matvecs": c.trace_matvecs, **base},
                         lambda: measure.hessian_trace(model, self.loss_fn, self.curv_xy, c.bn, c.trace_matvecs, seed))
        return {"lambda_max": eig, "trace": tr}

    # ------------------------------------------------------------------ the study
    def run(self) -> dict:
        c = self.config
        t0 = time.perf_counter()
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        sweep_models = self.sweep_models()
        results: dict[str, Any] = {
            "config": c.as_dict(),
            "resolved": {"sb": self.sb, "lb": self.lb, "lb_over_sb": self.lb / self.sb, "n_train": self.n_train,
                         "n_test": int(self.ds.x_test.shape[0]), "input_shape": list(self.input_shape),
                         "num_classes": self.ds.num_classes, "data_name": self.ds.name,
                         "sharpness_samples": self.sharp_n, "curvature_samples": self.curv_n,
                         "sweep_models": list(sweep_models)},
            "environment": environment(self.device),
            "started": started,
            "models": {},
        }
        for spec in c.models:
            results["models"][spec] = self.run_model(spec, spec in sweep_models)
        results["stats"] = dict(self.stats, measurements_run=self.cache.misses, measurements_reused=self.cache.hits)
        results["wall_seconds"] = time.perf_counter() - t0
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return results

    def sweep_models(self) -> list[str]:
        """The models that get the sweep, warm starts and noise scale (``config.sweep_models``,
        default: the first model)."""
        c = self.config
        return list(c.sweep_models if c.sweep_models is not None else c.models[:1])

    def warm_start_epochs(self, extras: bool) -> tuple[int, ...]:
        """The warm-start epochs k of Fig. 5 that apply (none without extras)."""
        c = self.config
        return tuple(k for k in c.warm_epochs if 0 < k <= c.max_epochs) if extras else ()

    def run_key(self, spec: str, role: str, seed: int) -> dict:
        """The training key of the study's run of ``spec`` at ``role`` ("sb"/"lb") and ``seed``: the
        first seed is tracked along training (Fig. 6) and, for the sweep models, its SB run keeps
        the warm-start snapshots (Fig. 5)."""
        if role not in ("sb", "lb"):
            raise ValueError(f"role must be 'sb' or 'lb', got {role!r}")
        c = self.config
        first = seed == c.seeds[0]
        extras = spec in self.sweep_models()
        snaps = ()
        if first and role == "sb" and extras:
            snaps = self.warm_start_epochs(extras) + ((c.max_epochs // 2,) if c.max_epochs >= 2 else ())
        return self.train_key(spec, self.sb if role == "sb" else self.lb, seed, track=first, snapshots=snaps)

    def run_model(self, spec: str, extras: bool) -> dict:
        c = self.config
        seeds = list(c.seeds)
        n_params = FlatParams(self.new_model(spec, seeds[0])).n
        out: dict[str, Any] = {"num_params": n_params, "model_kwargs": self.model_kwargs(spec), "runs": [],
                               "sharpness": [], "curvature": []}
        ks = self.warm_start_epochs(extras)
        models: dict[tuple[str, int], tuple[nn.Module, dict]] = {}
        for seed in seeds:
            first = seed == seeds[0]
            x0 = FlatParams(self.new_model(spec, seed)).get()
            for role, batch in (("sb", self.sb), ("lb", self.lb)):
                tkey = self.run_key(spec, role, seed)
                model, rec = self.trained(tkey)
                ev = self.measure_eval(model, tkey)
                x = FlatParams(model).get()
                run = {"role": role, "seed": seed, "batch": batch, "epochs": rec["epochs"], "stopped": rec["stopped"],
                       "train_seconds": rec["seconds"], "dist_from_init": float((x - x0).norm()),
                       "key": key_id(tkey), **ev}
                run["loss_history"] = [h["train_loss"] for h in rec["history"][1:]]
                if first:
                    run["tracking"] = [h for h in rec["history"] if "eval_loss" in h]
                out["runs"].append(run)
                models[(role, seed)] = (model, tkey)
        bar = _bar(total=len(seeds) * 2, desc=f"measure {spec}", unit="model", enabled=self.progress)
        for seed in seeds:
            for role in ("sb", "lb"):
                model, tkey = models[(role, seed)]
                for eps in c.eps:
                    for solver in c.solvers:
                        for sub in (None, c.subspace_dim):
                            r = self.measure_sharpness(model, tkey, eps, solver, sub, seed=1000 + seed)
                            if r is not None:
                                out["sharpness"].append({"role": role, "seed": seed, "eps": eps, "solver": solver,
                                                         "space": "full" if sub is None else f"p={sub}", **r})
                cur = self.measure_curvature(model, tkey, seed)
                out["curvature"].append({"role": role, "seed": seed, "lambda_max": cur["lambda_max"], "trace": cur["trace"]})
                bar.update(1)
        bar.close()
        # Fig. 2/3 and 7: paths between the first seed's SB and LB minimizers.
        (m_sb, k_sb), (m_lb, k_lb) = models[("sb", seeds[0])], models[("lb", seeds[0])]
        alphas = np.linspace(-1.0, 2.0, c.curve_points)
        out["curves"] = {}
        for path in ("linear", "sin"):
            out["curves"][path] = {}
            for split, xy in (("train", self.train_eval), ("test", self.test_eval)):
                key = {"kind": "curve", "a": key_id(k_sb), "b": key_id(k_lb), "path": path, "split": split,
                       "points": c.curve_points}
                out["curves"][path][split] = self.cached(key, lambda xy=xy, path=path: _curve_dict(
                    interpolate(m_sb, m_lb, self.loss_fn, xy, alphas, path=path, bn="train")))
        # Li et al. (2018): filter-normalised random-direction slices around each minimizer.
        out["slices"] = {}
        for role, (m, k) in (("sb", (m_sb, k_sb)), ("lb", (m_lb, k_lb))):
            key = {"kind": "slice", "run": key_id(k), "points": c.curve_points, "samples": self.curv_n, "bn": c.bn,
                   "seed": seeds[0]}
            out["slices"][role] = self.cached(key, lambda m=m: _curve_dict(slice_1d(
                m, self.loss_fn, self.curv_xy, np.linspace(-1.0, 1.0, c.curve_points), seed=seeds[0], bn=c.bn)))
        if extras:
            out.update(self.run_extras(spec, seeds[0], models, ks))
        return out

    def run_extras(self, spec: str, seed: int, models: dict, ks: tuple[int, ...]) -> dict:
        """Fig. 4 (batch-size sweep), Fig. 5 (warm start) and the gradient noise scale, for one seed."""
        c = self.config
        sharp_solver, sharp_eps = c.solvers[0], c.eps[0]
        sweep = sorted(set(c.sweep or _default_sweep(self.sb, self.lb)))
        rows = []
        for batch in sweep:
            if batch == self.sb or batch == self.lb:
                model, tkey = models[("sb" if batch == self.sb else "lb", seed)]
            else:
                tkey = self.train_key(spec, batch, seed)
                model, _ = self.trained(tkey)
            rows.append({"batch": batch, **self._point(model, tkey, sharp_eps, sharp_solver, seed)})
        sb_key = models[("sb", seed)][1]
        warm = []
        for k in sorted(set((0,) + ks)):
            if k == 0:
                model, tkey = models[("lb", seed)]  # k = 0 is plain LB training from the same start
            elif not (self.out / self.snapshot_path(sb_key, k)).exists():
                continue  # the SB run converged before epoch k: there is no such iterate
            else:
                start = {"from": key_id(sb_key), "epoch": k, "snapshot": str(self.snapshot_path(sb_key, k))}
                tkey = self.train_key(spec, self.lb, seed, start=start)
                model, _ = self.trained(tkey)
            warm.append({"k": k, **self._point(model, tkey, sharp_eps, sharp_solver, seed)})
        noise = []
        mid = c.max_epochs // 2
        for epoch in sorted({0, *ks, mid, -1}):
            if epoch == -1:
                model, label = models[("sb", seed)][0], "final"
            elif epoch == 0:
                model, label = self.new_model(spec, seed), 0
            else:
                path = self.out / self.snapshot_path(sb_key, epoch)
                if not path.exists():
                    continue
                model = self.new_model(spec, seed)
                model.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
                label = epoch
            key = {"kind": "noise", "run": key_id(sb_key), "epoch": label, "b_small": self.sb, "b_big": self.lb}
            r = self.cached(key, lambda model=model: gradient_noise_scale(
                model, self.loss_fn, self.train_xy, self.sb, self.lb, seed=seed).as_dict())
            noise.append({"epoch": label, **r})
        return {"sweep": rows, "warm_start": warm, "noise_scale": noise,
                "extras_measure": {"solver": sharp_solver, "eps": sharp_eps, "space": "full"}}

    def _point(self, model, tkey, eps, solver, seed) -> dict:
        ev = self.measure_eval(model, tkey)
        s = self.measure_sharpness(model, tkey, eps, solver, None, seed=1000 + seed)
        cur = self.measure_curvature(model, tkey, seed)
        return {**ev, "sharpness": None if s is None else s["value"],
                "lambda_max": None if cur["lambda_max"] is None else cur["lambda_max"]["value"]}


def _default_sweep(sb: int, lb: int) -> list[int]:
    sizes, b = [], sb
    while b < lb:
        sizes.append(b)
        b *= 2
    return sizes + [lb]


def _curve_dict(curve) -> dict:
    return {"alphas": curve.alphas.tolist(), "loss": curve.loss.tolist(), "accuracy": curve.accuracy.tolist()}


def _bar(total: int, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def environment(device: torch.device) -> dict:
    import matplotlib
    import scipy

    env = {
        "sharpkit": __version__, "torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
        "matplotlib": matplotlib.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": str(device), "threads": torch.get_num_threads(), "training_threads": TRAINING_THREADS,
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def run_study(
    config: StudyConfig, out_dir: str | os.PathLike = "sharpkit-study", progress: bool = True, threads: int | None = None
) -> dict:
    """Run (or resume) the study in ``out_dir``, write results.json, CSV tables, figures and
    report.html there, and return the results (raw numbers plus the summary and verdicts).

    ``threads``: torch CPU threads of the measurements (None: every core this process may use on an
    idle machine, one on a busy one); training always runs on ``TRAINING_THREADS``.
    """
    from .report import write_outputs

    _set_threads(threads)
    study = Study(config, out_dir, progress=progress)
    results = study.run()
    if not _dist.is_main_process():  # rank 0 writes the report
        return results
    return write_outputs(results, Path(out_dir))


# Training runs on this many CPU threads whatever the study's thread setting: the float sums of
# a step depend on how many threads share them, and over tens of epochs such differences grow into
# different models (two default studies, one started on a busy machine and so given one thread,
# trained different networks).  For these small steps one thread was also the faster choice: on a
# 2-core CPU an F1 epoch at batch 50 took 0.65 s on one thread and 1.26 s on two.
TRAINING_THREADS = 1


@contextlib.contextmanager
def _training_threads():
    """Torch's CPU threads set to TRAINING_THREADS for the block (the measurements keep theirs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _set_threads(threads: int | None) -> int:
    """Set torch's CPU threads for the measurements: ``threads``, or all available cores on an idle
    machine and one thread on a busy one (training always uses TRAINING_THREADS).  The study's steps are small (batches of tens of samples through
    sub-million-parameter nets), so intra-op threads gain little on an idle machine but, on an
    oversubscribed one, synchronising them made epochs up to ten times slower on a 2-core CPU."""
    if threads is None:
        try:
            cores = len(os.sched_getaffinity(0))  # containers often allow fewer than os.cpu_count()
        except AttributeError:
            cores = os.cpu_count() or 1
        try:
            busy = os.getloadavg()[0] >= 1.0
        except (AttributeError, OSError):
            busy = False
        threads = 1 if busy else cores
    torch.set_num_threads(max(1, int(threads)))
    return torch.get_num_threads()
