"""Llama behaviour a user relies on that tests/test_llama.py leaves open (found by scripts/mutation.py): the
forward pass of a tiny random model against the equations by hand (RMSNorm, rotary positions pair by pair,
grouped-query attention, SwiGLU, padding, qwen2's biases), the rotary frequencies of each scaling kind by hand,
the config's defaults, derived values and boundary checks, dropout in train mode only, initialisation,
resizing and the hub dict. The reference reads the model's weights but none of its code."""

import math

import pytest
import torch

from minillm.hub import CheckpointError
from minillm.models.llama import LlamaConfig, LlamaForCausalLM, RMSNorm, rope_inv_freq

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(**kw):
    base = dict(vocab_size=11, hidden_size=8, intermediate_size=6, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, initializer_range=0.3)
    base.update(kw)
    return LlamaConfig(**base)


def tiny(**kw):
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg(**kw)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
    return model


# ---- the reference, in float64 ----

def _inv_freq_by_hand(c):
    r, d = c.rope, c.head_dim
    out = []
    for i in range(d // 2):
        th = r["rope_theta"] ** (-2 * i / d)
        if r["rope_type"] == "linear":
            th /= r["factor"]
        elif r["rope_type"] == "llama3":
            L, lo, hi, f = r["original_max_position_embeddings"], r["low_freq_factor"], r["high_freq_factor"], r["factor"]
            lam = 2 * math.pi / th
            if lam < L / hi:
                pass
            elif lam > L / lo:
                th /= f
            else:
                s = (L / lam - lo) / (hi - lo)
                th = (1 - s) * th / f + s * th
        out.append(th)
    return out


def _rms(x, mod):
    return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + mod.eps) * mod.weight.double()


def _lin(x, mod):
    y = x @ mod.weight.double().T
    return y + mod.bias.double() if mod.bias is not None else y


