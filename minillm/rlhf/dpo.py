"""Direct Preference Optimization: learn from preference pairs with no reward model and no sampling.

DPO shows that the KL-regularized RLHF objective has a closed-form optimum in which the
reward is implicit, r(x, y) = β·log(π(y|x)/π_ref(y|x)) (+ a term that cancels in pairs). Putting
that reward into the pairwise (Bradley–Terry) loss gives a loss on the policy itself:

    loss = mean( −log σ( β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))] ) )

where log π(y) is the SUM of the response tokens' log-probs (prompt tokens excluded). When
π = π_ref the bracket is 0 and the loss is log 2 ≈ 0.6931.

Sources: Rafailov et al., "Direct Preference Optimization" (2023), eq. 7; trl's DPOTrainer
`dpo_loss` (loss_type "sigmoid"); the book ch. 10 names DPO as PPO's pair-only cousin.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minillm.losses import next_token_logprobs


def sequence_logprob(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log π(token) over response tokens. logits (B, T, V) from the model on input_ids (B, T);
    response_mask (B, T) marks the response tokens of input_ids (the logits at t−1 predict token t)."""
    if logits.shape[:2] != input_ids.shape or response_mask.shape != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must agree on (batch, seq_len)")
    if bool((response_mask[:, 0] != 0).any()):
        raise ValueError("response_mask marks position 0: the first token has no prediction (the prompt must come first)")
    empty = (response_mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"row(s) {empty[:10]} have an empty response")
    lp = next_token_logprobs(logits, input_ids)  # (B, T-1)
    return (lp * response_mask[:, 1:].to(lp.dtype)).sum(-1)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All inputs (B,) summed response log-probs. Returns (loss scalar, chosen_rewards (B,), rejected_rewards (B,)),
    the implicit rewards β·(log π − log π_ref). label_smoothing ε: conservative DPO (ε = 0: plain DPO)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"dpo_loss: beta must be a finite number > 0, got {beta!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0 <= label_smoothing <= 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5] (trl's range; 0.5: no preference left), "
                         f"got {label_smoothing!r}")
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or policy_chosen_logps.dim() != 1:
        raise ValueError(f"dpo_loss: the four log-prob tensors must share one (batch,) shape, got "
                         f"{[tuple(s) for s in shapes]}")
    for name, t in (("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps),
                    ("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if not torch.isfinite(t).all():
            raise ValueError(f"dpo_loss: {name} contains NaN or Inf")
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    z = beta * (chosen_logratio - rejected_logratio)
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss.mean(), beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def dpo_loss_from_models(policy, ref_model, chosen_ids: torch.Tensor, chosen_attn: torch.Tensor,
                         chosen_resp_mask: torch.Tensor, rejected_ids: torch.Tensor, rejected_attn: torch.Tensor,
                         rejected_resp_mask: torch.Tensor, beta: float = 0.1,
                         label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss from two causal LMs (forward(ids, attention_mask) -> logits) on right-padded [prompt|response]."""
    pc = sequence_logprob(policy(chosen_ids, attention_mask=chosen_attn), chosen_ids, chosen_resp_mask)
    pr = sequence_logprob(policy(rejected_ids, attention_mask=rejected_attn), rejected_ids, rejected_resp_mask)
    with torch.no_grad():
        rc = sequence_logprob(ref_model(chosen_ids, attention_mask=chosen_attn), chosen_ids, chosen_resp_mask)
        rr = sequence_logprob(ref_model(rejected_ids, attention_mask=rejected_attn), rejected_ids, rejected_resp_mask)
    return dpo_loss(pc, pr, rc, rr, beta, label_smoothing)
