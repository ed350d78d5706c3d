"""BERT: a bidirectional transformer encoder (post-LN), loading the hub's safetensors checkpoints by name.

    h_0 = LN(W_word[x] + W_pos[t] + W_type[s])          (token, position, segment embeddings)
    a_l = LN(h_{l-1} + Attn(h_{l-1}))                    (post-LN: the norm comes after the residual)
    h_l = LN(a_l + W_2 · gelu(W_1 a_l))
    pooler = tanh(W_p h_L[:, 0])                          (the [CLS] vector, when the checkpoint has one)

Every token attends to every other real token (no causal mask); pads are hidden by the
attention mask. Sentence embeddings (sentence-transformers' all-MiniLM-L6-v2) are the mean of
the last hidden states over real tokens, L2-normalized. Parameter names are the hub's
(`encoder.layer.0.attention.self.query.weight`; the odd `attention.self` / `attention.output`
nesting is kept). BertModel's names carry no `bert.` prefix, as the hub's BertModel checkpoints;
task checkpoints (`bert.` + `cls.*` / `classifier.*`) load too (see pretrained.py), and
BertForSequenceClassification keeps the `bert.` prefix so its saves load in transformers.

Source: Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers" (2019);
Reimers & Gurevych, "Sentence-BERT" (2019) for mean pooling; transformers' modeling_bert.py
for names and layout; the book, ch. 10, for the multi-label classifier and partial freezing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm import hub
from minillm.configs import classifier_config, config_from_dict, hub_config, validate_config
from minillm.linear import Linear
from minillm.losses import mean_pool
from minillm.models.layers import (ACTIVATIONS, Encoder, EncoderOutput, Intermediate, Pooler, SelfAttention,
                                   check_input_ids, init_weights, key_mask, load_base_model)

IGNORED = [r"^embeddings\.position_ids$"]  # an old buffer (0..511) some checkpoints carry; we build positions


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: Optional[int] = 0
    position_embedding_type: str = "absolute"
    classifier_dropout: Optional[float] = None
    id2label: Optional[dict] = None  # classifier labels, {"0": "neg", ...} as in config.json
    problem_type: Optional[str] = None  # single_label_classification | multi_label_classification | regression
    model_type: str = "bert"
    use_sdpa: bool = True  # minillm's flag: torch's fused attention kernel (True) or the written-out math

    def __post_init__(self):
        validate_config(self, heads=("hidden_size", "num_attention_heads"))  # types, ranges, head split: before any allocation
        if self.position_embedding_type != "absolute":
            raise hub.CheckpointError(f"config: position_embedding_type '{self.position_embedding_type}' is not "
                                      f"supported (only 'absolute')")
        if self.hidden_act not in ACTIVATIONS:
            raise hub.CheckpointError(f"config: hidden_act '{self.hidden_act}' not supported (one of {sorted(ACTIVATIONS)})")

    @property
    def num_labels(self) -> int:
        return len(self.id2label) if self.id2label else 2

    def to_hub_dict(self, architecture: str = "BertModel") -> dict:
        return hub_config(self, architecture)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids):
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids) \
            + self.token_type_embeddings(token_type_ids)  # (B, T, H)
        return self.dropout(self.LayerNorm(x))


class BertAddNorm(nn.Module):
    """LN(x + dropout(W y)): the post-LN residual step (hub names: `attention.output`, `output`)."""

    def __init__(self, d_in: int, cfg: BertConfig):
        super().__init__()
        self.dense = Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, y, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(y)))


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = SelfAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.attention_probs_dropout_prob,
                                  cfg.use_sdpa)  # hub name: attention.self.{query,key,value}
        self.output = BertAddNorm(cfg.hidden_size, cfg)

    def forward(self, x, mask=None, return_weights: bool = False):
        y, w = self.self(x, mask, return_weights)
        return self.output(y, x), w


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = Intermediate(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.output = BertAddNorm(cfg.intermediate_size, cfg)

    def forward(self, x, mask=None, return_weights: bool = False):
        a, w = self.attention(x, mask, return_weights)
        return self.output(self.intermediate(a), a), w


class BertModel(nn.Module):
    """BERT encoder. forward(input_ids, attention_mask, token_type_ids) -> last hidden state (B, T, H).

    With return_pooled / output_attentions it returns an EncoderOutput (last_hidden_state,
    pooler_output, attentions) instead."""

    lora_targets = ("query", "key", "value", "intermediate.dense", "output.dense")  # every linear of the attention and MLP blocks
    # what a variant with BERT's encoder changes (RobertaModel): its config, checkpoint names and positions
    config_class, embeddings_class, model_type, prefix, ignored = BertConfig, BertEmbeddings, "bert", "bert.", IGNORED

    def __init__(self, cfg: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = cfg
        self.embeddings = self.embeddings_class(cfg)
        self.encoder = Encoder(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.pooler = Pooler(cfg.hidden_size, cfg.hidden_size) if add_pooling_layer else None
        init_weights(self, cfg.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                return_pooled: bool = False, output_attentions: bool = False):
        cfg = self.config
        check_input_ids(input_ids, cfg.vocab_size, self.max_input_length())
        B, T = input_ids.shape
        dev = input_ids.device
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            if tuple(token_type_ids.shape) != (B, T):
                raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}, expected {(B, T)}")
            lo, hi = (int(token_type_ids.min()), int(token_type_ids.max())) if token_type_ids.numel() else (0, 0)
            if lo < 0 or hi >= cfg.type_vocab_size:
                raise ValueError(f"token_type_ids: value {hi if hi >= cfg.type_vocab_size else lo} outside "
                                 f"[0, {cfg.type_vocab_size}) (type_vocab_size={cfg.type_vocab_size})")
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids)
        mask = key_mask(attention_mask, B, T, dev)  # bool (B, 1, 1, T) or None
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        x, attentions = self.encoder(x, mask, output_attentions)
        if not (return_pooled or output_attentions):
            return x
        pooled = self.pooler(x) if (return_pooled and self.pooler is not None) else None
        if return_pooled and self.pooler is None:
            raise ValueError("return_pooled=True, but this checkpoint has no pooler (pooler.dense.*)")
        return EncoderOutput(x, pooled, attentions)

    # ---- hub I/O ----
    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: Optional[torch.dtype] = None, device=None,
                        **overrides) -> "BertModel":
        """Load a BERT checkpoint (BertModel layout, or a task layout with the `bert.` prefix; its heads are
        skipped). The pooler is built when the checkpoint has one. `overrides` change config keys (use_sdpa=...)."""
        return load_base_model(cls, cls.config_class, name_or_path, cls.model_type, cls.prefix, cls.ignored, dtype,
                                   device, **overrides)

    def save_pretrained(self, directory: str) -> Path:
        """config.json + model.safetensors in the hub's base layout (no prefix)."""
        return hub.save_model(self, directory)

    def max_input_length(self) -> int:
        return self.config.max_position_embeddings

    def default_position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(1, T): BERT counts positions from 0, pads included."""
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None]


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, sentences: Sequence[str], normalize: bool = True,
                        max_length: int = 256, batch_size: int = 32) -> torch.Tensor:
    """Encode sentences as sentence-transformers' all-MiniLM-L6-v2 does: tokenize (truncated to
    max_length), encode, mean-pool over real tokens, L2-normalize. Returns (N, H) float32."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer.pad(tokenizer.encode_truncated(sentences[i:i + batch_size], max_length), padding_side="right")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        emb = mean_pool(model(ids, attention_mask=mask).float(), mask)
        out.append(F.normalize(emb, p=2, dim=-1) if normalize else emb)
    return torch.cat(out).cpu()


