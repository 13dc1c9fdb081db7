"""sharpkit under torch.distributed: 2 CPU processes with gloo on 127.0.0.1.

Each scenario runs this file as a script in two processes (RANK/WORLD_SIZE/MASTER_* set the way
torchrun sets them, on a free loopback port); the workers save their results with torch.save and
the test compares them with the same computation run single-process in the test itself: every
measurement must agree to 1e-6 relative in float64, and the two ranks must agree bit for bit
(they drive identical host-side solvers from identical reduced numbers).  Failure scenarios check
that a rank that raises is reported once and does not hang the other (bounded by a subprocess
timeout).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

HERE = Path(__file__).resolve()
WORLD = 2
RTOL = 1e-6
TIMEOUT = 120  # seconds for a whole 2-process scenario; a hang fails the test instead of CI


# --------------------------------------------------------------------------- shared problem


class Centered(nn.Module):
    """Subtracts the batch mean: the samples of a batch interact without a BatchNorm module."""

    def forward(self, h):
        return h - h.mean(0, keepdim=True)


def make_model(bn: bool = False, seed: int = 1, centered: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)]
    if bn:
        layers.insert(1, nn.BatchNorm1d(8))
    if centered:
        layers.insert(1, Centered())
    return nn.Sequential(*layers).double()


def make_data(n: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def data_variants() -> dict[str, object]:
    """Uneven shards: 4 uneven batches (ranks get 2 each, of different sizes), one (X, Y) pair
    split by rows (18 / 19), 5 samples in one batch of 8 (rank 1 holds nothing), and 4 batches
    with ignored targets in one of them."""
    from sharpkit.data import as_batches

    x, y = make_data()
    ignored = y.clone()
    ignored[12:15] = -100
    return {
        "batches": [(x[0:10], y[0:10]), (x[10:20], y[10:20]), (x[20:30], y[20:30]), (x[30:], y[30:])],
        "pair": (x, y),
        "empty_rank": as_batches((x[:5], y[:5]), batch_size=8),
        # Ignored targets in one rank's batch only: each batch weighs its other targets, and the
        # ranks must agree on that weighting although rank 0's batches alone weigh their samples.
        "ignored": [(x[0:10], y[0:10]), (x[10:20], ignored[10:20]), (x[20:30], y[20:30]), (x[30:], y[30:])],
    }


def measure_all(tmp: Path) -> dict[str, torch.Tensor]:
    """Every measurement, run identically single-process and on each rank."""
    from sharpkit.objective import Objective
    from sharpkit.params import measurement_mode

    out: dict[str, torch.Tensor] = {}
    loss_fn = nn.CrossEntropyLoss()
    model = make_model()
    gen = torch.Generator().manual_seed(3)
    with measurement_mode(model):
        for name, data in data_variants().items():
            obj = Objective(model, loss_fn, data)
            assert obj.distributed == (_world() > 1) and obj.batches.is_sharded == obj.distributed
            x0 = obj.x0()
            dx = 0.05 * torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
            out[f"{name}/num_samples"] = torch.tensor(float(obj.num_samples))
            out[f"{name}/loss"] = obj.loss(x0 + dx)
            f, g = obj.loss_and_grad(x0 + dx)
            out[f"{name}/lg_loss"], out[f"{name}/grad"] = f, g
    # A model whose samples interact outside BatchNorm, on one pair: the pair is not split by rows.
    mixing = make_model(centered=True)
    with measurement_mode(mixing):
        obj = Objective(mixing, loss_fn, data_variants()["pair"])
        f, g = obj.loss_and_grad(obj.x0())
        out["mixing_pair/loss"], out["mixing_pair/grad"] = f, g
    from sharpkit.landscape import evaluate

    out["mixing_pair/evaluate"] = torch.tensor(evaluate(mixing, loss_fn, data_variants()["pair"]), dtype=torch.float64)
    # A one-shot iterator is read once (into memory) and sharded.
    out["generator/evaluate"] = torch.tensor(evaluate(model, loss_fn, (b for b in data_variants()["batches"])),
                                             dtype=torch.float64)
    # Work rank 0 does alone (its measurement unsharded), result handed to every rank.
    from sharpkit.distributed import main_process_computes, suspended

    def alone():
        obj = Objective(model, loss_fn, data_variants()["batches"])
        assert not obj.distributed
        return {"rank": _rank(), "loss": obj.loss(obj.x0())}

    got = main_process_computes(alone)
    assert got["rank"] == 0
    out["rank0_alone/loss"] = got["loss"]
    # Suspended: this rank works alone (all the data, no communication).

    with suspended(), measurement_mode(model):
        obj = Objective(model, loss_fn, data_variants()["pair"])
        assert not obj.distributed and not obj.batches.is_sharded
        out["suspended/loss_and_grad"] = torch.cat([obj.loss_and_grad(obj.x0())[1], obj.loss(obj.x0()).reshape(1)])
    # BatchNorm with batch statistics: whole batches per rank keep every batch's statistics.
    bn_model = make_model(bn=True)
    x, y = make_data()
    with measurement_mode(bn_model, bn="train"):
        for name, data in (("batches", [(x[i : i + 8], y[i : i + 8]) for i in range(0, 37, 8)]), ("pair", (x, y))):
            obj = Objective(bn_model, loss_fn, data)  # a single batch stays whole on rank 0
            f, g = obj.loss_and_grad(obj.x0())
            out[f"bn_train_{name}/loss"], out[f"bn_train_{name}/grad"] = f, g
    # Landscape evaluation: sums of loss, correct predictions and counts reduced across ranks.
    from sharpkit.landscape import interpolate

    curve = interpolate(model, make_model(seed=7), loss_fn, data_variants()["pair"],
                        alphas=[0.0, 0.5, 1.5], bn="eval")
    out["landscape/loss"] = torch.as_tensor(curve.loss, dtype=torch.float64)
    out["landscape/accuracy"] = torch.as_tensor(curve.accuracy, dtype=torch.float64)
    out.update(_public_api(model, loss_fn))
    out.update(audit_rows(tmp))
    out.update(_commands(tmp))
    return out


def _commands(tmp: Path) -> dict[str, torch.Tensor]:
    """``sharpkit spectrum`` and ``sharpkit sharpness`` (rank 0 writes the JSON)."""
    import json

    from sharpkit.cli import main

    x, y = make_data()
    data_file = tmp / "data.pt"
    if _rank() == 0:
        torch.save({"x_train": x, "y_train": y}, data_file)
    _barrier()
    common = ["--model", "test_distributed:cli_model", "--data", str(data_file), "--dtype", "float64", "--batch-size", "10"]
    res = {}
    for name, args in (("spectrum", ["--k", "1", "--tol", "1e-4", "--trace", "6"]),
                       ("sharpness", ["--max-iter", "3", "--epsilon", "1e-3"])):
        out_file = tmp / f"cli-{name}.json"
        assert main([name, *common, *args, "--out", str(out_file)]) == 0
        _barrier()
        assert out_file.exists()
        result = json.loads(out_file.read_text(encoding="utf-8"))
        if name == "spectrum":
            res["cli/spectrum"] = torch.tensor(result["eigenvalues"] + [result["trace"]["value"]], dtype=torch.float64)
        else:
            res["cli/sharpness"] = torch.tensor([result["results"][0]["value"]], dtype=torch.float64)
        _barrier()
    return res


def _public_api(model: nn.Module, loss_fn) -> dict[str, torch.Tensor]:
    """The measurement API functions that exist in this installation (built on the same passes)."""
    import sharpkit as sk

    data = data_variants()["batches"]
    res: dict[str, torch.Tensor] = {}
    if hasattr(sk, "hessian"):
        H = sk.hessian(model, loss_fn, data)
        V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        res["api/hvp_block"] = torch.as_tensor(H @ V)
        res["api/hvp_generic_nocache"] = sk.hessian(model, loss_fn, data, engine="generic", cache=False) @ V
        res["api/ggn_block"] = sk.ggn(model, loss_fn, data) @ V
        if hasattr(sk, "eigenvalues"):
            r = sk.eigenvalues(H, k=2, seed=0, max_steps=10)
            res["api/eigenvalues"] = torch.as_tensor(r.values, dtype=torch.float64)
        if hasattr(sk, "trace"):
            res["api/trace"] = torch.tensor(float(sk.trace(H, num_matvecs=12, seed=0).value))
        if hasattr(sk, "spectral_density"):
            d = sk.spectral_density(H, num_runs=2, lanczos_steps=6, seed=0, grid=50)
            res["api/density_nodes"] = torch.as_tensor(d.nodes, dtype=torch.float64)
            res["api/density"] = torch.as_tensor(d.density, dtype=torch.float64)
    if hasattr(sk, "keskar_sharpness"):
        for solver in ("lbfgsb", "apgd"):
            # L-BFGS-B: scipy driven identically on every rank from identical reduced values.
            r = sk.keskar_sharpness(model, loss_fn, data, epsilon=1e-3, solver=solver, max_iter=4, seed=0)
            res[f"api/keskar_{solver}"] = torch.tensor([float(r.value), float(r.num_evals)], dtype=torch.float64)
            res[f"api/keskar_{solver}_perturbation"] = torch.as_tensor(r.perturbation, dtype=torch.float64)
    if hasattr(sk, "adaptive_sharpness"):
        r = sk.adaptive_sharpness(model, loss_fn, data, rho=2e-3, max_iter=4, seed=0)
        res["api/adaptive"] = torch.tensor(float(r.value))
        r = sk.adaptive_sharpness(model, loss_fn, data, rho=2e-3, kind="average", m=16, max_iter=3, seed=0)
        res["api/adaptive_average_m"] = torch.tensor(float(r.value))
    if hasattr(sk, "keskar_sharpness"):
        r = sk.keskar_sharpness(model, loss_fn, data, epsilon=1e-3, subspace_dim=4, solver="pga", max_iter=3, seed=0)
        res["api/keskar_subspace_pga"] = torch.tensor(float(r.value))
    return res


def audit_rows(tmp: Path) -> dict[str, torch.Tensor]:
    """sk.audit of two checkpoints, stacked (group of 2) and one at a time; rows written by rank 0."""
    import sharpkit as sk

    model = make_model()
    ck = tmp / "ckpts"
    if _rank() == 0:
        ck.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            torch.save(make_model(seed=10 + i).state_dict(), ck / f"m{i}.pt")
    _barrier()
    res: dict[str, torch.Tensor] = {}
    res.update(_engine_hvps())
    data = data_variants()["batches"]
    # Stacked (a group of 2) with every metric; one at a time (Objective) on one checkpoint.
    for group, metrics, cks in ((2, "keskar,keskar-subspace,adaptive,top-eig,trace", ck), (1, "keskar", ck / "m0.pt")):
        rows = sk.audit(
            cks, model, data, metrics=metrics, out=tmp / f"audit-{group}.jsonl",
            subspace_dim=5, max_iter=3, lanczos_steps=5, trace_samples=3, group_size=group, progress=True,
        )
        for row in rows:
            assert row["status"] == "ok", row
            for m in ["loss"] + metrics.split(","):
                res[f"g{group}/{row['name']}/{m}"] = torch.tensor(float(row[m]), dtype=torch.float64)
    return res


def _engine_hvps() -> dict[str, torch.Tensor]:
    """Hessian-vector products of the audit's engines (one at a time and stacked, graphs kept
    or recomputed) on every data variant."""
    from sharpkit.audit.batched import SingleObjective, StackedObjective
    from sharpkit.distributed import shard
    from sharpkit.objective import Objective
    from sharpkit.params import measurement_mode

    model, loss_fn = make_model(), nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(5)
    res = {}
    with measurement_mode(model):
        for name, data in data_variants().items():
            obj = Objective(model, loss_fn, data)
            V = torch.randn(2, obj.n, generator=gen, dtype=torch.float64)
            for keep in (True, False):
                eng = SingleObjective(obj, keep_graphs=keep)
                res[f"{name}/single_hvp/{keep}"] = eng.hvp(V[:1])[0]
                res[f"{name}/single_hvp2/{keep}"] = eng.hvp(V[1:])[0]  # kept graph reused
            local = shard(data)
            X = torch.stack([obj.x0(), obj.x0() + 0.1])
            stacked = StackedObjective(model, loss_fn, local, X, {}, max_rows=3)
            res[f"{name}/stacked_hvp"] = stacked.hvp(V)
            f, g = stacked.loss_and_grad(X)
            res[f"{name}/stacked_loss"], res[f"{name}/stacked_grad"] = f, g
    return res


def _rank() -> int:
    from sharpkit.distributed import get_rank

    return get_rank()


def _world() -> int:
    from sharpkit.distributed import get_world_size

    return get_world_size()


def _barrier() -> None:
    from sharpkit.distributed import barrier

    barrier()


# --------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(scenario: str, tmp: Path, world: int = WORLD, script: Path = HERE) -> list[subprocess.Popen]:
    """Start ``scenario`` of ``script`` (default this file) in ``world`` processes, the way torchrun
    would (free loopback port)."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
        )
        procs.append(subprocess.Popen(
            [sys.executable, str(script), scenario, str(tmp)], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        ))
    return procs


