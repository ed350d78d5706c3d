"""Pieces every transformer in minillm shares: activations, initialisation, input checks, masks, the layer loop.

A transformer layer maps hidden states (B, T, H) to (B, T, H); a model is embeddings, a stack of
such layers, and a head. What differs between GPT-2, BERT, DistilBERT, ViT, T5, RoBERTa and Llama
is inside the layer; what stays the same lives here, written once:

    act(x)          gelu (erf), gelu_new / gelu_pytorch_tanh (tanh approximation), relu, silu
    init            W ~ N(0, σ²) for linear / embedding / conv weights, b = 0, LayerNorm γ = 1, β = 0
    key mask        (B, T) 1/0 -> bool (B, 1, 1, T), True where a key may be attended to
    layer loop      x_l, w_l = layer_l(x_{l-1}, mask);  optionally collect each layer's attention weights
    checkpointing   keep each block's input only, recompute its inside in backward (4-bit layers follow)

Source: Hendrycks & Gimpel, "Gaussian Error Linear Units" (2016) for gelu and its tanh
approximation; Ramachandran et al., "Searching for Activation Functions" (2017) for silu;
transformers' ACT2FN names.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm import hub
from minillm.attention import merge_heads, padding_mask, scaled_dot_product_attention, split_heads
from minillm.configs import config_from_dict
from minillm.linear import Linear

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str, where: str = "config") -> callable:
    """The activation function a hub config names; an unknown name is a clear error."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{where}: activation '{name}' not supported (one of {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class EncoderOutput:
    """What an encoder returns when asked for more than its last hidden state.

    last_hidden_state (B, T, H); pooler_output (B, H) or None (no pooler in the checkpoint);
    attentions: one (B, nh, T, T) weight tensor per layer, or None."""

    def __init__(self, last_hidden_state: torch.Tensor, pooler_output=None, attentions=None):
        self.last_hidden_state = last_hidden_state
        self.pooler_output = pooler_output
        self.attentions = attentions

    def __iter__(self):
        return iter((self.last_hidden_state, self.pooler_output, self.attentions))


def init_weights(module: nn.Module, std: float) -> None:
    """BERT-style initialisation: N(0, std) for linear/embedding/conv weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
            if getattr(m, "padding_idx", None) is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()  # the pad token's embedding starts at zero
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_input_ids(input_ids: torch.Tensor, vocab_size: int, max_positions: Optional[int], what: str = "input_ids",
                    past: int = 0) -> None:
    """Clear errors for token ids outside the vocabulary and sequences longer than the position table
    (max_positions None: no table, e.g. relative or rotary positions)."""
    if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64, torch.int16, torch.uint8):
        raise TypeError(f"{what} must be an integer tensor, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"{what} must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{what}: token id {hi if hi >= vocab_size else lo} outside the vocabulary [0, {vocab_size})")
    if max_positions is not None and past + input_ids.shape[1] > max_positions:
        raise ValueError(f"{what}: sequence length {past + input_ids.shape[1]} exceeds the model's "
                         f"{max_positions} positions")


def resize_vocab(emb: nn.Embedding, head: nn.Linear, new_size: int, tied: bool) -> tuple[nn.Embedding, nn.Linear]:
    """A new embedding and (bias-free) LM head with `new_size` rows: existing rows kept, new rows the mean of
    the old ones (so new tokens start as an "average" token); a tied head shares the new embedding."""
    def resized(old: torch.Tensor) -> torch.Tensor:  # (V, C) -> (new_size, C)
        w = old.new_empty(new_size, old.shape[1])
        k = min(old.shape[0], new_size)
        w[:k] = old[:k]
        if new_size > old.shape[0]:
            w[old.shape[0]:] = old.mean(dim=0, keepdim=True)
        return w

    old = emb.weight
    with torch.no_grad():
        new_emb = nn.Embedding(new_size, old.shape[1], device=old.device, dtype=old.dtype)
        new_emb.weight.copy_(resized(old))
        new_head = Linear(old.shape[1], new_size, bias=False, device=old.device, dtype=old.dtype)
        if tied:
            new_head.weight = new_emb.weight
        else:
            new_head.weight.copy_(resized(head.weight))
    return new_emb, new_head


def set_gradient_checkpointing(body: nn.Module, enable: bool) -> None:
    """Turn activation checkpointing of `body`'s blocks on or off (its forward reads body.gradient_checkpointing).

    4-bit layers inside (nf4.Linear4bit: any module with `save_weight_for_backward`) follow it: under
    checkpointing they keep the dequantized weight from a block's recomputed forward to its backward,
    one dequantization fewer per step for one block's weights held at a time."""
    body.gradient_checkpointing = enable
    for m in body.modules():
        if hasattr(m, "save_weight_for_backward"):
            m.save_weight_for_backward = enable


