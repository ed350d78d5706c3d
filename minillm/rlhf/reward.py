"""Reward model: a backbone plus a scalar head, trained on preference pairs with the margin loss.

Labelers rank K responses to a prompt; every ordered pair (preferred j, other k) — K(K−1)/2 of
them — is one training example. The reward model r(x, y) is trained so that the preferred
response scores higher:

    loss = mean( −log σ(r_j − r_k − m) )                        (InstructGPT: m = 0)
    m    = score_j − score_k   (Llama-2's margin: the labelers' score difference)
    + c · mean( (r_j + r_k)² )                                  (optional reward centering)

The margin asks for a larger gap where the labelers saw a larger one; centering keeps the
rewards near zero, since the loss only sees differences. Worked numbers from the book:
−log σ(0.87 − 0.34) = 0.4629; with margin 1: 0.9555; margin 8: 7.4706; margin 4: 3.50.

`RewardModel` wraps any minillm backbone that maps (input_ids, attention_mask) to hidden states
(B, T, H) and reads one position: the first token for BERT-likes ([CLS]), the last non-pad token
for GPT-2 (the only position that has seen the whole text).

Sources: Ouyang et al., "Training language models to follow instructions with human feedback"
(2022), eq. 1; Touvron et al., "Llama 2" (2023), eq. 2 (margin); Eisenstein et al., "Helping or
herding?" (2023) (reward centering, as in trl's `center_rewards_coefficient`); the book, ch. 10.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm import hub
from minillm.data.preference import RewardPairCollator, join_text
from minillm.data.readers import DataError
from minillm.losses import last_token_index
from minillm.models.auto import KINDS, load_model, model_type


def _check_pair_tensors(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                        margin: Optional[torch.Tensor]) -> None:
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen has shape {tuple(r_chosen.shape)} but r_rejected has shape "
                         f"{tuple(r_rejected.shape)}; they must match (one reward per pair)")
    if r_chosen.numel() == 0:
        raise ValueError("pairwise_margin_loss: no pairs (empty reward tensors)")
    if margin is not None and margin.shape != r_chosen.shape:
        raise ValueError(f"margin has shape {tuple(margin.shape)}, expected {tuple(r_chosen.shape)} (one per pair)")
    for name, t in (("r_chosen", r_chosen), ("r_rejected", r_rejected), ("margin", margin)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or Inf at pair(s) {torch.nonzero(~torch.isfinite(t)).flatten().tolist()[:10]}")


def pairwise_margin_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: Optional[torch.Tensor] = None,
                         center_coef: float = 0.0) -> torch.Tensor:
    """mean(−log σ(r_chosen − r_rejected − margin)) [+ center_coef · mean((r_chosen + r_rejected)²)].

    r_chosen, r_rejected, margin: same shape (one entry per pair). Returns a scalar."""
    r_chosen = torch.as_tensor(r_chosen, dtype=torch.float32) if not torch.is_tensor(r_chosen) else r_chosen
    r_rejected = torch.as_tensor(r_rejected, dtype=torch.float32) if not torch.is_tensor(r_rejected) else r_rejected
    if margin is not None and not torch.is_tensor(margin):
        margin = torch.as_tensor(margin, dtype=r_chosen.dtype, device=r_chosen.device)
    _check_pair_tensors(r_chosen, r_rejected, margin)
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(diff).mean()  # logsigmoid is the stable form of log(1 / (1 + e^−x))
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Fraction of pairs where the preferred response gets the strictly higher reward (ties count as wrong)."""
    _check_pair_tensors(r_chosen, r_rejected, None)
    return (r_chosen > r_rejected).float().mean().item()


def rankings_to_pairs(responses: Sequence, scores: Optional[Sequence[float]] = None) -> list[tuple]:
    """K responses -> the K(K−1)/2 pairs (preferred, other, margin), preferred first.

    Without scores, `responses` is a ranking, best first, and every margin is 0.0.
    With scores (higher = better, e.g. labelers' 1–10), responses are ordered by score and the margin is
    the score difference; tied pairs carry no preference and are left out (so fewer than K(K−1)/2).
    NaN scores raise."""
    responses = list(responses)
    if scores is None:
        return [(responses[j], responses[k], 0.0) for j in range(len(responses)) for k in range(j + 1, len(responses))]
    scores = [float(s) for s in scores]
    if len(scores) != len(responses):
        raise ValueError(f"rankings_to_pairs: {len(responses)} responses but {len(scores)} scores")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"rankings_to_pairs: score(s) at position(s) {bad} are NaN or infinite")
    order = sorted(range(len(responses)), key=lambda i: -scores[i])  # stable: equal scores keep their order
    pairs = []
    for a in range(len(order)):
        for b in range(a + 1, len(order)):
            j, k = order[a], order[b]
            if scores[j] > scores[k]:
                pairs.append((responses[j], responses[k], scores[j] - scores[k]))
    return pairs


