"""Sequence-classification loss and partial freezing, shared by the BERT-family classifiers.

A classifier reads one vector per sequence and maps it to `num_labels` logits z. Single-label
problems (one class per example) use cross-entropy, L = −log softmax(z)_y; multi-label problems
(any subset of labels per example, e.g. movie genres) use one sigmoid per label with binary
cross-entropy, L = −mean_k [y_k log σ(z_k) + (1 − y_k) log(1 − σ(z_k))], and predict label k when
σ(z_k) ≥ 0.5; one label with float targets is regression (MSE), as transformers infers it.

Partial freezing trains only the top of a pretrained encoder: the book (ch. 10) freezes every
parameter named before `distilbert.transformer.layer.4` — embeddings and layers 0–3 of 6 — and
trains ~30% faster for a small loss in F1 (0.489 vs 0.538 unfrozen).

Source: the book, ch. 10 (multi-label genre classification, partial freezing); transformers'
`problem_type` rules in BertForSequenceClassification.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def infer_problem_type(num_labels: int, labels: torch.Tensor) -> str:
    """transformers' rule: 1 label -> regression; integer labels -> single-label; else multi-label."""
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int, torch.int32, torch.int16, torch.uint8):
        return "single_label_classification"
    return "multi_label_classification"


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: Optional[str] = None) -> torch.Tensor:
    """Mean loss of logits (B, num_labels) against labels: (B,) class ids, (B, num_labels) 0/1, or (B,) floats."""
    num_labels = logits.shape[-1]
    problem_type = problem_type or infer_problem_type(num_labels, labels)
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1) if num_labels == 1 else logits, labels.to(logits.dtype))
    if problem_type == "single_label_classification":
        kept = labels[labels != -100]
        if kept.numel() and (kept.max() >= num_labels or kept.min() < 0):
            raise ValueError(f"labels must be class ids in [0, {num_labels}) (or -100 to ignore), "
                             f"found {int(labels.min())}..{int(labels.max())}")
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1).long(), ignore_index=-100)
    if problem_type == "multi_label_classification":
        if labels.shape != logits.shape:
            raise ValueError(f"multi-label targets must have the logits' shape {tuple(logits.shape)}, "
                             f"found {tuple(labels.shape)}")
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise ValueError(f"problem_type {problem_type!r} is not one of {PROBLEM_TYPES}")


def multilabel_predictions(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """0/1 predictions (B, num_labels): label k is on when sigmoid(z_k) >= threshold."""
    return (torch.sigmoid(logits) >= threshold).long()


def freeze_by_name(model: nn.Module, patterns: Iterable[str]) -> int:
    """Freeze every parameter whose name matches one of the regexes (re.search); returns how many were frozen."""
    pats = [re.compile(p) for p in patterns]
    n = 0
    for name, p in model.named_parameters():
        if any(pt.search(name) for pt in pats):
            p.requires_grad_(False)
            n += 1
    return n


def freeze_before(model: nn.Module, name: str) -> int:
    """The book's partial freezing: freeze parameters in registration order until the first whose name
    contains `name` (e.g. 'distilbert.transformer.layer.4'). Returns how many were frozen."""
    names = [n for n, _ in model.named_parameters()]
    if not any(name in n for n in names):
        raise ValueError(f"no parameter name contains {name!r}; names run {names[0]!r} ... {names[-1]!r}")
    n = 0
    for pname, p in model.named_parameters():
        if name in pname:
            break
        p.requires_grad_(False)
        n += 1
    return n


def freeze_below_layer(model: nn.Module, n_layer: int, layer_pattern: str = r"\.layer\.(\d+)\.") -> int:
    """Freeze the embeddings and every layer with index < n_layer; layers >= n_layer and heads stay trainable.
    Returns how many parameters were frozen."""
    pat = re.compile(layer_pattern)
    n = 0
    for name, p in model.named_parameters():
        m = pat.search(name)
        if (m and int(m.group(1)) < n_layer) or (not m and "embeddings." in name):
            p.requires_grad_(False)
            n += 1
    return n


def unfreeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
