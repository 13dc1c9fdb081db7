"""Sharded measurements as a demanding user runs them: 2 and 3 gloo CPU ranks against one process
and against independent float64 references, and ranks that hold different things.

The spawned scenarios use test_distributed's launcher (RANK/WORLD_SIZE/MASTER_* set as torchrun
sets them; a subprocess deadline turns a hang into a failure).  Each rank seeds its global random
state apart (DDP scripts do): every random draw a measurement makes (Hutchinson probes, subspace
matrices, random starts) must come from its seed, so the ranks agree bit for bit.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from test_distributed import finish, run_scenario, start  # the launcher of the distributed tests

HERE = Path(__file__).resolve()
TIMEOUT = 150
RTOL = 1e-9  # distributed against one process (float64: only the order of the sums differs)


# --------------------------------------------------------------------------- problems


def make_model(kind: str, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mse":
        layers = [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)]
    elif kind == "dropout":
        layers = [nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3)]
    elif kind == "bn":
        layers = [nn.Linear(4, 5, bias=False), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)]
    else:
        layers = [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)]
    model = nn.Sequential(*layers).double()
    if kind == "bn":
        with torch.no_grad():  # running statistics unlike any batch's
            model[1].running_mean.copy_(torch.linspace(-0.4, 0.4, 5))
            model[1].running_var.copy_(torch.linspace(0.5, 2.0, 5))
    return model


def make_data(n: int = 25, regression: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64) if regression else torch.randint(0, 3, (n,), generator=g)
    return x, y


def split(x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    bounds = np.cumsum([0] + sizes)
    assert bounds[-1] == x.shape[0]
    return [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def cases() -> dict[str, tuple[str, object, object, str]]:
    """``name: (model kind, loss, data, bn)``.  Uneven batches: on 2 ranks 7+9+5 / 3+1 samples,
    on 3 ranks 7+1 / 3+5 / 9; a loader of 6 batches of 4 and one of 1 (3 ranks: 4+4+1 / 4+4 /
    4+4); one batch of 4 and one of 2 (3 ranks: the last holds nothing)."""
    from sharpkit.data import as_batches

    x, y = make_data()
    xr, yr = make_data(regression=True)
    ignored = y.clone()
    ignored[3:9] = -1
    ignored[20] = -1
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64), ignore_index=-1)
    uneven = [7, 3, 9, 1, 5]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    return {
        "mse": ("mse", nn.MSELoss(), split(xr, yr, uneven), "eval"),
        # Dropout is off in every measurement, bn="train" included.
        "dropout_weighted_ignored": ("dropout", weighted, split(x, ignored, uneven), "train"),
        "bn_train": ("bn", nn.CrossEntropyLoss(), split(x, y, [7, 3, 9, 2, 4]), "train"),
        "bn_eval": ("bn", nn.CrossEntropyLoss(), split(x, y, [7, 3, 9, 2, 4]), "eval"),
        "loader_last_batch": ("plain", nn.functional.cross_entropy, loader, "eval"),
        "empty_rank": ("plain", nn.CrossEntropyLoss(), as_batches((x[:6], y[:6]), batch_size=4), "eval"),
    }


def second_model(kind: str, model: nn.Module) -> nn.Module:
    """The other end of the interpolation (BatchNorm: with the first model's running statistics,
    which interpolate with bn="eval" requires)."""
    other = make_model(kind, seed=5)
    if kind == "bn":
        with torch.no_grad():
            other[1].running_mean.copy_(model[1].running_mean)
            other[1].running_var.copy_(model[1].running_var)
    return other


def state(model: nn.Module) -> list:
    """What a measurement must leave as found: tensors (bits, identity), flags, gradients."""
    return [(k, v.detach().clone(), id(v)) for k, v in model.state_dict(keep_vars=True).items()] + \
        [m.training for m in model.modules()] + [(p.requires_grad, p.grad) for p in model.parameters()]


def same_state(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for u, v in zip(a, b):
        if isinstance(u, tuple) and isinstance(u[1], torch.Tensor):
            if u[0] != v[0] or u[2] != v[2] or u[1].dtype != v[1].dtype or not torch.equal(u[1], v[1]):
                return False
        elif u != v:
            return False
    return True


def _t(v) -> torch.Tensor:
    return torch.as_tensor(np.asarray(v, dtype=np.float64)).reshape(-1).clone()


def _rng_apart() -> None:
    from sharpkit.distributed import get_rank

    torch.manual_seed(1000 + 17 * get_rank())
    np.random.seed(1000 + 17 * get_rank())


def measure(kind: str, loss_fn, data, bn: str) -> dict[str, torch.Tensor]:
    """Every measurement of one case, run alike single-process and on each rank."""
    import sharpkit as sk
    from sharpkit.objective import Objective
    from sharpkit.params import measurement_mode

    model = make_model(kind)
    before = state(model)
    out = {}
    with measurement_mode(model, bn):
        obj = Objective(model, loss_fn, data)
        x = obj.x0() + DX_SCALE * direction(obj.n)
        f, g = obj.loss_and_grad(x)
        out["loss_grad"] = torch.cat([_t(f.item()), g.detach().clone(), _t(obj.loss(x).item())])
    n = obj.n
    V = torch.randn(n, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    H = sk.hessian(model, loss_fn, data, bn=bn)
    out["hvp"] = (H @ V).reshape(-1)
    out["hvp_generic"] = (sk.hessian(model, loss_fn, data, bn=bn, engine="generic", cache=False) @ V[:, :2]).reshape(-1)
    out["ggn"] = (sk.ggn(model, loss_fn, data, bn=bn) @ V).reshape(-1)
    out["eig"] = _t(sk.eigenvalues(H, k=2, seed=0, tol=1e-10, max_steps=n).values)
    out["trace"] = _t(sk.trace(H, num_matvecs=9, seed=0).value)
    density = sk.spectral_density(H, num_runs=2, lanczos_steps=6, seed=1, grid=20)
    out["density"] = torch.cat([_t(density.nodes), _t(density.weights), _t(density.density)])
    r = sk.keskar_sharpness(model, loss_fn, data, epsilon=5e-2, solver="lbfgsb", max_iter=3, seed=0, bn=bn)
    out["keskar_lbfgsb"] = torch.cat([_t([r.value, r.loss, r.max_loss]), _t(r.perturbation)])
    if kind in SOLVER_KINDS:  # (the other solvers on some cases only: every pass is a collective)
        r = sk.keskar_sharpness(model, loss_fn, data, epsilon=5e-2, subspace_dim=3, solver="lbfgsb", max_iter=2,
                                seed=7, bn=bn)
        out["keskar_subspace_lbfgsb"] = torch.cat([_t([r.value, r.max_loss]), _t(r.perturbation)])
        r = sk.keskar_sharpness(model, loss_fn, data, epsilon=5e-2, solver="pga", max_iter=2, seed=0, bn=bn)
        out["keskar_pga"] = torch.cat([_t([r.value, r.max_loss]), _t(r.perturbation)])
        # Three runs: the third from a random point of the box (drawn from the seed on every rank).
        r = sk.keskar_sharpness(model, loss_fn, data, epsilon=5e-2, subspace_dim=3, solver="apgd", restarts=3,
                                max_iter=2, seed=11, bn=bn)
        out["keskar_subspace_apgd"] = torch.cat([_t([r.value, r.max_loss]), _t(r.perturbation)])
        r = sk.adaptive_sharpness(model, loss_fn, data, rho=0.1, max_iter=2, seed=0, bn=bn)
        out["adaptive"] = torch.cat([_t([r.value, r.loss]), _t(r.perturbation)])
        r = sk.adaptive_sharpness(model, loss_fn, data, rho=0.1, kind="average", max_iter=2, seed=2, bn=bn)
        out["adaptive_average"] = _t([r.value, r.loss])
    curve = sk.interpolate(model, second_model(kind, model), loss_fn, data, alphas=ALPHAS, bn=bn)
    out["interpolate"] = torch.cat([_t(curve.loss), _t(np.nan_to_num(curve.accuracy, nan=-1.0))])
    assert same_state(before, state(model)), f"{kind}: a measurement changed the model"
    return out


ALPHAS = [-0.5, 0.5, 1.5]
DX_SCALE = 0.1
SOLVER_KINDS = ("mse", "dropout", "bn")  # cases measured by every solver (in bn_train and bn_eval)


def direction(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


def measure_all(tmp: Path) -> dict[str, torch.Tensor]:
    res = {}
    for name, (kind, loss_fn, data, bn) in cases().items():
        _rng_apart()
        for key, value in measure(kind, loss_fn, data, bn).items():
            res[f"{name}/{key}"] = value
    return res


# --------------------------------------------------------------------------- independent references


def _batches(data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, y) for x, y in data]


def _batch_weight(loss_fn, y: torch.Tensor) -> float:
    """The denominator of the batch's mean loss: the class weights of its kept targets for
    cross-entropy, its samples for MSE."""
    if isinstance(loss_fn, nn.MSELoss):
        return float(y.shape[0])
    ignore = getattr(loss_fn, "ignore_index", -100)
    kept = y != ignore
    weight = getattr(loss_fn, "weight", None)
    if weight is None:
        return float(kept.sum())
    return float(weight[y[kept]].sum())


class Reference:
    """``f(theta) = sum_b w_b loss_b(theta) / sum_b w_b`` over all the data in one process, by
    plain torch.func (BatchNorm with batch statistics in each batch for bn="train")."""

    def __init__(self, kind: str, loss_fn, data, bn: str):
        self.model = make_model(kind)
        self.model.eval()
        if bn == "train":
            for m in self.model.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.train()
        self.loss_fn = loss_fn
        self.batches = _batches(data)
        self.weights = [_batch_weight(loss_fn, y) for _, y in self.batches]
        self.names = [k for k, _ in self.model.named_parameters()]
        self.shapes = [p.shape for _, p in self.model.named_parameters()]
        self.theta0 = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for name, shape in zip(self.names, self.shapes):
            k = int(np.prod(shape))
            out[name] = theta[i:i + k].reshape(shape)
            i += k
        # Copies of the buffers: batch statistics update them, the model's own stay untouched.
        out.update({k: b.clone() for k, b in self.model.named_buffers()})
        return out

    def output(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.params(theta), (x,))

    def f(self, theta: torch.Tensor) -> torch.Tensor:
        total = sum(w * self.loss_fn(self.output(theta, x), y)
                    for (x, y), w in zip(self.batches, self.weights) if w > 0)
        return total / sum(self.weights)

    def hessian(self) -> torch.Tensor:
        """Row by row by plain double backward (torch.func.hessian differentiates BatchNorm with
        batch statistics wrongly: an asymmetric matrix, torch 2.13)."""
        t = self.theta0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self.f(t), t, create_graph=True)
        return torch.stack([torch.autograd.grad(g[i], t, retain_graph=True)[0] for i in range(t.numel())])

    def ggn(self) -> torch.Tensor:
        n = self.theta0.numel()
        G = torch.zeros(n, n, dtype=torch.float64)
        for (x, y), w in zip(self.batches, self.weights):
            if w == 0:
                continue
            out = self.output(self.theta0, x)
            J = torch.func.jacrev(lambda t: self.output(t, x))(self.theta0).reshape(out.numel(), n)
            Hout = torch.func.hessian(lambda o: self.loss_fn(o, y))(out).reshape(out.numel(), out.numel())
            G += w * J.T @ Hout @ J
        return G / sum(self.weights)

    def keskar_lbfgsb(self, epsilon: float, max_iter: int) -> float:
        """The paper's protocol by scipy's public L-BFGS-B: maximise f on the box
        |y| <= epsilon (|theta| + 1) from y = 0, scipy's defaults but maxiter."""
        from scipy.optimize import minimize

        bound = (epsilon * (self.theta0.abs() + 1)).numpy()

        def neg(y: np.ndarray) -> tuple[float, np.ndarray]:
            t = (self.theta0 + torch.from_numpy(y)).requires_grad_(True)
            value = self.f(t)
            (g,) = torch.autograd.grad(value, t)
            value = value.detach()
            return -value.item(), -g.numpy()

        res = minimize(neg, np.zeros_like(bound), jac=True, method="L-BFGS-B", bounds=list(zip(-bound, bound)),
                       options={"maxiter": max_iter})
        loss = float(self.f(self.theta0))
        return 100.0 * (-float(res.fun) - loss) / (1.0 + loss)