class RewardModel(nn.Module):
    """backbone + linear head -> one scalar per sequence.

    backbone: a module returning hidden states (B, T, H) from (input_ids, attention_mask), e.g. a BertModel;
    a GPT2LMHeadModel is accepted too (its `.transformer` body is used; the LM head is unused).
    pool: "last" (last non-pad token; decoders) or "first" (position 0, [CLS]; encoders).
    The head is named `score` (no bias), as in transformers' GPT2ForSequenceClassification."""

    def __init__(self, backbone: nn.Module, hidden_size: int, pool: str = "last"):
        super().__init__()
        if pool not in ("last", "first"):
            raise ValueError(f"pool must be 'last' or 'first', got {pool!r}")
        self.backbone = backbone
        self.pool = pool
        self.score = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1.0 / math.sqrt(hidden_size + 1))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if hasattr(self.backbone, "hidden_states"):  # a causal LM: its body's last hidden states, not the logits
            return self.backbone.hidden_states(input_ids, attention_mask=attention_mask)  # (B, T, H)
        return self.backbone(input_ids, attention_mask=attention_mask)  # an encoder: (B, T, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """-> rewards (B,)"""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.hidden_states(input_ids, attention_mask)  # (B, T, H)
        if self.pool == "first":
            pooled = h[:, 0]  # (B, H)
        else:
            idx = last_token_index(attention_mask)
            pooled = h[torch.arange(h.shape[0], device=h.device), idx]  # (B, H)
        return self.score(pooled).squeeze(-1)

    # ---- saving: the backbone's own hub layout + score.safetensors + reward_config.json ----
    def save_pretrained(self, directory: str | Path) -> Path:
        d = Path(directory)
        if not hasattr(self.backbone, "save_pretrained"):
            raise TypeError(f"{type(self.backbone).__name__} has no save_pretrained; cannot save the reward model")
        self.backbone.save_pretrained(str(d))
        hub.save_safetensors({"score.weight": self.score.weight}, d / "score.safetensors")
        hub.save_json({"pool": self.pool, "backbone": type(self.backbone).__name__,
                       "hidden_size": self.score.weight.shape[1]}, d / "reward_config.json")
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, device=None) -> "RewardModel":
        """Load a reward model saved by save_pretrained (GPT-2 or, when minillm has it, BERT backbone)."""
        import json
        d = hub.resolve(str(directory))
        rc_path = d / "reward_config.json"
        if not rc_path.is_file():
            raise hub.CheckpointError(f"{rc_path}: missing; {d} is not a minillm reward model directory "
                                      f"(train one with `minillm train-reward`)")
        rc = json.loads(rc_path.read_text())
        backbone = load_backbone(d, rc.get("backbone"))
        model = cls(backbone, int(rc["hidden_size"]), pool=rc.get("pool", "last"))
        state = hub.read_safetensors_file(d / "score.safetensors")
        hub.load_state_dict_strict(model.score, {k.removeprefix("score."): v for k, v in state.items()},
                                   source=str(d / "score.safetensors"))
        return model.to(device)


def load_backbone(directory: str | Path, kind: Optional[str] = None) -> nn.Module:
    """A reward model's backbone from a hub checkpoint directory: a causal LM (its body's last hidden states are
    read; GPT-2) or an encoder (BERT, DistilBERT, ...). `kind` is accepted for old reward_config.json files."""
    d, mt = model_type(str(directory))
    return load_model(str(d), "causal-lm" if mt in KINDS["causal-lm"] else "encoder")


# ---------------------------------------------------------------------------------------------
# training and scoring on text
# ---------------------------------------------------------------------------------------------


def _device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


