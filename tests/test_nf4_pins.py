"""NF4 behaviour tests/test_nf4.py leaves open (tiny tensors, seeded, fast): defaults of the public functions
(block size 64, no double quantization, compute in the input's dtype), Linear4bit's state as registered buffers
(in state_dict, loaded back, kept by dtype casts) with and without double quantization, gradients through a
4-bit layer (x and bias, 2-D and 3-D), set_weight, the skip patterns of quantize_model, memory_report's totals
and other buffers, the dynamic map for non-default arguments, and edges of the scales (an all-zero tail block,
all-equal block scales under double quantization, tiny weights near float32's smallest normal). Expected
values are worked out by hand from the NF4 table and the definitions in nf4.py's docstring."""

import math

import pytest
import torch
import torch.nn as nn

from minillm.dynamic8bit import create_dynamic_map, dequantize_blockwise_8bit, quantize_blockwise_8bit
from minillm.nf4 import (NF4_CODE, Linear4bit, codes_fast, codes_reference, dequantize_nf4, format_memory_report,
                         memory_report, pack_nibbles, quantize_model, quantize_nf4)

pytestmark = pytest.mark.usefixtures("one_thread")

MIDPOINTS = [(float(a) + float(b)) / 2 for a, b in zip(NF4_CODE[:-1], NF4_CODE[1:])]


def nf4_by_hand(x, blocksize):
    """Quantize-dequantize written out: per block absmax, nearest code (ties down), code·absmax (float32)."""
    flat = x.reshape(-1).float().tolist()
    out = []
    for s in range(0, len(flat), blocksize):
        block = flat[s:s + blocksize]
        amax = max(abs(v) for v in block)
        for v in block:
            scaled = v / amax if amax else 0.0
            j = sum(scaled > m for m in MIDPOINTS)
            out.append(float(NF4_CODE[j]) * amax)
    return torch.tensor(out, dtype=torch.float32).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# defaults
# ---------------------------------------------------------------------------------------------

def test_quantize_nf4_defaults_blocksize_64_no_double_quant():
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))  # 150 values: blocks of 64, 64, 22
    packed, state = quantize_nf4(x)
    assert state.blocksize == 64 and not state.double_quant and state.absmax.numel() == 3
    assert packed.numel() == 75
    out = dequantize_nf4(packed, state)
    assert out.dtype == torch.float32 and out.shape == (3, 50)
    torch.testing.assert_close(out, nf4_by_hand(x, 64), atol=1e-6, rtol=1e-6)


def test_linear4bit_and_quantize_model_defaults():
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(64, 3))
    assert (q.blocksize, q.double_quant, q.compute_dtype) == (64, False, None)
    assert repr(q) == ("Linear4bit(in_features=64, out_features=3, bias=True, blocksize=64, double_quant=False, "
                       "compute_dtype=None)")
    model = nn.Sequential(nn.Linear(64, 8))
    model.lm_head = nn.Linear(8, 8)
    assert quantize_model(model) is model
    assert isinstance(model[0], Linear4bit) and type(model.lm_head) is nn.Linear  # the LM head is skipped
    assert (model[0].blocksize, model[0].double_quant, model[0].compute_dtype) == (64, False, None)
    x = torch.randn(2, 64, dtype=torch.float64)
    with torch.no_grad():
        assert model[0](x).dtype == torch.float64  # computes in the input's dtype by default


def test_linear4bit_built_without_bias():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    packed, state = quantize_nf4(w)
    q = Linear4bit(64, 4, packed, state)
    assert q.bias is None and q.compute_dtype is None
    x = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ nf4_by_hand(w, 64).T, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# buffers: state_dict, load_state_dict, dtype casts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dq", [False, True])
def test_state_is_in_state_dict_and_loads_back(dq):
    torch.manual_seed(0)
    a = Linear4bit.from_linear(nn.Linear(64, 40), double_quant=dq)
    b = Linear4bit.from_linear(nn.Linear(64, 40), double_quant=dq)  # other weights, other scales
    want = {"weight_packed", "bias"} | ({"weight_absmax_codes", "weight_nested_absmax", "weight_offset"}
                                        if dq else {"weight_absmax"})
    assert set(a.state_dict()) == want
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(b(x), a(x))
        assert torch.equal(b.dequantize_weight(), a.dequantize_weight())
    # a cast of the whole module leaves the scales alone (they are not rounded to bf16)
    w = a.dequantize_weight()
    a.to(torch.bfloat16)
    assert torch.equal(a.dequantize_weight(), w)
    assert a.bias.dtype == torch.bfloat16
    # every state tensor is moved with the module
    a.to("meta")
    assert all(t.device.type == "meta" for t in a.state_dict().values())