def independent(name: str) -> dict[str, torch.Tensor]:
    """References that share no code with sharpkit, for the measurements that have one."""
    kind, loss_fn, data, bn = cases()[name]
    ref = Reference(kind, loss_fn, data, bn)
    n = ref.theta0.numel()
    x = (ref.theta0 + DX_SCALE * direction(n)).requires_grad_(True)
    f = ref.f(x)
    (g,) = torch.autograd.grad(f, x)
    H, G = ref.hessian(), ref.ggn()
    V = torch.randn(n, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = {
        "loss_grad": torch.cat([_t(f.item()), g, _t(f.item())]),
        "hvp": (H @ V).reshape(-1),
        "hvp_generic": (H @ V[:, :2]).reshape(-1),
        "ggn": (G @ V).reshape(-1),
        "eig": torch.linalg.eigvalsh(H).flip(0)[:2],
        "keskar_lbfgsb": _t(ref.keskar_lbfgsb(5e-2, 3)),
    }
    if kind != "bn":  # (BatchNorm: the running statistics are the same at both ends)
        other = make_model(kind, seed=5)
        theta1 = torch.cat([p.detach().reshape(-1) for p in other.parameters()])
        out["interpolate"] = torch.stack([ref.f((1 - a) * ref.theta0 + a * theta1) for a in ALPHAS]).detach()
    return out


# --------------------------------------------------------------------------- ranks that disagree


def disagreements(tmp: Path) -> dict[str, str]:
    """What each rank raised when the ranks compare things that differ on the last rank only."""
    from sharpkit import distributed as D

    rank, world = D.get_rank(), D.get_world_size()
    last = rank == world - 1
    seen: dict[str, str] = {}

    def attempt(name, fn):
        try:
            fn()
            seen[name] = "ok"
        except D.PeerFailure as exc:
            seen[name] = f"PeerFailure: {exc}"
        except Exception as exc:  # noqa: BLE001 - the test reads what was raised
            seen[name] = f"{type(exc).__name__}: {exc} {' '.join(getattr(exc, '__notes__', []))}"

    ce = nn.CrossEntropyLoss()

    def model(change=None):
        m = make_model("bn").eval()  # (BatchNorm in eval mode reads its running statistics)
        if last and change is not None:
            change(m)
        return m

    def nudge(m):  # one element, by one unit in the last place
        with torch.no_grad():
            m[0].weight[2, 1] = torch.nextafter(m[0].weight[2, 1], torch.tensor(np.inf, dtype=torch.float64))

    def nan(m):
        with torch.no_grad():
            m[3].bias[0] = float("nan")

    def running(m):
        with torch.no_grad():
            m[1].running_var[4] += 1e-9

    def activation(m):
        m[2] = nn.Softsign()

    def frozen(m):
        m[3].bias.requires_grad_(False)

    def bn_eps(m):
        m[1].eps = 1e-3

    # Alike on every rank (the global random state and the devices' indices may differ).
    attempt("alike", lambda: D.check_same("the test", model(), ce, epsilon=1e-3, seed=0, alphas=[0.0, 0.5],
                                          device=torch.device("cpu", rank), fn=lambda o, t: ce(o, t) + rank * 0))
    for name, change in (("parameter", nudge), ("nan", nan), ("buffer", running), ("module", activation),
                         ("frozen", frozen), ("setting", bn_eps), ("dtype", lambda m: m.float())):
        attempt(name, lambda: D.check_same("the model", model(change)))
    # BatchNorm in training mode only writes its running statistics: not compared.
    trained = model(running).train()
    attempt("bn_train_running", lambda: D.check_same("the model", trained))
    smoothing = nn.CrossEntropyLoss(label_smoothing=0.1 if last else 0.0)
    attempt("loss", lambda: D.check_same("the loss", loss_fn=smoothing))
    weights = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 1.0 + last], dtype=torch.float64))
    attempt("loss_weights", lambda: D.check_same("the loss", loss_fn=weights))
    attempt("loss_function", lambda: D.check_same("the loss", loss_fn=(lambda o, t: 2 * ce(o, t)) if last else ce))
    attempt("epsilon", lambda: D.check_same("keskar_sharpness", epsilon=2e-3 if last else 1e-3, seed=0))
    attempt("alphas", lambda: D.check_same("interpolate", alphas=np.array([0.0, 0.5 + last])))

    def digest_fails():
        class Unreadable:
            def __repr__(self):
                raise RuntimeError("cannot describe this object")

        D.check_same("the test", config=Unreadable() if last else 1)

    attempt("digest_fails", digest_fails)
    # A pass whose point differs on the last rank: nothing exchanged, every rank raises.
    point = torch.linspace(0, 1, 200_000, dtype=torch.float64)
    if last:
        point[-1] += 1e-3
    acc = torch.full((3,), float(rank + 1))

    def differing_pass():
        with D.sharded_pass([acc], same=[point], what="the test pass"):
            pass

    attempt("pass_point", differing_pass)
    seen["pass_point/untouched"] = str(acc.tolist())

    def alike_pass():
        with D.sharded_pass([acc], same=[torch.linspace(0, 1, 7), torch.ones(2, 3)], what="the test pass"):
            pass

    attempt("pass_alike", alike_pass)
    seen["pass_alike/sum"] = str(acc.tolist())

    def undigestible_pass():
        with D.sharded_pass([acc], same=[[1.0] if last else torch.ones(1)], what="the test pass"):
            pass

    attempt("pass_undigestible", undigestible_pass)
    attempt("after", alike_pass)
    seen["after/sum"] = str(acc.tolist())
    return seen


