"""The course's PEFT comparison on one small task: full fine-tuning vs LoRA vs prompt tuning.

The same base (the committed tiny GPT-2, weights/tiny-gpt2, random-initialised, 2×64) learns the same
synthetic product reviews (minillm/demos/synthetic_reviews.py: "review of the cheap pizza : the pizza
was great and i would recommend it .") with minillm's one trainer (minillm.train.loop.train); only what
trains differs:

    full FT         every weight                       (all N parameters, AdamW states for all)
    LoRA r=8        B·A beside c_attn, c_proj, c_fc      (r·(in+out) per layer)
    prompt tuning   20 virtual-token embeddings           (20·64 = 1,280 numbers)

Each row: trainable parameters (and % of the model), the final training loss (mean of the last 10
steps), the held-out loss and the wall time. Expect full FT ≤ LoRA < prompt tuning in loss with a
random-initialised base: a soft prompt can only steer what the frozen model already computes (Lester
et al. find it catches up with full fine-tuning only at billions of parameters).

Sources: the course (PEFT methods and their trade-offs); Hu et al. 2021 (LoRA); Lester et al. 2021.
"""

from __future__ import annotations

import copy
import random
import time
from typing import Optional

import torch

from minillm.demos.synthetic_reviews import all_prompts, sample_review
from minillm.lora import apply_lora, count_parameters
from minillm.models.gpt2 import GPT2LMHeadModel
from minillm.prompt_tuning import apply_prompt_tuning, prompt_tuning_loss
from minillm.tokenizer import Tokenizer
from minillm.data.sft import CausalLMCollator
from minillm.train.loop import TrainConfig, causal_lm_loss, evaluate, train


def review_rows(tok: Tokenizer, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    prompts = all_prompts()
    rows = []
    for _ in range(n):
        p, item = rng.choice(prompts)
        ids = tok.encode(f"{p} {sample_review(rng, item)}", add_special_tokens=False)[:60]
        rows.append({"input_ids": ids})
    return rows


def compare_peft_methods(base: str = "tiny-gpt2", steps: int = 150, batch_size: int = 16, n_train: int = 2000,
                         n_eval: int = 200, num_virtual_tokens: int = 20, lora_r: int = 8, seed: int = 0,
                         threads: Optional[int] = 1, quiet: bool = True) -> list[dict]:
    """Train each method for `steps` steps from the same base on the same batches; returns one row per method."""
    if threads:
        torch.set_num_threads(threads)
    tok = Tokenizer.from_pretrained(base)
    train_rows, eval_rows = review_rows(tok, n_train, seed), review_rows(tok, n_eval, seed + 1)
    collate = CausalLMCollator(tok.pad_token_id or 0)
    base_model = GPT2LMHeadModel.from_pretrained(base)

    def full():
        return copy.deepcopy(base_model), causal_lm_loss, 1e-3

    def lora():
        return apply_lora(copy.deepcopy(base_model), list(base_model.lora_targets), r=lora_r, alpha=2 * lora_r), \
            causal_lm_loss, 5e-3

    def prompt():
        m = apply_prompt_tuning(copy.deepcopy(base_model), num_virtual_tokens, init="text",
                                init_text="review of the pizza : the pizza was great", tokenizer=tok)
        return m, prompt_tuning_loss, 3e-2

    rows = []
    for name, make in (("full fine-tuning", full), (f"LoRA r={lora_r}", lora),
                       (f"prompt tuning ({num_virtual_tokens} tokens)", prompt)):
        torch.manual_seed(seed)
        model, loss_fn, lr = make()
        trainable, total = count_parameters(model)
        cfg = TrainConfig(lr=lr, weight_decay=0.0, max_steps=steps, batch_size=batch_size, warmup_steps=10,
                          seed=seed, device="cpu", quiet=True)
        t0 = time.perf_counter()
        res = train(model, train_rows, collate, loss_fn, cfg)
        seconds = time.perf_counter() - t0
        held = evaluate(model, eval_rows, collate, loss_fn, batch_size=50)["loss"]
        rows.append({"method": name, "trainable": trainable, "total": total,
                     "trainable_pct": 100.0 * trainable / total, "final_train_loss": sum(res.losses[-10:]) / 10,
                     "heldout_loss": held, "seconds": seconds})
        if not quiet:
            print(format_rows(rows[-1:]), flush=True)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'method':<28} {'trainable':>10} {'% of model':>10} {'train loss':>10} {'held-out':>9} {'time s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<28} {r['trainable']:>10,} {r['trainable_pct']:>9.2f}% "
                     f"{r['final_train_loss']:>10.3f} {r['heldout_loss']:>9.3f} {r['seconds']:>7.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_rows(compare_peft_methods()))
