"""Golden part `rlhf`: reference values for the reward loss, the KL penalty, GAE, the PPO losses, the
adaptive KL controller and DPO, from a per-definition float64 numpy implementation of trl's formulas.

trl is not a dependency (its PPOTrainer also drags in accelerate/datasets), so each function below
transcribes the corresponding trl v0.11 code, line by line, in numpy — cited at each one. It does
NOT import minillm: the tests compare minillm's torch code against these independent values.

  trl/trainer/ppo_trainer.py (v0.11): PPOTrainer.compute_rewards, _kl_penalty, compute_advantages, loss
  trl/core.py (v0.11): masked_mean, masked_var, masked_whiten, clip_by_value, entropy_from_logits
  trl/trainer/utils.py (v0.11): AdaptiveKLController
  trl/trainer/dpo_trainer.py: dpo_loss (loss_type="sigmoid")

Writes tests/golden/rlhf.safetensors (inputs and outputs, float64).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from golden.common import seed_all, write_golden


# ---- trl/core.py ----
def masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def masked_var(values, mask, unbiased=True):
    mean = masked_mean(values, mask)
    centered_values = values - mean
    variance = masked_mean(centered_values ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def masked_whiten(values, mask, shift_mean=True):
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) / np.sqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def clip_by_value(x, tensor_min, tensor_max):
    return np.maximum(np.minimum(x, tensor_max), tensor_min)


def logsumexp(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def log_softmax(x):
    return x - logsumexp(x)[..., None]


def entropy_from_logits(logits):
    pd = np.exp(log_softmax(logits))
    return logsumexp(logits) - (pd * logits).sum(-1)


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


# ---- PPOTrainer._kl_penalty (k3 is not in v0.11's classic trainer: Schulman's estimator, as trl's RLOO/PPOv2 use) ----
def kl_penalty(logprob, ref_logprob, kind):
    if kind == "kl":
        return logprob - ref_logprob
    if kind == "abs":
        return np.abs(logprob - ref_logprob)
    if kind == "mse":
        return 0.5 * (logprob - ref_logprob) ** 2
    if kind == "k3":
        logr = ref_logprob - logprob
        return (np.exp(logr) - 1) - logr
    if kind == "full":  # F.kl_div(ref_logprob, logprob, log_target=True, reduction="none").sum(-1)
        return (np.exp(logprob) * (logprob - ref_logprob)).sum(-1)
    raise ValueError(kind)


# ---- PPOTrainer.compute_rewards: per-sample loop, score at the last non-masked index ----
def compute_rewards(scores, logprobs, ref_logprobs, masks, kl_coef, kind):
    rewards, kls = [], []
    for score, logprob, ref_logprob, mask in zip(scores, logprobs, ref_logprobs, masks):
        kl = kl_penalty(logprob, ref_logprob, kind)
        non_score_reward = -kl_coef * kl
        reward = non_score_reward.copy()
        last_non_masked_index = np.nonzero(mask)[0][-1]
        reward[last_non_masked_index] += score
        rewards.append(reward)
        kls.append(kl)
    return np.stack(rewards), np.stack(kls)


# ---- PPOTrainer.compute_advantages ----
def compute_advantages(values, rewards, mask, gamma, lam):
    lastgaelam = 0
    advantages_reversed = []
    gen_len = rewards.shape[-1]
    values = values * mask
    rewards = rewards * mask
    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = np.stack(advantages_reversed[::-1]).transpose(1, 0)
    returns = advantages + values
    whitened = masked_whiten(advantages, mask)
    return values, advantages, returns, whitened


# ---- PPOTrainer.loss ----
def ppo_loss(old_logprobs, values, logits, vpreds, logprobs, mask, advantages, returns, cliprange, cliprange_value,
             vf_coef):
    vpredclipped = clip_by_value(vpreds, values - cliprange_value, values + cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(np.maximum(vf_losses1, vf_losses2), mask)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).astype(np.float64), mask)
    ratio = np.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * np.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(np.maximum(pg_losses, pg_losses2), mask)
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).astype(np.float64), mask)
    loss = pg_loss + vf_coef * vf_loss
    entropy = masked_mean(entropy_from_logits(logits), mask)
    approxkl = 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)
    policykl = masked_mean(old_logprobs - logprobs, mask)
    return dict(pg_loss=pg_loss, vf_loss=vf_loss, loss=loss, pg_clipfrac=pg_clipfrac, vf_clipfrac=vf_clipfrac,
                entropy=entropy, approxkl=approxkl, policykl=policykl)


# ---- trainer/utils.py AdaptiveKLController ----
def adaptive_kl(init, target, horizon, kls, n_steps):
    value, out = init, []
    for current in kls:
        proportional_error = np.clip(current / target - 1, -0.2, 0.2)
        mult = 1 + proportional_error * n_steps / horizon
        value *= mult
        out.append(value)
    return np.array(out)


def make(root: Path) -> None:
    seed_all(0)
    rng = np.random.default_rng(0)
    B, T, V = 4, 7, 11
    lengths = np.array([7, 5, 3, 1])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)  # right-padded responses
    logits = rng.normal(size=(B, T, V)) * 2.0
    ref_logits = logits + rng.normal(size=(B, T, V)) * 0.5
    tokens = rng.integers(0, V, size=(B, T))
    lp_full, ref_full = log_softmax(logits), log_softmax(ref_logits)
    logprobs = np.take_along_axis(lp_full, tokens[..., None], -1)[..., 0]
    ref_logprobs = np.take_along_axis(ref_full, tokens[..., None], -1)[..., 0]
    scores = rng.normal(size=B) * 2.0
    values = rng.normal(size=(B, T))  # nonzero at padding on purpose: trl masks them
    kl_coef, gamma, lam = 0.2, 0.99, 0.95
    out = {"mask": mask, "logits": logits, "ref_logits": ref_logits, "tokens": tokens.astype(np.int64),
           "logprobs": logprobs, "ref_logprobs": ref_logprobs, "scores": scores, "values": values}
    for kind, name in (("kl", "k1"), ("abs", "abs"), ("mse", "mse"), ("k3", "k3"), ("full", "full")):
        lp, rp = (lp_full, ref_full) if kind == "full" else (logprobs, ref_logprobs)
        rewards, kl = compute_rewards(scores, lp, rp, mask, kl_coef, kind)
        out[f"kl_{name}"] = kl
        out[f"rewards_{name}"] = rewards * mask  # trl's rewards at padding are −β·KL of pad tokens; masked anyway
    rewards = out["rewards_k1"]
    _, adv, ret, adv_w = compute_advantages(values, rewards, mask, gamma, lam)
    out.update(advantages=adv, returns=ret, advantages_whitened=adv_w)
    # the loss on a perturbed policy (ratio != 1) so clipping matters
    new_logits = logits + rng.normal(size=(B, T, V)) * 0.3
    new_logprobs = np.take_along_axis(log_softmax(new_logits), tokens[..., None], -1)[..., 0]
    vpreds = values * mask + rng.normal(size=(B, T)) * 0.4
    losses = ppo_loss(logprobs, values * mask, new_logits, vpreds, new_logprobs, mask, adv_w, ret,
                      cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    out.update(new_logits=new_logits, new_logprobs=new_logprobs, vpreds=vpreds)
    out.update({f"loss_{k}": np.array(v) for k, v in losses.items()})
    kls_seq = np.array([3.0, 9.0, 6.5, 0.5, 12.0])
    out["ctl_kls"] = kls_seq
    out["ctl_values"] = adaptive_kl(0.2, 6.0, 10000.0, kls_seq, n_steps=256)
    # DPO (trl dpo_loss, sigmoid): −log σ(β·((πc − πr) − (refc − refr)))
    pc, pr, rc, rr = (rng.normal(size=6) * 5 - 20 for _ in range(4))
    beta = 0.1
    out.update(dpo_pc=pc, dpo_pr=pr, dpo_rc=rc, dpo_rr=rr,
               dpo_loss=np.array(-log_sigmoid(beta * ((pc - rc) - (pr - rr))).mean()),
               dpo_chosen_rewards=beta * (pc - rc), dpo_rejected_rewards=beta * (pr - rr))
    # the pairwise margin loss (−logsigmoid(r_c − r_r − m).mean(), the book's eq.)
    rc_, rr_, mg = rng.normal(size=8), rng.normal(size=8), rng.integers(0, 9, size=8).astype(np.float64)
    out.update(rm_chosen=rc_, rm_rejected=rr_, rm_margin=mg,
               rm_loss_margin=np.array(-log_sigmoid(rc_ - rr_ - mg).mean()),
               rm_loss_plain=np.array(-log_sigmoid(rc_ - rr_).mean()),
               rm_loss_centered=np.array(-log_sigmoid(rc_ - rr_).mean() + 0.01 * ((rc_ + rr_) ** 2).mean()))
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
    write_golden(root, "rlhf", tensors, {"source": "per-definition numpy transcription of trl v0.11 formulas",
                                         "kl_coef": kl_coef, "gamma": gamma, "lam": lam, "cliprange": 0.2,
                                         "cliprange_value": 0.2, "vf_coef": 0.1, "ctl": "init 0.2 target 6 horizon 1e4 n 256",
                                         "dpo_beta": beta, "center_coef": 0.01})
