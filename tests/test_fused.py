"""The fused HVP engine against explicit float64 Hessians and Gauss-Newton matrices.

References: ``torch.func.hessian`` of the flattened loss (exact Hessian) and ``J^T H_z J`` from
``torch.func.jacrev`` / ``hessian`` of the loss in the outputs (GGN), both in float64.
"""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

import sharpkit as sk
from sharpkit.curvature.fused import FusedEngine, fused_support
from sharpkit.params import FlatParams

RTOL = 1e-6

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
}


def explicit(model, loss_fn, X, Y, kind):
    """The (n, n) float64 Hessian or GGN of loss_fn(model(X), Y) in the flat parameters."""
    flat = FlatParams(model)
    x = flat.get(torch.float64)

    def outputs(xx):
        return functional_call(model, flat.as_dict(xx), (X,))

    if kind == "hessian":
        return hessian(lambda xx: loss_fn(outputs(xx), Y))(x)
    z = outputs(x).detach()
    J = jacrev(outputs)(x).reshape(z.numel(), x.numel())
    Hz = hessian(lambda zz: loss_fn(zz.view_as(z), Y))(z.reshape(-1)).reshape(z.numel(), z.numel())
    return J.T @ Hz @ J


def randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.normal_()
                m.bias.data.normal_()


def mlp(act, d_in=6, widths=(5, 7), d_out=3, bn=True):
    """Flatten -> [Linear, (BatchNorm1d), act] per width (the second inside a nested Sequential) -> Linear."""
    layers = [nn.Flatten()]
    fan_in = d_in
    for i, w in enumerate(widths):
        block = [nn.Linear(fan_in, w)] + ([nn.BatchNorm1d(w)] if bn else []) + [ACTIVATIONS[act](), nn.Dropout(0.5)]
        layers += block if i == 0 else [nn.Sequential(*block)]
        fan_in = w
    layers.append(nn.Linear(fan_in, d_out))
    model = nn.Sequential(*layers).double()
    randomize_bn(model)
    return model.eval()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def fused_product(model, loss_fn, X, Y, V, kind, **kw):
    flat = FlatParams(model)
    eng = FusedEngine(kind, model, loss_fn, flat, flat.get(torch.float64), dtype=torch.float64, device="cpu",
                      cache=True, **kw)
    return eng.batch_matmat(0, X, Y, V)


def data(loss, n=9, d_out=3, shape=(2, 3)):
    X = torch.randn(n, *shape, dtype=torch.float64)
    if loss == "mse":
        return X, torch.randn(n, d_out, dtype=torch.float64)
    return X, torch.randint(0, d_out, (n,))


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_every_activation_and_loss_matches_explicit(act, loss, kind):
    model = mlp(act)
    loss_fn = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()
    X, Y = data(loss)
    H = explicit(model, loss_fn, X, Y, kind)
    V = torch.randn(H.shape[0], 7, dtype=torch.float64)
    assert rel_err(fused_product(model, loss_fn, X, Y, V, kind), H @ V) < RTOL


@pytest.mark.parametrize("k", [1, 2, 7, 16])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_k_directions_and_odd_sizes(k, kind):
    model = mlp("gelu", d_in=11, widths=(13, 3, 9), d_out=5)
    loss_fn = nn.CrossEntropyLoss()
    X, Y = data("ce", n=17, d_out=5, shape=(11,))
    H = explicit(model, loss_fn, X, Y, kind)
    V = torch.randn(H.shape[0], k, dtype=torch.float64)
    # All k directions in one R-pass (the GPU default), one at a time (the CPU default), and uneven chunks.
    for chunk in (None, 1, 3):
        assert rel_err(fused_product(model, loss_fn, X, Y, V, kind, direction_chunk=chunk), H @ V) < RTOL


def test_direction_chunk_is_validated():
    model = mlp("relu")
    flat = FlatParams(model)
    for bad in (0, -2, 1.5, "all"):
        with pytest.raises(ValueError, match="direction_chunk"):
            FusedEngine("hessian", model, nn.CrossEntropyLoss(), flat, flat.get(torch.float64), direction_chunk=bad)


