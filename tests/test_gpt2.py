"""GPT-2 (minillm/models/gpt2.py) against transformers' outputs, and the loader's errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minillm.hub import CheckpointError
from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
NAMES = ["tiny-gpt2", "tiny-gpt2-relu", "tiny-gpt2-cross"]
TOL = 1e-4  # fp32 logits, max abs


def load(name, **kw):
    return GPT2LMHeadModel.from_pretrained(str(ROOT / "weights" / name), **kw).eval()


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers_golden(name, use_sdpa):
    g = load_file(GOLDEN / f"gpt2_{name}.safetensors")
    model = load(name)
    model.config.use_sdpa = use_sdpa
    kw = {"encoder_hidden_states": g["encoder_hidden_states"]} if "encoder_hidden_states" in g else {}
    with torch.no_grad():
        assert (model(g["input_ids"], **kw) - g["logits"]).abs().max() <= TOL
        # left padding: positions come from the mask; compare at real tokens only
        padded = model(g["input_ids"], attention_mask=g["attention_mask"], **kw)
        real = g["attention_mask"].bool()
        assert (padded - g["logits_padded"])[real].abs().max() <= TOL
        if "logits_enc_mask" in g:
            out = model(g["input_ids"], encoder_hidden_states=g["encoder_hidden_states"],
                        encoder_attention_mask=g["encoder_attention_mask"])
            assert (out - g["logits_enc_mask"]).abs().max() <= TOL


def test_left_padded_row_equals_unpadded_row():
    model = load("tiny-gpt2")
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model(ids)
        b = model(padded, attention_mask=mask)[:, 4:]
    assert (a - b).abs().max() < 1e-5


def test_cached_equals_uncached():
    model = load("tiny-gpt2")
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_cache(4)  # smaller than needed: must grow
        parts = [model(ids[:, :6], attention_mask=mask[:, :6], cache=cache)]
        for t in range(6, 10):
            parts.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
        inc = torch.cat(parts, 1)
    real = mask.bool()
    assert (full - inc)[real].abs().max() < 1e-5


def test_save_then_load_round_trips(tmp_path):
    model = load("tiny-gpt2-relu")
    model.save_pretrained(tmp_path / "m")
    again = GPT2LMHeadModel.from_pretrained(str(tmp_path / "m"))
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    saved = load_file(tmp_path / "m" / "model.safetensors")
    original = load_file(ROOT / "weights" / "tiny-gpt2-relu" / "model.safetensors")
    assert set(saved) == set(original)  # same names as the hub layout, Conv1D transposed back
    assert all(torch.equal(saved[k], original[k]) for k in original)
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def test_resize_token_embeddings_mean_init():
    model = load("tiny-gpt2")
    old = model.transformer.wte.weight.detach().clone()
    model.resize_token_embeddings(515)
    w = model.transformer.wte.weight
    assert w.shape == (515, 64) and torch.equal(w[:512], old)
    assert torch.allclose(w[512:], old.mean(0, keepdim=True).expand(3, -1))
    assert model.lm_head.weight is w  # still tied
    assert model(torch.tensor([[514]])).shape == (1, 1, 515)


# ---------------- loader errors: one clear error, model untouched ----------------

def copy_ckpt(tmp_path, name="tiny-gpt2"):
    d = tmp_path / name
    shutil.copytree(ROOT / "weights" / name, d)
    return d


def edit_tensors(d, fn):
    state = load_file(d / "model.safetensors")
    fn(state)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("what,edit,needle", [
    ("missing", lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"), "missing tensor 'transformer.h.1.mlp.c_fc.bias'"),
    ("unexpected", lambda s: s.__setitem__("transformer.h.0.attn.extra", torch.zeros(2)), "unexpected tensor 'transformer.h.0.attn.extra'"),
    ("shape", lambda s: s.__setitem__("transformer.h.0.ln_1.weight", torch.ones(65)), "'transformer.h.0.ln_1.weight': expected shape (64,), found (65,)"),
])
def test_bad_tensors_named(tmp_path, what, edit, needle):
    d = copy_ckpt(tmp_path)
    edit_tensors(d, edit)
    with pytest.raises(CheckpointError) as e:
        GPT2LMHeadModel.from_pretrained(str(d))
    assert needle in str(e.value)


def test_failed_load_leaves_model_untouched(tmp_path):
    from minillm import hub
    d = copy_ckpt(tmp_path)
    state = load_file(d / "model.safetensors")
    state["transformer.h.1.ln_2.bias"] = torch.zeros(3)  # the last tensor in order is bad, earlier ones fine
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        hub.load_state_dict_strict(model, state, prefix="transformer.", transpose=[r"\.(c_attn|c_proj|c_fc)\.weight$"],
                                   ignore_unexpected=[r"\.attn\.bias$"], optional=[r"^lm_head\.weight$"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_base_model_checkpoint_without_prefix_loads(tmp_path):
    """The hub's `gpt2` repo stores GPT2Model names (`h.0...`, no `transformer.`) plus `attn.bias` buffers."""
    d = copy_ckpt(tmp_path)
    def strip(s):
        for k in list(s):
            s[k.removeprefix("transformer.")] = s.pop(k)
        s["h.0.attn.bias"] = torch.ones(1, 1, 128, 128)
    edit_tensors(d, strip)
    a, b = load("tiny-gpt2"), GPT2LMHeadModel.from_pretrained(str(d))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_truncated_file_named(tmp_path):
    d = copy_ckpt(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        GPT2LMHeadModel.from_pretrained(str(d))


def test_config_that_does_not_match(tmp_path):
    d = copy_ckpt(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_embd"] = 32
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="expected shape"):
        GPT2LMHeadModel.from_pretrained(str(d))
    cfg.pop("n_layer")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing required key\(s\) \['n_layer'\]"):
        GPT2LMHeadModel.from_pretrained(str(d))
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not gpt2"):
        GPT2LMHeadModel.from_pretrained(str(d))


def test_pickle_checkpoint_refused(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(ROOT / "weights" / "tiny-gpt2" / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle"):
        GPT2LMHeadModel.from_pretrained(str(d))


def test_missing_checkpoint_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not found.*huggingface-cli download"):
        GPT2LMHeadModel.from_pretrained("no-such-org/no-such-model-xyz")


def test_bad_inputs_clear_errors():
    model = load("tiny-gpt2")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="no cross-attention"):
        model(torch.zeros(1, 3, dtype=torch.long), encoder_hidden_states=torch.zeros(1, 2, 64))


def test_logits_to_keep_is_the_last_positions():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4)).eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(model(ids, logits_to_keep=2), full[:, -2:], atol=1e-6, rtol=1e-6)
    assert model(ids, logits_to_keep=2).shape == (2, 2, 50)


