"""Text in, text out: load a causal LM checkpoint and its tokenizer, continue a prompt, decode.

The whole path a practitioner runs to try a model: resolve the checkpoint (models/auto.py reads its
model_type), tokenize the prompt (left padding, so the last real token sits in the last column),
generate (generation.py: greedy or sampled, KV cache), decode without special tokens.

Source: transformers' `pipeline("text-generation")`, reduced to its steps.
"""

from __future__ import annotations

from typing import Optional

import torch

from minillm.generation import generate
from minillm.models.auto import load_model
from minillm.tokenizer import Tokenizer
from minillm.train.device import pick_device


def generate_text(model: str, prompt: str, max_new_tokens: int = 20, do_sample: bool = False,
                  temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  seed: int = 0, device: Optional[str] = None) -> str:
    """The prompt's continuation (prompt included), as text."""
    torch.manual_seed(seed)
    dev = pick_device(device)
    lm = load_model(model, "causal-lm", device=dev).eval()
    tok = Tokenizer.from_pretrained(model)
    enc = tok([prompt], padding_side="left")
    out = generate(lm, enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev),
                   max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                   top_p=top_p, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0], skip_special_tokens=True)