def test_set_weight_requantizes_in_place():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(64, 4).to(torch.bfloat16), blocksize=32, double_quant=True)
    new = torch.randn(4, 64) * 3
    layer.set_weight(new)
    assert (layer.blocksize, layer.double_quant, layer.weight_dtype) == (32, True, torch.bfloat16)
    fresh = nn.Linear(64, 4).to(torch.bfloat16)
    with torch.no_grad():
        fresh.weight.copy_(new)
    ref = Linear4bit.from_linear(fresh, blocksize=32, double_quant=True)
    assert torch.equal(layer.dequantize_weight(), ref.dequantize_weight())
    for k, v in ref.state_dict().items():
        if k != "bias":
            assert torch.equal(layer.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------
# gradients through a 4-bit layer
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 64), (2, 3, 64)])
def test_gradients_of_x_and_bias(shape):
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(64, 5))
    w = q.dequantize_weight()
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape[:-1], 5)
    y = q(x)
    torch.testing.assert_close(y, x.detach() @ w.T + q.bias.detach(), atol=1e-5, rtol=1e-5)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w, atol=1e-5, rtol=1e-5)  # dL/dx = g · W
    torch.testing.assert_close(q.bias.grad, g.reshape(-1, 5).sum(0), atol=1e-5, rtol=1e-5)  # dL/db = Σ g


def test_gradients_with_only_x_or_only_bias_trainable():
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(64, 5))
    w = q.dequantize_weight()
    g = torch.randn(4, 5)
    q.bias.requires_grad_(False)  # QLoRA: everything of the base frozen, x carries the gradient
    x = torch.randn(4, 64, requires_grad=True)
    q(x).backward(g)
    torch.testing.assert_close(x.grad, g @ w, atol=1e-5, rtol=1e-5)
    assert q.bias.grad is None
    q.bias.requires_grad_(True)  # and the other way round: a trainable bias, x without gradient
    q(torch.randn(4, 64)).backward(g)
    torch.testing.assert_close(q.bias.grad, g.sum(0), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# quantize_model skip patterns, memory_report
# ---------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(64, 64)
        self.fc = nn.Linear(64, 32)


def test_quantize_model_skip_by_name_suffix_and_regex():
    model = nn.Sequential(Block(), Block())
    quantize_model(model, skip=["fc"])  # a dotted suffix: every block's fc
    assert [type(b.fc) for b in model] == [nn.Linear, nn.Linear]
    assert [type(b.attn) for b in model] == [Linear4bit, Linear4bit]
    model = nn.Sequential(Block(), Block())
    quantize_model(model, skip=[r"1\..*", "(unbalanced"])  # a regex; an invalid one is ignored
    assert (type(model[0].attn), type(model[0].fc), type(model[1].attn), type(model[1].fc)) == \
        (Linear4bit, Linear4bit, nn.Linear, nn.Linear)
    model = nn.Sequential(Block())
    quantize_model(model, skip=["0.attn"])  # an exact name
    assert (type(model[0].attn), type(model[0].fc)) == (nn.Linear, Linear4bit)


def test_memory_report_totals_other_buffers_and_no_4bit_layers():
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32))
    quantize_model(model, skip=[])
    r = memory_report(model)
    nf4 = 64 * 32 // 2 + 4 * (64 * 32 // 64)  # packed codes + one float32 absmax per block
    # bias 32 + BatchNorm weight, bias (params), running_mean, running_var (float32) and num_batches (int64)
    other = 32 * 4 + 2 * 32 * 4 + 2 * 32 * 4 + 8
    assert (r["nf4_params"], r["nf4_bytes"], r["other_bytes"], r["total_bytes"]) == (2048, nf4, other, nf4 + other)
    text = format_memory_report(model)
    assert text == (f"NF4 weights: 2,048 params in {nf4:,} bytes (0.5625 bytes/param); other tensors {other:,} bytes; "
                    f"total {(nf4 + other) / 2**20:.1f} MiB")
    r = memory_report(nn.Linear(3, 2))
    assert r["nf4_params"] == 0 and r["nf4_bytes"] == 0 and math.isnan(r["nf4_bytes_per_param"])
    assert r["other_bytes"] == r["total_bytes"] == (6 + 2) * 4


# ---------------------------------------------------------------------------------------------
# edges of the scales and codes
# ---------------------------------------------------------------------------------------------

