"""Reward model: the book's numbers, trl-formula goldens, rankings -> pairs, pooling, bad input."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
from minillm.losses import last_token_index
from minillm.rlhf.reward import (RewardModel, pairwise_accuracy, pairwise_margin_loss,
                                 rankings_to_pairs)

GOLDEN = Path(__file__).parent / "golden" / "rlhf.safetensors"


@pytest.mark.parametrize("margin,expected,tol", [(None, 0.4629, 5e-5), (1.0, 0.9555, 5e-5), (8.0, 7.4706, 5e-5),
                                                 (4.0, 3.50, 5e-3)])
def test_book_numbers(margin, expected, tol):
    # the book prints 4 decimals (3.50 for margin 4: 3.5006), tolerance = half the last printed digit
    m = None if margin is None else torch.tensor([margin])
    loss = pairwise_margin_loss(torch.tensor([0.87]), torch.tensor([0.34]), m)
    assert abs(loss.item() - expected) < tol, loss.item()


def test_golden_trl_formula():
    g = load_file(str(GOLDEN))
    rc, rr, m = g["rm_chosen"], g["rm_rejected"], g["rm_margin"]
    # float64 both sides: 1e-12
    assert abs(pairwise_margin_loss(rc, rr, m).item() - g["rm_loss_margin"].item()) < 1e-12
    assert abs(pairwise_margin_loss(rc, rr).item() - g["rm_loss_plain"].item()) < 1e-12
    assert abs(pairwise_margin_loss(rc, rr, center_coef=0.01).item() - g["rm_loss_centered"].item()) < 1e-12


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=1, max_size=8), st.floats(-5, 5))
def test_loss_shift_invariant_and_positive(rs, shift):
    rc = torch.tensor(rs, dtype=torch.float64)
    rr = rc.flip(0)
    a = pairwise_margin_loss(rc, rr)
    b = pairwise_margin_loss(rc + shift, rr + shift)
    assert a.item() > 0
    assert abs(a.item() - b.item()) < 1e-9  # only differences matter (without centering)


def test_loss_gradient_direction():
    rc = torch.tensor([0.1, 0.5], requires_grad=True)
    rr = torch.tensor([0.3, 0.2], requires_grad=True)
    pairwise_margin_loss(rc, rr, torch.tensor([1.0, 2.0])).backward()
    assert (rc.grad < 0).all() and (rr.grad > 0).all()  # descending raises chosen, lowers rejected


def test_rankings_to_pairs_counts_and_margins():
    pairs = rankings_to_pairs(["a", "b", "c", "d"])
    assert len(pairs) == 6 and pairs[0] == ("a", "b", 0.0)
    assert all("abcd".index(p[0]) < "abcd".index(p[1]) for p in pairs)
    pairs = rankings_to_pairs(["x", "y", "z"], scores=[2, 9, 5])
    assert [(c, r) for c, r, _ in pairs] == [("y", "z"), ("y", "x"), ("z", "x")]
    assert [m for *_, m in pairs] == [4.0, 7.0, 3.0]
    assert len(rankings_to_pairs(["x", "y", "z"], scores=[5, 5, 1])) == 2  # the tie carries no preference


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=2, max_size=7, unique=True))
def test_rankings_all_pairs_distinct_scores(scores):
    K = len(scores)
    pairs = rankings_to_pairs(list(range(K)), scores)
    assert len(pairs) == K * (K - 1) // 2
    assert all(m > 0 and m == scores[c] - scores[r] for c, r, m in pairs)


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        rankings_to_pairs(["a", "b"], [1.0, float("nan")])
    with pytest.raises(ValueError, match="2 responses but 3 scores"):
        rankings_to_pairs(["a", "b"], [1, 2, 3])
    with pytest.raises(ValueError, match="shape"):
        pairwise_margin_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="margin has shape"):
        pairwise_margin_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        pairwise_margin_loss(torch.tensor([float("nan")]), torch.zeros(1))
    with pytest.raises(ValueError, match="empty"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_accuracy():
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 0.0, 5.0]), torch.tensor([0.0, 3.0, 0.0, 1.0])) == 0.5


def _tiny_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=30, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def test_reward_model_reads_last_real_token_any_padding():
    rm = RewardModel(_tiny_gpt2(), 16, pool="last").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    alone = rm(ids)
    right = rm(torch.tensor([[5, 6, 7, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]]))
    left = rm(torch.tensor([[0, 0, 5, 6, 7, 8]]), torch.tensor([[0, 0, 1, 1, 1, 1]]))
    # the same text with pads on either side: same reward (fp32, 1e-5)
    assert torch.allclose(alone, right, atol=1e-5) and torch.allclose(alone, left, atol=1e-5)
    # and it is the head applied to the hidden state at the last token (not e.g. position 0)
    h = rm.backbone.transformer(ids)
    assert torch.allclose(alone, rm.score(h[:, -1]).squeeze(-1), atol=1e-6)
    assert not torch.allclose(alone, rm.score(h[:, 0]).squeeze(-1), atol=1e-4)


def test_reward_model_first_pool_and_save_load(tmp_path):
    rm = RewardModel(_tiny_gpt2(), 16, pool="first").eval()
    ids = torch.tensor([[3, 4, 5], [3, 9, 9]])
    r = rm(ids)
    assert torch.allclose(r[0], r[1], atol=1e-6)  # causal backbone: position 0 sees only token 3 in both rows
    rm.save_pretrained(tmp_path / "rm")
    back = RewardModel.from_pretrained(tmp_path / "rm").eval()
    assert back.pool == "first" and torch.equal(back(ids), r)


def test_score_texts_rejects_empty_responses():
    from minillm.rlhf.reward import RewardScorer
    from minillm.demos.rlhf_demo import build_tokenizer
    tok = build_tokenizer(["a b c"])
    rm = RewardModel(_tiny_gpt2(), 16)
    with pytest.raises(ValueError, match=r"response\(s\) \[1\] are empty"):
        RewardScorer(rm, tok)(["a", "a"], ["b", "  "])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        RewardScorer(rm, tok)(["a", "a"], ["b"])
