"""T5 / FLAN-T5: the encoder-decoder with its LM head, loading and saving hub safetensors by name.

    enc    = Encoder(E[x])                  dec = Decoder(E[y], enc)      (the stacks: models/t5_layers.py)
    logits = dec · d_model^-0.5 · Eᵀ        (T5 v1.0: head tied to the embedding, output rescaled)
           = dec · W_headᵀ                  (T5 v1.1 / FLAN-T5: a separate head, no rescaling)

Training feeds the decoder the target shifted right (decoder_start_token_id first), so logit t
predicts target t directly — no further shift in the loss (see train/loop.py seq2seq_loss).

Parameter names equal the hub's: `shared.weight`, `encoder.block.0.layer.0.SelfAttention.q.weight`,
`...layer.0.SelfAttention.relative_attention_bias.weight`, `decoder.block.0.layer.1.EncDecAttention.k.weight`,
`...layer.2.DenseReluDense.wi_0.weight`, `encoder.final_layer_norm.weight`, `lm_head.weight`. Files also
carry `encoder.embed_tokens.weight` / `decoder.embed_tokens.weight`: aliases of `shared.weight`
(checked equal, then dropped).

Tied or not: hub v1.0 configs say nothing (tied, rescaled); hub v1.1 configs say
`tie_word_embeddings: false` (separate head, no rescale). transformers 5 re-saves every T5 with
`tie_word_embeddings: true` and marks v1.1 with `scale_decoder_outputs: false`, keeping its own
`lm_head.weight`. So: the rescaling follows `scale_decoder_outputs` when present, else
`tie_word_embeddings`; the head is separate when the config says untied or the file carries an
`lm_head.weight` that differs from `shared.weight` (transformers 5 decides the same way).
Unlike transformers we do not keep `wo` in fp32 (its `_keep_in_fp32_modules`): `dtype=` converts every weight.

Source: Raffel et al. (2020), §2.1 and §3.1; Chung et al., "Scaling Instruction-Finetuned Language
Models" (2022) for FLAN-T5; transformers' modeling_t5.py for names, tying and layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from minillm import hub
from minillm.configs import config_from_dict
from minillm.linear import Linear
from minillm.models.layers import check_input_ids
# re-exported: tests and callers import these from minillm.models.t5
from minillm.models.t5_layers import (T5Attention, T5Cache, T5Config, T5DenseReluDense, T5LayerNorm, T5Stack,  # noqa: F401
                                      additive_mask, clamp_fp16, parse_feed_forward_proj, relative_position_bucket)

EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Old checkpoints carry a relative bias in the decoder's first cross-attention; T5 never uses it (transformers skips it).
IGNORED = [r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$"]


class T5ForConditionalGeneration(nn.Module):
    """T5 with its LM head. forward(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask) -> logits
    (B, T_dec, vocab); encode(...) -> encoder states (B, S, d_model); decode(...) -> logits, with a T5Cache for
    step-by-step decoding; decoder_hidden_states(...) -> (B, T_dec, d_model), what the head (or a value head) reads."""

    is_encoder_decoder = True
    # every linear of attention and feed-forward; a layout has either wi or wi_0/wi_1 (absent names match nothing)
    lora_targets = ("q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1")

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, is_decoder=False)
        self.decoder = T5Stack(cfg, is_decoder=True)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Mesh TensorFlow's init (as transformers): N(0, σ) with σ = factor · fan-in^-1/2, queries also /√d_kv."""
        c, f = self.config, self.config.initializer_factor
        nn.init.normal_(self.shared.weight, std=f)
        nn.init.normal_(self.lm_head.weight, std=f)
        for m in self.modules():
            if isinstance(m, T5Attention):
                nn.init.normal_(m.q.weight, std=f * (c.d_model * c.d_kv) ** -0.5)
                nn.init.normal_(m.k.weight, std=f * c.d_model ** -0.5)
                nn.init.normal_(m.v.weight, std=f * c.d_model ** -0.5)
                nn.init.normal_(m.o.weight, std=f * c.inner_dim ** -0.5)
                if hasattr(m, "relative_attention_bias"):
                    nn.init.normal_(m.relative_attention_bias.weight, std=f * c.d_model ** -0.5)
            elif isinstance(m, T5DenseReluDense):
                for lin in ([m.wi_0, m.wi_1] if m.is_gated else [m.wi]):
                    nn.init.normal_(lin.weight, std=f * c.d_model ** -0.5)
                nn.init.normal_(m.wo.weight, std=f * c.d_ff ** -0.5)
            elif isinstance(m, T5LayerNorm):
                m.weight.fill_(f)

    def _embed(self, ids: torch.Tensor, what: str, past: int = 0) -> torch.Tensor:
        check_input_ids(ids, self.config.vocab_size, None, what=what, past=past)
        return self.shared(ids)  # (B, T, d_model)

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """-> the encoder's last hidden state (B, S, d_model). Padding may sit on either side (positions are relative)."""
        return self.encoder(self._embed(input_ids, "input_ids"), attention_mask)

    def decoder_hidden_states(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor,
                              encoder_attention_mask: Optional[torch.Tensor] = None,
                              decoder_attention_mask: Optional[torch.Tensor] = None,
                              cache: Optional[T5Cache] = None) -> torch.Tensor:
        """-> the decoder's last hidden state (B, T, d_model), after the final norm and before any rescaling.
        With a cache, decoder_input_ids are the new positions only and decoder_attention_mask covers
        cached + new positions."""
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[-1] != self.config.d_model:
            raise ValueError(f"encoder_hidden_states must be (B, S, {self.config.d_model}), "
                             f"got {tuple(encoder_hidden_states.shape)}")
        past = cache.seq_len if cache is not None else 0
        x = self._embed(decoder_input_ids, "decoder_input_ids", past)
        return self.decoder(x, decoder_attention_mask, context=encoder_hidden_states.to(x.dtype),
                            context_mask=encoder_attention_mask, cache=cache)

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor,
               encoder_attention_mask: Optional[torch.Tensor] = None,
               decoder_attention_mask: Optional[torch.Tensor] = None, cache: Optional[T5Cache] = None) -> torch.Tensor:
        """-> logits (B, T, vocab) for the decoder positions given (see decoder_hidden_states)."""
        h = self.decoder_hidden_states(decoder_input_ids, encoder_hidden_states, encoder_attention_mask,
                                       decoder_attention_mask, cache)
        return self.logits_from_hidden(h)

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Decoder hidden states (B, T, d_model) -> logits (B, T, vocab): what decode applies after the stack
        (PPO's value head reads the same states)."""
        if self.config.scale_decoder_outputs:  # v1.0: the tied head reads d_model^-0.5-scaled states
            h = h * self.config.d_model ** -0.5
        return self.lm_head(h)

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                decoder_input_ids: Optional[torch.Tensor] = None, decoder_attention_mask: Optional[torch.Tensor] = None,
                encoder_hidden_states: Optional[torch.Tensor] = None, cache: Optional[T5Cache] = None) -> torch.Tensor:
        """-> logits (B, T_dec, vocab). Pass encoder_hidden_states (from encode) to skip the encoder."""
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids are required (T5 starts them with decoder_start_token_id, "
                             f"{self.config.start_token_id}; for training, shift the labels right)")
        if encoder_hidden_states is None:
            if input_ids is None:
                raise ValueError("give input_ids (to encode) or encoder_hidden_states")
            encoder_hidden_states = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, encoder_hidden_states, attention_mask, decoder_attention_mask, cache)

    def new_cache(self, max_length: Optional[int] = None) -> T5Cache:
        return T5Cache(self.config.num_decoder_layers, max_length)

    # ---- hub I/O ----
    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: Optional[torch.dtype] = None, device=None,
                        **overrides) -> "T5ForConditionalGeneration":
        """Load a T5 / T5 v1.1 / FLAN-T5 checkpoint (hub files, or files re-saved by transformers 5).
        `overrides` change config keys (e.g. use_sdpa=False). Everything is checked before the model is built."""
        d, raw = hub.read_config_of(name_or_path, "t5", cls.__name__)
        raw = {**raw, **overrides}
        src = str(d / "config.json")
        if "scale_decoder_outputs" not in raw:  # a hub config as published: the rescaling goes with tie_word_embeddings
            raw["scale_decoder_outputs"] = raw.get("tie_word_embeddings", True) is not False
        state = hub.load_safetensors(d)
        if "shared.weight" not in state:  # some exports keep only the aliases
            for alias in EMBED_ALIASES:
                if alias in state:
                    state["shared.weight"] = state[alias]
                    break
        for alias in EMBED_ALIASES:
            if alias in state:
                t = state.pop(alias)
                if not torch.equal(t, state["shared.weight"]):
                    raise hub.CheckpointError(f"{d}: tensor '{alias}' differs from 'shared.weight'; T5 shares one "
                                              f"token embedding between encoder, decoder and `shared`")
        head = state.get("lm_head.weight")
        separate = head is not None and not (head.shape == state.get("shared.weight", head).shape
                                             and torch.equal(head, state["shared.weight"]))
        raw["tie_word_embeddings"] = raw.get("tie_word_embeddings", True) is not False and not separate
        cfg = config_from_dict(T5Config, raw, src)
        model = cls(cfg)
        optional = [r"^lm_head\.weight$"] if cfg.tie_word_embeddings else []
        return hub.load_into(model, state, d, dtype, device, ignore_unexpected=IGNORED, optional=optional)

    def save_pretrained(self, directory: str) -> Path:
        """config.json + model.safetensors in the hub layout (a tied head is not written, as transformers does)."""
        skip = [r"^lm_head\.weight$"] if self.config.tie_word_embeddings else []
        return hub.save_checkpoint_dir(directory, self.state_dict(), self.config.to_hub_dict(), skip=skip,
                                       source=getattr(self, "source_dir", None))
