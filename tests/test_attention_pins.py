"""Attention behaviour a user relies on that tests/test_attention.py leaves open (found by scripts/mutation.py):
the defaults of scaled_dot_product_attention, additive and combined masks, the causal mask aligned to the end
of a longer key sequence, dropout, the head split/merge layout, the KV cache's growth and reorder, and
MultiHeadAttention's defaults, causal flag, cache layer and train/eval dropout. Expected values come from
explicit per-position loops with `math`, never from the code under test."""

import math

import pytest
import torch

from minillm.attention import (KVCache, MultiHeadAttention, causal_mask, combine_masks, merge_heads, padding_mask,
                               scaled_dot_product_attention, split_heads)

pytestmark = pytest.mark.usefixtures("one_thread")
NEG = float("-inf")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _loop_attention(q, k, v, allowed=None, add=None, scale=None):
    """softmax(q·k * scale + add) v, written with loops over every (batch..., query) row; a row with no allowed
    key gives zeros. allowed/add: callables (index tuple, i, j) -> bool / float."""
    *lead, T, d = q.shape
    S, dv = k.shape[-2], v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(*lead, T, dv, dtype=torch.float64)
    weights = torch.zeros(*lead, T, S, dtype=torch.float64)
    for idx in (torch.cartesian_prod(*[torch.arange(n) for n in lead]).reshape(-1, len(lead)).tolist()
                if lead else [[]]):
        idx = tuple(idx)
        for i in range(T):
            s = []
            for j in range(S):
                if allowed is not None and not allowed(idx, i, j):
                    s.append(NEG)
                    continue
                dot = sum(float(q[idx + (i, c)]) * float(k[idx + (j, c)]) for c in range(d)) * scale
                s.append(dot + (add(idx, i, j) if add is not None else 0.0))
            m = max(s)
            if m == NEG:
                continue
            e = [math.exp(x - m) if x != NEG else 0.0 for x in s]
            z = sum(e)
            for j in range(S):
                weights[idx + (i, j)] = e[j] / z
                for c in range(dv):
                    out[idx + (i, c)] += e[j] / z * float(v[idx + (j, c)])
    return out, weights


# ---- scaled_dot_product_attention ----

def test_defaults_are_plain_unmasked_attention_with_one_over_sqrt_d():
    # distinct sizes on every axis, so a shape taken from the wrong axis shows
    q, k, v = _rand(2, 3, 4, 6, seed=1), _rand(2, 3, 5, 6, seed=2), _rand(2, 3, 5, 7, seed=3)
    out = scaled_dot_product_attention(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 4, 7)  # one tensor, no weights by default
    exp, _ = _loop_attention(q, k, v)
    assert torch.allclose(out, exp, atol=1e-12)
    assert torch.equal(out, scaled_dot_product_attention(q, k, v))  # no dropout by default: deterministic


def test_explicit_scale_and_returned_weights():
    q, k, v = _rand(1, 2, 3, 4, seed=4), _rand(1, 2, 5, 4, seed=5), _rand(1, 2, 5, 3, seed=6)
    out, w = scaled_dot_product_attention(q, k, v, scale=0.3, return_weights=True)
    exp_out, exp_w = _loop_attention(q, k, v, scale=0.3)
    assert torch.allclose(w, exp_w, atol=1e-12) and torch.allclose(out, exp_out, atol=1e-12)


def test_additive_float_mask_is_added_to_the_scores():
    q, k, v = _rand(2, 3, 4, seed=7), _rand(2, 5, 4, seed=8), _rand(2, 5, 2, seed=9)
    bias = _rand(3, 5, seed=10)  # finite, broadcast over the batch
    bias[1, 2] = NEG
    out, w = scaled_dot_product_attention(q, k, v, attn_mask=bias, return_weights=True)
    exp_out, exp_w = _loop_attention(q, k, v, allowed=lambda b, i, j: bias[i, j] != NEG,
                                     add=lambda b, i, j: float(bias[i, j]))
    assert torch.allclose(w, exp_w, atol=1e-12) and torch.allclose(out, exp_out, atol=1e-12)
    assert w[:, 1, 2].eq(0).all()


