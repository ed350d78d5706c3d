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
import time
from pathlib import Path
from typing import Optional

import torch

from minillm import hub
from minillm.rlhf.ppo import PolicyWithValueHead, PPOConfig, PPOTrainer
from minillm.rlhf.preference_data import load_pairs, load_prompts
from minillm.rlhf.reward import (RewardModel, RewardScorer, backbone_hidden_size, load_backbone,
                                 train_reward_model)
from minillm.tokenizer import Tokenizer


def load_tokenizer(name_or_dir: str) -> Tokenizer:
    """The checkpoint's tokenizer; without a pad token, the EOS token pads (as usual for GPT-2)."""
    tok = Tokenizer.from_pretrained(name_or_dir)
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"{name_or_dir}: the tokenizer has neither a pad nor an eos token; add one")
        tok.pad_token = tok.eos_token
    return tok


class _Log:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f, self.t0 = open(path, "w"), time.time()

    def __call__(self, phase: str, msg: str, **rec) -> None:
        print(f"[{time.time() - self.t0:7.1f}s] {phase:<5} {msg}", flush=True)
        self.f.write(json.dumps({"phase": phase, "msg": msg, **rec}) + "\n")
        self.f.flush()


# LoRA targets when none are given: every linear of the attention and MLP blocks.
DEFAULT_LORA_TARGETS = {"gpt2": ("c_attn", "c_proj", "c_fc"),
                        "bert": ("query", "key", "value", "intermediate.dense", "output.dense")}  # not the pooler


def check_adapter_flags(lora_r: int, nf4: bool) -> None:
    """Before any loading: NF4 freezes the base, so something must train on top of it."""
    if nf4 and not lora_r:
        raise ValueError("--nf4 quantizes the frozen base weights; it needs LoRA adapters to train (--lora-r > 0)")


def add_adapters(model: torch.nn.Module, lora_r: int, lora_alpha: float, lora_targets, nf4: bool) -> None:
    """In place: the base linears to NF4 (nf4), then LoRA adapters of rank lora_r (0: none, full fine-tune)."""
    if nf4:
        from minillm.nf4 import quantize_model
        quantize_model(model)
    if lora_r:
        from minillm.lora import apply_lora
        apply_lora(model, list(lora_targets), r=lora_r, alpha=lora_alpha)


def train_reward_job(model: str, data: str, out: str, epochs: int = 1, batch_size: int = 16, lr: float = 1e-5,
                     eval_frac: float = 0.1, center_coef: float = 0.0, use_margin: bool = True, seed: int = 0,
                     device: Optional[str] = None, max_length: Optional[int] = None, lora_r: int = 0,
                     lora_alpha: float = 16.0, lora_targets: Optional[tuple] = None, nf4: bool = False) -> dict:
    """lora_r > 0: train LoRA adapters on the backbone plus the scalar head (the rest frozen); nf4: store the
    frozen backbone linears in NF4 first (QLoRA; needs lora_r). Either way the reward model is written with
    the adapters merged into a plain full-precision backbone (lora.merge_and_unload), so
    RewardModel.from_pretrained and `minillm ppo` read it as any other; the adapters alone go to <out>/adapter/
    in peft's format."""
    check_adapter_flags(lora_r, nf4)
    pairs = load_pairs(data)
    rng = random.Random(seed)
    rng.shuffle(pairs)
    n_eval = int(len(pairs) * eval_frac)
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    torch.manual_seed(seed)
    backbone = load_backbone(model)
    mt = hub.read_config(hub.resolve(model)).get("model_type", "gpt2")
    pool = "first" if mt == "bert" else "last"
    add_adapters(backbone, lora_r, lora_alpha, lora_targets or DEFAULT_LORA_TARGETS[mt], nf4)
    rm = RewardModel(backbone, backbone_hidden_size(backbone), pool=pool).to(device)  # the head stays trainable
    tok = load_tokenizer(model)
    log = _Log(Path(out) / "metrics.jsonl")
    log("rm", f"{mt} backbone, pool={pool}, {len(train_pairs)} training / {len(eval_pairs)} held-out pairs"
              + (f"; LoRA r={lora_r}{' on NF4 weights' if nf4 else ''}" if lora_r else ""))

    def show(r):
        ev = f"{r['eval_acc']:.3f}" if r["eval_acc"] is not None else "-"
        log("rm", f"epoch {r['epoch']}/{epochs}  loss {r['loss']:.4f}  train acc {r['train_acc']:.3f}  held-out acc {ev}",
            **r)
    rec = train_reward_model(rm, tok, train_pairs, eval_pairs or None, epochs=epochs, batch_size=batch_size, lr=lr,
                             center_coef=center_coef, use_margin=use_margin, seed=seed, log=show,
                             max_length=max_length)
    if lora_r:
        from minillm.lora import merge_and_unload, save_adapter
        save_adapter(backbone, Path(out) / "adapter")
        merge_and_unload(backbone)
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    log("done", f"reward model saved to {out}")
    return rec


def ppo_job(policy: str, reward_model: str, prompts: str, out: str, steps: int = 20, config: Optional[PPOConfig] = None,
            seed: int = 0, device: Optional[str] = None, lora_r: int = 0, lora_alpha: float = 16.0,
            lora_targets: tuple = ("c_attn", "c_proj", "c_fc"), nf4: bool = False) -> list[dict]:
    """lora_r > 0: train LoRA adapters only, and the reference is the same model with its adapters disabled
    (one copy of the base weights). nf4: store the base linears in NF4 first (QLoRA; needs lora_r)."""
    from minillm.models.gpt2 import GPT2LMHeadModel
    cfg = config or PPOConfig()
    check_adapter_flags(lora_r, nf4)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    texts = load_prompts(prompts)
    lm = GPT2LMHeadModel.from_pretrained(policy, device=device)
    add_adapters(lm, lora_r, lora_alpha, lora_targets, nf4)
    tok = load_tokenizer(policy)
    rm = RewardModel.from_pretrained(reward_model, device=device).eval().requires_grad_(False)
    rm_dir = hub.resolve(reward_model)
    rm_tok = load_tokenizer(str(rm_dir))
    log = _Log(Path(out) / "metrics.jsonl")
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
        return enc["input_ids"].to(lm.transformer.wte.weight.device), enc["attention_mask"].to(lm.transformer.wte.weight.device)

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
    if lora_r:
        from minillm.lora import save_adapter
        save_adapter(lm, out)  # peft's adapter files; the base stays where it was
    else:
        lm.save_pretrained(out)
    tok.save_pretrained(out)
    hub.save_safetensors({"v_head.summary.weight": policy_model.v_head.summary.weight,
                          "v_head.summary.bias": policy_model.v_head.summary.bias}, Path(out) / "value_head.safetensors")
    log("done", f"policy saved to {out}")
    return history