def _grads(model, ids, mask, enc):
    torch.manual_seed(123)  # the same dropout masks on both runs
    logits = model(ids, attention_mask=mask, encoder_hidden_states=enc)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cross,lora", [(False, False), (True, False), (False, True)])
def test_gradient_checkpointing_same_gradients(cross, lora):
    """Dropout on (p = 0.1): checkpointed gradients equal the plain ones (1e-6 fp32; the recomputation
    replays the dropout masks), also with cross-attention and with LoRA on frozen weights (inputs that
    need no grad: use_reentrant=False still reaches the adapters)."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=61, n_embd=32, n_layer=3, n_head=4, n_positions=24, add_cross_attention=cross)
    model = GPT2LMHeadModel(cfg).train()
    if lora:
        from minillm.lora import apply_lora
        apply_lora(model, ["c_attn", "c_fc"], r=4, alpha=8, dropout=0.1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 61, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    enc = torch.randn(2, 5, 32) if cross else None
    loss0, g0 = _grads(model, ids, mask, enc)
    model.gradient_checkpointing_enable()
    loss1, g1 = _grads(model, ids, mask, enc)
    assert set(g0) == set(g1) and len(g0) > 0
    assert all("lora_" in n for n in g1) == lora
    torch.testing.assert_close(loss1, loss0, atol=0, rtol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-6, msg=n)


def test_gradient_checkpointing_saves_less_for_backward():
    """The tensors autograd keeps for backward (counted with saved_tensors_hooks): with checkpointing only
    each block's input survives the forward, well under half of the plain path's for 4 layers."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=64, n_layer=4, n_head=4, n_positions=64)).train()
    ids = torch.randint(0, 64, (4, 64))

    def saved_bytes():
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids).sum().backward()
        return sum(seen.values())
    plain = saved_bytes()
    model.gradient_checkpointing_enable()
    ckpt = saved_bytes()
    assert 0 < ckpt < 0.5 * plain, (ckpt, plain)


# ---------------- live comparisons against transformers (skipped without it) ----------------

CONFIGS = [
    dict(n_layer=3, n_embd=48, n_head=6, vocab_size=97, n_positions=40),
    dict(n_layer=1, n_embd=16, n_head=1, vocab_size=50, n_positions=20, activation_function="gelu"),
    dict(n_layer=2, n_embd=24, n_head=3, vocab_size=70, n_positions=30, add_cross_attention=True,
         scale_attn_weights=False),
]


@pytest.mark.reference
@pytest.mark.parametrize("cfg", CONFIGS)
def test_live_against_transformers(tmp_path, cfg):
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = tr.GPT2LMHeadModel(tr.GPT2Config(bos_token_id=0, eos_token_id=0, initializer_range=0.1, **cfg)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, cfg["vocab_size"], (2, 11))
    kw = {"encoder_hidden_states": torch.randn(2, 4, cfg["n_embd"])} if cfg.get("add_cross_attention") else {}
    with torch.no_grad():
        assert (ours(ids, **kw) - hf(ids, **kw).logits).abs().max() <= 1e-4
    ours.save_pretrained(tmp_path / "ours")  # and back: transformers loads what minillm writes
    back = tr.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(ids, **kw).logits - hf(ids, **kw).logits).abs().max() == 0


@pytest.mark.reference
def test_live_real_124m_config(tmp_path):
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = tr.GPT2LMHeadModel(tr.GPT2Config()).eval()  # the real gpt2 config, random weights
    hf.save_pretrained(tmp_path / "hf")
    ours = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max()
    assert diff <= 1e-3, diff  # fp32, the bar for the full-size config
