"""Every measurement under torch.distributed with 2 and 3 CPU ranks (gloo) against one process.

One spawn per world size runs the whole matrix (data layouts x measurements) on every rank, with
each rank's global random state seeded apart (results must not depend on it); the test compares
every rank's numbers with the single-process run of the same code (float64, to rounding), checks
the ranks agree bit for bit, and that every call left the model exactly as found.  A second
scenario makes one rank fail (bad data on that rank only) in each kind of measurement: every rank
must stop with an error, none may hang, and the model must be left as found.
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from test_distributed import finish, run_scenario, start  # the launcher of the distributed tests

HERE = Path(__file__).resolve()
RTOL = 1e-9
TIMEOUT = 240


# --------------------------------------------------------------------------- problem


def make_model(bn: bool = False, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    # (no bias before BatchNorm: its gradient is zero in training mode, and sign steps on rounding noise)
    layers = [nn.Linear(6, 5, bias=not bn), nn.Tanh(), nn.Linear(5, 3)]
    if bn:
        layers.insert(1, nn.BatchNorm1d(5))
    model = nn.Sequential(*layers).double()
    if bn:
        with torch.no_grad():  # running statistics that differ from the batch statistics
            model[1].running_mean.uniform_(-0.5, 0.5)
            model[1].running_var.uniform_(0.5, 2.0)
            model[1].num_batches_tracked.fill_(7)
    return model


def make_data(n: int = 29) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def layouts() -> dict[str, tuple[object, nn.Module]]:
    """Data layouts (with the loss they are measured with): uneven shards for 2 and 3 ranks, a
    DataLoader, ranks without samples, ignored targets and class weights on one rank only."""
    from sharpkit.data import as_batches

    x, y = make_data()
    ce = nn.CrossEntropyLoss()
    ignored = y.clone()
    ignored[7:13] = -100  # all in batch 1 (rank 1)
    yw = y.clone()
    yw[7:14] = 2  # class 2, weighted heavily, concentrated in batch 1
    yw[:7][yw[:7] == 2] = 0
    yw[14:][yw[14:] == 2] = 1
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 0.5, 4.0], dtype=torch.float64))
    dataset = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=6)
    # Shuffled alike on every rank: a generator seeded the same (each pass draws another order).
    sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    shuffled = torch.utils.data.DataLoader(dataset, batch_sampler=torch.utils.data.BatchSampler(sampler, 6, False))
    return {
        "pair": ((x, y), ce),  # split by rows: 14/15, 9/10/10
        "batches": ([(x[0:7], y[0:7]), (x[7:13], y[7:13]), (x[13:22], y[13:22]), (x[22:], y[22:])], ce),
        "loader": (loader, ce),  # 5 batches of 6, 6, 6, 6, 5
        "shuffled": (shuffled, ce),
        "empty_ranks": (as_batches((x[:5], y[:5]), batch_size=8), ce),  # one batch: rank 0 only
        "ignored": ([(x[0:7], y[0:7]), (x[7:13], ignored[7:13]), (x[13:22], y[13:22]), (x[22:], y[22:])], ce),
        "class_weights": ([(x[0:7], yw[0:7]), (x[7:14], yw[7:14]), (x[14:22], yw[14:22]), (x[22:], yw[22:])],
                          weighted),
    }


def _state(model: nn.Module) -> list:
    """Everything a call must leave as found: tensors (values, dtypes, identity), flags."""
    return [(k, v.detach().clone(), id(v)) for k, v in model.state_dict(keep_vars=True).items()] + \
        [(m.training, getattr(m, "track_running_stats", None)) for m in model.modules()] + \
        [(p.requires_grad, p.grad) for p in model.parameters()]


def _same_state(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for u, v in zip(a, b):
        if isinstance(u[1], torch.Tensor):
            if u[0] != v[0] or u[2] != v[2] or u[1].dtype != v[1].dtype or not torch.equal(u[1], v[1]):
                return False
        elif u != v:
            return False
    return True


def _rng_apart() -> None:
    """Seed this process's global random states apart from every other rank's (DDP scripts do)."""
    from sharpkit.distributed import get_rank

    r = 1000 + 17 * get_rank()
    torch.manual_seed(r)
    np.random.seed(r)
    random.seed(r)


def _t(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64).detach().clone().reshape(-1)


def measure(model: nn.Module, loss_fn, data, bn: str, full: bool) -> dict[str, torch.Tensor]:
    """The measurements of one layout; ``full`` adds the slower ones."""
    import sharpkit as sk
    from sharpkit.landscape import evaluate

    out = {}
    n = sum(p.numel() for p in model.parameters())
    V = torch.randn(n, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    H = sk.hessian(model, loss_fn, data, bn=bn)
    out["hvp"] = H @ V
    out["hvp_generic"] = sk.hessian(model, loss_fn, data, bn=bn, engine="generic", cache=False) @ V[:, 0]
    out["ggn"] = sk.ggn(model, loss_fn, data, bn=bn) @ V
    out["eig"] = _t(sk.eigenvalues(H, k=2, seed=0, max_steps=12).values)
    out["trace"] = _t(sk.trace(H, num_matvecs=9, seed=0).value)
    out["evaluate"] = _t(evaluate(model, loss_fn, data, bn=bn))
    r = sk.keskar_sharpness(model, loss_fn, data, epsilon=1e-2, solver="apgd", max_iter=3, seed=0, bn=bn)
    out["keskar_apgd"] = torch.cat([_t([r.value, r.num_evals]), _t(r.perturbation)])
    r = sk.adaptive_sharpness(model, loss_fn, data, rho=5e-2, max_iter=3, seed=0, bn=bn)
    out["adaptive"] = torch.cat([_t([r.value, r.loss]), _t(r.perturbation)])
    if full:
        d = sk.spectral_density(H, num_runs=2, lanczos_steps=5, seed=0, grid=20)
        out["density"] = torch.cat([_t(d.nodes), _t(d.density)])
        out["hutchinson"] = _t(sk.trace(H, method="hutchinson", num_matvecs=6, seed=1).value)
        r = sk.keskar_sharpness(model, loss_fn, data, epsilon=1e-2, solver="lbfgsb", max_iter=3, seed=0, bn=bn)
        out["keskar_lbfgsb"] = torch.cat([_t([r.value, r.num_evals]), _t(r.perturbation)])
        r = sk.keskar_sharpness(model, loss_fn, data, epsilon=1e-2, subspace_dim=4, solver="pga", max_iter=3,
                                seed=3, bn=bn)
        out["keskar_subspace"] = torch.cat([_t([r.value]), _t(r.perturbation)])
        r = sk.adaptive_sharpness(model, loss_fn, data, rho=5e-2, kind="average", max_iter=3, seed=2, bn=bn)
        out["adaptive_average"] = _t([r.value, r.loss])
        r = sk.adaptive_sharpness(model, loss_fn, data, rho=5e-2, m=5, max_iter=2, seed=0, bn=bn)
        out["m_sharpness"] = torch.cat([_t([r.value, r.loss]), _t(r.perturbation)])
        c = sk.interpolate(model, make_model(bn=any(isinstance(m, nn.BatchNorm1d) for m in model.modules()), seed=5),
                           loss_fn, data, alphas=[0.0, 0.5, 1.0], bn=bn)
        out["interpolate"] = torch.cat([_t(c.loss), _t(c.accuracy)])
    return out


def matrix(tmp: Path) -> dict[str, torch.Tensor]:
    """Every layout x measurement; raises if a call changed the model."""
    res = {}
    cases = [(name, data, loss_fn, False, "eval", name in ("batches", "empty_ranks"))
             for name, (data, loss_fn) in layouts().items()]
    x, y = make_data()
    for bn in ("train", "eval"):
        cases.append((f"bn_{bn}_pair", (x, y), nn.CrossEntropyLoss(), True, bn, bn == "train"))
        cases.append((f"bn_{bn}_batches", [(x[i:i + 8], y[i:i + 8]) for i in range(0, 29, 8)],
                      nn.CrossEntropyLoss(), True, bn, False))
    for name, data, loss_fn, bn_model, bn, full in cases:
        model = make_model(bn=bn_model)
        before = _state(model)
        _rng_apart()
        for key, value in measure(model, loss_fn, data, bn, full).items():
            res[f"{name}/{key}"] = value.detach().clone()
        assert _same_state(before, _state(model)), f"{name}: the model was changed"
    return res


def audit_rows(tmp: Path) -> dict[str, torch.Tensor]:
    """sk.audit of two checkpoints (stacked, and one at a time with L-BFGS-B) on uneven batches
    with class weights on one rank; rank 0 writes the rows, every rank returns them."""
    import sharpkit as sk
    from sharpkit.distributed import barrier, get_rank

    ck = tmp / "ckpts"
    if get_rank() == 0:
        ck.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            torch.save(make_model(seed=10 + i).state_dict(), ck / f"m{i}.pt")
    barrier()
    data, loss_fn = layouts()["class_weights"]
    model = make_model()
    res = {}
    for group, solver in ((2, "apgd"), (1, "lbfgsb")):
        before = _state(model)
        _rng_apart()
        rows = sk.audit(ck, model, data, metrics="keskar,keskar-subspace,adaptive,top-eig,trace", loss_fn=loss_fn,
                        solver=solver, subspace_dim=4, max_iter=3, lanczos_steps=5, trace_samples=3,
                        group_size=group, out=tmp / f"audit-{group}-rank{get_rank()}.jsonl")
        assert _same_state(before, _state(model)), "audit changed the model"
        for row in rows:
            assert row["status"] == "ok", row
            res[f"audit{group}/{row['name']}"] = _t([row[m] for m in
                                                     ("loss", "keskar", "keskar-subspace", "adaptive", "top-eig",
                                                      "trace")])
    return res


def cli_model(*_args, **_kwargs) -> nn.Module:
    """The model of the command-line runs (``--model test_distributed_matrix:cli_model``)."""
    return make_model()


def commands(tmp: Path) -> dict[str, torch.Tensor]:
    """``sharpkit landscape`` and ``sharpkit sharpness`` on uneven batches (rank 0 writes)."""
    import json

    from sharpkit.cli import main
    from sharpkit.distributed import barrier, get_rank

    x, y = make_data()
    if get_rank() == 0:
        torch.save({"x_train": x, "y_train": y}, tmp / "data.pt")
        for i in range(2):
            torch.save(make_model(seed=20 + i).state_dict(), tmp / f"cli{i}.pt")
    barrier()
    common = ["--model", "test_distributed_matrix:cli_model", "--data", str(tmp / "data.pt"), "--dtype", "float64",
              "--batch-size", "7", "--bn", "eval"]
    res = {}
    for name, args in (("landscape", ["--a", str(tmp / "cli0.pt"), "--b", str(tmp / "cli1.pt"), "--points", "3",
                                      "--no-progress"]),
                       ("sharpness", ["--checkpoint", str(tmp / "cli0.pt"), "--max-iter", "3", "--epsilon", "1e-2"])):
        out = tmp / f"cli-{name}.json"
        _rng_apart()
        assert main([name, *common, *args, "--out", str(out)]) == 0
        barrier()
        result = json.loads(out.read_text(encoding="utf-8"))
        if name == "landscape":
            res["cli/landscape"] = torch.cat([_t(result["loss"]), _t(result["accuracy"])])
        else:
            res["cli/sharpness"] = _t([r["value"] for r in result["results"]])
        barrier()
    return res


def shared_decisions(tmp: Path) -> dict[str, torch.Tensor]:
    """Decisions every rank must take alike although they depend on its data: the HVP engine
    where a rank holds no samples (no sample shape to judge the model by), and the primal-pass
    cache where the ranks hold different numbers of batches of a seeded shuffling loader (a rank
    that caches stops reading it, and its order falls out of step with the others')."""
    import sharpkit as sk
    from sharpkit.data import as_batches

    res = {}
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Flatten(), nn.Linear(10, 3)).double()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(5, 2, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    res["engine/trace"] = _t(sk.trace(sk.hessian(model, nn.CrossEntropyLoss(), as_batches((x, y), batch_size=8)),
                                      num_matvecs=9, seed=0).value)
    x, y = torch.randn(8200, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8200,), generator=g)
    dataset = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3000, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model = make_model()
    H = sk.hessian(model, nn.CrossEntropyLoss(), loader, engine="generic")
    v = torch.ones(H.shape[0], dtype=torch.float64)
    res["cache/products"] = torch.cat([H @ v for _ in range(3)])
    return res


