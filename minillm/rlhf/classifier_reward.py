"""A reward from off-the-shelf classifiers: a weighted sum of chosen logits (the book's ch. 9 reward).

Instead of a reward model trained on human preferences, the book scores each generated summary with
two ready-made sequence classifiers and adds up one logit of each, weighted:

    reward(text) = Σ_k w_k · logit_k(text)[label_k]
                 = 1 × CoLA "LABEL_1" (grammatical) + 0.5 × cardiffnlp sentiment "LABEL_1" (neutral)

The raw logit (not the probability) is used, as in the book: it keeps growing where a probability
saturates near 1. A label is named as in the classifier's config.id2label ("acceptable"), as
"LABEL_k" (index k, transformers' default name), or by its index ("1"/1).

ClassifierReward is callable as PPO's score_fn(prompts, responses) -> (B,): it scores the responses
(the prompts are ignored), in batches, without gradients. `load_classifier_reward(["DIR:LABEL:WEIGHT", ...])`
builds one from checkpoint directories or hub names (models.auto kind "classifier").

Source: the book, ch. 9 (FLAN-T5 summaries rewarded by textattack/roberta-base-CoLA and
cardiffnlp/twitter-roberta-base-sentiment; example rewards [2.53, −0.45, −1.61]).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
import torch.nn as nn


def label_index(config, label) -> int:
    """The output index of `label` for a classifier config: a name in id2label, "LABEL_k", or an index."""
    n = int(getattr(config, "num_labels", 0) or len(getattr(config, "id2label", {}) or {}))
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if isinstance(label, int) or (isinstance(label, str) and label.isdigit()):
        i = int(label)
    else:
        names = {v: k for k, v in id2label.items()}
        m = re.fullmatch(r"LABEL_(\d+)", str(label))
        if label in names:
            i = names[label]
        elif m:
            i = int(m.group(1))
        else:
            raise ValueError(f"label {label!r} is not one of the classifier's labels {id2label}")
    if not 0 <= i < n:
        raise ValueError(f"label {label!r} -> index {i}, but the classifier has {n} labels {id2label}")
    return i


class ClassifierReward:
    """terms: [(model, tokenizer, label, weight), ...]; model(input_ids, attention_mask) -> logits (B, L).
    __call__(prompts, responses) -> (B,) float32 rewards on the responses; scores(texts) -> the reward and
    each term's logit. `strip`: strings removed from the texts first (e.g. the policy's EOS text)."""

    def __init__(self, terms: Sequence[tuple], batch_size: int = 64, max_length: int = 512,
                 strip: Sequence[str] = ()):
        if not terms:
            raise ValueError("ClassifierReward needs at least one (model, tokenizer, label, weight) term")
        self.terms = []
        for model, tok, label, weight in terms:
            self.terms.append((model.eval(), tok, label_index(model.config, label), float(weight), str(label)))
        self.batch_size, self.max_length = batch_size, max_length
        self.strip = [s for s in strip if s]

    def _clean(self, text: str) -> str:
        for s in self.strip:
            text = text.replace(s, " ")
        return " ".join(text.split())

    @torch.no_grad()
    def logits(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """The chosen logit of each term, one (B,) tensor per term."""
        texts = [self._clean(t) for t in texts]
        out = []
        for model, tok, idx, _, _ in self.terms:
            device = next(model.parameters()).device
            col = []
            for s in range(0, len(texts), self.batch_size):
                enc = tok(texts[s:s + self.batch_size], truncation=True, max_length=self.max_length,
                          padding_side="right")
                logits = model(enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
                col.append(logits[:, idx].float().cpu())  # (b,)
            out.append(torch.cat(col))
        return out

    def scores(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """{"reward": Σ w·logit, and per term "<k>:<label>": its logit}, each (B,)."""
        per = self.logits(texts)
        total = sum(w * l for (_, _, _, w, _), l in zip(self.terms, per))
        return {"reward": total, **{f"{k}:{t[4]}": l for k, (t, l) in enumerate(zip(self.terms, per))}}

    def __call__(self, prompts: Optional[Sequence[str]], responses: Sequence[str]) -> torch.Tensor:
        per = self.logits(responses)
        return sum(w * l for (_, _, _, w, _), l in zip(self.terms, per))


def parse_spec(spec: str) -> tuple[str, str, float]:
    """"DIR:LABEL:WEIGHT" -> (dir, label, weight); the directory may itself contain ':' (split from the right)."""
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise ValueError(f"reward classifier spec {spec!r} must be DIR:LABEL:WEIGHT, e.g. "
                         f"textattack/roberta-base-CoLA:LABEL_1:1.0")
    try:
        weight = float(parts[2])
    except ValueError:
        raise ValueError(f"reward classifier spec {spec!r}: weight {parts[2]!r} is not a number") from None
    return parts[0], parts[1], weight


def load_classifier_reward(specs: Sequence[str], device=None, **kwargs) -> ClassifierReward:
    """["DIR:LABEL:WEIGHT", ...] -> ClassifierReward; each DIR (a directory, weights/<name> or a hub id) is
    loaded as models.auto kind "classifier" with its own tokenizer."""
    from minillm.models.auto import load_model
    from minillm.tokenizer import Tokenizer
    parsed = [parse_spec(s) for s in specs]  # every spec checked before any model is loaded
    terms = []
    for d, label, weight in parsed:
        model: nn.Module = load_model(d, "classifier", device=device)
        label_index(model.config, label)
        terms.append((model, Tokenizer.from_pretrained(d), label, weight))
    return ClassifierReward(terms, **kwargs)
