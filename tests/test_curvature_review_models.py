"""Curvature of the models users measure beyond MLPs, each against an explicit float64 reference
built here without sharpkit (double backward over a flat float64 parameter vector; the GGN as
J^T H_out J from explicit Jacobians): a ResNet block (grouped/dilated/strided convolutions,
BatchNorm in eval, residual add, adaptive pooling), a tiny transformer block (embedding, LayerNorm,
causal attention through nn.MultiheadAttention and F.scaled_dot_product_attention, GELU MLP, tied
output embedding) over padded token targets, LSTM/GRU classifiers, models returning a tuple or dict,
frozen parameters with integer/bool buffers, and MSE with multi-dimensional targets.

The Hessian reference is torch.autograd.functional.hessian (a batched double backward, equal to the
row-by-row one to 1e-17 on these models and to finite differences to 5e-9); torch.func.hessian is
not used: it is 12% off through LayerNorm (torch 2.13)."""
from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import sharpkit as sk
from test_curvature_architectures import _functional as _architectures_functional

F64 = torch.float64


# -- references ----------------------------------------------------------------------------------------

def _functional(model: nn.Module, select=None):
    """(x0, out(x, inputs)) of a float64 eval copy over the parameters with requires_grad (the
    architectures' reference), the output picked by ``select`` where given."""
    x0, out = _architectures_functional(model)
    return x0, (out if select is None else (lambda x, inputs: select(out(x, inputs))))


def _targets(Y):
    return Y.to(F64) if Y.is_floating_point() else Y


def _ref_hessian(model, loss, X, Y, select=None):
    """Explicit float64 Hessian of loss(model(X), Y) (all the data as one batch)."""
    x0, out = _functional(model, select)
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.functional.hessian(lambda x: loss(out(x, X), _targets(Y)), x0, vectorize=True)


def _ref_ggn(model, loss, X, Y, select=None):
    """Explicit float64 J^T H_out J with J the Jacobian of the (selected) output."""
    x0, out = _functional(model, select)
    with sdpa_kernel([SDPBackend.MATH]):
        o = out(x0, X).detach()
        J = torch.autograd.functional.jacobian(lambda x: out(x, X).reshape(-1), x0, vectorize=True)
        Ho = torch.autograd.functional.hessian(lambda z: loss(z.reshape(o.shape), _targets(Y)), o.reshape(-1))
    return J.T @ Ho @ J


def _state(model):
    sd = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    meta = ([(n, m.training) for n, m in model.named_modules()],
            [(n, p.requires_grad, p.dtype, p.data_ptr()) for n, p in model.named_parameters()],
            [(n, b.dtype, b.data_ptr()) for n, b in model.named_buffers()])
    return sd, meta


def _assert_restored(model, state):
    sd, meta = _state(model)
    assert sd.keys() == state[0].keys()
    for k, v in state[0].items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
    assert meta == state[1]


def _rel(a, b):
    return float((a.to(F64) - b).norm() / b.norm())


# -- models --------------------------------------------------------------------------------------------

class ResNetBlock(nn.Module):
    """A basic block: grouped+dilated conv, strided conv, BatchNorm (random running statistics),
    a strided 1x1 shortcut, residual add, adaptive average pooling, a linear head."""

    def __init__(self, c: int = 2, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.conv1 = nn.Conv2d(c, c, 3, padding=2, dilation=2, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.short = nn.Conv2d(c, c, 1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(c, generator=g) * 0.2)
                bn.num_batches_tracked.fill_(7)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h)))))
        return self.fc(self.pool(torch.relu(y + self.short(h))).flatten(1))


