"""DPO: ln 2 at policy = reference, the trl sigmoid-loss golden, summed response log-probs, bad input."""

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
from minillm.rlhf.dpo import dpo_loss, dpo_loss_from_models, sequence_logprob

G = load_file(str(Path(__file__).parent / "golden" / "rlhf.safetensors"))


def test_golden_trl_sigmoid_loss():
    loss, cr, rr = dpo_loss(G["dpo_pc"], G["dpo_pr"], G["dpo_rc"], G["dpo_rr"], beta=0.1)
    assert abs(loss.item() - G["dpo_loss"].item()) < 1e-12  # float64
    assert torch.allclose(cr, G["dpo_chosen_rewards"], atol=1e-12)
    assert torch.allclose(rr, G["dpo_rejected_rewards"], atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-50, 0), min_size=1, max_size=6), st.floats(0.01, 2.0))
def test_ln2_when_policy_is_reference(lps, beta):
    c = torch.tensor(lps, dtype=torch.float64)
    r = c.flip(0) - 3.0
    loss, _, _ = dpo_loss(c, r, c.clone(), r.clone(), beta)
    assert abs(loss.item() - math.log(2)) < 1e-12


def _model(seed):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=20, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)).eval()


def test_sequence_logprob_sums_response_tokens_only():
    m = _model(0)
    ids = torch.tensor([[3, 4, 5, 6, 0]])
    resp = torch.tensor([[0, 0, 1, 1, 0]])  # prompt 3 4, response 5 6, one pad
    lp = torch.log_softmax(m(ids), -1)
    want = lp[0, 1, 5] + lp[0, 2, 6]
    assert abs(sequence_logprob(m(ids), ids, resp).item() - want.item()) < 1e-6  # fp32


def test_models_path_ln2_then_training_lowers_loss():
    pol, ref = _model(0), _model(0)
    ids_c = torch.tensor([[3, 4, 5, 6]]); ids_r = torch.tensor([[3, 4, 9, 9]])
    attn = torch.ones(1, 4, dtype=torch.long); resp = torch.tensor([[0, 0, 1, 1]])
    loss, _, _ = dpo_loss_from_models(pol, ref, ids_c, attn, resp, ids_r, attn, resp, beta=0.5)
    assert abs(loss.item() - math.log(2)) < 1e-6
    opt = torch.optim.SGD(pol.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad(); loss, cr, rr = dpo_loss_from_models(pol, ref, ids_c, attn, resp, ids_r, attn, resp, 0.5)
        loss.backward(); opt.step()
    loss, cr, rr = dpo_loss_from_models(pol, ref, ids_c, attn, resp, ids_r, attn, resp, 0.5)
    assert loss.item() < math.log(2) - 0.05 and (cr > rr).all()


def test_bad_input():
    with pytest.raises(ValueError, match="share one"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        dpo_loss(torch.tensor([float("nan")]), torch.zeros(1), torch.zeros(1), torch.zeros(1))
    m = _model(0)
    ids = torch.tensor([[3, 4]])
    with pytest.raises(ValueError, match="empty response"):
        sequence_logprob(m(ids), ids, torch.tensor([[0, 0]]))
