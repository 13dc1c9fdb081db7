"""Curvature on architectures beyond MLPs, against explicit float64 references built without
sharpkit: attention (nn.MultiheadAttention, nn.TransformerEncoderLayer) on integer tokens, a
CNN with BatchNorm2d/MaxPool/AdaptiveAvgPool/Dropout, a tied-embedding language model with
per-token cross-entropy (ignore_index padding, class weights), and uint8 class-index targets.

The Hessian references are row-by-row double backward: torch.func.hessian (jacfwd over jacrev)
and jacrev(jacrev) are wrong through LayerNorm/GroupNorm and BatchNorm with batch statistics
(torch 2.13: 2.7% and 7.5% off finite differences on small models), so they are not used here."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import sharpkit as sk
from sharpkit.objective import Objective, sample_weigher

F64 = torch.float64


# -- references ----------------------------------------------------------------------------------------

def _functional(model: nn.Module, bn: str = "eval"):
    """(x0, out(x, inputs)) of a float64 copy: dropout off, BatchNorm by running or batch statistics."""
    m = copy.deepcopy(model).to(F64).eval()
    if bn == "train":
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.train()
                mod.track_running_stats = False
                mod.running_mean = mod.running_var = None
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    fixed = {n: p.detach() for n, p in m.named_parameters() if not p.requires_grad}
    fixed.update({n: b.detach() for n, b in m.named_buffers()})
    x0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def out(x, inputs):
        tensors, off = dict(fixed), 0
        for n, p in named:
            tensors[n] = x[off:off + p.numel()].view(p.shape)
            off += p.numel()
        return functional_call(m, tensors, (inputs.to(F64) if inputs.is_floating_point() else inputs,))

    return x0, out


def _rows_hessian(f, x0):
    x = x0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    return torch.stack([torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(x.numel())])


def _references(model, loss, batches, bn="eval"):
    """Explicit float64 (Hessian, GGN) of the objective: one batch of all the data (bn="eval"), or
    the sample-weighted mean of the batches' own (bn="train", batch statistics)."""
    x0, out = _functional(model, bn)
    loss = copy.deepcopy(loss).to(F64) if isinstance(loss, nn.Module) else loss
    groups = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))] if bn == "eval" else batches
    H = G = 0
    total = sum(b[0].shape[0] for b in groups)
    with sdpa_kernel([SDPBackend.MATH]):
        for X, Y in groups:
            w = X.shape[0] / total
            H = H + w * _rows_hessian(lambda x: loss(out(x, X), Y), x0)
            o = out(x0, X)
            J = jacrev(lambda x: out(x, X))(x0).reshape(o.numel(), -1)
            Hl = hessian(lambda z: loss(z, Y))(o).reshape(o.numel(), o.numel())
            G = G + w * (J.T @ Hl @ J)
    return H, G


def _state(model):
    tensors = {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    return tensors, [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def _assert_restored(model, state):
    tensors, flags, grads = state
    now = dict(list(model.named_parameters()) + list(model.named_buffers()))
    assert set(now) == set(tensors)
    for n, t in tensors.items():
        assert torch.equal(now[n].detach(), t), n
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grads


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# -- models --------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Token classifier: embedding + position, attention (with dropout), mean pooling."""

    def __init__(self, layer: bool, vocab: int = 7, d: int = 4, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(5, d))
        if layer:
            self.block = nn.TransformerEncoderLayer(d, 2, dim_feedforward=6, dropout=0.2, batch_first=True)
        else:
            self.block = nn.MultiheadAttention(d, 2, dropout=0.2, batch_first=True)
        self.fc = nn.Linear(d, classes)

    def forward(self, tokens):
        h = self.emb(tokens) + self.pos[: tokens.shape[1]]
        if isinstance(self.block, nn.MultiheadAttention):
            h = h + self.block(h, h, h, need_weights=False)[0]
        else:
            h = self.block(h)
        return self.fc(h.mean(1))


class CNN(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.c1, self.bn, self.pool = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.MaxPool2d(2)
        self.drop, self.c2, self.gap = nn.Dropout(0.3), nn.Conv2d(2, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, classes)

    def forward(self, x):
        x = self.drop(self.pool(torch.relu(self.bn(self.c1(x)))))
        return self.fc(self.gap(torch.tanh(self.c2(x))).flatten(1))


class TiedLM(nn.Module):
    """Per-token logits (N, C, T) from a GRU, output layer tied to the input embedding."""

    def __init__(self, vocab: int = 5, d: int = 4):
        super().__init__()
        self.emb, self.rnn = nn.Embedding(vocab, d), nn.GRU(d, d, batch_first=True)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.rnn(self.emb(tokens))[0])).transpose(1, 2)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- tests ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [False, True], ids=["multihead", "encoder-layer"])
@pytest.mark.parametrize("ad", ["forward-over-reverse", "reverse-over-reverse"])
def test_attention_models_hessian_and_ggn(layer, ad):
    """Attention goes through F.scaled_dot_product_attention, whose fused CPU/GPU kernels have no
    second derivative: every product failed ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented")."""
    torch.manual_seed(0)
    model = Attention(layer).double().train()  # (the measurement turns dropout off)
    g = _gen()
    batches = [(torch.randint(0, 7, (s, 5), generator=g), torch.randint(0, 3, (s,), generator=g)) for s in (4, 3)]
    H, G = _references(model, nn.CrossEntropyLoss(), batches)
    state = _state(model)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    for kind, ref in (("hessian", H), ("ggn", G)):
        op = getattr(sk, kind)(model, nn.CrossEntropyLoss(), batches, cache=False, ad=ad)
        assert _rel(op.dense(), ref) < 1e-10, kind
        _assert_restored(model, state)
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
    top = sk.eigenvalues(sk.hessian(model, nn.CrossEntropyLoss(), batches), k=1, tol=1e-8).values
    assert float(top[0]) == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_cnn_batchnorm_pooling_dropout(bn):
    torch.manual_seed(1)
    model = CNN().double()
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.tensor([0.3, -0.2]))
        model.bn.running_var.copy_(torch.tensor([0.7, 1.4]))
    g = _gen(1)
    batches = [(torch.randn(s, 1, 4, 4, generator=g, dtype=F64), torch.randint(0, 3, (s,), generator=g))
               for s in (5, 3)]
    H, G = _references(model, nn.CrossEntropyLoss(), batches, bn)
    state = _state(model)
    for kind, ref in (("hessian", H), ("ggn", G)):
        assert _rel(getattr(sk, kind)(model, nn.CrossEntropyLoss(), batches, bn=bn).dense(), ref) < 1e-10, kind
        _assert_restored(model, state)


