"""Multi-label metrics (minillm.train.metrics) on small batches worked out by hand: the micro counts, the 0.5
threshold (sigmoid(0) = 0.5 counts as predicted), ROC-AUC with tied scores, the one-class NaN, 0/0 = 0, and bad
shapes. Found by scripts/mutation.py: the golden/hypothesis tests never pinned the threshold default, the
single-positive AUC, or the all-negative F1."""

import math

import pytest
import torch

from minillm.train.metrics import multilabel_metrics, predictions, roc_auc_micro


def _pairwise_auc(scores, labels):
    """P(pos > neg) + ½ P(pos == neg) over every (positive, negative) pair, in plain Python."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_micro_counts_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5],     # predicted {0, 2}
                           [-2.0, 1.5, -0.5],    # predicted {1}
                           [0.3, -4.0, -0.2]])   # predicted {0}
    targets = torch.tensor([[1, 0, 0],           # tp 1 (label 0), fp 1 (label 2)
                            [0, 1, 0],           # tp 1, exactly right
                            [1, 1, 1]])          # tp 1, fn 2
    m = multilabel_metrics(logits, targets)
    tp, fp, fn = 3, 1, 2
    assert m["f1_micro"] == pytest.approx(2 * tp / (2 * tp + fp + fn))  # 6/9
    assert m["jaccard_micro"] == pytest.approx(tp / (tp + fp + fn))     # 3/6
    assert m["subset_accuracy"] == pytest.approx(1 / 3)                 # only row 1 is exactly right
    scores = torch.sigmoid(logits.double()).flatten().tolist()
    assert m["roc_auc_micro"] == pytest.approx(_pairwise_auc(scores, targets.flatten().tolist()), abs=1e-12)
    assert set(m) == {"f1_micro", "jaccard_micro", "subset_accuracy", "roc_auc_micro"}


def test_threshold_default_is_half_and_inclusive():
    # sigmoid(0) = 0.5 is predicted (>=); sigmoid(0.4) = 0.599 is predicted at the default 0.5, not at 0.75
    logits = torch.tensor([[0.0, 0.4, -0.4]])
    assert predictions(logits).tolist() == [[True, True, False]]
    assert predictions(logits, threshold=0.75).tolist() == [[False, False, False]]
    m = multilabel_metrics(logits, torch.tensor([[1, 1, 0]]))
    assert m["f1_micro"] == 1.0 and m["jaccard_micro"] == 1.0 and m["subset_accuracy"] == 1.0
    m = multilabel_metrics(logits, torch.tensor([[1, 1, 0]]), threshold=0.75)  # nothing predicted: tp 0, fn 2
    assert m["f1_micro"] == 0.0 and m["subset_accuracy"] == 0.0


def test_nothing_predicted_nothing_true_is_zero_not_nan():
    logits = torch.full((2, 3), -5.0)
    m = multilabel_metrics(logits, torch.zeros(2, 3))
    assert m["f1_micro"] == 0.0 and m["jaccard_micro"] == 0.0  # 0/0 reported as 0 (scikit-learn's default)
    assert m["subset_accuracy"] == 1.0                          # every (empty) label set is exactly right
    assert math.isnan(m["roc_auc_micro"])                       # one class only


def test_auc_with_ties_by_hand():
    # scores 0.5, 0.5, 0.5, 0.88, 0.12; positives {0.5, 0.88}, negatives {0.5, 0.5, 0.12}
    # pairs: 0.5 vs 0.5 twice -> ½ each; 0.5 vs 0.12 -> 1; 0.88 beats all three -> 3: (1 + 1 + 3) / 6
    logits = torch.tensor([[0.0, 0.0, 0.0, 2.0, -2.0]])
    targets = torch.tensor([[1, 0, 0, 1, 0]])
    assert roc_auc_micro(logits, targets) == pytest.approx(5 / 6, abs=1e-12)
    # scores 0.5 (pos), 0.5 (neg), 0.73 (pos), 0.27 (neg): (½ + 1 + 1 + 1) / 4
    assert roc_auc_micro(torch.tensor([[0.0, 0.0, 1.0, -1.0]]), torch.tensor([[1, 0, 1, 0]])) == 0.875
    # micro: pooled over rows, not averaged per row
    logits = torch.tensor([[3.0, -1.0], [0.5, 1.0], [-2.0, 0.0]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 0]])
    want = _pairwise_auc(torch.sigmoid(logits.double()).flatten().tolist(), targets.flatten().tolist())
    assert roc_auc_micro(logits, targets) == pytest.approx(want, abs=1e-12)
    assert multilabel_metrics(logits, targets)["roc_auc_micro"] == pytest.approx(want, abs=1e-12)


def test_auc_with_one_positive_and_one_negative():
    assert roc_auc_micro(torch.tensor([[1.0, -1.0]]), torch.tensor([[1, 0]])) == 1.0
    assert roc_auc_micro(torch.tensor([[1.0, -1.0]]), torch.tensor([[0, 1]])) == 0.0
    assert roc_auc_micro(torch.tensor([[1.0, 1.0]]), torch.tensor([[0, 1]])) == 0.5  # a tie
    # a single class, either way: undefined
    assert math.isnan(roc_auc_micro(torch.tensor([[1.0, -1.0]]), torch.tensor([[1, 1]])))
    assert math.isnan(roc_auc_micro(torch.tensor([[1.0, -1.0]]), torch.tensor([[0, 0]])))


@pytest.mark.parametrize("shape", [(4,), (2, 2, 2)])
def test_inputs_that_are_not_2d_are_errors(shape):
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        multilabel_metrics(torch.zeros(shape), torch.zeros(shape))
