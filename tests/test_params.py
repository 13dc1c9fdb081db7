import pytest
import torch
from torch import nn

from sharpkit.params import FlatParams, check_finite_parameters, measurement_mode, preserved


def _model():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Dropout(0.3), nn.Linear(7, 3))
    m[0].bias.requires_grad_(False)
    return m


def test_layout_matches_parameters_to_vector():
    m = _model()
    flat = FlatParams(m)
    trainable = [p for p in m.parameters() if p.requires_grad]
    ref = torch.nn.utils.parameters_to_vector(trainable)
    assert flat.n == ref.numel()
    assert torch.equal(flat.get(), ref)
    assert flat.names == [n for n, p in m.named_parameters() if p.requires_grad]


def test_set_sum_writes_in_place_and_restores_exactly():
    m = _model()
    flat = FlatParams(m)
    storages = [p.data_ptr() for p in flat.params]
    x = flat.get()
    y = torch.randn(flat.n)
    flat.set_sum_(x, y)
    assert torch.allclose(flat.get(), x + y)
    assert [p.data_ptr() for p in flat.params] == storages
    flat.set_(x)
    assert torch.equal(flat.get(), x)


def test_views_of_matrix_have_trailing_k():
    flat = FlatParams(_model())
    v = torch.randn(flat.n, 4)
    views = flat.views(v)
    assert [tuple(t.shape[:-1]) for t in views] == [tuple(b.shape) for b in flat.blocks]
    assert all(t.shape[-1] == 4 for t in views)


@pytest.mark.parametrize("shape", [(3,), (0,), (2, 2)])
def test_wrong_length_is_rejected(shape):
    flat = FlatParams(_model())
    with pytest.raises(ValueError, match="shape"):
        flat.set_(torch.zeros(*shape))


def test_preserved_restores_params_buffers_and_flags_after_error():
    m = _model()
    m.train()
    m[1].eval()
    before_p = [p.clone() for p in m.parameters()]
    before_b = [b.clone() for b in m.buffers()]
    flags = [mod.training for mod in m.modules()]
    with pytest.raises(RuntimeError):
        with preserved(m):
            m.eval()
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(1.0)
            m[1].train()
            m(torch.randn(4, 5))  # updates BN running stats
            raise RuntimeError("boom")
    assert all(torch.equal(a, b) for a, b in zip(before_p, m.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_b, m.buffers()))
    assert [mod.training for mod in m.modules()] == flags


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_measurement_mode_sets_policy(bn):
    m = _model().train()
    with measurement_mode(m, bn) as mm:
        assert not mm[3].training  # dropout always off
        assert mm[1].training == (bn == "train")
    assert all(mod.training for mod in m.modules())


def test_measurement_mode_rejects_unknown_policy():
    with pytest.raises(ValueError, match="bn must be"):
        with measurement_mode(_model(), "frozen"):
            pass


def test_nan_parameter_is_named():
    m = _model()
    with torch.no_grad():
        m[4].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"4\.weight.*NaN"):
        check_finite_parameters(m)


class _WritesItsWeight(torch.nn.Module):
    """A pathological module whose forward pass writes to its own parameter."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        with torch.no_grad():
            self.w.add_(1.0)
        return x * self.w


def test_preserved_without_copies_detects_in_place_writes():
    from sharpkit.params import preserved

    model = _WritesItsWeight()
    with preserved(model):  # copies: restored bit for bit
        model(torch.ones(3))
    assert torch.equal(model.w.detach(), torch.ones(3))
    with pytest.raises(RuntimeError, match="'w' in place"):
        with preserved(model, copy_tensors=False):
            model(torch.ones(3))
    model.train()
    with preserved(model, copy_tensors=False):  # read-only use: flags restored, nothing raised
        model.eval()
        model.w.detach().sum()
    assert model.training
