"""Low-precision ascent steps (``ascent_dtype``): the steps run under autocast, every reported loss is exact."""
from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call

import sharpkit as sk
from sharpkit.audit import audit
from sharpkit.cli import main
from sharpkit.objective import Objective
from sharpkit.sharpness import solvers
from test_sharpness_helpers import assert_same_state, blobs, mlp, state, trained_classifier


class EstimatedQuadratics:
    """B separable quadratics ``f_b(y) = sum a_b/2 (d_b + y)^2`` whose steps see ``f + bias(y)``:
    ``loss`` is exact, ``loss_and_grad`` gives the biased value with the exact gradient."""

    estimates = True

    def __init__(self, a, d, bias=lambda Y: 1000.0 + 0 * Y.sum(1)):
        self.a, self.d, self.bias = a, d, bias
        self.num_problems, self.dim = a.shape
        self.exact_calls = 0

    def loss(self, Y):
        self.exact_calls += 1
        return (0.5 * self.a * (self.d + Y) ** 2).sum(1)

    def loss_and_grad(self, Y):
        r = self.d + Y
        return (0.5 * self.a * r**2).sum(1) + self.bias(Y), self.a * r


def _quadratics(B=3, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, d, generator=g, dtype=torch.float64) + 0.1
    off = torch.randn(B, d, generator=g, dtype=torch.float64)
    scale = torch.rand(B, d, generator=g, dtype=torch.float64) * 0.5
    return a, off, scale


@pytest.mark.parametrize("method", ["pga", "apgd"])
def test_estimated_steps_report_exact_values(method):
    """Biased step values do not leak into the result: loss0 and max_loss are the exact losses, the
    convex maxima (corners) are reached, and the passes are counted."""
    a, off, scale = _quadratics()
    prob = EstimatedQuadratics(a, off)
    seen = []
    r = getattr(solvers, method)(prob, scale, max_iter=12, callback=lambda e, f0, best: seen.append((e, f0, best)))
    exact0 = (0.5 * a * off**2).sum(1)
    corner = (0.5 * a * (off.abs() + scale) ** 2).sum(1)
    assert torch.equal(r.loss0, exact0)
    assert torch.allclose(r.max_loss, corner, rtol=1e-12)
    assert torch.equal(r.max_loss, prob.loss(r.Y))
    # An exact pass at 0, the steps' pass at 0, 12 steps, the run's best point valued exactly.
    assert r.num_evals == 1 + 1 + 12 + 1
    # The callback sees exact values only: at the start and after the run.
    assert [e for e, _, _ in seen] == [2, 15]
    assert torch.equal(seen[0][2], exact0) and torch.equal(seen[1][2], r.max_loss)
    restarted = getattr(solvers, method)(EstimatedQuadratics(a, off), scale, max_iter=12, restarts=3, seed=2)
    assert restarted.num_evals == 2 + (12 + 1) + (12 + 1) + (1 + 12 + 1)
    assert torch.allclose(restarted.max_loss, corner, rtol=1e-12)


class Misleading:
    """Exact loss ``-|y|²/2`` (maximum at y = 0); the steps see ``|y|²/2 + 1e-3 Σy`` and climb away."""

    estimates = True
    num_problems, dim = 2, 5

    def loss(self, Y):
        return -(0.5 * Y**2).sum(1)

    def loss_and_grad(self, Y):
        return (0.5 * Y**2).sum(1) + 1e-3 * Y.sum(1), Y + 1e-3


@pytest.mark.parametrize("method", ["pga", "apgd"])
def test_misleading_estimates_never_report_below_the_unperturbed_loss(method):
    """The exact check of the run's best point rejects it and y = 0 is returned."""
    scale = torch.full((2, 5), 0.5, dtype=torch.float64)
    r = getattr(solvers, method)(Misleading(), scale, max_iter=6, restarts=2)
    assert torch.equal(r.Y, torch.zeros_like(scale))
    assert torch.equal(r.max_loss, r.loss0) and bool((r.loss0 == 0).all())


def test_estimated_problems_are_refused_where_exact_values_are_needed():
    a, off, scale = _quadratics(B=1)
    with pytest.raises(ValueError, match="exact"):
        solvers.lbfgsb(EstimatedQuadratics(a, off), scale)
    with pytest.raises(ValueError, match="exact"):
        solvers.maximize(EstimatedQuadratics(a, off), scale, solver="lbfgsb")
    overflow = EstimatedQuadratics(a, off, bias=lambda Y: torch.full((Y.shape[0],), math.inf, dtype=Y.dtype))
    with pytest.raises(ValueError, match="overflowed"):
        solvers.apgd(overflow, scale)


