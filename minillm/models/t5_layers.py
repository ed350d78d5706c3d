"""T5's layers: config, RMS norm, relative position buckets, attention, feed-forward, blocks and stacks.

    encoder:  h_0 = E[x];   h_l = h + SelfAttn(RMS(h), bias_bidir);  h_l = h_l + FF(RMS(h_l));   enc = RMS(h_L)
    decoder:  g_0 = E[y];   g = g + SelfAttn(RMS(g), bias_causal + causal mask)
                            g = g + CrossAttn(RMS(g), enc)           (queries from g, keys/values from enc)
                            g = g + FF(RMS(g));                      dec = RMS(g_L)

    Attn(q, k, v) = softmax(q kᵀ + B[bucket(j − i)] + M) v   — no 1/√d: T5 folds it into the initialisation
    RMS(x) = w ⊙ x / sqrt(mean(x²) + ε)                        — no mean subtraction, no bias; computed in fp32
    FF(x)  = W_o relu(W_i x)                                   (v1.0, feed_forward_proj "relu")
           = W_o (gelu_tanh(W_i0 x) ⊙ W_i1 x)                  (v1.1 / FLAN, "gated-gelu"; "gated-silu" likewise)

Positions enter only through a learned scalar per head and *bucket* of the relative distance j − i:
distances below half the buckets get their own bucket, longer ones share logarithmically wider
buckets up to max_distance (see relative_position_bucket). The encoder's buckets are
bidirectional (j − i and i − j differ), the decoder's causal (the future never seen; all of it is
bucket 0). Only layer 0 of each stack owns `relative_attention_bias`; every layer of that stack
reuses its bias. Attention's inner width is num_heads · d_kv, which may differ from d_model.

Module names equal the hub's (`block.0.layer.0.SelfAttention.q`, `layer.1.EncDecAttention`,
`layer.2.DenseReluDense.wi_0` — the odd `DenseReluDense` name stays even for gated GELU).

fp16: after each sub-layer the hidden states are clamped to the fp16 range (max − 1000 when an inf
appeared), as transformers does, so FLAN-T5 does not overflow to inf in half precision.

The model with its head, and loading/saving, are in models/t5.py.

Source: Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (2020), §2.1 and §3.1; Shaw et al., "Self-Attention with Relative Position
Representations" (2018); Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019);
Shazeer, "GLU Variants Improve Transformer" (2020) for the gated GELU of v1.1; transformers'
modeling_t5.py for names and layout; Mesh TensorFlow's `_relative_position_bucket`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from minillm import hub
from minillm.configs import as_config_dict, validate_config
from minillm.attention import KVCache, causal_mask, merge_heads, scaled_dot_product_attention, split_heads
from minillm.linear import Linear
from minillm.models.layers import ACTIVATIONS


@dataclass
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_decoder_layers: Optional[int] = None  # None: as many as the encoder
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"  # "relu" | "gelu" | "gated-gelu" | "gated-silu" | ...: [gated-]<activation>
    tie_word_embeddings: bool = True  # lm_head shares shared.weight (from_pretrained decides it, see the docstring)
    scale_decoder_outputs: Optional[bool] = None  # multiply by d_model^-0.5 before the head; None: = tied
    pad_token_id: int = 0
    eos_token_id: Optional[int] = 1
    decoder_start_token_id: Optional[int] = None  # None: pad_token_id, T5's convention
    model_type: str = "t5"
    use_sdpa: bool = True  # minillm's flag: torch's fused attention kernel (True) or the written-out math

    def __post_init__(self):
        where = "config"
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            _positive_int(getattr(self, name), name, where)
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        _positive_int(self.num_decoder_layers, "num_decoder_layers", where)
        if self.relative_attention_num_buckets < 4:
            raise hub.CheckpointError(f"{where}: relative_attention_num_buckets={self.relative_attention_num_buckets} "
                                      f"must be >= 4 (half of them per direction, half of those exact)")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
            raise hub.CheckpointError(f"{where}: relative_attention_max_distance={self.relative_attention_max_distance} "
                                      f"must exceed relative_attention_num_buckets // 2 = "
                                      f"{self.relative_attention_num_buckets // 2} (the exact buckets)")
        for name in ("dropout_rate", "layer_norm_epsilon", "initializer_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise hub.CheckpointError(f"{where}: {name}={v!r} is not a finite number")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise hub.CheckpointError(f"{where}: dropout_rate={self.dropout_rate} is not in [0, 1)")
        if self.layer_norm_epsilon <= 0:
            raise hub.CheckpointError(f"{where}: layer_norm_epsilon={self.layer_norm_epsilon} must be > 0")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < self.vocab_size):
                raise hub.CheckpointError(f"{where}: {name}={v!r} is not a token id in [0, {self.vocab_size})")
        if self.pad_token_id is None:
            raise hub.CheckpointError(f"{where}: pad_token_id is required (T5 starts decoding from it)")
        validate_config(self)  # the shared type and range checks, for the fields not checked above
        self.is_gated, self.activation = parse_feed_forward_proj(self.feed_forward_proj)
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = bool(self.tie_word_embeddings)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def start_token_id(self) -> int:
        return self.pad_token_id if self.decoder_start_token_id is None else self.decoder_start_token_id

    def to_hub_dict(self) -> dict:
        d = as_config_dict(self)
        d.pop("use_sdpa")
        d["decoder_start_token_id"] = self.start_token_id
        d.update(architectures=["T5ForConditionalGeneration"], is_encoder_decoder=True,
                 dense_act_fn=self.activation, is_gated_act=self.is_gated)
        return d


def _positive_int(v, name: str, where: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise hub.CheckpointError(f"{where}: {name}={v!r} must be a positive integer")


def parse_feed_forward_proj(s: str) -> tuple[bool, str]:
    """transformers' rule: "<act>" or "gated-<act>" -> (gated, activation name); "gated-gelu" means gelu_new."""
    parts = s.split("-") if isinstance(s, str) else []
    if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise hub.CheckpointError(f"config: feed_forward_proj {s!r} is not '<activation>' or 'gated-<activation>' "
                                  f"(e.g. 'relu', 'gated-gelu')")
    act = "gelu_new" if s == "gated-gelu" else parts[-1]  # transformers keeps this old alias
    if act not in ACTIVATIONS:
        raise hub.CheckpointError(f"config: feed_forward_proj {s!r}: activation '{act}' not supported "
                                  f"(one of {sorted(ACTIVATIONS)})")
    return len(parts) == 2, act


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Map relative positions j − i (key minus query) to buckets in [0, num_buckets).

    Bidirectional: half the buckets for j > i, half for j <= i. Causal: only j <= i counts (the
    future is bucket 0, like distance 0). Within a direction, |d| < n/2 gets bucket |d| (exact);
    larger |d| get n/2 + ⌊log(|d| / (n/2)) / log(max_distance / (n/2)) · (n − n/2)⌋, capped at n − 1,
    so every distance >= max_distance shares the last bucket. (n = buckets per direction.)"""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # the same float32 operations, in the same order, as Mesh TensorFlow / transformers (buckets must agree exactly)
    large = max_exact + (torch.log(distance.clamp(min=max_exact).float() / max_exact)
                         / math.log(max_distance / max_exact) * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """Keep fp16 hidden states finite, as transformers' T5 does (max − 1000 once an inf appeared)."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return x.clamp(min=-limit, max=limit)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask (True = may attend) -> 0 / most negative float, added to the scores (as transformers does:
    finfo.min rather than −inf, so a fully hidden row stays finite)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


