"""Knowledge distillation: a small student learns from a large teacher's softened predictions.

At each labelled position t (the same positions the LM loss uses: logits at t predict label t+1,
labels −100 skipped), with student logits z_s and teacher logits z_t over the vocabulary:

    p_t^T = softmax(z_t / T),   p_s^T = softmax(z_s / T)
    KL_t  = Σ_v p_t^T(v) · (log p_t^T(v) − log p_s^T(v))                      (teacher ‖ student)
    ℓ_t   = α · T² · KL_t + (1 − α) · CE(z_s, y_{t+1})                         (CE at T = 1)
    loss  = Σ_t ℓ_t / N,    N = number of labelled positions

The temperature T > 1 flattens both distributions so the student also learns the teacher's
"dark knowledge" (which wrong tokens are almost right). The T² factor keeps the soft term's
gradient on the same scale whatever T: ∂(T²·KL)/∂z_s = T·(p_s^T − p_t^T) ≈ (z_s − z_t)/V (centred)
for large T — Hinton et al.'s argument. The reduction is the LM loss's: summed over the vocabulary
inside KL, then a mean over labelled tokens (not over the batch, not over B·T); `distillation_loss_sum`
returns (sum, N) for the trainer's token-weighted accumulation.

Sources: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015); Sanh et al.,
"DistilBERT" (2019) for the token-level LM variant; the course (distillation with temperature T).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.losses import IGNORE_INDEX


def _shift(logits: torch.Tensor, labels: torch.Tensor):
    """(B, T, V), (B, T) -> the labelled positions' logits (N, V) and their next-token labels (N,)."""
    shift = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): label t+1 at t, −100 at the end
    keep = shift != IGNORE_INDEX
    return logits[keep], shift[keep]


def distillation_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                          temperature: float = 2.0, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over labelled positions of α·T²·KL(p_t^T ‖ p_s^T) + (1−α)·CE, and the count N. Computed in at least fp32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ (same tokenizer and vocabulary needed)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    zs, y = _shift(student_logits, labels)  # (N, V), (N,)
    zt, _ = _shift(teacher_logits.detach(), labels)
    dtype = torch.promote_types(zs.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays fp64
    zs, zt = zs.to(dtype), zt.to(dtype)
    log_ps = F.log_softmax(zs / temperature, dim=-1)
    log_pt = F.log_softmax(zt / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum()  # Σ_positions Σ_v p_t (log p_t − log p_s)
    ce = F.cross_entropy(zs, y, reduction="sum")
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce, torch.tensor(y.numel())


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """The mean over labelled tokens (0 when there are none): see the module docstring."""
    total, n = distillation_loss_sum(student_logits, teacher_logits, labels, temperature, alpha)
    return total / n.clamp(min=1)


def distillation_loss_fn(teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5) -> Callable:
    """loss_fn for minillm.train.loop.train: (student, batch) -> (sum, count). The teacher is frozen, in eval
    mode (no dropout), run without gradients, and moved to the batch's device on first use."""
    teacher.requires_grad_(False).eval()

    def loss_fn(model, batch: dict):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if mask is not None and bool(mask.all()):
            mask = None
        if next(teacher.parameters()).device != ids.device:
            teacher.to(ids.device)
        with torch.no_grad():
            zt = teacher(ids, attention_mask=mask)  # (B, T, V)
        zs = model(ids, attention_mask=mask)
        return distillation_loss_sum(zs, zt, batch["labels"], temperature, alpha)

    return loss_fn


def distill(teacher_dir: str, student_dir: str, data_path: str, out_dir: str, temperature: float = 2.0,
            alpha: float = 0.5, epochs: int = 3, lr: float = 5e-4, batch_size: int = 8,
            max_length: Optional[int] = 256, completion_only: bool = False, seed: int = 0,
            device: Optional[str] = None, quiet: bool = False) -> dict:
    """Distil a GPT-2 teacher checkpoint into a GPT-2 student checkpoint (same tokenizer) on a JSONL/CSV file
    of SFT records; the trained student is saved to out_dir in the hub layout. Returns a summary dict."""
    from minillm.models.gpt2 import GPT2LMHeadModel
    from minillm.tokenizer import Tokenizer
    from minillm.data.readers import read_records
    from minillm.data.sft import CausalLMCollator, encode_sft
    from minillm.train.loop import TrainConfig, train

    teacher = GPT2LMHeadModel.from_pretrained(teacher_dir)
    student = GPT2LMHeadModel.from_pretrained(student_dir)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"teacher ({teacher_dir}) has vocab {teacher.config.vocab_size}, student ({student_dir}) "
                         f"{student.config.vocab_size}: distillation needs one tokenizer")
    tok = Tokenizer.from_pretrained(teacher_dir)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    rows = encode_sft(read_records(data_path), tok, max_length=max_length, completion_only=completion_only)
    cfg = TrainConfig(lr=lr, epochs=epochs, batch_size=batch_size, seed=seed, device=device, quiet=quiet)
    res = train(student, rows, CausalLMCollator(tok.pad_token_id or 0),
                distillation_loss_fn(teacher, temperature, alpha), cfg)
    student.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"out_dir": str(Path(out_dir)), "steps": res.step, "first_loss": res.losses[0],
            "final_loss": res.losses[-1], "seconds": res.seconds, "temperature": temperature, "alpha": alpha}
