"""Llama (and the Mistral / Qwen2 checkpoints that share its layout): a pre-norm decoder with RMSNorm,
rotary positions, SwiGLU and grouped-query attention.

    h_0 = W_emb[x]
    h_l = h_{l-1} + Attn(RMSNorm_1(h_{l-1}))          RMSNorm(x) = γ · x / sqrt(mean(x²) + ε)  (in fp32)
    h_l = h_l + W_down (silu(W_gate x) ⊙ W_up x)        with x = RMSNorm_2(h_l)   (SwiGLU)
    logits = RMSNorm_f(h_L) · W_headᵀ                   (W_head tied to W_emb, or its own)

Attention rotates queries and keys by their position instead of adding a position embedding (RoPE):
for the pair (x_i, x_{i+d/2}) of a head at position m, angle m·θ_i with θ_i = base^(−2i/d), so
q_m·k_n depends on m − n only. "linear" scaling divides every θ_i by a factor; "llama3" divides only
the low frequencies (long wavelengths), leaves the high ones, and blends in between. Grouped-query
attention gives n_kv < n_heads key/value heads, each shared by n_heads / n_kv query heads (n_kv = 1:
multi-query). The KV cache stores the n_kv heads, (B, n_kv, T, hd); they are repeated (or shared by
the fused kernel's enable_gqa) only inside the attention product.

Checkpoints: model_type "llama", "mistral" (the same layout) and "qwen2" (biases on q/k/v, none on o).
Mistral's and Qwen2's sliding-window attention is not implemented: within the window it IS full causal
attention, so the config is accepted and a sequence longer than the window is refused with an error
(instead of silently computing something else). With an attention_mask, positions come from the mask
(cumsum − 1), as transformers' generate does. (RoPE scores depend on m − n only, so a left-padded row would get
the unpadded row's logits, up to rounding, even from shifted positions; the mask's positions keep them
equal to transformers' own, angle for angle.) RoPE sums its two products in place (autograd needs neither),
and without autograd (generation, evaluation) RMSNorm and SwiGLU also multiply in place into tensors
they made themselves: the same products bit for bit, fewer temporaries. The projections are
minillm.linear.Linear (float32 on CPU: oneDNN's GEMM, see linear.py).

Sources: Touvron et al., "LLaMA" (2023) and "Llama 2" (2023); Su et al., "RoFormer" (2021) for RoPE;
Shazeer, "GLU Variants Improve Transformer" (2020); Ainslie et al., "GQA" (2023); Zhang & Sennrich,
"Root Mean Square Layer Normalization" (2019); Meta's Llama 3.1 rope scaling; transformers'
modeling_llama.py and modeling_rope_utils.py for names, layout and the scaling formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from minillm import hub
from minillm.attention import KVCache, causal_mask, padding_mask, scaled_dot_product_attention
from minillm.configs import as_config_dict, config_from_dict, validate_config
from minillm.linear import Linear
from minillm.models.gpt2 import positions_from_mask
from minillm.models.layers import (activation, check_input_ids, keep_last, resize_vocab,
                                   set_gradient_checkpointing)

MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
# Old checkpoints carry the rotary frequencies as a buffer; we compute them from the config.
IGNORED = [r"\.rotary_emb\.inv_freq$"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: Optional[int] = None  # None: = num_attention_heads (plain multi-head attention)
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: Optional[float] = None  # transformers 4 writes it here, transformers 5 inside rope_parameters
    rope_scaling: Optional[dict] = None  # transformers 4's name
    rope_parameters: Optional[dict] = None  # transformers 5's name: {"rope_type", "rope_theta", "factor", ...}
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    use_sliding_window: Optional[bool] = None  # qwen2: the window applies only when this is true
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list]] = None
    pad_token_id: Optional[int] = None
    model_type: str = "llama"
    use_sdpa: bool = True  # minillm's flag: torch's fused attention kernel (True) or the written-out math

    def __post_init__(self):
        self.validate()
        validate_config(self)  # the shared type and range checks, for the fields validate() leaves
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.rope = self._rope()

    # ---- checks: every value the model will use, before any tensor is allocated ----
    def validate(self) -> None:
        bad = []
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings"):
            v = getattr(self, k)
            if not _is_int(v) or v < 1:
                bad.append(f"{k} must be a positive integer, got {v!r}")
        for k in ("num_key_value_heads", "head_dim", "sliding_window"):
            v = getattr(self, k)
            if v is not None and (not _is_int(v) or v < 1):
                bad.append(f"{k} must be a positive integer or null, got {v!r}")
        if not _is_num(self.rms_norm_eps) or self.rms_norm_eps <= 0:
            bad.append(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r}")
        if not _is_num(self.attention_dropout) or not 0 <= self.attention_dropout < 1:
            bad.append(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        for k in ("attention_bias", "mlp_bias", "tie_word_embeddings", "use_sdpa"):
            if not isinstance(getattr(self, k), bool):
                bad.append(f"{k} must be true or false, got {getattr(self, k)!r}")
        if self.model_type not in MODEL_TYPES:
            bad.append(f"model_type '{self.model_type}' is not one of {sorted(MODEL_TYPES)}")
        if not isinstance(self.hidden_act, str):
            bad.append(f"hidden_act must be a string, got {self.hidden_act!r}")
        else:
            try:
                activation(self.hidden_act)
            except ValueError as e:
                bad.append(str(e).removeprefix("config: "))
        if not bad:
            nh, nkv = self.num_attention_heads, self.num_key_value_heads or self.num_attention_heads
            if nh % nkv:
                bad.append(f"num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv} "
                           f"(each key/value head serves a whole group of query heads)")
            if self.head_dim is None and self.hidden_size % nh:
                bad.append(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={nh}; "
                           f"give head_dim explicitly")
            hd = self.head_dim or self.hidden_size // nh
            if hd % 2:
                bad.append(f"head_dim={hd} must be even (rotary embeddings rotate pairs of features)")
        if bad:
            raise hub.CheckpointError("config: " + "; ".join(bad))

    def _rope(self) -> dict:
        """The rotary settings, normalised from either spelling: {"rope_type", "rope_theta", ...}."""
        p = self.rope_parameters if self.rope_parameters is not None else self.rope_scaling
        if p is not None and not isinstance(p, dict):
            raise hub.CheckpointError(f"config: rope_parameters / rope_scaling must be a mapping, got {p!r}")
        p = dict(p or {})
        rope_type = p.get("rope_type", p.get("type", "default"))
        theta = p.get("rope_theta", self.rope_theta if self.rope_theta is not None else 10000.0)
        if rope_type not in ROPE_TYPES:
            raise hub.CheckpointError(f"config: rope type '{rope_type}' is not supported (one of {ROPE_TYPES})")
        if not _is_num(theta) or theta <= 1:
            raise hub.CheckpointError(f"config: rope_theta must be a number > 1, got {theta!r}")
        if p.get("partial_rotary_factor", 1.0) != 1.0:
            raise hub.CheckpointError("config: partial_rotary_factor != 1 is not supported")
        out = {"rope_type": rope_type, "rope_theta": float(theta)}
        if rope_type in ("linear", "llama3"):
            factor = p.get("factor")
            if not _is_num(factor) or factor < 1:
                raise hub.CheckpointError(f"config: rope '{rope_type}' needs factor >= 1, got {factor!r}")
            out["factor"] = float(factor)
        if rope_type == "llama3":
            lo, hi = p.get("low_freq_factor"), p.get("high_freq_factor")
            orig = p.get("original_max_position_embeddings", self.max_position_embeddings)
            if not (_is_num(lo) and _is_num(hi) and 0 < lo < hi):
                raise hub.CheckpointError(f"config: rope 'llama3' needs 0 < low_freq_factor < high_freq_factor, "
                                          f"got {lo!r}, {hi!r}")
            if not _is_int(orig) or orig < 1:
                raise hub.CheckpointError(f"config: original_max_position_embeddings must be a positive integer, "
                                          f"got {orig!r}")
            out.update(low_freq_factor=float(lo), high_freq_factor=float(hi), original_max_position_embeddings=orig)
        return out

    @property
    def window(self) -> Optional[int]:
        """The sliding window in force (mistral: sliding_window; qwen2: only with use_sliding_window)."""
        if self.model_type == "qwen2" and not self.use_sliding_window:
            return None
        return self.sliding_window

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"

    def to_hub_dict(self) -> dict:
        """config.json as transformers 5 writes it (rope settings inside rope_parameters)."""
        d = as_config_dict(self)
        for k in ("use_sdpa", "rope", "rope_scaling", "rope_theta"):
            d.pop(k, None)
        d["rope_parameters"] = dict(self.rope)
        d["architectures"] = [MODEL_TYPES[self.model_type]]
        if self.model_type != "qwen2":
            d.pop("use_sliding_window")
        if self.model_type == "qwen2":
            d.pop("attention_bias")
            d.pop("mlp_bias")
        return d


def rope_inv_freq(cfg: LlamaConfig, device=None) -> torch.Tensor:
    """θ_i = base^(−2i/d), i = 0..d/2−1 (fp32), with the config's scaling applied."""
    r, d = cfg.rope, cfg.head_dim
    inv = 1.0 / (r["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if r["rope_type"] == "linear":
        inv = inv / r["factor"]
    elif r["rope_type"] == "llama3":
        # wavelength λ = 2π/θ. Short (λ < L/hi): kept. Long (λ > L/lo): divided by factor. Between: a blend
        # (1 − s)·θ/factor + s·θ with s = (L/λ − lo) / (hi − lo), L the original context length.
        factor, lo, hi = r["factor"], r["low_freq_factor"], r["high_freq_factor"]
        L = r["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > L / lo, inv / factor, inv)
        s = (L / wavelen - lo) / (hi - lo)
        blended = (1 - s) * scaled / factor + s * scaled
        medium = (wavelen >= L / hi) & (wavelen <= L / lo)
        inv = torch.where(medium, blended, scaled)
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x_1, x_2) -> (−x_2, x_1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, h, T, hd), cos/sin (B, 1, T, hd): rotate each (x_i, x_{i+hd/2}) pair by its angle."""
    return (x * cos).add_(rotate_half(x).mul_(sin))  # in place on the two fresh products: same rounding


class RMSNorm(nn.Module):
    """γ · x / sqrt(mean(x²) + ε), computed in fp32 and cast back before the scale (as the reference)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., 1)
        if torch.is_grad_enabled():
            return self.weight * (h * r).to(x.dtype)
        # no autograd: the same products, in place on tensors made here (h is x itself when x is float32)
        h = h * r if h is x else h.mul_(r)
        return h.to(x.dtype).mul_(self.weight)


class LlamaAttention(nn.Module):
    """Causal self-attention with rotary positions and n_kv ≤ n_heads key/value heads."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        nh, nkv, hd, C = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = Linear(C, nh * hd, bias=cfg.qkv_bias)
        self.k_proj = Linear(C, nkv * hd, bias=cfg.qkv_bias)
        self.v_proj = Linear(C, nkv * hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(nh * hd, C, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask=None, cache: Optional[KVCache] = None):
        cfg = self.cfg
        B, T, _ = x.shape
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = self.q_proj(x).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # the cache keeps the nkv heads: (B, nkv, S, hd)
        is_causal = mask is None and T > 1  # no mask: no padding and nothing cached (see LlamaModel)
        dropout = cfg.attention_dropout if self.training else 0.0
        if cfg.use_sdpa:  # the fused kernel shares each kv head among its group itself
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                               enable_gqa=nkv != nh)
        else:  # written out: repeat each kv head for its group, then softmax(q kᵀ/√hd + M) v
            rep = nh // nkv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, S, hd)
            y = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)  # (B, T, nh·hd)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    """SwiGLU: W_down (act(W_gate x) ⊙ W_up x)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        C, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(C, I, bias=cfg.mlp_bias)
        self.up_proj = Linear(C, I, bias=cfg.mlp_bias)
        self.down_proj = Linear(I, C, bias=cfg.mlp_bias)
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        h = self.act(self.gate_proj(x))  # (B, T, I)
        # no autograd: multiply in place into h (made here), one (B, T, I) tensor fewer; the same products
        h = h * self.up_proj(x) if torch.is_grad_enabled() else h.mul_(self.up_proj(x))
        return self.down_proj(h)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask=mask, cache=cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers, final RMSNorm -> hidden states (B, T, C)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False
        self._inv_freq: dict = {}  # per device; not a buffer, so model.to(bfloat16) cannot round it

    def rope_cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos, sin of m·θ_i for each position m: (B, 1, T, hd), computed in fp32, then cast to `dtype`."""
        dev = position_ids.device
        if dev not in self._inv_freq:
            self._inv_freq[dev] = rope_inv_freq(self.cfg, dev)
        freqs = position_ids[..., None].float() * self._inv_freq[dev]  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: Optional[KVCache] = None):
        cfg = self.cfg
        past = cache.seq_len if cache is not None else 0
        check_input_ids(input_ids, cfg.vocab_size, None, past=past)
        B, T = input_ids.shape
        if cfg.window is not None and past + T > cfg.window:
            raise ValueError(f"sequence length {past + T} exceeds the sliding window {cfg.window}: minillm "
                             f"implements full causal attention, which equals sliding-window attention only "
                             f"within the window")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)} "
                             f"(batch, cached + new positions)")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, T, input_ids.device)
        position_ids = position_ids.expand(B, T)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.rope_cos_sin(position_ids, x.dtype)

        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: the fused kernel runs unmasked (one decoding step needs no mask)
        mask = None  # bool (B, 1, T, past+T), True where a query may look; None = plain causal
        if attention_mask is not None or (past > 0 and T > 1):
            mask = causal_mask(T, past + T, input_ids.device)[None, None]
            if attention_mask is not None:
                mask = mask & padding_mask(attention_mask)
        checkpointing = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointing:  # keep only the layer's input; recompute its inside during backward
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask=mask, cache=cache)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Llama / Mistral / Qwen2 with the LM head. forward(input_ids, attention_mask) -> logits (B, T, vocab)."""

    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every linear
    # but lm_head: what peft's "all-linear" selects on this model

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for m in self.modules():  # N(0, initializer_range) for linears and embeddings, zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=cfg.initializer_range)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: Optional[KVCache] = None,
                logits_to_keep: int = 0):
        """-> logits (B, T, vocab); (B, k, vocab) of the last k positions with logits_to_keep = k > 0."""
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        return self.lm_head(keep_last(h, logits_to_keep))

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None,
                      cache: Optional[KVCache] = None) -> torch.Tensor:
        """-> the last hidden states (B, T, C), after the final RMSNorm: what the LM head reads."""
        return self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (the table new special tokens grow; prompt tuning prepends to its output)."""
        return self.model.embed_tokens

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Activation checkpointing in training: each layer keeps only its input and recomputes the rest
        during backward (see GPT2LMHeadModel.gradient_checkpointing_enable)."""
        set_gradient_checkpointing(self.model, enable)

    def new_cache(self, max_length: Optional[int] = None) -> KVCache:
        """A KV cache for the n_kv heads: (B, n_kv, T, hd) per layer."""
        return KVCache(self.config.num_hidden_layers, max_length)

    def resize_token_embeddings(self, new_size: int) -> None:
        """Grow (or shrink) the vocabulary; new rows get the mean of the existing ones (the head's too)."""
        self.model.embed_tokens, self.lm_head = resize_vocab(self.model.embed_tokens, self.lm_head, new_size,
                                                             self.config.tie_word_embeddings)
        self.config.vocab_size = new_size

    # ---- hub I/O ----
    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: Optional[torch.dtype] = None, device=None,
                        **overrides) -> "LlamaForCausalLM":
        """Load a llama / mistral / qwen2 hub checkpoint (single file or shards). The config is checked before
        anything is allocated; tensors are checked against the model (names, shapes) before any is copied, then
        copied one at a time, so peak memory is about one copy of the weights."""
        d = hub.resolve(name_or_path)
        raw = hub.read_config(d)
        where = str(d / "config.json")
        if raw.get("model_type") not in MODEL_TYPES:
            raise hub.CheckpointError(f"{where}: model_type '{raw.get('model_type')}' is not one of "
                                      f"{sorted(MODEL_TYPES)}")
        try:
            cfg = config_from_dict(LlamaConfig, {**raw, **overrides}, where)
        except hub.CheckpointError as e:
            raise hub.CheckpointError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        except TypeError as e:  # a dataclass field given an unusable value
            raise hub.CheckpointError(f"{where}: {e}") from None
        model = cls(cfg)
        if dtype is not None:
            model.to(dtype=dtype)
        skip = [r"^lm_head\.weight$"] if cfg.tie_word_embeddings else []  # tied: the head IS the embedding
        hub.load_checkpoint_strict(model, d, prefix="model.", ignore_unexpected=IGNORED, optional=skip, skip=skip)
        model.source_dir = d
        return model.to(device=device)

    def save_pretrained(self, directory: str, max_shard_size: Optional[int] = None) -> Path:
        """config.json + model.safetensors (or shards of at most max_shard_size bytes and their index)."""
        skip = [r"^lm_head\.weight$"] if self.config.tie_word_embeddings else []
        return hub.save_checkpoint_dir(directory, self.state_dict(), self.config.to_hub_dict(), skip=skip,
                                    max_shard_size=max_shard_size,
                                       source=getattr(self, "source_dir", None))
