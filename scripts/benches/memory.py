"""Bench: minillm.memory's estimate against the measured peak RSS of real training steps on CPU.

Each case runs in a fresh subprocess: import torch + minillm and warm the kernels on a tiny model (the
baseline RSS), then build a GPT-2 from a config, and run two steps of minillm's train_step (forward,
backward, clip, AdamW; the second step has the optimizer states in place). Measured = peak RSS
(ru_maxrss) − baseline RSS; estimate = estimate_memory(...)["peak"]. Reported as a ratio estimate /
measured (target within 15%: 0.85–1.15). CPU only; no reference library needed.

    python scripts/benches/memory.py            # prints the table (live-memory RSS and default-glibc RSS)
    (or as an area of scripts/bench.py once "memory" is added to its AREAS)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

CASES = [
    # name, GPT-2 config, batch, seq, lora_r, gradient checkpointing, dropout
    ("gpt2 6x512 full FT, 4x256", dict(n_layer=6, n_embd=512, n_head=8), 4, 256, None, False, 0.1),
    ("gpt2 6x512 full FT, 4x256, no dropout", dict(n_layer=6, n_embd=512, n_head=8), 4, 256, None, False, 0.0),
    ("gpt2-124M full FT, 2x256", dict(n_layer=12, n_embd=768, n_head=12), 2, 256, None, False, 0.1),
    ("gpt2-124M LoRA r=8, 4x256", dict(n_layer=12, n_embd=768, n_head=12), 4, 256, 8, False, 0.1),
    ("gpt2-124M full FT + checkpointing, 4x256", dict(n_layer=12, n_embd=768, n_head=12), 4, 256, None, True, 0.1),
]

CHILD = r"""
import json, os, resource, sys, torch
torch.set_num_threads(1)
from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
from minillm.lora import apply_lora
from minillm.train.loop import TrainConfig, causal_lm_loss, make_optimizer, train_step
spec = json.loads(sys.argv[1])
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def steps(model, B, T, V, n):
    ids = torch.randint(0, V, (B, T))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    opt = make_optimizer(model, TrainConfig(lr=1e-4))
    for _ in range(n):
        train_step(model, opt, [batch], causal_lm_loss, max_grad_norm=1.0)
warm = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=32)).train()
steps(warm, 2, 16, 100, 2)
del warm
base = rss()
p = spec["dropout"]
cfg = GPT2Config(vocab_size=50257, n_positions=1024, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, **spec["cfg"])
model = GPT2LMHeadModel(cfg).train()
if spec["lora_r"]:
    apply_lora(model, ["c_attn", "c_proj", "c_fc"], r=spec["lora_r"])
model.gradient_checkpointing_enable(spec["gc"])
steps(model, spec["batch"], spec["seq"], cfg.vocab_size, 2)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"measured": peak - base, "base": base}))
"""


def measure(case, live: bool = True) -> dict:
    """live=True fixes glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_=65536) so that freed tensors leave RSS at
    once and RSS tracks live memory; live=False measures the default allocator, slack included."""
    import os
    from minillm.memory import estimate_memory
    name, cfg, B, T, r, gc, p = case
    spec = {"cfg": cfg, "batch": B, "seq": T, "lora_r": r, "gc": gc, "dropout": p}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if live:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT, check=True, env=env)
    measured = json.loads(out.stdout.strip().splitlines()[-1])["measured"]
    full = dict(vocab_size=50257, n_positions=1024, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, **cfg)
    est = estimate_memory(config=full, lora_r=r, lora_targets=["c_attn", "c_proj", "c_fc"] if r else None,
                          gradient_checkpointing=gc, batch=B, seq=T)
    return {"name": name, "estimate": est["peak"], "measured": measured, "ratio": est["peak"] / measured,
            "sum": est["total"], "activations": est["activations"]}


def run(args=None) -> list[dict]:
    from bench import row
    rows = []
    for case in CASES:
        m, d = measure(case), measure(case, live=False)
        rows.append(row(f"training peak memory: {m['name']} (estimate vs measured RSS)", m["estimate"] / 1e6,
                        m["measured"] / 1e6, "MB", better="lower", target=1.15,
                        note=f"ratio within 0.85–1.15 wanted; default glibc RSS {d['measured'] / 1e6:.0f} MB; "
                             f"sum of parts {m['sum'] / 1e6:.0f} MB"))
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(f"{'case':<42} {'estimate MB':>11} {'live RSS MB':>11} {'error':>7} {'glibc RSS MB':>12} {'error':>7}")
    for case in CASES:
        m, d = measure(case), measure(case, live=False)
        print(f"{m['name']:<42} {m['estimate'] / 1e6:11.0f} {m['measured'] / 1e6:11.0f} {100 * (m['ratio'] - 1):+6.1f}% "
              f"{d['measured'] / 1e6:12.0f} {100 * (d['ratio'] - 1):+6.1f}%", flush=True)
