"""Partial freezing: train only the top of a pretrained model.

Freezing sets requires_grad=False on a parameter, so the optimizer never sees it and no gradient is
stored for it. The book (ch. 10) freezes every parameter named before `distilbert.transformer.layer.4`
— embeddings and layers 0–3 of 6 — and trains ~30% faster for a small loss in F1 (0.489 vs 0.538
unfrozen). Three ways to say what freezes: by name pattern, by registration order up to a name (the
book's), by layer index (embeddings + layers < N).

Source: the book, ch. 10 (multi-label genre classification, partial freezing).
"""

from __future__ import annotations

import re
from typing import Iterable

import torch.nn as nn


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
