"""Bench area `quant`: NF4 quantization vs bitsandbytes (CPU), Linear4bit vs fp32 Linear, QLoRA memory.

Rows
- quantizing the 48 linear weights of the GPT-2 124M config (84.9M parameters, random, fp32) to NF4,
  block 64, without and with double quantization: minillm's quantize_nf4 vs bitsandbytes' quantize_4bit;
- dequantizing them: dequantize_nf4 vs dequantize_4bit (bitsandbytes' C kernel on CPU);
- a Linear4bit forward (768 -> 3072, x of 4·128 tokens, fp32 compute) vs the fp32 nn.Linear forward;
- bytes per parameter of NF4 weights (block 64, with and without double quantization) vs bitsandbytes';
- peak memory of a training step of the 124M config: QLoRA (NF4 linears + LoRA r=16 on c_attn/c_proj/c_fc,
  AdamW on the LoRA parameters) vs full fine-tuning (AdamW on all parameters), batches of 1 × 128 and
  4 × 128 tokens, the latter also with gradient checkpointing (GPT2LMHeadModel.gradient_checkpointing_enable).

How memory is measured: each variant runs in its own subprocess. After building the model and freeing the
construction temporaries (gc + glibc malloc_trim), the process resets its peak resident set size
(writing 5 to /proc/self/clear_refs resets VmHWM), runs two optimizer steps (the first creates the AdamW
state), and reads VmHWM from /proc/self/status. Reported: that peak minus the RSS of the same process
before the model was built (Python + torch loaded), i.e. weights + gradients + optimizer state +
activations of the step. torch has no CPU allocator statistics, and tracemalloc does not see torch's
allocations, hence RSS.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def gpt2_124m_linear_shapes() -> list[tuple[int, int]]:
    """(out, in) of every linear weight in GPT-2 124M except the tied LM head: 12 × 4 = 48 tensors."""
    C = 768
    return [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * 12


def run(args) -> list[dict]:
    import torch
    import torch.nn as nn

    import bitsandbytes.functional as BF
    from bench import interleaved, row
    from minillm.nf4 import Linear4bit, dequantize_nf4, quantize_nf4

    rep = max(3, min(args.repeat, 5))
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(s, generator=g) * 0.02 for s in gpt2_124m_linear_shapes()]
    n = sum(w.numel() for w in ws)
    rows = []
    for dq in (False, True):
        label = " + double quant" if dq else ""
        t_ours, t_ref = interleaved(lambda: [quantize_nf4(w, 64, dq) for w in ws],
                                    lambda: [BF.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                              compress_statistics=dq) for w in ws], repeat=rep)
        rows.append(row(f"NF4 quantize, GPT-2 124M linears ({n / 1e6:.1f}M params, fp32, block 64{label})",
                        t_ours, t_ref, "s", target=1.0, note="reference: bitsandbytes quantize_4bit (CPU)"))
        ours = [quantize_nf4(w, 64, dq) for w in ws]
        theirs = [BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq) for w in ws]
        assert all(torch.equal(p, q.reshape(-1)) for (p, _), (q, _) in zip(ours, theirs)), "bytes differ"
        if not dq:
            t_ours, t_ref = interleaved(lambda: [dequantize_nf4(p, s) for p, s in ours],
                                        lambda: [BF.dequantize_4bit(q, s) for q, s in theirs], repeat=rep)
            rows.append(row("NF4 dequantize, same weights", t_ours, t_ref, "s",
                            note="reference: bitsandbytes dequantize_4bit (its C kernel on CPU)"))
        b_ours = sum(p.numel() + s.nbytes() for p, s in ours) / n
        b_ref = sum(q.numel() + (s.absmax.numel() * s.absmax.element_size()) +
                    ((s.state2.absmax.numel() * 4 + 4) if dq else 0) for q, s in theirs) / n
        rows.append(row(f"NF4 weight bytes per parameter (block 64{label})", b_ours, b_ref, "B/param",
                        note=f"issue target <= {0.52 if dq else 0.5625}"))

    torch.manual_seed(0)
    lin = nn.Linear(768, 3072)
    q4 = Linear4bit.from_linear(lin, blocksize=64)
    x = torch.randn(4, 128, 768)
    with torch.no_grad():
        t_ours, t_ref = interleaved(lambda: q4(x), lambda: lin(x), repeat=max(rep, 10))
    rows.append(row("Linear4bit forward 768->3072, 4x128 tokens, fp32 compute", t_ours, t_ref, "s", target=3.0,
                    note="reference: fp32 nn.Linear (the dequantize-then-matmul cost)"))

    mem = {(mode, batch, ckpt): _child(mode, batch, ckpt)
           for mode, batch, ckpt in [("qlora", 1, False), ("full", 1, False), ("qlora", 4, False), ("full", 4, False),
                                     ("qlora", 4, True), ("full", 4, True)]}
    full = mem[("full", 1, False)]
    what = (f"full FT: AdamW on all {full['params'] / 1e6:.1f}M params; QLoRA: NF4 linears + LoRA r=16, "
            f"{mem[('qlora', 1, False)]['trainable'] / 1e6:.2f}M trainable; {full['method']}")
    for (batch, q_ckpt, f_ckpt, target, extra) in [
            (1, False, False, 0.5, ""),
            (4, False, False, None, "; without checkpointing the activations, which grow with the batch and are "
                                    "not quantized, dominate"),
            (4, True, False, 0.5, "; QLoRA as practised: gradient checkpointing on (peft's "
                                  "prepare_model_for_kbit_training does it by default)"),
            (4, True, True, None, "; both with gradient checkpointing")]:
        name = (f"peak memory of a training step, GPT-2 124M config, batch {batch}x128 "
                f"(QLoRA{' + grad. checkpointing' if q_ckpt else ''} vs full FT{' + grad. checkpointing' if f_ckpt else ''})")
        rows.append(row(name, mem[("qlora", batch, q_ckpt)]["step_mb"], mem[("full", batch, f_ckpt)]["step_mb"], "MB",
                        target=target, note=what + extra))
    return rows


def _child(mode: str, batch: int, checkpointing: bool = False) -> dict:
    out = subprocess.run([sys.executable, __file__, "memory-child", mode, str(batch), str(int(checkpointing))],
                         capture_output=True, text=True, cwd=str(ROOT), check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child '{mode}' failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_kb(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> str:
    """Free the construction temporaries (gc + malloc_trim) and reset VmHWM, so that the peak read after the
    training steps is theirs; returns how the peak is measured (for the row's note)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return "ru_maxrss over the whole process (could not reset the peak) minus RSS before building"
    return "RSS peak (VmHWM reset via /proc/self/clear_refs) minus RSS before building the model"


def memory_child(mode: str, batch: int = 4, checkpointing: bool = False) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from minillm.lora import apply_lora, count_parameters
    from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
    from minillm.nf4 import quantize_model

    torch.manual_seed(0)
    base_kb = rss_kb("VmRSS")
    cfg = GPT2Config(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)
    model = GPT2LMHeadModel(cfg)
    if mode == "qlora":
        quantize_model(model)
        apply_lora(model, ["c_attn", "c_proj", "c_fc"], r=16, alpha=32, dropout=0.05)
    if checkpointing:
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = count_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (batch, 128))
    labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], dim=1).reshape(-1)  # next token; last ignored
    method = reset_peak_rss()
    before_step_kb = rss_kb("VmRSS")
    for _ in range(2):
        logits = model(ids)
        loss = F.cross_entropy(logits.view(-1, cfg.vocab_size), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        del logits, loss
    peak_kb = rss_kb("VmHWM")
    return {"mode": mode, "batch": batch, "step_mb": (peak_kb - base_kb) / 1024, "resident_before_step_mb": (before_step_kb - base_kb) / 1024,
            "trainable": trainable, "params": total, "method": method}


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "memory-child":
    print(json.dumps(memory_child(sys.argv[2], int(sys.argv[3]), bool(int(sys.argv[4])))))
