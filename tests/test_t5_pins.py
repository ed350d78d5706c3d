"""T5's layers (minillm.models.t5_layers) against the paper's definitions written out by hand: the relative
position bucket formula as a plain Python loop, RMS norm, the encoder and decoder stacks recomputed from the
module docstring's equations (unscaled attention, learned bucket bias from layer 0, pre-norm residuals, relu or
gated FF), the config's defaults (transformers' T5Config) and its validation, the feed_forward_proj rule, and
the hub dict. Found by scripts/mutation.py: test_t5.py passes explicit bucket arguments and hub configs, so
defaults and validation boundaries were never exercised; tiny random models here, seeded, fp32/fp64."""

import math

import pytest
import torch

from minillm.hub import CheckpointError
from minillm.models.t5 import T5ForConditionalGeneration
from minillm.models.t5_layers import (T5Attention, T5Cache, T5Config, T5LayerNorm, additive_mask, clamp_fp16,
                                      parse_feed_forward_proj, relative_position_bucket)

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(vocab_size=50, d_model=16, d_kv=6, d_ff=24, num_layers=2, num_heads=2)  # inner 12 != d_model


# ---------------- buckets: Mesh TensorFlow's _relative_position_bucket, one integer at a time ----------------

def bucket_by_hand(rel: int, bidirectional: bool, n: int, max_distance: int) -> int:
    out = 0
    if bidirectional:
        n //= 2                      # half the buckets for keys after the query
        if rel > 0:
            out += n
        d = abs(rel)
    else:
        d = max(-rel, 0)             # the future collapses onto distance 0
    exact = n // 2
    if d < exact:
        return out + d
    log_bucket = exact + int(math.log(d / exact) / math.log(max_distance / exact) * (n - exact))
    return out + min(log_bucket, n - 1)


def test_bucket_defaults_are_t5s_32_buckets_128_distance_bidirectional():
    rel = torch.arange(-300, 301)
    got = relative_position_bucket(rel).tolist()  # the defaults
    assert got == [bucket_by_hand(r, True, 32, 128) for r in range(-300, 301)]
    # a few by hand: 16 buckets per side, 8 exact; bucket 8 + ⌊2·log2(d/8)⌋ beyond
    want = {0: 0, -1: 1, -7: 7, -8: 8, -12: 9, -16: 10, -100: 15, -127: 15, -1000: 15, 1: 17, 7: 23, 8: 24, 1000: 31}
    assert {r: int(relative_position_bucket(torch.tensor(r))) for r in want} == want


@pytest.mark.parametrize("bidirectional,n,max_distance", [(True, 8, 20), (False, 8, 20), (False, 32, 128),
                                                          (True, 10, 7), (False, 6, 40)])
def test_buckets_equal_the_formula(bidirectional, n, max_distance):
    rel = torch.arange(-3 * max_distance, 3 * max_distance + 1)
    got = relative_position_bucket(rel, bidirectional, n, max_distance).tolist()
    assert got == [bucket_by_hand(int(r), bidirectional, n, max_distance) for r in rel]
    # the causal default: keyword bidirectional=False with the default sizes
    if not bidirectional and n == 32:
        assert relative_position_bucket(rel, bidirectional=False).tolist() == got


def test_position_bias_reads_the_bucket_of_key_minus_query_after_the_cache():
    torch.manual_seed(0)
    cfg = T5Config(**SMALL, relative_attention_num_buckets=8, relative_attention_max_distance=12)
    att = T5Attention(cfg, 0, has_relative_bias=True)
    W = att.relative_attention_bias.weight  # (buckets, heads)
    T, S, past = 3, 7, 4  # queries at 4, 5, 6; keys 0..6
    for bidirectional in (True, False):
        got = att.position_bias(T, S, past, bidirectional)
        assert got.shape == (1, 2, T, S)
        for h in range(2):
            for i in range(T):
                for j in range(S):
                    b = bucket_by_hand(j - (past + i), bidirectional, 8, 12)
                    assert got[0, h, i, j] == W[b, h]


