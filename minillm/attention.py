"""Scaled dot-product attention, written out, and multi-head attention around it.

Each query asks "which keys look like me?"; the answer is a softmax over scaled dot
products, and the output is the matching mix of values:

    Attention(Q, K, V) = softmax(Q Kᵀ / √d_k + M) · V

M is an additive mask: 0 where a query may look, −∞ where it may not (a causal mask hides
the future, a padding mask hides pad tokens). A row whose every key is masked has no
distribution to take; we return zeros for it (as torch's SDPA does) instead of NaN.

Multi-head attention runs h such attentions side by side on d_model/h-wide slices and
concatenates them: MultiHead(X) = Concat(head_1..head_h) W_O, head_i = Attention(X W_Q^i,
X_kv W_K^i, X_kv W_V^i). With X_kv = X it is self-attention; with X_kv = an encoder's
output it is cross-attention (queries from the decoder, keys and values from the encoder).
A KV cache keeps the keys and values of earlier positions so that generating one new token
costs one row of attention instead of a whole sequence.

Source: Vaswani et al., "Attention Is All You Need" (2017), §3.2; the book, ch. 9
("I like cats": the query "like" attends 22% to "I", 42% to itself, 36% to "cats").
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.linear import Linear


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    return_weights: bool = False,
    use_sdpa: bool = False,
):
    """softmax(q kᵀ · scale + mask) · v over the last two dims.

    q: (..., T, d), k: (..., S, d), v: (..., S, dv). `attn_mask` broadcasts to (..., T, S):
    a bool mask is True where attention is allowed; a float mask is added to the scores.
    `is_causal` hides key j > i from query i (aligned to the end when S > T, as with a
    KV cache). Returns the output (..., T, dv), and the weights (..., T, S) when
    `return_weights` is set. `use_sdpa` takes torch's fused kernel (same math, tested equal);
    it cannot return weights.
    """
    T, S = q.shape[-2], k.shape[-2]
    if k.shape[-1] != q.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    if is_causal:
        causal = causal_mask(T, S, q.device)
        attn_mask = causal if attn_mask is None else combine_masks(attn_mask, causal)
    if use_sdpa and not return_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., T, S)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if attn_mask is not None:
        # A fully masked row is all -inf: softmax gives NaN there; it attends to nothing.
        weights = torch.nan_to_num(weights, nan=0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = weights @ v  # (..., T, dv)
    return (out, weights) if return_weights else out


def causal_mask(T: int, S: Optional[int] = None, device=None) -> torch.Tensor:
    """Bool (T, S) mask, True where query i (at absolute position S - T + i) may see key j."""
    S = T if S is None else S
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 1/0 attention mask -> bool (B, 1, 1, S), True at real tokens (broadcasts over heads and queries)."""
    return attention_mask.bool()[:, None, None, :]


def combine_masks(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Both masks must allow a position: AND of bool masks, sum of additive ones."""
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    to_add = lambda m: torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf")) if m.dtype == torch.bool else m
    return to_add(a) + to_add(b)


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, C) -> (B, nh, T, hs)."""
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, hs) -> (B, T, nh*hs)."""
    B, nh, T, hs = x.shape
    return x.transpose(1, 2).reshape(B, T, nh * hs)


class KVCache:
    """Keys and values of the positions seen so far, one (k, v) pair per layer.

    Buffers are allocated once for `max_length` positions, (B, nh, max_length, hs), and
    written in place, so a decoding step costs no copy of the past. `update` appends the
    new keys/values of a layer and returns everything cached for it so far.
    """

    def __init__(self, n_layer: int, max_length: Optional[int] = None):
        self.n_layer = n_layer
        self.max_length = max_length
        self.keys: list[Optional[torch.Tensor]] = [None] * n_layer
        self.values: list[Optional[torch.Tensor]] = [None] * n_layer
        self.lengths = [0] * n_layer

    @property
    def seq_len(self) -> int:
        """Positions cached (in layer 0)."""
        return self.lengths[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, nh, t, hs = k.shape
        start = self.lengths[layer]
        if self.keys[layer] is None:
            cap = max(self.max_length or 0, t)
            self.keys[layer] = k.new_empty(B, nh, cap, hs)
            self.values[layer] = v.new_empty(B, nh, cap, v.shape[-1])
        elif start + t > self.keys[layer].shape[2]:  # grow: double the capacity
            cap = max(2 * self.keys[layer].shape[2], start + t)
            for buf in (self.keys, self.values):
                old = buf[layer]
                buf[layer] = old.new_empty(B, nh, cap, old.shape[-1])
                buf[layer][:, :, :start] = old[:, :, :start]
        self.keys[layer][:, :, start:start + t] = k
        self.values[layer][:, :, start:start + t] = v
        self.lengths[layer] = start + t
        return self.keys[layer][:, :, :start + t], self.values[layer][:, :, :start + t]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. when finished rows are dropped)."""
        for buf in (self.keys, self.values):
            for i, t in enumerate(buf):
                if t is not None:
                    buf[i] = t.index_select(0, index)


class MultiHeadAttention(nn.Module):
    """Multi-head self- or cross-attention with separate query/key/value/output projections.

    forward(x, context=None): self-attention when `context` is None, else cross-attention
    with keys/values from `context` (B, S, kv_dim). Optional causal masking, padding mask
    (B, S) of 1/0, and a KV cache for incremental decoding (self-attention only).
    """

    def __init__(self, d_model: int, n_head: int, kv_dim: Optional[int] = None, bias: bool = True,
                 dropout: float = 0.0, causal: bool = False, use_sdpa: bool = True):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        kv_dim = d_model if kv_dim is None else kv_dim
        self.n_head, self.causal, self.dropout, self.use_sdpa = n_head, causal, dropout, use_sdpa
        self.query = Linear(d_model, d_model, bias=bias)
        self.key = Linear(kv_dim, d_model, bias=bias)
        self.value = Linear(kv_dim, d_model, bias=bias)
        self.out = Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                layer: int = 0, return_weights: bool = False):
        src = x if context is None else context
        q = split_heads(self.query(x), self.n_head)  # (B, nh, T, hs)
        k = split_heads(self.key(src), self.n_head)  # (B, nh, S, hs)
        v = split_heads(self.value(src), self.n_head)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        mask = padding_mask(attention_mask) if attention_mask is not None else None
        res = scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and context is None, return_weights=return_weights, use_sdpa=self.use_sdpa)
        out, w = res if return_weights else (res, None)
        out = self.out(merge_heads(out))  # (B, T, C)
        return (out, w) if return_weights else out
