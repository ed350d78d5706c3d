"""DistilBERT: BERT distilled to half the layers, without token types or pooler, in the hub's layout.

    h_0 = LN(W_word[x] + W_pos[t])                     (learned positions, or fixed sinusoids:
                                                        PE[t, 2i] = sin(t / 10000^(2i/d)), PE[t, 2i+1] = cos(...))
    a_l = LN_sa(h_{l-1} + W_out · Attn(W_q h, W_k h, W_v h))
    h_l = LN_out(a_l + W_2 · gelu(W_1 a_l))

The same post-LN encoder as BERT with other names (`transformer.layer.0.attention.q_lin`,
`sa_layer_norm`, `ffn.lin1`, `output_layer_norm`) and config keys (`dim`, `n_layers`, `n_heads`,
`hidden_dim`). The hub's task checkpoints put the body under `distilbert.`; the sequence
classifier reads the [CLS] vector through `pre_classifier` + ReLU + dropout + `classifier`
(the book's multi-label genre model, ch. 10, freezes everything before
`distilbert.transformer.layer.4`).

Source: Sanh et al., "DistilBERT, a distilled version of BERT" (2019); Vaswani et al. (2017) §3.5
for the sinusoids; transformers' modeling_distilbert.py for names and layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from minillm import hub
from minillm.configs import classifier_config, config_from_dict, hub_config, validate_config
from minillm.attention import merge_heads, scaled_dot_product_attention, split_heads
from minillm.linear import Linear
from minillm.models.layers import (ACTIVATIONS, Encoder, EncoderOutput, check_input_ids, init_weights, key_mask,
                                   load_base_model)

IGNORED = [r"^embeddings\.position_ids$"]


@dataclass
class DistilBertConfig:
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    n_layers: int = 6
    n_heads: int = 12
    dim: int = 768
    hidden_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    initializer_range: float = 0.02
    seq_classif_dropout: float = 0.2
    pad_token_id: Optional[int] = 0
    id2label: Optional[dict] = None
    problem_type: Optional[str] = None
    model_type: str = "distilbert"
    use_sdpa: bool = True  # minillm's flag: torch's fused attention kernel (True) or the written-out math

    def __post_init__(self):
        validate_config(self, heads=("dim", "n_heads"))  # types, ranges, head split: before any allocation
        if self.activation not in ACTIVATIONS:
            raise hub.CheckpointError(f"config: activation '{self.activation}' not supported (one of {sorted(ACTIVATIONS)})")

    @property
    def hidden_size(self) -> int:  # the name the other encoders use (transformers maps it to `dim` too)
        return self.dim

    @property
    def num_labels(self) -> int:
        return len(self.id2label) if self.id2label else 2

    def to_hub_dict(self, architecture: str = "DistilBertModel") -> dict:
        return hub_config(self, architecture)


def sinusoidal_positions(n_pos: int, dim: int) -> torch.Tensor:
    """(n_pos, dim): PE[t, j] = sin(t / 10000^(2⌊j/2⌋/dim)) for even j, cos(...) for odd j (computed in float64)."""
    t = torch.arange(n_pos, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = t / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)  # (n_pos, dim)
    pe = torch.empty(n_pos, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle[:, 0::2])
    pe[:, 1::2] = torch.cos(angle[:, 1::2])
    return pe.float()


class DistilBertEmbeddings(nn.Module):
    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=1e-12)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids, position_ids):
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # (B, T, dim)
        return self.dropout(self.LayerNorm(x))


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = (Linear(D, D) for _ in range(4))

    def forward(self, x, mask=None, return_weights: bool = False):
        nh = self.cfg.n_heads
        q, k, v = (split_heads(f(x), nh) for f in (self.q_lin, self.k_lin, self.v_lin))  # (B, nh, T, hs)
        res = scaled_dot_product_attention(q, k, v, attn_mask=mask, return_weights=return_weights,
                                           use_sdpa=self.cfg.use_sdpa,
                                           dropout_p=self.cfg.attention_dropout if self.training else 0.0)
        y, w = res if return_weights else (res, None)
        return self.out_lin(merge_heads(y)), w  # (B, T, dim)


class FFN(nn.Module):
    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.lin1 = Linear(cfg.dim, cfg.hidden_dim)
        self.lin2 = Linear(cfg.hidden_dim, cfg.dim)
        self.act = ACTIVATIONS[cfg.activation]
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.lin2(self.act(self.lin1(x))))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.attention = MultiHeadSelfAttention(cfg)
        self.sa_layer_norm = nn.LayerNorm(cfg.dim, eps=1e-12)
        self.ffn = FFN(cfg)
        self.output_layer_norm = nn.LayerNorm(cfg.dim, eps=1e-12)

    def forward(self, x, mask=None, return_weights: bool = False):
        a, w = self.attention(x, mask, return_weights)
        a = self.sa_layer_norm(a + x)
        return self.output_layer_norm(self.ffn(a) + a), w


class DistilBertModel(nn.Module):
    """DistilBERT encoder. forward(input_ids, attention_mask) -> last hidden state (B, T, dim); with
    output_attentions=True an EncoderOutput (pooler_output is None: DistilBERT has no pooler)."""

    lora_targets = ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2")  # every linear of the attention and MLP blocks

    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = DistilBertEmbeddings(cfg)
        self.transformer = Encoder(TransformerBlock(cfg) for _ in range(cfg.n_layers))  # hub name: transformer.layer
        init_weights(self, cfg.initializer_range)
        if cfg.sinusoidal_pos_embds:  # fixed, not learned
            with torch.no_grad():
                self.embeddings.position_embeddings.weight.copy_(
                    sinusoidal_positions(cfg.max_position_embeddings, cfg.dim))
            self.embeddings.position_embeddings.weight.requires_grad_(False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_attentions: bool = False):
        cfg = self.config
        check_input_ids(input_ids, cfg.vocab_size, cfg.max_position_embeddings)
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]  # (1, T)
        mask = key_mask(attention_mask, B, T, input_ids.device)
        x = self.embeddings(input_ids, position_ids)
        x, attentions = self.transformer(x, mask, output_attentions)
        return EncoderOutput(x, None, attentions) if output_attentions else x

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: Optional[torch.dtype] = None, device=None,
                        **overrides) -> "DistilBertModel":
        """Load a DistilBERT checkpoint (DistilBertModel layout, or a task layout under `distilbert.`)."""
        return load_base_model(cls, DistilBertConfig, name_or_path, "distilbert", "distilbert.", IGNORED, dtype, device, **overrides)

    def save_pretrained(self, directory: str) -> Path:
        return hub.save_model(self, directory)


class DistilBertForSequenceClassification(nn.Module):
    """DistilBERT + pre_classifier + ReLU + dropout + classifier on the [CLS] vector -> logits (B, num_labels).
    forward(...) -> logits; the loss for config.problem_type (cross-entropy single-label, BCE-with-logits
    multi-label: the book's genres) is losses.classification_loss."""

    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.config = cfg
        self.distilbert = DistilBertModel(cfg)
        self.pre_classifier = Linear(cfg.dim, cfg.dim)
        self.classifier = Linear(cfg.dim, cfg.num_labels)
        self.dropout = nn.Dropout(cfg.seq_classif_dropout)
        init_weights(self.pre_classifier, cfg.initializer_range)
        init_weights(self.classifier, cfg.initializer_range)

    def forward(self, input_ids, attention_mask=None):
        h = self.distilbert(input_ids, attention_mask=attention_mask)
        x = self.dropout(torch.relu(self.pre_classifier(h[:, 0])))  # (B, dim)
        return self.classifier(x)  # (B, num_labels)

    @classmethod
    def from_pretrained(cls, name_or_path: str, num_labels: Optional[int] = None, problem_type: Optional[str] = None,
                        dtype: Optional[torch.dtype] = None, device=None,
                        **overrides) -> "DistilBertForSequenceClassification":
        d, raw = hub.read_config_of(name_or_path, "distilbert", cls.__name__)
        raw = classifier_config({**raw, **overrides}, num_labels, problem_type)
        cfg = config_from_dict(DistilBertConfig, raw, str(d / "config.json"))
        model = cls(cfg)
        state = hub.load_safetensors(d)
        has_head = "classifier.weight" in state
        return hub.load_into(model, state, d, dtype, device, prefix="distilbert.",
                             ignore_unexpected=[r"^vocab_(transform|layer_norm|projector)\.", r"position_ids$"],
                             optional=[] if has_head else [r"^(pre_)?classifier\."])

    def save_pretrained(self, directory: str) -> Path:
        return hub.save_model(self, directory)
