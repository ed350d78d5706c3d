"""Golden part `lora`: peft LoRA adapters on the tiny GPT-2 (transformers), and peft's outputs.

Needs the `gpt2` part's weights/tiny-gpt2. Writes
  weights/tiny-gpt2-lora/       a peft adapter (r=4, alpha=8, c_attn/c_proj/c_fc, fan_in_fan_out=True
                                as peft sets for GPT-2's Conv1D), lora_B random so it changes outputs
  weights/tiny-gpt2-lora-rs/    a second adapter: rsLoRA, r=8, alpha=16, a regex target (attention c_attn only)
  tests/golden/lora.safetensors input_ids, attention_mask, base logits, logits with each adapter,
                                logits after peft's merge_and_unload, and QLoRA logits: the first
                                adapter on bitsandbytes NF4 Linear4bit layers (block 64, fp32 compute)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from golden.common import seed_all, write_golden


def _fix_config(d: Path) -> None:
    """Keep the files reproducible: a relative base path, sorted targets, no generated README."""
    (d / "README.md").unlink(missing_ok=True)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "weights/tiny-gpt2"
    if isinstance(cfg["target_modules"], list):
        cfg["target_modules"] = sorted(cfg["target_modules"])  # peft keeps a set: its order varies per run
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _randomize_b(model, g) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def make(root: Path) -> None:
    import bitsandbytes as bnb
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2LMHeadModel

    base_dir = root / "weights" / "tiny-gpt2"
    seed_all(11)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 512, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # minillm's positions for left padding
    t = {"input_ids": ids, "attention_mask": mask}

    def logits(m):
        with torch.no_grad():
            return m(ids).logits, m(ids, attention_mask=mask, position_ids=pos).logits

    base = GPT2LMHeadModel.from_pretrained(base_dir).eval()
    t["base_logits"], _ = logits(base)

    adapters = {
        "tiny-gpt2-lora": LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                     fan_in_fan_out=True, lora_dropout=0.05, task_type="CAUSAL_LM"),
        "tiny-gpt2-lora-rs": LoraConfig(r=8, lora_alpha=16, target_modules=r".*\.attn\.c_attn", use_rslora=True,
                                        fan_in_fan_out=True, task_type="CAUSAL_LM"),
    }
    for name, cfg in adapters.items():
        torch.manual_seed(12)
        pm = get_peft_model(GPT2LMHeadModel.from_pretrained(base_dir), cfg)
        _randomize_b(pm, g)
        pm.eval()
        d = root / "weights" / name
        shutil.rmtree(d, ignore_errors=True)
        pm.save_pretrained(d)
        _fix_config(d)
        key = name.replace("tiny-gpt2-", "").replace("-", "_")
        t[f"{key}_logits"], t[f"{key}_logits_masked"] = logits(pm)
        merged = pm.merge_and_unload().eval()
        t[f"{key}_merged_logits"], _ = logits(merged)

    # QLoRA: GPT-2's Conv1D layers replaced by bitsandbytes NF4 Linear4bit (weight = Conv1D weightᵀ),
    # then the first adapter loaded by peft onto them (peft's bnb LoRA layer; fan_in_fan_out off).
    qbase = GPT2LMHeadModel.from_pretrained(base_dir).eval()
    for n, m in list(qbase.named_modules()):
        if type(m).__name__ != "Conv1D":
            continue
        w = m.weight.detach().t().contiguous()  # (out, in)
        q = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=True, compute_dtype=torch.float32,
                              quant_type="nf4", compress_statistics=False)
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64,
                                     compress_statistics=False)  # no double quantization (Params4bit's default is on)
        q.bias = torch.nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        parent, _, child = n.rpartition(".")
        setattr(qbase.get_submodule(parent), child, q.to("cpu"))
    qbase.is_loaded_in_4bit = True  # what transformers sets for a bitsandbytes 4-bit model; peft reads it
    qm = PeftModel.from_pretrained(qbase, root / "weights" / "tiny-gpt2-lora").eval()
    assert any(type(m).__module__.endswith("lora.bnb") for m in qm.modules()), "peft did not use its bnb LoRA layer"
    t["qlora_logits"], t["qlora_logits_masked"] = logits(qm)
    write_golden(root, "lora", t, {"source": "peft LoRA on transformers GPT2LMHeadModel; QLoRA with bitsandbytes "
                                             f"{bnb.__version__} Linear4bit", "checkpoint": "weights/tiny-gpt2"})