def finish(procs: list[subprocess.Popen], deadline: float, what: str) -> list[tuple[int, str]]:
    """``[(returncode, stderr)]`` per rank; fails the test (after killing the workers) if they are
    not done by ``deadline`` (``time.monotonic()``)."""
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        pytest.fail(f"{what} did not finish in time: a rank hangs")
    return results


def launch(scenario: str, tmp: Path, world: int = WORLD, timeout: float = TIMEOUT) -> list[tuple[int, str]]:
    """Run ``scenario`` in ``world`` processes and wait for them (bounded by ``timeout`` s)."""
    return finish(start(scenario, tmp, world), time.monotonic() + timeout, f"scenario {scenario!r}")


def run_scenario(scenarios: dict, scenario: str, tmp: Path) -> None:
    """A worker process of the other distributed test modules: run ``scenarios[scenario](tmp)`` on
    this rank, save what it returns as ``{scenario}-rank{rank}.pt`` once every rank is done, and
    leave without the group's teardown (a failed peer's broken connections may abort it)."""
    torch.set_num_threads(1)
    from sharpkit.distributed import get_rank, init_distributed

    init_distributed(timeout=60)
    result = scenarios[scenario](tmp)
    torch.distributed.barrier()
    torch.save(result, tmp / f"{scenario}-rank{get_rank()}.pt")
    sys.stderr.flush()
    os._exit(0)