class T5LayerNorm(nn.Module):
    """RMS norm: w ⊙ x / sqrt(mean(x²) + ε), the mean of squares taken in fp32; no bias, no centring."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Cache:
    """The decoder's cache: self-attention keys/values grow by the new positions at every call (KVCache);
    cross-attention keys/values are projections of the encoder output, computed at the first call and reused."""

    def __init__(self, n_layer: int, max_length: Optional[int] = None):
        self.self_attn = KVCache(n_layer, max_length)
        self.cross: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * n_layer

    @property
    def seq_len(self) -> int:
        return self.self_attn.seq_len


class T5Attention(nn.Module):
    """Self- or cross-attention: q, k, v: d_model -> num_heads·d_kv, o back; scores unscaled, plus bias/mask."""

    def __init__(self, cfg: T5Config, layer_idx: int, is_cross: bool = False, has_relative_bias: bool = False):
        super().__init__()
        self.cfg, self.layer_idx, self.is_cross = cfg, layer_idx, is_cross
        inner = cfg.inner_dim
        self.q = Linear(cfg.d_model, inner, bias=False)
        self.k = Linear(cfg.d_model, inner, bias=False)
        self.v = Linear(cfg.d_model, inner, bias=False)
        self.o = Linear(inner, cfg.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, T: int, S: int, past: int, bidirectional: bool) -> torch.Tensor:
        """(1, nh, T, S): the learned bias of bucket(j − i) for queries at past..past+T−1 and keys 0..S−1."""
        dev = self.relative_attention_bias.weight.device
        query = torch.arange(past, past + T, device=dev)[:, None]
        key = torch.arange(S, device=dev)[None, :]
        buckets = relative_position_bucket(key - query, bidirectional, self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)  # (T, S)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (T, S, nh) -> (1, nh, T, S)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor], context: Optional[torch.Tensor] = None,
                cache: Optional[T5Cache] = None) -> torch.Tensor:
        nh, i = self.cfg.num_heads, self.layer_idx
        q = split_heads(self.q(x), nh)  # (B, nh, T, d_kv)
        if self.is_cross:
            if cache is not None and cache.cross[i] is not None:
                k, v = cache.cross[i]  # the encoder's keys/values, computed at the first step
            else:
                k, v = split_heads(self.k(context), nh), split_heads(self.v(context), nh)  # (B, nh, S, d_kv)
                if cache is not None:
                    cache.cross[i] = (k, v)
        else:
            k, v = split_heads(self.k(x), nh), split_heads(self.v(x), nh)  # (B, nh, T, d_kv)
            if cache is not None:
                k, v = cache.self_attn.update(i, k, v)  # (B, nh, past + T, d_kv)
        dropout = self.cfg.dropout_rate if self.training else 0.0
        y = scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0, dropout_p=dropout,
                                         use_sdpa=self.cfg.use_sdpa)
        return self.o(merge_heads(y))  # (B, nh, T, d_kv) -> (B, T, inner) -> (B, T, d_model)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, layer_idx: int, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, layer_idx, has_relative_bias=has_relative_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x, bias, cache=None):
        return x + self.dropout(self.SelfAttention(self.layer_norm(x), bias, cache=cache))


class T5LayerCrossAttention(nn.Module):
    def __init__(self, cfg: T5Config, layer_idx: int):
        super().__init__()
        self.EncDecAttention = T5Attention(cfg, layer_idx, is_cross=True)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x, bias, context, cache=None):
        return x + self.dropout(self.EncDecAttention(self.layer_norm(x), bias, context=context, cache=cache))


class T5DenseReluDense(nn.Module):
    """FF(x) = wo(act(wi x)) — or, gated (v1.1), wo(act(wi_0 x) ⊙ wi_1 x). The hub's name says ReLU either way."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        if cfg.is_gated:
            self.wi_0 = Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.act, self.is_gated = ACTIVATIONS[cfg.activation], cfg.is_gated

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.is_gated else self.act(self.wi(x))  # (B, T, d_ff)
        return self.wo(self.dropout(h))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x):
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class T5Block(nn.Module):
    """layer.0 self-attention, (decoder) layer.1 cross-attention, layer.-1 feed-forward; each pre-norm + residual."""

    def __init__(self, cfg: T5Config, layer_idx: int, is_decoder: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, layer_idx, has_relative_bias=layer_idx == 0)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(cfg, layer_idx))
        self.layer.append(T5LayerFF(cfg))
        self.is_decoder = is_decoder

    def forward(self, x, self_bias, context=None, cross_bias=None, cache=None):
        x = clamp_fp16(self.layer[0](x, self_bias, cache=cache))
        if self.is_decoder:
            x = clamp_fp16(self.layer[1](x, cross_bias, context, cache=cache))
        return clamp_fp16(self.layer[-1](x))


