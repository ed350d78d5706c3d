"""Llama / Mistral / Qwen2 (minillm/models/llama.py) against transformers, the KV cache with GQA, sharded
checkpoints (minillm/hub.py), LoRA / NF4 on Llama names, and the config checks."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minillm import hub
from minillm.generation import generate
from minillm.hub import CheckpointError
from minillm.models.llama import LlamaConfig, LlamaForCausalLM, rope_inv_freq

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
NAMES = ["tiny-llama", "tiny-llama-mqa", "tiny-mistral", "tiny-qwen2"]
TOL = 1e-4  # fp32 logits, max abs


def load(name="tiny-llama", **kw):
    return LlamaForCausalLM.from_pretrained(str(ROOT / "weights" / name), **kw).eval()


def copy_ckpt(tmp_path, name="tiny-llama"):
    d = tmp_path / name
    shutil.copytree(ROOT / "weights" / name, d)
    return d


def padded_positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


# ---------------- goldens (no reference library needed) ----------------

@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers_golden(name, use_sdpa):
    g = load_file(GOLDEN / f"llama_{name}.safetensors")
    model = load(name)
    model.config.use_sdpa = use_sdpa
    with torch.no_grad():
        assert (model(g["input_ids"]) - g["logits"]).abs().max() <= TOL
        # left padding: our positions come from the mask (the golden passed them explicitly); real tokens only
        padded = model(g["input_ids"], attention_mask=g["attention_mask"])
    real = g["attention_mask"].bool()
    assert (padded - g["logits_padded"])[real].abs().max() <= TOL


def test_the_goldens_cover_what_they_claim():
    """The configs the goldens pin: GQA / MQA, explicit head_dim, llama3 with all three frequency bands,
    linear scaling, biases (qwen2: q/k/v only), tied and untied heads."""
    cfgs = {n: load(n).config for n in NAMES}
    c = cfgs["tiny-llama"]
    assert (c.num_attention_heads, c.num_key_value_heads, c.tie_word_embeddings) == (4, 2, False)
    r = c.rope
    wavelen = 2 * torch.pi * r["rope_theta"] ** (torch.arange(0, c.head_dim, 2) / c.head_dim)  # before scaling
    L = r["original_max_position_embeddings"]
    assert r["rope_type"] == "llama3"
    assert (wavelen < L / r["high_freq_factor"]).any() and (wavelen > L / r["low_freq_factor"]).any()
    assert ((wavelen >= L / r["high_freq_factor"]) & (wavelen <= L / r["low_freq_factor"])).any()
    m = cfgs["tiny-llama-mqa"]
    assert m.num_key_value_heads == 1 and m.head_dim * m.num_attention_heads != m.hidden_size
    assert m.rope["rope_type"] == "linear" and m.tie_word_embeddings and m.attention_bias and m.mlp_bias
    q = load("tiny-qwen2").model.layers[0].self_attn
    assert q.q_proj.bias is not None and q.k_proj.bias is not None and q.o_proj.bias is None
    assert cfgs["tiny-qwen2"].tie_word_embeddings and cfgs["tiny-mistral"].model_type == "mistral"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-mqa"])
def test_left_padded_row_equals_unpadded_row(name):
    model = load(name)
    ids = torch.randint(0, 384, (1, 9), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([torch.ones(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model(ids)
        b = model(padded, attention_mask=mask)[:, 4:]
    assert (a - b).abs().max() < 1e-5


def test_positions_come_from_the_mask(monkeypatch):
    """RoPE depends on m − n only, so a constant shift of every position changes logits by rounding alone and
    the padded-row tests above cannot see which positions were used: look at them directly."""
    model = load()
    seen = []
    orig = model.model.rope_cos_sin
    monkeypatch.setattr(model.model, "rope_cos_sin", lambda pos, dtype: seen.append(pos.clone()) or orig(pos, dtype))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.ones(2, 5, dtype=torch.long), attention_mask=mask, cache=cache)
        model(torch.ones(2, 1, dtype=torch.long), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
              cache=cache)
    assert seen[0].tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]  # pads get 1, as transformers' generate does
    assert seen[1].tolist() == [[3], [5]]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_equals_transformers(name, use_cache):
    g = load_file(GOLDEN / f"llama_{name}.safetensors")
    with safe_open(str(GOLDEN / f"llama_{name}.safetensors"), "pt") as f:
        pad = json.loads(f.metadata()["info"])["pad_token_id"]
    out = generate(load(name), g["prompt_ids"], attention_mask=g["prompt_mask"], max_new_tokens=20,
                   eos_token_id=int(g["greedy_eos"]), pad_token_id=pad, use_cache=use_cache)
    assert torch.equal(out, g["greedy"])
    assert (out[:, g["prompt_ids"].shape[1]:] == g["greedy_eos"]).any(dim=1).sum() >= 1  # EOS fired somewhere


def test_logits_to_keep_is_the_last_positions_and_generation_asks_for_one():
    """logits_to_keep = k: the head reads the last k positions only (same logits); generate asks for 1, so the
    prefill's head sees (B, 1, C), as transformers' generate does; bad values are refused."""
    model = load("tiny-llama")
    ids = torch.randint(0, 384, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        for k in (1, 3, 7):
            torch.testing.assert_close(model(ids, logits_to_keep=k), full[:, -k:], atol=1e-6, rtol=1e-6)
        assert torch.equal(model(ids, logits_to_keep=0), full)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(ids, logits_to_keep=bad)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    for use_cache in (True, False):
        seen.clear()
        generate(model, ids, max_new_tokens=3, use_cache=use_cache)
        assert seen == [(2, 1, model.config.hidden_size)] * 3, seen
    hook.remove()


def test_cache_keeps_the_kv_heads_only():
    model = load("tiny-llama")  # 4 query heads, 2 kv heads, head_dim 16
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5]]), cache=cache)
    assert cache.keys[0].shape == (1, 2, 3, 16) and cache.values[1].shape == (1, 2, 3, 16)


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(["tiny-llama", "tiny-llama-mqa", "tiny-qwen2"]), split=st.integers(1, 9),
       pads=st.lists(st.integers(0, 5), min_size=2, max_size=2), use_sdpa=st.booleans(),
       seed=st.integers(0, 2**16))
def test_cached_equals_uncached(name, split, pads, use_sdpa, seed):
    """Any prompt split (one multi-token step, then chunks of 1-3 tokens) and any left padding: the
    cached logits equal the full forward's at real tokens (1e-5, fp32)."""
    model = _MODELS.setdefault(name, load(name))
    model.config.use_sdpa = use_sdpa
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 384, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_cache(3)  # smaller than needed: must grow
        parts, t = [model(ids[:, :split], attention_mask=mask[:, :split], cache=cache)], split
        while t < 10:
            n = int(torch.randint(1, 4, (), generator=g))
            parts.append(model(ids[:, t:t + n], attention_mask=mask[:, :t + n], cache=cache))
            t += n
    inc = torch.cat(parts, 1)
    assert (full - inc)[mask.bool()].abs().max() < 1e-5


