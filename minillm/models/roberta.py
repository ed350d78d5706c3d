"""RoBERTa: BERT's encoder with other embeddings, positions and head, loading the hub's safetensors by name.

RoBERTa (Liu et al. 2019) changes how BERT is *trained* (more data, no next-sentence task, dynamic
masking, a byte-level BPE vocabulary); the network is BERT's post-LN encoder, unchanged. What differs
in the code is small:

    positions   p_t = padding_idx + cumsum(m)_t · m_t,   m_t = [x_t ≠ pad]     (fairseq's make_positions)
                real tokens count from padding_idx + 1 (= 2 for roberta-base); every pad sits at padding_idx,
                whose row of the position table is zero. The table therefore has 512 + 2 = 514 rows.
    segments    one token type (type_vocab_size 1): a row of W_type added to every token
    h_0         LN(W_word[x] + W_pos[p] + W_type[0]);  h_l as in BERT (bert.py's BertLayer, reused here)
    classifier  logits = W_o · tanh(W_d · h_L[:, 0] + b_d) + b_o          (on <s>, the first token; no pooler)

Positions come from the ids, not from the attention mask: a row padded on the right gets the same
positions as the unpadded row, so pads change nothing for real tokens. Hub names are kept: the base
checkpoint (`RobertaModel`) has no prefix and may carry `pooler.*`; task checkpoints put the body under
`roberta.` (`classifier.dense`, `classifier.out_proj` for sequence classification; `lm_head.*` for
masked-LM checkpoints, skipped by the base model).

Source: Liu et al., "RoBERTa: A Robustly Optimized BERT Pretraining Approach" (2019); fairseq's
`utils.make_positions`; transformers' modeling_roberta.py for names, `create_position_ids_from_input_ids`
and `RobertaClassificationHead`; the book, ch. 10 (a RoBERTa-base reward model) and ch. 9 (the
cardiffnlp sentiment classifier: 0 negative, 1 neutral, 2 positive).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from minillm import hub
from minillm.configs import config_from_dict
from minillm.linear import Linear
from minillm.models.bert import BertConfig, BertEmbeddings, BertModel
from minillm.models.layers import init_weights

IGNORED = [r"(^|\.)embeddings\.position_ids$", r"(^|\.)embeddings\.token_type_ids$"]  # old buffers some files carry


@dataclass
class RobertaConfig(BertConfig):
    """BERT's config with RoBERTa's defaults (roberta-base's config.json): 514 positions, one token type,
    LayerNorm eps 1e-5, <pad> = 1, <s> = 0, </s> = 2."""
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 2
    model_type: str = "roberta"

    def __post_init__(self):
        super().__post_init__()
        if self.pad_token_id is None or not 0 <= self.pad_token_id < self.vocab_size:
            raise hub.CheckpointError(f"config: pad_token_id={self.pad_token_id} must be a token id in [0, "
                                      f"{self.vocab_size}): RoBERTa's positions are counted from it")
        if self.max_position_embeddings <= self.pad_token_id + 1:
            raise hub.CheckpointError(f"config: max_position_embeddings={self.max_position_embeddings} leaves no "
                                      f"position for a token (positions start at pad_token_id + 1 = "
                                      f"{self.pad_token_id + 1})")

    @property
    def max_input_length(self) -> int:
        """The longest input: positions run padding_idx + 1 .. padding_idx + T (512 for roberta-base)."""
        return self.max_position_embeddings - self.pad_token_id - 1

    def to_hub_dict(self, architecture: str = "RobertaModel") -> dict:
        return super().to_hub_dict(architecture)


def position_ids_from_input_ids(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """(B, T) -> (B, T): padding_idx + (running count of real tokens) at real tokens, padding_idx at pads."""
    m = input_ids.ne(padding_idx).long()  # (B, T) 1 at real tokens
    return torch.cumsum(m, dim=1) * m + padding_idx


class RobertaEmbeddings(BertEmbeddings):
    """BERT's embeddings (word + position + type, LayerNorm, dropout); the position table has a zero,
    gradient-free row at padding_idx, where every pad's position points."""

    def __init__(self, cfg: RobertaConfig):
        super().__init__(cfg)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                                padding_idx=cfg.pad_token_id)