def _worker(scenario: str, tmp: Path) -> None:
    torch.set_num_threads(1)
    from sharpkit.distributed import get_rank, init_distributed

    init_distributed(timeout=60)
    rank = get_rank()
    result = SCENARIOS[scenario](tmp)
    if result is not None:
        torch.save(result, tmp / f"{scenario}-rank{rank}.pt")
    if scenario == "failures":
        # The group's peer is gone: skip the teardown of its broken connections, which may abort.
        sys.stderr.flush()
        os._exit(0)


def failures(tmp: Path) -> dict[str, str]:
    """Failures on rank 1, one after another in the same group: what each rank saw.

    1. rank 1's loss raises inside a data pass (as a NaN check or a bad batch would);
    2. rank 1 cannot read its checkpoint (a step outside a data pass, guarded by ``agree``);
    3. after both, the group still works; then rank 1 dies outright before a collective.
    """
    from sharpkit.distributed import PeerFailure, agree, all_reduce_sum_, get_rank
    from sharpkit.objective import Objective

    rank, seen = get_rank(), {}
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        if rank == 1 and calls["n"] >= 3:
            raise ValueError("loss is not finite on this shard")
        return nn.functional.cross_entropy(out, y)

    def attempt(name, fn):
        try:
            fn()
            seen[name] = "ok"
        except PeerFailure as exc:
            seen[name] = f"PeerFailure: {exc}"
        except Exception as exc:  # noqa: BLE001 - the test inspects what was raised
            seen[name] = f"{type(exc).__name__}: {exc} {' '.join(getattr(exc, '__notes__', []))}"

    obj = Objective(make_model(), loss_fn, data_variants()["batches"])

    def passes():
        for _ in range(5):
            obj.loss_and_grad(obj.x0())

    def load():
        with agree("loading the checkpoint"):
            if rank == 1:
                raise FileNotFoundError("checkpoint missing on this node: /nonexistent.pt")

    def rank0_fails():
        from sharpkit.distributed import main_process_computes

        def train():
            raise RuntimeError("training diverged")

        main_process_computes(train, "training")

    def rank0_unpicklable():
        from sharpkit.distributed import main_process_computes

        main_process_computes(lambda: (lambda: None), "returning a function")

    def plan():
        # Rank 1's batch (index 1) does not fit the model: found while planning the passes.
        import sharpkit as sk

        x, y = make_data(40)
        batches = [(x[0:10], y[0:10]), (x[10:20, :7], y[10:20]), (x[20:30], y[20:30]), (x[30:], y[30:])]
        sk.hessian(make_model(), nn.CrossEntropyLoss(), batches)

    def shuffled():
        import sharpkit as sk

        torch.manual_seed(100 + rank)  # DDP scripts seed ranks apart: each would draw its own order
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*make_data()), batch_size=8, shuffle=True)
        sk.keskar_sharpness(make_model(), nn.CrossEntropyLoss(), loader, max_iter=1)

    def m_sharpness_on_a_part():
        import sharpkit as sk
        from sharpkit.distributed import local_data

        x, y = make_data()
        part = (x[:8], y[:8]) if rank == 0 else (x[8:12], y[8:12])
        sk.adaptive_sharpness(make_model(), nn.CrossEntropyLoss(), local_data(part), rho=0.1, m=4, max_iter=2)

    attempt("in_pass", passes)
    attempt("load", load)
    attempt("rank0_alone", rank0_fails)
    attempt("rank0_unpicklable", rank0_unpicklable)
    attempt("plan", plan)
    attempt("shuffled", shuffled)
    attempt("m_local", m_sharpness_on_a_part)
    t = torch.ones(2)
    attempt("after", lambda: all_reduce_sum_([t]))
    seen["after_value"] = str(t.tolist())
    if rank == 1:
        torch.save(seen, tmp / "failures-rank1.pt")
        os._exit(3)
    t0 = time.monotonic()
    attempt("peer_died", lambda: all_reduce_sum_([t]))
    seen["peer_died_seconds"] = str(time.monotonic() - t0)
    return seen