_MODELS: dict = {}


# ---------------- save / load, shards ----------------

@pytest.mark.parametrize("name", NAMES)
def test_save_then_load_round_trips(tmp_path, name):
    model = load(name)
    model.save_pretrained(tmp_path / "m")
    saved = load_file(tmp_path / "m" / "model.safetensors")
    original = load_file(ROOT / "weights" / name / "model.safetensors")
    assert set(saved) == set(original)  # hub names; a tied head is not written twice
    assert all(torch.equal(saved[k], original[k]) for k in original)
    again = LlamaForCausalLM.from_pretrained(str(tmp_path / "m"))
    ids = torch.randint(0, 384, (2, 7))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def test_sharded_load_equals_single_file_load(tmp_path, monkeypatch):
    model = load("tiny-llama")
    model.save_pretrained(tmp_path / "s", max_shard_size=100_000)
    shards = sorted(p.name for p in (tmp_path / "s").glob("model-*.safetensors"))
    assert len(shards) >= 4 and not (tmp_path / "s" / "model.safetensors").exists()
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    # the streaming loader never builds the whole state dict in memory
    monkeypatch.setattr(hub, "load_safetensors", lambda *a: pytest.fail("whole-checkpoint read"))
    again = LlamaForCausalLM.from_pretrained(str(tmp_path / "s"))
    for (n, a), (m, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n == m and torch.equal(a, b), n


def _sharded(tmp_path):
    d = tmp_path / "s"
    load("tiny-llama").save_pretrained(d, max_shard_size=100_000)
    return d, json.loads((d / "model.safetensors.index.json").read_text())


def _write_index(d, index, text=None):
    (d / "model.safetensors.index.json").write_text(text if text is not None else json.dumps(index))


@pytest.mark.parametrize("shard,needle", [
    ("../outside.safetensors", "outside the checkpoint directory"),
    ("/tmp/abs.safetensors", "outside the checkpoint directory"),
    ("sub/../../x.safetensors", "outside the checkpoint directory"),
    ("model-00009-of-00009.safetensors", "is missing"),
])
def test_bad_shard_paths_refused(tmp_path, shard, needle):
    d, index = _sharded(tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((d / index["weight_map"]["model.norm.weight"]).read_bytes())
    index["weight_map"]["model.norm.weight"] = shard
    _write_index(d, index)
    with pytest.raises(CheckpointError, match=needle):
        LlamaForCausalLM.from_pretrained(str(d))
    with pytest.raises(CheckpointError, match=needle):  # the whole-dict reader checks the same
        hub.load_safetensors(d)


def test_symlinked_shard_outside_refused(tmp_path):
    d, index = _sharded(tmp_path)
    f = d / index["weight_map"]["model.norm.weight"]
    target = tmp_path / "elsewhere.safetensors"
    f.rename(target)
    f.symlink_to(target)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        LlamaForCausalLM.from_pretrained(str(d))


def test_tensor_listed_twice_refused(tmp_path):
    d, index = _sharded(tmp_path)
    text = json.dumps(index)
    first = index["weight_map"]["model.norm.weight"]
    other = next(v for v in index["weight_map"].values() if v != first)
    text = text.replace('"weight_map": {', f'"weight_map": {{"model.norm.weight": "{other}", ', 1)
    _write_index(d, index, text)
    with pytest.raises(CheckpointError, match="'model.norm.weight' listed twice"):
        LlamaForCausalLM.from_pretrained(str(d))


def test_tensor_in_two_shards_refused(tmp_path):
    d, index = _sharded(tmp_path)
    wm = index["weight_map"]
    a = wm["model.norm.weight"]
    b = next(v for v in wm.values() if v != a)
    part = load_file(d / b)
    part["model.norm.weight"] = load_file(d / a)["model.norm.weight"]
    save_file(part, str(d / b), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'model.norm.weight' is (also in shard|not listed for this shard)"):
        LlamaForCausalLM.from_pretrained(str(d))
    with pytest.raises(CheckpointError, match="'model.norm.weight' is also in another shard"):
        hub.load_safetensors(d)


def test_shard_missing_a_listed_tensor_refused(tmp_path):
    d, index = _sharded(tmp_path)
    f = d / index["weight_map"]["model.norm.weight"]
    part = load_file(f)
    del part["model.norm.weight"]
    save_file(part, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'model.norm.weight' is listed in .* does not hold it"):
        LlamaForCausalLM.from_pretrained(str(d))


def test_failed_sharded_load_leaves_model_untouched(tmp_path):
    """A bad tensor in the last shard: nothing of the earlier shards is copied either."""
    d, index = _sharded(tmp_path)
    last = sorted(set(index["weight_map"].values()))[-1]
    part = load_file(d / last)
    name = sorted(part)[0]
    part[name] = torch.zeros(3)
    save_file(part, str(d / last), metadata={"format": "pt"})
    model = LlamaForCausalLM(load("tiny-llama").config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"'{name}': expected shape"):
        hub.load_checkpoint_strict(model, d, prefix="model.")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("what,edit,needle", [
    ("missing", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    ("unexpected", lambda s: s.__setitem__("model.layers.0.extra", torch.zeros(2)), "unexpected tensor 'model.layers.0.extra'"),
    ("shape", lambda s: s.__setitem__("model.norm.weight", torch.ones(65)), "'model.norm.weight': expected shape (64,), found (65,)"),
    ("dtype", lambda s: s.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.long)), "'model.norm.weight': expected dtype torch.float32, found I64"),
])
def test_bad_tensors_named(tmp_path, what, edit, needle):
    d = copy_ckpt(tmp_path)
    state = load_file(d / "model.safetensors")
    edit(state)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        LlamaForCausalLM.from_pretrained(str(d))
    assert needle in str(e.value)


def test_base_checkpoint_and_old_inv_freq_buffers_load(tmp_path):
    """A LlamaModel checkpoint (no `model.` prefix, no head) plus old `rotary_emb.inv_freq` buffers, tied head."""
    d = copy_ckpt(tmp_path, "tiny-qwen2")
    state = {k.removeprefix("model."): v for k, v in load_file(d / "model.safetensors").items()}
    state["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    a, b = load("tiny-qwen2"), LlamaForCausalLM.from_pretrained(str(d))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_rope_scaling_spellings_agree(tmp_path):
    """transformers 4's `rope_scaling` + top-level `rope_theta` and transformers 5's `rope_parameters`."""
    d = copy_ckpt(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    p = cfg.pop("rope_parameters")
    cfg["rope_theta"] = p.pop("rope_theta")
    cfg["rope_scaling"] = {**p, "type": p.pop("rope_type")}
    (d / "config.json").write_text(json.dumps(cfg))
    a, b = load(), LlamaForCausalLM.from_pretrained(str(d))
    assert a.config.rope == b.config.rope
    ids = torch.randint(0, 384, (1, 20))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


# ---------------- config checks: clear errors before anything is allocated ----------------

BIG = dict(vocab_size=10**12, hidden_size=10**6, intermediate_size=10**7, num_hidden_layers=1000)


@pytest.mark.parametrize("edit,needle", [
    ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ({"num_attention_heads": 3, "head_dim": None}, "hidden_size=64 is not divisible by num_attention_heads=3"),
    ({"head_dim": 15}, "head_dim=15 must be even"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers must be a positive integer, got 2.0"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be a positive number"),
    ({"hidden_act": "tanhh"}, "activation 'tanhh' not supported"),
    ({"attention_bias": "yes"}, "attention_bias must be true or false"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "rope 'linear' needs factor >= 1"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                          "rope_theta": 1e4}}, "0 < low_freq_factor < high_freq_factor"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -5}}, "rope_theta must be a number > 1"),
])
def test_bad_config_values_clear_errors_before_allocation(tmp_path, edit, needle):
    d = copy_ckpt(tmp_path)
    cfg = {**json.loads((d / "config.json").read_text()), **edit}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: config: .*" + needle.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("+", r"\+").replace(".", r"\.")):
        LlamaForCausalLM.from_pretrained(str(d))
    # with sizes that would need terabytes, the same error comes at once: nothing was allocated first
    if not any(k in edit for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "head_dim")):
        (d / "config.json").write_text(json.dumps({**cfg, **BIG}))
        with pytest.raises(CheckpointError, match=needle.split("(")[0].split("'")[0]):
            LlamaForCausalLM.from_pretrained(str(d))


