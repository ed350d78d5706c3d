"""Generalized advantage estimation (GAE), for PPO on token sequences.

Each response token is one step of an episode. The advantage of step t says how much better the
step turned out than the value head expected; GAE blends n-step estimates with weight λ:

    δ_t = r_t + γ·V_{t+1} − V_t                (V_{T} = 0 after the last step)
    A_t = δ_t + γλ·A_{t+1}                      (computed as a reverse loop)
    R_t = A_t + V_t                             (the value head's regression target)

λ = 0 gives the one-step TD error δ_t; λ = 1, γ = 1 gives (rewards-to-go) − V_t.

Padding convention: `mask` (B, T) is 1 on real response tokens, 0 on padding. A 0 ends the
episode: rewards and values at masked positions are treated as 0 and never reach an unmasked
advantage (for right-padded responses this is exactly trl's `compute_advantages`), and
advantages/returns at masked positions are 0.

Whitening of the advantages (losses.whiten) happens after, in PPO's update.

Sources: Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage
Estimation" (2016), eq. 16; trl v0.11 `PPOTrainer.compute_advantages` and `core.masked_whiten`.
"""

from __future__ import annotations

from typing import Optional

import torch


def _check_bt(name: str, x: torch.Tensor, shape: Optional[torch.Size] = None) -> None:
    if not torch.is_tensor(x) or x.dim() != 2:
        raise ValueError(f"{name} must be a (batch, steps) tensor, got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} (same as rewards)")


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards, values, mask: (B, T) -> (advantages, returns), both (B, T), no whitening.

    A 0 in the mask ends the episode (see the module docstring); masked outputs are 0."""
    _check_bt("rewards", rewards)
    _check_bt("values", values, rewards.shape)
    _check_bt("mask", mask, rewards.shape)
    m = mask.to(rewards.dtype)
    rewards, values = rewards * m, values * m  # what sits at padding never enters the sums
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        if t + 1 < T:
            # the episode continues into t+1 only where t+1 is a real token
            next_value = values[:, t + 1] * m[:, t + 1]
            next_adv = advantages[:, t + 1] * m[:, t + 1]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_adv) * m[:, t]
    returns = (advantages + values) * m
    return advantages, returns