def test_fully_masked_float_row_gives_zeros():
    q, k, v = _rand(1, 2, 3, seed=11), _rand(1, 4, 3, seed=12), _rand(1, 4, 3, seed=13)
    mask = torch.zeros(2, 4, dtype=torch.float64)
    mask[0] = NEG
    out, w = scaled_dot_product_attention(q, k, v, attn_mask=mask, return_weights=True)
    assert out[0, 0].eq(0).all() and w[0, 0].eq(0).all() and not out.isnan().any()
    exp_out, _ = _loop_attention(q, k, v)
    assert torch.allclose(out[0, 1], exp_out[0, 1], atol=1e-12)


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_causal_with_more_keys_than_queries_aligns_to_the_end(use_sdpa):
    # a KV cache: 3 new queries at absolute positions 3, 4, 5 over 6 keys; query i sees keys 0..3+i
    q, k, v = _rand(2, 2, 3, 4, seed=14), _rand(2, 2, 6, 4, seed=15), _rand(2, 2, 6, 5, seed=16)
    out = scaled_dot_product_attention(q, k, v, is_causal=True, use_sdpa=use_sdpa)
    exp, _ = _loop_attention(q, k, v, allowed=lambda b, i, j: j <= 3 + i)
    assert torch.allclose(out, exp, atol=1e-6)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("use_sdpa", [False, True])
def test_causal_combines_with_a_padding_mask(kind, use_sdpa):
    q, k, v = _rand(2, 1, 4, 3, seed=17), _rand(2, 1, 4, 3, seed=18), _rand(2, 1, 4, 3, seed=19)
    keep = torch.tensor([[True, True, True, True], [False, True, True, True]])  # row 1: key 0 is padding
    mask = keep[:, None, None, :]
    if kind == "float":
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, NEG)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True, use_sdpa=use_sdpa)
    exp, _ = _loop_attention(q, k, v, allowed=lambda b, i, j: j <= i and bool(keep[b[0], j]))
    assert torch.allclose(out, exp, atol=1e-6)
    assert out[1, 0, 0].eq(0).all()  # row 1's first query sees only padding


def test_dropout_zeroes_or_rescales_each_weight_and_asking_for_weights_changes_nothing():
    q, k, v = _rand(2, 2, 5, 4, seed=20), _rand(2, 2, 6, 4, seed=21), _rand(2, 2, 6, 3, seed=22)
    _, plain = _loop_attention(q, k, v)
    torch.manual_seed(0)
    out, w = scaled_dot_product_attention(q, k, v, dropout_p=0.5, return_weights=True)
    dropped = w == 0
    assert 0 < dropped.sum() < w.numel()  # some weights dropped, not all
    assert torch.allclose(w[~dropped], 2 * plain[~dropped], atol=1e-12)  # the rest scaled by 1/(1-p)
    assert torch.allclose(out, w @ v, atol=1e-12)  # the returned weights are the ones used
    torch.manual_seed(0)
    assert torch.allclose(scaled_dot_product_attention(q, k, v, dropout_p=0.5), out, atol=1e-12)


def test_mismatched_shapes_raise_value_error():
    q = _rand(2, 3, 4, 6)
    with pytest.raises(ValueError, match="do not fit"):  # key width differs from the query's
        scaled_dot_product_attention(q, _rand(2, 3, 5, 7), _rand(2, 3, 5, 6))
    with pytest.raises(ValueError, match="do not fit"):  # keys and values of different lengths
        scaled_dot_product_attention(q, _rand(2, 3, 5, 6), _rand(2, 3, 4, 6))


# ---- masks, head layout ----

def test_causal_mask_values():
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert causal_mask(2, 3).dtype == torch.bool