def test_other_model_types_refused(tmp_path):
    d = copy_ckpt(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma"}))
    with pytest.raises(CheckpointError, match="model_type 'gemma' is not one of"):
        LlamaForCausalLM.from_pretrained(str(d))
    cfg.pop("num_hidden_layers")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing required key\(s\) \['num_hidden_layers'\]"):
        LlamaForCausalLM.from_pretrained(str(d))


def test_sliding_window_refused_beyond_the_window():
    model = load("tiny-mistral")  # sliding_window 64: full causal attention is exact up to 64 positions
    with torch.no_grad():
        model(torch.zeros(1, 64, dtype=torch.long))
        with pytest.raises(ValueError, match="exceeds the sliding window 64"):
            model(torch.zeros(1, 65, dtype=torch.long))
        cache = model.new_cache()
        model(torch.zeros(1, 60, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="sequence length 65 exceeds the sliding window"):
            model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    qwen = load("tiny-qwen2", sliding_window=8)  # qwen2: the window applies only with use_sliding_window
    with torch.no_grad():
        qwen(torch.zeros(1, 20, dtype=torch.long))


def test_bad_inputs_clear_errors():
    model = load()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 384]]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 4))


# ---------------- resizing, checkpointing, dtypes ----------------

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_resize_token_embeddings_mean_init(name):
    model = load(name)
    old_e, old_h = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    model.resize_token_embeddings(387)
    e, h = model.model.embed_tokens.weight, model.lm_head.weight
    assert e.shape == h.shape == (387, 64) and torch.equal(e[:384], old_e) and torch.equal(h[:384], old_h)
    assert torch.allclose(e[384:], old_e.mean(0, keepdim=True).expand(3, -1))
    assert torch.allclose(h[384:], old_h.mean(0, keepdim=True).expand(3, -1))
    assert (h is e) == model.config.tie_word_embeddings
    assert model(torch.tensor([[386]])).shape == (1, 1, 387)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, attention_dropout=0.1)
    model = LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, 61, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0

    def grads():
        torch.manual_seed(123)
        logits = model(ids, attention_mask=mask)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 61), ids[:, 1:].reshape(-1))
        model.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    l0, g0 = grads()
    model.gradient_checkpointing_enable()
    l1, g1 = grads()
    torch.testing.assert_close(l1, l0, atol=0, rtol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-6, msg=n)


