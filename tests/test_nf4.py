"""NF4 quantization: bit-exact against bitsandbytes (golden + live), and its properties."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from minillm.dynamic8bit import DYNAMIC_CODE
from minillm.nf4 import (_DEQUANT_CHUNK, BLOCKSIZES, NF4_CODE, Linear4bit, NF4State, codes_fast, codes_reference,
                         dequantize_nf4, format_memory_report, memory_report, pack_nibbles, quantize_model,
                         quantize_nf4, unpack_nibbles)

GOLDEN = Path(__file__).parent / "golden" / "nf4.safetensors"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# half the widest gap between adjacent NF4 codes (between 0.7229… and 1.0)
HALF_MAX_GAP = float((NF4_CODE[1:] - NF4_CODE[:-1]).max()) / 2


def load_golden():
    with safe_open(str(GOLDEN), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["info"])["cases"]


G, CASES = load_golden()


def test_tables_equal_bitsandbytes():
    # bit-exact: the 16 NF4 values and the 256-entry dynamic map for double quantization
    assert torch.equal(NF4_CODE, G["nf4_code"])
    assert torch.equal(DYNAMIC_CODE, G["dynamic_code"])


@pytest.mark.parametrize("i", range(len(CASES)))
@pytest.mark.parametrize("fast", [True, False])
def test_golden_bit_exact(i, fast):
    c, p = CASES[i], f"c{i}."
    x = G[p + "x"]
    packed, state = quantize_nf4(x, blocksize=c["blocksize"], double_quant=c["double_quant"], fast=fast)
    assert packed.dtype == torch.uint8 and packed.shape == ((x.numel() + 1) // 2,)
    assert torch.equal(packed, G[p + "packed"]), "packed bytes differ from bitsandbytes"  # bit-exact
    if c["double_quant"]:
        assert torch.equal(state.absmax_codes, G[p + "absmax"])
        assert torch.equal(state.nested_absmax, G[p + "nested_absmax"])
        assert torch.equal(state.offset, G[p + "offset"])
    else:
        assert torch.equal(state.absmax, G[p + "absmax"])
    out = dequantize_nf4(packed, state, fast=fast)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert torch.equal(out, G[p + "dequant"]), "dequantized values differ from bitsandbytes"  # bit-exact


def test_golden_covers_what_was_asked():
    assert {c["blocksize"] for c in CASES} == set(BLOCKSIZES)
    assert {c["dtype"] for c in CASES} == {"float32", "float16", "bfloat16"}
    assert any(c["double_quant"] and math.prod(c["shape"]) > 256 * c["blocksize"] for c in CASES)
    assert any(math.prod(c["shape"]) % c["blocksize"] for c in CASES)


def test_linear4bit_matches_bitsandbytes_linear4bit():
    lin = nn.Linear(48, 40)
    with torch.no_grad():
        lin.weight.copy_(G["linear.weight"])
        lin.bias.copy_(G["linear.bias"])
    x = G["linear.x"]
    q = Linear4bit.from_linear(lin, blocksize=64, compute_dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(q(x), G["linear.y"])  # bit-exact: same dequantized weight, same F.linear
        qb = Linear4bit.from_linear(lin, blocksize=64, compute_dtype=torch.bfloat16)
        y = qb(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, G["linear.y_bf16"], atol=0, rtol=0)
    qd = Linear4bit.from_linear(lin, blocksize=64, double_quant=True, compute_dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(qd(x), G["linear.y_dq"])


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------

tensors = st.tuples(
    st.integers(1, 3000),                      # number of elements
    st.sampled_from(BLOCKSIZES),
    st.sampled_from(DTYPES),
    st.booleans(),                             # double quantization
    st.floats(1e-3, 1e3),                      # scale
    st.integers(0, 2**31 - 1),                 # seed
)


def make(n, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * scale).to(dtype)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=301))
def test_pack_unpack_identity(codes):
    q = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.numel() == (len(codes) + 1) // 2
    assert torch.equal(unpack_nibbles(packed, len(codes)), q)
    assert int(packed[0]) >> 4 == codes[0]  # first element in the high nibble


@settings(max_examples=60, deadline=None)
@given(tensors)
def test_error_bound(args):
    n, bs, dtype, dq, scale, seed = args
    x = make(n, dtype, scale, seed)
    packed, state = quantize_nf4(x, bs, dq)
    xf = x.float()
    err = (dequantize_nf4(packed, state, dtype=torch.float32) - xf).abs()
    nb = state.absmax.numel()
    true_absmax = F.pad(xf.abs(), (0, nb * bs - n)).view(nb, bs).amax(1)
    # bound: half the widest code gap × the block's absmax; with double quantization the stored
    # absmax is itself approximate, so the bound uses the larger of the true and stored absmax and adds
    # |stored − true| (the error of the scale times |code| ≤ 1).
    stored = state.absmax
    bound = HALF_MAX_GAP * torch.maximum(true_absmax, stored) + (stored - true_absmax).abs()
    bound = bound.repeat_interleave(bs)[:n] * (1 + 1e-5) + 1e-30  # 1e-5: float32 rounding of code·absmax
    if dtype != torch.float32:  # the dequantized value is rounded to the input dtype
        bound = bound + xf.abs() * torch.finfo(dtype).eps
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@settings(max_examples=60, deadline=None)
@given(tensors)
def test_requantizing_dequantized_gives_same_bytes(args):
    n, bs, dtype, dq, scale, seed = args
    x = make(n, dtype, scale, seed)
    packed, state = quantize_nf4(x, bs, dq)
    packed2, state2 = quantize_nf4(dequantize_nf4(packed, state), bs, dq)
    assert torch.equal(packed2, packed)
    if not dq:
        assert torch.equal(state2.absmax, state.absmax)


@settings(max_examples=40, deadline=None)
@given(tensors)
def test_fast_paths_equal_written_out(args):
    n, bs, dtype, dq, scale, seed = args
    x = make(n, dtype, scale, seed)
    p1, s1 = quantize_nf4(x, bs, dq, fast=True)
    p2, s2 = quantize_nf4(x, bs, dq, fast=False)
    assert torch.equal(p1, p2) and torch.equal(s1.absmax, s2.absmax)
    assert torch.equal(dequantize_nf4(p1, s1, fast=True), dequantize_nf4(p1, s1, fast=False))
    scaled = torch.rand(n) * 2 - 1
    assert torch.equal(codes_fast(scaled), codes_reference(scaled))


def test_codes_at_midpoints_go_down():
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    assert torch.equal(codes_fast(mids).long(), torch.arange(15))  # a midpoint rounds to the lower code
    assert torch.equal(codes_fast(NF4_CODE).long(), torch.arange(16))


def test_zero_block_and_exact_codes():
    x = torch.cat([torch.zeros(64), NF4_CODE * 3.0, torch.zeros(48)])
    packed, state = quantize_nf4(x, 64)
    assert state.absmax.tolist() == [0.0, 3.0]
    out = dequantize_nf4(packed, state)
    assert torch.equal(out, torch.cat([torch.zeros(64), NF4_CODE * 3.0, torch.zeros(48)]))


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------

def test_bytes_per_param_targets():
    lin = nn.Linear(768, 768)
    q = Linear4bit.from_linear(lin, blocksize=64)
    n = 768 * 768
    assert q.weight_nbytes() / n == 0.5 + 4 / 64 == 0.5625  # packed codes + one float32 per 64
    qd = Linear4bit.from_linear(lin, blocksize=64, double_quant=True)
    bpp = qd.weight_nbytes() / n
    # 0.5 + 1/64 (8-bit absmax codes) + 4/(64·256) (nested float32) + 4/n (offset)
    assert bpp == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256) + 4 / n, abs=1e-12)
    assert bpp <= 0.52


def test_memory_report_on_model():
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64))
    quantize_model(model, skip=[])
    r = memory_report(model)
    assert r["nf4_params"] == 128 * 256 + 256 * 64
    assert r["nf4_bytes_per_param"] == 0.5625
    assert r["other_bytes"] == (256 + 64) * 4  # the two float32 biases
    assert "0.5625 bytes/param" in format_memory_report(model)


# ---------------------------------------------------------------------------------------------
# Linear4bit and quantize_model
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compute_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dq", [False, True])
def test_linear4bit_forward_is_dequantized_linear(compute_dtype, dq):
    torch.manual_seed(0)
    lin = nn.Linear(96, 70)
    q = Linear4bit.from_linear(lin, blocksize=32, double_quant=dq, compute_dtype=compute_dtype)
    x = torch.randn(4, 96)
    packed, state = quantize_nf4(lin.weight.detach(), 32, dq)
    cd = compute_dtype or x.dtype
    want = F.linear(x.to(cd), dequantize_nf4(packed, state).to(cd), lin.bias.detach().to(cd)).to(x.dtype)
    with torch.no_grad():
        got = q(x)
    assert got.dtype == x.dtype
    assert torch.equal(got, want)  # exact: the same dequantized weight and the same F.linear
    # and close to the full-precision layer (NF4 error, loose: weights ~U(-1/√96, 1/√96))
    assert (got - lin(x)).abs().max() < 0.35


def test_quantize_model_tiny_gpt2():
    from minillm.models.gpt2 import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained("tiny-gpt2").eval()
    ref = GPT2LMHeadModel.from_pretrained("tiny-gpt2").eval()
    quantize_model(model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit))}
    assert kinds["lm_head"] == "Linear"  # skipped by default (tied to the embedding)
    assert sum(k == "Linear4bit" for k in kinds.values()) == 4 * model.config.n_layer
    # the reference with each weight replaced by its dequantization gives the same logits (fp32 1e-5)
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, Linear4bit):
                ref.get_submodule(n).weight.copy_(m.dequantize_weight())
        ids = torch.randint(0, 512, (2, 7))
        torch.testing.assert_close(model(ids), ref(ids), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool, torch.float64])
def test_rejects_non_float16_32_tensors(dtype):
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize_nf4(torch.ones(64, dtype=dtype))


@pytest.mark.parametrize("bs", [0, 16, 48, 100, 8192])
def test_rejects_unsupported_blocksize(bs):
    with pytest.raises(ValueError, match=f"unsupported NF4 block size {bs}"):
        quantize_nf4(torch.randn(256), blocksize=bs)
    with pytest.raises(ValueError, match="block size"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), blocksize=bs)


def test_rejects_mismatched_state():
    packed, state = quantize_nf4(torch.randn(100), 64)
    with pytest.raises(ValueError, match="packed bytes"):
        dequantize_nf4(packed[:-1], state)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_nf4(packed.int(), state)
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0))


# ---------------------------------------------------------------------------------------------
# live comparison with bitsandbytes
# ---------------------------------------------------------------------------------------------

@pytest.mark.reference
@settings(max_examples=40, deadline=None)
@given(st.tuples(st.integers(1, 40), st.integers(1, 40).map(lambda k: 2 * k), st.sampled_from(BLOCKSIZES),
                 st.sampled_from(DTYPES), st.booleans(), st.integers(0, 2**31 - 1)))
def test_live_bitsandbytes(args):
    BF = pytest.importorskip("bitsandbytes.functional")
    rows, cols, bs, dtype, dq, seed = args
    x = make(rows * cols, dtype, 1.0, seed).view(rows, cols)
    p_ref, s_ref = BF.quantize_4bit(x, blocksize=bs, quant_type="nf4", compress_statistics=dq)
    packed, state = quantize_nf4(x, bs, dq)
    assert torch.equal(packed, p_ref.reshape(-1))  # bit-exact
    if dq:
        assert torch.equal(state.absmax_codes, s_ref.absmax)
        assert torch.equal(state.nested_absmax, s_ref.state2.absmax) and torch.equal(state.offset, s_ref.offset)
    else:
        assert torch.equal(state.absmax, s_ref.absmax)
    # bitsandbytes returns (1, n) for 1-D input and a transpose when there is one packed row; values compared
    # in the input's shape, bit-exact
    if rows > 1 and cols % 16 == 0 and cols % bs:
        return  # bitsandbytes 0.50.2's CPU dequantize restarts blocks at every row here (DESIGN.md, known bugs)
    ref = BF.dequantize_4bit(p_ref, s_ref, quant_type="nf4").reshape(x.shape)
    assert torch.equal(dequantize_nf4(packed, state), ref)


@pytest.mark.reference
def test_live_bitsandbytes_double_quant_many_blocks():
    BF = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(768, 3072, generator=g) * torch.rand(768, 1, generator=g)  # 36,864 blocks of 64
    p_ref, s_ref = BF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, state = quantize_nf4(x, 64, True)
    assert torch.equal(packed, p_ref.reshape(-1))
    assert torch.equal(state.absmax_codes, s_ref.absmax) and torch.equal(state.nested_absmax, s_ref.state2.absmax)
    assert torch.equal(dequantize_nf4(packed, state), BF.dequantize_4bit(p_ref, s_ref, quant_type="nf4"))


@pytest.mark.parametrize("n,bs", [(3 * _DEQUANT_CHUNK + 64 * 5 + 7, 64), (_DEQUANT_CHUNK * 2 + 1, 32), (4096 * 9 - 3, 4096), (100, 64)])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_chunked_dequantize_equals_written_out(n, bs, dtype):
    """The fast dequantize works through the blocks in chunks: several chunks, a short last block and an
    odd count's pad nibble give the same bits as the whole-tensor equation, cast once to `dtype`."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.05
    packed, state = quantize_nf4(x, bs)
    slow = dequantize_nf4(packed, state, fast=False)
    fast = dequantize_nf4(packed, state, dtype=dtype)
    assert fast.dtype == (dtype or torch.float32) and fast.shape == x.shape
    assert torch.equal(fast, slow.to(fast.dtype))


