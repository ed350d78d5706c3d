"""minillm.linear: the float32 CPU product goes to oneDNN only where no gradient is needed, and agrees with
F.linear to float32 rounding; everything else is F.linear exactly."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from minillm import linear as lin_mod
from minillm.linear import Linear, can_prepack, linear, prepacked, set_fast, uses_onednn

needs_onednn = pytest.mark.skipif(lin_mod._ONEDNN_LINEAR is None, reason="this torch build has no oneDNN linear")
needs_bf16_packing = pytest.mark.skipif(torch.bfloat16 not in lin_mod.PACKABLE or lin_mod._ONEDNN_LINEAR is None,
                                        reason="oneDNN has no bfloat16 kernels on this CPU")


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


# --- prepacked(model): W packed once for inference ---------------------------------------------------------

def _packed_model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(Linear(64, 48), nn.ReLU(), Linear(48, 40, bias=False)).to(dtype)


@needs_bf16_packing
@pytest.mark.parametrize("shape", [(64,), (1, 64), (7, 64), (2, 9, 64), (3, 5, 64)])
def test_prepacked_bfloat16_is_bit_for_bit_the_plain_product(shape, any_size):
    model = _packed_model(torch.bfloat16)
    x = torch.randn(shape).bfloat16()
    if shape == (3, 5, 64):
        x = torch.randn(5, 3, 64).bfloat16().transpose(0, 1)  # a strided view
    with torch.inference_mode():
        # F.linear on a strided (B, T, in) view with a bias adds the bias after rounding the product to bf16;
        # on contiguous rows (and oneDNN always) the bias joins the float32 sum: compare with those
        want = model(x.contiguous())
        with prepacked(model) as m:
            assert m is model and all(isinstance(l.packed, lin_mod.PackedWeight) for l in (model[0], model[2]))
            got = model(x)
            assert "mkldnn::_linear_pointwise" in _ops(lambda: model(x))  # packed W: the oneDNN op itself
        assert "mkldnn::_linear_pointwise" not in _ops(lambda: model(x))  # bf16 outside: F.linear (aten::mm)
    assert torch.equal(got, want)
    assert model[0].packed is None and model[2].packed is None  # dropped on exit


@needs_onednn
@pytest.mark.parametrize("rows", [1, 6])
def test_prepacked_float32_agrees_to_rounding(rows, any_size):
    model = _packed_model(torch.float32)
    x = torch.randn(rows, 64)
    with torch.no_grad():
        h = F.relu(model[0](x))
        with prepacked(model):
            assert all(l.packed is not None for l in (model[0], model[2]))
            got = model(x)
            first = model[0](x)
    assert _close_to_float64(first, x, model[0].weight, model[0].bias)
    assert _close_to_float64(got, h, model[2].weight, None)


@needs_onednn
def test_prepacked_sees_a_weight_changed_inside(any_size):
    """An optimizer-style in-place step, a moved storage (.data =) or a new Parameter: the layer goes back to
    the plain product of its current W."""
    torch.manual_seed(0)
    layer, x = Linear(64, 32), torch.randn(4, 64)
    with prepacked(layer), torch.no_grad():
        stale = layer(x)
        layer.weight.mul_(-2.0)  # in place: the version counter moves
        assert _close_to_float64(layer(x), x, layer.weight, layer.bias)
        layer.weight.data = layer.weight.data.clone() * 3.0  # a new storage behind the same Parameter
        assert _close_to_float64(layer(x), x, layer.weight, layer.bias)
        layer.weight = nn.Parameter(torch.randn(32, 64))  # a new Parameter
        assert _close_to_float64(layer(x), x, layer.weight, layer.bias)
        assert not torch.allclose(layer(x), stale)


@needs_onednn
def test_prepacked_leaves_autograd_autocast_and_other_dtypes_to_the_plain_path(any_size, monkeypatch):
    torch.manual_seed(0)
    layer, x = Linear(64, 32), torch.randn(4, 64)
    with prepacked(layer):
        x.requires_grad_(True)
        y = layer(x)  # grad mode: through _OneDNNLinear, the packed copy is not read
        (dx,) = torch.autograd.grad(y.sum(), x)
        assert _close_to_float64(dx, torch.ones(4, 32), layer.weight.detach().t(), None)
        x = x.detach()
        with torch.no_grad():
            assert layer._packed_weight(x) is layer.packed.tensor
            assert layer._packed_weight(x.double()) is None  # a dtype the packed W is not in
            assert layer._packed_weight(x.to_sparse()) is None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert layer._packed_weight(x) is None
                assert layer(x).dtype == torch.bfloat16
            layer.bias.data = layer.bias.data.double()
            assert layer._packed_weight(x) is None  # a bias in another dtype
            layer.bias.data = layer.bias.data.float()
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
            assert layer._packed_weight(x) is None  # torch.compile traces F.linear
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
            assert layer._packed_weight(x) is layer.packed.tensor
            layer.fast = False  # fast=False is F.linear exactly, packed or not
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_what_prepacked_packs(any_size):
    available = lin_mod._ONEDNN_LINEAR is not None
    assert can_prepack(Linear(8, 4)) is available
    assert can_prepack(Linear(8, 4).double()) is False
    assert can_prepack(Linear(8, 4).half()) is False
    assert can_prepack(Linear(8, 4).bfloat16()) is (available and torch.bfloat16 in lin_mod.PACKABLE)
    assert can_prepack(nn.Linear(8, 4)) is False  # only minillm's Linear reads a packed copy
    lay = Linear(8, 4)
    lay.weight = nn.Parameter(lay.weight.detach().to_sparse())
    assert can_prepack(lay) is False


def test_small_layers_are_not_packed():
    big, small = Linear(512, 512), Linear(511, 512)  # 2^18 entries and just under
    with prepacked(nn.Sequential(big, small)):
        assert (big.packed is not None) is (lin_mod._ONEDNN_LINEAR is not None)
        assert small.packed is None


@needs_onednn
def test_nested_prepacked_and_an_error_inside(any_size):
    outer, inner = Linear(16, 8), Linear(16, 8)
    model = nn.Sequential(outer, inner)
    with prepacked(outer):
        kept = outer.packed
        with prepacked(model):
            assert outer.packed is kept and inner.packed is not None  # the enclosing copy is not repacked
        assert outer.packed is kept and inner.packed is None  # the inner block drops only its own
    assert outer.packed is None
    with pytest.raises(RuntimeError, match="boom"):
        with prepacked(model):
            raise RuntimeError("boom")
    assert outer.packed is None and inner.packed is None


def test_bfloat16_is_packed_where_onednn_runs_it(monkeypatch):
    """bf16 joins PACKABLE exactly where oneDNN's bf16 linear runs (it refuses on CPUs without bf16 kernels)."""
    if lin_mod._ONEDNN_LINEAR is None:
        runs = False
    else:
        try:
            lin_mod._ONEDNN_LINEAR(torch.ones(2, 8).bfloat16(), torch.ones(4, 8).bfloat16(), None, "none", [], "")
            runs = True
        except RuntimeError:
            runs = False
    assert lin_mod._bfloat16_packable() is runs and (torch.bfloat16 in lin_mod.PACKABLE) is runs

    def missing():
        raise RuntimeError("no such op")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", missing, raising=False)
    assert lin_mod._bfloat16_packable() is False


