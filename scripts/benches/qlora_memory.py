"""Bench area `qlora`: a QLoRA training step on the TinyLlama-1.1B config (CPU): peak memory and time, against
full fine-tuning of the same config and against peft + bitsandbytes.

The model: TinyLlama-1.1B's config (hidden 2048, 22 layers, 32 heads, 4 kv heads, intermediate 5632,
vocab 32000, untied head) with random weights. One step = forward, backward and AdamW on a batch of
1 × 256 tokens (next-token cross-entropy), gradient checkpointing on; the first step (which creates the
AdamW state) is untimed, the median of the next three is reported.

- minillm QLoRA: every attention and MLP linear in NF4 (block 64, no double quantization, bf16 compute where
  the CPU has bf16 instructions, else fp32), LoRA r=16 / α=32 / dropout 0.05 on all of them (q, k, v, o,
  gate, up, down); the embedding, norms and LM head frozen in fp32.
- peft + bitsandbytes QLoRA: transformers' LlamaForCausalLM of the same config and weights seed, its linears
  replaced by bitsandbytes Linear4bit (nf4, the same compute dtype), peft LoRA with the same settings,
  transformers' gradient checkpointing (non-reentrant).
- full fine-tuning (minillm, fp32, AdamW on every parameter, gradient checkpointing): 1.1B parameters need
  ~17.6 GB for weights + gradients + Adam state alone, too close to a 24 GB machine's limit next to other
  work, so it is measured with 2 and 4 layers and extrapolated per layer to 22 (stated in the row).

Memory: each measurement runs in its own subprocess (so peaks do not mix); after building the model and
freeing the construction temporaries (gc + malloc_trim) the process resets its peak RSS (5 > clear_refs),
runs the steps and reads VmHWM; reported is that peak minus the RSS before the model was built (weights +
gradients + optimizer state + activations). Time: a shared machine's speed drifts by ±15% over minutes, so
the time row comes from one more process holding both QLoRA models and running their steps in turn (6 pairs,
medians; both then share one process, as `interleaved` does in the other areas). Run:
`python scripts/bench.py qlora`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ = 256
STEPS_TIMED = 3  # after one untimed step that creates the AdamW state; the median is reported
TIME_PAIRS = 6  # the time row: minillm and peft steps in turn in one process, this many pairs


def run(args) -> list[dict]:
    from bench import row
    q = _child("minillm-qlora", 22)
    p = _child("peft-qlora", 22)
    t = _child("time", 22)
    pair_ratios = [a / b for a, b in zip(t["minillm"], t["peft"])]
    f2, f4 = _child("full", 2), _child("full", 4)
    per_layer = (f4["step_mb"] - f2["step_mb"]) / 2
    full_mb = f2["step_mb"] + 20 * per_layer
    full_s = f2["step_s"] + 20 * (f4["step_s"] - f2["step_s"]) / 2
    cfg = (f"TinyLlama-1.1B config ({q['params'] / 1e9:.2f}B params, random), batch 1x{SEQ}, grad. checkpointing; "
           f"QLoRA: NF4 + LoRA r=16 on all linears ({q['trainable'] / 1e6:.1f}M trainable), {q['compute']} compute")
    extrap = (f"full FT (fp32, AdamW on all params) measured at 2 and 4 layers ({f2['step_mb']:.0f} / {f4['step_mb']:.0f} MB,"
              f" {per_layer:.0f} MB per layer) and extrapolated to 22: it does not fit next to other work on 24 GB")
    return [
        row("peak memory of a training step: minillm QLoRA vs peft + bitsandbytes QLoRA", q["step_mb"], p["step_mb"],
            "MB", target=1.0, note=cfg + "; " + q["method"]),
        row("time of a training step: minillm QLoRA vs peft + bitsandbytes QLoRA", statistics.median(t["minillm"]),
            statistics.median(t["peft"]), "s", target=1.0, ratio=statistics.median(pair_ratios),
            note=f"both models in one process, steps in turn after each one's first (AdamW state exists): times are "
                 f"medians of {TIME_PAIRS}, the ratio the median of the {TIME_PAIRS} pair ratios "
                 f"({', '.join(f'{r:.2f}' for r in pair_ratios)}); in separate processes (the memory runs, one after "
                 f"the other) {q['step_s']:.2f} vs {p['step_s']:.2f} s; same threads"),
        row("peak memory of a training step: minillm QLoRA vs full fine-tuning (extrapolated)", q["step_mb"], full_mb,
            "MB", note=extrap),
        row("time of a training step: minillm QLoRA vs full fine-tuning (extrapolated)", q["step_s"], full_s, "s",
            note="full FT time extrapolated per layer from 2 and 4 layers"),
    ]


def _child(mode: str, layers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "memory-child", mode, str(layers)],
                         capture_output=True, text=True, cwd=str(ROOT), check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child '{mode}' ({layers} layers) failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if mode == "time":
        print(f"  steps in turn, {layers} layers: minillm {r['minillm']}, peft {r['peft']} s", file=sys.stderr)
    else:
        print(f"  {mode} {layers} layers: {r['step_mb']:.0f} MB, {r['step_s']:.1f} s/step", file=sys.stderr)
    return r


def _build_minillm(mode: str, layers: int, dtype):
    from minillm.lora import apply_lora
    from minillm.models.llama import LlamaConfig, LlamaForCausalLM
    from minillm.nf4 import quantize_model
    model = LlamaForCausalLM(LlamaConfig(**{**TINYLLAMA, "num_hidden_layers": layers}))
    if mode == "minillm-qlora":
        quantize_model(model, compute_dtype=dtype)  # the LM head stays in full precision (skipped), as bnb/peft
        apply_lora(model, TARGETS, r=16, alpha=32, dropout=0.05)
    model.gradient_checkpointing_enable()
    return model, lambda ids: model(ids)


def _build_peft(layers: int, dtype):
    import bitsandbytes as bnb
    import torch.nn as nn
    import transformers as tr
    from peft import LoraConfig, get_peft_model
    model = tr.LlamaForCausalLM(tr.LlamaConfig(**{**TINYLLAMA, "num_hidden_layers": layers}))
    for name, lin in list(model.named_modules()):
        if not isinstance(lin, nn.Linear) or name.endswith("lm_head"):
            continue
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                              quant_type="nf4", compress_statistics=False)
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", blocksize=64,
                                     compress_statistics=False).to("cpu")  # .to quantizes
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                             bias="none", task_type="CAUSAL_LM"))
    return model, lambda ids: model(input_ids=ids).logits


def _trainer(mode: str, layers: int, dtype):
    """(one training step -> its seconds, trainable, total params) for `mode`'s model."""
    import torch
    import torch.nn.functional as F

    from minillm.lora import count_parameters

    torch.manual_seed(0)
    model, fwd = _build_peft(layers, dtype) if mode == "peft-qlora" else _build_minillm(mode, layers, dtype)
    if mode == "peft-qlora":
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    else:
        trainable, total = count_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    ids = torch.randint(0, TINYLLAMA["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1).reshape(-1)

    def step() -> float:
        t = time.perf_counter()
        logits = fwd(ids)
        loss = F.cross_entropy(logits.float().view(-1, TINYLLAMA["vocab_size"]), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        del logits, loss
        return time.perf_counter() - t
    return step, trainable, total


def memory_child(mode: str, layers: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from quant import reset_peak_rss, rss_kb  # the same peak measurement as the GPT-2 memory rows (this script's folder)
    from minillm.demos.rlhf_demo import compute_dtype

    dtype = compute_dtype() if mode != "full" else None
    if mode == "time":  # both QLoRA models in one process, their steps in turn: pair by pair, drift hits both alike
        (a, *_), (b, *_) = _trainer("minillm-qlora", layers, dtype), _trainer("peft-qlora", layers, dtype)
        a(), b()  # the first steps create the AdamW states
        pairs = [(a(), b()) for _ in range(TIME_PAIRS)]
        return {"minillm": [x for x, _ in pairs], "peft": [y for _, y in pairs]}
    base_kb = rss_kb("VmRSS")
    step, trainable, total = _trainer(mode, layers, dtype)
    method = reset_peak_rss()
    times = [step() for _ in range(1 + STEPS_TIMED)]
    peak_kb = rss_kb("VmHWM")
    return {"mode": mode, "layers": layers, "step_mb": (peak_kb - base_kb) / 1024, "step_s": statistics.median(times[1:]),
            "trainable": trainable, "params": total, "method": method,
            "compute": "bf16" if dtype == torch.bfloat16 else "fp32", "threads": torch.get_num_threads()}


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "memory-child":
    print(json.dumps(memory_child(sys.argv[2], int(sys.argv[3]))))