def sharpness_of_different_models(tmp: Path) -> dict[str, str]:
    """The public measurements when the last rank holds a model one parameter apart."""
    import sharpkit as sk
    from sharpkit import distributed as D

    rank, world = D.get_rank(), D.get_world_size()
    model = make_model("plain")
    if rank == world - 1:
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-3
    x, y = make_data()
    data, ce = split(x, y, [7, 3, 9, 1, 5]), nn.CrossEntropyLoss()
    calls = {
        "hvp": lambda: sk.hessian(model, ce, data) @ torch.ones(43, dtype=torch.float64),
        "keskar": lambda: sk.keskar_sharpness(model, ce, data, max_iter=2).value,
        "adaptive": lambda: sk.adaptive_sharpness(model, ce, data, rho=0.05, max_iter=2).value,
        "interpolate": lambda: sk.interpolate(model, make_model("plain", seed=5), ce, data, alphas=[0.0, 1.0]).loss,
    }
    seen = {}
    for name, call in calls.items():
        try:
            seen[name] = f"ok {call()}"
        except Exception as exc:  # noqa: BLE001
            seen[name] = f"{type(exc).__name__}: {exc}"
    return seen


SCENARIOS = {"measure": measure_all, "disagree": disagreements, "models": sharpness_of_different_models}