def test_autocast_engine_checks_its_arguments():
    model = mlp((4, 5, 3), dtype=torch.float64)
    data = blobs(12, dim=4, classes=3, seed=0)
    engine = solvers.ObjectiveEngine([Objective(model, nn.CrossEntropyLoss(), data)])
    with pytest.raises(ValueError, match="float32"):
        solvers.AutocastEngine(engine, "bfloat16")
    engine32 = solvers.ObjectiveEngine([Objective(model, nn.CrossEntropyLoss(), data, dtype=torch.float32)])
    for bad in ("bf16", torch.float32, "float64", None):
        with pytest.raises(ValueError, match="ascent_dtype"):
            solvers.AutocastEngine(engine32, bad)
    assert solvers.AutocastEngine(engine32, torch.bfloat16).ascent_dtype == "bfloat16"


@pytest.fixture(scope="module")
def trained32():
    return trained_classifier(256, 64)


def _exact_loss64(model, data, w):
    """The loss at flat parameters ``w`` in float64 (an independent evaluation)."""
    m64 = copy.deepcopy(model).double()
    flat = sk.FlatParams(m64)
    tensors = dict(zip(flat.names, flat.views(w.double())))
    with torch.no_grad():
        return float(nn.functional.cross_entropy(functional_call(m64, tensors, (data[0].double(),)), data[1]))


@pytest.mark.parametrize("ascent_dtype", ["bfloat16", "float16"])
def test_keskar_low_precision_steps_are_used_and_the_value_is_exact(trained32, ascent_dtype):
    model, data = trained32
    before = state(model)
    seen = set()
    hook = model[0].register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    try:
        r = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), data, epsilon=1e-3, solver="apgd",
                                ascent_dtype=ascent_dtype)
    finally:
        hook.remove()
    assert_same_state(model, before)
    # The steps ran in the low precision and the exact passes in float32.
    assert seen == {getattr(torch, ascent_dtype), torch.float32}
    x = sk.FlatParams(model).get()
    assert r.loss == pytest.approx(_exact_loss64(model, data, x), rel=1e-5)
    assert r.max_loss == pytest.approx(_exact_loss64(model, data, x + r.perturbation), rel=1e-5)
    assert r.value == pytest.approx(100 * (r.max_loss - r.loss) / (1 + r.loss), rel=1e-12)
    assert r.value > 0
    assert bool((r.perturbation.abs() <= 1e-3 * (x.abs() + 1) * (1 + 1e-6)).all())
    assert r.info["ascent_dtype"] == ascent_dtype
    assert r.num_evals == 1 + 1 + 10 + 1
    assert [h[0] for h in r.history] == [2, 13] and r.history[-1][2] == pytest.approx(r.value, rel=1e-12)


def test_keskar_bfloat16_steps_reach_lbfgsb_on_a_trained_mlp(trained32):
    """On a trained MLP the bfloat16 steps still find a perturbation at least as sharp as the
    paper's L-BFGS-B (10 iterations), in the full space and a subspace."""
    model, data = trained32
    ce = nn.CrossEntropyLoss()
    for eps in (1e-3, 5e-4):
        ref = sk.keskar_sharpness(model, ce, data, epsilon=eps, solver="lbfgsb")
        fast = sk.keskar_sharpness(model, ce, data, epsilon=eps, solver="apgd", ascent_dtype="bfloat16")
        assert fast.value >= ref.value > 0
    sub_ref = sk.keskar_sharpness(model, ce, data, epsilon=1e-3, subspace_dim=20, solver="lbfgsb")
    sub = sk.keskar_sharpness(model, ce, data, epsilon=1e-3, subspace_dim=20, solver="apgd", ascent_dtype="bfloat16")
    assert sub.coords.shape == (20,)
    x = sk.FlatParams(model).get()
    assert sub.max_loss == pytest.approx(_exact_loss64(model, data, x + sub.perturbation), rel=1e-5)
    assert sub.value >= 0.95 * sub_ref.value > 0


def test_adaptive_low_precision_steps_per_chunk(trained32):
    model, data = trained32
    r = sk.adaptive_sharpness(model, nn.CrossEntropyLoss(), data, rho=0.01, m=64, num_examples=256,
                              ascent_dtype="bfloat16")
    assert r.perturbation.shape[0] == 4
    x = sk.FlatParams(model).get()
    chunk_losses = [_exact_loss64(model, (data[0][s:s + 64], data[1][s:s + 64]), x + r.perturbation[i])
                    for i, s in enumerate(range(0, 256, 64))]
    assert r.max_loss == pytest.approx(sum(chunk_losses) / 4, rel=1e-5)
    assert r.value > 0 and r.info["ascent_dtype"] == "bfloat16"


