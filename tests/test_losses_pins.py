"""The shared losses and reductions (minillm.losses) and the learning-rate schedule, checked against
explicit per-position loops and hand-worked numbers — the gaps scripts/mutation.py found: the next-token
shift for start > 1, lm_loss's mean, token_loss_sum's count, masked_mean(dim=), whiten(shift_mean=False),
fp16/bf16 entropy, and the schedule's warmup/constant/cosine values."""

import math

import pytest
import torch
import torch.nn.functional as F

from minillm.losses import (entropy, last_token_index, lm_loss, lm_loss_sum, masked_mean, masked_var,
                            next_token_logits, next_token_logprobs, token_logprobs, token_loss_sum, whiten)
from minillm.train.schedule import lr_factor


def _loop_logprobs(logits, ids, start):
    """log p(ids[t] | ids[<t]) = log_softmax(logits[t-1])[ids[t]] for t = start..T-1, one position at a time."""
    B, T, _ = logits.shape
    out = torch.empty(B, T - start, dtype=torch.float64)
    for b in range(B):
        for t in range(start, T):
            z = logits[b, t - 1].double()
            out[b, t - start] = z[ids[b, t]] - torch.logsumexp(z, 0)
    return out


@pytest.mark.parametrize("start", [1, 2, 4])
def test_next_token_shift_for_every_start(start):
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    sliced = next_token_logits(logits, start)
    assert sliced.shape == (2, 5 - start, 7)
    for t in range(start, 5):  # position t is predicted by the logits at t-1
        assert torch.equal(sliced[:, t - start], logits[:, t - 1])
    lp = next_token_logprobs(logits, ids, start)
    assert lp.shape == (2, 5 - start)
    assert torch.allclose(lp.double(), _loop_logprobs(logits, ids, start), atol=1e-6)
    with pytest.raises(ValueError):
        next_token_logits(logits, 5)  # nothing left to predict
    with pytest.raises(ValueError):
        next_token_logits(logits, 0)  # position 0 has no prediction


def test_token_logprobs_matches_log_softmax_and_is_fp32_for_half_inputs():
    torch.manual_seed(1)
    logits, tok = torch.randn(2, 3, 6), torch.randint(0, 6, (2, 3))
    want = torch.log(torch.softmax(logits.double(), -1)).gather(-1, tok[..., None])[..., 0]
    assert torch.allclose(token_logprobs(logits, tok).double(), want, atol=1e-6)
    assert token_logprobs(logits.bfloat16(), tok).dtype == torch.float32


def test_lm_loss_is_the_mean_over_labelled_next_tokens():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 1, 4], [-100, -100, 2, -100]])  # predicted pairs: (0->3), (1->1), (2->4), (1->2)
    nll = [-F.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for b, t in ((0, 1), (0, 2), (0, 3), (1, 2))]
    total, n = lm_loss_sum(logits, labels)
    assert int(n) == 4
    assert total.item() == pytest.approx(sum(nll).item(), abs=1e-12)
    assert lm_loss(logits, labels).item() == pytest.approx(sum(nll).item() / 4, abs=1e-12)
    assert lm_loss(logits, torch.full_like(labels, -100)).item() == 0.0  # nothing labelled: 0, not NaN


def test_token_loss_sum_has_no_shift_and_counts_labelled_positions():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    labels = torch.tensor([[4, -100, 0], [1, 2, -100]])  # 4 labelled, 2 ignored
    want = sum(-F.log_softmax(logits[b, t], -1)[labels[b, t]] for b, t in ((0, 0), (0, 2), (1, 0), (1, 1)))
    total, n = token_loss_sum(logits, labels)
    assert int(n) == 4
    assert total.item() == pytest.approx(want.item(), abs=1e-12)
    total16, _ = token_loss_sum(logits.to(torch.float16), labels)
    assert total16.dtype == torch.float32


def test_entropy_is_minus_sum_p_log_p_in_every_dtype():
    probs = torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    want = torch.tensor([1.5 * math.log(2), math.log(3)], dtype=torch.float64)  # by hand
    assert torch.allclose(entropy(probs.log()), want, atol=1e-12)
    for dt in (torch.float16, torch.bfloat16):
        h = entropy(probs.log().to(dt))
        assert h.dtype == torch.float32
        assert torch.allclose(h.double(), want, atol=2e-2)


def test_masked_mean_along_a_dim():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m, dim=1).tolist() == [1.5, 4.0]
    assert masked_mean(x, m, dim=0).tolist() == [2.5, 2.0, 0.0]  # a column with no real entry gives 0
    assert masked_mean(x, m).item() == pytest.approx(7 / 3)
    with pytest.raises(ValueError):
        masked_mean(x, torch.zeros_like(m))