def test_checkpointed_qlora_keeps_the_recomputed_weight_for_backward(monkeypatch):
    """Under checkpointing a 4-bit layer dequantizes twice per step (first forward, recompute) instead of three
    times, with the same loss and gradients (dropout on: the recompute must replay its masks); the switch
    follows checkpointing whichever of the two is turned on first, and is off without it."""
    from minillm import nf4
    from minillm.lora import apply_lora
    calls = []
    real = nf4.dequantize_nf4
    monkeypatch.setattr(nf4, "dequantize_nf4", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))

    def build(checkpoint_first: bool):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).train()
        if checkpoint_first:
            model.gradient_checkpointing_enable()
        nf4.quantize_model(model)
        apply_lora(model, LlamaForCausalLM.lora_targets, r=4, alpha=8, dropout=0.2)
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.weight.requires_grad:
                nn.init.normal_(m.weight, std=0.2)  # B ≠ 0, so the gradients pass through the frozen weights
        return model

    def step(model):
        calls.clear()
        torch.manual_seed(7)
        loss = nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 61), ids[:, 1:].reshape(-1))
        loss.backward()
        return len(calls), loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    layers = lambda m: [x for x in m.modules() if isinstance(x, nf4.Linear4bit)]  # noqa: E731
    plain = build(False)
    assert not any(q.save_weight_for_backward for q in layers(plain))
    n0, l0, g0 = step(plain)
    # 14 forward + 11 backward: layer 0's q, k, v read the frozen embedding's output, whose gradient nobody needs
    assert n0 == 14 + 11
    for first, keep in ((True, True), (False, True), (True, False)):
        model = build(first)
        if not first:
            model.gradient_checkpointing_enable()
        assert all(q.save_weight_for_backward for q in layers(model))
        for q in layers(model):
            q.save_weight_for_backward = keep
        n1, l1, g1 = step(model)
        assert n1 == (2 * 14 if keep else 2 * 14 + 11), n1  # forward, recompute (and backward without the switch)
        assert torch.equal(l1, l0) and g1.keys() == g0.keys()
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5, msg=n)
    model.gradient_checkpointing_enable(False)
    assert not any(q.save_weight_for_backward for q in layers(model))