class TinyLM(nn.Module):
    """Pre-norm causal transformer block with a tied output embedding; logits (N, V, L) for
    nn.CrossEntropyLoss over sequences, or (N, L, V) with ``channels_first=False``."""

    def __init__(self, V: int = 5, d: int = 4, heads: int = 2, L: int = 4, attn: str = "mha", channels_first: bool = True):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.pos = nn.Parameter(torch.randn(L, d) * 0.3)
        self.ln1, self.ln2, self.lnf = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn_kind, self.heads, self.channels_first = attn, heads, channels_first
        if attn == "mha":
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        else:
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.register_buffer("mask", torch.triu(torch.ones(L, L, dtype=torch.bool), 1))

    def forward(self, ids):
        n, L = ids.shape
        h = self.emb(ids) + self.pos[:L]
        a = self.ln1(h)
        if self.attn_kind == "mha":
            a, _ = self.attn(a, a, a, attn_mask=self.mask[:L, :L], need_weights=False)
        else:
            q, k, v = self.qkv(a).chunk(3, -1)
            heads = [t.reshape(n, L, self.heads, -1).transpose(1, 2) for t in (q, k, v)]
            a = self.proj(F.scaled_dot_product_attention(*heads, is_causal=True).transpose(1, 2).reshape(n, L, -1))
        h = h + a
        h = h + self.mlp(self.ln2(h))
        logits = self.lnf(h) @ self.emb.weight.t()
        return logits.transpose(1, 2) if self.channels_first else logits


class RNNClassifier(nn.Module):
    def __init__(self, cell: str):
        super().__init__()
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(3, 3, batch_first=True)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


class StructuredOutput(nn.Module):
    """HF-style: a dict (or tuple) holding the logits, a hidden state, an integer tensor, None and a
    number; the loss picks the logits."""

    def __init__(self, kind: str):
        super().__init__()
        self.l1, self.l2, self.kind = nn.Linear(4, 5), nn.Linear(5, 3), kind

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        logits = self.l2(h)
        if self.kind == "dict":
            return {"logits": logits, "hidden": (h, None), "positions": torch.arange(3), "step": 3}
        return logits, h