def test_ascent_dtype_errors(trained32):
    model, data = trained32
    ce = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="L-BFGS-B"):
        sk.keskar_sharpness(model, ce, data, ascent_dtype="bfloat16")  # the default solver is lbfgsb
    with pytest.raises(ValueError, match="ascent_dtype"):
        sk.keskar_sharpness(model, ce, data, solver="apgd", ascent_dtype="int8")
    with pytest.raises(ValueError, match="float32"):
        sk.keskar_sharpness(model, ce, data, solver="apgd", ascent_dtype="bfloat16", dtype=torch.float64)
    with pytest.raises(ValueError, match="kind='worst'"):
        sk.adaptive_sharpness(model, ce, data, rho=0.01, kind="average", ascent_dtype="bfloat16")


def test_audit_low_precision_steps(tmp_path, trained32):
    model, data = trained32
    paths = []
    for i in range(3):
        sd = {k: v + 0.01 * i for k, v in model.state_dict().items()}
        paths.append(tmp_path / f"step_{i}.pt")
        torch.save(sd, paths[-1])
    factory = lambda: mlp((8, 64, 64, 4), seed=5, dtype=torch.float32)  # noqa: E731
    rows = audit([str(p) for p in paths], factory, data, metrics="keskar,adaptive", out=tmp_path / "a.jsonl",
                 ascent_dtype="bfloat16", group_size=3)
    full = audit([str(p) for p in paths], factory, data, metrics="keskar,adaptive", group_size=3)
    assert all(r["status"] == "ok" for r in rows + full)
    for r, f in zip(rows, full):
        assert r["config"]["ascent_dtype"] == "bfloat16" and "ascent_dtype" not in f["config"]
        assert r["key"] != f["key"]
        assert r["loss"] == pytest.approx(f["loss"], rel=1e-6)  # exact, not the steps' estimate
        assert r["details"]["keskar"]["num_evals"] == 1 + 1 + 10 + 1
        assert r["keskar"] > 0 and r["adaptive"] > 0
    # One at a time the audit runs the API's algorithm: the same value as keskar_sharpness.
    alone = audit([str(paths[0])], factory, data, metrics="keskar", ascent_dtype="bfloat16", group_size=1)
    api = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), data, solver="apgd", ascent_dtype="bfloat16")
    assert alone[0]["keskar"] == pytest.approx(api.value, rel=1e-5)
    with pytest.raises(ValueError, match="exact"):
        audit([str(paths[0])], factory, data, metrics="keskar", solver="lbfgsb", ascent_dtype="bfloat16")
    with pytest.raises(ValueError, match="float32"):
        audit([str(paths[0])], factory, data, metrics="keskar", ascent_dtype="bfloat16", dtype="float64")


def test_cli_ascent_dtype(tmp_path, capsys, trained32):
    model, data = trained32
    torch.save({"x_train": data[0], "y_train": data[1]}, tmp_path / "data.pt")
    ck = tmp_path / "m.pt"
    torch.save(model.state_dict(), ck)
    (tmp_path / "nets8.py").write_text("from test_sharpness_helpers import mlp\nimport torch\n"
                                       "def make():\n    return mlp((8, 64, 64, 4), seed=5, dtype=torch.float32)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        base = ["sharpness", "--model", "nets8:make", "--checkpoint", str(ck), "--data", str(tmp_path / "data.pt")]
        out = tmp_path / "s.json"
        assert main(base + ["--solver", "apgd", "--ascent-dtype", "bfloat16", "--out", str(out)]) == 0
        result = json.loads(out.read_text(encoding="utf-8"))
        assert result["ascent_dtype"] == "bfloat16"
        ref = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), data, solver="apgd", ascent_dtype="bfloat16")
        assert result["results"][0]["loss"] == pytest.approx(ref.loss, rel=1e-6)
        for extra in (["--ascent-dtype", "bfloat16"], ["--kind", "adaptive-average", "--ascent-dtype", "float16"]):
            capsys.readouterr()
            assert main(base + extra + ["--out", str(tmp_path / "x.json")]) == 2
            assert capsys.readouterr().err.startswith("sharpkit sharpness: error: --ascent-dtype")
    finally:
        sys.path.remove(str(tmp_path))


class CountingBatches:
    """Batches that count how often they are read."""

    def __init__(self, data):
        self.data, self.reads = data, 0

    def __iter__(self):
        self.reads += 1
        return iter([self.data])