def test_bf16_load_keeps_rope_frequencies_in_fp32():
    model = load(dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(ids).float()
        want = load()(ids)
    assert model.model._inv_freq[ids.device].dtype == torch.float32
    assert (got - want).abs().max() < 0.1 * want.abs().max()  # bf16 rounding only


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_fast_paths_equal_the_autograd_forward(name, dtype, monkeypatch):
    """Without autograd the forward multiplies in place (RMSNorm, SwiGLU) and sends float32 products to
    oneDNN; with set_fast(False) it must equal the recorded forward bit for bit, and with it on, to float32
    rounding (bf16: nothing of ours to route, so bit for bit too)."""
    from minillm import linear as linear_mod
    from minillm.linear import set_fast
    monkeypatch.setattr(linear_mod, "ONEDNN_MIN_WEIGHT", 0)  # the tiny model's layers are below the size from
    # which oneDNN pays: route them anyway
    model = load(name, dtype=dtype)
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    set_fast(model, False)
    want = model(ids, attention_mask=mask).detach()  # grad mode on: the out-of-place products, F.linear
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask), want)
    set_fast(model, True)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        got = model(ids, attention_mask=mask)
    onednn = sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")
    if dtype == torch.bfloat16:
        assert torch.equal(got, want) and onednn == 0
    else:  # every linear, the head included: 7 per layer + 1; another summation order, float32 rounding apart
        assert (got - want).abs().max() <= 1e-5
        assert onednn == (7 * model.config.num_hidden_layers + 1 if linear_mod._ONEDNN_LINEAR is not None else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_model_gives_the_same_logits_and_tokens(dtype, monkeypatch):
    """Inside prepacked(model) every linear reads a packed W: bf16 logits bit for bit, float32 to rounding, and
    greedy generation (one-row products: another kernel in float32) the same tokens."""
    from minillm import linear as linear_mod
    from minillm.linear import prepacked
    if dtype not in linear_mod.PACKABLE or linear_mod._ONEDNN_LINEAR is None:
        pytest.skip("oneDNN cannot pack this dtype on this CPU")
    monkeypatch.setattr(linear_mod, "ONEDNN_MIN_WEIGHT", 0)  # pack the tiny model's layers too
    model = load("tiny-qwen2", dtype=dtype)
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.inference_mode():
        want, want_tokens = model(ids, attention_mask=mask), generate(model, ids, attention_mask=mask,
                                                                      max_new_tokens=8)
        with prepacked(model), torch.profiler.profile() as prof:
            got, got_tokens = model(ids, attention_mask=mask), generate(model, ids, attention_mask=mask,
                                                                        max_new_tokens=8)
    packed_calls = sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")
    assert packed_calls >= 2 * (7 * model.config.num_hidden_layers + 1)  # the forward and the prompt at least
    assert torch.equal(got_tokens, want_tokens)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        assert (got - want).abs().max() <= 1e-5


def test_rmsnorm_without_autograd_leaves_its_input_alone():
    from minillm.models.llama import RMSNorm
    norm = RMSNorm(8, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 8).to(dtype)
        before = x.clone()
        with torch.no_grad():
            y = norm.to(dtype)(x)
        assert torch.equal(x, before) and y.data_ptr() != x.data_ptr()
        h = x.float()
        assert torch.equal(y, norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype))


