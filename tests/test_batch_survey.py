"""One read of the data: BatchSurvey, the pass count of regrouped batches derived from the sizes,
and the per-product cost that a model without shared modules does not pay."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import sharpkit as sk
import sharpkit.params as params
from sharpkit.data import as_batches, regroup_batches, regrouped_count, survey_batches
from sharpkit.objective import activation_elements, probe_largest_batch, regroup_rows

F64 = torch.float64


def _batches_of(sizes, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(k, d, generator=g), torch.randint(0, 2, (k,), generator=g)) for k in sizes]


def _passes(batches, rows):
    return sum(1 for _ in regroup_batches(batches, rows))


def test_survey_reads_sizes_largest_and_input_shape():
    data = _batches_of([3, 7, 0, 7, 2])
    survey = survey_batches(as_batches(data))
    assert survey.sizes == (3, 7, 7, 2)  # the empty batch is skipped, as iteration skips it
    assert survey.num_batches == 4 and survey.num_samples == 19 and survey.largest_size == 7
    assert survey.largest[0] is data[1][0]  # the first of the largest batches
    assert survey.input_shape == (3, 3) and survey.layouts == (0, 0, 0, 0)
    one = survey_batches(as_batches(data[1]))
    assert one.sizes == (7,) and one.input_shape == (7, 3)
    with pytest.raises(ValueError, match="empty"):
        survey_batches(as_batches([]))
    empty_shard = survey_batches(as_batches(data[:1]).shard(1, 2, keep_batches=True))
    assert empty_shard.num_batches == 0 and empty_shard.largest is None and empty_shard.input_shape is None


@pytest.mark.parametrize("seed", range(40))
def test_regrouped_count_equals_the_passes_regrouping_makes(seed):
    rnd = random.Random(seed)
    sizes = [rnd.choice([0, 1, 2, 3, 5, 8, 13, 40]) for _ in range(rnd.randint(1, 12))]
    if not any(sizes):
        sizes[0] = 1
    batches = as_batches(_batches_of(sizes, seed=seed))
    survey = survey_batches(batches)
    largest = max(sizes)
    # Passes below, at and above the largest batch (below: large batches are split).
    for rows in sorted({1, 2, rnd.randint(1, 50), largest - 1 or 1, largest, largest + 1, sum(sizes), 10**6}):
        expected = _passes(batches, rows)
        assert survey.regrouped_count(rows) == expected, (sizes, rows)
        assert regrouped_count(sizes, rows) == expected, (sizes, rows)


@pytest.mark.parametrize("rows", [1, 3, 4, 10, 100])
def test_regrouped_count_of_a_single_batch(rows):
    batches = as_batches(_batches_of([10]))
    assert survey_batches(batches).regrouped_count(rows) == _passes(batches, rows) == -(-10 // rows)


def test_regrouped_count_never_joins_batches_of_other_layouts():
    mixed = [(torch.zeros(2, 6), torch.zeros(2)), (torch.zeros(3, 5), torch.zeros(3)),
             (torch.zeros(1, 5), torch.zeros(1)), (torch.zeros(2, 5, dtype=F64), torch.zeros(2)),
             (torch.zeros(2, 5), torch.zeros(2, dtype=torch.long)), (torch.zeros(1, 5), torch.zeros(1, dtype=torch.long))]
    batches = as_batches(mixed)
    survey = survey_batches(batches)
    assert survey.layouts == (0, 1, 1, 2, 3, 3)
    for rows in (1, 2, 3, 4, 10):
        assert survey.regrouped_count(rows) == _passes(batches, rows), rows
    assert survey.regrouped_count(10) == 4
    with pytest.raises(ValueError, match="rows"):
        survey.regrouped_count(0)


def test_per_sample_activations_and_pass_rows_from_the_survey():
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    batches = as_batches(_batches_of([4, 6, 6, 1]))
    survey = survey_batches(batches)
    cpu = torch.device("cpu")
    assert probe_largest_batch(model, survey, cpu, torch.float32)[0] == 8 + 8 + 2
    assert probe_largest_batch(model, survey, cpu, torch.float32)[0] == \
        activation_elements(model, survey.largest, cpu, torch.float32) / 6
    for vectors in (1, 16):
        assert regroup_rows(model, survey, cpu, torch.float32, vectors=vectors) == \
            regroup_rows(model, batches, cpu, torch.float32, vectors=vectors)


def _count_object_restores(monkeypatch):
    calls = []
    original = params.tensor_objects_kept

    def counting(model):
        calls.append(model)
        return original(model)

    monkeypatch.setattr(params, "tensor_objects_kept", counting)
    return calls


@pytest.mark.parametrize("engine", ["fused", "generic"])
def test_products_restore_tensor_objects_only_for_shared_modules(monkeypatch, engine):
    torch.manual_seed(0)
    X, Y = torch.randn(12, 4, dtype=F64), torch.randint(0, 3, (12,))
    plain = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    lin = nn.Linear(3, 3)
    shared = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), lin, nn.Tanh(), lin).double()
    for model, restores in ((plain, False), (shared, True)):
        op = sk.hessian(model, nn.CrossEntropyLoss(), [(X[:5], Y[:5]), (X[5:], Y[5:])], engine=engine,
                        regroup=False, cache=False)
        expected = op @ torch.eye(op.n, dtype=F64)[:, :2]
        calls = _count_object_restores(monkeypatch)
        torch.testing.assert_close(op @ torch.eye(op.n, dtype=F64)[:, :2], expected, rtol=0, atol=0)
        assert (len(calls) > 0) == restores, (engine, restores)
        assert all(type(t) is nn.Parameter for t in model.state_dict(keep_vars=True).values())
        monkeypatch.undo()


def test_preserved_still_restores_replaced_objects_by_default():
    model = nn.Sequential(nn.Linear(2, 2))
    weight = model[0].weight
    with sk.preserved(model):
        model[0].weight = nn.Parameter(torch.zeros(2, 2))
    assert model[0].weight is weight
    with sk.preserved(model, restore_objects=False):
        pass
    assert model[0].weight is weight


# ---- models whose samples interact are never joined ------------------------------------------------

class _Center(nn.Module):
    """Subtracts the batch mean: the samples of a batch interact without any BatchNorm module."""

    def forward(self, h):
        return h - h.mean(0, keepdim=True)


class _FunctionalBatchNorm(nn.Module):
    """Batch statistics through ``F.batch_norm(training=True)`` (a hand-rolled ghost batch norm)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, h):
        return nn.functional.batch_norm(h, None, None, self.weight, None, training=True)