def test_all_zero_tail_block_stores_the_clamped_absmax():
    x = torch.zeros(10)  # one short block: quirk 2 stores max(absmax, 1e-38)
    packed, state = quantize_nf4(x)
    assert state.absmax.tolist() == [torch.tensor(1e-38, dtype=torch.float32).item()]
    assert packed.tolist() == [0x77] * 5  # code 7 is 0.0
    assert torch.equal(dequantize_nf4(packed, state), torch.zeros(10))


def test_one_value():
    packed, state = quantize_nf4(torch.tensor([-2.5]))
    assert packed.tolist() == [0x07] and state.absmax.tolist() == [2.5]  # code 0 (-1.0), padded with code 7
    assert dequantize_nf4(packed, state).tolist() == [-2.5]


def test_tiny_weights_keep_their_largest_value_exact():
    # absmax 1.2e-38 (just above float32's smallest normal): the block's largest value still maps to code 1.0
    x = torch.tensor([1.2e-38, -0.6e-38] + [0.0] * 62, dtype=torch.float32)
    packed, state = quantize_nf4(x)
    assert packed[0].item() >> 4 == 15
    assert dequantize_nf4(packed, state)[0].item() == x[0].item()


def test_double_quant_with_equal_block_scales():
    # every block's absmax is 2: the scales minus their mean are all 0, an all-zero 8-bit block: codes 0
    x = torch.tensor([2.0, -1.0, 0.5, 0.0] * 64)  # 4 blocks of 64, each with absmax 2
    packed, state = quantize_nf4(x, 64, double_quant=True)
    assert state.offset.item() == 2.0
    assert state.absmax_codes.tolist() == [0, 0, 0, 0] and state.nested_absmax.tolist() == [0.0]
    assert state.absmax.tolist() == [2.0] * 4
    assert torch.equal(dequantize_nf4(packed, state), nf4_by_hand(x, 64))


def test_blockwise_8bit_keeps_extremes_and_zero():
    x = torch.tensor([1.0, -1.0, 0.0, 0.5, -0.25])  # absmax exactly 1
    codes, absmax = quantize_blockwise_8bit(x)
    assert absmax.tolist() == [1.0] and codes.dtype == torch.uint8 and codes.numel() == 5
    back = dequantize_blockwise_8bit(codes, absmax)
    assert back[:2].tolist() == [1.0, pytest.approx(-(1 - 0.9 / 128), rel=1e-6)]  # the map's ends
    assert abs(back[2].item()) < 1e-4  # 0 goes to a code within one 65535th step of it (quirk 1)
    assert (back - x).abs().max().item() < 0.02


def test_blockwise_8bit_many_blocks():
    n = (1 << 20) + 300  # more than 2^20 scales: the path without the one-thread switch
    x = torch.linspace(-1.0, 1.0, n)
    codes, absmax = quantize_blockwise_8bit(x)
    assert codes.numel() == n and absmax.numel() == math.ceil(n / 256)
    back = dequantize_blockwise_8bit(codes, absmax)
    assert (back - x).abs().max().item() < 0.01


def test_thread_count_is_restored():
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        quantize_nf4(torch.randn(64 * 300), 64, double_quant=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)


def test_codes_at_midpoints_written_out_and_fast_agree():
    mids = torch.tensor(MIDPOINTS, dtype=torch.float32)
    assert codes_reference(mids).tolist() == list(range(15))  # a midpoint goes to the lower code
    assert codes_reference(mids).dtype == codes_fast(mids).dtype == torch.int32
    assert pack_nibbles(torch.tensor([3, 12, 5])).tolist() == [3 * 16 + 12, 5 * 16 + 7]  # odd tail: code 7


def test_refuses_non_tensor_and_mismatched_blocks():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize_nf4([1.0, 2.0])
    packed, state = quantize_nf4(torch.randn(128), 64)
    state.blocksize = 32
    with pytest.raises(ValueError, match="absmax values"):
        dequantize_nf4(packed, state)


# ---------------------------------------------------------------------------------------------
# the dynamic map for other arguments
# ---------------------------------------------------------------------------------------------

def test_dynamic_map_unsigned():
    # 7 decades 10^-6..10^0, decade i with 2^(i+1) points: midpoints of linspace(0.1, 1, 2^(i+1) + 1); 254 + {0, 1}
    u = create_dynamic_map(signed=False)
    assert u.numel() == 256 and bool((u[1:] >= u[:-1]).all()) and (u == 0).sum().item() == 1
    assert u.min().item() == 0.0 and u.max().item() == 1.0
    want = [0.325e-6, 0.775e-6, 0.2125e-5, 0.4375e-5, 0.6625e-5, 0.8875e-5]
    assert u[1:7].tolist() == pytest.approx(want, rel=1e-5)
    assert u[-2].item() == pytest.approx(1 - 0.9 / 256, rel=1e-6)  # decade 10^0: 128 points