def _run(scenario: str, tmp: Path, world: int, reference=None):
    procs = start(scenario, tmp, world, script=HERE)
    deadline = time.monotonic() + TIMEOUT
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = reference() if reference is not None else None  # meanwhile, in this process
    finally:
        torch.set_num_threads(threads)
    results = finish(procs, deadline, f"scenario {scenario!r} on {world} ranks")
    for rank, (rc, err) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{err[-4000:]}"
    return [torch.load(tmp / f"{scenario}-rank{r}.pt") for r in range(world)], single


# --------------------------------------------------------------------------- tests


def test_sharded_measurements_match_one_process_and_float64_references(tmp_path):
    """3 ranks (2 ranks: tests/test_distributed_matrix.py): uneven shards, a rank without samples,
    ranks with different numbers of batches, an uneven last batch, BatchNorm in both modes,
    dropout, class weights with ignore_index, MSE."""
    world = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (MSE: forward-mode AD falls back)
        got, single = _run("measure", tmp_path, world, lambda: measure_all(tmp_path))
    bad = []

    def compare(key, a, ref, rtol, what):
        if a.shape != ref.shape:
            bad.append(f"{key}: shape {tuple(a.shape)} vs {what} {tuple(ref.shape)}")
            return
        err = (a - ref).abs().max().item() if a.numel() else 0.0
        if not err <= rtol * max(ref.abs().max().item(), 1e-12):
            i = int((a - ref).abs().argmax())
            rel = err / max(ref.abs().max().item(), 1e-300)
            bad.append(f"{key}: {a[i].item()!r} vs {what} {ref[i].item()!r} (relative {rel:.2g})")

    for key, ref in single.items():
        for r in range(world):
            if not torch.equal(got[r][key], got[0][key]):
                bad.append(f"{key}: rank {r} differs from rank 0")
        compare(key, got[0][key], ref, RTOL, "one process")
    # Independent float64 references (eigenvalues: Lanczos to its tolerance; L-BFGS-B: scipy's own).
    for name in cases():
        for key, ref in independent(name).items():
            a = got[0][f"{name}/{key}"]
            if key == "keskar_lbfgsb":
                a = a[:1]
            elif key == "interpolate":
                a = a[:len(ALPHAS)]
            compare(f"{name}/{key}", a, ref.detach(), 1e-7 if key == "eig" else 1e-9, "float64 reference")
    assert not bad, "\n".join(bad)
    assert set(got[0]) == set(single)


