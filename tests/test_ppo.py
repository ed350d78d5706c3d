"""PPO math: GAE, whitening, KL estimators, per-token rewards, clipped losses, KL controllers — against a
per-definition transcription of trl v0.11 (tests/golden/rlhf.safetensors) and properties; plus the loop."""

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from minillm.losses import entropy as entropy_from_logits, masked_mean, masked_var, whiten
from minillm.rlhf.gae import compute_gae
from minillm.rlhf.kl import AdaptiveKLController, FixedKLController, compute_rewards, kl_penalty
from minillm.rlhf.ppo import (PPOConfig, PPOTrainer, PolicyWithValueHead, policy_loss,
                              response_mask_from, value_loss)

G = load_file(str(Path(__file__).parent / "golden" / "rlhf.safetensors"))
TOL = 1e-10  # float64 on both sides, same formulas


def close(a, b, mask=None, tol=TOL):
    if mask is not None:
        a, b = a * mask, b * mask
    return torch.allclose(a, b, atol=tol, rtol=0)


# ---------------- golden: trl v0.11 formulas ----------------
@pytest.mark.parametrize("est", ["k1", "abs", "mse", "k3", "full"])
def test_kl_and_rewards_golden(est):
    m = G["mask"]
    if est == "full":
        lp, rp = torch.log_softmax(G["logits"], -1), torch.log_softmax(G["ref_logits"], -1)
    else:
        lp, rp = G["logprobs"], G["ref_logprobs"]
    assert close(kl_penalty(lp, rp, est), G[f"kl_{est}"], m)
    rewards, _, _ = compute_rewards(G["scores"], lp, rp, m, 0.2, est)
    assert close(rewards, G[f"rewards_{est}"])


def test_gae_and_whitening_golden():
    m = G["mask"]
    adv, ret = compute_gae(G["rewards_k1"], G["values"], m, gamma=0.99, lam=0.95)
    assert close(adv, G["advantages"], m) and close(ret, G["returns"], m)
    assert close(whiten(adv, m), G["advantages_whitened"], m)


def test_losses_golden():
    m, adv_w = G["mask"], G["advantages_whitened"]
    pg, ps = policy_loss(G["new_logprobs"], G["logprobs"], adv_w, m, 0.2)
    vf, vs = value_loss(G["vpreds"], G["values"] * m, G["returns"], m, 0.2)
    assert abs(pg.item() - G["loss_pg_loss"].item()) < TOL
    assert abs(vf.item() - G["loss_vf_loss"].item()) < TOL
    assert abs(ps["clipfrac"] - G["loss_pg_clipfrac"].item()) < TOL and G["loss_pg_clipfrac"].item() > 0
    assert abs(vs["vf_clipfrac"] - G["loss_vf_clipfrac"].item()) < TOL
    assert abs(ps["approxkl"] - G["loss_approxkl"].item()) < TOL
    assert abs(ps["policykl"] - G["loss_policykl"].item()) < TOL
    assert abs(masked_mean(entropy_from_logits(G["new_logits"]), m).item() - G["loss_entropy"].item()) < 1e-9


def test_adaptive_controller_golden():
    ctl = AdaptiveKLController(0.2, 6.0, 10000.0)
    got = []
    for kl in G["ctl_kls"].tolist():
        ctl.update(kl, 256)
        got.append(ctl.value)
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), G["ctl_values"], atol=1e-12)
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 256)
    assert fixed.value == 0.3


# ---------------- GAE properties ----------------
def gae_by_definition(r, v, gamma, lam):
    """A_t = Σ_l (γλ)^l δ_{t+l}, with δ_t = r_t + γ V_{t+1} − V_t and V_T = 0 (one unpadded row)."""
    T = len(r)
    vv = list(v) + [0.0]
    delta = [r[t] + gamma * vv[t + 1] - vv[t] for t in range(T)]
    return [sum((gamma * lam) ** l * delta[t + l] for l in range(T - t)) for t in range(T)]


floats = st.floats(-5, 5, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8).flatmap(lambda T: st.tuples(st.lists(floats, min_size=T, max_size=T),
                                                     st.lists(floats, min_size=T, max_size=T))),
       st.floats(0, 1), st.floats(0, 1))
def test_gae_equals_definition(rv, gamma, lam):
    r, v = rv
    adv, ret = compute_gae(torch.tensor([r], dtype=torch.float64), torch.tensor([v], dtype=torch.float64),
                           torch.ones(1, len(r)), gamma, lam)
    want = torch.tensor([gae_by_definition(r, v, gamma, lam)], dtype=torch.float64)
    assert torch.allclose(adv, want, atol=1e-9)
    assert torch.allclose(ret, want + torch.tensor([v], dtype=torch.float64), atol=1e-9)