# ---------------- small pieces ----------------

def test_rms_norm_by_hand_with_default_eps():
    norm = T5LayerNorm(2)
    assert norm.eps == 1e-6 and torch.equal(norm.weight, torch.ones(2))
    x = torch.tensor([[[3.0, 4.0], [1e-3, -1e-3]]], dtype=torch.float64)
    want = torch.tensor([[[3 / math.sqrt(12.5 + 1e-6), 4 / math.sqrt(12.5 + 1e-6)],
                          [1e-3 / math.sqrt(2e-6), -1e-3 / math.sqrt(2e-6)]]], dtype=torch.float64)  # eps matters here
    torch.testing.assert_close(norm(x), want, rtol=1e-6, atol=0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, -0.5]))
    torch.testing.assert_close(norm(x), want * torch.tensor([2.0, -0.5], dtype=torch.float64), rtol=1e-6, atol=0)
    # no centring: a constant row normalizes to ±1, not 0
    assert torch.allclose(T5LayerNorm(3, eps=0.0)(torch.full((1, 3), 5.0)), torch.ones(1, 3))


def test_rms_norm_returns_the_weights_half_dtype():
    x = torch.randn(2, 3, 4)
    for dt in (torch.float16, torch.bfloat16):
        norm = T5LayerNorm(4).to(dt)
        y = norm(x.to(dt))
        assert y.dtype == dt
        want = x.to(dt).float() / torch.sqrt(x.to(dt).float().pow(2).mean(-1, keepdim=True) + 1e-6)
        torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)
    assert T5LayerNorm(4)(x.half()).dtype == torch.float32  # fp32 weight: fp32 result


def test_additive_mask_and_fp16_clamp():
    allowed = torch.tensor([[True, False, True]])
    m = additive_mask(allowed, torch.float32)
    assert m.tolist() == [[0.0, torch.finfo(torch.float32).min, 0.0]] and m.dtype == torch.float32
    assert additive_mask(allowed, torch.float16)[0, 1] == torch.finfo(torch.float16).min
    big = torch.finfo(torch.float16).max
    x = torch.tensor([big, -big, 2.0], dtype=torch.float16)  # finite: nothing to clamp
    assert torch.equal(clamp_fp16(x), x)
    y = clamp_fp16(torch.tensor([-float("inf"), 2.0], dtype=torch.float16))
    assert float(y[0]) == float(torch.tensor(-(big - 1000), dtype=torch.float16)) and float(y[1]) == 2.0
    b = torch.tensor([float("inf")], dtype=torch.bfloat16)  # only fp16 is clamped
    assert torch.equal(clamp_fp16(b), b)


def test_cache_starts_empty_with_a_slot_per_layer():
    c = T5Cache(3)
    assert c.seq_len == 0 and c.cross == [None, None, None]


# ---------------- the stacks, recomputed from the docstring's equations ----------------

def _rms(x, norm):
    return norm.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def _attn(att, x, ctx, bias):
    """softmax(q kᵀ + bias) v per head, no 1/√d; bias (B|1, nh|1, T, S)."""
    nh, dk = att.cfg.num_heads, att.cfg.d_kv
    B, T, _ = x.shape
    S = ctx.shape[1]
    q = (x @ att.q.weight.T).view(B, T, nh, dk).transpose(1, 2)
    k = (ctx @ att.k.weight.T).view(B, S, nh, dk).transpose(1, 2)
    v = (ctx @ att.v.weight.T).view(B, S, nh, dk).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2) + bias, -1)
    return (p @ v).transpose(1, 2).reshape(B, T, nh * dk) @ att.o.weight.T


def _ff(ff, x):
    if ff.is_gated:
        h = torch.nn.functional.gelu(x @ ff.wi_0.weight.T, approximate="tanh") * (x @ ff.wi_1.weight.T)
    else:
        h = torch.relu(x @ ff.wi.weight.T)
    return h @ ff.wo.weight.T


