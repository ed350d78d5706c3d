"""GPT-2: a decoder-only transformer, loading the hub's safetensors checkpoints by name.

    h_0 = W_te[x] + W_pe[pos]
    h_l = h_{l-1} + Attn(LN_1(h_{l-1}));  (+ CrossAttn(LN_cross(h), encoder) if enabled)
    h_l = h_l + MLP(LN_2(h_l)),           MLP(x) = W_2 · gelu_tanh(W_1 x)
    logits = LN_f(h_L) · W_teᵀ            (the LM head is tied to the token embedding)

Parameter names equal the hub's (`transformer.h.0.attn.c_attn.weight`, ...). One oddity: the
hub stores c_attn, c_proj, c_fc and q_attn as "Conv1D" weights of shape (in, out), the
transpose of nn.Linear's (out, in); we use nn.Linear and transpose those four on load and
save (TRANSPOSED below), as nanoGPT does. Cross-attention blocks (`add_cross_attention`)
follow transformers' names: `crossattention.q_attn` for queries from the decoder,
`crossattention.c_attn` for keys and values from the encoder, `ln_cross_attn` before them.

With an attention_mask, positions come from the mask (cumsum − 1), so a left-padded row gets
the same positions, and logits, as the same row unpadded.

Source: Radford et al., "Language Models are Unsupervised Multitask Learners" (2019);
transformers' modeling_gpt2.py for names and layout; nanoGPT's model.py for the style.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint

from minillm import hub
from minillm.configs import as_config_dict, config_from_dict, validate_config
from minillm.linear import Linear
from minillm.models.layers import (ACTIVATIONS, check_input_ids, keep_last, resize_vocab,
                                   set_gradient_checkpointing)
from minillm.attention import (KVCache, causal_mask, merge_heads, padding_mask, scaled_dot_product_attention,
                               split_heads)

TRANSPOSED = [r"\.(c_attn|c_proj|c_fc|q_attn)\.weight$"]
# Old checkpoints carry the causal-mask buffers `attn.bias` / `attn.masked_bias`; we build masks on the fly.
IGNORED = [r"\.attn\.bias$", r"\.attn\.masked_bias$", r"\.crossattention\.bias$", r"\.crossattention\.masked_bias$"]


@dataclass
class GPT2Config:
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int = 1024
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    add_cross_attention: bool = False
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[int] = 50256
    pad_token_id: Optional[int] = None
    model_type: str = "gpt2"
    use_sdpa: bool = True  # minillm's flag: torch's fused attention kernel (True) or the written-out math

    def __post_init__(self):
        validate_config(self, heads=("n_embd", "n_head"))  # types, ranges, head split: before any allocation

    def to_hub_dict(self) -> dict:
        d = as_config_dict(self)
        d.pop("use_sdpa")
        d["architectures"] = ["GPT2LMHeadModel"]
        d["n_ctx"] = self.n_positions
        return d




class GPT2Attention(nn.Module):
    """Causal self-attention (c_attn: x -> q,k,v) or cross-attention (q_attn: x -> q; c_attn: enc -> k,v)."""

    def __init__(self, cfg: GPT2Config, layer_idx: int, is_cross: bool = False):
        super().__init__()
        C = cfg.n_embd
        if C % cfg.n_head:
            raise hub.CheckpointError(f"config: n_embd={C} is not divisible by n_head={cfg.n_head}")
        self.cfg, self.layer_idx, self.is_cross = cfg, layer_idx, is_cross
        if is_cross:
            self.q_attn = Linear(C, C)
            self.c_attn = Linear(C, 2 * C)
        else:
            self.c_attn = Linear(C, 3 * C)
        self.c_proj = Linear(C, C)
        self.attn_dropout = cfg.attn_pdrop
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)
        scale = 1.0 / math.sqrt(C // cfg.n_head) if cfg.scale_attn_weights else 1.0
        self.scale = scale / (layer_idx + 1) if cfg.scale_attn_by_inverse_layer_idx else scale

    def forward(self, x, mask=None, cache: Optional[KVCache] = None, encoder_hidden_states=None,
                return_weights: bool = False):
        nh = self.cfg.n_head
        if self.is_cross:
            q = self.q_attn(x)
            k, v = self.c_attn(encoder_hidden_states).split(self.cfg.n_embd, dim=2)
        else:
            q, k, v = self.c_attn(x).split(self.cfg.n_embd, dim=2)  # 3 x (B, T, C)
        q, k, v = split_heads(q, nh), split_heads(k, nh), split_heads(v, nh)  # (B, nh, T|S, hs)
        if cache is not None and not self.is_cross:
            k, v = cache.update(self.layer_idx, k, v)
        use_sdpa = self.cfg.use_sdpa and not return_weights
        # No mask from the caller means "no padding, nothing cached before a multi-token input" (GPT2Model
        # guarantees it): plain causal attention, which the fused kernel builds itself. One new token needs none.
        is_causal = not self.is_cross and mask is None and q.shape[-2] > 1
        res = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                                           dropout_p=self.attn_dropout if self.training else 0.0,
                                           return_weights=return_weights, use_sdpa=use_sdpa)
        y, w = res if return_weights else (res, None)
        y = self.resid_dropout(self.c_proj(merge_heads(y)))  # (B, T, C)
        return (y, w) if return_weights else y


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        inner = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc = Linear(cfg.n_embd, inner)
        self.c_proj = Linear(inner, cfg.n_embd)
        if cfg.activation_function not in ACTIVATIONS:
            raise hub.CheckpointError(f"config: activation_function '{cfg.activation_function}' not supported "
                                      f"(one of {sorted(ACTIVATIONS)})")
        self.act = ACTIVATIONS[cfg.activation_function]
        self.dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        eps = cfg.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=eps)
        self.attn = GPT2Attention(cfg, layer_idx)
        if cfg.add_cross_attention:
            self.crossattention = GPT2Attention(cfg, layer_idx, is_cross=True)
            self.ln_cross_attn = nn.LayerNorm(cfg.n_embd, eps=eps)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, mask=None, cache=None, encoder_hidden_states=None, encoder_mask=None):
        x = x + self.attn(self.ln_1(x), mask=mask, cache=cache)
        if encoder_hidden_states is not None:
            if not hasattr(self, "crossattention"):
                raise ValueError("encoder_hidden_states given, but the model has no cross-attention "
                                 "(build it with add_cross_attention=True)")
            x = x + self.crossattention(self.ln_cross_attn(x), mask=encoder_mask,
                                        encoder_hidden_states=encoder_hidden_states)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """The transformer body: embeddings, blocks, final layer norm -> hidden states (B, T, C)."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.h = nn.ModuleList([GPT2Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.gradient_checkpointing = False  # see GPT2LMHeadModel.gradient_checkpointing_enable

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: Optional[KVCache] = None,
                encoder_hidden_states=None, encoder_attention_mask=None):
        cfg = self.cfg
        past = cache.seq_len if cache is not None else 0
        check_input_ids(input_ids, cfg.vocab_size, cfg.n_positions, past=past)
        B, T = input_ids.shape
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)} "
                             f"(batch, cached + new positions)")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, T, input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, T, C)

        mask = None  # bool (B, 1, T, past+T), True where a query may look; None = plain causal
        if attention_mask is not None or (past > 0 and T > 1):
            mask = causal_mask(T, past + T, input_ids.device)[None, None]
            if attention_mask is not None:
                mask = mask & padding_mask(attention_mask)
        enc_mask = None
        if encoder_hidden_states is not None:
            if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[-1] != cfg.n_embd:
                raise ValueError(f"encoder_hidden_states must be (B, S, {cfg.n_embd}), "
                                 f"got {tuple(encoder_hidden_states.shape)}")
            encoder_hidden_states = encoder_hidden_states.to(x.dtype)
            if encoder_attention_mask is not None:
                enc_mask = padding_mask(encoder_attention_mask)
        checkpointing = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for block in self.h:
            if checkpointing:  # keep only the block's input; recompute its inside during backward
                x = torch.utils.checkpoint.checkpoint(block, x, mask, None, encoder_hidden_states, enc_mask,
                                                      use_reentrant=False)
            else:
                x = block(x, mask=mask, cache=cache, encoder_hidden_states=encoder_hidden_states,
                          encoder_mask=enc_mask)
        return self.ln_f(x)