def test_gae_lambda0_is_td_error_and_lambda1_is_return_to_go():
    torch.manual_seed(0)
    r, v = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    m = torch.ones(3, 6)
    adv, _ = compute_gae(r, v, m, gamma=0.9, lam=0.0)
    v_next = torch.cat([v[:, 1:], torch.zeros(3, 1, dtype=v.dtype)], 1)
    assert torch.allclose(adv, r + 0.9 * v_next - v, atol=1e-12)
    adv, ret = compute_gae(r, v, m, gamma=1.0, lam=1.0)
    rtg = r.flip(1).cumsum(1).flip(1)
    assert torch.allclose(adv, rtg - v, atol=1e-12) and torch.allclose(ret, rtg, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.integers(0, 10**6))
def test_padding_never_changes_advantages_or_losses(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths) + 2
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).double()
    r, v = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    junk = torch.randn(B, T, generator=g, dtype=torch.float64) * 100 * (1 - mask)
    a1, R1 = compute_gae(r, v, mask, 0.99, 0.95)
    a2, R2 = compute_gae(r + junk, v - junk, mask, 0.99, 0.95)
    assert torch.equal(a1, a2) and torch.equal(R1, R2)
    assert (a1[mask == 0] == 0).all()
    lp, old = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    l1, _ = policy_loss(lp, old, a1, mask)
    l2, _ = policy_loss(lp + junk, old - junk, a1 + junk, mask)
    assert abs(l1.item() - l2.item()) < 1e-12
    v1, _ = value_loss(v, v * 0.5, R1, mask)
    v2, _ = value_loss(v + junk, v * 0.5 - junk, R1 + junk, mask)
    assert abs(v1.item() - v2.item()) < 1e-12


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=5), st.integers(0, 10**6), st.floats(-50, 50))
def test_whitening_mean0_std1(lengths, seed, offset):
    if sum(lengths) < 3:
        return
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).double()
    x = torch.randn(B, T, generator=g, dtype=torch.float64) * 3 + offset
    w = whiten(x, mask)
    n = mask.sum()
    assert abs(masked_mean(w, mask).item()) < 1e-9
    std = masked_var(w, mask).sqrt().item()  # unbiased, as trl
    if masked_var(x, mask).item() > 1e-3:
        assert abs(std - 1) < 1e-3  # 1e-8 in the denominator
    assert ((w * (1 - mask)) == 0).all()


def test_first_epoch_ratio_one_gives_minus_mean_advantage():
    torch.manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    lp = torch.randn(2, 4, dtype=torch.float64)
    adv = torch.randn(2, 4, dtype=torch.float64)
    loss, stats = policy_loss(lp, lp.clone(), adv, mask, 0.2)
    assert abs(loss.item() + masked_mean(adv, mask).item()) < 1e-12
    assert stats["clipfrac"] == 0 and stats["approxkl"] == 0 and stats["ratio"] == 1


@pytest.mark.parametrize("est", ["k1", "abs", "mse", "k3"])
def test_kl_zero_when_policy_is_reference(est):
    lp = torch.log_softmax(torch.randn(3, 5, 7), -1)[..., 0]
    assert (kl_penalty(lp, lp.clone(), est) == 0).all()


def test_full_kl_zero_and_nonnegative():
    a = torch.log_softmax(torch.randn(3, 5, 7, dtype=torch.float64), -1)
    b = torch.log_softmax(torch.randn(3, 5, 7, dtype=torch.float64), -1)
    assert kl_penalty(a, a.clone(), "full").abs().max() < 1e-12
    assert (kl_penalty(a, b, "full") >= 0).all()
    assert (kl_penalty(a[..., 0], b[..., 0], "k3") >= 0).all()


def test_score_lands_on_last_response_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    zero = torch.zeros(2, 4)
    rewards, _, _ = compute_rewards(torch.tensor([2.0, -1.0]), zero, zero, mask, 0.1)
    assert rewards.tolist() == [[0, 0, 2.0, 0], [-1.0, 0, 0, 0]]


def test_bad_rewards_input():
    mask = torch.ones(2, 3)
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"one number per response, shape \(2,\)"):
        compute_rewards(torch.zeros(3), z, z, mask, 0.1)
    with pytest.raises(ValueError, match="NaN"):
        compute_rewards(torch.tensor([0.0, float("nan")]), z, z, mask, 0.1)
    with pytest.raises(ValueError, match="empty"):
        compute_rewards(torch.zeros(2), z, z, torch.tensor([[1, 1, 0], [0, 0, 0]]), 0.1)
    with pytest.raises(ValueError, match="expected"):
        compute_gae(torch.zeros(2, 3), torch.zeros(2, 4), mask, 1, 1)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(z, z, "k9")