def test_tied_language_model_ignore_index_and_class_weights():
    torch.manual_seed(2)
    model = TiedLM().double()
    g = _gen(2)
    batches = []
    for s in (3, 2):
        x, y = torch.randint(0, 5, (s, 4), generator=g), torch.randint(0, 5, (s, 4), generator=g)
        y[torch.rand(s, 4, generator=g) < 0.35] = -100
        batches.append((x, y))
    loss = nn.CrossEntropyLoss(weight=torch.rand(5, generator=g, dtype=F64) + 0.5)
    H, G = _references(model, loss, batches)  # (all the data as one batch)
    state = _state(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*map(torch.cat, zip(*batches))), batch_size=2)
    for data in (batches, loader):
        assert _rel(sk.hessian(model, loss, data).dense(), H) < 1e-10
        assert _rel(sk.ggn(model, loss, data).dense(), G) < 1e-10
        _assert_restored(model, state)


@pytest.mark.parametrize("engine", ["generic", "fused"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "class-weights"])
def test_uint8_class_targets(engine, weighted):
    """Cross-entropy takes uint8 class indices (a byte-level model's targets).  The curvature
    engines failed on them (generic: "gather(): Expected dtype int32/int64 for index"; fused:
    the targets indexed as a mask), and the objective's sample weights compared them with -100
    as uint8, where a target 156 equals it: those samples weighed 0."""
    torch.manual_seed(3)
    classes = 160
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, classes)).double()
    g = _gen(3)
    x = torch.randn(9, 4, generator=g, dtype=F64)
    y = torch.randint(0, classes, (9,), generator=g)
    y[:3] = 156
    loss = (nn.CrossEntropyLoss(weight=torch.rand(classes, generator=g, dtype=F64) + 0.5) if weighted
            else F.cross_entropy)
    long_batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    byte_batches = [(a, b.to(torch.uint8)) for a, b in long_batches]
    for kind in ("hessian", "ggn"):
        ref = getattr(sk, kind)(model, loss, long_batches, engine=engine, regroup=False).dense()
        got = getattr(sk, kind)(model, loss, byte_batches, engine=engine, regroup=False).dense()
        assert _rel(got, ref) < 1e-12, kind
    assert torch.equal(sample_weigher(loss)(byte_batches[0]), sample_weigher(loss)(long_batches[0]))
    objective = Objective(model, loss, byte_batches)
    with torch.no_grad():
        expected = float(loss(model(x), y))
    assert float(objective.loss(objective.x0())) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("group_size", [1, 2])
def test_audit_top_eigenvalue_of_attention_checkpoints(tmp_path, group_size):
    """The audit's Hessian products (stacked and one at a time) go through attention too: its
    top-eig metric on a transformer stopped the whole audit with the flash-attention error."""
    g = _gen(3)
    X = torch.randint(0, 7, (6, 5), generator=g)
    Y = torch.randint(0, 3, (6,), generator=g)
    refs, paths = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = Attention(layer=True).double()
        H, _ = _references(model, nn.CrossEntropyLoss(), [(X, Y)])
        refs.append(float(torch.linalg.eigvalsh(H)[-1]))
        path = tmp_path / f"ckpt{seed}.pt"
        torch.save(model.state_dict(), path)
        paths.append(str(path))
    torch.manual_seed(0)
    rows = sk.audit(paths, Attention(layer=True).double(), (X, Y), metrics=["top-eig"], dtype=torch.float64,
                    group_size=group_size, lanczos_steps=60)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    for row, ref in zip(rows, refs):
        assert row["top-eig"] == pytest.approx(ref, rel=1e-6)


def test_a_wrapped_loss_over_padded_targets_in_several_batches_warns():
    """A wrapper of cross-entropy (here over (N*T, C) outputs) is taken as a per-sample mean: with
    ignored (-100) targets spread unevenly over batches that weighs the batches wrongly, so it warns;
    the loss module itself, or one batch, does not."""
    torch.manual_seed(0)
    model = TiedLM()
    ce = nn.CrossEntropyLoss()

    def wrapped(outputs, targets):
        return ce(outputs.transpose(1, 2).reshape(-1, outputs.shape[1]), targets.reshape(-1))

    g = _gen(5)
    batches = [(torch.randint(0, 5, (s, 4), generator=g), torch.randint(0, 5, (s, 4), generator=g)) for s in (3, 2)]
    batches[1][1][0, :3] = -100
    V = torch.randn(sum(p.numel() for p in model.parameters()), 1, generator=g)
    with pytest.warns(RuntimeWarning, match=r"hold -100 .* 3 times, but loss_fn wrapped"):
        sk.hessian(model, wrapped, batches).matmat(V)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.hessian(model, ce, batches).matmat(V)  # recognised: weighs the targets not ignored
        sk.hessian(model, wrapped, batches[1:]).matmat(V)  # one batch: the objective is its loss