def _bias(stack, T, S, bidirectional):
    W = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight  # layer 0's, for every layer
    cfg = stack.cfg
    idx = [[bucket_by_hand(j - i, bidirectional, cfg.relative_attention_num_buckets,
                           cfg.relative_attention_max_distance) for j in range(S)] for i in range(T)]
    return W[torch.tensor(idx)].permute(2, 0, 1)[None]  # (1, nh, T, S)


def _mask(allowed, dtype):
    return torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype))


def encoder_by_hand(model, ids, mask):
    st = model.encoder
    h = model.shared.weight[ids]
    S = ids.shape[1]
    bias = _bias(st, S, S, True) + _mask(mask.bool()[:, None, None, :], h.dtype)
    for blk in st.block:
        sa, ff = blk.layer[0], blk.layer[1]
        x = _rms(h, sa.layer_norm)
        h = h + _attn(sa.SelfAttention, x, x, bias)
        h = h + _ff(ff.DenseReluDense, _rms(h, ff.layer_norm))
    return _rms(h, st.final_layer_norm)


def decoder_by_hand(model, dec, enc, enc_mask, dec_mask):
    st = model.decoder
    g = model.shared.weight[dec]
    T = dec.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    bias = _bias(st, T, T, False) + _mask(causal[None, None] & dec_mask.bool()[:, None, None, :], g.dtype)
    cross = _mask(enc_mask.bool()[:, None, None, :], g.dtype)
    for blk in st.block:
        sa, ca, ff = blk.layer
        x = _rms(g, sa.layer_norm)
        g = g + _attn(sa.SelfAttention, x, x, bias)
        g = g + _attn(ca.EncDecAttention, _rms(g, ca.layer_norm), enc, cross)
        g = g + _ff(ff.DenseReluDense, _rms(g, ff.layer_norm))
    return _rms(g, st.final_layer_norm)


@pytest.mark.parametrize("ff,use_sdpa", [("relu", True), ("gated-gelu", False)])
def test_stacks_equal_the_equations(ff, use_sdpa):
    torch.manual_seed(1)
    cfg = T5Config(**SMALL, feed_forward_proj=ff, relative_attention_num_buckets=8, relative_attention_max_distance=10,
                   num_decoder_layers=3, use_sdpa=use_sdpa)
    model = T5ForConditionalGeneration(cfg).double().eval()
    ids = torch.randint(2, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    dec = torch.randint(2, 50, (2, 6))
    dec_mask = torch.ones_like(dec)
    dec_mask[1, 4:] = 0
    with torch.no_grad():
        enc = model.encode(ids, mask)
        want_enc = encoder_by_hand(model, ids, mask)
        h = model.decoder_hidden_states(dec, enc, mask, dec_mask)
        want_dec = decoder_by_hand(model, dec, enc, mask, dec_mask)
        plain = model.encode(ids)
    real = mask.bool()
    torch.testing.assert_close(enc[real], want_enc[real], rtol=0, atol=1e-5)  # RMS takes its mean of squares in fp32
    torch.testing.assert_close(h[dec_mask.bool()], want_dec[dec_mask.bool()], rtol=0, atol=1e-5)  # RMS takes its mean of squares in fp32
    torch.testing.assert_close(plain, encoder_by_hand(model, ids, torch.ones_like(ids)), rtol=0, atol=1e-5)  # RMS takes its mean of squares in fp32
    assert len(model.decoder.block) == 3 and len(model.encoder.block) == 2
    # only layer 0 of each stack owns a bias table
    owners = [n for n, _ in model.named_parameters() if "relative_attention_bias" in n]
    assert owners == ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                      "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    # no biases anywhere in the linears (T5 has none)
    assert not any(n.endswith(".bias") for n, _ in model.named_parameters())


def test_stacks_blocks_and_attention_called_on_their_own():
    """The layer API without the model around it: defaults (no mask, no cache, no cross mask) work and agree."""
    torch.manual_seed(6)
    model = T5ForConditionalGeneration(T5Config(**SMALL, relative_attention_num_buckets=8,
                                                relative_attention_max_distance=10)).double().eval()
    ids, dec = torch.randint(2, 50, (2, 7)), torch.randint(2, 50, (2, 5))
    with torch.no_grad():
        enc = model.encode(ids)
        assert torch.equal(model.encoder(model.shared(ids)), enc)
        want_dec = model.decoder_hidden_states(dec, enc)
        assert torch.equal(model.decoder(model.shared(dec), context=enc), want_dec)
        att = model.encoder.block[0].layer[0].SelfAttention
        bias = att.position_bias(7, 7, 0, True)
        h = model.shared(ids)
        x = _rms(h, model.encoder.block[0].layer[0].layer_norm)
        torch.testing.assert_close(att(x, bias), _attn(att, x, x, bias), rtol=0, atol=1e-10)
        for blk in model.encoder.block:
            h = blk(h, bias)
        torch.testing.assert_close(model.encoder.final_layer_norm(h), enc, rtol=0, atol=1e-12)
        att = model.decoder.block[0].layer[0].SelfAttention
        causal = torch.ones(5, 5, dtype=torch.bool).tril()
        bias = att.position_bias(5, 5, 0, False) + additive_mask(causal, torch.float64)
        g = model.shared(dec)
        for blk in model.decoder.block:
            g = blk(g, bias, context=enc)
        torch.testing.assert_close(model.decoder.final_layer_norm(g), want_dec, rtol=0, atol=1e-12)


def test_cross_attention_mask_shape_is_checked():
    torch.manual_seed(2)
    model = T5ForConditionalGeneration(T5Config(**SMALL)).eval()
    enc = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"encoder_attention_mask has shape \(2, 4\), expected \(2, 5\)"):
        model.decode(torch.tensor([[0], [0]]), enc, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"decoder_attention_mask has shape \(2, 1\), expected \(2, 2\)"):
        model.decode(torch.tensor([[0, 3], [0, 4]]), enc, torch.ones(2, 5), torch.ones(2, 1))