def _mixing_model(kind: str) -> nn.Module:
    torch.manual_seed(3)
    middle = _Center() if kind == "center" else _FunctionalBatchNorm(8)
    return nn.Sequential(nn.Linear(4, 8), middle, nn.Tanh(), nn.Linear(8, 3)).double()


def _mixing_data():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(11, 4, generator=g, dtype=F64), torch.randint(0, 3, (11,), generator=g)
    return [(x[i:i + 4], y[i:i + 4]) for i in range(0, 11, 4)]  # batches of 4, 4, 3


def _batchwise_objective(model, batches):
    """Reference: the sample-weighted mean of the batches' losses, each batch as given."""
    def f(flat):
        names = [n for n, _ in model.named_parameters()]
        shapes = [p.shape for _, p in model.named_parameters()]
        tensors, i = {}, 0
        for n, s in zip(names, shapes):
            tensors[n] = flat[i:i + s.numel()].view(s)
            i += s.numel()
        total = sum(x.shape[0] * nn.functional.cross_entropy(torch.func.functional_call(model, tensors, (x,)), y)
                    for x, y in batches)
        return total / sum(x.shape[0] for x, _ in batches)
    x0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return f, x0


@pytest.mark.parametrize("kind", ["center", "functional-bn"])
def test_samples_interacting_outside_batchnorm_keep_their_batches(kind, tmp_path):
    model = _mixing_model(kind)
    batches = _mixing_data()
    f, x0 = _batchwise_objective(model, batches)
    survey = survey_batches(as_batches(batches))
    cpu = torch.device("cpu")
    reason = probe_largest_batch(model, survey, cpu, F64, nn.CrossEntropyLoss())[1]
    assert reason is not None and "interact" in reason
    assert regroup_rows(model, survey, cpu, F64) is None
    # Every measurement sees the objective of the batches as given (joined, it would differ).
    H = sk.hessian(model, nn.CrossEntropyLoss(), batches, dtype=F64).dense()
    H_ref = torch.autograd.functional.hessian(f, x0)
    assert torch.allclose(H, H_ref, rtol=1e-9, atol=1e-12)
    f_joined, _ = _batchwise_objective(model, [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))])
    assert not torch.allclose(torch.autograd.functional.hessian(f_joined, x0), H_ref, rtol=1e-3, atol=1e-6)
    res = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), batches, epsilon=1e-3, max_iter=2)
    assert res.loss == pytest.approx(float(f(x0)), rel=1e-12)
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    rows = sk.audit([tmp_path / "ck.pt"], lambda: _mixing_model(kind), batches, metrics="trace", trace_samples=2,
                    dtype="float64", progress=False)
    assert rows[0]["status"] == "ok" and rows[0]["loss"] == pytest.approx(float(f(x0)), rel=1e-12)