class T5Stack(nn.Module):
    """Encoder (bidirectional) or decoder (causal + cross-attention): blocks, then the final RMS norm.
    The token embedding is the model's `shared`, passed in as vectors (no copy under the stack's name)."""

    def __init__(self, cfg: T5Config, is_decoder: bool):
        super().__init__()
        self.cfg, self.is_decoder = cfg, is_decoder
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.block = nn.ModuleList([T5Block(cfg, i, is_decoder) for i in range(n)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                cache: Optional[T5Cache] = None) -> torch.Tensor:
        B, T, _ = x.shape
        past = cache.seq_len if cache is not None else 0
        S = past + T
        attn0 = self.block[0].layer[0].SelfAttention
        bias = attn0.position_bias(T, S, past, bidirectional=not self.is_decoder).to(x.dtype)  # (1, nh, T, S)
        allowed = None  # bool, True where query i may see key j
        if self.is_decoder:
            allowed = causal_mask(T, S, x.device)[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, S):
                raise ValueError(f"{'decoder_' if self.is_decoder else ''}attention_mask has shape "
                                 f"{tuple(attention_mask.shape)}, expected {(B, S)} (batch, cached + new positions)")
            keys = attention_mask.to(x.device).bool()[:, None, None, :]  # (B, 1, 1, S)
            allowed = keys if allowed is None else allowed & keys
        if allowed is not None:
            bias = bias + additive_mask(allowed, x.dtype)  # (B|1, nh, T, S)
        cross_bias = None
        if self.is_decoder and context_mask is not None:
            if tuple(context_mask.shape) != tuple(context.shape[:2]):
                raise ValueError(f"encoder_attention_mask has shape {tuple(context_mask.shape)}, expected "
                                 f"{tuple(context.shape[:2])} (batch, encoder positions)")
            cross_bias = additive_mask(context_mask.to(x.device).bool()[:, None, None, :], x.dtype)  # (B, 1, 1, S_enc)
        x = self.dropout(x)
        for block in self.block:
            x = block(x, bias, context=context, cross_bias=cross_bias, cache=cache)
        return self.dropout(self.final_layer_norm(x))
