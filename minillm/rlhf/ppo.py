"""PPO for language models: a policy with a value head, rollouts, the clipped losses, the loop.

One PPO step: sample responses to a batch of prompts from the policy π (temperature only: the
KL penalty needs the true distribution, so no top-k/top-p by default); score them; compute per-token
log-probs under π and the frozen reference π_ref; turn score and KL into per-token rewards (kl.py);
estimate advantages with GAE (gae.py) and whiten them; then several epochs over minibatches of

    ratio_t  = exp(log π_θ(y_t) − log π_old(y_t))
    L_policy = mean_t max(−A_t·ratio_t, −A_t·clip(ratio_t, 1−ε, 1+ε))           (clipped surrogate)
    L_value  = ½ mean_t max((V_θ − R_t)², (clip(V_θ, V_old ± ε_v) − R_t)²)       (clipped value loss)
    loss     = L_policy + c_v·L_value − c_e·entropy

Logged per step (cleanrl's diagnostics): mean score, KL, entropy, clip fraction, approx-KL
(½ mean (log ratio)²), value loss, advantage mean/std, response length, β.

The reference model: a deep copy of the policy frozen at the start, or — for a LoRA/QLoRA
policy — the same model with its adapters disabled (one copy of the base weights).

Decoder-only and encoder-decoder policies (T5, as the book's ch. 9 FLAN-T5) share every line of the
math. Only the forward pass over [prompt | response] differs (PPOTrainer.model_inputs): a decoder-only
LM reads the concatenation, the prompt being its first P positions; an encoder-decoder encodes the
prompt and feeds its decoder [decoder_start | response], so P = 1 there. Either way the logits at
positions P−1 … T−2 score the response tokens and the value head reads the same (decoder) hidden states
— as trl's AutoModelForSeq2SeqLMWithValueHead and its batched_forward_pass do.

Sources: Schulman et al., "Proximal Policy Optimization Algorithms" (2017), eq. 7 and 9;
Ziegler et al. (2019); trl v0.11 `PPOTrainer.step/loss` (defaults: ε=0.2, ε_v=0.2, c_v=0.1, γ=1,
λ=0.95); cleanrl's ppo.py for the logged statistics; the course's "policy loss + c1·value loss −
c2·entropy".
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.lora import adapters_disabled, lora_layers
from minillm.models.layers import hidden_size as model_width
from minillm.losses import entropy, masked_mean, masked_var, next_token_logits, token_logprobs, whiten
from minillm.rlhf.gae import compute_gae  # noqa: F401  (re-exported: minillm.rlhf.ppo.compute_gae)
from minillm.rlhf.kl import AdaptiveKLController, FixedKLController, compute_rewards

# ---------------------------------------------------------------------------------------------
# the pieces of the loss
# ---------------------------------------------------------------------------------------------


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: mean over unmasked tokens of max(−A·ratio, −A·clip(ratio, 1−ε, 1+ε)).
    Returns (loss, stats with clipfrac, approxkl = ½ mean (log ratio)², policykl = mean(old − new))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg1, pg2), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((pg2 > pg1).float(), mask).item(),
                 "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask).item(),
                 "policykl": masked_mean(-log_ratio, mask).item(),
                 "ratio": masked_mean(ratio, mask).item()}
    return loss, stats


def value_loss(vpreds: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float = 0.2) -> tuple[torch.Tensor, dict]:
    """½ mean over unmasked tokens of max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²)."""
    vclipped = torch.max(torch.min(vpreds, old_values + cliprange_value), old_values - cliprange_value)
    vf1 = (vpreds - returns) ** 2
    vf2 = (vclipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((vf2 > vf1).float(), mask).item()}
    return loss, stats


# ---------------------------------------------------------------------------------------------
# the models
# ---------------------------------------------------------------------------------------------


class ValueHead(nn.Module):
    """hidden (B, T, H) -> value (B, T). Named `summary` as in trl's ValueHead (v_head.summary)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.summary.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.summary(h.float()).squeeze(-1)


