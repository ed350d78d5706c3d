"""GPT-2 behaviour a user relies on that tests/test_gpt2.py leaves open (found by scripts/mutation.py): the
config defaults (the hub's), the forward pass of a tiny random model against a by-hand computation (layer norm,
attention per head with causal and padding masks, the attention-scale options, gelu_new, cross-attention,
tied head), positions from the mask, chunked caching, dropout in train mode only, the initialisation, the
resize of an untied head, and input errors. The by-hand reference reads the model's weights but none of its
code."""

import math

import pytest
import torch

from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel, positions_from_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    base = dict(vocab_size=13, n_embd=8, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, initializer_range=0.3)
    base.update(kw)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**base)).eval()
    with torch.no_grad():  # non-trivial biases and norms, so that every term shows
        for n, p in model.named_parameters():
            if n.endswith("bias") or "ln" in n:
                p.add_(torch.randn_like(p) * 0.2)
    return model


# ---- the reference: the GPT-2 equations written out in float64 ----

def _ln(x, mod):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + mod.eps) * mod.weight.double() + mod.bias.double()


def _lin(x, mod):
    y = x @ mod.weight.double().T
    return y + mod.bias.double() if mod.bias is not None else y


def _attend(q, k, v, nh, scale, allowed):
    """q (B, T, C), k/v (B, S, C); allowed(b, i, j) -> bool. Per head, per query: softmax over allowed keys."""
    B, T, C = q.shape
    S, hs = k.shape[1], C // nh
    out = torch.zeros(B, T, C, dtype=torch.float64)
    for b in range(B):
        for h in range(nh):
            sl = slice(h * hs, (h + 1) * hs)
            for i in range(T):
                js = [j for j in range(S) if allowed(b, i, j)]
                if not js:
                    continue
                s = torch.stack([(q[b, i, sl] * k[b, j, sl]).sum() * scale for j in js])
                w = torch.exp(s - s.max())
                w = w / w.sum()
                out[b, i, sl] = sum(w[n] * v[b, j, sl] for n, j in enumerate(js))
    return out


def _gelu_new(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def reference(model, ids, mask=None, enc=None, enc_mask=None):
    cfg, tr = model.config, model.transformer
    B, T = ids.shape
    C, nh = cfg.n_embd, cfg.n_head
    m = torch.ones(B, T, dtype=torch.long) if mask is None else mask
    pos = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        n = 0
        for t in range(T):
            pos[b, t] = n if m[b, t] else 1
            n += int(m[b, t])
    x = tr.wte.weight.double()[ids] + tr.wpe.weight.double()[pos]
    for li, blk in enumerate(tr.h):
        scale = 1 / math.sqrt(C // nh) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= li + 1
        qkv = _lin(_ln(x, blk.ln_1), blk.attn.c_attn)
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
        y = _attend(q, k, v, nh, scale, lambda b, i, j: j <= i and bool(m[b, j]))
        x = x + _lin(y, blk.attn.c_proj)
        if enc is not None:
            e = enc.double()
            em = torch.ones(B, e.shape[1], dtype=torch.long) if enc_mask is None else enc_mask
            q = _lin(_ln(x, blk.ln_cross_attn), blk.crossattention.q_attn)
            kv = _lin(e, blk.crossattention.c_attn)
            y = _attend(q, kv[..., :C], kv[..., C:], nh, scale, lambda b, i, j: bool(em[b, j]))
            x = x + _lin(y, blk.crossattention.c_proj)
        h = _ln(x, blk.ln_2)
        x = x + _lin(_gelu_new(_lin(h, blk.mlp.c_fc)), blk.mlp.c_proj)
    x = _ln(x, tr.ln_f)
    return x @ model.lm_head.weight.double().T


def _close(a, b, tol=1e-5):
    return (a.double() - b).abs().max().item() < tol


# ---- tests ----

def test_config_defaults_are_the_hubs():
    c = GPT2Config(vocab_size=10, n_embd=8, n_layer=1, n_head=2)
    assert (c.n_positions, c.n_inner, c.activation_function) == (1024, None, "gelu_new")
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.1, 0.1, 0.1)
    assert (c.layer_norm_epsilon, c.initializer_range) == (1e-5, 0.02)
    assert (c.add_cross_attention, c.scale_attn_weights, c.scale_attn_by_inverse_layer_idx) == (False, True, False)
    assert c.tie_word_embeddings is True and c.use_sdpa is True
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.model_type) == (50256, 50256, None, "gpt2")
    d = c.to_hub_dict()
    assert "use_sdpa" not in d and d["architectures"] == ["GPT2LMHeadModel"] and d["n_ctx"] == 1024
    assert d["vocab_size"] == 10 and d["n_embd"] == 8 and d["n_layer"] == 1 and d["n_head"] == 2


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_forward_equals_the_equations_by_hand(use_sdpa):
    model = tiny(use_sdpa=use_sdpa)
    ids = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    with torch.no_grad():
        assert _close(model(ids), reference(model, ids))
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # row 0 left-padded
        assert _close(model(ids, attention_mask=mask), reference(model, ids, mask))
        h = model.hidden_states(ids)
        assert h.shape == (2, 5, 8)
        assert _close(h @ model.transformer.wte.weight.T, reference(model, ids))  # the head is tied