def test_ranks_holding_different_things_raise_on_every_rank(tmp_path):
    """check_same names what differs on every rank (never a mixture of two measurements, never a
    wait); sharded_pass(same=...) refuses to add the sums of ranks at different points."""
    world = 3
    seen, _ = _run("disagree", tmp_path, world)
    for r in range(world):
        s = seen[r]
        assert s["alike"] == "ok", s["alike"]
        assert s["bn_train_running"] == "ok", s["bn_train_running"]
        expected = {
            "parameter": "parameter '0.weight' (float64 (5, 4)): other values on rank 2 than on ranks 0, 1",
            "nan": "parameter '3.bias' (float64 (3,)): other values on rank 2 than on ranks 0, 1",
            "buffer": "buffer '1.running_var' (float64 (5,)): other values on rank 2 than on ranks 0, 1",
            "module": "module '2' [ranks 0, 1: Tanh(); rank 2: Softsign()]",
            "frozen": "parameter '3.bias' [ranks 0, 1: float64 (3,); rank 2: float64 (3,), frozen]",
            "setting": "module '1' [ranks 0, 1: BatchNorm1d(5, eps=1e-05",
            "dtype": "parameter '0.weight' [ranks 0, 1: float64 (5, 4); rank 2: float32 (5, 4)]",
            "loss": "label_smoothing=0.1",
            "loss_weights": "loss_fn (CrossEntropyLoss(",
            "loss_function": "rank 2: <function",
            "epsilon": "epsilon [ranks 0, 1: 0.001; rank 2: 0.002]",
            "alphas": "alphas [ranks 0, 1: array([0. , 0.5]); rank 2: array([0. , 1.5])]",
        }
        for key, text in expected.items():
            got = s[key]
            assert got.startswith("RuntimeError: the ranks disagree on "), (r, key, got)
            assert text in got, (r, key, got)
        assert "nothing was measured" in s["parameter"]
        if r == world - 1:
            assert s["digest_fails"].startswith("RuntimeError: cannot describe this object"), s["digest_fails"]
            assert "rank 2 of 3" in s["digest_fails"]
        else:
            assert s["digest_fails"].startswith("PeerFailure: rank 2 failed while comparing the test"), \
                s["digest_fails"]
        assert s["pass_point"].startswith("RuntimeError: the ranks disagree on what the test pass evaluates"), \
            s["pass_point"]
        assert "ranks 0, 1 hold one point, rank 2 another" in s["pass_point"], s["pass_point"]
        assert s["pass_point/untouched"] == str([float(r + 1)] * 3)  # nothing was exchanged
        assert s["pass_alike"] == "ok" and s["pass_alike/sum"] == str([6.0] * 3)
        if r == world - 1:
            assert s["pass_undigestible"].startswith("TypeError: sharded_pass(same=...) takes tensors, got list"), \
                s["pass_undigestible"]
        else:
            assert s["pass_undigestible"].startswith("PeerFailure: rank 2 failed during the test pass"), \
                s["pass_undigestible"]
        assert s["after"] == "ok" and s["after/sum"] == str([18.0] * 3)  # the group still works