class PolicyWithValueHead(nn.Module):
    """A causal LM (hidden_states(ids, mask) -> (B, T, H) and lm_head(hidden) -> logits) plus a value head
    on the same last hidden states, as trl's AutoModelForCausalLMWithValueHead; or an encoder-decoder
    (`is_encoder_decoder`: encode, decoder_hidden_states, logits_from_hidden) with the value head on the
    decoder's last hidden states, as trl's AutoModelForSeq2SeqLMWithValueHead."""

    def __init__(self, model: nn.Module, hidden_size: Optional[int] = None):
        super().__init__()
        self.model = model
        self.is_encoder_decoder = bool(getattr(model, "is_encoder_decoder", False))
        if hidden_size is None:
            hidden_size = model_width(model)
        self.v_head = ValueHead(hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                decoder_input_ids: Optional[torch.Tensor] = None,
                decoder_attention_mask: Optional[torch.Tensor] = None):
        """-> logits (B, T, V), values (B, T); T = the decoder's length for an encoder-decoder."""
        if self.is_encoder_decoder:
            if decoder_input_ids is None:
                raise ValueError("an encoder-decoder policy needs decoder_input_ids ([decoder_start | response])")
            enc = self.model.encode(input_ids, attention_mask)  # (B, S, H)
            h = self.model.decoder_hidden_states(decoder_input_ids, enc, attention_mask,
                                                 decoder_attention_mask)  # (B, T, H)
            return self.model.logits_from_hidden(h), self.v_head(h)
        h = self.model.hidden_states(input_ids, attention_mask=attention_mask)  # (B, T, H)
        return self.model.lm_head(h), self.v_head(h)


def reference_context(policy_model: nn.Module, ref_model: Optional[nn.Module]):
    """The context under which the reference distribution is computed: nothing to do with a separate ref_model;
    with a LoRA policy and no ref_model, the policy with its adapters switched off."""
    if ref_model is not None:
        return contextlib.nullcontext()
    return adapters_disabled(policy_model)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


@dataclass
class PPOConfig:
    lr: float = 1.41e-5               # the book's PPO learning rate (and trl's default)
    batch_size: int = 64              # rollouts per PPO step
    mini_batch_size: int = 16
    gradient_accumulation_steps: int = 1  # minibatches per optimizer step (trl's; the book's SAWYER uses 4)
    ppo_epochs: int = 4
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0             # entropy bonus (logged always)
    init_kl_coef: float = 0.2
    adaptive_kl: bool = True
    target_kl: float = 6.0            # nats per sequence (sum over the response of k1)
    horizon: float = 10000.0          # samples
    kl_estimator: str = "k1"
    whiten_advantages: bool = True
    max_grad_norm: float = 1.0
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    weight_decay: float = 0.0

    def __post_init__(self):
        from minillm.configs import validate_config  # types and ranges first (a 0 batch size would divide by zero)
        inf = float("inf")
        validate_config(self, error=ValueError,
                        ranges={"lr": (0.0, inf, False), "gamma": (0.0, 1.0, True), "lam": (0.0, 1.0, True),
                                "cliprange": (0.0, inf, False), "cliprange_value": (0.0, inf, False),
                                "vf_coef": (0.0, inf, True), "init_kl_coef": (0.0, inf, True),
                                "target_kl": (0.0, inf, False), "horizon": (0.0, inf, False),
                                "max_grad_norm": (0.0, inf, False), "temperature": (0.0, inf, False),
                                "top_p": (0.0, 1.0, False), "weight_decay": (0.0, inf, True)})
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of mini_batch_size {self.mini_batch_size}")
        ga = self.gradient_accumulation_steps
        if not (isinstance(ga, int) and ga >= 1 and (self.batch_size // self.mini_batch_size) % ga == 0):
            raise ValueError(f"gradient_accumulation_steps {ga} must be an integer >= 1 dividing the "
                             f"{self.batch_size // self.mini_batch_size} minibatches of a batch")


@dataclass
class Rollout:
    """One batch of experience. Sequences are [left-padded prompt | right-padded response] for a decoder-only
    policy; for an encoder-decoder, the decoder's [decoder_start | right-padded response] (P = 1), the prompt
    being the encoder's input."""
    sequences: torch.Tensor      # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    prompt_len: int              # P
    response_mask: torch.Tensor  # (B, R) 1 up to and including the first EOS
    logprobs: torch.Tensor       # (B, R) under the policy that sampled
    ref_logprobs: torch.Tensor   # (B, R) (or (B, R, V) for the 'full' estimator)
    values: torch.Tensor         # (B, R)
    entropy: torch.Tensor        # (B, R)
    encoder_input_ids: Optional[torch.Tensor] = None       # (B, S) encoder-decoder only: the prompts
    encoder_attention_mask: Optional[torch.Tensor] = None  # (B, S)

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len:]

    @property
    def prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt ids, prompt mask) whichever kind of model read them."""
        if self.encoder_input_ids is not None:
            return self.encoder_input_ids, self.encoder_attention_mask
        return self.sequences[:, :self.prompt_len], self.attention_mask[:, :self.prompt_len]


def response_mask_from(responses: torch.Tensor, eos_token_id: Optional[int]) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after; all 1 when there is no EOS (cut at max_new_tokens)."""
    if eos_token_id is None:
        return torch.ones_like(responses)
    is_eos = (responses == eos_token_id).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0  # strictly after the first EOS
    return (~after_eos).long()