def test_vector_input_gives_vector_and_columns_are_independent():
    model = mlp("tanh")
    loss_fn = nn.CrossEntropyLoss()
    X, Y = data("ce")
    flat = FlatParams(model)
    eng = FusedEngine("hessian", model, loss_fn, flat, flat.get(), dtype=torch.float64, device="cpu", cache=True)
    V = torch.randn(flat.n, 3, dtype=torch.float64)
    both = eng.batch_matmat(0, X, Y, V)
    one = eng.batch_matmat(0, X, Y, V[:, 1])
    assert one.shape == (flat.n,)
    assert torch.allclose(one, both[:, 1], rtol=1e-12, atol=1e-14)
    assert eng.num_matvecs == 4
    assert eng.batch_matmat(0, X, Y, V[:, :0]).shape == (flat.n, 0)


@pytest.mark.parametrize(
    "loss_fn, targets",
    [
        (F.cross_entropy, "index"),
        (nn.CrossEntropyLoss(label_smoothing=0.2), "index"),
        (nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)), "index"),
        (nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64), label_smoothing=0.1,
                             ignore_index=1), "index"),
        (nn.CrossEntropyLoss(label_smoothing=0.3, weight=torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)),
         "soft"),
        (F.mse_loss, "real"),
    ],
    ids=["F.cross_entropy", "smoothing", "weight", "weight-smoothing-ignore", "soft-weight-smoothing", "F.mse_loss"],
)
def test_loss_variants(loss_fn, targets):
    model = mlp("silu", bn=False)
    X = torch.randn(10, 2, 3, dtype=torch.float64)
    if targets == "index":
        Y = torch.tensor([0, 1, 2, 1, 0, 2, 1, 1, 0, 2])
    elif targets == "soft":
        Y = torch.softmax(torch.randn(10, 3, dtype=torch.float64), -1)
    else:
        Y = torch.randn(10, 3, dtype=torch.float64)
    for kind in ("hessian", "ggn"):
        H = explicit(model, loss_fn, X, Y, kind)
        V = torch.randn(H.shape[0], 2, dtype=torch.float64)
        assert rel_err(fused_product(model, loss_fn, X, Y, V, kind), H @ V) < RTOL


def test_batchnorm_without_affine_frozen_and_shared_parameters():
    shared = nn.Linear(5, 5)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, affine=False), nn.Tanh(), shared, nn.Sigmoid(),
                          shared, nn.BatchNorm1d(5), nn.GELU(), nn.Linear(5, 3)).double()
    randomize_bn(model)
    model.eval()
    model[0].bias.requires_grad_(False)  # frozen: a constant of the map, no row in the Hessian
    model[6].weight.requires_grad_(False)
    X, Y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    loss_fn = nn.CrossEntropyLoss()
    for kind in ("hessian", "ggn"):
        H = explicit(model, loss_fn, X, Y, kind)
        V = torch.randn(H.shape[0], 3, dtype=torch.float64)
        assert rel_err(fused_product(model, loss_fn, X, Y, V, kind), H @ V) < RTOL


def test_consecutive_activations_and_flatten_between():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.ReLU(), nn.Flatten(), nn.GELU(), nn.LeakyReLU(0.3),
                          nn.SiLU(), nn.Linear(4, 3)).double()
    X, Y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    for kind in ("hessian", "ggn"):
        H = explicit(model, nn.CrossEntropyLoss(), X, Y, kind)
        V = torch.randn(H.shape[0], 3, dtype=torch.float64)
        assert rel_err(fused_product(model, nn.CrossEntropyLoss(), X, Y, V, kind), H @ V) < RTOL


def test_output_activation_with_mse():
    model = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.2), nn.Linear(4, 2), nn.Sigmoid()).double()
    X, Y = torch.randn(5, 3, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64)
    for kind in ("hessian", "ggn"):
        H = explicit(model, nn.MSELoss(), X, Y, kind)
        V = torch.randn(H.shape[0], 2, dtype=torch.float64)
        assert rel_err(fused_product(model, nn.MSELoss(), X, Y, V, kind), H @ V) < RTOL


