"""Golden multi-label metrics from scikit-learn (micro F1, micro Jaccard, subset accuracy, micro
ROC-AUC on sigmoid probabilities, threshold 0.5 — the book's ch. 10 recipe).

Cases: random logits; logits with ties (rounded) and saturated values; a model that predicts
nothing (F1 = Jaccard = 0 by zero_division=0); a perfect model. Writes tests/golden/metrics.safetensors
with logits_<i>, targets_<i> and expected_<i> = [f1, jaccard, subset_accuracy, roc_auc] (float64).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, jaccard_score, roc_auc_score

from golden.common import seed_all, write_golden


def cases():
    g = torch.Generator().manual_seed(0)
    out = []
    t = (torch.rand(40, 6, generator=g) < 0.3).float()
    out.append((torch.randn(40, 6, generator=g, dtype=torch.float64) * 2, t))
    # ties and saturation: rounded logits share scores
    t = (torch.rand(25, 4, generator=g) < 0.5).float()
    out.append((torch.round(torch.randn(25, 4, generator=g, dtype=torch.float64) * 2) / 2, t))
    # predicts nothing: every logit negative
    t = (torch.rand(10, 5, generator=g) < 0.4).float()
    out.append((-torch.rand(10, 5, generator=g, dtype=torch.float64) - 0.1, t))
    # perfect
    t = (torch.rand(12, 3, generator=g) < 0.5).float()
    out.append((((t * 2 - 1) * 3).double(), t))
    # informative but noisy
    t = (torch.rand(64, 8, generator=g) < 0.25).float()
    out.append((t * 1.5 + torch.randn(64, 8, generator=g, dtype=torch.float64) - 0.8, t))
    return out


def make(root: Path) -> None:
    seed_all(0)
    # one metadata key: safetensors writes metadata in hash order, so several keys would not be byte-stable
    tensors, meta = {}, {"source": "threshold 0.5; scikit-learn micro f1/jaccard, accuracy_score, roc_auc_score(average='micro') on sigmoid probabilities"}
    for i, (logits, targets) in enumerate(cases()):
        probs = torch.sigmoid(logits).numpy()
        y = targets.numpy().astype(int)
        pred = (probs >= 0.5).astype(int)
        vals = [f1_score(y, pred, average="micro", zero_division=0),
                jaccard_score(y, pred, average="micro", zero_division=0),
                accuracy_score(y, pred),
                roc_auc_score(y, probs, average="micro")]
        tensors[f"logits_{i}"] = logits
        tensors[f"targets_{i}"] = targets
        tensors[f"expected_{i}"] = torch.tensor(np.array(vals, dtype=np.float64))
    write_golden(root, "metrics", tensors, meta)