def test_dropout_only_in_training():
    torch.manual_seed(3)
    model = T5ForConditionalGeneration(T5Config(**SMALL, dropout_rate=0.5))
    ids = torch.randint(2, 50, (1, 6))
    with torch.no_grad():
        model.eval()
        a, b = model.encode(ids), model.encode(ids)
        model.train()
        c, d = model.encode(ids), model.encode(ids)
    assert torch.equal(a, b) and not torch.equal(c, d)


# ---------------- config: transformers' T5Config defaults, validation, feed_forward_proj, hub dict ----------------

def test_config_defaults_are_t5s():
    c = T5Config(**SMALL)
    assert (c.relative_attention_num_buckets, c.relative_attention_max_distance) == (32, 128)
    assert c.dropout_rate == 0.1 and c.layer_norm_epsilon == 1e-6 and c.initializer_factor == 1.0
    assert c.feed_forward_proj == "relu" and (c.is_gated, c.activation) == (False, "relu")
    assert c.tie_word_embeddings is True and c.scale_decoder_outputs is True  # v1.0: tied, rescaled
    assert (c.pad_token_id, c.eos_token_id, c.decoder_start_token_id) == (0, 1, None)
    assert c.start_token_id == 0  # decoding starts from pad
    assert c.model_type == "t5" and c.use_sdpa is True
    assert c.num_decoder_layers == 2 and c.inner_dim == 12
    assert T5Config(**SMALL, num_decoder_layers=5).num_decoder_layers == 5
    assert T5Config(**SMALL, tie_word_embeddings=False).scale_decoder_outputs is False
    assert T5Config(**SMALL, scale_decoder_outputs=False).scale_decoder_outputs is False
    assert T5Config(**SMALL, pad_token_id=3, decoder_start_token_id=7).start_token_id == 7
    assert T5Config(**SMALL, pad_token_id=3).start_token_id == 3
    m = T5ForConditionalGeneration(T5Config(**SMALL))
    assert m.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape == (32, 2)


