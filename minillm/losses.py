"""The losses and masked reductions every trainer in minillm shares, each written once.

A causal LM's logits at position t predict token t+1 (the *next-token shift*). Every loss on
token sequences — SFT's cross-entropy, DPO's sequence log-probs, PPO's per-token ratios and KL —
reads the same shifted pairs:

    log p(x_{t+1} | x_≤t) = log_softmax(z_t)[x_{t+1}],      z = model(x)   (B, T, V)
    LM loss               = −Σ_{t: label_{t+1} ≠ −100} log p(label_{t+1} | x_≤t)  and the count N
    H(p_t)                = logsumexp(z_t) − Σ_v softmax(z_t)_v · z_{t,v}              (entropy)

Masked reductions over real tokens only (mask 1 = real, 0 = padding):

    masked_mean(x, m) = Σ m·x / Σ m;   masked_var = masked_mean((x − μ)²) · n/(n−1) (unbiased, as trl)
    whiten(x, m)      = (x − μ) / sqrt(var + 1e-8), 0 at padding

And the classification losses of the encoder classifiers: cross-entropy (one class per example),
binary cross-entropy with one sigmoid per label (multi-label: the book's movie genres), MSE
(one output: regression) — transformers' `problem_type` rules.

Sources: Radford et al. (2018/2019) for the LM objective; trl v0.11 `core.logprobs_from_logits`,
`entropy_from_logits`, `masked_mean/var/whiten`; transformers' sequence-classification losses;
the book, ch. 10 (multi-label classification).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a label the loss skips (padding, masked prompts), as in torch's cross_entropy
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ---- the next-token shift ----
def next_token_logits(logits: torch.Tensor, start: int = 1) -> torch.Tensor:
    """The logits that predict tokens start, start+1, …, T−1 of the input: logits[:, start−1 : −1].

    (B, T, V) -> (B, T − start, V); any (B, T, ...) per-position tensor (values) slices the same way. start=1: every token but the first (it has no prediction);
    start=P: the response after a prompt of P tokens."""
    if not 1 <= start < logits.shape[1]:
        raise ValueError(f"start must be in [1, {logits.shape[1] - 1}] for {logits.shape[1]} positions, got {start}")
    return logits[:, start - 1:-1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token], computed in at least fp32: (B, T, V), (B, T) -> (B, T)."""
    return F.log_softmax(_at_least_fp32(logits), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, start: int = 1) -> torch.Tensor:
    """log p(x_t | x_<t) for t = start … T−1: (B, T, V), (B, T) -> (B, T − start)."""
    return token_logprobs(next_token_logits(logits, start), input_ids[:, start:])


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) − Σ softmax(z)·z per position: (…, V) -> (…)."""
    logits = _at_least_fp32(logits)
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(-1)


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over positions whose label is not −100, and their count.

    Token t predicts label t+1. Rather than slicing the big logits (a copy of B·T·V floats), the
    labels move one step left with a −100 appended, so the last position predicts nothing (as
    transformers does). Computed in fp32 (or fp64 when given fp64)."""
    V = logits.shape[-1]
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # (B·T,)
    logits = logits.reshape(-1, V).to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32
    loss = F.cross_entropy(logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (shift_labels != IGNORE_INDEX).sum()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy over labelled positions (lm_loss_sum / its count; 0 when none)."""
    total, n = lm_loss_sum(logits, labels)
    return total / n.clamp(min=1)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of logits_t against labels_t — the SAME position, no next-token shift — summed over
    labels ≠ −100, and their count: (B, T, V), (B, T) -> (scalar, scalar).

    For an encoder-decoder the decoder was fed the labels already shifted right (decoder_input_ids =
    [start] + labels[:-1]), so decoder logit t predicts label t. Computed in at least fp32."""
    V = logits.shape[-1]
    flat = labels.reshape(-1)  # (B·T,)
    logits = logits.reshape(-1, V).to(torch.promote_types(logits.dtype, torch.float32))  # (B·T, V)
    loss = F.cross_entropy(logits, flat, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (flat != IGNORE_INDEX).sum()


# ---- masked reductions ----
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of x over entries where mask is 1. dim=None: one number (an all-zero mask is an error);
    dim=d: the mean along d (mask broadcast against x; a slice with no real entry gives 0)."""
    m = mask.to(x.dtype)
    if dim is None:
        n = m.sum()
        if n == 0:
            raise ValueError("masked_mean: the mask selects no entries")
        return (x * m).sum() / n
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1e-9)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the unmasked entries; unbiased (n/(n−1)) by default, as trl's masked_var."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        if n < 2:
            raise ValueError(f"masked_var: unbiased variance needs at least 2 unmasked entries, got {int(n)}")
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, unbiased: bool = True) -> torch.Tensor:
    """(x − mean)/sqrt(var + 1e-8) over unmasked entries; shift_mean=False adds the mean back (scale only).
    Masked entries are returned as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=unbiased)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def mean_pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of hidden states (B, T, H) over real tokens -> (B, H) (sentence-transformers' mean pooling)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    return masked_mean(hidden, attention_mask[:, :, None], dim=1)  # mask (B, T, 1) against (B, T, H)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) position of the last 1 in each row of a (B, T) mask — right or left padding alike.
    An all-zero row is an error (nothing to read there)."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got {tuple(mask.shape)}")
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"row(s) {empty[:10]} are empty (mask all zero): every row needs at least one token")
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.full_like(pos, -1)).max(-1).values


# ---- sequence classification ----
def infer_problem_type(num_labels: int, labels: torch.Tensor) -> str:
    """transformers' rule: 1 label -> regression; integer labels -> single-label; else multi-label."""
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int, torch.int32, torch.int16, torch.uint8):
        return "single_label_classification"
    return "multi_label_classification"


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: Optional[str] = None) -> torch.Tensor:
    """Mean loss of logits (B, num_labels) against labels: (B,) class ids, (B, num_labels) 0/1, or (B,) floats."""
    num_labels = logits.shape[-1]
    problem_type = problem_type or infer_problem_type(num_labels, labels)
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1) if num_labels == 1 else logits, labels.to(logits.dtype))
    if problem_type == "single_label_classification":
        kept = labels[labels != IGNORE_INDEX]
        if kept.numel() and (kept.max() >= num_labels or kept.min() < 0):
            raise ValueError(f"labels must be class ids in [0, {num_labels}) (or -100 to ignore), "
                             f"found {int(labels.min())}..{int(labels.max())}")
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1).long(), ignore_index=IGNORE_INDEX)
    if problem_type == "multi_label_classification":
        if labels.shape != logits.shape:
            raise ValueError(f"multi-label targets must have the logits' shape {tuple(logits.shape)}, "
                             f"found {tuple(labels.shape)}")
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise ValueError(f"problem_type {problem_type!r} is not one of {PROBLEM_TYPES}")


def multilabel_predictions(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """0/1 predictions (B, num_labels): label k is on when sigmoid(z_k) >= threshold."""
    return (torch.sigmoid(logits) >= threshold).long()
