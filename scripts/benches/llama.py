"""Bench area `llama`: forward latency and greedy generation, minillm vs transformers (sdpa), on the
TinyLlama-1.1B config (hidden 2048, 32 heads, 4 kv heads, intermediate 5632, vocab 32000) with random
weights, fp32 and bf16, same device and threads.

22 layers on a shared 2-core CPU take minutes per repeat; MINILLM_BENCH_LLAMA_LAYERS sets a smaller
layer count (the rows say which was measured). Per-layer work is identical, so the ratio carries over,
with the embedding and the 32000-wide head weighing a little more at fewer layers.

Each row is measured twice for minillm: as loaded, and inside `prepacked(model)` (the weights packed
once into oneDNN's layout for inference, at the cost of one more copy of them; transformers has no
such switch of its own, so its side is the same both times).
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import torch

from bench import interleaved, row
from benches.quant import reset_peak_rss, rss_kb

PACKED = ", prepacked"  # rows measured inside minillm.linear.prepacked(model): W packed once (one more copy)
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def run(args) -> list[dict]:
    import transformers as tr

    from minillm.generation import generate
    from minillm.linear import can_prepack, prepacked
    from minillm.models.llama import LlamaForCausalLM

    layers = int(os.environ.get("MINILLM_BENCH_LLAMA_LAYERS", TINYLLAMA["num_hidden_layers"]))
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    what = f"TinyLlama-1.1B config ({layers} of 22 layers)" if layers != 22 else "TinyLlama-1.1B"
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        dname = str(dtype).removeprefix("torch.")
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as d:
            hf = tr.LlamaForCausalLM(tr.LlamaConfig(**{**TINYLLAMA, "num_hidden_layers": layers},
                                                    attn_implementation="sdpa")).eval()
            hf.save_pretrained(d)
            ours = LlamaForCausalLM.from_pretrained(d, dtype=dtype, device=dev).eval()
            # loaded in `dtype`, as users do: hf.to(bfloat16) would also round its rotary inv_freq buffer to bf16
            hf = tr.LlamaForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa").to(dev).eval()
        weights_mib = sum(m.weight.numel() * m.weight.element_size() for m in ours.modules() if can_prepack(m)) / 2**20
        extra = ""
        if dev.type == "cpu":
            reset_peak_rss()  # hand memory freed earlier back to the OS, or the copies would reuse it unseen
            before = rss_kb("VmRSS")
            with prepacked(ours):
                extra = f"; the packed copies: +{(rss_kb('VmRSS') - before) / 1024:.0f} MiB RSS " \
                        f"({weights_mib:.0f} MiB of linear weights)"
        for B, T in ((1, 128), (4, 256)):
            ids = torch.randint(0, 32000, (B, T), device=dev)
            for packed in (False, True):
                with torch.inference_mode(), (prepacked(ours) if packed else contextlib.nullcontext()):
                    t_ours, t_ref, r = interleaved(lambda: ours(ids), lambda: hf(ids, use_cache=False).logits,
                                                   repeat=args.repeat, sync=sync, pairs=True)
                rows.append(row(f"{what} forward {B}x{T}, {dname}{PACKED if packed else ''}", t_ours * 1e3,
                                t_ref * 1e3, "ms", target=1.0, ratio=r,
                                note=f"medians of {args.repeat} calls in turn; ratio: median of the pair ratios"
                                     + (extra if packed else "")))
        prompt = torch.randint(0, 32000, (1, 16), device=dev)
        new = 32
        ref_gen = lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt),  # noqa: E731
                                      max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        for packed in (False, True):
            with torch.inference_mode(), (prepacked(ours) if packed else contextlib.nullcontext()):
                same = torch.equal(generate(ours, prompt, max_new_tokens=new), ref_gen())
                t_ours, t_ref, r = interleaved(lambda: generate(ours, prompt, max_new_tokens=new), ref_gen,
                                               repeat=max(2, args.repeat // 2), sync=sync, pairs=True)
            rows.append(row(f"{what} greedy generation, {new} new tokens, {dname}{PACKED if packed else ''}",
                            new / t_ours, new / t_ref, "tokens/s", better="higher", target=1.0, ratio=1 / r,
                            note=("same tokens" if same else "TOKENS DIFFER") + "; ratio: median of the pair ratios"
                                 + (extra if packed else "")))
        del hf, ours
    return rows