def test_float32_model_and_computation_dtype():
    model = mlp("relu").float()
    X, Y = data("ce")
    flat = FlatParams(model)
    H = explicit(model.double(), nn.CrossEntropyLoss(), X, Y, "hessian")
    model.float()
    V = torch.randn(flat.n, 4, dtype=torch.float64)
    eng32 = FusedEngine("hessian", model, nn.CrossEntropyLoss(), flat, flat.get(), dtype=torch.float32,
                        device="cpu", cache=False)
    out32 = eng32.batch_matmat(0, X.float(), Y, V.float())
    assert out32.dtype == torch.float32 and rel_err(out32.double(), H @ V) < 1e-4
    # float64 computation of a float32 model: exact to float64 precision around the float32 point.
    eng64 = FusedEngine("hessian", model, nn.CrossEntropyLoss(), flat, flat.get(), dtype=torch.float64,
                        device="cpu", cache=False)
    assert rel_err(eng64.batch_matmat(0, X.float(), Y, V), H @ V) < RTOL


def test_cache_keeps_primal_and_model_is_untouched():
    model = mlp("gelu")
    model.train()  # flags must come back exactly; BN modules are put in eval for the measurement
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    X, Y = data("ce")
    flat = FlatParams(model)
    V = torch.randn(flat.n, 2, dtype=torch.float64)
    cached = FusedEngine("hessian", model, nn.CrossEntropyLoss(), flat, flat.get(), dtype=torch.float64,
                         device="cpu", cache=True)
    fresh = FusedEngine("hessian", model, nn.CrossEntropyLoss(), flat, flat.get(), dtype=torch.float64,
                        device="cpu", cache=False)
    a = cached.batch_matmat(3, X, Y, V)
    assert 3 in cached._primals and not fresh._primals
    b = cached.batch_matmat(3, X, Y, V)
    c = fresh.batch_matmat(3, X, Y, V)
    assert torch.equal(a, b) and torch.allclose(a, c, rtol=1e-13, atol=1e-15)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == [m.training for m in model.modules()]


def test_triton_backend_in_the_engine_matches_explicit():
    """The GPU code path (Triton activation and CE kernels) on CPU tensors through the interpreter."""
    pytest.importorskip("triton")
    from sharpkit.kernels import _backend

    if _backend.triton_reason() != "ok":
        pytest.skip(_backend.triton_reason())
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.SiLU(), nn.Linear(4, 3)).double()
    randomize_bn(model)
    model.eval()
    X, Y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    for kind in ("hessian", "ggn"):
        H = explicit(model, nn.CrossEntropyLoss(), X, Y, kind)
        V = torch.randn(H.shape[0], 2, dtype=torch.float64)
        out = fused_product(model, nn.CrossEntropyLoss(), X, Y, V, kind, backend="triton")
        assert rel_err(out, H @ V) < RTOL


# ---- support and errors ------------------------------------------------------------------------------

class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize(
    "model, loss_fn, words",
    [
        (nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 2)), nn.CrossEntropyLoss(), ["'0'", "Conv1d"]),
        (nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ReLU(), nn.LayerNorm(4))), nn.CrossEntropyLoss(),
         ["'1.1'", "LayerNorm"]),
        (Custom(), nn.CrossEntropyLoss(), ["Custom", "nn.Sequential"]),
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4).train()), nn.CrossEntropyLoss(), ["'1'", "bn='train'"]),
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False).eval()), nn.MSELoss(),
         ["'1'", "running statistics"]),
        (nn.Sequential(nn.Linear(3, 4), nn.Flatten(0)), nn.MSELoss(), ["'1'", "start_dim"]),
        (nn.Sequential(nn.Linear(3, 4)), nn.CrossEntropyLoss(reduction="sum"), ["reduction='sum'"]),
        (nn.Sequential(nn.Linear(3, 4)), nn.L1Loss(), ["L1Loss"]),
        (nn.Sequential(nn.ReLU()), nn.MSELoss(), ["no Linear"]),
    ],
)
def test_unsupported_models_give_the_reason(model, loss_fn, words):
    reason = fused_support(model, loss_fn)
    assert reason is not None and all(w in reason for w in words), reason
    flat = FlatParams(model) if any(p.requires_grad for p in model.parameters()) else None
    if flat is not None:
        with pytest.raises(ValueError, match=re.escape(reason)):
            FusedEngine("hessian", model, loss_fn, flat, flat.get(), dtype=torch.float32, device="cpu", cache=False)


