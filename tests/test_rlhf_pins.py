"""RLHF behaviour the other tests leave open (found by scripts/mutation.py and the mutation-score issue):
conservative DPO (label_smoothing > 0), sequence_logprob's shape and its position-0/padding rules, the
defaults of dpo_loss (beta), compute_gae (gamma, lam) and kl_penalty (k1), compute_rewards by hand, and
PPO's entropy bonus (ent_coef > 0) raising the policy's entropy. Expected values come from the papers'
formulas evaluated by hand with `math`, or explicit loops."""

import math

import pytest
import torch

from minillm.losses import entropy, masked_mean
from minillm.rlhf.dpo import dpo_loss, sequence_logprob
from minillm.rlhf.gae import compute_gae
from minillm.rlhf.kl import AdaptiveKLController, compute_rewards, kl_penalty
from minillm.rlhf.ppo import PPOConfig, PPOTrainer, PolicyWithValueHead


def _logsig(z):
    return -math.log1p(math.exp(-z))


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


# ---------------- DPO ----------------
def test_dpo_loss_by_hand_with_default_beta():
    pc, pr, rc, rr = _t(-3.0, -1.0), _t(-5.0, -2.0), _t(-4.0, -1.5), _t(-4.5, -1.0)
    # default beta = 0.1; z = beta * ((pc - rc) - (pr - rr)) = 0.1 * (1 - (-0.5)), 0.1 * (0.5 - (-1))
    zs = [0.1 * 1.5, 0.1 * 1.5]
    loss, ch, rj = dpo_loss(pc, pr, rc, rr)
    assert loss.item() == pytest.approx(-sum(_logsig(z) for z in zs) / 2, abs=1e-12)
    assert ch.tolist() == pytest.approx([0.1 * 1.0, 0.1 * 0.5])
    assert rj.tolist() == pytest.approx([0.1 * -0.5, 0.1 * -1.0])


@pytest.mark.parametrize("eps", [0.1, 0.3, 0.5])
def test_conservative_dpo_label_smoothing(eps):
    pc, pr, rc, rr = _t(-2.0, -6.0), _t(-4.0, -1.0), _t(-3.0, -3.0), _t(-3.0, -3.0)
    beta = 0.5
    zs = [beta * ((-2 + 3) - (-4 + 3)), beta * ((-6 + 3) - (-1 + 3))]  # 1.0, -2.5
    want = sum(-(1 - eps) * _logsig(z) - eps * _logsig(-z) for z in zs) / 2
    loss, ch, rj = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert loss.item() == pytest.approx(want, abs=1e-12)
    # the implicit rewards do not depend on the smoothing
    assert ch.tolist() == pytest.approx([0.5, -1.5])
    assert rj.tolist() == pytest.approx([-0.5, 1.0])


def test_label_smoothing_half_makes_the_loss_symmetric():
    # eps = 0.5: loss(z) = -(log s(z) + log s(-z)) / 2 is even in z: swapping chosen and rejected changes nothing
    a, b, r = _t(-1.0, -7.0), _t(-3.0, -2.0), _t(-2.0, -2.0)
    l1 = dpo_loss(a, b, r, r, beta=0.3, label_smoothing=0.5)[0]
    l2 = dpo_loss(b, a, r, r, beta=0.3, label_smoothing=0.5)[0]
    assert l1.item() == pytest.approx(l2.item(), abs=1e-12)
    # and without smoothing it is not symmetric
    assert dpo_loss(a, b, r, r, beta=0.3)[0].item() != pytest.approx(dpo_loss(b, a, r, r, beta=0.3)[0].item())


def test_sequence_logprob_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3, 4, 0], [5, 1, 2, 0, 0]])
    # row 0: prompt [1, 2], response [3, 4], then padding; row 1: prompt [5], response [1, 2]
    resp = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])
    lsm = torch.log_softmax(logits, -1)
    want = [lsm[0, 1, 3] + lsm[0, 2, 4], lsm[1, 0, 1] + lsm[1, 1, 2]]  # the logits at t-1 predict token t
    got = sequence_logprob(logits, ids, resp)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx([w.item() for w in want], abs=1e-12)