def test_padding_mask_shape_and_values():
    m = padding_mask(torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert m.shape == (2, 1, 1, 3) and m.dtype == torch.bool
    assert m[:, 0, 0].tolist() == [[False, True, True], [True, True, True]]


def test_combine_masks_of_each_kind():
    a = torch.tensor([[True, False], [True, True]])
    b = torch.tensor([[True, True], [False, True]])
    assert combine_masks(a, b).tolist() == [[True, False], [False, True]]
    f = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    mixed = combine_masks(a, f)
    assert mixed.tolist() == [[0.5, NEG], [2.0, 0.0]]
    assert combine_masks(f, b).tolist() == [[0.5, -1.0], [NEG, 0.0]]
    assert combine_masks(f, f).tolist() == [[1.0, -2.0], [4.0, 0.0]]


def test_split_and_merge_heads_layout():
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(2, 3, 8)
    h = split_heads(x, 4)  # head n holds features 2n, 2n+1
    assert h.shape == (2, 4, 3, 2)
    for b in range(2):
        for n in range(4):
            for t in range(3):
                assert h[b, n, t].tolist() == x[b, t, 2 * n:2 * n + 2].tolist()
    m = merge_heads(h)
    assert m.shape == (2, 3, 8) and torch.equal(m, x)
    y = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).reshape(2, 3, 5, 4)  # (B, nh, T, hs) with nh != hs
    my = merge_heads(y)
    assert my.shape == (2, 5, 12)
    assert my[1, 2].tolist() == y[1, :, 2].reshape(-1).tolist()


# ---- KV cache ----

def test_kv_cache_appends_per_layer_with_wider_values():
    cache = KVCache(2)  # no max_length
    assert cache.n_layer == 2 and cache.max_length is None and cache.seq_len == 0
    k1, v1 = _rand(2, 3, 4, 5, seed=30), _rand(2, 3, 4, 6, seed=31)  # values wider than keys
    k2, v2 = _rand(2, 3, 1, 5, seed=32), _rand(2, 3, 1, 6, seed=33)
    K, V = cache.update(0, k1, v1)
    assert torch.equal(K, k1) and torch.equal(V, v1)
    assert cache.seq_len == 4
    K, V = cache.update(0, k2, v2)
    assert torch.equal(K, torch.cat([k1, k2], 2)) and torch.equal(V, torch.cat([v1, v2], 2))
    assert cache.seq_len == 5
    K1, V1 = cache.update(1, k2, v2)  # layer 1 has its own buffers and length
    assert torch.equal(K1, k2) and torch.equal(V1, v2)
    assert cache.lengths == [5, 1] and cache.seq_len == 5


def test_kv_cache_grows_a_partly_filled_buffer_by_doubling():
    cache = KVCache(1, max_length=4)
    ks = [_rand(1, 2, n, 8, seed=40 + n) for n in (3, 2, 6)]
    vs = [_rand(1, 2, n, 3, seed=50 + n) for n in (3, 2, 6)]
    cache.update(0, ks[0], vs[0])
    assert cache.keys[0].shape[2] == 4  # allocated once for max_length
    K, V = cache.update(0, ks[1], vs[1])  # 3 + 2 > 4: grows to 2 * 4
    assert cache.keys[0].shape[2] == 8 and cache.values[0].shape[2] == 8
    assert torch.equal(K, torch.cat(ks[:2], 2)) and torch.equal(V, torch.cat(vs[:2], 2))
    K, V = cache.update(0, ks[2], vs[2])  # 5 + 6 > 2 * 8? no: 11 <= 16 -> 16; beyond doubling it takes what is needed
    assert cache.keys[0].shape[2] == 16
    assert torch.equal(K, torch.cat(ks, 2)) and torch.equal(V, torch.cat(vs, 2))
    big = KVCache(1, max_length=2)
    big.update(0, ks[1], vs[1])
    K, V = big.update(0, ks[2], vs[2])  # 2 + 6 > 2 * 2: exactly what is needed
    assert big.keys[0].shape[2] == 8 and torch.equal(K, torch.cat(ks[1:], 2))