# ---------------- LoRA and NF4 on Llama names ----------------

def test_lora_targets_are_every_linear_but_the_head():
    from minillm.lora import apply_lora, lora_layers
    model = load()
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"}
    assert set(LlamaForCausalLM.lora_targets) == linear
    apply_lora(model, LlamaForCausalLM.lora_targets, r=4, alpha=8)
    assert len(lora_layers(model)) == 7 * 2


def test_qlora_bf16_compute_trains_only_the_adapters():
    from minillm.lora import apply_lora
    from minillm.nf4 import Linear4bit, quantize_model
    torch.manual_seed(0)
    model = load()
    quantize_model(model, compute_dtype=torch.bfloat16)  # the book's SAWYER QLoRA: NF4, bf16 compute, no double quant
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14 and isinstance(model.lm_head, nn.Linear)
    apply_lora(model, LlamaForCausalLM.lora_targets, r=8, alpha=16)
    model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 384, (4, 16))
    losses = []
    for _ in range(6):
        logits = model(ids)
        assert logits.dtype == torch.float32
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 384), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert losses[-1] < losses[0] - 0.5, losses


# ---------------- live comparisons against transformers / peft / bitsandbytes ----------------

LIVE = [
    ("llama", dict(num_hidden_layers=3, hidden_size=48, intermediate_size=80, num_attention_heads=6,
                   num_key_value_heads=6, vocab_size=97)),  # plain multi-head attention, default rope
    ("llama", dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=8, vocab_size=50, tie_word_embeddings=True, rope_theta=5e5,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    ("mistral", dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                     num_key_value_heads=1, vocab_size=70, head_dim=16)),
    ("qwen2", dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=70, use_sliding_window=False)),
]