def test_sequence_logprob_rejects_position_zero_and_empty_rows():
    logits, ids = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="position 0"):
        sequence_logprob(logits, ids, torch.tensor([[0, 1, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match="empty"):
        sequence_logprob(logits, ids, torch.tensor([[0, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError):
        sequence_logprob(logits, ids[:, :2], torch.tensor([[0, 1], [0, 1]]))


# ---------------- KL, rewards, GAE ----------------
def test_kl_estimators_by_hand_and_default_k1():
    lp, ref = _t(-1.0, -2.0), _t(-1.5, -1.0)  # log r = 0.5, -1.0
    assert kl_penalty(lp, ref).tolist() == pytest.approx([0.5, -1.0])  # default: k1
    assert kl_penalty(lp, ref, "abs").tolist() == pytest.approx([0.5, 1.0])
    assert kl_penalty(lp, ref, "mse").tolist() == pytest.approx([0.125, 0.5])
    assert kl_penalty(lp, ref, "k3").tolist() == pytest.approx([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])


def test_compute_rewards_by_hand():
    lp = _t(-1.0, -1.0, -1.0, -1.0).view(2, 2)
    ref = _t(-1.5, -0.5, -2.0, -9.0).view(2, 2)  # k1 = 0.5, -0.5 | 1.0, (padding)
    mask = torch.tensor([[1, 1], [1, 0]])
    rewards, non_score, kl = compute_rewards(torch.tensor([2.0, -1.0]), lp, ref, mask, kl_coef=0.2)
    assert torch.allclose(kl, _t(0.5, -0.5, 1.0, 0.0).view(2, 2), atol=1e-12)
    assert torch.allclose(non_score, _t(-0.1, 0.1, -0.2, 0.0).view(2, 2), atol=1e-12)
    assert torch.allclose(rewards, _t(-0.1, 0.1 + 2.0, -0.2 - 1.0, 0.0).view(2, 2), atol=1e-12)


def test_gae_defaults_gamma_one_lambda_095_by_hand():
    r, v = _t(1.0, 0.0, 2.0).view(1, 3), _t(0.5, 1.0, 1.5).view(1, 3)
    m = torch.ones(1, 3)
    # gamma = 1: deltas d2 = 2 - 1.5 = 0.5, d1 = 0 + 1.5 - 1 = 0.5, d0 = 1 + 1 - 0.5 = 1.5
    a2 = 0.5
    a1 = 0.5 + 0.95 * a2
    a0 = 1.5 + 0.95 * a1
    adv, ret = compute_gae(r, v, m)
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 1.0, a2 + 1.5])
    adv_g, _ = compute_gae(r, v, m, gamma=0.5, lam=0.5)
    d2, d1, d0 = 2 - 1.5, 0 + 0.5 * 1.5 - 1.0, 1 + 0.5 * 1.0 - 0.5
    assert adv_g[0].tolist() == pytest.approx([d0 + 0.25 * (d1 + 0.25 * d2), d1 + 0.25 * d2, d2])


def test_adaptive_kl_controller_clips_the_error_both_ways():
    c = AdaptiveKLController(0.2, target=6.0, horizon=100)
    c.update(60.0, 10)  # KL/target - 1 = 9 -> clipped to 0.2: beta * (1 + 0.2 * 10 / 100)
    assert c.value == pytest.approx(0.2 * 1.02)
    c.update(3.0, 10)  # 0.5 - 1 = -0.5 -> clipped to -0.2
    assert c.value == pytest.approx(0.2 * 1.02 * 0.98)
    c.update(6.6, 50)  # 0.1, inside the clip
    assert c.value == pytest.approx(0.2 * 1.02 * 0.98 * 1.05)


# ---------------- PPO: the entropy bonus ----------------
class _Tok:
    eos_token_id, pad_token_id = 1, 0

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def _trainer(**kw):
    from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=10, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                    resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    cfg = PPOConfig(**{**dict(lr=1e-2, batch_size=16, mini_batch_size=16, ppo_epochs=3, max_new_tokens=5,
                              adaptive_kl=False, init_kl_coef=0.0, vf_coef=0.0,
                              temperature=0.2), **kw})  # sharp: a fresh model is near uniform, nothing to raise
    return PPOTrainer(PolicyWithValueHead(lm), _Tok(), lambda p, r: torch.zeros(len(r)), cfg,
                      generator=torch.Generator().manual_seed(0))


def _policy_entropy(tr, ro):
    with torch.no_grad():
        logits, _ = tr.policy(**tr.rollout_inputs(ro))
        return masked_mean(entropy(tr._response_logits(logits, ro.prompt_len)), ro.response_mask.float()).item()


def test_ppo_entropy_bonus_raises_entropy(one_thread):
    assert PPOConfig().ent_coef == 0.0  # off unless asked for
    ids, m = torch.full((16, 2), 2, dtype=torch.long), torch.ones(16, 2, dtype=torch.long)
    plain, bonus = _trainer(ent_coef=0.0), _trainer(ent_coef=5.0)
    ro = plain.rollout(ids, m)
    before = _policy_entropy(plain, ro)
    assert before == pytest.approx(_policy_entropy(bonus, ro), abs=1e-6)  # same start
    plain.train_on(ro, torch.zeros(16))
    bonus.train_on(ro, torch.zeros(16))
    h_plain, h_bonus = _policy_entropy(plain, ro), _policy_entropy(bonus, ro)
    assert h_bonus > before + 0.01, (before, h_bonus)
    assert h_bonus > h_plain + 0.01, (h_plain, h_bonus)


def test_adaptive_controller_rejects_a_zero_target():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.2, target=0.0, horizon=10)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.2, target=1.0, horizon=0.0)


def test_adaptive_controller_accepts_any_positive_target_and_horizon():
    # a KL target below one nat and a horizon of one sample are legitimate settings
    c = AdaptiveKLController(0.2, target=0.5, horizon=1)
    c.update(0.6, n_steps=1)  # e = clip(0.6/0.5 - 1, -0.2, 0.2) = 0.2; beta = 0.2 * (1 + 0.2 * 1/1)
    assert c.value == pytest.approx(0.24, rel=1e-12)


def test_dpo_from_models_default_beta():
    from minillm.rlhf.dpo import dpo_loss_from_models
    torch.manual_seed(1)
    L_pol, L_ref = torch.randn(2, 4, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 0, 3]])
    resp, attn = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]]), torch.ones(2, 4, dtype=torch.long)

    def lm(L):
        return lambda input_ids, attention_mask=None: L

    def seq_lp(L):  # by hand: the logits at t-1 predict token t
        lsm = torch.log_softmax(L, -1)
        return [lsm[0, 1, 3] + lsm[0, 2, 4], lsm[1, 2, 3]]

    pol, ref = seq_lp(L_pol), seq_lp(L_ref)
    # chosen = rejected here: the loss is log 2 and the rewards are beta * (log pi - log pi_ref) with beta = 0.1
    loss, ch, rj = dpo_loss_from_models(lm(L_pol), lm(L_ref), ids, attn, resp, ids, attn, resp)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert ch.tolist() == pytest.approx([0.1 * (p - r).item() for p, r in zip(pol, ref)], abs=1e-12)
    assert torch.equal(ch, rj)


