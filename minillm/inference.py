"""Text in, text out: load a causal LM (or encoder-decoder) checkpoint and its tokenizer, generate, decode.

The whole path a practitioner runs to try a model: resolve the checkpoint (models/auto.py reads its
model_type), tokenize the prompt (left padding, so the last real token sits in the last column),
generate (generation.py: greedy or sampled, KV cache), decode without special tokens. A causal LM
continues the prompt (the prompt is part of the output); an encoder-decoder (T5) reads the prompt
with its encoder and writes a new text ("summarize: ..." → the summary).

Source: transformers' `pipeline("text-generation")`, reduced to its steps.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from minillm.generation import generate
from minillm.linear import prepacked
from minillm.models.auto import KINDS, load_model, model_type
from minillm.tokenizer import Tokenizer
from minillm.train.device import pick_device


def generate_text(model: str, prompt: str, max_new_tokens: int = 20, do_sample: bool = False,
                  temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  seed: int = 0, device: Optional[str] = None, prepack: bool = False) -> str:
    """A causal LM: the prompt's continuation (prompt included); an encoder-decoder: its output text.
    prepack: on CPU, generate inside linear.prepacked (big weights packed once: faster decoding steps,
    one more copy of those weights in memory)."""
    torch.manual_seed(seed)
    dev = pick_device(device)
    _, mt = model_type(model)
    lm = load_model(model, "seq2seq" if mt in KINDS["seq2seq"] else "causal-lm", device=dev).eval()
    tok = Tokenizer.from_pretrained(model)
    enc = tok([prompt], padding_side="left")
    with prepacked(lm) if prepack else contextlib.nullcontext():
        out = generate(lm, enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev),
                       max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                       top_p=top_p, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0], skip_special_tokens=True)
