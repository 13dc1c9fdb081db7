"""Curvature on models and options users really have: shared modules, subclassed layers, inputs
the fused engine cannot take, weighted and smoothed losses in another precision."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sharpkit as sk
from sharpkit.audit.batched import StackedObjective
from sharpkit.data import as_batches
from sharpkit.landscape import evaluate
from sharpkit.objective import Objective

F64 = torch.float64


def _data(n=16, d=4, c=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, c, (n,), generator=g)


def _dense(model, loss, data, engine, **kw):
    return sk.hessian(model, loss, data, engine=engine, **kw).dense()


def _explicit(model, loss, X, Y):
    """The float64 Hessian of ``loss(model(X), Y)`` by torch.autograd.functional.hessian."""
    ref = copy.deepcopy(model).double()
    flat = sk.FlatParams(ref)

    def f(v):
        return loss(torch.func.functional_call(ref, flat.as_dict(v), (X.double(),)), Y)

    return torch.autograd.functional.hessian(f, flat.get())


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_shared_module_keeps_its_parameter_objects():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), lin, nn.Tanh(), lin).double()
    opt_params = list(model.parameters())
    X, Y = _data()
    H = sk.hessian(model, nn.CrossEntropyLoss(), (X, Y), engine="generic")
    H @ torch.randn(H.n, dtype=F64)
    sk.keskar_sharpness(model, nn.CrossEntropyLoss(), [(X[:8], Y[:8]), (X[8:], Y[8:])], max_iter=2)
    obj = Objective(model, nn.CrossEntropyLoss(), (X, Y))
    obj.loss_and_grad(obj.x0())
    assert all(type(t) is nn.Parameter for t in model.state_dict(keep_vars=True).values())
    assert all(a is b for a, b in zip(model.parameters(), opt_params))
    copy.deepcopy(model)  # fails when plain tensors were left behind


class Quartered(nn.Sequential):
    def forward(self, x):
        return super().forward(x) / 4.0


class SquaredReLU(nn.ReLU):
    def forward(self, x):
        return torch.relu(x) ** 2


class DoubledCE(nn.CrossEntropyLoss):
    def forward(self, out, target):
        return 2.0 * super().forward(out, target)


@pytest.mark.parametrize("make", [
    lambda: (Quartered(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), nn.CrossEntropyLoss()),
    lambda: (nn.Sequential(nn.Linear(4, 5), SquaredReLU(), nn.Linear(5, 3)), nn.CrossEntropyLoss()),
    lambda: (nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), DoubledCE()),
])
def test_subclasses_that_override_forward_go_to_the_generic_engine(make):
    torch.manual_seed(0)
    model, loss = make()
    model = model.double()
    data = _data()
    op = sk.hessian(model, loss, data)
    assert op.engine_info["engine"] == "generic" and "overrides forward" in op.engine_info["why_not_fused"]
    assert _rel(op.dense(), _explicit(model, loss, *data)) < 1e-12
    with pytest.raises(ValueError, match="overrides forward"):
        sk.hessian(model, loss, data, engine="fused")


def test_auto_falls_back_where_the_fused_engine_cannot_take_the_inputs_or_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    g = torch.Generator().manual_seed(1)
    data3d = (torch.randn(5, 2, 4, generator=g, dtype=F64), torch.randn(5, 2, 2, generator=g, dtype=F64))
    op = sk.hessian(model, nn.MSELoss(), data3d)
    assert op.engine_info["engine"] == "generic" and "2-D activations" in op.engine_info["why_not_fused"]
    assert _rel(op.dense(), _explicit(model, nn.MSELoss(), *data3d)) < 1e-12
    with pytest.raises(ValueError, match="2-D activations"):
        sk.hessian(model, nn.MSELoss(), data3d, engine="fused")
    model.register_parameter("extra", nn.Parameter(torch.randn(2, dtype=F64)))
    op = sk.hessian(model, nn.CrossEntropyLoss(), _data(d=4, c=2))
    assert op.engine_info["engine"] == "generic" and "extra" in op.engine_info["why_not_fused"]


@pytest.mark.parametrize("engine", ["fused", "generic"])
@pytest.mark.parametrize("loss", [
    nn.CrossEntropyLoss(label_smoothing=0.1),
    nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0]), label_smoothing=0.2),
    nn.CrossEntropyLoss(weight=torch.tensor([0.5, 1.0, 2.0]), ignore_index=1),
])
def test_weighted_and_smoothed_cross_entropy_in_float64_from_a_float32_model(engine, loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))  # float32 model, float32 class weights
    X, Y = _data(dtype=torch.float32)
    H = sk.hessian(model, loss, (X, Y), engine=engine, dtype=F64).dense()
    assert _rel(H, _explicit(model, copy.deepcopy(loss).double(), X, Y)) < 1e-12


def test_all_targets_ignored_contributes_nothing_in_either_engine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, Y = _data()
    ignored = torch.full_like(Y, -100)
    batches = [(X[:8], Y[:8]), (X[8:], ignored[8:])]
    fused, generic = (_dense(model, nn.CrossEntropyLoss(), batches, e) for e in ("fused", "generic"))
    assert torch.isfinite(fused).all() and _rel(fused, generic) < 1e-12


def test_chunk_size_must_be_an_int():
    model = nn.Sequential(nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match="chunk_size"):
        sk.hessian(model, nn.CrossEntropyLoss(), _data(), chunk_size=True)


class _CountingMLP(nn.Sequential):
    """An MLP that counts its forward calls (a subclass with its own forward: the generic engine)."""

    calls = 0

    def forward(self, x):
        _CountingMLP.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("engine", ["auto", "generic"])
def test_small_batches_are_joined_into_fewer_passes_with_the_same_operator(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(61, 5, generator=g, dtype=F64), torch.randint(0, 3, (61,), generator=g)
    batches = [(X[i:i + 8], Y[i:i + 8]) for i in range(0, 61, 8)]  # 8 batches, the last of 5
    joined = sk.hessian(model, nn.CrossEntropyLoss(), batches, engine=engine)
    kept = sk.hessian(model, nn.CrossEntropyLoss(), batches, engine=engine, regroup=False)
    assert joined.num_batches == 1 and kept.num_batches == 8
    expected = _explicit(model.eval(), nn.CrossEntropyLoss(), X, Y)
    assert _rel(joined.dense(), expected) < 1e-12 and _rel(kept.dense(), expected) < 1e-12


def test_joined_passes_call_the_model_once_per_pass():
    torch.manual_seed(0)
    model = _CountingMLP(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(64, 5, generator=g, dtype=F64), torch.randint(0, 3, (64,), generator=g)
    op = sk.hessian(model, nn.CrossEntropyLoss(), [(X[i:i + 4], Y[i:i + 4]) for i in range(0, 64, 4)],
                    cache=False, ad="reverse-over-reverse")
    _CountingMLP.calls = 0
    op @ torch.randn(op.n, 3, dtype=F64)
    assert op.num_batches == 1 and _CountingMLP.calls == 1


def test_batch_statistics_keep_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    X, Y = _data(n=24, d=5)
    batches = [(X[i:i + 8], Y[i:i + 8]) for i in range(0, 24, 8)]
    assert sk.hessian(model, nn.CrossEntropyLoss(), batches, bn="train").num_batches == 3
    no_stats = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(),
                             nn.Linear(8, 3)).double()
    assert sk.hessian(no_stats, nn.CrossEntropyLoss(), batches).num_batches == 3


def test_pass_size_respects_the_memory_of_the_directions_a_pass_carries():
    from sharpkit.data import as_batches
    from sharpkit.objective import REGROUP_BYTES, regroup_rows

    wide = nn.Sequential(nn.Linear(5, 4096), nn.ReLU(), nn.Linear(4096, 3))
    X, Y = torch.randn(64, 5), torch.zeros(64, dtype=torch.long)
    batches = as_batches([(X[i:i + 8], Y[i:i + 8]) for i in range(0, 64, 8)])
    per_sample = (4096 + 4096 + 3) * 4  # bytes of float32 activations per sample
    one = regroup_rows(wide, batches, torch.device("cpu"), torch.float32, vectors=1, max_rows=10**6)
    sixteen = regroup_rows(wide, batches, torch.device("cpu"), torch.float32, vectors=16, max_rows=10**6)
    assert one == REGROUP_BYTES // (4 * per_sample)
    assert sixteen == max(8, REGROUP_BYTES // (4 * per_sample * 16))
    assert regroup_rows(wide, as_batches((X, Y)), torch.device("cpu"), torch.float32) is None


class _CountingLoader:
    """A re-iterable source of batches that counts how often it is read (like a DataLoader)."""

    def __init__(self, X, Y, size):
        self.X, self.Y, self.size, self.reads = X, Y, size, 0

    def __iter__(self):
        self.reads += 1
        for i in range(0, self.X.shape[0], self.size):
            yield self.X[i:i + self.size], self.Y[i:i + self.size]


@pytest.mark.parametrize("engine", ["fused", "generic"])
def test_kept_primal_passes_need_no_further_reads_of_the_data(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(40, 5, generator=g, dtype=F64), torch.randint(0, 3, (40,), generator=g)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 4, generator=g, dtype=F64)
    kept_loader, fresh_loader = _CountingLoader(X, Y, 16), _CountingLoader(X, Y, 16)
    kept = sk.hessian(model, nn.CrossEntropyLoss(), kept_loader, engine=engine, regroup=False)
    fresh = sk.hessian(model, nn.CrossEntropyLoss(), fresh_loader, engine=engine, regroup=False, cache=False)
    reads_before = kept_loader.reads
    first = kept @ V
    second = kept @ V
    assert kept_loader.reads == reads_before + 1  # the first product reads the data, later ones do not
    assert torch.equal(first, second)
    expected = _explicit(model, nn.CrossEntropyLoss(), X, Y) @ V
    assert _rel(first, expected) < 1e-12 and _rel(fresh @ V, expected) < 1e-12
    before = fresh_loader.reads
    fresh @ V
    assert fresh_loader.reads == before + 1  # without kept passes every product reads the data


@pytest.mark.parametrize("engine", ["fused", "generic"])
@pytest.mark.parametrize("regroup", [True, False])
def test_construction_reads_the_data_once(engine, regroup):
    torch.manual_seed(0)
    model = _CountingMLP(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double() if engine == "generic" else \
        nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(61, 5, generator=g, dtype=F64), torch.randint(0, 3, (61,), generator=g)
    loader = _CountingLoader(X, Y, 4)  # 16 small batches, the last of 1
    _CountingMLP.calls = 0
    op = sk.hessian(model, nn.CrossEntropyLoss(), loader, engine=engine, regroup=regroup)
    assert loader.reads == 1  # one survey of the data: no recount, no second read to plan the passes
    if engine == "generic":
        # The forward the memory bound needs, and those of the largest batch's halves (whether the
        # model's samples interact); and one of up to 64 samples that checks the loss's arguments.
        assert _CountingMLP.calls == (3 if regroup else 0) + 1
    assert op.num_batches == (1 if regroup else 16) and op.num_samples == 61
    assert _rel(op.dense(), _explicit(model, nn.CrossEntropyLoss(), X, Y)) < 1e-12


def test_objective_and_group_plan_read_the_data_once():
    from sharpkit.audit.batched import estimate_group_size
    from sharpkit.data import as_batches

    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(61, 5, generator=g, dtype=F64), torch.randint(0, 3, (61,), generator=g)
    loader = _CountingLoader(X, Y, 4)
    obj = Objective(model, nn.CrossEntropyLoss(), loader, regroup=True)
    assert loader.reads == 1 and obj.num_samples == 61
    torch.testing.assert_close(obj.loss(obj.x0()), nn.CrossEntropyLoss()(model(X), Y).double(), rtol=1e-12, atol=0)
    loader.reads = 0
    plan = estimate_group_size(model, as_batches(loader), torch.device("cpu"), F64, 10, available_bytes=1 << 40)
    assert loader.reads == 1 and plan.keep_graphs


def _per_batch_explicit(model, loss, batches):
    """The documented objective's Hessian: sum_b n_b H_b / N, each H_b of the batch's own loss."""
    total = sum(x.shape[0] for x, _ in batches)
    return sum(x.shape[0] * _explicit(model, loss, x, y) for x, y in batches) / total


def _weighted_mse(out, target):
    """A loss that is not a per-sample mean: samples weighted by their target's norm, normalised per batch."""
    w = target.norm(dim=1)
    return (w * ((out - target) ** 2).sum(1)).sum() / w.sum()


