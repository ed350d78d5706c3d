"""Distillation demo: a small student distilled from a trained teacher beats the same student on hard labels.

A word-level GPT-2 teacher (2×64) learns the synthetic reviews (minillm/demos/synthetic_reviews.py) from
plenty of data; then two copies of one small student (1×32, same initial weights, same batches, same
steps) learn from a small subset (few examples: where soft targets help most, Hinton et al. §3): one on
the hard next-token labels only, one on α·T²·KL(teacher ‖ student) + (1−α)·CE (minillm.distill). Both
are scored on held-out reviews by the plain next-token cross-entropy. Everything runs through
minillm.train.loop.train, seeded, on one CPU thread in well under a minute.

Source: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015); the course.
"""

from __future__ import annotations

import copy
import random
import time

import torch

from minillm.demos.rlhf_demo import build_tokenizer
from minillm.demos.synthetic_reviews import all_prompts, sample_review
from minillm.distill import distillation_loss_fn
from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
from minillm.data.sft import CausalLMCollator
from minillm.train.loop import TrainConfig, causal_lm_loss, evaluate, train


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    prompts = all_prompts()
    out = []
    for _ in range(n):
        p, item = rng.choice(prompts)
        out.append(f"{p} {sample_review(rng, item)} [EOS]")
    return out


def distill_demo(teacher_examples: int = 4000, student_examples: int = 150, heldout: int = 500,
                 teacher_steps: int = 300, student_steps: int = 150, temperature: float = 2.0, alpha: float = 0.5,
                 seed: int = 0, threads: int = 1, quiet: bool = True) -> dict:
    """Returns held-out losses: teacher, student (hard labels), student (distilled), and seconds."""
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    big, small, test = _texts(teacher_examples, seed), _texts(student_examples, seed + 1), _texts(heldout, seed + 2)
    tok = build_tokenizer(big + small + test)
    rows = lambda texts: [{"input_ids": tok.encode(t)} for t in texts]  # noqa: E731
    big_rows, small_rows, test_rows = rows(big), rows(small), rows(test)
    collate = CausalLMCollator(tok.pad_token_id)
    vocab = max(len(tok), 1 + max(i for r in big_rows + small_rows + test_rows for i in r["input_ids"]))

    def gpt(n_embd, n_layer, n_head):
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                          n_positions=48, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.0))

    torch.manual_seed(seed)
    teacher = gpt(64, 2, 4)
    train(teacher, big_rows, collate, causal_lm_loss,
          TrainConfig(lr=3e-3, max_steps=teacher_steps, batch_size=32, warmup_steps=20, device="cpu", seed=seed,
                      quiet=True))
    torch.manual_seed(seed + 1)
    student0 = gpt(32, 1, 2)
    cfg = TrainConfig(lr=3e-3, max_steps=student_steps, batch_size=16, warmup_steps=10, device="cpu", seed=seed,
                      quiet=True)
    hard, soft = copy.deepcopy(student0), copy.deepcopy(student0)
    train(hard, small_rows, collate, causal_lm_loss, cfg)
    train(soft, small_rows, collate, distillation_loss_fn(teacher, temperature, alpha), cfg)
    score = lambda m: evaluate(m, test_rows, collate, causal_lm_loss, batch_size=100)["loss"]  # noqa: E731
    out = {"teacher_heldout_loss": score(teacher), "student_hard_heldout_loss": score(hard),
           "student_distilled_heldout_loss": score(soft), "temperature": temperature, "alpha": alpha,
           "teacher_params": sum(p.numel() for p in teacher.parameters()),
           "student_params": sum(p.numel() for p in student0.parameters()),
           "student_examples": student_examples, "seconds": time.perf_counter() - t0}
    if not quiet:
        print(format_result(out))
    return out


def format_result(r: dict) -> str:
    return (f"teacher ({r['teacher_params']:,} params)        held-out loss {r['teacher_heldout_loss']:.3f}\n"
            f"student ({r['student_params']:,} params), hard labels  {r['student_hard_heldout_loss']:.3f}\n"
            f"student, distilled (T={r['temperature']:g}, α={r['alpha']:g})     "
            f"{r['student_distilled_heldout_loss']:.3f}\n"
            f"({r['student_examples']} student examples; {r['seconds']:.0f} s)")


if __name__ == "__main__":
    print(format_result(distill_demo()))