def test_masked_var_and_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 6.0, 9.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    sel = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)  # mean 3, squared deviations 4 1 0 9
    assert masked_var(x, m).item() == pytest.approx(14 / 3)  # unbiased: 14 / (4 - 1)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(14 / 4)
    scaled = (sel - 3.0) / math.sqrt(14 / 3 + 1e-8)
    w = whiten(x, m)
    assert torch.allclose(w[m.bool()], scaled, atol=1e-12)
    assert (w[~m.bool()] == 0).all()
    w_keep = whiten(x, m, shift_mean=False)  # scale only: the mean is added back
    assert torch.allclose(w_keep[m.bool()], scaled + 3.0, atol=1e-12)
    assert (w_keep[~m.bool()] == 0).all()
    w_biased = whiten(x, m, unbiased=False)
    assert torch.allclose(w_biased[m.bool()], (sel - 3.0) / math.sqrt(14 / 4 + 1e-8), atol=1e-12)
    with pytest.raises(ValueError):
        masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_last_token_index_left_and_right_padding():
    m = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0]])
    assert last_token_index(m).tolist() == [1, 3, 3, 1]
    with pytest.raises(ValueError):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))


# ---- learning-rate schedule (minillm.train.schedule): transformers' formulas, worked by hand ----
def test_warmup_is_linear_from_zero():
    assert [lr_factor(s, 4, 12) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lr_factor(0, 0, 10) == 1.0  # no warmup: full rate at once
    assert lr_factor(3, 4, 12, "cosine") == 0.75  # every kind warms up the same way


def test_decays_by_hand():
    # 4 warmup steps of 12: progress = (s - 4) / 8
    assert lr_factor(6, 4, 12) == pytest.approx(0.75)                       # default kind: linear
    assert lr_factor(6, 4, 12, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(10, 4, 12, "cosine") == pytest.approx(0.5 * (1 + math.cos(3 * math.pi / 4)))
    assert lr_factor(7, 4, 12, "constant") == 1.0
    for kind in ("linear", "cosine"):  # past the end: 0, never negative or rising again
        assert lr_factor(12, 4, 12, kind) == pytest.approx(0.0, abs=1e-12)
        assert lr_factor(20, 4, 12, kind) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        lr_factor(1, 0, 10, "exponential")


def test_schedule_with_a_single_decay_step():
    # total - warmup = 1: the one step after warmup already ends the decay
    for kind in ("linear", "cosine"):
        assert lr_factor(2, 2, 3, kind) == 1.0
        assert lr_factor(3, 2, 3, kind) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0, 1, 5) == 0.0 and lr_factor(1, 1, 5) == 1.0  # one warmup step


# ---- sequence classification losses (transformers' problem_type rules) ----
def test_problem_type_rule():
    from minillm.losses import infer_problem_type
    assert infer_problem_type(1, torch.tensor([0.3, 1.2])) == "regression"
    assert infer_problem_type(1, torch.tensor([0, 1])) == "regression"  # one output: always regression
    assert infer_problem_type(2, torch.tensor([0, 1])) == "single_label_classification"
    assert infer_problem_type(3, torch.tensor([[0.0, 1.0, 1.0]])) == "multi_label_classification"


def test_classification_losses_by_hand():
    from minillm.losses import classification_loss, multilabel_predictions
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [-1.0, 3.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2, -100])  # the third row is ignored
    lse = [math.log(math.exp(2) + 1 + math.exp(-1)), math.log(3 * math.exp(0.5))]
    want = ((lse[0] - 2.0) + (lse[1] - 0.5)) / 2
    assert classification_loss(logits, labels).item() == pytest.approx(want, abs=1e-12)
    # multi-label: mean over all entries of BCE with one sigmoid per label
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    bce = [-(t * math.log(1 / (1 + math.exp(-z))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-z))))
           for z, t in zip(logits.flatten().tolist(), targets.flatten().tolist())]
    assert classification_loss(logits, targets).item() == pytest.approx(sum(bce) / 9, abs=1e-12)
    # regression: one output, MSE against float targets
    reg = classification_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0]))
    assert reg.item() == pytest.approx((1.0 + 4.0) / 2)
    assert multilabel_predictions(torch.tensor([[0.0, -0.1, 2.0]])).tolist() == [[1, 0, 1]]  # sigmoid(0) = 0.5 is on
    with pytest.raises(ValueError):
        classification_loss(logits, torch.tensor([0, 3, 1]))  # class 3 of 3


def test_mean_pool_averages_real_tokens_only():
    from minillm.losses import mean_pool
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    assert mean_pool(h, torch.tensor([[1, 1, 0], [1, 1, 1]])).tolist() == [[2.0, 3.0], [7.0, 8.0]]
    assert mean_pool(h, torch.tensor([[0, 0, 1], [1, 0, 0]])).tolist() == [[100.0, 100.0], [5.0, 6.0]]
    assert torch.allclose(mean_pool(h), torch.tensor([[104 / 3, 106 / 3], [7.0, 8.0]]))  # no mask: every position


def test_unbiased_variance_of_exactly_two_entries():
    # the smallest sample the unbiased estimate allows: ((a - m)² + (b - m)²) / (2 - 1) = (a - b)² / 2
    x = torch.tensor([[3.0, 7.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    assert masked_var(x, mask).item() == pytest.approx((3.0 - 7.0) ** 2 / 2, abs=1e-12)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(4.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([[0, 1, 0]]))
