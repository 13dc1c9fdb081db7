"""Curvature operators against explicit float64 Hessian / GGN matrices of small MLPs and CNNs."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import sharpkit as sk
from sharpkit.curvature.engines import GenericEngine, HVPEngine, make_engine
from test_curvature_refs import (
    assert_unchanged,
    cnn,
    explicit_ggn,
    explicit_gradient,
    explicit_hessian,
    mlp,
    snapshot,
    uneven_batches,
)

F64 = torch.float64
CE = nn.CrossEntropyLoss()
_REFS: dict = {}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return mlp() if kind == "mlp" else cnn()


def _ref(kind: str, curvature: str, bn: str):
    key = (kind, curvature, bn)
    if key not in _REFS:
        model, data = _model(kind), uneven_batches(kind)
        fn = explicit_hessian if curvature == "hessian" else explicit_ggn
        _REFS[key] = fn(model, CE, data, bn)
    return _REFS[key]


def _vectors(n: int, k: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("bn", ["eval", "train"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_operator_matches_explicit_matrix(kind, bn, curvature):
    model, data = _model(kind), uneven_batches(kind)
    model.train()  # the operator must switch dropout off and pick BN's mode itself
    snap = snapshot(model)
    ref = _ref(kind, curvature, bn)
    make = sk.hessian if curvature == "hessian" else sk.ggn
    n = ref.shape[0]
    configs = [("generic", True), ("generic", False)] + ([("auto", True)] if bn == "eval" else [])
    for engine, cache in configs:
        op = make(model, CE, data, bn=bn, engine=engine, dtype=F64, cache=cache)
        assert op.shape == (n, n)
        for k in (1, 3, 8):
            V = _vectors(n, k, seed=k)
            got = op @ (V[:, 0] if k == 1 else V)
            want = ref @ V
            if k == 1:
                assert got.shape == (n,)
                got = got[:, None]
            assert got.shape == (n, k) and got.dtype == F64
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
        assert op.num_matvecs == 12
        assert op.num_passes == 3
        info = op.engine_info
        if engine == "generic":
            assert info["engine"] == "generic"
            assert info["ad"] == ("reverse-over-reverse" if cache else "forward-over-reverse")
    assert_unchanged(model, snap)


def test_batch_norm_train_agrees_with_finite_differences():
    """The bn="train" Hessian against central differences of an independent gradient."""
    model, data = _model("cnn"), uneven_batches("cnn")
    op = sk.hessian(model, CE, data, bn="train", engine="generic", dtype=F64, cache=False)
    v = _vectors(op.n, 1, seed=7)[:, 0]
    x = op.x.to(F64)
    eps = 1e-5
    fd = (explicit_gradient(model, CE, data, "train", x + eps * v) - explicit_gradient(model, CE, data, "train", x - eps * v)) / (2 * eps)
    torch.testing.assert_close(op @ v, fd, rtol=1e-6, atol=1e-8)


def test_fused_engine_is_chosen_where_supported_and_agrees():
    model, data = _model("mlp"), uneven_batches("mlp")
    op = sk.hessian(model, CE, data, engine="auto", dtype=F64)
    assert op.engine_info["engine"] == "fused"
    cnn_op = sk.hessian(_model("cnn"), CE, uneven_batches("cnn"), engine="auto", dtype=F64)
    assert cnn_op.engine_info["engine"] == "generic"
    assert "SmallCNN" in cnn_op.engine_info["why_not_fused"]
    with pytest.raises(ValueError, match="fused"):
        sk.hessian(_model("cnn"), CE, uneven_batches("cnn"), engine="fused")
    # bn="train" is outside the fused engine: auto falls back, naming the reason.
    op_t = sk.hessian(model, CE, data, bn="train", engine="auto", dtype=F64)
    assert op_t.engine_info["engine"] == "generic" and "batch statistics" in op_t.engine_info["why_not_fused"]


def test_mse_falls_back_to_reverse_over_reverse_and_says_so():
    model = _model("mlp")
    g = torch.Generator().manual_seed(4)
    X, Y = torch.randn(9, 5, generator=g), torch.randn(9, 3, generator=g)
    mse = nn.MSELoss()
    ref = explicit_hessian(model, mse, [(X, Y)])
    op = sk.hessian(model, mse, (X, Y), engine="generic", dtype=F64, cache=False)
    V = _vectors(op.n, 3)
    with pytest.warns(RuntimeWarning, match="reverse-over-reverse"):
        got = op @ V
    torch.testing.assert_close(got, ref @ V, rtol=1e-10, atol=1e-12)
    assert op.engine_info["ad"] == "reverse-over-reverse"
    assert "ZeroTensors" in op.engine_info["fallback"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not on every product
        torch.testing.assert_close(op @ V, ref @ V, rtol=1e-10, atol=1e-12)
    G = sk.ggn(model, mse, (X, Y), engine="generic", dtype=F64, cache=False)
    with pytest.warns(RuntimeWarning):
        torch.testing.assert_close(G @ V, explicit_ggn(model, mse, [(X, Y)]) @ V, rtol=1e-10, atol=1e-12)


def test_chunks_scipy_dense_and_float32():
    model, data = _model("cnn"), uneven_batches("cnn")
    ref = _ref("cnn", "hessian", "eval")
    V = _vectors(ref.shape[0], 8)
    op = sk.hessian(model, CE, data, engine="generic", dtype=F64, chunk_size=3)
    torch.testing.assert_close(op @ V, ref @ V, rtol=1e-10, atol=1e-13)
    A = op.to_scipy()
    assert A.shape == op.shape
    torch.testing.assert_close(torch.from_numpy(A.matmat(V.numpy())), ref @ V, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(torch.from_numpy(A @ V[:, 0].numpy()), ref @ V[:, 0], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(op.dense(), ref, rtol=1e-10, atol=1e-13)
    op32 = sk.hessian(model, CE, data)  # the parameters' dtype
    assert op32.dtype == torch.float32
    got = op32 @ V.float()
    assert got.dtype == torch.float32
    err = (got.double() - ref @ V).abs().max() / (ref @ V).abs().max()
    assert err < 1e-4


def test_engine_interface():
    model, data = _model("cnn"), uneven_batches("cnn")
    op = sk.hessian(model, CE, data, engine="generic", dtype=F64)
    assert isinstance(op.engine, HVPEngine) and isinstance(op.engine, GenericEngine)
    with sk.measurement_mode(model):
        with pytest.raises(TypeError, match="objective"):
            make_engine("hessian", model, CE, op.flat, op.x, engine="generic")
        with pytest.raises(ValueError, match="engine"):
            make_engine("hessian", model, CE, op.flat, op.x, engine="nope")


def test_clear_errors():
    model, data = _model("mlp"), uneven_batches("mlp")
    with pytest.raises(ValueError, match="empty"):
        sk.hessian(model, CE, (torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="empty"):
        sk.hessian(model, CE, [])
    bad = _model("mlp")
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sk.hessian(bad, CE, data)
    for engine in ("generic", "auto"):  # a loss module that says it is not mean-reduced: refused at once
        with pytest.raises(ValueError, match="reduction='none'"):
            sk.hessian(model, nn.CrossEntropyLoss(reduction="none"), data, engine=engine)

    def per_sample(out, target):  # a callable returning one loss per sample: refused where the operator is built
        return nn.functional.cross_entropy(out, target, reduction="none")

    for engine in ("generic", "auto"):
        with pytest.raises(ValueError, match="scalar"):
            sk.hessian(model, per_sample, data, engine=engine)
    with pytest.raises(ValueError, match="scalar"):
        sk.ggn(_model("cnn"), per_sample, uneven_batches("cnn"))
    op = sk.hessian(model, CE, data)
    for wrong in (torch.ones(op.n + 1), torch.ones(op.n - 1, 2), torch.ones(2, op.n, 3)):
        with pytest.raises(ValueError, match=str(op.n)):
            op @ wrong
    with pytest.raises(TypeError):
        op @ [1.0] * op.n
    with pytest.raises(ValueError, match="bn"):
        sk.hessian(model, CE, data, bn="batch")
    with pytest.raises(TypeError, match="loss_fn"):
        sk.hessian(model, "ce", data)
    with pytest.raises(ValueError, match="chunk_size"):
        sk.hessian(model, CE, data, chunk_size=0)


def test_model_left_as_found_after_errors_and_train_mode():
    model, data = _model("cnn"), uneven_batches("cnn")
    model.train()
    snap = snapshot(model)
    op = sk.hessian(model, CE, data, bn="train", dtype=F64)
    op @ _vectors(op.n, 2)
    with pytest.raises(ValueError):
        op_bad = sk.hessian(model, nn.CrossEntropyLoss(reduction="none"), data, bn="train")
        op_bad @ torch.ones(op_bad.n)
    assert_unchanged(model, snap)


def test_peer_pyhessian_agrees():
    pyhessian = pytest.importorskip("pyhessian")
    model, data = _model("cnn"), uneven_batches("cnn", sizes=(20,))
    model = model.double().eval()
    X, Y = data[0][0].double(), data[0][1]
    try:
        comp = pyhessian.hessian(model, CE, data=(X, Y), cuda=False)
        top, _ = comp.eigenvalues(top_n=1, tol=1e-6, maxIter=200)
    except Exception as exc:  # a broken peer install is not our failure
        pytest.skip(f"pyhessian does not run here: {type(exc).__name__}: {exc}")
    ref = explicit_hessian(model, CE, [(X, Y)])
    ours = sk.eigenvalues(sk.hessian(model, CE, (X, Y), dtype=F64), k=1, method="lanczos", which="LM", tol=1e-10)
    assert math.isclose(float(ours.values[0]), float(torch.linalg.eigvalsh(ref).abs().max()) * math.copysign(1, float(ours.values[0])), rel_tol=1e-8)
    assert math.isclose(float(top[0]), float(ours.values[0]), rel_tol=1e-3)