class BertForSequenceClassification(nn.Module):
    """BERT + dropout + linear on the pooled [CLS] vector -> logits (B, num_labels); hub names `bert.*`,
    `classifier.*`. forward(...) -> logits; the loss for config.problem_type is losses.classification_loss."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg, add_pooling_layer=True)
        p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = Linear(cfg.hidden_size, cfg.num_labels)
        init_weights(self.classifier, cfg.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        out = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_pooled=True)
        return self.classifier(self.dropout(out.pooler_output))  # (B, num_labels)

    @classmethod
    def from_pretrained(cls, name_or_path: str, num_labels: Optional[int] = None, problem_type: Optional[str] = None,
                        dtype: Optional[torch.dtype] = None, device=None,
                        **overrides) -> "BertForSequenceClassification":
        """Load a BERT checkpoint; a base checkpoint gets a new, randomly initialized classifier with
        `num_labels` outputs (the checkpoint's own labels otherwise)."""
        d, raw = hub.read_config_of(name_or_path, "bert", cls.__name__)
        raw = classifier_config({**raw, **overrides}, num_labels, problem_type)
        cfg = config_from_dict(BertConfig, raw, str(d / "config.json"))
        model = cls(cfg)
        state = hub.load_safetensors(d)
        heads = [r"^cls\."]  # a pre-training checkpoint's MLM/NSP heads
        new = [] if "classifier.weight" in state else [r"^classifier\."]  # a base checkpoint: a new head
        if not any(k.endswith("pooler.dense.weight") for k in state):
            new.append(r"^bert\.pooler\.")  # no pooler saved: it starts random too, as in transformers
        return hub.load_into(model, state, d, dtype, device, prefix="bert.",
                             ignore_unexpected=heads + [r"position_ids$"], optional=new)

    def save_pretrained(self, directory: str) -> Path:
        return hub.save_model(self, directory)