@pytest.mark.parametrize("key,value", [
    ("num_heads", 0), ("d_kv", True), ("d_ff", 2.0), ("num_layers", -1), ("num_decoder_layers", 0),
    ("relative_attention_num_buckets", 3), ("relative_attention_max_distance", 0),
    ("dropout_rate", 1.0), ("dropout_rate", -0.1), ("dropout_rate", float("nan")), ("dropout_rate", True),
    ("dropout_rate", "0.1"), ("layer_norm_epsilon", 0.0), ("layer_norm_epsilon", -1e-6),
    ("initializer_factor", float("inf")), ("pad_token_id", None), ("pad_token_id", 50), ("pad_token_id", -1),
    ("eos_token_id", True), ("eos_token_id", 1.0), ("eos_token_id", 50), ("decoder_start_token_id", -2),
    ("feed_forward_proj", "gated-gelu-new"), ("feed_forward_proj", "tanhh"),
])
def test_bad_config_values_are_refused(key, value):
    with pytest.raises(CheckpointError, match=key if key != "feed_forward_proj" else "feed_forward_proj"):
        T5Config(**{**SMALL, key: value})


def test_max_distance_must_exceed_the_exact_buckets():
    with pytest.raises(CheckpointError, match="relative_attention_max_distance=16"):
        T5Config(**SMALL, relative_attention_num_buckets=32, relative_attention_max_distance=16)
    with pytest.raises(CheckpointError, match="relative_attention_max_distance=4"):
        T5Config(**SMALL, relative_attention_num_buckets=9, relative_attention_max_distance=4)  # 9 // 2 = 4


@pytest.mark.parametrize("kw", [
    dict(relative_attention_num_buckets=4, relative_attention_max_distance=3),  # smallest valid
    dict(relative_attention_num_buckets=32, relative_attention_max_distance=17),
    dict(relative_attention_num_buckets=9, relative_attention_max_distance=5),
    dict(num_heads=1, d_kv=1, d_ff=1, num_layers=1, num_decoder_layers=1),
    dict(dropout_rate=0.0), dict(dropout_rate=0), dict(dropout_rate=0.999), dict(layer_norm_epsilon=1e-12),
    dict(initializer_factor=0.0), dict(pad_token_id=49, eos_token_id=None, decoder_start_token_id=0),
    dict(eos_token_id=0, decoder_start_token_id=49),
])
def test_boundary_config_values_are_accepted(kw):
    T5Config(**{**SMALL, **kw})


@pytest.mark.parametrize("s,want", [("relu", (False, "relu")), ("gelu", (False, "gelu")),
                                    ("gated-gelu", (True, "gelu_new")), ("gated-silu", (True, "silu")),
                                    ("gated-relu", (True, "relu")), ("gelu_new", (False, "gelu_new"))])
def test_feed_forward_proj_rule(s, want):
    assert parse_feed_forward_proj(s) == want


@pytest.mark.parametrize("s", ["gated-gelu-new", "gated-gated-relu", "x-gated-relu", "relu-gated", "other-relu", "",
                               "-", "gated-", 3, None])
def test_feed_forward_proj_errors(s):
    with pytest.raises(CheckpointError, match="feed_forward_proj"):
        parse_feed_forward_proj(s)


def test_hub_dict():
    d = T5Config(**SMALL, feed_forward_proj="gated-gelu", pad_token_id=0).to_hub_dict()
    assert d["architectures"] == ["T5ForConditionalGeneration"] and d["is_encoder_decoder"] is True
    assert d["dense_act_fn"] == "gelu_new" and d["is_gated_act"] is True
    assert d["decoder_start_token_id"] == 0 and "use_sdpa" not in d
    assert d["d_kv"] == 6 and d["num_decoder_layers"] == 2 and d["model_type"] == "t5"
    d = T5Config(**SMALL, decoder_start_token_id=4).to_hub_dict()
    assert d["decoder_start_token_id"] == 4 and d["is_gated_act"] is False and d["dense_act_fn"] == "relu"