def test_supported_models_and_bn_policy_argument():
    model = mlp("relu")
    assert fused_support(model, nn.CrossEntropyLoss()) is None
    assert fused_support(model, F.cross_entropy) is None
    assert fused_support(model, nn.MSELoss(), bn="eval") is None
    assert "bn='train'" in fused_support(model, nn.MSELoss(), bn="train")
    model.train()  # module flags say batch statistics, the explicit policy wins
    assert fused_support(model, nn.MSELoss(), bn="eval") is None
    with pytest.raises(ValueError, match="bn"):
        fused_support(model, nn.MSELoss(), bn="batch")


def test_hessian_with_bn_train_names_batch_statistics_as_the_reason():
    # The measurement turns BatchNorm's tracking off under bn="train": the reason must still be
    # bn="train", not "no running statistics".
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 3))
    batch = (torch.randn(10, 6), torch.randint(0, 3, (10,)))
    with pytest.raises(ValueError, match=re.escape("uses batch statistics (bn='train')")):
        sk.hessian(model, nn.CrossEntropyLoss(), batch, bn="train", engine="fused")
    why = sk.hessian(model, nn.CrossEntropyLoss(), batch, bn="train", engine="auto").engine_info["why_not_fused"]
    assert "bn='train'" in why and "no running statistics" not in why


def test_bad_inputs_raise_clear_errors():
    model = mlp("relu")
    flat = FlatParams(model)
    x = flat.get()
    with pytest.raises(ValueError, match="kind"):
        FusedEngine("hvp", model, nn.CrossEntropyLoss(), flat, x, dtype=torch.float64, device="cpu", cache=True)
    with pytest.raises(ValueError, match="parameter vector"):
        FusedEngine("ggn", model, nn.CrossEntropyLoss(), flat, x[:-1], dtype=torch.float64, device="cpu", cache=True)
    bad = x.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        FusedEngine("ggn", model, nn.CrossEntropyLoss(), flat, bad, dtype=torch.float64, device="cpu", cache=True)
    eng = FusedEngine("hessian", model, nn.CrossEntropyLoss(), flat, x, dtype=torch.float64, device="cpu", cache=True)
    X, Y = data("ce")
    with pytest.raises(ValueError, match="V must have shape"):
        eng.batch_matmat(0, X, Y, torch.randn(flat.n + 1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        eng.batch_matmat(1, X[:0], Y[:0], torch.randn(flat.n, dtype=torch.float64))
    with pytest.raises(ValueError, match="samples"):
        eng.batch_matmat(2, X, Y[:-1], torch.randn(flat.n, dtype=torch.float64))
    with pytest.raises(ValueError, match="class-index targets"):
        eng.batch_matmat(4, X, torch.full_like(Y, 7), torch.randn(flat.n, dtype=torch.float64))
    no_flatten = nn.Sequential(nn.Linear(3, 2)).double()
    f2 = FlatParams(no_flatten)
    eng2 = FusedEngine("ggn", no_flatten, nn.MSELoss(), f2, f2.get(), dtype=torch.float64, device="cpu", cache=False)
    with pytest.raises(ValueError, match="2-D activations"):
        eng2.batch_matmat(0, torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 2, 2), torch.randn(f2.n))
    with pytest.raises(ValueError, match="MSE needs targets"):
        eng2.batch_matmat(0, torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3), torch.randn(f2.n))


# ---- GPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_gpu_engine_and_cuda_graph_match_explicit(kind):
    model = mlp("gelu", d_in=33, widths=(65, 31), d_out=7)
    X, Y = data("ce", n=129, d_out=7, shape=(33,))
    H = explicit(model, nn.CrossEntropyLoss(), X, Y, kind)
    V = torch.randn(H.shape[0], 16, dtype=torch.float64)
    ref = H @ V
    flat = FlatParams(model)
    for graph in (False, True):
        eng = FusedEngine(kind, model, nn.CrossEntropyLoss(), flat, flat.get(), dtype=torch.float64,
                          device="cuda", cache=True, cuda_graph=graph)
        for _ in range(2):  # the second call replays the captured graph
            out = eng.batch_matmat(0, X, Y, V.cuda())
            assert rel_err(out.cpu(), ref) < RTOL
        W = torch.randn_like(V)
        assert rel_err(eng.batch_matmat(0, X, Y, W.cuda()).cpu(), H @ W) < RTOL