def test_independent_samples_are_still_joined_and_one_sample_batches_are_probed_joined():
    cpu = torch.device("cpu")
    for dtype in (torch.float32, F64):
        torch.manual_seed(0)
        conv = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3)).to(dtype)
        batches = [(torch.randn(k, 1, 8, dtype=dtype), torch.randint(0, 3, (k,))) for k in (64, 64, 17)]
        survey = survey_batches(as_batches(batches))
        assert probe_largest_batch(conv, survey, cpu, dtype, nn.CrossEntropyLoss())[1] is None
        assert regroup_rows(conv, survey, cpu, dtype) >= 64
    # Batches of one sample: the first two joined are the probe.
    mlp = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    singles = survey_batches(as_batches(_batches_of([1, 1, 1])))
    assert probe_largest_batch(mlp, singles, cpu, torch.float32)[1] is None
    assert regroup_rows(mlp, singles, cpu, torch.float32) >= 1
    mixing = nn.Sequential(nn.Linear(3, 8), _Center(), nn.Tanh(), nn.Linear(8, 2))
    assert "interact" in probe_largest_batch(mixing, singles, cpu, torch.float32)[1]
    assert regroup_rows(mixing, singles, cpu, torch.float32) is None

    # ... and the loss on them: a root-mean-square error is not a per-sample mean.
    def rmse(out, target):
        return torch.sqrt(nn.functional.mse_loss(out, target))

    regression = [(torch.randn(1, 3), torch.randn(1, 2)) for _ in range(8)]
    assert "not a per-sample mean" in probe_largest_batch(mlp, survey_batches(as_batches(regression)), cpu,
                                                          torch.float32, rmse)[1]
    from sharpkit.objective import Objective

    obj = Objective(mlp.double(), rmse, [(x.double(), y.double()) for x, y in regression], regroup=True)
    with torch.no_grad():
        per_batch = sum(float(rmse(mlp(x.double()), y.double())) for x, y in regression) / 8
    assert float(obj.loss(obj.x0())) == pytest.approx(per_batch, rel=1e-12)
    # Outputs with a -inf mask (log-probabilities of a masked class) compare where finite.
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)
            self.register_buffer("mask", torch.tensor([0.0] * 9 + [float("-inf")]))

        def forward(self, x):
            return torch.log_softmax(self.lin(x) + self.mask, 1)

    torch.manual_seed(1)
    masked = survey_batches(as_batches([(torch.randn(3, 64), torch.randint(0, 9, (3,))) for _ in range(4)]))
    assert probe_largest_batch(Masked(), masked, cpu, torch.float32, nn.NLLLoss())[1] is None


def test_per_sample_tuple_outputs_are_compared_leaf_by_leaf():
    class Two(nn.Module):
        def __init__(self, center: bool):
            super().__init__()
            self.lin, self.center = nn.Linear(3, 2), center

        def forward(self, x):
            h = self.lin(x)
            return h, (h - h.mean(0)) if self.center else 2 * h

    cpu = torch.device("cpu")
    survey = survey_batches(as_batches(_batches_of([6, 6])))
    assert probe_largest_batch(Two(False), survey, cpu, torch.float32)[1] is None
    assert "interact" in probe_largest_batch(Two(True), survey, cpu, torch.float32)[1]


@pytest.mark.gpu
def test_float32_conv_net_on_cuda_is_still_joined():
    """TF32 convolutions round differently on a batch and on its halves: that is not interaction."""
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(32 * 12 * 12, 10)).to(cuda).eval()
    batches = [(torch.randn(256, 3, 16, 16, device=cuda), torch.randint(0, 10, (256,), device=cuda)) for _ in range(3)]
    survey = survey_batches(as_batches(batches))
    assert probe_largest_batch(net, survey, cuda, torch.float32, nn.CrossEntropyLoss())[1] is None
    assert regroup_rows(net, survey, cuda, torch.float32) >= 256