def test_unusable_ascent_dtype_is_refused_before_the_data_are_read(trained32, tmp_path):
    model, data = trained32
    ce = nn.CrossEntropyLoss()
    batches = CountingBatches(data)
    with pytest.raises(ValueError, match="float32"):
        sk.keskar_sharpness(model, ce, batches, solver="apgd", ascent_dtype="bfloat16", dtype=torch.float64)
    with pytest.raises(ValueError, match="float32"):
        sk.adaptive_sharpness(copy.deepcopy(model).double(), ce, batches, rho=0.01, ascent_dtype="bfloat16")
    with pytest.raises(ValueError, match="autocast"):
        sk.keskar_sharpness(model, ce, batches, solver="apgd", ascent_dtype="bfloat16", device="meta")
    assert batches.reads == 0
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    factory = lambda: mlp((8, 64, 64, 4), seed=5, dtype=torch.float32)  # noqa: E731
    with pytest.raises(ValueError, match="float32"):
        audit([str(path)], factory, batches, metrics="keskar", ascent_dtype="bfloat16", dtype="float64")
    assert batches.reads == 0
    # Without a maximisation among the metrics the option is ignored (and not keyed), like epsilon.
    rows = audit([str(path)], factory, data, metrics="top-eig", ascent_dtype="bfloat16", dtype="float64",
                 solver="lbfgsb", lanczos_steps=3)
    assert rows[0]["status"] == "ok" and "ascent_dtype" not in rows[0]["config"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_autocast_that_would_disable_itself_is_an_error():
    with pytest.raises(ValueError, match="disabled on cuda"):
        solvers.check_autocast("bfloat16", "cuda", torch.float32)
    with pytest.raises(ValueError, match="no autocast for device type 'meta'"):
        solvers.check_autocast("float16", "meta", torch.float32)
    assert solvers.check_autocast("bfloat16", "cpu", torch.float32) is torch.bfloat16


class NoLowPrecision(nn.Module):
    """A layer without a low-precision kernel: it fails whenever autocast is on."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):
            raise RuntimeError("could not create a primitive descriptor for this layer\nmore detail")
        return self.lin(x)


def test_a_model_that_fails_in_low_precision_gets_a_clear_error(trained32):
    _, data = trained32
    with pytest.raises(ValueError, match="low-precision ascent steps fail on this model: could not create"):
        sk.keskar_sharpness(NoLowPrecision(), nn.CrossEntropyLoss(), data, solver="apgd", ascent_dtype="bfloat16")


@pytest.mark.gpu
@pytest.mark.parametrize("ascent_dtype", ["bfloat16", "float16"])
def test_gpu_low_precision_steps_report_exact_values(trained32, ascent_dtype):
    """On the GPU the steps run in the low precision (tensor cores) and the value stays exact."""
    model, data = trained32
    gpu_model = copy.deepcopy(model).cuda()
    seen = set()
    hook = gpu_model[0].register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    r = sk.keskar_sharpness(gpu_model, nn.CrossEntropyLoss(), data, solver="apgd", ascent_dtype=ascent_dtype)
    hook.remove()
    assert seen == {getattr(torch, ascent_dtype), torch.float32}
    x = sk.FlatParams(model).get()
    assert r.loss == pytest.approx(_exact_loss64(model, data, x), rel=1e-5)
    assert r.max_loss == pytest.approx(_exact_loss64(model, data, x + r.perturbation.cpu()), rel=1e-5)
    ref = sk.keskar_sharpness(model, nn.CrossEntropyLoss(), data, solver="lbfgsb")
    assert r.value >= 0.95 * ref.value > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("bn", ["eval", "train"])
def test_batchnorm_model_low_precision_steps_exact(trained32, device, bn):
    """BatchNorm under autocast (running or batch statistics): the reported losses are exact."""
    _, data = trained32
    model = mlp((8, 32, 32, 4), bn=True, seed=2, dtype=torch.float32).eval()
    before = state(model)
    r = sk.keskar_sharpness(copy.deepcopy(model).to(device) if device == "cuda" else model, nn.CrossEntropyLoss(),
                            data, solver="apgd", ascent_dtype="bfloat16", bn=bn, max_iter=5)
    assert_same_state(model, before)
    ref_model = copy.deepcopy(model).double()
    if bn == "train":
        ref_model.train()
    flat = sk.FlatParams(ref_model)
    x = flat.get()

    def loss_at(w):
        tensors = dict(zip(flat.names, flat.views(w)))
        tensors.update({k: v.clone() for k, v in ref_model.named_buffers()})  # running statistics untouched
        with torch.no_grad():
            return float(nn.functional.cross_entropy(functional_call(ref_model, tensors, (data[0].double(),)), data[1]))

    assert r.loss == pytest.approx(loss_at(x), rel=1e-5)
    assert r.max_loss == pytest.approx(loss_at(x + r.perturbation.cpu().double()), rel=1e-5)
    assert r.max_loss > r.loss