def measure_all(tmp: Path) -> dict[str, torch.Tensor]:
    tmp.mkdir(parents=True, exist_ok=True)
    res = matrix(tmp)
    res.update(shared_decisions(tmp))
    res.update(audit_rows(tmp))
    res.update(commands(tmp))
    return res


def failures(tmp: Path) -> dict[str, str]:
    """Bad data on the last rank only (targets out of range, or inputs of the wrong width, in the
    one batch it holds) in every kind of measurement: what each rank raised, and whether the model
    was left as found.  The group must still work afterwards."""
    import sharpkit as sk
    from sharpkit.distributed import PeerFailure, all_reduce_sum_, get_rank, get_world_size, local_data
    from sharpkit.landscape import evaluate

    rank, world = get_rank(), get_world_size()
    last = world - 1
    x, y = make_data(8 * world)
    ce = nn.CrossEntropyLoss()
    seen: dict[str, str] = {}
    for bad in ("targets", "features"):
        batches = [(x[8 * i:8 * i + 8], y[8 * i:8 * i + 8]) for i in range(world)]
        if bad == "targets":
            batches[-1] = (batches[-1][0], torch.full_like(batches[-1][1], 7))
        else:
            batches[-1] = (batches[-1][0][:, :4], batches[-1][1])
        model = make_model()
        calls = {
            "hvp": lambda: sk.hessian(model, ce, batches) @ torch.ones(53, dtype=torch.float64),
            "ggn_fused": lambda: sk.ggn(model, ce, batches, engine="fused", cache=False) @ torch.ones(53, dtype=torch.float64),
            "eig": lambda: sk.eigenvalues(sk.hessian(model, ce, batches, regroup=False), k=1, max_steps=3),
            "keskar_lbfgsb": lambda: sk.keskar_sharpness(model, ce, batches, max_iter=2),
            "keskar_apgd": lambda: sk.keskar_sharpness(model, ce, batches, solver="apgd", max_iter=2),
            "keskar_subspace": lambda: sk.keskar_sharpness(model, ce, batches, subspace_dim=3, solver="pga",
                                                           max_iter=2),
            "adaptive": lambda: sk.adaptive_sharpness(model, ce, batches, rho=0.05, max_iter=2),
            "adaptive_average": lambda: sk.adaptive_sharpness(model, ce, batches, rho=0.05, kind="average",
                                                              max_iter=2),
            "evaluate": lambda: evaluate(model, ce, batches),
            "interpolate": lambda: sk.interpolate(model, make_model(seed=3), ce, batches, alphas=[0.0, 1.0]),
            "audit": lambda: sk.audit(tmp / "ck.pt", model, batches, metrics="keskar,top-eig", max_iter=2,
                                      lanczos_steps=3),
            # Each rank's own pair (already sharded): the bad one fails in the model's first forward.
            "local_pair": lambda: sk.keskar_sharpness(model, ce, local_data(batches[rank]), max_iter=2),
            "local_pair_evaluate": lambda: evaluate(model, ce, local_data(batches[rank])),
        }
        if rank == 0:
            torch.save(make_model(seed=4).state_dict(), tmp / "ck.pt")
        for name, call in calls.items():
            before = _state(model)
            try:
                result = call()
                seen[f"{bad}/{name}"] = f"ok {result if name == 'audit' else ''}"
            except PeerFailure as exc:
                seen[f"{bad}/{name}"] = f"PeerFailure: {exc}"
            except Exception as exc:  # noqa: BLE001 - the test reads what was raised
                seen[f"{bad}/{name}"] = f"{type(exc).__name__}: {exc} {' '.join(getattr(exc, '__notes__', []))}"
            if not _same_state(before, _state(model)):
                seen[f"{bad}/{name}"] += " [MODEL CHANGED]"
    # Ranks that took different code paths and so add other sums (a size or only a shape apart):
    # a clear error on every rank, nothing exchanged (gloo aborted the process, or added the wrong
    # numbers silently).
    from sharpkit.distributed import sharded_pass

    for name, shape in (("size", (3 + (rank == last),)), ("shape", (2, 3) if rank == last else (3, 2))):
        acc = torch.full(shape, float(rank + 1))
        try:
            with sharded_pass([acc], what="a test pass"):
                pass
            seen[f"mismatch/{name}"] = f"ok {acc.tolist()}"
        except Exception as exc:  # noqa: BLE001
            seen[f"mismatch/{name}"] = f"{type(exc).__name__}: {exc}"
        seen[f"mismatch/{name}/untouched"] = str(bool((acc == rank + 1).all()))
    t = torch.ones(2)
    all_reduce_sum_([t])
    seen["after"] = str(t.tolist())
    return seen