def score_texts(rm: RewardModel, tokenizer, prompts: Sequence[str], responses: Sequence[str],
                batch_size: int = 64, max_length: Optional[int] = None) -> torch.Tensor:
    """Rewards (B,) for prompt+response texts, encoded with the reward model's own tokenizer (right-padded).
    Gradients flow when called outside no_grad (training)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    empty = [i for i, r in enumerate(responses) if not r.strip()]
    if empty:
        raise ValueError(f"response(s) {empty[:10]} are empty strings; nothing to score")
    out = []
    dev = _device(rm)
    for s in range(0, len(prompts), batch_size):
        texts = [join_text(p, r) for p, r in zip(prompts[s:s + batch_size], responses[s:s + batch_size])]
        enc = tokenizer(texts, padding_side="right", truncation=max_length is not None, max_length=max_length)
        out.append(rm(enc["input_ids"].to(dev), enc["attention_mask"].to(dev)))
    return torch.cat(out)


class RewardScorer:
    """A reward model as PPO's score_fn(prompts, responses) -> (B,): text is re-encoded with the reward model's
    tokenizer (so it may differ from the policy's), and the reward normalized, (r − mean)/std, with statistics
    measured on the starting policy's samples (so β keeps its meaning whatever scale the reward model has)."""

    def __init__(self, rm: RewardModel, tokenizer, mean: float = 0.0, std: float = 1.0, max_length: Optional[int] = None):
        if not std > 0:
            raise ValueError(f"reward normalization std must be > 0, got {std}")
        self.rm, self.tok, self.mean, self.std, self.max_length = rm, tokenizer, mean, std, max_length

    @torch.no_grad()
    def raw(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        self.rm.eval()
        return score_texts(self.rm, self.tok, prompts, responses, max_length=self.max_length).float().cpu()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return (self.raw(prompts, responses) - self.mean) / self.std


def reward_loss_fn(use_margin: bool = True, center_coef: float = 0.0) -> Callable:
    """The training loop's loss_fn: (model, batch) -> (sum over the pairs of the margin loss, number of pairs)."""
    def loss_fn(model, b: dict):
        rc = model(b["chosen_ids"], b["chosen_mask"])
        rr = model(b["rejected_ids"], b["rejected_mask"])
        n = rc.shape[0]
        return pairwise_margin_loss(rc, rr, b["margin"] if use_margin else None, center_coef=center_coef) * n, n
    return loss_fn


def check_pair_lengths(rm: nn.Module, tokenizer, pairs: list[dict], max_length: Optional[int]) -> None:
    """Before training: without max_length (no truncation), every prompt+response must fit the backbone's
    positions — a DataError naming the pair's file:line, instead of an error in the middle of training."""
    if max_length is not None:
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        return
    limit = None
    for m in rm.modules():
        cfg = getattr(m, "config", None)
        limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        if limit:
            break
    if not limit:
        return
    for i, d in enumerate(pairs):
        for key in ("chosen", "rejected"):
            n = len(tokenizer.encode(join_text(d["prompt"], d[key])))
            if n > limit:
                raise DataError(f"{d.get('_where', f'pair {i}')}: prompt + {key} is {n} tokens, more than the "
                                f"model's {limit} positions; shorten it or pass --max-length to truncate")


def train_reward_model(rm: RewardModel, tokenizer, train_pairs: list[dict], eval_pairs: Optional[list[dict]] = None,
                       epochs: int = 1, batch_size: int = 32, lr: float = 1e-5, center_coef: float = 0.0,
                       use_margin: bool = True, seed: int = 0, grad_clip: float = 1.0,
                       log: Optional[Callable[[dict], None]] = None, max_length: Optional[int] = None,
                       device: Optional[str] = None, out_dir: Optional[str] = None, progress=None) -> dict:
    """`progress`: a RunLog that gets the loop's step lines (with ETA); None trains quietly.
    Train with minillm's training loop (train/loop.py: AdamW, linear decay, no weight decay here, gradient
    clipping) on the pairwise margin loss. Pairs: {"prompt", "chosen", "rejected", "margin"}.
    After each epoch logs {epoch, loss, train_acc (first 1000 training pairs), eval_acc}; returns the last."""
    from minillm.train.loop import TrainConfig, train
    if not train_pairs:
        raise ValueError("train_reward_model: no training pairs")
    check_pair_lengths(rm, tokenizer, train_pairs + list(eval_pairs or []), max_length)
    steps_per_epoch = math.ceil(len(train_pairs) / batch_size)
    if device is None:
        device = str(_device(rm))

    def accuracy(model, pairs):
        return pairwise_accuracy(score_texts(model, tokenizer, [d["prompt"] for d in pairs],
                                             [d["chosen"] for d in pairs], batch_size, max_length),
                                 score_texts(model, tokenizer, [d["prompt"] for d in pairs],
                                             [d["rejected"] for d in pairs], batch_size, max_length))

    recs: list[dict] = []
    seen: list[float] = []  # per-batch mean losses since the last evaluation
    base_loss = reward_loss_fn(use_margin, center_coef)

    def loss_fn(model, b):
        loss, n = base_loss(model, b)
        seen.append(loss.item() / n)
        return loss, n

    def eval_fn(model) -> dict:
        rec = {"epoch": len(recs) + 1, "loss": sum(seen) / max(1, len(seen)),
               "train_acc": accuracy(model, train_pairs[:1000]),
               "eval_acc": accuracy(model, eval_pairs) if eval_pairs else None}
        seen.clear()
        recs.append(rec)
        if log:
            log(rec)
        return {k: v for k, v in rec.items() if isinstance(v, float)}

    cfg = TrainConfig(lr=lr, weight_decay=0.0, epochs=epochs, batch_size=batch_size, max_grad_norm=grad_clip or None,
                      eval_every=steps_per_epoch, seed=seed, device=device, quiet=progress is None, out_dir=out_dir,
                      log_every=max(1, steps_per_epoch * epochs // 20))
    train(rm, train_pairs, RewardPairCollator(tokenizer, max_length), loss_fn, cfg, eval_fn=eval_fn, log=progress,
          phase="rm")
    rm.eval()
    return recs[-1]