def test_dynamic_map_with_an_extra_item():
    # 6 exponent bits of 7: 2 · (2 + 4 + … + 64) = 252 values, one extra fraction point per sign in the last
    # decade (the midpoint of linspace(0.1, 1, 2) = 0.55), plus 0 and 1: 256 values, no padding
    m = create_dynamic_map(max_exponent_bits=6)
    assert m.numel() == 256 and (m == 0).sum().item() == 1 and bool((m[1:] >= m[:-1]).all())
    vals = m.tolist()
    assert vals.count(pytest.approx(0.55, rel=1e-6)) >= 1 and vals.count(pytest.approx(-0.55, rel=1e-6)) >= 1
    assert m.max().item() == 1.0 and m[0].item() == pytest.approx(-(1 - 0.9 / 128), rel=1e-6)


def test_backward_keeps_no_dequantized_weight():
    # QLoRA's memory promise: between forward and backward only the 4-bit codes are held, never the (out, in)
    # float weight; checked by recording what autograd saves for the backward pass
    torch.manual_seed(0)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    for bias in (True, False):
        q = Linear4bit.from_linear(nn.Linear(64, 5, bias=bias))
        if bias:
            q.bias.requires_grad_(False)
        x = torch.randn(3, 64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = q(x)
            q(torch.randn(3, 64))  # nothing needs a gradient: a plain forward
        y.sum().backward()
        assert (5, 64) not in saved and (64, 5) not in saved, saved
        torch.testing.assert_close(x.grad, torch.ones(3, 5) @ q.dequantize_weight(), atol=1e-5, rtol=1e-5)


def test_double_quant_of_tiny_weights():
    # weights around 1e-39: the block scales minus their mean are below 2^-128, whose reciprocal overflows
    # float32; they used to give NaN step indices and an IndexError. Now quantized like any other scales.
    codes, absmax = quantize_blockwise_8bit(torch.tensor([1e-41, -1e-41, 0.0, 0.5e-41]))
    back = dequantize_blockwise_8bit(codes, absmax)
    assert back[0].item() == absmax.item()  # the largest value is stored exactly (code 1.0)
    assert (back - torch.tensor([1e-41, -1e-41, 0.0, 0.5e-41])).abs().max().item() <= 0.02 * absmax.item()
    w = torch.randn(64 * 8, generator=torch.Generator().manual_seed(0)) * 1e-39
    packed, state = quantize_nf4(w, 64, double_quant=True)
    assert torch.isfinite(dequantize_nf4(packed, state)).all()


def test_dequantize_with_a_hand_made_state_of_odd_block_size():
    # a state not made by quantize_nf4 (block size 3): the decoded codes are padded or cut to whole blocks
    from minillm.nf4 import NF4State
    for codes, absmax, want in (([0, 15], [2.0], [-2.0, 2.0]), ([0, 7, 15], [2.0], [-2.0, 0.0, 2.0])):
        st = NF4State(shape=torch.Size([len(codes)]), dtype=torch.float32, blocksize=3,
                      absmax_f32=torch.tensor(absmax))
        assert dequantize_nf4(pack_nibbles(torch.tensor(codes)), st).tolist() == want


def test_dynamic_map_padded_with_zeros():
    # unsigned, 4 exponent bits of 7: decades 10^-3..10^0 with 16, 32, 64, 128 points (240), 2^3 - 1 = 7 extra
    # points in the last decade (midpoints of linspace(0.1, 1, 8)), 0 and 1: 249 values, padded with 7 zeros
    m = create_dynamic_map(signed=False, max_exponent_bits=4)
    assert m.numel() == 256 and (m == 0).sum().item() == 8 and m.max().item() == 1.0
    extra = [0.1 + 0.9 / 7 * (k + 0.5) for k in range(7)]
    vals = m.tolist()
    assert all(vals.count(pytest.approx(e, rel=1e-6)) >= 1 for e in extra)


def test_quantize_model_checks_the_block_size_even_with_nothing_to_quantize():
    model = nn.Sequential(nn.Linear(64, 8))
    with pytest.raises(ValueError, match="unsupported NF4 block size 48"):
        quantize_model(model, skip=["0"], blocksize=48)  # every linear skipped: a bad argument is still an error
    with pytest.raises(ValueError, match="unsupported NF4 block size 48"):
        quantize_model(nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 8)), blocksize=48)
    assert type(model[0]) is nn.Linear