# ---------------- bad input (each check, and the edges it must let through) ----------------
def test_dpo_loss_rejects_bad_beta_and_smoothing_and_shapes():
    a = _t(-1.0, -2.0)
    dpo_loss(a, a, a, a, beta=0.5)  # any beta > 0
    dpo_loss(a, a, a, a, beta=3)
    for beta in (0, 0.0, -0.1, True, "0.1", math.nan, math.inf):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(a, a, a, a, beta=beta)
    for eps in (0, 0.0, 0.5):
        dpo_loss(a, a, a, a, label_smoothing=eps)
    for eps in (-0.1, 0.6, 0.7, 1, True, "0.1"):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(a, a, a, a, label_smoothing=eps)
    with pytest.raises(ValueError, match="share one"):
        dpo_loss(a, a, a, _t(-1.0))
    with pytest.raises(ValueError, match="share one"):
        m = a.view(1, 2)
        dpo_loss(m, m, m, m)
    for i in range(4):
        args = [a, a, a, a]
        args[i] = _t(-1.0, math.nan)
        with pytest.raises(ValueError, match="NaN or Inf"):
            dpo_loss(*args)


def test_dpo_from_models_label_smoothing_and_distinct_pairs():
    from minillm.rlhf.dpo import dpo_loss_from_models
    torch.manual_seed(2)
    Lp = {k: torch.randn(1, 4, 5, dtype=torch.float64) for k in ("c", "r")}
    Lr = {k: torch.randn(1, 4, 5, dtype=torch.float64) for k in ("c", "r")}
    ids = {"c": torch.tensor([[1, 2, 3, 4]]), "r": torch.tensor([[1, 2, 0, 1]])}
    resp, attn = torch.tensor([[0, 0, 1, 1]]), torch.ones(1, 4, dtype=torch.long)

    def lm(L):
        return lambda input_ids, attention_mask=None: L["c"] if input_ids[0, 2] == 3 else L["r"]

    def lp(L, k):
        ls = torch.log_softmax(L[k], -1)
        return (ls[0, 1, ids[k][0, 2]] + ls[0, 2, ids[k][0, 3]]).item()
    z = 0.5 * ((lp(Lp, "c") - lp(Lr, "c")) - (lp(Lp, "r") - lp(Lr, "r")))
    loss, ch, rj = dpo_loss_from_models(lm(Lp), lm(Lr), ids["c"], attn, resp, ids["r"], attn, resp, beta=0.5,
                                        label_smoothing=0.2)
    assert loss.item() == pytest.approx(-0.8 * _logsig(z) - 0.2 * _logsig(-z), abs=1e-12)
    assert ch.item() == pytest.approx(0.5 * (lp(Lp, "c") - lp(Lr, "c")), abs=1e-12)
    assert rj.item() == pytest.approx(0.5 * (lp(Lp, "r") - lp(Lr, "r")), abs=1e-12)
    loss0, _, _ = dpo_loss_from_models(lm(Lp), lm(Lr), ids["c"], attn, resp, ids["r"], attn, resp, beta=0.5)
    assert loss0.item() == pytest.approx(-_logsig(z), abs=1e-12)  # default: no smoothing