SCENARIOS = {"matrix": measure_all, "failures": failures}


# --------------------------------------------------------------------------- launching


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("world", [2, 3])
def test_every_measurement_matches_single_process(tmp_path, world):
    procs = start("matrix", tmp_path, world, script=HERE)
    deadline = time.monotonic() + TIMEOUT
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = measure_all(tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    results = finish(procs, deadline, f"matrix on {world} ranks")
    for rank, (rc, err) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{err[-4000:]}"
    got = [torch.load(tmp_path / f"matrix-rank{r}.pt") for r in range(world)]
    bad = []
    for key, ref in single.items():
        for r in range(world):
            a = got[r].get(key)
            if a is None or a.shape != ref.shape:
                bad.append(f"{key}: rank {r} has {None if a is None else tuple(a.shape)}, single {tuple(ref.shape)}")
                continue
            if not torch.equal(a, got[0][key]):
                bad.append(f"{key}: rank {r} differs from rank 0")
            err = (a - ref).abs().max().item() if a.numel() else 0.0
            if not err <= RTOL * max(ref.abs().max().item() if ref.numel() else 0.0, 1e-12):
                i = int((a - ref).abs().argmax()); bad.append(f"{key}: rank {r} at {i}: {a[i].item()!r} vs single {ref[i].item()!r} (of {a.numel()})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("world", [2, 3])
def test_bad_data_on_one_rank_stops_every_rank(tmp_path, world):
    results = finish(start("failures", tmp_path, world, script=HERE), time.monotonic() + TIMEOUT, f"failures on {world} ranks")
    for rank, (rc, err) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{err[-4000:]}"
    seen = [torch.load(tmp_path / f"failures-rank{r}.pt") for r in range(world)]
    bad = []
    last = world - 1
    for r in range(world):
        for name in ("size", "shape"):
            got = seen[r][f"mismatch/{name}"]
            assert got.startswith("RuntimeError: the ranks disagree on the sums of a test pass"), (r, got)
            assert seen[r][f"mismatch/{name}/untouched"] == "True"
    for key in seen[0]:
        if key == "after" or key.startswith("mismatch/"):
            continue
        for r in range(world):
            got = seen[r][key]
            if "MODEL CHANGED" in got:
                bad.append(f"{key}: rank {r} changed the model: {got}")
            if r == last and not (got.split(":")[0] not in ("ok", "PeerFailure") and f"rank {last} of {world}" in got):
                bad.append(f"{key}: the failing rank {r} raised {got!r}")
            if r != last and not got.startswith(f"PeerFailure: rank {last} failed"):
                bad.append(f"{key}: rank {r} raised {got!r}")
    assert not bad, "\n".join(bad)
    assert all(s["after"] == f"{[float(world)] * 2}" for s in seen)


def test_shard_refuses_samplers_that_order_the_ranks_apart():
    """Sharding deals batch j to rank j % world: a sampler that draws from each process's global
    random state (inside a batch sampler too), or hands each rank its own part (DistributedSampler),
    would make the ranks count some samples twice and miss others; refused with the remedy.
    Seeded samplers and plain orders are kept."""
    from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler,
                                  SubsetRandomSampler, TensorDataset, WeightedRandomSampler)

    from sharpkit.distributed import local_data, shard

    ds = TensorDataset(*make_data())
    refused = {
        "batch_sampler": DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 6, False)),
        "subset": DataLoader(ds, sampler=SubsetRandomSampler(range(29)), batch_size=6),
        "weighted": DataLoader(ds, sampler=WeightedRandomSampler(torch.ones(29), 29), batch_size=6),
        "shuffle": DataLoader(ds, batch_size=6, shuffle=True),
    }
    for name, loader in refused.items():
        with pytest.raises(ValueError, match="global random state"):
            shard(loader, rank=0, world_size=2)
    with pytest.raises(ValueError, match="DistributedSampler"):
        shard(DataLoader(ds, sampler=DistributedSampler(ds, num_replicas=2, rank=0), batch_size=6), rank=0,
              world_size=2)
    seeded = torch.Generator().manual_seed(0)
    kept = [
        DataLoader(ds, batch_size=6),
        DataLoader(ds, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(0)),
        DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds, generator=seeded), 6, False)),
        DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 6, False)),
        DataLoader(ds, sampler=SubsetRandomSampler(range(29), generator=seeded), batch_size=6),
    ]
    for loader in kept:
        assert sum(x.shape[0] for r in range(2) for x, _ in shard(loader, rank=r, world_size=2)) == 29
    # This rank's own part, declared as such, is taken as given.
    part = DataLoader(ds, sampler=DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False), batch_size=6)
    assert local_data(part).num_samples() == 15


if __name__ == "__main__":
    run_scenario(SCENARIOS, sys.argv[1], Path(sys.argv[2]))
