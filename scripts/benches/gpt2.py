"""Bench area `gpt2`: forward latency and greedy generation, minillm vs transformers (sdpa),
same GPT-2-124M-config checkpoint (random weights), fp32, same device and threads."""

from __future__ import annotations

import tempfile

import torch

from bench import interleaved, row


def run(args) -> list[dict]:
    import transformers as tr

    from minillm.generation import generate
    from minillm.models.gpt2 import GPT2LMHeadModel

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        hf = tr.GPT2LMHeadModel(tr.GPT2Config(attn_implementation="sdpa")).eval()
        hf.save_pretrained(d)
        ours = GPT2LMHeadModel.from_pretrained(d).eval().to(dev)
    hf = hf.to(dev)
    rows = []
    for B, T in ((1, 128), (4, 256)):
        ids = torch.randint(0, 50257, (B, T), device=dev)
        with torch.inference_mode():
            t_ours, t_ref = interleaved(lambda: ours(ids), lambda: hf(ids, use_cache=False).logits,
                                        repeat=args.repeat, sync=sync)
        rows.append(row(f"GPT-2 124M forward {B}x{T}", t_ours * 1e3, t_ref * 1e3, "ms", target=1.0))
    prompt = torch.randint(0, 50257, (1, 16), device=dev)
    new = 128
    with torch.inference_mode():
        a = generate(ours, prompt, max_new_tokens=new)
        b = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)
        same = torch.equal(a, b)
        t_ours, t_ref = interleaved(
            lambda: generate(ours, prompt, max_new_tokens=new),
            lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, pad_token_id=0),
            repeat=max(2, args.repeat // 2), sync=sync)
    rows.append(row(f"GPT-2 124M greedy generation, {new} new tokens", new / t_ours, new / t_ref, "tokens/s",
                    better="higher", target=1.0, note="same tokens" if same else "TOKENS DIFFER"))
    return rows