def test_sequence_logprob_shape_checks():
    logits, ids = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="must agree"):
        sequence_logprob(logits, ids, torch.tensor([[0, 1], [0, 1]]))
    with pytest.raises(ValueError, match="must agree"):
        sequence_logprob(torch.zeros(2, 4, 4), ids, torch.tensor([[0, 1, 1], [0, 1, 0]]))
    with pytest.raises(ValueError, match="position 0"):
        sequence_logprob(logits, ids, torch.tensor([[0, 1, 1], [2, 1, 0]]))
    # a uniform distribution over 4: each response token costs log 4
    got = sequence_logprob(logits, ids, torch.tensor([[0, 1, 1], [0, 0, 1]]))
    assert got.tolist() == pytest.approx([-2 * math.log(4), -math.log(4)])


def test_gae_and_kl_input_checks():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"rewards must be a \(batch, steps\) tensor"):
        compute_gae([[0.0] * 3] * 2, z, z)
    with pytest.raises(ValueError, match="rewards must be"):
        compute_gae(torch.zeros(2, 3, 1), z, z)
    with pytest.raises(ValueError, match="values must be"):
        compute_gae(z, torch.zeros(6), z)
    with pytest.raises(ValueError, match="mask has shape"):
        compute_gae(z, z, torch.ones(2, 4))
    adv, ret = compute_gae(z + 1, z, torch.ones(2, 3))
    assert adv.shape == ret.shape == (2, 3)
    assert compute_gae(torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1))[0].item() == 1.0  # one step
    with pytest.raises(ValueError, match="differ in shape"):
        kl_penalty(z, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="full"):
        kl_penalty(z, z, "full")
    lp = torch.log_softmax(torch.randn(2, 3, 5), -1)
    assert kl_penalty(lp, lp, "full").shape == (2, 3)
    mask = torch.ones(2, 3)
    r, _, _ = compute_rewards([1.0, 2.0], z, z, mask, 0.1)  # plain numbers as scores
    assert r[:, -1].tolist() == [1.0, 2.0]
    for bad in (torch.zeros(2, 1), torch.zeros(3), torch.tensor([0.0, math.inf])):
        with pytest.raises(ValueError):
            compute_rewards(bad, z, z, mask, 0.1)
    with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
        compute_rewards(torch.zeros(2), torch.zeros(2, 4), torch.zeros(2, 4), mask, 0.1)
    with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
        compute_rewards(torch.zeros(2), torch.zeros(3, 3), torch.zeros(3, 3), mask, 0.1)