def test_chunked_dequantize_with_an_odd_block_size():
    """A hand-made state with blocks of 3 values (not a bitsandbytes size): chunks of an odd number of
    blocks would start mid-byte; the fast path must still decode every value as the written-out one."""
    n, bs = _DEQUANT_CHUNK * 2 + 11, 3
    codes = torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(0))
    absmax = torch.rand(-(-n // bs), generator=torch.Generator().manual_seed(1)) + 0.5
    state = NF4State(shape=torch.Size([n]), dtype=torch.float32, blocksize=bs, absmax_f32=absmax)
    packed = pack_nibbles(codes)
    expected = NF4_CODE[codes] * absmax.repeat_interleave(bs)[:n]  # the equation, value by value
    assert torch.equal(dequantize_nf4(packed, state), expected)
    assert torch.equal(dequantize_nf4(packed, state, fast=False), expected)


@pytest.mark.parametrize("stored,compute", [(torch.float16, torch.float32), (torch.float16, torch.bfloat16),
                                            (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_dequantize_weight_rounds_to_the_stored_dtype_first(stored, compute):
    """As bitsandbytes: the weight is dequantized in the dtype it was stored in, then cast to the compute
    dtype (a half-precision weight computed in fp32 is the half-precision weight, not a finer one)."""
    layer = Linear4bit.from_linear(nn.Linear(256, 8).to(stored))
    fp32 = (NF4_CODE[unpack_nibbles(layer.weight_packed, 256 * 8).long()].view(-1, 64)
            * layer.state.absmax[:, None]).view(8, 256)  # the equation, in fp32
    assert torch.equal(layer.dequantize_weight(compute), fp32.to(stored).to(compute))


def test_linear4bit_keeps_w_for_backward_only_when_asked():
    """save_weight_for_backward: the forward's W serves the backward (under non-reentrant checkpointing, whose
    recomputed forward saves it), with the same gradient as re-dequantizing; quantize_model sets it on a model
    that already checkpoints its blocks, and leaves it off otherwise."""
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(64, 32))
    x = torch.randn(4, 64, requires_grad=True)
    w = q.dequantize_weight()
    grads = []
    for keep in (False, True):
        q.save_weight_for_backward = keep
        y = torch.utils.checkpoint.checkpoint(q, x, use_reentrant=False)
        y.square().sum().backward()
        grads.append(x.grad)
        x.grad = None
    torch.testing.assert_close(grads[0], 2 * (x @ w.T + q.bias) @ w, atol=1e-5, rtol=1e-5)
    assert torch.equal(grads[0], grads[1])
    body = nn.Sequential(nn.Linear(64, 64))
    assert not quantize_model(body, skip=())[0].save_weight_for_backward
    body = nn.Sequential(nn.Linear(64, 64))
    body.gradient_checkpointing = True
    assert quantize_model(body, skip=())[0].save_weight_for_backward