def test_measurements_refuse_ranks_holding_different_models(tmp_path):
    """A model one parameter apart on one rank: today each measurement silently returns a mixture
    of the two models' sums (the same wrong number on every rank)."""
    seen, _ = _run("models", tmp_path, 2)
    for r in range(2):
        for name, got in seen[r].items():
            assert got.startswith("RuntimeError: the ranks disagree on"), (r, name, got)


# --------------------------------------------------------------------------- in-process units


def test_digest_tells_apart_what_differs_and_nothing_else():
    from sharpkit.distributed import digest

    x = torch.randn(300_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # several chunks
    assert digest(x) == digest(x.clone()) == digest(torch.from_numpy(x.numpy().copy()))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = digest(x)
        torch.set_num_threads(2)
        assert digest(x) == one  # integer sums: the same whatever the reduction order
    finally:
        torch.set_num_threads(before)
    last = x.clone()
    last[-1] = torch.nextafter(last[-1], torch.tensor(np.inf, dtype=torch.float64))
    swapped = x.clone()
    swapped[[5, 7]] = swapped[[7, 5]]
    far = x.clone()
    far[[0, 65521]] = far[[65521, 0]]  # positions one weight period apart
    values = [x, last, swapped, far, x.float(), x.reshape(1000, 300), -x, x[:-1], torch.zeros(0), torch.zeros(0, 3)]
    digests = [digest(v) for v in values]
    assert len(set(digests)) == len(digests)
    assert digest(torch.tensor(-0.0)) != digest(torch.tensor(0.0))  # bits, not values
    assert digest(torch.tensor([float("nan")])) == digest(torch.tensor([float("nan")]))
    # Settings and functions: by value and code, not by identity or address.
    assert digest(nn.CrossEntropyLoss()) == digest(nn.CrossEntropyLoss())
    assert digest(nn.CrossEntropyLoss()) != digest(nn.CrossEntropyLoss(label_smoothing=0.1))
    assert digest(nn.CrossEntropyLoss()) != digest(nn.NLLLoss())
    assert digest(lambda o, t: 2 * o) == digest(lambda o, t: 2 * o)
    assert digest(lambda o, t: 2 * o) != digest(lambda o, t: 3 * o)
    calls = []
    assert digest(lambda o, t: calls) == digest(lambda o, t: calls)  # closures: not compared
    assert digest(torch.device("cuda", 0)) == digest(torch.device("cuda", 1)) != digest(torch.device("cpu"))
    assert digest([1, 2]) != digest((1, 2)) and digest({"a": 1}) != digest({"a": 2})
    assert digest(1) != digest(1.0) and digest(True) != digest(1)
    assert digest(object()) == digest(object())


def test_checks_are_free_without_a_process_group():
    """check_same and sharded_pass(same=...) alone: nothing compared, nothing raised."""
    from sharpkit import distributed as D

    assert not D.is_distributed()
    D.check_same("the test", make_model("plain"), nn.CrossEntropyLoss(), epsilon=object())
    acc = torch.ones(2)
    with D.sharded_pass([acc], same=[torch.randn(3)]):
        acc += 1
    assert acc.tolist() == [2.0, 2.0]


if __name__ == "__main__":
    run_scenario(SCENARIOS, sys.argv[1], Path(sys.argv[2]))