class Frozen(nn.Module):
    """A frozen first layer, BatchNorm, a float buffer, an int64 and a bool buffer in the forward."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)
        self.register_buffer("scale", torch.tensor([1.5, 0.5, 1.0, 2.0, 1.0]))
        self.register_buffer("count", torch.tensor(3))
        self.register_buffer("flag", torch.tensor(True))
        self.a.weight.requires_grad_(False)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.3, 0.3)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        h = torch.tanh(self.bn(self.a(x)) * self.scale) * (self.count.float() / 3 if self.flag else 1.0)
        return self.b(h)


def _tokens(n: int = 5, L: int = 4, V: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, L), generator=g)
    tg = torch.randint(0, V, (n, L), generator=g)
    tg[0, 1:] = -100  # padding, unevenly spread over the batches below
    tg[min(3, n - 1), 2:] = -100
    return ids, tg


# -- tests ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_resnet_block_operator_spectrum_trace_and_density(kind, one_thread):
    torch.manual_seed(0)
    model = ResNetBlock().train()  # bn="eval" must switch it to running statistics and back
    X, Y = torch.randn(5, 2, 5, 5), torch.tensor([0, 1, 2, 1, 0])
    before = _state(model)
    build = sk.hessian if kind == "hessian" else sk.ggn
    op = build(model, nn.CrossEntropyLoss(), [(X[:3], Y[:3]), (X[3:], Y[3:])], dtype=F64)
    ref = (_ref_hessian if kind == "hessian" else _ref_ggn)(model, nn.CrossEntropyLoss(), X, Y)
    evals = np.linalg.eigvalsh(ref.numpy())
    assert _rel(op.dense(), ref) < 1e-10
    top = sk.eigenvalues(op, k=3, tol=1e-8)
    np.testing.assert_allclose(top.values.numpy(), evals[::-1][:3], rtol=1e-7, atol=1e-12)
    assert sk.eigenvalues(op, k=1, tol=1e-8).values[0].item() == pytest.approx(evals[-1], rel=1e-7)
    n = op.n
    exact = sk.trace(op, method="hutch++", num_matvecs=3 * n)  # the sketch spans the whole space
    assert exact.value == pytest.approx(evals.sum(), rel=1e-8, abs=1e-12)
    hutch = sk.trace(op, method="hutchinson", num_matvecs=400, seed=1)
    assert abs(hutch.value - evals.sum()) < 4 * hutch.stderr
    # Density with n Lanczos steps: each run's quadrature integrates t and t^2 exactly for its start
    # vector v (v^T H v / n, |Hv|^2 / n), so the run-mean moments are Hutchinson estimates of
    # tr(H)/n and tr(H^2)/n; the extreme nodes are the extreme eigenvalues.
    dens = sk.spectral_density(op, num_runs=24, lanczos_steps=n, seed=2)
    valid = ~torch.isnan(dens.nodes)
    nodes = torch.where(valid, dens.nodes, torch.zeros_like(dens.nodes))
    for p, exact_moment in ((1, evals.sum() / n), (2, (evals ** 2).sum() / n)):
        per_run = (dens.weights * nodes ** p).sum(1)
        assert abs(per_run.mean().item() - exact_moment) < 4 * per_run.std().item() / math.sqrt(24) + 1e-12
    assert dens.nodes[valid].max().item() == pytest.approx(evals[-1], rel=1e-8)
    assert dens.nodes[valid].min().item() == pytest.approx(evals[0], rel=1e-8, abs=1e-10)
    area = torch.trapezoid(dens.density, dens.grid).item()
    assert area == pytest.approx(1.0, abs=1e-3)
    _assert_restored(model, before)
    assert "ResNetBlock" in op.engine_info["why_not_fused"]


def test_resnet_block_in_float32_is_within_rounding_of_float64(one_thread):
    torch.manual_seed(1)
    model = ResNetBlock()
    X, Y = torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 2, 1])
    op = sk.hessian(model, nn.CrossEntropyLoss(), (X, Y))
    assert op.dtype == torch.float32
    ref = _ref_hessian(model, nn.CrossEntropyLoss(), X, Y)
    assert _rel(op.dense(), ref) < 1e-5
    top = sk.eigenvalues(op, k=1, tol=1e-6).values[0].item()
    assert top == pytest.approx(np.linalg.eigvalsh(ref.numpy())[-1], rel=1e-5)


@pytest.mark.parametrize("attn", ["mha", "sdpa"])
def test_transformer_block_with_padded_sequence_targets_in_uneven_batches(attn, one_thread):
    torch.manual_seed(2)
    model = TinyLM(attn=attn)
    ids, tg = _tokens()
    before = _state(model)
    # Batches of 2 and 3 sequences with 3 and 2 padded tokens: the objective is the mean over the
    # 20 - 5 = 15 real tokens, not the mean of the batches' means.
    batches = [(ids[:2], tg[:2]), (ids[2:], tg[2:])]
    loss = nn.CrossEntropyLoss()
    for build, ref in ((sk.hessian, _ref_hessian(model, loss, ids, tg)), (sk.ggn, _ref_ggn(model, loss, ids, tg))):
        op = build(model, loss, batches, dtype=F64, regroup=False)
        assert _rel(op.dense(), ref) < 1e-10
        evals = np.linalg.eigvalsh(ref.numpy())
        np.testing.assert_allclose(sk.eigenvalues(op, k=3, tol=1e-8).values.numpy(), evals[::-1][:3], rtol=1e-6)
        _assert_restored(model, before)


def test_transformer_block_with_flattened_logits_and_a_keyword_ignore_index(one_thread):
    torch.manual_seed(3)
    model = TinyLM(attn="sdpa", channels_first=False)
    ids, tg = _tokens(n=3)
    tg = torch.where(tg == -100, torch.zeros_like(tg), tg)  # pad with class 0, ignored by the loss

    def loss(out, y):
        return F.cross_entropy(out.reshape(-1, 5), y.reshape(-1), ignore_index=0)

    for build, ref in ((sk.hessian, _ref_hessian(model, loss, ids, tg)), (sk.ggn, _ref_ggn(model, loss, ids, tg))):
        op = build(model, loss, (ids, tg))  # float32 model, float32 products
        assert _rel(op.dense(), ref) < 1e-5


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_classifiers(cell, one_thread):
    torch.manual_seed(4)
    model = RNNClassifier(cell)
    X, Y = torch.randn(5, 3, 3), torch.tensor([0, 1, 2, 1, 0])
    before = _state(model)
    for build, ref_fn in ((sk.hessian, _ref_hessian), (sk.ggn, _ref_ggn)):
        ref = ref_fn(model, nn.CrossEntropyLoss(), X, Y)
        for cache in (True, False):  # double backward on a kept graph / forward-over-reverse
            op = build(model, nn.CrossEntropyLoss(), (X, Y), dtype=F64, cache=cache)
            assert _rel(op.dense(), ref) < 1e-10, (build.__name__, cache, op.engine_info)
        top = sk.eigenvalues(op, k=1, tol=1e-8).values[0].item()
        assert top == pytest.approx(np.linalg.eigvalsh(ref.numpy())[-1], rel=1e-7)
    _assert_restored(model, before)


@pytest.mark.parametrize("kind", ["dict", "tuple"])
@pytest.mark.parametrize("cache", [True, False])
def test_ggn_and_hessian_of_a_model_returning_a_dict_or_tuple(kind, cache, one_thread):
    """The loss picks the logits; the GGN is J^T H J of the whole output, where what the loss does not
    read adds nothing: the GGN of the logits.  Before, every GGN product of such a model failed with
    "zeros_like(): argument 'input' must be Tensor, not dict"."""
    torch.manual_seed(5)
    model = StructuredOutput(kind)
    X, Y = torch.randn(6, 4), torch.tensor([0, 1, 2, 1, 0, 2])
    pick = (lambda o: o["logits"]) if kind == "dict" else (lambda o: o[0])

    def loss(out, y):
        return F.cross_entropy(pick(out), y)

    for build, ref_fn in ((sk.ggn, _ref_ggn), (sk.hessian, _ref_hessian)):
        op = build(model, loss, (X, Y), dtype=F64, cache=cache)
        assert _rel(op.dense(), ref_fn(model, nn.CrossEntropyLoss(), X, Y, select=pick)) < 1e-12


def test_ggn_of_a_tuple_output_the_loss_reads_whole(one_thread):
    """A loss over both outputs: the GGN couples them (J^T H J with J stacking both Jacobians)."""
    torch.manual_seed(6)
    model = StructuredOutput("tuple")
    X, Y = torch.randn(6, 4), torch.tensor([0, 1, 2, 1, 0, 2])

    def loss(out, y):
        return F.cross_entropy(out[0], y) + 0.3 * (out[0][:, :1] * out[1]).mean()

    x0, out = _functional(model)
    J = torch.autograd.functional.jacobian(lambda x: torch.cat([t.reshape(-1) for t in out(x, X)]), x0)
    o = torch.cat([t.reshape(-1) for t in out(x0, X)]).detach()
    Ho = torch.autograd.functional.hessian(lambda z: loss((z[:18].reshape(6, 3), z[18:].reshape(6, 5)), Y), o)
    ref = J.T @ Ho @ J
    for cache in (True, False):
        assert _rel(sk.ggn(model, loss, (X, Y), dtype=F64, cache=cache).dense(), ref) < 1e-12


def test_a_dict_output_given_to_cross_entropy_is_a_clear_error():
    model = StructuredOutput("dict")
    X, Y = torch.randn(6, 4), torch.tensor([0, 1, 2, 1, 0, 2])
    for build in (sk.hessian, sk.ggn):
        with pytest.raises(ValueError, match=r"returned a dict with keys \['logits'.*picks the logits"):
            build(model, nn.CrossEntropyLoss(), (X, Y)) @ torch.randn(43)


@pytest.mark.parametrize("bad, words", [
    (lambda tg: tg[..., None], r"shape \(5, 4, 1\).*must be shaped \(5, 4\) \(squeeze the last dimension\)"),
    (lambda tg: tg.clamp(min=0).float(), r"floating targets of shape \(5, 4\).*class labels must be integers"),
])
@pytest.mark.parametrize("build", [sk.hessian, sk.ggn])
def test_sequence_targets_of_the_wrong_shape_or_type_are_named(bad, words, build):
    """Before: torch's "Expected target size [5, 4], got [5, 4, 1]" / "expected target dtype to be
    Long or Byte" from the first product (the objective's own target checks were skipped on the
    curvature engines' form of the loss); named now where the operator is built."""
    model = TinyLM()
    ids, tg = _tokens()
    with pytest.raises(ValueError, match=words):
        build(model, nn.CrossEntropyLoss(), (ids, bad(tg)))


