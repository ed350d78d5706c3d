"""Multi-label metrics against scikit-learn's golden values, plus properties that must hold for all inputs."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from minillm.train.metrics import multilabel_metrics, roc_auc_micro

GOLDEN = Path(__file__).parent / "golden" / "metrics.safetensors"
KEYS = ["f1_micro", "jaccard_micro", "subset_accuracy", "roc_auc_micro"]


def test_metrics_match_sklearn_golden():
    g = load_file(str(GOLDEN))
    n = len([k for k in g if k.startswith("logits_")])
    assert n == 5
    for i in range(n):
        got = multilabel_metrics(g[f"logits_{i}"], g[f"targets_{i}"], threshold=0.5)
        for k, want in zip(KEYS, g[f"expected_{i}"].tolist()):
            assert got[k] == pytest.approx(want, abs=1e-12), (i, k)  # float64 counts: exact up to rounding


@pytest.mark.reference
def test_metrics_match_sklearn_live():
    pytest.importorskip("sklearn")
    from sklearn.metrics import f1_score, jaccard_score, roc_auc_score
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        logits = torch.randn(30, 7, generator=gen, dtype=torch.float64)
        y = (torch.rand(30, 7, generator=gen) < 0.3).int()
        got = multilabel_metrics(logits, y)
        pred = (torch.sigmoid(logits) >= 0.5).int().numpy()
        assert got["f1_micro"] == pytest.approx(f1_score(y.numpy(), pred, average="micro", zero_division=0), abs=1e-12)
        assert got["jaccard_micro"] == pytest.approx(jaccard_score(y.numpy(), pred, average="micro"), abs=1e-12)
        assert got["roc_auc_micro"] == pytest.approx(
            roc_auc_score(y.numpy(), torch.sigmoid(logits).numpy(), average="micro"), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5), st.integers(0, 10_000))
def test_auc_equals_pairwise_definition(n, l, seed):
    """AUC = P(pos score > neg score) + ½ P(tie), counted over all pairs directly (O(P·Q))."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.round(torch.randn(n, l, generator=g, dtype=torch.float64) * 2)  # ties on purpose
    y = (torch.rand(n, l, generator=g) < 0.5)
    s = torch.sigmoid(logits).flatten()
    pos, neg = s[y.flatten()], s[~y.flatten()]
    got = roc_auc_micro(logits, y)
    if len(pos) == 0 or len(neg) == 0:
        assert got != got  # NaN: undefined with one class
        return
    diff = pos[:, None] - neg[None, :]
    want = float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
    assert got == pytest.approx(want, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 10), st.integers(1, 6), st.integers(0, 10_000))
def test_metric_bounds_and_relations(n, l, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, l, generator=g)
    y = (torch.rand(n, l, generator=g) < 0.4)
    m = multilabel_metrics(logits, y)
    for k in ("f1_micro", "jaccard_micro", "subset_accuracy"):
        assert 0.0 <= m[k] <= 1.0
    # F1 = 2J/(1+J) for micro counts
    assert m["f1_micro"] == pytest.approx(2 * m["jaccard_micro"] / (1 + m["jaccard_micro"]), abs=1e-12)
    # predicting the targets themselves is perfect
    perfect = multilabel_metrics(y.double() * 8 - 4, y)
    assert perfect["subset_accuracy"] == 1.0
    assert perfect["f1_micro"] == (1.0 if y.any() else 0.0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        multilabel_metrics(torch.zeros(3, 2), torch.zeros(3, 3))