def _rope(x, pos, inv):
    """x (T, d) of one head, pos (T,): rotate (x_i, x_{i+d/2}) by pos * inv[i]."""
    T, d = x.shape
    out = x.clone()
    for t in range(T):
        for i in range(d // 2):
            a = float(pos[t]) * inv[i]
            c, s = math.cos(a), math.sin(a)
            out[t, i] = x[t, i] * c - x[t, i + d // 2] * s
            out[t, i + d // 2] = x[t, i + d // 2] * c + x[t, i] * s
    return out


def reference(model, ids, mask=None):
    c = model.config
    B, T = ids.shape
    nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    m = torch.ones(B, T, dtype=torch.long) if mask is None else mask
    inv = _inv_freq_by_hand(c)
    x = model.model.embed_tokens.weight.double()[ids]
    for layer in model.model.layers:
        a = layer.self_attn
        h = _rms(x, layer.input_layernorm)
        q, k, v = _lin(h, a.q_proj), _lin(h, a.k_proj), _lin(h, a.v_proj)
        y = torch.zeros(B, T, nh * hd, dtype=torch.float64)
        for b in range(B):
            pos, n = [], 0
            for t in range(T):
                pos.append(n if m[b, t] else 1)
                n += int(m[b, t])
            for hh in range(nh):
                g = hh // (nh // nkv)  # the kv head this query head shares
                qh = _rope(q[b, :, hh * hd:(hh + 1) * hd], pos, inv)
                kh = _rope(k[b, :, g * hd:(g + 1) * hd], pos, inv)
                vh = v[b, :, g * hd:(g + 1) * hd]
                for i in range(T):
                    js = [j for j in range(T) if j <= i and m[b, j]]
                    if not js:
                        continue
                    s = torch.stack([(qh[i] * kh[j]).sum() / math.sqrt(hd) for j in js])
                    w = torch.softmax(s, 0)
                    y[b, i, hh * hd:(hh + 1) * hd] = sum(w[n] * vh[j] for n, j in enumerate(js))
        x = x + _lin(y, a.o_proj)
        h = _rms(x, layer.post_attention_layernorm)
        mlp = layer.mlp
        gte = _lin(h, mlp.gate_proj)
        x = x + _lin(gte * torch.sigmoid(gte) * _lin(h, mlp.up_proj), mlp.down_proj)
    x = _rms(x, model.model.norm)
    return x @ model.lm_head.weight.double().T


def _close(a, b, tol=1e-5):
    return (a.double() - b).abs().max().item() < tol


IDS = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
PAD = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


# ---- forward ----

@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("nkv", [1, 2, 4])
def test_forward_equals_the_equations_by_hand(use_sdpa, nkv):
    model = tiny(use_sdpa=use_sdpa, num_key_value_heads=nkv)
    with torch.no_grad():
        assert _close(model(IDS), reference(model, IDS))
        assert _close(model(IDS, attention_mask=PAD), reference(model, IDS, PAD))
        assert _close(model(IDS, attention_mask=torch.ones_like(IDS)), reference(model, IDS))


@pytest.mark.parametrize("opts", [
    dict(model_type="qwen2"), dict(attention_bias=True), dict(mlp_bias=True), dict(tie_word_embeddings=True),
    dict(head_dim=6), dict(rope_theta=500.0),
    dict(rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 100.0}),
    dict(rope_scaling={"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8}, rope_theta=50.0),
])
def test_config_options_by_hand(opts):
    model = tiny(**opts)
    with torch.no_grad():
        assert _close(model(IDS, attention_mask=PAD), reference(model, IDS, PAD))


def test_biases_per_model_type():
    a = tiny(model_type="qwen2").model.layers[0].self_attn  # qwen2: biases on q, k, v, none on o
    assert a.q_proj.bias is not None and a.k_proj.bias is not None and a.v_proj.bias is not None
    assert a.o_proj.bias is None
    a = tiny(attention_bias=True).model.layers[0].self_attn
    assert a.q_proj.bias is not None and a.o_proj.bias is not None
    a = tiny(model_type="qwen2", attention_bias=True).model.layers[0].self_attn
    assert a.q_proj.bias is not None and a.o_proj.bias is None
    m = tiny()
    assert m.model.layers[0].self_attn.q_proj.bias is None and m.model.layers[0].mlp.up_proj.bias is None
    assert tiny(mlp_bias=True).model.layers[0].mlp.down_proj.bias is not None


def test_chunked_cache_equals_one_pass():
    model = tiny()
    with torch.no_grad():
        full = reference(model, IDS, PAD)
        cache = model.new_cache()
        parts = [model(IDS[:, :2], attention_mask=PAD[:, :2], cache=cache),
                 model(IDS[:, 2:4], attention_mask=PAD[:, :4], cache=cache),
                 model(IDS[:, 4:], attention_mask=PAD, cache=cache)]
        out = torch.cat(parts, 1)
        keep = PAD.bool()
        assert (out.double() - full)[keep].abs().max() < 1e-5
        cache = model.new_cache()  # no mask: several tokens after a cached past still causal
        out = torch.cat([model(IDS[:, :3], cache=cache), model(IDS[:, 3:], cache=cache)], 1)
        assert _close(out, reference(model, IDS))
        assert cache.seq_len == 5 and cache.n_layer == 2
    assert model.new_cache(7).max_length == 7


def test_explicit_position_ids_broadcast_over_the_batch():
    model = tiny()
    with torch.no_grad():
        a = model(IDS, position_ids=torch.arange(5)[None])
        assert _close(a, reference(model, IDS))


def test_rmsnorm_by_hand():
    n = RMSNorm(4, eps=0.5)
    with torch.no_grad():
        n.weight.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    r = math.sqrt((1 + 4 + 9 + 16) / 4 + 0.5)
    assert torch.allclose(n(x), torch.tensor([[1 / r, 4 / r, -3 / r, 2 / r]]), atol=1e-6)
    assert n(x.to(torch.bfloat16)).dtype == torch.float32  # the fp32 weight scales the cast-back value


def test_dropout_only_in_training():
    model = tiny(attention_dropout=0.5, use_sdpa=False)
    with torch.no_grad():
        assert _close(model(IDS), reference(model, IDS))
        model.train()
        assert not _close(model(IDS), reference(model, IDS), 1e-3)


# ---- rotary frequencies ----

@pytest.mark.parametrize("rope", [
    None,
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 1024, "rope_theta": 10000.0},
])
def test_rope_inv_freq_by_hand(rope):
    c = cfg(hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters=rope)
    got = rope_inv_freq(c)
    assert got.dtype == torch.float32 and got.shape == (8,)
    exp = _inv_freq_by_hand(c)
    assert torch.allclose(got.double(), torch.tensor(exp, dtype=torch.float64), rtol=1e-6)
    if rope and rope["rope_type"] == "llama3":  # all three regions occur: kept, blended, divided
        base = [10000.0 ** (-i / 8) for i in range(8)]
        assert got[0].item() == pytest.approx(base[0]) and got[7].item() == pytest.approx(base[7] / 8)
        assert base[4] / 8 < got[4].item() < base[4]


# ---- config ----

def test_config_defaults_and_derived_values():
    c = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=4, num_hidden_layers=1, num_attention_heads=2)
    assert c.num_key_value_heads == 2 and c.head_dim == 4
    assert (c.hidden_act, c.max_position_embeddings, c.rms_norm_eps) == ("silu", 2048, 1e-6)
    assert (c.attention_bias, c.attention_dropout, c.mlp_bias, c.tie_word_embeddings) == (False, 0.0, False, False)
    assert (c.initializer_range, c.model_type, c.use_sdpa) == (0.02, "llama", True)
    assert c.sliding_window is None and c.window is None
    assert c.rope == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg(rope_theta=500).rope == {"rope_type": "default", "rope_theta": 500.0}
    # transformers 5's rope_parameters win over the older spelling
    c = cfg(rope_parameters={"rope_type": "linear", "factor": 2, "rope_theta": 300}, rope_scaling={"type": "default"})
    assert c.rope == {"rope_type": "linear", "rope_theta": 300.0, "factor": 2.0}
    c = cfg(rope_scaling={"type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4}, rope_theta=20.0,
            max_position_embeddings=64)
    assert c.rope == {"rope_type": "llama3", "rope_theta": 20.0, "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def test_window_per_model_type():
    assert cfg(model_type="mistral", sliding_window=4).window == 4
    assert cfg(model_type="llama", sliding_window=4).window == 4
    assert cfg(model_type="qwen2", sliding_window=4).window is None
    assert cfg(model_type="qwen2", sliding_window=4, use_sliding_window=True).window == 4
    model = tiny(model_type="mistral", sliding_window=4)
    with torch.no_grad():
        model(IDS[:, :4])
        with pytest.raises(ValueError, match="sliding window 4"):
            model(IDS)


@pytest.mark.parametrize("edit,needle", [
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(max_position_embeddings=True), "max_position_embeddings must be a positive integer"),
    (dict(num_key_value_heads=0), "num_key_value_heads must be a positive integer or null"),
    (dict(head_dim=2.0), "head_dim must be a positive integer or null"),
    (dict(sliding_window=-1), "sliding_window must be a positive integer or null"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps must be a positive number"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a positive number"),
    (dict(rms_norm_eps=True), "rms_norm_eps must be a positive number"),
    (dict(attention_dropout=1.0), "attention_dropout must be in"),
    (dict(attention_dropout=-0.1), "attention_dropout must be in"),
    (dict(mlp_bias=1), "mlp_bias must be true or false"),
    (dict(use_sdpa=None), "use_sdpa must be true or false"),
    (dict(model_type="gemma"), "model_type 'gemma' is not one of"),
    (dict(hidden_act=3), "hidden_act must be a string"),
    (dict(hidden_act="nope"), "not supported"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    (dict(hidden_size=10), "hidden_size=10 is not divisible by num_attention_heads=4"),
    (dict(head_dim=3), "head_dim=3 must be even"),
    (dict(hidden_size=12), "head_dim=3 must be even"),
    (dict(rope_parameters=[1]), "rope_parameters must be"),
    (dict(rope_scaling="linear"), "rope_scaling must be"),
    (dict(rope_theta=1.0), "rope_theta must be a number > 1"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": "1e4"}), "rope_theta must be a number > 1"),
    (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 0.5}), "needs factor >= 1"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 2, "low_freq_factor": 2, "high_freq_factor": 2}),
     "0 < low_freq_factor < high_freq_factor"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 2, "low_freq_factor": 0, "high_freq_factor": 2}),
     "0 < low_freq_factor < high_freq_factor"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 2, "low_freq_factor": 1, "high_freq_factor": "4"}),
     "0 < low_freq_factor < high_freq_factor"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 2, "low_freq_factor": 1, "high_freq_factor": 4,
                           "original_max_position_embeddings": 0}), "original_max_position_embeddings must be"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 2, "low_freq_factor": 1, "high_freq_factor": 4,
                           "original_max_position_embeddings": 8.0}), "original_max_position_embeddings must be"),
])
def test_bad_config_values(edit, needle):
    with pytest.raises(CheckpointError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        cfg(**edit)


def test_boundary_values_accepted():
    cfg(attention_dropout=0.0, rms_norm_eps=1e-12, num_key_value_heads=1, sliding_window=1, head_dim=2,
        max_position_embeddings=1, rope_theta=1.5)
    cfg(rope_parameters={"rope_type": "linear", "factor": 1.0})
    cfg(rope_parameters={"rope_type": "llama3", "factor": 1, "low_freq_factor": 0.5, "high_freq_factor": 0.6,
                         "original_max_position_embeddings": 1})
    cfg(rope_parameters={"rope_type": "default", "partial_rotary_factor": 1.0})
    c = cfg(num_attention_heads=2, num_key_value_heads=None, hidden_size=8, head_dim=None)
    assert c.num_key_value_heads == 2 and c.head_dim == 4


def test_hub_dict():
    d = cfg(rope_theta=500.0).to_hub_dict()
    assert d["rope_parameters"] == {"rope_type": "default", "rope_theta": 500.0}
    assert not {"use_sdpa", "rope", "rope_scaling", "rope_theta", "use_sliding_window"} & d.keys()
    assert d["architectures"] == ["LlamaForCausalLM"] and d["attention_bias"] is False and "mlp_bias" in d
    d = cfg(model_type="qwen2").to_hub_dict()
    assert d["architectures"] == ["Qwen2ForCausalLM"] and "use_sliding_window" in d
    assert "attention_bias" not in d and "mlp_bias" not in d
    assert cfg(model_type="mistral").to_hub_dict()["architectures"] == ["MistralForCausalLM"]


# ---- init, resize ----

def test_initialisation_and_flags():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, attention_bias=True))
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert p.eq(0).all(), name
        elif "norm" in name:
            assert p.eq(1).all(), name
        else:
            assert abs(p.mean().item()) < 0.002 and abs(p.std().item() - 0.02) < 0.001, name
    assert model.lm_head.weight is not model.model.embed_tokens.weight and model.lm_head.bias is None
    tied = LlamaForCausalLM(cfg(tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert model.get_input_embeddings() is model.model.embed_tokens
    assert model.model.gradient_checkpointing is False
    model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing is True
    model.gradient_checkpointing_enable(False)
    assert model.model.gradient_checkpointing is False


@pytest.mark.parametrize("tied", [True, False])
def test_resize_grow_and_shrink(tied):
    model = tiny(tie_word_embeddings=tied)
    emb = model.model.embed_tokens.weight.detach().clone()
    head = model.lm_head.weight.detach().clone()
    model.resize_token_embeddings(14)
    w, h = model.model.embed_tokens.weight, model.lm_head.weight
    assert w.shape == (14, 8) and h.shape == (14, 8) and model.config.vocab_size == 14
    assert torch.equal(w[:11], emb) and torch.allclose(w[11:], emb.mean(0).expand(3, 8))
    assert torch.equal(h[:11], head) and torch.allclose(h[11:], head.mean(0).expand(3, 8))
    assert (h is w) == tied and model.lm_head.bias is None
    model.resize_token_embeddings(9)
    assert torch.equal(model.model.embed_tokens.weight, emb[:9]) and torch.equal(model.lm_head.weight, head[:9])
    with torch.no_grad():
        assert _close(model(IDS % 9), reference(model, IDS % 9))


def test_llama3_scaling_is_continuous_at_the_region_edges():
    # choose low/high_freq_factor so that a wavelength falls exactly on each edge L/lo and L/hi: the frequency
    # there must equal the neighbouring region's (θ/factor at L/lo, θ at L/hi), as the blend is continuous
    plain = cfg(hidden_size=64, num_attention_heads=4, head_dim=16)
    lam = (2 * math.pi / rope_inv_freq(plain)).tolist()  # the wavelengths as the model computes them (fp32)
    L, f = 1000, 4.0
    rope = {"rope_type": "llama3", "factor": f, "low_freq_factor": L / lam[5], "high_freq_factor": L / lam[2],
            "original_max_position_embeddings": L}
    got = rope_inv_freq(cfg(hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters=rope)).tolist()
    base = rope_inv_freq(plain).tolist()
    assert got[5] == pytest.approx(base[5] / f, rel=1e-5)  # the long-wavelength edge: divided by factor
    assert got[2] == pytest.approx(base[2], rel=1e-5)  # the short-wavelength edge: kept
    assert got[6] == pytest.approx(base[6] / f, rel=1e-5) and got[1] == pytest.approx(base[1], rel=1e-5)
    s = (L / lam[4] - L / lam[5]) / (L / lam[2] - L / lam[5])
    assert got[4] == pytest.approx((1 - s) * base[4] / f + s * base[4], rel=1e-5)