def test_frozen_parameters_and_integer_buffers_in_both_precisions(one_thread):
    torch.manual_seed(7)
    model = Frozen().train()
    X, Y = torch.randn(7, 4), torch.tensor([0, 1, 2, 1, 0, 2, 1])
    before = _state(model)
    for build, ref_fn in ((sk.hessian, _ref_hessian), (sk.ggn, _ref_ggn)):
        ref = ref_fn(model, nn.CrossEntropyLoss(), X, Y)
        assert ref.shape == (5 + 10 + 18, 5 + 10 + 18)  # a.bias, bn.weight and bias, b (a.weight frozen)
        op32 = build(model, nn.CrossEntropyLoss(), (X, Y))
        op64 = build(model, nn.CrossEntropyLoss(), (X, Y), dtype=F64)
        assert op32.dense().dtype == torch.float32 and _rel(op32.dense(), ref) < 1e-5
        assert _rel(op64.dense(), ref) < 1e-12
        _assert_restored(model, before)
    double = copy.deepcopy(model).double()
    op = sk.hessian(double, nn.CrossEntropyLoss(), (X.double(), Y))
    assert op.dtype == F64 and _rel(op.dense(), _ref_hessian(model, nn.CrossEntropyLoss(), X, Y)) < 1e-12


class _Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 6)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))).reshape(-1, 2, 3)