@pytest.mark.parametrize("engine", ["auto", "generic"])
def test_batches_stay_apart_where_joining_would_change_the_objective(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.SiLU(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(2)
    X = torch.randn(20, 5, generator=g, dtype=F64)
    loss, Y = _weighted_mse, torch.randn(20, 3, generator=g, dtype=F64)
    batches = [(X[:3], Y[:3]), (X[3:15], Y[3:15]), (X[15:], Y[15:])]
    expected = _per_batch_explicit(model, loss, batches)
    H = sk.hessian(model, loss, batches, engine=engine)
    assert H.num_batches == 3
    assert _rel(H.dense(), expected) < 1e-12
    obj = Objective(model, loss, batches, regroup=True)
    with torch.no_grad():
        documented = sum(x.shape[0] * float(loss(model(x), y)) for x, y in batches) / 20
    assert float(obj.loss(obj.x0())) == pytest.approx(documented, rel=1e-12)


def _ce_case(case):
    """(model, loss, X, Y, batches): cross-entropy whose batch means do not divide by the samples."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    if case == "sequence":  # (N, C, L) logits of L tokens, padding ignored, class weights
        model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Unflatten(1, (3, 4))).double()
        X = torch.randn(20, 5, generator=g, dtype=F64)
        Y = torch.randint(0, 3, (20, 4), generator=g)
        Y[::3, 2:] = -100
        loss = nn.CrossEntropyLoss(weight=torch.tensor([0.3, 2.0, 1.1], dtype=F64))
    else:
        model = nn.Sequential(nn.Linear(5, 6), nn.SiLU(), nn.Linear(6, 3)).double()
        X = torch.randn(20, 5, generator=g, dtype=F64)
        Y = torch.randint(0, 3, (20,), generator=g)
        if case == "class_weights":
            loss = nn.CrossEntropyLoss(weight=torch.tensor([0.3, 2.0, 1.1], dtype=F64), label_smoothing=0.1)
        elif case == "ignore_index":
            loss = nn.CrossEntropyLoss(ignore_index=-1)
            Y[:3] = torch.tensor([-1, 0, -1])
            Y[7:10] = -1
        else:  # a batch of ignored targets only: it carries no weight
            loss = nn.CrossEntropyLoss()
            Y[:3] = -100
    batches = [(X[:3], Y[:3]), (X[3:15], Y[3:15]), (X[15:], Y[15:])]
    return model, loss, X, Y, batches


@pytest.mark.parametrize("case", ["class_weights", "ignore_index", "ignored_batch", "sequence"])
def test_cross_entropy_with_class_weights_or_ignored_targets_is_the_loss_over_all_data(case, tmp_path):
    """Each batch weighs the sum its mean divides by: every measurement is the loss over all the
    data at once, however they are batched (and batches may be joined)."""
    model, loss, X, Y, batches = _ce_case(case)
    with torch.no_grad():
        whole = float(loss(model(X), Y))
    expected = _explicit(model, loss, X, Y)
    for regroup in (True, False):
        for engine in ("auto", "generic"):
            H = sk.hessian(model, loss, batches, engine=engine, regroup=regroup)
            assert _rel(H.dense(), expected) < 1e-12, (regroup, engine)
        G = sk.ggn(model, loss, batches, regroup=regroup)
        assert _rel(G.dense(), sk.ggn(model, loss, (X, Y)).dense()) < 1e-12
        obj = Objective(model, loss, batches, regroup=regroup)
        assert float(obj.loss(obj.x0())) == pytest.approx(whole, rel=1e-12)
    # Passes that split the batches (one pair in passes of 5: pieces with other shares of the
    # ignored targets, one of them all ignored) weigh their own sums too.
    for data in (batches, (X, Y)):
        obj = Objective(model, loss, data, regroup=5)
        assert float(obj.loss(obj.x0())) == pytest.approx(whole, rel=1e-12)
        X2 = torch.stack([obj.x0(), obj.x0()])
        stacked = StackedObjective(model, loss, as_batches(data), X2, {}, max_rows=5)
        assert stacked.loss(X2).tolist() == pytest.approx([whole, whole], rel=1e-12)
    for batch_size in (1, 7, 20):
        res = sk.keskar_sharpness(model, loss, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y),
                                                                            batch_size=batch_size),
                                  epsilon=1e-3, max_iter=2)
        assert res.loss == pytest.approx(whole, rel=1e-12), batch_size
    assert evaluate(model, loss, batches)[0] == pytest.approx(whole, rel=1e-12)
    # m-sharpness: the chunks weigh their shares (a chunk of ignored targets only is left out).
    chunked = sk.adaptive_sharpness(model, loss, (X, Y), rho=0.05, m=3, max_iter=2)
    assert chunked.loss == pytest.approx(whole, rel=1e-12)
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    torch.save({k: v + 0.01 for k, v in model.state_dict().items()}, tmp_path / "ck2.pt")
    for group_size in (1, 2):
        rows = sk.audit([tmp_path / "ck.pt", tmp_path / "ck2.pt"], lambda: copy.deepcopy(model), (X, Y), loss_fn=loss,
                        metrics="trace", trace_samples=2, dtype="float64", progress=False, group_size=group_size)
        assert rows[0]["status"] == "ok" and rows[0]["loss"] == pytest.approx(whole, rel=1e-12)


def test_accuracy_leaves_ignored_targets_out():
    model, loss, X, Y, batches = _ce_case("ignore_index")
    with torch.no_grad():
        out = model(X)
    kept = Y != -1
    accuracy = float((out.argmax(1)[kept] == Y[kept]).double().mean())
    assert evaluate(model, loss, batches)[1] == pytest.approx(accuracy, rel=1e-12)


def test_data_whose_every_target_is_ignored_is_refused():
    model = nn.Sequential(nn.Linear(4, 3)).double()
    X, Y = torch.randn(6, 4, dtype=F64), torch.full((6,), -100)
    with pytest.raises(ValueError, match="ignore_index"):
        sk.hessian(model, nn.CrossEntropyLoss(), (X, Y))
    with pytest.raises(ValueError, match="ignore_index"):
        sk.keskar_sharpness(model, nn.CrossEntropyLoss(), (X, Y))
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        sk.hessian(model, nn.CrossEntropyLoss(weight=torch.ones(3, dtype=F64)), (X, torch.full((6,), 5)))


def test_per_sample_mean_losses_are_still_joined():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.SiLU(), nn.Linear(6, 3)).double()
    X, Y = _data(n=20, d=5)
    batches = [(X[:3], Y[:3]), (X[3:15], Y[3:15]), (X[15:], Y[15:])]
    # Class weights with probability targets divide by the sample count: a per-sample mean.
    soft = torch.softmax(torch.randn(20, 3, dtype=F64), 1)
    soft_batches = [(x, soft[i:i + x.shape[0]]) for x, i in zip((X[:3], X[3:15], X[15:]), (0, 3, 15))]
    for loss, data in [(nn.CrossEntropyLoss(), batches), (nn.CrossEntropyLoss(ignore_index=7), batches),
                       (nn.CrossEntropyLoss(weight=torch.tensor([0.3, 2.0, 1.1], dtype=F64)), soft_batches)]:
        H = sk.hessian(model, loss, data, engine="generic")
        assert H.num_batches == 1
        assert _rel(H.dense(), _per_batch_explicit(model, loss, data)) < 1e-12


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_losses_that_are_not_mean_reduced_are_refused(reduction):
    model = nn.Sequential(nn.Linear(4, 3)).double()
    data = _data()
    loss = nn.CrossEntropyLoss(reduction=reduction)
    for call in (lambda: sk.hessian(model, loss, data), lambda: sk.ggn(model, loss, data),
                 lambda: sk.keskar_sharpness(model, loss, data, solver="pga"),
                 lambda: sk.adaptive_sharpness(model, loss, data, rho=0.01),
                 lambda: sk.landscape.evaluate(model, loss, data)):
        with pytest.raises(ValueError, match=f"reduction='{reduction}'.*mean-reduced"):
            call()


@pytest.mark.parametrize("loss", [nn.MSELoss(), nn.L1Loss(), nn.functional.mse_loss, nn.HuberLoss()])
def test_regression_targets_that_would_broadcast_are_refused(loss):
    # (N, 1) outputs against (N,) targets: torch broadcasts to an (N, N) comparison with only a warning.
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x, y = torch.randn(16, 4, dtype=F64), torch.randn(16, dtype=F64)
    calls = [lambda: sk.hessian(model, loss, (x, y), engine="generic") @ torch.ones(sk.FlatParams(model).n, dtype=F64),
             lambda: sk.keskar_sharpness(model, loss, (x, y), solver="pga", max_iter=2),
             lambda: sk.landscape.evaluate(model, loss, (x, y))]
    for call in calls:
        with pytest.raises(ValueError, match=r"outputs of shape \(16, 1\) with targets of shape \(16,\)"):
            call()
    sk.keskar_sharpness(model, loss, (x, y[:, None]), solver="pga", max_iter=2)  # matching shapes: fine


@pytest.mark.parametrize("device", ["foo", "cuda:7"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_unusable_device_is_named(device):
    model, (X, Y) = nn.Sequential(nn.Linear(4, 3)).double(), _data()
    for build in (sk.hessian, sk.ggn):
        with pytest.raises(ValueError, match=f"device '{device}' is not usable here"):
            build(model, nn.CrossEntropyLoss(), (X, Y), device=device)


@pytest.mark.parametrize("build", [sk.hessian, sk.ggn])
def test_summed_loss_on_one_batch_is_refused(build):
    """A lambda around reduction='sum' on data in one batch: no pass of the objective ran before the
    products, so nothing checked it, and the trace came out 23 x the mean's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x, y = torch.randn(23, 5, dtype=torch.float64), torch.randint(0, 3, (23,))
    summed = lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="sum")  # noqa: E731
    with pytest.raises(ValueError, match="sums over the samples"):
        build(model, summed, (x, y))
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    mean = build(model, lambda out, t: torch.nn.functional.cross_entropy(out, t), (x, y))
    ref = build(model, torch.nn.CrossEntropyLoss(), (x, y))
    torch.testing.assert_close(mean @ v, ref @ v, rtol=1e-12, atol=1e-14)