def study_config(tmp: Path):
    """A tiny study (one small MLP, one seed, two epochs) on a toy data file."""
    import numpy as np

    from sharpkit.study.pipeline import StudyConfig

    path = tmp / "toy.npz"
    if not path.exists() and _rank() == 0:
        g = np.random.default_rng(0)
        x = g.normal(size=(120, 12)).astype(np.float32)
        y = (x @ g.normal(size=(12, 3))).argmax(1)
        np.savez(path, x_train=x[:96], y_train=y[:96], x_test=x[96:], y_test=y[96:])
    _barrier()
    return StudyConfig(
        data=str(path), models=("f1",), f1_width=16, f1_depth=2, sb=8, lb=32, seeds=(0,), max_epochs=2,
        patience=2, eps=(1e-3,), solvers=("apgd",), sharpness_iters=3, sharpness_samples=64, curvature_samples=64,
        trace_matvecs=3, warm_epochs=(0, 1), track_every=1, curve_points=3, lb_epochs_factor=1.0, device="cpu",
    )


def study_run(tmp: Path) -> dict:
    from sharpkit.study.pipeline import run_study

    results = run_study(study_config(tmp), tmp / "study", progress=True, threads=1)
    return {"models": results["models"]}


SCENARIOS = {
    "measure": measure_all,
    "failures": failures,
    "study": study_run,
}