def _hf_classes(tr, kind):
    return {"llama": (tr.LlamaConfig, tr.LlamaForCausalLM), "mistral": (tr.MistralConfig, tr.MistralForCausalLM),
            "qwen2": (tr.Qwen2Config, tr.Qwen2ForCausalLM)}[kind]


@pytest.mark.reference
@pytest.mark.parametrize("kind,cfg", LIVE)
def test_live_against_transformers(tmp_path, kind, cfg):
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    C, M = _hf_classes(tr, kind)
    hf = M(C(initializer_range=0.1, **cfg)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, cfg["vocab_size"], (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= TOL
        diff = ours(ids, attention_mask=mask) - hf(ids, attention_mask=mask, position_ids=padded_positions(mask)).logits
        assert diff[mask.bool()].abs().max() <= TOL
    ours.save_pretrained(tmp_path / "ours", max_shard_size=20_000)  # and back, sharded: transformers reads it
    back = M.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max() == 0


@pytest.mark.reference
def test_live_bf16_greedy_generation_equals_transformers(tmp_path):
    """In bf16, greedy tokens equal transformers' when both load the checkpoint in bf16 (rotary frequencies
    stay fp32 in both; transformers' `model.to(bfloat16)` would round its inv_freq buffer to bf16 too, and
    its tokens then drift from both). Both heads read the last position only (logits_to_keep=1)."""
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=8,
               num_key_value_heads=2, vocab_size=4096, bos_token_id=1, eos_token_id=2)
    tr.LlamaForCausalLM(tr.LlamaConfig(**cfg)).save_pretrained(tmp_path)
    hf = tr.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ours = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16).eval()
    assert hf.model.rotary_emb.inv_freq.dtype == torch.float32
    prompts = torch.randint(3, 4096, (6, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for prompt in prompts:
            prompt = prompt[None]
            want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, min_new_tokens=24,
                               do_sample=False, pad_token_id=0)
            assert torch.equal(generate(ours, prompt, max_new_tokens=24), want)


@pytest.mark.reference
@pytest.mark.parametrize("name", NAMES)
def test_saved_checkpoint_loads_in_transformers(tmp_path, name):
    tr = pytest.importorskip("transformers")
    model = load(name)
    model.save_pretrained(tmp_path / "m")
    hf = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(hf).__name__ == model.config.to_hub_dict()["architectures"][0]
    ids = torch.randint(0, 384, (2, 9))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= TOL


@pytest.mark.reference
def test_transformers_shards_load(tmp_path):
    tr = pytest.importorskip("transformers")
    hf = tr.LlamaForCausalLM.from_pretrained(ROOT / "weights" / "tiny-llama").eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    a, b = load(), LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.reference
def test_rope_frequencies_equal_transformers():
    tr = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for name in ("tiny-llama", "tiny-llama-mqa"):
        hf_cfg = tr.AutoConfig.from_pretrained(ROOT / "weights" / name)
        want, _ = ROPE_INIT_FUNCTIONS[hf_cfg.rope_parameters["rope_type"]](hf_cfg, "cpu")
        assert torch.equal(rope_inv_freq(load(name).config), want)


def _randomize_b(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.reference
def test_peft_adapter_both_ways(tmp_path):
    tr, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    from minillm.lora import apply_lora, load_adapter, save_adapter
    ids = torch.randint(0, 384, (2, 9))
    base = ROOT / "weights" / "tiny-llama"
    # peft -> minillm ("all-linear": every linear but the head, which peft writes out as full module names)
    torch.manual_seed(0)
    pm = peft.get_peft_model(tr.LlamaForCausalLM.from_pretrained(base),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    _randomize_b(pm, 1)
    pm.eval().save_pretrained(tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
    assert {t.rsplit(".", 1)[-1] for t in written} == set(LlamaForCausalLM.lora_targets)
    ours = load_adapter(load(), tmp_path / "peft")
    with torch.no_grad():
        want = pm(ids).logits
        assert (ours(ids) - want).abs().max() <= TOL
        assert (want - tr.LlamaForCausalLM.from_pretrained(base)(ids).logits).abs().max() > 1e-2  # the adapter matters
    # minillm -> peft
    torch.manual_seed(1)
    mine = apply_lora(load(), ["q_proj", "v_proj", "down_proj"], r=8, alpha=16)
    _randomize_b(mine, 2)
    save_adapter(mine, tmp_path / "ours")
    pm2 = peft.PeftModel.from_pretrained(tr.LlamaForCausalLM.from_pretrained(base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (pm2(ids).logits - mine(ids)).abs().max() <= TOL


@pytest.mark.reference
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_nf4_logits_equal_bitsandbytes(name):
    """Every linear but the head as NF4 (block 64, no double quantization, fp32 compute) in minillm and as
    bitsandbytes Linear4bit in transformers, same weights. 1e-4: the dequantized weights are bit-exact (see
    test_nf4), so only fp32 summation order differs. bitsandbytes' CPU AVX512-BF16 path computes in bf16;
    it is switched off to compare with its plain fp32 dequantize path (DESIGN.md)."""
    tr, bnb = pytest.importorskip("transformers"), pytest.importorskip("bitsandbytes")
    from minillm.nf4 import quantize_model
    hf = tr.AutoModelForCausalLM.from_pretrained(ROOT / "weights" / name).eval()
    n_q = 0
    for n, m in list(hf.named_modules()):
        if not isinstance(m, nn.Linear) or n == "lm_head":
            continue
        q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=torch.float32,
                              quant_type="nf4", compress_statistics=False)
        q.weight = bnb.nn.Params4bit(m.weight.detach().clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                     compress_statistics=False)
        if m.bias is not None:
            q.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        q = q.to("cpu")
        q.support_avx512bf16_for_cpu = False
        parent, _, child = n.rpartition(".")
        setattr(hf.get_submodule(parent), child, q)
        n_q += 1
    ours = quantize_model(load(name))
    assert n_q == 14
    ids = torch.randint(0, 384, (2, 10))
    with torch.no_grad():
        got, want = ours(ids), hf(ids).logits
        full = load(name)(ids)
    assert (got - want).abs().max() <= TOL
    assert (got - full).abs().max() > 1e-2  # and the 4-bit model is not the full-precision one