def test_kv_cache_with_room_writes_in_place():
    cache = KVCache(1, max_length=6)
    K, _ = cache.update(0, _rand(1, 1, 2, 4), _rand(1, 1, 2, 4))
    ptr = K.data_ptr()
    for i in range(4):
        K, _ = cache.update(0, _rand(1, 1, 1, 4, seed=i), _rand(1, 1, 1, 4, seed=i))
        assert K.data_ptr() == ptr  # no copy of the past while max_length suffices
    assert cache.keys[0].shape[2] == 6


def test_kv_cache_reorder_keeps_chosen_rows():
    cache = KVCache(2)
    k, v = _rand(3, 2, 2, 4, seed=60), _rand(3, 2, 2, 4, seed=61)
    cache.update(0, k, v)  # layer 1 never filled: reorder must skip it
    cache.reorder(torch.tensor([2, 0]))
    K, V = cache.update(0, k[[2, 0], :, :1], v[[2, 0], :, :1])
    assert torch.equal(K, torch.cat([k[[2, 0]], k[[2, 0], :, :1]], 2))
    assert torch.equal(V, torch.cat([v[[2, 0]], v[[2, 0], :, :1]], 2))
    assert cache.keys[1] is None


# ---- MultiHeadAttention ----

def _mha_by_hand(mha, x, ctx=None, keep=None, causal=False):
    """Project with the module's own weights, then attention per head with loops, concat, out projection."""
    ctx = x if ctx is None else ctx
    q, k, v = mha.query(x).double(), mha.key(ctx).double(), mha.value(ctx).double()
    B, T, C = q.shape
    S, nh = k.shape[1], mha.n_head
    hs = C // nh
    heads = []
    for n in range(nh):
        sl = slice(n * hs, (n + 1) * hs)
        allowed = lambda b, i, j: (keep is None or bool(keep[b[0], j])) and (not causal or j <= S - T + i)
        o, _ = _loop_attention(q[..., sl], k[..., sl], v[..., sl], allowed=allowed)
        heads.append(o)
    return mha.out(torch.cat(heads, -1).float())


def test_mha_defaults_bias_no_dropout_not_causal():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2)
    assert mha.query.bias is not None and mha.out.bias is not None  # bias by default
    assert mha.use_sdpa and not mha.causal and mha.dropout == 0.0
    mha.train()  # no dropout by default, even in training
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        assert torch.allclose(mha(x), _mha_by_hand(mha, x), atol=1e-5)  # sees the future: not causal


def test_mha_cross_attention_with_kv_dim_padding_and_causal_flag():
    torch.manual_seed(1)
    mha = MultiHeadAttention(8, 2, kv_dim=6, causal=True, use_sdpa=False).eval()
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        out = mha(x, context=ctx, attention_mask=keep)  # causal applies to self-attention only
        assert torch.allclose(out, _mha_by_hand(mha, x, ctx, keep=keep), atol=1e-5)
        out, w = mha(x, context=ctx, attention_mask=keep, return_weights=True)
        assert w.shape == (2, 2, 3, 5) and w[1, :, :, 3:].eq(0).all()
        y = torch.randn(2, 4, 8)
        mha_self = MultiHeadAttention(8, 2, causal=True).eval()
        assert torch.allclose(mha_self(y), _mha_by_hand(mha_self, y, causal=True), atol=1e-5)


def test_mha_cache_uses_layer_zero_by_default():
    torch.manual_seed(2)
    mha = MultiHeadAttention(8, 2, causal=True).eval()
    x = torch.randn(1, 4, 8)
    cache = KVCache(1)
    with torch.no_grad():
        steps = torch.cat([mha(x[:, :3], cache=cache), mha(x[:, 3:], cache=cache)], 1)
        assert torch.allclose(steps, mha(x), atol=1e-5)


def test_mha_dropout_only_in_training():
    torch.manual_seed(3)
    mha = MultiHeadAttention(8, 2, dropout=0.5)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        mha.eval()
        assert torch.allclose(mha(x), _mha_by_hand(mha, x), atol=1e-5)
        mha.train()
        assert not torch.allclose(mha(x), _mha_by_hand(mha, x), atol=1e-3)