@pytest.mark.parametrize("opts", [dict(scale_attn_weights=False), dict(scale_attn_by_inverse_layer_idx=True),
                                  dict(n_inner=5), dict(tie_word_embeddings=False)])
def test_config_options_by_hand(opts):
    model = tiny(**opts)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        assert _close(model(ids), reference(model, ids))
    if "n_inner" in opts:
        assert model.transformer.h[0].mlp.c_fc.out_features == 5
    else:
        assert model.transformer.h[0].mlp.c_fc.out_features == 32  # 4 * n_embd by default
    if opts.get("tie_word_embeddings") is False:
        assert model.lm_head.weight is not model.transformer.wte.weight


def test_cross_attention_by_hand():
    model = tiny(add_cross_attention=True)
    ids = torch.tensor([[3, 1, 4], [1, 5, 9]])
    enc = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    enc_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        assert _close(model(ids, encoder_hidden_states=enc), reference(model, ids, enc=enc))
        assert _close(model(ids, encoder_hidden_states=enc, encoder_attention_mask=enc_mask),
                      reference(model, ids, enc=enc, enc_mask=enc_mask))
        assert _close(model(ids, encoder_hidden_states=enc.double()), reference(model, ids, enc=enc))  # cast
        # cached decoding with cross-attention: the encoder states are not cached, only the self-attention
        cache = model.new_cache()
        a = model(ids[:, :2], encoder_hidden_states=enc, cache=cache)
        b = model(ids[:, 2:], encoder_hidden_states=enc, cache=cache)
        assert _close(torch.cat([a, b], 1), reference(model, ids, enc=enc))


def test_encoder_states_errors():
    model = tiny(add_cross_attention=True)
    ids = torch.tensor([[3, 1]])
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        model(ids, encoder_hidden_states=torch.zeros(1, 4))  # 2-D
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        model(ids, encoder_hidden_states=torch.zeros(1, 3, 7))  # wrong width
    with pytest.raises(ValueError, match="no cross-attention"):
        tiny()(ids, encoder_hidden_states=torch.zeros(1, 3, 8))


def test_attention_mask_shape_error():
    model = tiny()
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2, dtype=torch.long))
    cache = model.new_cache()
    model(torch.tensor([[1, 2]]), cache=cache)
    with pytest.raises(ValueError, match="attention_mask has shape"):  # must cover cached + new positions
        model(torch.tensor([[3]]), attention_mask=torch.ones(1, 1, dtype=torch.long), cache=cache)
    model(torch.tensor([[3]]), attention_mask=torch.ones(1, 3, dtype=torch.long), cache=cache)


def test_positions_from_the_mask():
    assert positions_from_mask(None, 0, 4, None).tolist() == [[0, 1, 2, 3]]
    assert positions_from_mask(None, 3, 2, None).tolist() == [[3, 4]]
    m = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]])
    assert positions_from_mask(m, 0, 5, None).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4], [1, 0, 1, 1, 2]]
    assert positions_from_mask(m, 3, 2, None).tolist() == [[1, 2], [3, 4], [1, 2]]  # the new positions only


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_cache_equals_one_pass(masked):
    model = tiny()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2], [2, 7, 1, 8, 2, 8, 1]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]) if masked else None
    with torch.no_grad():
        full = reference(model, ids, mask)
        cache = model.new_cache(7)
        parts, done = [], 0
        for n in (2, 3, 1, 1):  # chunks of several tokens after a cached past, then single steps
            m = None if mask is None else mask[:, :done + n]
            parts.append(model(ids[:, done:done + n], attention_mask=m, cache=cache))
            done += n
        assert cache.seq_len == 7
        out = torch.cat(parts, 1)
    keep = torch.ones(2, 7, dtype=torch.bool) if mask is None else mask.bool()
    assert (out.double() - full)[keep].abs().max() < 1e-5


def test_new_cache_has_a_slot_per_layer():
    model = tiny(n_layer=3)
    c = model.new_cache()
    assert c.n_layer == 3 and c.max_length is None
    assert model.new_cache(9).max_length == 9


