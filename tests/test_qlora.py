"""QLoRA: LoRA on frozen NF4 Linear4bit layers — peft + bitsandbytes golden, training, merging."""

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from minillm.linear import Linear  # the plain linear merging leaves
from minillm.lora import (LoRALinear, apply_lora, load_adapter, merge_and_unload, merge_lora, trainable_report,
                          unmerge_lora)
from minillm.models.gpt2 import GPT2LMHeadModel
from minillm.nf4 import Linear4bit, dequantize_nf4, quantize_model, quantize_nf4

ROOT = Path(__file__).resolve().parent.parent


def qlora_model(r=8, double_quant=False):
    model = GPT2LMHeadModel.from_pretrained("tiny-gpt2").eval()
    quantize_model(model, double_quant=double_quant)
    return apply_lora(model, ["c_attn", "c_proj", "c_fc"], r=r, alpha=2 * r)


def test_qlora_matches_peft_on_bitsandbytes():
    with safe_open(str(ROOT / "tests" / "golden" / "lora.safetensors"), "pt") as f:
        g = {k: f.get_tensor(k) for k in f.keys()}
    model = GPT2LMHeadModel.from_pretrained("tiny-gpt2").eval()
    quantize_model(model)  # NF4, block 64, no double quantization, as the golden's bitsandbytes layers
    load_adapter(model, ROOT / "weights" / "tiny-gpt2-lora")
    assert all(isinstance(m.base_layer, Linear4bit) for m in model.modules() if isinstance(m, LoRALinear))
    mask = g["attention_mask"]
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        # fp32, 1e-5: identical NF4 weights (bit-exact) + the same LoRA math as peft's bnb layer
        torch.testing.assert_close(model(g["input_ids"]), g["qlora_logits"], atol=1e-5, rtol=1e-5)
        got = model(g["input_ids"], attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(got[mask.bool()], g["qlora_logits_masked"][mask.bool()], atol=1e-5, rtol=1e-5)
    # the 4-bit model differs from the full-precision adapter model by the quantization error
    assert (g["qlora_logits"] - g["lora_logits"]).abs().max() > 1e-3


@pytest.mark.parametrize("double_quant", [False, True])
def test_gradients_reach_only_lora(double_quant):
    model = qlora_model(double_quant=double_quant).train()
    ids = torch.randint(0, 512, (2, 8))
    logits = model(ids)
    nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1)).backward()
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    others = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
    assert len(lora) == 2 * 4 * 2 and others
    assert all(p.grad is not None for _, p in lora)
    assert all(p.grad.abs().sum() > 0 for n, p in lora if "lora_B" in n)  # B = 0 at start: only B moves first
    assert all(p.grad is None and not p.requires_grad for _, p in others)
    assert not any(b.requires_grad for b in model.buffers())  # the NF4 weights are buffers


@pytest.mark.parametrize("dq", [False, True])
def test_linear4bit_gradients_equal_dequantized_linear(dq):
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(40, 24), blocksize=32, double_quant=dq)
    w = q.dequantize_weight()
    x = torch.randn(3, 5, 40, requires_grad=True)
    g = torch.randn(3, 5, 24)
    (q(x) * g).sum().backward()
    gx, gb = x.grad.clone(), q.bias.grad.clone()
    x.grad = None
    b = q.bias.detach().clone().requires_grad_(True)
    (nn.functional.linear(x, w, b) * g).sum().backward()
    # fp32: the same products, possibly summed in another order -> 1e-6
    torch.testing.assert_close(gx, x.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gb, b.grad, atol=1e-6, rtol=1e-6)


def test_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = qlora_model().train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 512, (4, 16))
    losses = []
    for _ in range(8):
        logits = model(ids)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # memorizing one batch: the loss must fall clearly (the tiny model starts near ln 512 ≈ 6.2)
    assert losses[-1] < losses[0] - 0.5, losses
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers())


def test_trainable_report_counts_4bit_weights():
    model = qlora_model(r=8)
    full = GPT2LMHeadModel.from_pretrained("tiny-gpt2")
    total = sum(p.numel() for p in full.parameters())  # tied head counted once
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora == 2 * (8 * (64 + 192) + 8 * (64 + 64) + 8 * (64 + 256) + 8 * (256 + 64))
    assert trainable_report(model) == f"trainable {lora:,} of {total + lora:,} ({100 * lora / (total + lora):.2f}%)"


def test_merge_into_4bit_warns_and_requantizes():
    torch.manual_seed(0)
    model = qlora_model()
    layer = model.transformer.h[0].attn.c_attn
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    w_before = layer.base_layer.dequantize_weight()
    ids = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        unmerged = model(ids)
        with pytest.warns(UserWarning, match="re-quantizes"):
            merge_lora(model)
        merged = model(ids)
    # the merged layer holds NF4(W_nf4 + ΔW): bit-exact with quantizing that sum directly
    want, st = quantize_nf4(w_before + layer.delta_weight(), 64)
    assert torch.equal(layer.base_layer.weight_packed, want)
    assert torch.equal(layer.base_layer.dequantize_weight(), dequantize_nf4(want, st))
    # lossy: close to, but not equal to, the unmerged output
    assert not torch.equal(merged, unmerged)
    assert (merged - unmerged).abs().max() < 0.5 * unmerged.abs().max()
    with pytest.warns(UserWarning, match="re-quantizes"):
        unmerge_lora(model)


def test_full_precision_merge_does_not_warn():
    model = apply_lora(GPT2LMHeadModel.from_pretrained("tiny-gpt2"), ["c_attn"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_lora(model)


def test_merge_and_unload_dequantizes_without_second_rounding():
    """QLoRA merge_and_unload: W = dequant(W_nf4) + (α/r)·B A in float32 — no re-quantization, so the plain
    model equals the 4-bit adapter model (1e-5) where merging into a 4-bit layer would not."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained("tiny-gpt2").eval()
    quantize_model(model)
    apply_lora(model, ["c_attn"], r=4, alpha=8)  # c_proj, c_fc: 4-bit layers without an adapter
    plain_w = {n + ".weight": m.dequantize_weight(torch.float32) for n, m in model.named_modules()
               if isinstance(m, Linear4bit) and not n.endswith("base_layer")}
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B.weight, std=0.1)
    want_w = {n.replace(".base_layer", "") + ".weight": m.base_layer.dequantize_weight(torch.float32)
              + m.delta_weight().detach() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    ids = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        want = model(ids)
        merge_and_unload(model)
        got = model(ids)
    assert not any(isinstance(m, (LoRALinear, Linear4bit)) for m in model.modules())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    sd = model.state_dict()
    for k, w in want_w.items():
        assert torch.equal(sd[k], w), k  # the same float32 sum, bit for bit
    for k, w in plain_w.items():
        assert torch.equal(sd[k], w), k  # layers without an adapter come back dequantized
    assert all(type(m) is Linear for n, m in model.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc")))
    assert set(sd) == set(GPT2LMHeadModel.from_pretrained("tiny-gpt2").state_dict())