# --------------------------------------------------------------------------- tests


def _compare(dist_results: list[dict[str, torch.Tensor]], single: dict[str, torch.Tensor]) -> None:
    r0, r1 = dist_results
    assert set(r0) == set(single) == set(r1)
    for key, ref in single.items():
        a, b = r0[key], r1[key]
        assert torch.equal(a, b), f"{key}: ranks disagree"
        assert a.shape == ref.shape, key
        err = (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0
        scale = ref.double().abs().max().item() if ref.numel() else 0.0
        assert err <= RTOL * max(scale, 1e-12), f"{key}: distributed {a} vs single-process {ref}"


def test_measurements_match_single_process(tmp_path):
    """Objective, HVPs, L-BFGS-B, landscape, the public API and audits on 2 ranks vs 1 process."""
    procs = start("measure", tmp_path)
    deadline = time.monotonic() + TIMEOUT
    single = measure_all(tmp_path / "single")  # meanwhile, the single-process reference
    results = finish(procs, deadline, "scenario 'measure'")
    for rank, (rc, err) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{err[-3000:]}"
    # Progress is shown by rank 0 only.
    assert "audit" in results[0][1] and "audit" not in results[1][1]
    dist_results = [torch.load(tmp_path / f"measure-rank{r}.pt") for r in range(WORLD)]
    assert single["empty_rank/num_samples"].item() == 5
    _compare(dist_results, single)
    for group, count in ((2, 2), (1, 1)):
        lines = (tmp_path / f"audit-{group}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == count  # one row per checkpoint: rank 1 wrote nothing


def test_failing_rank_is_reported_once_and_nobody_hangs(tmp_path):
    (rc0, err0), (rc1, _) = launch("failures", tmp_path, timeout=90)
    assert rc1 == 3, err0
    assert rc0 == 0, err0
    r0, r1 = (torch.load(tmp_path / f"failures-rank{r}.pt") for r in range(WORLD))
    # The failing rank raises its own error, noting its rank; the other a short PeerFailure.
    assert r1["in_pass"].startswith("ValueError: loss is not finite on this shard") and "rank 1 of 2" in r1["in_pass"]
    assert r0["in_pass"].startswith("PeerFailure: rank 1 failed") and "not finite" not in r0["in_pass"]
    assert r1["load"].startswith("FileNotFoundError: checkpoint missing")
    assert r0["load"].startswith("PeerFailure: rank 1 failed during loading the checkpoint")
    assert r0["rank0_alone"].startswith("RuntimeError: training diverged")
    assert r1["rank0_alone"].startswith("PeerFailure: rank 0 failed during training")
    assert "pickle" in r0["rank0_unpicklable"].lower(), r0["rank0_unpicklable"]
    assert r1["rank0_unpicklable"].startswith("PeerFailure: rank 0 failed during returning a function")
    assert r1["plan"].startswith("RuntimeError") and "planning the data passes" in r1["plan"]
    assert r0["plan"].startswith("PeerFailure: rank 1 failed during planning the data passes")
    for r in (r0, r1):  # refused on every rank, before any collective
        assert r["shuffled"].startswith("ValueError: a DataLoader with shuffle=True"), r["shuffled"]
        assert r["m_local"].startswith("ValueError: m-sharpness needs the full data"), r["m_local"]
    # The group survives reported failures ...
    assert r0["after"] == r1["after"] == "ok" and r0["after_value"] == r1["after_value"] == "[2.0, 2.0]"
    # ... and a dead peer is an error on rank 0, not a hang.
    assert r0["peer_died"].startswith("RuntimeError") and "Connection" in r0["peer_died"]


def test_wait_group_is_made_anew_for_a_new_process_group(tmp_path):
    """The side group for waiting belongs to the process group it was made in: after the group is
    destroyed and initialised again, a new one is made (the old handle would raise)."""
    import torch.distributed as dist

    from sharpkit.distributed import _wait_group

    groups = []
    for round_ in range(2):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store{round_}", rank=0, world_size=1)
        try:
            groups.append(_wait_group())
            assert _wait_group() is groups[-1]  # kept within one process group
            dist.barrier(group=groups[-1])
        finally:
            dist.destroy_process_group()
    assert groups[0] is not groups[1]


def cli_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Data for the command-line test (``--data test_distributed:cli_data``)."""
    return make_data()


def cli_model(*_args, **_kwargs) -> nn.Module:
    """The model for the command-line test (``--model test_distributed:cli_model``)."""
    return make_model()


def test_torchrun_audit_command_matches_single_process(tmp_path):
    """``torchrun --nproc_per_node=2 -m sharpkit audit`` writes the rows a single process writes."""
    import json

    from sharpkit.cli import main

    ck = tmp_path / "ckpts"
    ck.mkdir()
    for i in range(2):
        torch.save(make_model(seed=20 + i).state_dict(), ck / f"m{i}.pt")
    args = ["audit", str(ck), "--model", "test_distributed:cli_model", "--data", "test_distributed:cli_data",
            "--metrics", "keskar,top-eig", "--max-iter", "3", "--lanczos-steps", "5", "--dtype", "float64",
            "--group-size", "2", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", "-m", "sharpkit", *args, "--out", str(tmp_path / "dist.jsonl")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    sys.path.insert(0, str(HERE.parent))
    try:
        code = main(args + ["--out", str(tmp_path / "single.jsonl")])
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun audit did not finish in time")
    finally:
        sys.path.remove(str(HERE.parent))
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert code == 0
    assert proc.returncode == 0, err[-3000:]
    assert out.count("keskar") == 1  # the table is printed by rank 0 only
    rows = {}
    for name in ("single", "dist"):
        lines = (tmp_path / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == 2
        rows[name] = {r["name"]: r for r in map(json.loads, lines)}
    for ck_name, ref in rows["single"].items():
        got = rows["dist"][ck_name]
        assert got["status"] == ref["status"] == "ok"
        for m in ("loss", "keskar", "top-eig"):
            assert got[m] == pytest.approx(ref[m], rel=RTOL), (ck_name, m)


# --------------------------------------------------------------------------- in-process units


def test_shard_assigns_every_sample_once():
    from sharpkit.data import as_batches

    x, y = make_data(23)
    cases = [
        as_batches((x, y)),  # one pair: split by rows
        as_batches((x, y), batch_size=4),  # 6 batches, round robin
        as_batches([(x[:20], y[:20]), (x[20:], y[20:])]),
        as_batches([(x[:0], y[:0]), (x, y), (x[:0], y[:0])]),  # empty batches skipped
    ]
    for batches in cases:
        for world in (1, 2, 3, 5, 40):
            parts = [list(batches.shard(r, world)) for r in range(world)]
            got = torch.cat([xb for part in parts for xb, _ in part])
            ref = torch.cat([xb for xb, _ in batches])
            assert got.shape == ref.shape
            # Same multiset of rows: sort by the first feature (distinct random values).
            assert torch.equal(got[got[:, 0].argsort()], ref[ref[:, 0].argsort()])
            counts = [sum(xb.shape[0] for xb, _ in part) for part in parts]
            assert sum(counts) == 23
            assert all(batches.shard(r, world).is_sharded for r in range(world))


def test_shard_keeps_batches_whole_and_validates():
    from sharpkit.data import as_batches

    x, y = make_data(10)
    b = as_batches((x, y), batch_size=3)  # 3, 3, 3, 1
    sizes = [[xb.shape[0] for xb, _ in b.shard(r, 2)] for r in range(2)]
    assert sizes == [[3, 3], [3, 1]]
    with pytest.raises(ValueError, match="rank"):
        b.shard(2, 2)
    with pytest.raises(ValueError, match="world_size"):
        b.shard(0, 0)
    with pytest.raises(ValueError, match="already sharded"):
        b.shard(0, 2).shard(0, 2)


def test_single_process_is_unchanged():
    """Without a process group every helper is a no-op and Objective does not shard."""
    from sharpkit import distributed as D
    from sharpkit.objective import Objective

    assert not D.is_distributed() and D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    t = torch.arange(3.0)
    D.all_reduce_sum_([t])
    D.broadcast_([t])
    assert torch.equal(t, torch.arange(3.0))
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    obj = Objective(make_model(), nn.CrossEntropyLoss(), make_data())
    assert not obj.distributed and not obj.batches.is_sharded and obj.num_samples == 37
    with pytest.raises(ValueError, match="empty"):
        D.count_samples(data_variants()["empty_rank"].shard(1, 2))


def test_distributed_true_without_launcher_is_a_clear_error(monkeypatch):
    from sharpkit.objective import Objective

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        Objective(make_model(), nn.CrossEntropyLoss(), make_data(), distributed=True)


def test_presharded_data_without_group_is_the_local_objective():
    """local_data marks a user-sharded iterable; alone (world 1) it is the plain objective."""
    from sharpkit import distributed as D
    from sharpkit.objective import Objective

    data = data_variants()["batches"]
    local = D.local_data(data)
    assert local.is_sharded
    a = Objective(make_model(), nn.CrossEntropyLoss(), local)
    b = Objective(make_model(), nn.CrossEntropyLoss(), data)
    x = b.x0()
    assert a.distributed and a.num_samples == b.num_samples
    torch.testing.assert_close(a.loss(x), b.loss(x), rtol=0, atol=0)


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
