"""minillm.linear: the float32 CPU product goes to oneDNN only where no gradient is needed, and agrees with
F.linear to float32 rounding; everything else is F.linear exactly."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from minillm import linear as lin_mod
from minillm.linear import Linear, linear, set_fast, uses_onednn

needs_onednn = pytest.mark.skipif(lin_mod._ONEDNN_LINEAR is None, reason="this torch build has no oneDNN linear")


@pytest.fixture
def any_size(monkeypatch):
    """oneDNN for products of any size (the tests' small shapes would otherwise stay on F.linear)."""
    monkeypatch.setattr(lin_mod, "ONEDNN_MIN_WEIGHT", 0)


def _ops(fn) -> set:
    """The names of the operators `fn` runs (what the dispatcher actually called)."""
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    return {e.key for e in p.key_averages()}


def _close_to_float64(y, x, w, b):
    """|y − (x Wᵀ + b) in float64| within float32 rounding of a K-term sum: K · 2⁻²⁴ · Σ|x_k W_k| per element."""
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    bound = x.shape[-1] * 2.0 ** -24 * F.linear(x.double().abs(), w.double().abs())
    return bool(((y.double() - exact).abs() <= bound + 1e-30).all())


@needs_onednn
@pytest.mark.parametrize("shape", [(16,), (7, 16), (2, 5, 16), (0, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_fast_path_agrees_with_f_linear_to_float32_rounding(shape, bias, any_size):
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(24, 16)
    b = torch.randn(24) if bias else None
    with torch.no_grad():
        y = linear(x, w, b)
    assert y.shape == F.linear(x, w, b).shape and y.dtype == torch.float32
    assert _close_to_float64(y, x, w, b)
    torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_fast_path_takes_strided_views(any_size):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 64).transpose(0, 1)  # (3, 5, 64), not contiguous
    w = torch.randn(64, 48).t()  # (48, 64), not contiguous
    with torch.no_grad():
        y = linear(x, w)
    assert _close_to_float64(y, x, w, None)


@needs_onednn
def test_the_fast_path_really_runs_onednn_with_and_without_autograd(any_size):
    torch.manual_seed(0)
    x, layer = torch.randn(4, 32), Linear(32, 8)
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in _ops(lambda: layer(x))
        assert "mkldnn::_linear_pointwise" in _ops(lambda: linear(x, layer.weight))  # fast by default
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: F.linear(x, layer.weight, layer.bias))
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" in _ops(lambda: layer(x))
    ops = _ops(lambda: layer(x).sum().backward())  # autograd: the Function, whose backward is oneDNN too
    assert "_OneDNNLinear" in ops and "aten::linear" not in ops and "aten::mm" not in ops
    set_fast(layer, False)
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: layer(x))


def test_the_op_is_found_where_torch_has_onednn():
    assert (lin_mod._ONEDNN_LINEAR is not None) == torch.backends.mkldnn.is_available()


def test_uses_onednn_conditions(monkeypatch, any_size):
    x, w, b = torch.randn(3, 4), torch.randn(2, 4), torch.randn(2)
    available = lin_mod._ONEDNN_LINEAR is not None
    with torch.no_grad():
        assert uses_onednn(x, w, b) is available and uses_onednn(x, w) is available
        assert uses_onednn(x, nn.Parameter(w), b) is available  # no_grad: a parameter's requires_grad is moot
        assert uses_onednn(x.bfloat16(), w.bfloat16()) is False  # bf16 already goes to oneDNN inside F.linear
        assert uses_onednn(x.double(), w.double()) is False
        assert uses_onednn(x, w, b.double()) is False
        assert uses_onednn(x.to_sparse(), w) is False
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # torch.compile traces F.linear
        assert uses_onednn(x, w, b) is False
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # F.linear casts to bf16 there; oneDNN's op would not
            assert uses_onednn(x, w, b) is False
            assert linear(x, w, b).dtype == torch.bfloat16
            assert torch.equal(linear(x, w, b), F.linear(x, w, b))
        assert uses_onednn(x, w, b) is available
    assert uses_onednn(x, w, b) is available  # grad mode on, but nothing requires a gradient
    for args in ((x.requires_grad_(), w, b), (x.detach(), w.requires_grad_(), b), (x.detach(), w.detach(),
                                                                                     b.requires_grad_())):
        assert uses_onednn(*args) is available  # autograd goes through _OneDNNLinear


@pytest.mark.parametrize("shape", [(6, 16), (2, 3, 16)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("expanded", [False, True])
def test_gradients_are_the_chain_rules_to_float32_rounding(shape, bias, expanded, any_size):
    """dx = g W, dW = gᵀ x, db = Σ g against float64; `expanded`: the stride-0 gradient of a .sum()."""
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    layer = Linear(16, 8, bias=bias)
    y = layer(x)
    g = torch.ones(1).expand_as(y) if expanded else torch.randn_like(y)
    wanted = (x, layer.weight) + ((layer.bias,) if bias else ())
    got = torch.autograd.grad(y, wanted, g)
    g2, x2, w = g.reshape(-1, 8), x.detach().reshape(-1, 16), layer.weight.detach()
    assert _close_to_float64(got[0], g, w.t(), None)  # dx = g W
    assert _close_to_float64(got[1], g2.t(), x2.t(), None)  # dW = gᵀ x, summed over the rows
    if bias:
        torch.testing.assert_close(got[2].double(), g2.double().sum(0), atol=1e-5, rtol=1e-6)
    ref = nn.Linear(16, 8, bias=bias)
    ref.load_state_dict(layer.state_dict())
    want = torch.autograd.grad(ref(x), (x, ref.weight) + ((ref.bias,) if bias else ()), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_frozen_weight_and_input_without_grad(any_size):
    torch.manual_seed(0)
    layer = Linear(16, 8).requires_grad_(False)
    layer.bias.requires_grad_(True)
    x = torch.randn(5, 16, requires_grad=True)
    dx, db = torch.autograd.grad(layer(x).square().sum(), (x, layer.bias))
    y = F.linear(x, layer.weight, layer.bias)
    want = torch.autograd.grad(y.square().sum(), (x, layer.bias))
    torch.testing.assert_close(dx, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db, want[1], atol=1e-5, rtol=1e-5)
    layer = Linear(16, 8)
    x = torch.randn(5, 16)  # no gradient for x: only dW, db
    dw, db = torch.autograd.grad(layer(x).sum(), (layer.weight, layer.bias))
    torch.testing.assert_close(dw, torch.ones(5, 8).t() @ x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db, torch.full((8,), 5.0))


def test_second_derivatives_work(any_size):
    torch.manual_seed(0)
    layer = Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    (dx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    (ddw,) = torch.autograd.grad(dx.sum(), layer.weight)
    ref = nn.Linear(16, 8)
    ref.load_state_dict(layer.state_dict())
    (rdx,) = torch.autograd.grad(ref(x).square().sum(), x, create_graph=True)
    (rddw,) = torch.autograd.grad(rdx.sum(), ref.weight)
    torch.testing.assert_close(ddw, rddw, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_false_is_f_linear_bit_for_bit(dtype, any_size):
    torch.manual_seed(0)
    layer = Linear(64, 40).to(dtype)
    x = torch.randn(3, 9, 64, dtype=dtype)
    set_fast(layer, False)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    set_fast(layer, True)
    with torch.no_grad():
        if dtype == torch.bfloat16:  # not ours to route: F.linear
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        else:
            assert _close_to_float64(layer(x), x, layer.weight, layer.bias)


def test_linear_is_an_nn_linear_with_its_names():
    layer = Linear(5, 3)
    assert isinstance(layer, nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}


def test_small_layers_stay_on_f_linear():
    """oneDNN's fixed cost per call loses below 2^18 weight entries; the choice is the layer's, not the batch's."""
    available = lin_mod._ONEDNN_LINEAR is not None
    with torch.no_grad():
        w_big = torch.randn(512, 512)  # 2^18 entries
        assert uses_onednn(torch.randn(1, 512), w_big) is available  # one row (decoding) of a big enough W
        assert uses_onednn(torch.randn(4096, 512), w_big) is available
        assert uses_onednn(torch.randn(1, 512), w_big[:-1]) is False  # 511 x 512: just under
        assert uses_onednn(torch.randn(1 << 16, 64), torch.randn(64, 64)) is False  # many rows: still the layer's
        assert uses_onednn(torch.randn(2048, 16), torch.randn(16)) is False  # a 1-D weight: F.linear's business
        layer = Linear(64, 64)
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: layer(torch.randn(8, 64)))


@needs_onednn
def test_backward_of_empty_rows(any_size):
    layer = Linear(16, 8)
    x = torch.randn(0, 16, requires_grad=True)
    dx, dw = torch.autograd.grad(layer(x).sum(), (x, layer.weight))
    assert dx.shape == (0, 16) and torch.equal(dw, torch.zeros(8, 16))


@needs_onednn
def test_a_gradient_for_the_bias_alone(any_size):
    """Only the bias needs a gradient (input without, weight frozen): the product must still be recorded."""
    layer = Linear(16, 8).requires_grad_(False)
    layer.bias.requires_grad_(True)
    x = torch.randn(5, 16)
    (db,) = torch.autograd.grad(layer(x).sum(), (layer.bias,))
    assert torch.equal(db, torch.full((8,), 5.0))