def test_response_mask_convention():
    resp = torch.tensor([[4, 5, 2, 0, 0], [2, 0, 0, 0, 0], [4, 4, 4, 4, 4]])
    assert response_mask_from(resp, 2).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_adaptive_controller_direction():
    c = AdaptiveKLController(0.2, target=1.0, horizon=100)
    c.update(5.0, 10)   # far above target: error clipped to +0.2 -> ×1.02
    assert abs(c.value - 0.2 * 1.02) < 1e-12
    c.update(0.0, 10)   # below: ×0.98
    assert abs(c.value - 0.2 * 1.02 * 0.98) < 1e-12


# ---------------- the loop ----------------
class _Tok:
    """A stand-in tokenizer over ids 0..9: 0 pad, 1 eos; text is the ids joined by spaces."""
    eos_token_id, pad_token_id = 1, 0

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def _trainer(score_fn, **kw):
    from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=10, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                    resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    cfg = PPOConfig(**{**dict(lr=3e-3, batch_size=32, mini_batch_size=16, ppo_epochs=2, max_new_tokens=6), **kw})
    return PPOTrainer(PolicyWithValueHead(lm), _Tok(), score_fn, cfg, generator=torch.Generator().manual_seed(0))


def _prompts(B=32):
    return torch.full((B, 2), 2, dtype=torch.long), torch.ones(B, 2, dtype=torch.long)


def test_ppo_loop_raises_the_score_and_logs_stats(one_thread):
    # score = share of '7' tokens in the response: PPO must push it up within a few steps
    def score(prompts, responses):
        return torch.tensor([r.split().count("7") / max(1, len(r.split())) for r in responses])
    tr = _trainer(score, init_kl_coef=0.01)
    ids, m = _prompts()
    first = tr.step(ids, m)
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy equals its frozen copy at step 1 (fp32)
    assert first["ratio"] == pytest.approx(1.0, abs=0.05)
    for _ in range(14):
        last = tr.step(ids, m)
    assert last["score"] > first["score"] + 0.2, (first["score"], last["score"])
    assert last["kl"] > 0
    for k in ("score", "kl", "entropy", "clipfrac", "approxkl", "value_loss", "adv_mean", "adv_std",
              "response_length", "kl_coef"):
        assert math.isfinite(last[k]), k


def test_negative_kl_warns_and_bad_scores_raise(one_thread):
    tr = _trainer(lambda p, r: torch.zeros(len(r)))
    ids, m = _prompts()
    ro = tr.rollout(ids, m)
    ro.ref_logprobs = ro.logprobs + 0.5  # as if the samples were not drawn from π
    with pytest.warns(UserWarning, match="negative"):
        tr.train_on(ro, torch.zeros(32))
    with pytest.raises(ValueError, match=r"score_fn returned shape \(3,\)"):
        _trainer(lambda p, r: torch.zeros(3)).step(ids, m)
    with pytest.raises(ValueError, match="NaN"):
        _trainer(lambda p, r: torch.full((len(r),), float("nan"))).step(ids, m)
    with pytest.warns(UserWarning, match="top-k/top-p"):
        _trainer(lambda p, r: torch.zeros(len(r)), top_k=5)


def test_lora_policy_reference_is_the_base_with_adapters_off(one_thread):
    from minillm.lora import apply_lora
    from minillm.lora import adapters_disabled
    tr0 = _trainer(lambda p, r: torch.zeros(len(r)))
    base = tr0.ref_model  # the deep copy = the weights before LoRA
    lm = tr0.policy.model
    apply_lora(lm, ["c_attn", "c_fc"], r=4, alpha=8)
    for name, p in lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained-looking adapter
    ids = torch.tensor([[2, 3, 4, 5]])
    with torch.no_grad():
        with adapters_disabled(lm):
            off = lm(ids)
        on = lm(ids)
        want = base(ids)
    assert torch.allclose(off, want, atol=1e-5)  # fp32: adapters off = the base model
    assert not torch.allclose(on, want, atol=1e-3)  # and the adapters do change the policy
    # the trainer then keeps no copy: ref_model is None and KL > 0 because the adapters moved the policy
    tr = PPOTrainer(tr0.policy, _Tok(), lambda p, r: torch.zeros(len(r)), tr0.cfg,
                    generator=torch.Generator().manual_seed(0))
    assert tr.ref_model is None
    ro = tr.rollout(*_prompts(8))
    kl = ((ro.logprobs - ro.ref_logprobs) * ro.response_mask).sum(-1).mean()
    assert kl > 0.01


def test_full_kl_estimator_in_the_loop(one_thread):
    tr = _trainer(lambda p, r: torch.tensor([float(len(x)) for x in r]) / 10, kl_estimator="full")
    ids, m = _prompts(16)
    st = tr.step(ids, m)
    assert abs(st["kl"]) < 1e-5 and abs(st["kl_penalty"]) < 1e-5  # policy = reference at step 1 (fp32)
    st = tr.step(ids, m)
    assert st["kl_penalty"] < 0  # after an update the exact KL is > 0, so the penalty is negative