def test_dropout_only_in_training():
    model = tiny(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert _close(model(ids), reference(model, ids))  # eval: no dropout
        model.train()
        torch.manual_seed(0)
        a = model(ids)
        assert not _close(a, reference(model, ids), 1e-3)
    for p in (0.0, 0.1):  # each of the three rates acts on its own
        for which in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            kw = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            kw[which] = 0.5
            m = tiny(**kw).train()
            with torch.no_grad():
                assert not _close(m(ids), reference(m, ids), 1e-3), which


def test_initialisation():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    sd = dict(model.named_parameters())
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
                 "transformer.h.1.mlp.c_fc.weight"):
        w = sd[name]
        assert abs(w.mean().item()) < 0.002 and abs(w.std().item() - 0.02) < 0.001, name
    for name in ("transformer.h.0.attn.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"):
        w = sd[name]  # residual projections: 0.02 / sqrt(2 * n_layer) = 0.01
        assert abs(w.mean().item()) < 0.001 and abs(w.std().item() - 0.01) < 0.0005, name
    for name, p in sd.items():
        if name.endswith(".bias"):
            assert p.eq(0).all(), name
        if ".ln_" in name and name.endswith(".weight"):
            assert p.eq(1).all(), name
    assert model.lm_head.bias is None
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.get_input_embeddings() is model.transformer.wte
    assert model.transformer.gradient_checkpointing is False
    model.gradient_checkpointing_enable()
    assert model.transformer.gradient_checkpointing is True
    model.gradient_checkpointing_enable(False)
    assert model.transformer.gradient_checkpointing is False


@pytest.mark.parametrize("tied", [True, False])
def test_resize_grow_and_shrink(tied):
    model = tiny(tie_word_embeddings=tied)
    emb = model.transformer.wte.weight.detach().clone()
    head = model.lm_head.weight.detach().clone()
    model.resize_token_embeddings(16)
    w, h = model.transformer.wte.weight, model.lm_head.weight
    assert w.shape == (16, 8) and h.shape == (16, 8) and model.config.vocab_size == 16
    assert torch.equal(w[:13], emb) and torch.allclose(w[13:], emb.mean(0).expand(3, 8))
    assert torch.equal(h[:13], head) and torch.allclose(h[13:], head.mean(0).expand(3, 8))
    assert (h is w) == tied and model.lm_head.bias is None
    with torch.no_grad():
        assert _close(model(torch.tensor([[15, 2]])), reference(model, torch.tensor([[15, 2]])))
    model.resize_token_embeddings(10)
    assert model.transformer.wte.weight.shape == (10, 8) and model.lm_head.weight.shape == (10, 8)
    assert torch.equal(model.transformer.wte.weight, emb[:10]) and torch.equal(model.lm_head.weight, head[:10])
    assert model.config.vocab_size == 10


def test_cross_attention_added_to_a_plain_checkpoint(tmp_path):
    plain = tiny()
    plain.save_pretrained(tmp_path / "p")
    model = GPT2LMHeadModel.from_pretrained(str(tmp_path / "p"), add_cross_attention=True)
    assert model.config.add_cross_attention is True and hasattr(model.transformer.h[0], "crossattention")
    assert torch.equal(model.transformer.wte.weight, plain.transformer.wte.weight)
    again = GPT2LMHeadModel.from_pretrained(str(tmp_path / "p"), dtype=torch.float64)
    assert again.transformer.wte.weight.dtype == torch.float64
    ids = torch.tensor([[3, 1, 4]])
    with torch.no_grad():
        assert _close(again.eval()(ids), reference(plain, ids))


def test_hub_layout_and_lora_targets(tmp_path):
    import re

    from safetensors.torch import load_file
    model = tiny(tie_word_embeddings=False)
    saved = load_file(str(model.save_pretrained(tmp_path / "m") / "model.safetensors"))
    for name, w in model.state_dict().items():  # Conv1D weights are stored (in, out): exactly hub_transposed's names
        conv = any(re.search(p, name) for p in GPT2LMHeadModel.hub_transposed)
        assert conv == (w.dim() == 2 and ".h." in name and "ln" not in name), name
        assert saved[name].shape == (w.T.shape if conv else w.shape), name
    assert saved["transformer.h.0.attn.c_attn.weight"].shape == (8, 24)
    # LoRA's default targets: every linear of the attention and MLP blocks, not the head
    linears = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".h." in n}
    assert set(GPT2LMHeadModel.lora_targets) == linears


def test_a_block_called_alone_is_causal():
    from minillm.attention import causal_mask
    model = tiny()
    block = model.transformer.h[0]
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        alone = block(x)
        assert torch.allclose(alone, block(x, mask=causal_mask(5)[None, None]), atol=1e-6)
        assert torch.allclose(alone[:, :3], block(x[:, :3]), atol=1e-6)  # the future does not leak back
