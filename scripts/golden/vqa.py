"""Golden part `vqa`: a cross-attention GPT-2 saved by minillm, read back by transformers.

The VQA decoder is a GPT-2 with cross-attention blocks. Here minillm builds one (seeded, every
parameter perturbed so that biases and layer norms are not at their trivial init), writes it
with minillm's save_pretrained, and transformers' GPT2LMHeadModel(add_cross_attention=True)
loads that directory and computes the logits for fixed encoder_hidden_states.

Writes
  weights/tiny-vqa-decoder/                 the checkpoint as minillm saved it
  tests/golden/vqa_decoder.safetensors      input_ids, attention_mask, encoder_hidden_states,
                                            encoder_attention_mask, transformers' logits
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from golden.common import seed_all, write_golden


def build_minillm_decoder(root: Path) -> Path:
    from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
    seed_all(4321)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, add_cross_attention=True,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = root / "weights" / "tiny-vqa-decoder"
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(str(d))
    return d


def make(root: Path) -> None:
    from transformers import GPT2LMHeadModel
    d = build_minillm_decoder(root)
    model = GPT2LMHeadModel.from_pretrained(str(d)).eval()
    assert model.config.add_cross_attention
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 64, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    enc = torch.randn(3, 5, 32, generator=g)
    enc_mask = torch.ones(3, 5, dtype=torch.long)
    enc_mask[2, 2:] = 0
    one = enc[:, :1]  # the book's fused vector: a one-token encoder sequence
    with torch.no_grad():
        t = {"input_ids": ids, "attention_mask": mask, "encoder_hidden_states": enc, "encoder_attention_mask": enc_mask,
             "logits_one_token": model(ids, encoder_hidden_states=one).logits,
             "logits_padded": model(ids, attention_mask=mask, position_ids=pos, encoder_hidden_states=enc,
                                    encoder_attention_mask=enc_mask).logits}
    write_golden(root, "vqa_decoder", t, {"source": "transformers GPT2LMHeadModel reading minillm's save_pretrained",
                                          "checkpoint": "weights/tiny-vqa-decoder"})