class PPOTrainer:
    """policy: PolicyWithValueHead. ref_model: a frozen LM; None = deep copy of the policy's LM at start
    (or, for a LoRA policy, the adapters switched off). score_fn(prompts, responses) -> (B,) scores, on texts
    (decoded with `tokenizer`, so the scorer may use its own tokenizer)."""

    def __init__(self, policy: PolicyWithValueHead, tokenizer, score_fn: Callable[[list[str], list[str]], torch.Tensor],
                 config: PPOConfig, ref_model: Optional[nn.Module] = None, generator: Optional[torch.Generator] = None):
        self.policy, self.tok, self.score_fn, self.cfg = policy, tokenizer, score_fn, config
        if ref_model is None and not lora_layers(policy.model):
            ref_model = copy.deepcopy(policy.model)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        self.ref_model = ref_model
        if config.top_k is not None or config.top_p is not None:
            warnings.warn("PPO rollouts with top-k/top-p: the sampled tokens no longer follow π, so the KL estimate "
                          "is biased (often negative); trl and the literature sample with temperature only")
        params = [p for p in policy.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.kl_ctl = (AdaptiveKLController(config.init_kl_coef, config.target_kl, config.horizon)
                       if config.adaptive_kl else FixedKLController(config.init_kl_coef))
        self.generator = generator
        self.is_encoder_decoder = policy.is_encoder_decoder
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    # ---- forward passes over [prompt | response]: the one place the two kinds of model differ ----
    @staticmethod
    def model_inputs(sequences: torch.Tensor, attention_mask: torch.Tensor,
                     encoder_input_ids: Optional[torch.Tensor] = None,
                     encoder_attention_mask: Optional[torch.Tensor] = None) -> dict:
        """Keyword arguments under which the LM (or the policy) gives logits over `sequences`: decoder-only,
        the sequences themselves; encoder-decoder, the prompts to the encoder and the sequences
        ([decoder_start | response]) to the decoder (trl's prepare_model_inputs)."""
        if encoder_input_ids is None:
            return {"input_ids": sequences, "attention_mask": attention_mask}
        return {"input_ids": encoder_input_ids, "attention_mask": encoder_attention_mask,
                "decoder_input_ids": sequences, "decoder_attention_mask": attention_mask}

    def rollout_inputs(self, ro: Rollout, idx: Optional[torch.Tensor] = None) -> dict:
        """model_inputs for the rows idx (all when None) of a rollout."""
        ts = (ro.sequences, ro.attention_mask, ro.encoder_input_ids, ro.encoder_attention_mask)
        return self.model_inputs(*(t if t is None or idx is None else t[idx] for t in ts))

    def _response_logits(self, model_out_logits: torch.Tensor, P: int) -> torch.Tensor:
        return next_token_logits(model_out_logits, P) / self.cfg.temperature  # (B, R, V): response tokens' logits

    @torch.no_grad()
    def rollout(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Rollout:
        from minillm.generation import generate
        cfg, policy = self.cfg, self.policy
        policy.eval()
        seq = generate(policy.model, prompt_ids, attention_mask=prompt_mask, max_new_tokens=cfg.max_new_tokens,
                       do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                       eos_token_id=self.eos_id, pad_token_id=self.pad_id, generator=self.generator)
        # decoder-only: seq = [prompt | response]; encoder-decoder: seq = [decoder_start | response]
        P = 1 if self.is_encoder_decoder else prompt_ids.shape[1]
        if seq.shape[1] == P:
            raise ValueError("the policy generated no tokens (max_new_tokens = 0?)")
        rmask = response_mask_from(seq[:, P:], self.eos_id)
        first = torch.ones_like(seq[:, :1]) if self.is_encoder_decoder else prompt_mask.long()
        attn = torch.cat([first, rmask], dim=1)
        enc = (prompt_ids, prompt_mask) if self.is_encoder_decoder else ()
        inputs = self.model_inputs(seq, attn, *enc)
        logits, values = policy(**inputs)
        rlogits = self._response_logits(logits, P)
        tokens = seq[:, P:]
        logprobs = token_logprobs(rlogits, tokens)
        ent = entropy(rlogits)
        with reference_context(policy.model, self.ref_model):
            ref = self.ref_model if self.ref_model is not None else policy.model
            ref_logits = self._response_logits(ref(**inputs), P)
        if cfg.kl_estimator == "full":
            ref_lp = F.log_softmax(ref_logits.float(), -1)
        else:
            ref_lp = token_logprobs(ref_logits, tokens)
        return Rollout(seq, attn, P, rmask, logprobs, ref_lp, next_token_logits(values, P).float(), ent, *enc)

    def decode(self, ro: Rollout) -> tuple[list[str], list[str]]:
        """Prompts (pads stripped) and responses (up to and including EOS) as text."""
        prompts, responses = [], []
        p_ids, p_mask = ro.prompts
        for i in range(ro.sequences.shape[0]):
            p = p_ids[i][p_mask[i].bool()]
            r = ro.responses[i][ro.response_mask[i].bool()]
            prompts.append(self.tok.decode(p.tolist()))
            responses.append(self.tok.decode(r.tolist()))
        return prompts, responses

    def step(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> dict:
        """One PPO step on a batch of left-padded prompts. Returns the step's statistics."""
        ro = self.rollout(prompt_ids, prompt_mask)
        prompts, responses = self.decode(ro)
        scores = self.score_fn(prompts, responses)
        scores = torch.as_tensor(scores, dtype=torch.float32, device=ro.logprobs.device)
        B = ro.sequences.shape[0]
        if scores.shape != (B,):
            raise ValueError(f"score_fn returned shape {tuple(scores.shape)}, expected ({B},): one score per response")
        return self.train_on(ro, scores, texts=(prompts, responses))

    def train_on(self, ro: Rollout, scores: torch.Tensor, texts=None) -> dict:
        cfg = self.cfg
        mask = ro.response_mask.float()
        full = cfg.kl_estimator == "full"
        if full:
            with torch.no_grad():
                logits, _ = self.policy(**self.rollout_inputs(ro))
                lp_full = F.log_softmax(self._response_logits(logits, ro.prompt_len).float(), -1)
            rewards, non_score, kl = compute_rewards(scores, lp_full, ro.ref_logprobs, mask, self.kl_ctl.value, "full")
        else:
            rewards, non_score, kl = compute_rewards(scores, ro.logprobs, ro.ref_logprobs, mask, self.kl_ctl.value,
                                                     cfg.kl_estimator)
        seq_kl_k1 = ((ro.logprobs - (ro.ref_logprobs if not full else
                                     ro.ref_logprobs.gather(-1, ro.responses.unsqueeze(-1)).squeeze(-1))) * mask).sum(-1)
        mean_kl = seq_kl_k1.mean().item()
        advantages, returns = compute_gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
        adv_mean, adv_std = masked_mean(advantages, mask).item(), masked_var(advantages, mask).sqrt().item()
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)

        # Dropout stays off (eval mode) in every PPO forward pass, as trl disables it: otherwise the ratio
        # π_θ/π_old would differ from 1 by dropout noise alone, before any update.
        self.policy.eval()
        B, mb, ga = ro.sequences.shape[0], cfg.mini_batch_size, cfg.gradient_accumulation_steps
        agg: dict[str, list[float]] = {}
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=self.generator) if self.generator is not None else torch.randperm(B)
            for i, s in enumerate(range(0, B, mb)):
                idx = perm[s:s + mb].to(ro.sequences.device)
                logits, vpred = self.policy(**self.rollout_inputs(ro, idx))
                rlogits = self._response_logits(logits, ro.prompt_len)
                lp = token_logprobs(rlogits, ro.responses[idx])
                vpred = next_token_logits(vpred, ro.prompt_len).float()
                m = mask[idx]
                pg, pstats = policy_loss(lp, ro.logprobs[idx], advantages[idx], m, cfg.cliprange)
                vf, vstats = value_loss(vpred, ro.values[idx], returns[idx], m, cfg.cliprange_value)
                ent = masked_mean(entropy(rlogits), m)
                loss = pg + cfg.vf_coef * vf - cfg.ent_coef * ent
                if i % ga == 0:
                    self.opt.zero_grad(set_to_none=True)
                (loss / ga).backward()  # ga minibatches of mb: one step on their mean loss
                if (i + 1) % ga == 0:
                    if cfg.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                    self.opt.step()
                for k, v in {**pstats, **vstats, "policy_loss": pg.item(), "value_loss": vf.item()}.items():
                    agg.setdefault(k, []).append(v)

        kl_coef_used = self.kl_ctl.value
        self.kl_ctl.update(mean_kl, B)
        if mean_kl < -0.05:
            warnings.warn(f"mean KL to the reference is negative ({mean_kl:.3f} nats/sequence). KL(π‖π_ref) ≥ 0, "
                          f"so the estimate is off; likely causes: top-k/top-p sampling (tokens not drawn from π), "
                          f"a suppressed or forced EOS, padding tokens counted in the log-probs, or a temperature "
                          f"mismatch between sampling and scoring")
        stats = {k: sum(v) / len(v) for k, v in agg.items()}
        stats.update({
            "score": scores.mean().item(),
            "score_std": scores.std().item() if B > 1 else 0.0,
            "kl": mean_kl,
            "kl_penalty": (non_score * mask).sum(-1).mean().item(),
            "kl_coef": kl_coef_used,
            "entropy": masked_mean(ro.entropy, mask).item(),
            "adv_mean": adv_mean,
            "adv_std": adv_std,
            "response_length": mask.sum(-1).mean().item(),
        })
        return stats
