"""Pick a model class from a checkpoint: read `model_type` in config.json once, look it up, load.

A hub checkpoint says what it is in config.json ("model_type": "gpt2", "bert", ...). Jobs ask for a
*kind* of model — a causal LM to generate or fine-tune, an encoder to read text, a sequence
classifier — and this module maps (kind, model_type) to the class that loads it. The tables are
plain dicts a reader can scan; a checkpoint of a type the kind does not cover is a clear error
naming what is supported.

Source: transformers' Auto classes (AutoModelForCausalLM, AutoModel, ...), reduced to two dicts.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from minillm import hub
from minillm.models.bert import BertForSequenceClassification, BertModel
from minillm.models.distilbert import DistilBertForSequenceClassification, DistilBertModel
from minillm.models.gpt2 import GPT2LMHeadModel
from minillm.models.llama import LlamaForCausalLM
from minillm.models.roberta import RobertaForSequenceClassification, RobertaModel
from minillm.models.t5 import T5ForConditionalGeneration
from minillm.models.vit import ViTModel

KINDS: dict[str, dict[str, type]] = {
    "causal-lm": {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM, "mistral": LlamaForCausalLM,
                  "qwen2": LlamaForCausalLM},
    "encoder": {"bert": BertModel, "distilbert": DistilBertModel, "roberta": RobertaModel, "vit": ViTModel},
    "classifier": {"bert": BertForSequenceClassification, "distilbert": DistilBertForSequenceClassification,
                   "roberta": RobertaForSequenceClassification},
    "seq2seq": {"t5": T5ForConditionalGeneration},  # encoder-decoder LMs: encode the input, decode the target
}


def model_type(name_or_path: str) -> tuple[Path, str]:
    """(local directory, model_type) of a checkpoint."""
    d = hub.resolve(name_or_path)
    return d, hub.read_config(d).get("model_type")


def model_class(name_or_path: str, kind: str) -> tuple[Path, type]:
    """(local directory, class) that loads this checkpoint as `kind`; raises CheckpointError otherwise."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    d, mt = model_type(name_or_path)
    if mt not in KINDS[kind]:
        raise hub.CheckpointError(f"{d / 'config.json'}: model_type {mt!r} cannot be loaded as a {kind}; "
                                  f"supported: {sorted(KINDS[kind])}")
    return d, KINDS[kind][mt]


def load_model(name_or_path: str, kind: str, **kwargs) -> nn.Module:
    """Load a checkpoint as `kind` ("causal-lm", "encoder", "classifier", "seq2seq"); kwargs go to from_pretrained."""
    d, cls = model_class(name_or_path, kind)
    return cls.from_pretrained(str(d), **kwargs)
