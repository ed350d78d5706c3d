"""The KL penalty that keeps the PPO policy near its frozen reference, and the controllers of its weight β.

A policy optimized against a learned reward finds texts the reward model over-rates ("reward
hacking"). RLHF therefore pays, at every response token, a penalty proportional to how far
the policy π moved from the reference π_ref (the SFT model), and adds the reward model's
score at the last response token:

    r_t = −β · KL_t                 for every response token t
    r_T += score                    at the last response token (the EOS when the response has one)

KL_t is a per-token estimate of KL(π‖π_ref) from the sampled token's log-probs
(log r = log π(y_t) − log π_ref(y_t)), or the exact sum over the vocabulary:

    k1   = log r                    unbiased, can be negative per token (trl "kl")
    abs  = |log r|                  (trl "abs")
    mse  = ½ (log r)²               (trl "mse"; Schulman's k2)
    k3   = (e^{−log r} − 1) + log r unbiased and ≥ 0 (Schulman's k3)
    full = Σ_v π(v)(log π(v) − log π_ref(v))   exact, needs the whole distributions (trl "full")

EOS/padding convention: responses are right-padded; the response mask is 1 up to and including
the first EOS and 0 after it (a response cut at max_new_tokens simply ends at its last token).
The score lands on the last position where the mask is 1; padding gets no KL and no reward.

β: FixedKLController keeps it; AdaptiveKLController moves it toward a target KL
(β ← β·(1 + clip(KL/target − 1, −0.2, 0.2) · n_steps/horizon)), where KL is the batch mean of the
per-sequence summed k1.

Sources: Ziegler et al., "Fine-Tuning Language Models from Human Preferences" (2019), §2.2;
J. Schulman, "Approximating KL Divergence" (2020, k1/k2/k3); trl v0.11 `PPOTrainer.compute_rewards`,
`_kl_penalty`, `AdaptiveKLController`.
"""

from __future__ import annotations

import torch

from minillm.losses import last_token_index

KL_ESTIMATORS = ("k1", "abs", "mse", "k3", "full")


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate.

    k1/abs/mse/k3: logprob, ref_logprob are the sampled tokens' log-probs, (B, T) -> (B, T).
    full: they are the whole log-distributions, (B, T, V) -> (B, T)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; one of {KL_ESTIMATORS}")
    if logprob.shape != ref_logprob.shape:
        raise ValueError(f"logprob {tuple(logprob.shape)} and ref_logprob {tuple(ref_logprob.shape)} differ in shape")
    if estimator == "full":
        if logprob.dim() != 3:
            raise ValueError("the 'full' KL needs the full log-distributions (B, T, vocab), "
                             f"got shape {tuple(logprob.shape)}")
        return (logprob.exp() * (logprob - ref_logprob)).sum(-1)
    log_r = logprob - ref_logprob
    if estimator == "k1":
        return log_r
    if estimator == "abs":
        return log_r.abs()
    if estimator == "mse":
        return 0.5 * log_r ** 2
    return torch.expm1(-log_r) + log_r  # k3: (π_ref/π − 1) − log(π_ref/π)


def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                    kl_coef: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = −β·KL_t, plus the score at the last response token.

    scores: (B,); logprobs, ref_logprobs: (B, T) (or (B, T, V) for 'full'); mask: (B, T).
    Returns (rewards, non_score_rewards, kl), each (B, T), zero at padding."""
    B, T = mask.shape
    if not torch.is_tensor(scores):
        scores = torch.as_tensor(scores, dtype=torch.float32)
    if scores.dim() != 1 or scores.shape[0] != B:
        raise ValueError(f"scores must be one number per response, shape ({B},); got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
        raise ValueError(f"scores are NaN or infinite for response(s) {bad[:10]}; check the reward model / scorer")
    if tuple(logprobs.shape[:2]) != (B, T):
        raise ValueError(f"logprobs have shape {tuple(logprobs.shape)}, expected ({B}, {T}) like the response mask")
    m = mask.to(logprobs.dtype)
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * m  # (B, T)
    non_score = -kl_coef * kl
    rewards = non_score.clone()
    idx = last_token_index(mask)
    rewards[torch.arange(B, device=rewards.device), idx] += scores.to(rewards.dtype)
    return rewards, non_score, kl


class FixedKLController:
    """β stays where it is set."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: β grows when KL is above target, shrinks below.

    e = clip(KL/target − 1, −0.2, 0.2);  β ← β · (1 + e · n_steps / horizon)
    current_kl: mean over the batch of the per-sequence summed KL; n_steps: samples in the batch."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

