"""Bench: one SFT step (forward + backward + clip + AdamW) of the GPT-2-124M config, batch 4×256,
fp32, random weights, dropout on (train mode). minillm's GPT2LMHeadModel driven by minillm's
train_step vs transformers' GPT2LMHeadModel in the same plain loop (its own loss from labels,
backward, clip_grad_norm_, AdamW). Reported as tokens/s; ratio = minillm / transformers
(higher is better), target ≥ 0.95."""

from __future__ import annotations

import torch

from bench import interleaved, row

B, T = 4, 256


def run(args) -> list[dict]:
    import transformers

    from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
    from minillm.train.loop import TrainConfig, causal_lm_loss, make_optimizer, train_step

    device = torch.device(args.device)
    cfg = dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)
    torch.manual_seed(0)
    ours = GPT2LMHeadModel(GPT2Config(**cfg)).to(device).train()
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).to(device).train()
    ref.load_state_dict({k: v for k, v in ref.state_dict().items()})  # (random init on both sides)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (B, T), generator=g).to(device)
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    tc = TrainConfig(lr=1e-5, weight_decay=0.01)
    opt_ours = make_optimizer(ours, tc)
    opt_ref = make_optimizer(ref, tc)  # same AdamW groups for both: only the model differs
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    def step_ours():
        train_step(ours, opt_ours, [batch], causal_lm_loss, max_grad_norm=1.0)

    def step_ref():  # the plain loop around transformers' model
        loss = ref(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)

    repeat = max(3, min(args.repeat, 5))
    t_ours, t_ref = interleaved(step_ours, step_ref, repeat=repeat, warmup=1, sync=sync)
    tokens = B * T
    return [row(f"SFT step GPT-2-124M {B}x{T} fp32 (fwd+bwd+clip+AdamW)", tokens / t_ours, tokens / t_ref,
                "tokens/s", better="higher", target=0.95,
                note=f"median of {repeat} interleaved steps; {t_ours:.2f}s vs {t_ref:.2f}s per step")]