def keep_last(h: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """h (B, T, C) -> (B, k, C), the last k = logits_to_keep positions (all when 0), for an LM head to read:
    generation needs the last position's logits only, and on a long prompt the vocabulary-wide head over
    every position is most of the prefill's head work (transformers' `logits_to_keep`)."""
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0 = every position), got {logits_to_keep!r}")
    return h[:, -logits_to_keep:] if logits_to_keep else h


def key_mask(attention_mask: Optional[torch.Tensor], B: int, T: int, device) -> Optional[torch.Tensor]:
    """Check a (B, T) 1/0 attention mask; None when absent or all ones (no key is hidden: the fused kernel
    then runs unmasked), else the bool (B, 1, 1, T) mask, True at real tokens."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)} (batch, seq_len)")
    if bool(attention_mask.all()):
        return None
    return padding_mask(attention_mask.to(device))


class Encoder(nn.Module):
    """The encoder layer loop under the hub's name `layer`: each layer(x, mask, return_weights) -> (x, weights).
    forward -> the last hidden state and, when asked, the per-layer attention weights (B, nh, T, T)."""

    def __init__(self, layers: Iterable[nn.Module]):
        super().__init__()
        self.layer = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                output_attentions: bool = False) -> tuple[torch.Tensor, Optional[list[torch.Tensor]]]:
        attentions = [] if output_attentions else None
        for layer in self.layer:
            x, w = layer(x, mask, output_attentions)
            if output_attentions:
                attentions.append(w)
        return x, attentions


class Pooler(nn.Module):
    """act(W h_0 + b): the first token's ([CLS]) vector through a dense layer (hub name `pooler.dense`)."""

    def __init__(self, hidden: int, out: int, act: str = "tanh"):
        super().__init__()
        self.dense = Linear(hidden, out)
        self.act = torch.tanh if act == "tanh" else activation(act)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(h[:, 0]))  # (B, out)


def hidden_size(model: nn.Module) -> int:
    """The width of a model's hidden states, whatever its config calls it (n_embd, hidden_size, dim, d_model)."""
    cfg = getattr(model, "config", None)
    for key in ("n_embd", "hidden_size", "dim", "d_model"):
        if cfg is not None and isinstance(getattr(cfg, key, None), int):
            return int(getattr(cfg, key))
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}; pass hidden_size")


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with the hub's `query` / `key` / `value` names (BERT, RoBERTa,
    ViT): softmax(Q Kᵀ/√d + mask) V per head. forward(x, mask, return_weights) -> (B, T, H), weights or None."""

    def __init__(self, hidden: int, heads: int, dropout: float, use_sdpa: bool = True, bias: bool = True):
        super().__init__()
        self.heads, self.dropout_p, self.use_sdpa = heads, dropout, use_sdpa
        self.query, self.key, self.value = (Linear(hidden, hidden, bias=bias) for _ in range(3))

    def forward(self, x, mask=None, return_weights: bool = False):
        q, k, v = (split_heads(f(x), self.heads) for f in (self.query, self.key, self.value))  # (B, nh, T, hs)
        res = scaled_dot_product_attention(q, k, v, attn_mask=mask, return_weights=return_weights,
                                           use_sdpa=self.use_sdpa, dropout_p=self.dropout_p if self.training else 0.0)
        y, w = res if return_weights else (res, None)
        return merge_heads(y), w  # (B, T, H)


class Intermediate(nn.Module):
    """The first half of the MLP under the hub's name `intermediate.dense`: act(W x + b), hidden -> intermediate."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.dense = Linear(hidden, intermediate)
        self.act = activation(act)

    def forward(self, x):
        return self.act(self.dense(x))


def load_base_model(cls, config_cls, name_or_path: str, model_type: str, prefix: str, ignored: Iterable[str] = (),
                    dtype: Optional[torch.dtype] = None, device=None, **overrides):
    """The encoders' from_pretrained: read and check config.json (`model_type`), build `cls(config)` — with
    add_pooling_layer when `cls` takes it and the checkpoint has a pooler — load the base tensors (task
    layouts: `prefix` stripped, heads skipped) strictly, then move to dtype/device."""
    d, raw = hub.read_config_of(name_or_path, model_type, cls.__name__)
    cfg = config_from_dict(config_cls, {**raw, **overrides}, str(d / "config.json"))
    state = hub.base_state(hub.load_safetensors(d), prefix)
    if "add_pooling_layer" in cls.__init__.__code__.co_varnames:
        model = cls(cfg, add_pooling_layer="pooler.dense.weight" in state)
    else:
        model = cls(cfg)
    return hub.load_into(model, state, d, dtype, device, ignore_unexpected=ignored)