@needs_onednn
def test_prepacked_follows_a_lora_merge_inside(any_size):
    """Merging LoRA into the base weight inside prepacked (W += s·B A, in place) is seen: the merged layer
    gives what the unmerged one gave, not the stale packed W's product."""
    from minillm.lora import LoRALinear
    torch.manual_seed(0)
    layer = LoRALinear(Linear(64, 32), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)  # B = 0 at init would make the delta vanish
    x = torch.randn(5, 64)
    with prepacked(layer), torch.no_grad():
        assert layer.base_layer.packed is not None
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    assert (merged - layer.base_layer.bias - x @ layer.base_layer.weight.t()).abs().max() < 1e-4



@needs_onednn
def test_a_deep_copy_inside_prepacked_is_unpacked_and_right(any_size):
    """copy.deepcopy inside the block (a reference model, say): the copy has its own W and no packed copy."""
    import copy
    torch.manual_seed(0)
    model, x = nn.Sequential(Linear(64, 32), Linear(32, 8)), torch.randn(3, 64)
    with prepacked(model), torch.no_grad():
        twin = copy.deepcopy(model)
        assert model[0].packed is not None and twin[0].packed is None and twin[1].packed is None
        twin[0].weight.mul_(2.0)
        assert _close_to_float64(twin[0](x), x, twin[0].weight, twin[0].bias)
        assert _close_to_float64(model[0](x), x, model[0].weight, model[0].bias)