@pytest.mark.filterwarnings("ignore:sharpkit. forward-mode AD failed:RuntimeWarning")  # (MSE: pytorch 123996)
@pytest.mark.parametrize("cache", [True, False])
def test_mse_with_multidimensional_targets(cache, one_thread):
    torch.manual_seed(8)
    model = _Regressor()
    X, Y = torch.randn(7, 4), torch.randn(7, 2, 3)
    for build, ref_fn in ((sk.hessian, _ref_hessian), (sk.ggn, _ref_ggn)):
        op = build(model, nn.MSELoss(), [(X[:4], Y[:4]), (X[4:], Y[4:])], dtype=F64, cache=cache)
        ref = ref_fn(model, nn.MSELoss(), X, Y)
        assert _rel(op.dense(), ref) < 1e-12
        evals = np.linalg.eigvalsh(ref.numpy())
        assert sk.trace(op, num_matvecs=3 * op.n).value == pytest.approx(evals.sum(), rel=1e-9)
    for wrong in (torch.randn(7, 6), torch.randn(7, 2, 1)):
        with pytest.raises(ValueError, match=r"outputs of shape \(7, 2, 3\) with targets of shape"):
            sk.hessian(model, nn.MSELoss(), (X, wrong))


def test_auto_names_why_each_model_is_not_fused_and_fused_refuses():
    X = torch.randn(4, 1, 4, 4)
    Y = torch.tensor([0, 1, 2, 1])
    cases = [
        (ResNetBlock(), torch.randn(4, 2, 5, 5), "nn.Sequential of supported layers; the model is a ResNetBlock"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)), X, r"layer '0' \(Conv2d\)"),
        (nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.GELU(), nn.LayerNorm(6), nn.Linear(6, 3)), X,
         r"layer '3' \(LayerNorm\)"),
    ]
    for model, inputs, why in cases:
        for build in (sk.hessian, sk.ggn):
            op = build(model, nn.CrossEntropyLoss(), (inputs, Y))
            assert op.engine_info["engine"] == "generic"
            assert re.search(why, op.engine_info["why_not_fused"]), op.engine_info
            with pytest.raises(ValueError, match="engine='fused' is not possible here: .*" + why):
                build(model, nn.CrossEntropyLoss(), (inputs, Y), engine="fused")


def test_bad_inputs_to_a_transformer_are_named():
    model = TinyLM()
    ids, tg = _tokens()
    with torch.no_grad():
        model.mlp[0].weight[1, 2] = float("nan")
    before = _state(model)
    with pytest.raises(ValueError, match=r"parameter 'mlp\.0\.weight' contains NaN"):
        sk.hessian(model, nn.CrossEntropyLoss(), (ids, tg))
    # (the comparison below treats NaN == NaN: the model is left exactly as found)
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(before[0].values(), _state(model)[0].values()))
    model = TinyLM()
    with pytest.raises(ValueError, match="data is empty"):
        sk.ggn(model, nn.CrossEntropyLoss(), (ids[:0], tg[:0]))
    with pytest.raises(ValueError, match="disagree on the number of samples: 5 vs 20"):
        sk.hessian(model, nn.CrossEntropyLoss(), (ids, tg.reshape(-1)))