class RobertaModel(BertModel):
    """RoBERTa encoder: BERT's, layer for layer, with RoBERTa's embeddings and positions. forward(input_ids,
    attention_mask) -> last hidden state (B, T, H); with return_pooled / output_attentions an EncoderOutput.
    Positions are computed from input_ids (pads skipped) unless position_ids are given. Loads the base layout (no
    prefix, maybe a pooler) or a task layout (`roberta.` prefix; its heads `classifier.*` / `lm_head.*` skipped)."""

    config_class, embeddings_class, model_type, prefix, ignored = (RobertaConfig, RobertaEmbeddings, "roberta",
                                                                   "roberta.", IGNORED)

    def max_input_length(self) -> int:
        return self.config.max_input_length

    def default_position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return position_ids_from_input_ids(input_ids, self.config.pad_token_id)  # (B, T), from pad + 1


class RobertaClassificationHead(nn.Module):
    """dropout → dense → tanh → dropout → out_proj on the <s> vector (hub names `classifier.dense`,
    `classifier.out_proj`). This is BERT's pooler + classifier, but the pair lives in the head and is
    trained with the task; RoBERTa's pre-training left no pooler to reuse."""

    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(p)
        self.out_proj = Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.dropout(h[:, 0])  # (B, H): <s>, the first token
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)  # (B, num_labels)


class RobertaForSequenceClassification(nn.Module):
    """RoBERTa (no pooler) + RobertaClassificationHead -> logits (B, num_labels); hub names `roberta.*`,
    `classifier.*`. forward(...) -> logits; the loss for config.problem_type is losses.classification_loss."""

    lora_targets = RobertaModel.lora_targets

    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.config = cfg
        self.roberta = RobertaModel(cfg, add_pooling_layer=False)
        self.classifier = RobertaClassificationHead(cfg)
        init_weights(self.classifier, cfg.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        h = self.roberta(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)  # (B, T, H)
        return self.classifier(h)  # (B, num_labels)

    @classmethod
    def from_pretrained(cls, name_or_path: str, num_labels: Optional[int] = None, problem_type: Optional[str] = None,
                        id2label: Optional[dict] = None, label2id: Optional[dict] = None,
                        dtype: Optional[torch.dtype] = None, device=None,
                        **overrides) -> "RobertaForSequenceClassification":
        """Load a RoBERTa checkpoint; a checkpoint without `classifier.*` (base or masked-LM) gets a new,
        randomly initialized head with `num_labels` outputs (the checkpoint's own labels otherwise).
        id2label names the labels ({"0": "negative", ...}); label2id, when given, must be its inverse."""
        d, raw = hub.read_config_of(name_or_path, "roberta", cls.__name__)
        raw = {**raw, **overrides}
        if id2label is not None:
            id2label = {str(k): v for k, v in id2label.items()}
            if num_labels is not None and len(id2label) != num_labels:
                raise ValueError(f"id2label has {len(id2label)} labels, num_labels={num_labels}")
            if label2id is not None and {str(v): k for k, v in label2id.items()} != id2label:
                raise ValueError(f"label2id {label2id} is not the inverse of id2label {id2label}")
            raw["id2label"] = id2label
        elif num_labels is not None and (not raw.get("id2label") or len(raw["id2label"]) != num_labels):
            raw["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        if problem_type is not None:
            raw["problem_type"] = problem_type
        cfg = config_from_dict(RobertaConfig, raw, str(d / "config.json"))
        model = cls(cfg)
        state = hub.load_safetensors(d)
        skip = IGNORED + [r"^lm_head\.", r"^(roberta\.)?pooler\."]  # masked-LM head; a pooler the head does not use
        new = [] if "classifier.out_proj.weight" in state else [r"^classifier\."]  # no head saved: a new one
        return hub.load_into(model, state, d, dtype, device, prefix="roberta.", ignore_unexpected=skip, optional=new)

    def save_pretrained(self, directory: str) -> Path:
        return hub.save_model(self, directory)
