"""Memory and compute calculator: the course's and the book's numbers, parameter counts of real models,
and the activation model against the tensors autograd actually saves."""

import pytest
import torch

from minillm.lora import apply_lora, count_parameters
from minillm.memory import (LLAMA3_8B, activation_bytes, chinchilla_tokens, decoder_shape, estimate_memory,
                            format_report, lora_parameter_count, lora_params, memory_report, parameter_count,
                            training_flops)
from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
from minillm.train.loop import causal_lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def test_course_one_billion_parameters():
    est = estimate_memory(params=1e9)
    assert est["weights"] == 4e9                      # 4 bytes/param in fp32
    assert est["gradients"] + est["optimizer"] + est["activations"] == 20e9  # ~20 extra bytes/param
    assert est["total"] == 24e9                       # ≈ 24 GB to train, about 6× the weights
    assert est["total"] / est["weights"] == 6


def test_course_lora_example_512x64_rank_8():
    assert lora_params(64, 512, 8) == 4_608 and 512 * 64 == 32_768


def test_llama3_8b_counts_and_the_books_qlora_number():
    counts = parameter_count(LLAMA3_8B)
    assert counts["total"] == 8_030_261_248           # Meta-Llama-3-8B
    qv = lora_parameter_count(LLAMA3_8B, r=128, target_modules=["q_proj", "v_proj"])
    assert qv == 54_525_952                           # the book's "54.5M trainable"
    assert round(100 * qv / (counts["total"] + qv), 2) == 0.67  # peft's percentage (of base + adapters)
    every = lora_parameter_count(LLAMA3_8B, r=128)    # all seven linear layers give six times more
    assert every == 335_544_320 and round(100 * every / (counts["total"] + every), 1) == 4.0
    est = estimate_memory(config=LLAMA3_8B, dtype="bf16", quantize="nf4", lora_r=128,
                          lora_targets=["q_proj", "v_proj"], batch=1, seq=512)
    nf4 = counts["linear"] * (0.5 + 4 / 64) + counts["other"] * 2  # NF4 blocks + bf16 embeddings/head/norms
    assert est["weights"] == pytest.approx(nf4 + qv * 4)
    assert 6.0e9 < nf4 < 6.1e9                         # ≈ 6.03 GB of weights (vs 16.06 GB in bf16)
    assert est["trainable"] == qv and est["optimizer"] == qv * 8


@pytest.mark.parametrize("cfg", [dict(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128),
                                 dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
                                 dict(vocab_size=100, n_embd=48, n_layer=3, n_head=4, n_positions=64, n_inner=100)])
def test_gpt2_parameter_count_equals_the_model(cfg):
    if cfg["n_embd"] == 768:
        assert parameter_count(cfg)["total"] == 124_439_808  # GPT-2 small
        return
    m = GPT2LMHeadModel(GPT2Config(**cfg))
    assert parameter_count(cfg)["total"] == count_parameters(m)[1]
    apply_lora(m, ["c_attn", "c_proj", "c_fc"], r=4)
    assert lora_parameter_count(cfg, 4, ["c_attn", "c_proj", "c_fc"]) == count_parameters(m)[0]
    assert lora_parameter_count(cfg, 4) == count_parameters(m)[0]


def test_compute_rules():
    assert training_flops(1e9, 2e10) == 1.2e20
    assert chinchilla_tokens(70e9) == 1.4e12


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for backward in one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, {"input_ids": ids, "labels": ids})
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_model_matches_what_autograd_saves(dropout):
    torch.manual_seed(0)
    cfg = dict(vocab_size=300, n_embd=64, n_layer=3, n_head=4, n_positions=64, resid_pdrop=dropout,
               embd_pdrop=dropout, attn_pdrop=dropout)
    m = GPT2LMHeadModel(GPT2Config(**cfg)).train()
    B, T = 2, 48
    got = saved_bytes(m, torch.randint(0, 300, (B, T)))
    act = activation_bytes(cfg, batch=B, seq=T)
    want = act["layers"] + 300 * 4 * B * T  # the layers + the saved fp32 log-softmax (the head's gradients come later)
    assert abs(want / got - 1) < 0.05, (want, got)


def test_gradient_checkpointing_and_lora_shrink_the_estimate():
    cfg = dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)
    full = estimate_memory(config=cfg, batch=4, seq=512)
    ckpt = estimate_memory(config=cfg, batch=4, seq=512, gradient_checkpointing=True)
    lora = estimate_memory(config=cfg, batch=4, seq=512, lora_r=8)
    assert ckpt["activations"] < full["activations"] / 2  # the LM head (3·V per token) is not checkpointed
    assert lora["gradients"] < full["gradients"] / 50 and lora["optimizer"] < full["optimizer"] / 50
    assert full["peak"] <= full["total"]
    assert decoder_shape(GPT2Config(**cfg)).hidden == 768


def test_report_and_errors(tmp_path):
    text = memory_report("tiny-gpt2", batch=2, seq=64)
    assert "weights" in text and "Chinchilla" in text
    assert "24.00 GB" in format_report(estimate_memory(params=1e9))
    with pytest.raises(ValueError, match="dtype"):
        estimate_memory(params=1e9, dtype="fp7")
    with pytest.raises(ValueError, match="QLoRA"):
        estimate_memory(config=LLAMA3_8B, quantize="nf4")
    with pytest.raises(ValueError, match="params"):
        estimate_memory()
