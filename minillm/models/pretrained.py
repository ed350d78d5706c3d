"""Hub I/O shared by the encoders (BERT, DistilBERT, ViT): one checkpoint, two layouts.

The hub stores an encoder two ways. A *base* checkpoint (`BertModel`, `ViTModel`) names its
tensors without a prefix (`embeddings.word_embeddings.weight`); a *task* checkpoint
(`BertForSequenceClassification`, `BertForPreTraining`, `ViTForImageClassification`) puts the
base under a prefix (`bert.`, `distilbert.`, `vit.`) and adds head tensors (`cls.*`,
`classifier.*`, ...). A base model reads both: the prefix is stripped and the *known* head
tensors are skipped; any other stray tensor is still an error (strict loading). A task model
(our sequence classifier) keeps the prefix in its own names, so its save_pretrained output
loads in transformers' matching class.

Source: transformers' `base_model_prefix` convention (modeling_utils.py); the hub layouts of
bert-base-uncased, distilbert-base-uncased, google/vit-base-patch16-224(-in21k), facebook/dino-vitb16.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch

from minillm import hub
from minillm.attention import padding_mask

# Head tensors of task checkpoints a base model may skip (bert-base-uncased: cls.*; classifiers; MLM heads).
HEAD_TENSORS = [r"^cls\.", r"^classifier\.", r"^pre_classifier\.", r"^qa_outputs\.", r"^vocab_transform\.",
                r"^vocab_layer_norm\.", r"^vocab_projector\.", r"^lm_head\.", r"^decoder\."]


def read_checked_config(name_or_path: str, model_type: str, loader: str) -> tuple[Path, dict]:
    """Resolve a checkpoint and read its config.json, refusing another architecture with a clear error."""
    d = hub.resolve(name_or_path)
    raw = hub.read_config(d)
    found = raw.get("model_type")
    if found != model_type:
        raise hub.CheckpointError(
            f"{d / 'config.json'}: model_type '{found}' (architectures {raw.get('architectures')}) is not "
            f"'{model_type}'; {loader} loads {model_type} checkpoints only")
    return d, raw


def base_state(state: dict[str, torch.Tensor], prefix: str,
               head_tensors: Iterable[str] = HEAD_TENSORS) -> dict[str, torch.Tensor]:
    """The base model's tensors of a checkpoint: `prefix` stripped when present, known head tensors dropped.

    A checkpoint with no prefixed tensor is returned as is (it is already a base checkpoint)."""
    if not any(k.startswith(prefix) for k in state):
        return dict(state)
    heads = [re.compile(p) for p in head_tensors]
    out = {}
    for k, v in state.items():
        if k.startswith(prefix):
            out[k[len(prefix):]] = v
        elif not any(p.search(k) for p in heads):
            out[k] = v  # not a known head: left in, so strict loading reports it
    return out


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


def init_weights(module: torch.nn.Module, std: float) -> None:
    """BERT-style initialisation: N(0, std) for linear/embedding/conv weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d)):
            torch.nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)
            if getattr(m, "padding_idx", None) is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()  # the pad token's embedding starts at zero
        elif isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)


def key_mask(attention_mask, B: int, T: int, device):
    """Check a (B, T) 1/0 attention mask; None when absent or all ones (no key is hidden: the fused kernel
    then runs unmasked), else the bool (B, 1, 1, T) mask, True at real tokens."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)} (batch, seq_len)")
    if bool(attention_mask.all()):
        return None
    return padding_mask(attention_mask.to(device))