def positions_from_mask(attention_mask, past: int, T: int, device) -> torch.Tensor:
    """Position ids (B, T): cumsum(mask) − 1 over the real tokens (pads get 1, as transformers does)."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device)[None]
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 1)
    return pos[:, past:]


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with the tied language-model head. forward(input_ids, attention_mask) -> logits (B, T, vocab)."""

    hub_transposed = TRANSPOSED  # Conv1D weights, stored (in, out) on the hub (LoRA's fan_in_fan_out reads it)
    lora_targets = ("c_attn", "c_proj", "c_fc")  # every linear of the attention and MLP blocks

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Model(cfg)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=cfg.initializer_range / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: Optional[KVCache] = None,
                encoder_hidden_states=None, encoder_attention_mask=None, logits_to_keep: int = 0) -> torch.Tensor:
        """-> logits (B, T, vocab); (B, k, vocab) of the last k positions with logits_to_keep = k > 0."""
        h = self.hidden_states(input_ids, attention_mask, position_ids, cache, encoder_hidden_states,
                               encoder_attention_mask)
        return self.lm_head(keep_last(h, logits_to_keep))

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache: Optional[KVCache] = None,
                      encoder_hidden_states=None, encoder_attention_mask=None) -> torch.Tensor:
        """-> the last hidden states (B, T, C), after ln_f: what the LM head, a value head or a reward head reads."""
        return self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                encoder_hidden_states=encoder_hidden_states,
                                encoder_attention_mask=encoder_attention_mask)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (the table new special tokens grow; prompt tuning prepends to its output)."""
        return self.transformer.wte

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Activation (gradient) checkpointing: in training, each block keeps only its input and recomputes
        its activations during backward — memory for activations drops from O(layers × block internals) to
        O(layers × B·T·C), for about one more forward pass of compute. The recomputation replays the same
        dropout masks (torch.utils.checkpoint restores the RNG state), so gradients equal the plain path's.
        QLoRA uses it by default (peft's prepare_model_for_kbit_training). Chen et al., "Training Deep Nets
        with Sublinear Memory Cost" (2016)."""
        set_gradient_checkpointing(self.transformer, enable)

    def new_cache(self, max_length: Optional[int] = None) -> KVCache:
        return KVCache(self.config.n_layer, max_length)

    # ---- resizing (new special tokens) ----
    def resize_token_embeddings(self, new_size: int) -> None:
        """Grow (or shrink) the vocabulary; new rows get the mean of the existing embeddings (the head's too)."""
        self.transformer.wte, self.lm_head = resize_vocab(self.transformer.wte, self.lm_head, new_size,
                                                          self.config.tie_word_embeddings)
        self.config.vocab_size = new_size

    # ---- hub I/O ----
    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: Optional[torch.dtype] = None, device=None,
                        **overrides) -> "GPT2LMHeadModel":
        """Load a hub GPT-2 checkpoint (directory, weights/<name>, or hub id). `overrides` change config
        keys (e.g. add_cross_attention=True: the new cross-attention weights start random)."""
        d = hub.resolve(name_or_path)
        raw = hub.read_config(d)
        if raw.get("model_type", "gpt2") != "gpt2":
            raise hub.CheckpointError(f"{d / 'config.json'}: model_type '{raw.get('model_type')}' is not gpt2")
        cfg = config_from_dict(GPT2Config, {**raw, **overrides}, str(d / "config.json"))
        model = cls(cfg)
        state = hub.load_safetensors(d)
        optional = [r"^lm_head\.weight$"] if cfg.tie_word_embeddings else []
        if overrides.get("add_cross_attention") and not raw.get("add_cross_attention"):
            optional += [r"\.crossattention\.", r"\.ln_cross_attn\."]
        hub.load_state_dict_strict(model, state, source=str(d), prefix="transformer.", transpose=TRANSPOSED,
                                   ignore_unexpected=IGNORED, optional=optional)
        model.source_dir = d
        return model.to(device=device, dtype=dtype)

    def save_pretrained(self, directory: str) -> Path:
        """config.json + model.safetensors in the hub layout (Conv1D weights transposed back)."""
        skip = [r"^lm_head\.weight$"] if self.config.tie_word_embeddings else []
        return hub.save_checkpoint_dir(directory, self.state_dict(), self.config.to_hub_dict(),
                                    transpose=TRANSPOSED, skip=skip,
                                       source=getattr(self, "source_dir", None))
