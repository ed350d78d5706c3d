"""The RLHF jobs behind `minillm train-reward` and `minillm ppo`, on hub checkpoints and JSON-lines files.

train-reward: a GPT-2 or BERT checkpoint + pairs.jsonl -> a reward model directory (the backbone in
the hub layout, score.safetensors, reward_config.json, the tokenizer), trained with the margin loss
and checked on a held-out slice of the pairs; fully, or with LoRA adapters (on an NF4 backbone: QLoRA)
that are merged into the saved backbone.

ppo: a GPT-2 policy + that reward model + prompts.jsonl -> a tuned policy. The reference is a frozen
copy of the starting policy. The reward model reads text through its own tokenizer, so it may
differ from the policy's (responses are decoded and re-encoded). Rewards are normalized with the
mean/std measured on the starting policy's first batch (or reward_normalization.json when present).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import torch

from minillm import hub
from minillm.data.preference import load_pairs, load_prompts
from minillm.lora import AdapterConfig, merge_and_unload, prepare_adapters, save_adapter
from minillm.models.auto import load_model
from minillm.rlhf.ppo import PolicyWithValueHead, PPOConfig, PPOTrainer
from minillm.models.layers import hidden_size
from minillm.rlhf.reward import RewardModel, RewardScorer, load_backbone, train_reward_model
from minillm.train.jobs import load_tokenizer
from minillm.train.runlog import RunLog


def train_reward_job(model: str, data: str, out: str, epochs: int = 1, batch_size: int = 16, lr: float = 1e-5,
                     eval_frac: float = 0.1, center_coef: float = 0.0, use_margin: bool = True, seed: int = 0,
                     device: Optional[str] = None, max_length: Optional[int] = None,
                     adapters: AdapterConfig = AdapterConfig()) -> dict:
    """adapters.lora_r > 0: train LoRA adapters on the backbone plus the scalar head (the rest frozen);
    quantize="nf4": the frozen backbone linears in NF4 (QLoRA). Either way the reward model is written with
    the adapters merged into a plain full-precision backbone (lora.merge_and_unload), so
    RewardModel.from_pretrained and `minillm ppo` read it as any other; the adapters alone go to <out>/adapter/
    in peft's format."""
    pairs = load_pairs(data)
    rng = random.Random(seed)
    rng.shuffle(pairs)
    n_eval = int(len(pairs) * eval_frac)
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    tok = load_tokenizer(model)
    torch.manual_seed(seed)  # the new head and LoRA matrices are seeded
    backbone = load_backbone(model)
    pool = "last" if hasattr(backbone, "hidden_states") else "first"  # decoders: last token; encoders: [CLS]
    prepare_adapters(backbone, adapters)
    rm = RewardModel(backbone, hidden_size(backbone), pool=pool).to(device)  # the head stays trainable
    log = RunLog(Path(out) / "metrics.jsonl")
    log("rm", f"{type(backbone).__name__} backbone, pool={pool}, {len(train_pairs)} training / {len(eval_pairs)} "
              f"held-out pairs" + (f"; LoRA r={adapters.lora_r}{' on NF4 weights' if adapters.quantize else ''}"
                                   if adapters.lora_r else ""))

    def show(r):
        ev = f"{r['eval_acc']:.3f}" if r["eval_acc"] is not None else "-"
        log("rm", f"epoch {r['epoch']}/{epochs}  loss {r['loss']:.4f}  train acc {r['train_acc']:.3f}  held-out acc {ev}",
            **r)
    rec = train_reward_model(rm, tok, train_pairs, eval_pairs or None, epochs=epochs, batch_size=batch_size, lr=lr,
                             center_coef=center_coef, use_margin=use_margin, seed=seed, log=show,
                             max_length=max_length, progress=log)
    if adapters.lora_r:
        save_adapter(backbone, Path(out) / "adapter")
        merge_and_unload(backbone)
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    log("done", f"reward model saved to {out}")
    log.close()
    return rec


def ppo_job(policy: str, reward_model: str, prompts: str, out: str, steps: int = 20, config: Optional[PPOConfig] = None,
            seed: int = 0, device: Optional[str] = None, adapters: AdapterConfig = AdapterConfig()) -> list[dict]:
    """adapters.lora_r > 0: train LoRA adapters only, and the reference is the same model with its adapters
    disabled (one copy of the base weights); quantize="nf4": the base linears in NF4 (QLoRA). The tuned policy
    is saved loadable as it is (adapters merged; the adapter alone in <out>/adapter, peft's files)."""
    cfg = config or PPOConfig()
    texts = load_prompts(prompts)
    tok = load_tokenizer(policy)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    lm = load_model(policy, "causal-lm", device=device)
    prepare_adapters(lm, adapters)
    rm = RewardModel.from_pretrained(reward_model, device=device).eval().requires_grad_(False)
    rm_dir = hub.resolve(reward_model)
    rm_tok = load_tokenizer(str(rm_dir))
    log = RunLog(Path(out) / "metrics.jsonl")
    if rm_tok.tok.to_str() != tok.tok.to_str():
        log("ppo", "the reward model's tokenizer differs from the policy's: responses are decoded and re-encoded")
    norm_file = rm_dir / "reward_normalization.json"
    scorer = RewardScorer(rm, rm_tok)
    policy_model = PolicyWithValueHead(lm).to(device)
    trainer = PPOTrainer(policy_model, tok, scorer, cfg, generator=gen if device in (None, "cpu") else None)
    rng = random.Random(seed)
    history = []

    def batch():
        b = [texts[rng.randrange(len(texts))] for _ in range(cfg.batch_size)]
        enc = tok(b, padding_side="left")
        dev = next(lm.parameters()).device
        return enc["input_ids"].to(dev), enc["attention_mask"].to(dev)

    if norm_file.is_file():
        n = json.loads(norm_file.read_text())
        scorer.mean, scorer.std = float(n["mean"]), float(n["std"])
    else:
        ro = trainer.rollout(*batch())
        raw = scorer.raw(*trainer.decode(ro))
        scorer.mean, scorer.std = raw.mean().item(), max(raw.std().item(), 1e-6)
    log("ppo", f"reward normalization: mean {scorer.mean:.4f}, std {scorer.std:.4f}")
    for step in range(steps):
        st = trainer.step(*batch())
        history.append(st)
        log("ppo", f"step {step + 1}/{steps}  score {st['score']:+.3f}  kl {st['kl']:.3f}  beta {st['kl_coef']:.4f}  "
                   f"ent {st['entropy']:.2f}  clip {st['clipfrac']:.3f}  len {st['response_length']:.1f}",
            step=step + 1, **st)
    if adapters.lora_r:
        save_adapter(lm, Path(out) / "adapter")  # peft's adapter files
        merge_and_unload(lm)
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    hub.save_safetensors({"v_head.summary.weight": policy_model.v_head.summary.weight,
                          "v_head.summary.bias": policy_model.v_head.summary.bias}, Path(out) / "value_head.safetensors")
    log("done", f"policy saved to {out}")
    log.close()
    return history
