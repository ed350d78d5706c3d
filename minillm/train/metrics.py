"""Multi-label classification metrics from logits, in torch: micro F1, micro Jaccard, subset
accuracy, micro ROC-AUC.

Each of N examples may carry any subset of L labels. The model emits L logits; a label is
predicted when sigmoid(logit) >= threshold (0.5 in the book). "Micro" pools all N·L
(example, label) decisions before counting:

    F1       = 2·TP / (2·TP + FP + FN)
    Jaccard  = TP / (TP + FP + FN)
    subset accuracy = fraction of examples whose whole predicted label set is exactly right
    ROC-AUC  = P(score of a random positive > score of a random negative), ties counting ½,
               over the pooled N·L scores (the Mann–Whitney U statistic / (P·Q))

A 0/0 F1 or Jaccard is reported as 0 (scikit-learn's zero_division default). ROC-AUC needs
both classes present; otherwise it is NaN (scikit-learn raises). Golden values come from
scikit-learn (scripts/golden/metrics.py).

Source: the book, ch. 10 (multi-label genre prediction: micro F1, ROC-AUC, accuracy, Jaccard);
scikit-learn's f1_score / jaccard_score / accuracy_score / roc_auc_score definitions.
"""

from __future__ import annotations

import torch


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"logits and targets must both be (N, L); got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")


def predictions(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Multi-hot predictions: sigmoid(logits) >= threshold, as a bool (N, L) tensor."""
    return torch.sigmoid(logits.double()) >= threshold


def roc_auc_micro(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Micro-averaged ROC-AUC via average ranks (ties share their mean rank)."""
    scores = torch.sigmoid(logits.double()).flatten()  # ranks of probabilities, as the book scores them
    y = targets.flatten().bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_scores, order = torch.sort(scores)
    ranks = torch.empty_like(scores)
    # average rank within each run of equal scores (1-based)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()          # last 1-based rank of each run
    avg = ends - (counts.double() - 1) / 2            # mean rank of each run
    ranks[order] = avg[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2      # Mann–Whitney U of the positives
    return float(u / (n_pos * n_neg))


def multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """{"f1_micro", "jaccard_micro", "subset_accuracy", "roc_auc_micro"} for (N, L) logits and 0/1 targets."""
    _check(logits, targets)
    pred = predictions(logits, threshold)
    y = targets.bool()
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    jac = tp / (tp + fp + fn) if (tp + fp + fn) else 0.0
    subset = float((pred == y).all(dim=1).double().mean()) if len(y) else float("nan")
    return {"f1_micro": f1, "jaccard_micro": jac, "subset_accuracy": subset,
            "roc_auc_micro": roc_auc_micro(logits, targets)}
