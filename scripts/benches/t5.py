"""Bench area `t5`: forward latency and greedy generation, minillm vs transformers (sdpa), same
FLAN-T5-small-config checkpoint (d_model 512, 8+8 layers, 6 heads × d_kv 64, gated-GELU d_ff 1024,
vocab 32128; random weights), fp32, same device and threads."""

from __future__ import annotations

import tempfile

import torch

from bench import interleaved, row

FLAN_T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                     feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)


def run(args) -> list[dict]:
    import transformers as tr

    from minillm.generation import generate
    from minillm.models.t5 import T5ForConditionalGeneration

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        hf = tr.T5ForConditionalGeneration(tr.T5Config(attn_implementation="sdpa", **FLAN_T5_SMALL)).eval()
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(32128, 512))  # FLAN-T5's own head (transformers 5 ties)
        hf.save_pretrained(d)
        ours = T5ForConditionalGeneration.from_pretrained(d).eval().to(dev)
    hf = hf.to(dev)
    rows = []
    for B, S, T in ((1, 128, 32), (4, 256, 64)):
        ids = torch.randint(0, 32128, (B, S), device=dev)
        dec = torch.randint(0, 32128, (B, T), device=dev)
        with torch.inference_mode():
            t_ours, t_ref = interleaved(lambda: ours(ids, decoder_input_ids=dec),
                                        lambda: hf(input_ids=ids, decoder_input_ids=dec, use_cache=False).logits,
                                        repeat=args.repeat, sync=sync)
        rows.append(row(f"FLAN-T5-small forward {B}x{S} -> {T}", t_ours * 1e3, t_ref * 1e3, "ms", target=1.0))
    prompt = torch.randint(2, 32128, (1, 64), device=dev)
    new = 64
    hf.generation_config.eos_token_id = None  # both sides make exactly `new` tokens
    ours_gen = lambda: generate(ours, prompt, max_new_tokens=new, eos_token_id=-1)  # -1: no token ends a row
    ref_gen = lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        same = torch.equal(ours_gen(), ref_gen())
        t_ours, t_ref = interleaved(ours_gen, ref_gen, repeat=max(2, args.repeat // 2), sync=sync)
    rows.append(row(f"FLAN-T5-small greedy generation, 64-token input, {new} new tokens", new / t_ours, new / t_ref,
                    "tokens/s", better="higher", target=1.0, note="same tokens" if same else "TOKENS DIFFER"))
    return rows
