"""PPO pins (issue #13): what test_ppo.py's loop test passes without. The documented defaults and config
ranges; the clipped policy and value losses by hand; the value head; a rollout's log-probs, values, entropy,
masks and texts recomputed token by token (decoder-only and encoder-decoder, temperature, eval mode, the
reference model, the 'full' estimator); and one train_on whose parameter gradient is checked against the
paper's loss evaluated independently (per-token rewards, GAE by its sum definition, whitening, the policy,
value and entropy terms with their coefficients, minibatches and gradient accumulation), its logged
statistics by hand (KL and the value fed to the adaptive controller, advantage mean/std, score std,
whitening's effect), gradient clipping, batches of 1, and the warnings.

A learning rate of 1e-12 leaves the weights as they were (to float32 precision), so several PPO epochs
all see the rollout's policy: the expected values need no replay of the optimizer."""

import copy
import math
import warnings

import pytest
import torch

from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
from minillm.rlhf.ppo import (PPOConfig, PPOTrainer, PolicyWithValueHead, ValueHead, policy_loss,
                              response_mask_from, value_loss)

pytestmark = pytest.mark.usefixtures("one_thread")


class _Tok:
    eos_token_id, pad_token_id = 1, 0

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


class _NoEos(_Tok):
    """No EOS: every response runs to max_new_tokens, so every response mask is all ones."""
    eos_token_id = None


def _lm(seed=0, pdrop=0.0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=10, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                      resid_pdrop=pdrop, embd_pdrop=pdrop, attn_pdrop=pdrop))


def _trainer(tok=None, ref=None, lm=None, score_fn=None, gen=True, **kw):
    cfg = PPOConfig(**{**dict(batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=4, lr=1e-12,
                              max_grad_norm=1e9), **kw})
    torch.manual_seed(0)
    policy = PolicyWithValueHead(lm if lm is not None else _lm())
    return PPOTrainer(policy, tok or _Tok(), score_fn or (lambda p, r: torch.zeros(len(r))), cfg, ref_model=ref,
                      generator=torch.Generator().manual_seed(0) if gen else None)


PROMPTS = torch.tensor([[0, 2, 3], [4, 5, 6], [2, 2, 2], [0, 0, 7]])
PMASK = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 1]])


def _by_hand(policy, ref_lm, seq, attn, P, T):
    """Per response token, from the models' own forward passes: log pi, log pi_ref, value, entropy, (all /T)."""
    with torch.no_grad():
        logits = policy.model(seq, attention_mask=attn)
        ref_logits = ref_lm(seq, attention_mask=attn)
        h = policy.model.transformer(seq, attention_mask=attn)
        w, b = policy.v_head.summary.weight[0], policy.v_head.summary.bias[0]
    B, R = seq.shape[0], seq.shape[1] - P
    lp, rlp, val, ent = (torch.zeros(B, R) for _ in range(4))
    for i in range(B):
        for t in range(R):
            tok = seq[i, P + t]
            ls = torch.log_softmax(logits[i, P - 1 + t] / T, -1)
            lp[i, t] = ls[tok]
            rlp[i, t] = torch.log_softmax(ref_logits[i, P - 1 + t] / T, -1)[tok]
            val[i, t] = (h[i, P - 1 + t] * w).sum() + b
            ent[i, t] = -(ls.exp() * ls).sum()
    return lp, rlp, val, ent


def _mask_by_hand(resp, eos):
    out = torch.zeros_like(resp)
    for i in range(resp.shape[0]):
        for t in range(resp.shape[1]):
            out[i, t] = 1
            if resp[i, t] == eos:
                break
    return out


# ---------------- config ----------------
def test_documented_defaults():
    c = PPOConfig()
    assert (c.lr, c.batch_size, c.mini_batch_size, c.gradient_accumulation_steps, c.ppo_epochs) == (1.41e-5, 64, 16, 1, 4)
    assert (c.gamma, c.lam, c.cliprange, c.cliprange_value, c.vf_coef, c.ent_coef) == (1.0, 0.95, 0.2, 0.2, 0.1, 0.0)
    assert (c.init_kl_coef, c.adaptive_kl, c.target_kl, c.horizon, c.kl_estimator) == (0.2, True, 6.0, 10000.0, "k1")
    assert (c.whiten_advantages, c.max_grad_norm, c.max_new_tokens, c.temperature) == (True, 1.0, 16, 1.0)
    assert (c.top_k, c.top_p, c.weight_decay) == (None, None, 0.0)
    assert PPOConfig(5e-6).lr == 5e-6  # lr is the first field
    assert policy_loss.__defaults__ == (0.2,) and value_loss.__defaults__ == (0.2,)


@pytest.mark.parametrize("field,ok,bad", [
    ("lr", [1e-9, 0.5, 2.0], [0.0, -1e-3]),
    ("gamma", [0.0, 0.5, 1.0], [-0.1, 1.2]),
    ("lam", [0.0, 0.5, 1.0], [-0.1, 1.2]),
    ("cliprange", [0.1, 0.5, 3.0], [0.0]),
    ("cliprange_value", [0.1, 0.5, 3.0], [0.0]),
    ("vf_coef", [0.0, 0.5, 3.0], [-0.1]),
    ("init_kl_coef", [0.0, 0.5], [-0.1]),
    ("target_kl", [0.5, 12.0], [0.0]),
    ("horizon", [0.5, 1e6], [0.0]),
    ("max_grad_norm", [0.5, 5.0], [0.0]),
    ("temperature", [0.5, 2.0], [0.0, -1.0]),
    ("top_p", [0.5, 1.0], [0.0, 1.2]),
    ("weight_decay", [0.0, 0.5, 2.0], [-0.1]),
])
def test_config_ranges(field, ok, bad):
    for v in ok:
        PPOConfig(**{field: v})
    for v in bad:
        with pytest.raises(ValueError, match=field):
            PPOConfig(**{field: v})


def test_config_batch_arithmetic():
    PPOConfig(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=2)
    PPOConfig(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        PPOConfig(batch_size=10, mini_batch_size=4)
    for ga in (0, 3):
        with pytest.raises(ValueError, match="gradient_accumulation_steps"):
            PPOConfig(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=ga)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):  # 3 minibatches do not split in 2
        PPOConfig(batch_size=12, mini_batch_size=4, gradient_accumulation_steps=2)


# ---------------- the losses by hand ----------------
def test_policy_loss_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.5]], dtype=torch.float64)
    new = old + torch.tensor([[0.5, -0.5, 0.1, 0.3]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -2.0, 0.5, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.float64)
    terms, clipped = [], 0
    for d, a in zip([0.5, -0.5, 0.1], [1.0, -2.0, 0.5]):
        r = math.exp(d)
        rc = min(max(r, 0.8), 1.2)  # default epsilon 0.2
        terms.append(max(-a * r, -a * rc))
        clipped += (-a * rc) > (-a * r)
    loss, st = policy_loss(new, old, adv, mask)  # default cliprange
    assert loss.item() == pytest.approx(sum(terms) / 3, abs=1e-12)
    assert st["clipfrac"] == pytest.approx(clipped / 3) and clipped == 2  # e^0.5 > 1.2 (A > 0), e^-0.5 < 0.8 (A < 0)
    assert st["approxkl"] == pytest.approx(0.5 * (0.25 + 0.25 + 0.01) / 3)
    assert st["policykl"] == pytest.approx(-(0.5 - 0.5 + 0.1) / 3)
    assert st["ratio"] == pytest.approx((math.exp(0.5) + math.exp(-0.5) + math.exp(0.1)) / 3)
    # a wider clip range [0.3, 1.7] clips nothing (a tie pg1 == pg2 is not counted as clipped)
    loss2, st2 = policy_loss(new, old, adv, mask, cliprange=0.7)
    assert loss2.item() == pytest.approx((-math.exp(0.5) + 2 * math.exp(-0.5) - 0.5 * math.exp(0.1)) / 3, abs=1e-12)
    assert st2["clipfrac"] == 0.0


def test_value_loss_by_hand():
    old = torch.tensor([[0.0, 1.0, -1.0, 0.5]], dtype=torch.float64)
    new = torch.tensor([[0.5, 1.1, -1.5, 9.0]], dtype=torch.float64)
    ret = torch.tensor([[1.0, 0.0, -1.2, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.float64)

    def by_hand(eps):
        terms, clipped = [], 0
        for v, o, r in zip([0.5, 1.1, -1.5], [0.0, 1.0, -1.0], [1.0, 0.0, -1.2]):
            vc = min(max(v, o - eps), o + eps)
            terms.append(max((v - r) ** 2, (vc - r) ** 2))
            clipped += (vc - r) ** 2 > (v - r) ** 2
        return 0.5 * sum(terms) / 3, clipped / 3

    loss, st = value_loss(new, old, ret, mask)  # default eps_v = 0.2
    want, frac = by_hand(0.2)
    assert loss.item() == pytest.approx(want, abs=1e-12) and st["vf_clipfrac"] == pytest.approx(frac)
    assert frac > 0
    loss, st = value_loss(new, old, ret, mask, cliprange_value=1.0)
    want, frac = by_hand(1.0)
    assert loss.item() == pytest.approx(want, abs=1e-12) and st["vf_clipfrac"] == pytest.approx(frac)
    # a tie (unclipped prediction) is not counted as clipped
    assert value_loss(old, old, ret, mask)[1]["vf_clipfrac"] == 0.0


# ---------------- the value head ----------------
def test_value_head_init_shape_and_dtype():
    w = torch.cat([ValueHead(3).summary.weight.flatten() for _ in range(3000)])
    assert w.std().item() == pytest.approx(0.5, rel=0.03) and abs(w.mean().item()) < 0.03  # N(0, 1/(H+1))
    w1 = torch.cat([ValueHead(1).summary.weight.flatten() for _ in range(6000)])
    assert w1.std().item() == pytest.approx(1 / math.sqrt(2), rel=0.03)
    head = ValueHead(3)
    assert torch.equal(head.summary.bias, torch.zeros(1))
    h = torch.randn(2, 5, 3).bfloat16()
    v = head(h)
    assert v.shape == (2, 5) and v.dtype == torch.float32  # fp32 values from bf16 hidden states
    with torch.no_grad():
        want = (h.float() * head.summary.weight[0]).sum(-1)
    assert torch.allclose(v, want, atol=1e-6)
    assert head(torch.randn(2, 1, 3)).shape == (2, 1)


def test_policy_with_value_head_forward():
    lm = _lm()
    pv = PolicyWithValueHead(lm)
    assert pv.v_head.summary.in_features == 16 and not pv.is_encoder_decoder  # width read from the model
    assert PolicyWithValueHead(lm, hidden_size=16).v_head.summary.in_features == 16
    ids, m = torch.tensor([[2, 3, 4], [5, 6, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        logits, values = pv(ids, m)
        h = lm.transformer(ids, attention_mask=m)
        assert torch.allclose(logits, lm(ids, attention_mask=m), atol=1e-6)
        assert torch.allclose(values, (h * pv.v_head.summary.weight[0]).sum(-1), atol=1e-6)
        assert torch.equal(pv(ids)[0], lm(ids))  # no mask: all tokens real


# ---------------- rollouts ----------------
def test_rollout_by_hand_decoder_only():
    ref = _lm(seed=1)
    tr = _trainer(ref=ref, lm=_lm(pdrop=0.3), temperature=0.7, max_new_tokens=5, batch_size=8, mini_batch_size=8)
    tr.policy.train()  # dropout on: the rollout must switch it off
    ids, m = PROMPTS.repeat(2, 1), PMASK.repeat(2, 1)
    ro = tr.rollout(ids, m)
    assert not tr.policy.training
    P = 3
    assert ro.prompt_len == P and torch.equal(ro.sequences[:, :P], ids) and ro.sequences.shape[1] <= P + 5
    resp = ro.sequences[:, P:]
    assert torch.equal(ro.responses, resp)
    rmask = _mask_by_hand(resp, 1)
    assert torch.equal(ro.response_mask, rmask)
    assert ((resp == 0) | (rmask == 1)).all()  # after the EOS: the pad id
    assert torch.equal(ro.attention_mask, torch.cat([m, rmask], 1))
    assert len({tuple(r) for r in resp.tolist()}) > 1  # sampled, not greedy
    lp, rlp, val, ent = _by_hand(tr.policy, ref, ro.sequences, ro.attention_mask, P, 0.7)
    assert torch.allclose(ro.logprobs, lp, atol=1e-5)
    assert torch.allclose(ro.ref_logprobs, rlp, atol=1e-5)
    assert torch.allclose(ro.values, val, atol=1e-5)
    assert torch.allclose(ro.entropy, ent, atol=1e-5)
    p_ids, p_mask = ro.prompts
    assert torch.equal(p_ids, ids) and torch.equal(p_mask, m)
    prompts, responses = tr.decode(ro)
    assert prompts[0] == "2 3" and prompts[1] == "4 5 6" and prompts[3] == "7"
    assert responses == [" ".join(str(t) for t in resp[i][rmask[i].bool()].tolist()) for i in range(8)]
    # the 'full' estimator keeps the reference's whole log-distribution
    trf = _trainer(ref=ref, temperature=0.7, kl_estimator="full")
    rof = trf.rollout(PROMPTS, PMASK)
    with torch.no_grad():
        rl = ref(rof.sequences, attention_mask=rof.attention_mask)
    want = torch.log_softmax(rl[:, P - 1:-1] / 0.7, -1)
    assert rof.ref_logprobs.shape == want.shape and torch.allclose(rof.ref_logprobs, want, atol=1e-5)


def test_rollout_pads_with_eos_when_the_tokenizer_has_no_pad():
    class NoPad(_Tok):
        pad_token_id = None
    tr = _trainer(tok=NoPad(), max_new_tokens=8)
    ro = tr.rollout(PROMPTS.repeat(4, 1), PMASK.repeat(4, 1))
    after = ro.response_mask == 0
    assert after.any() and (ro.responses[after] == 1).all()


def test_rollout_encoder_decoder():
    from minillm.models.t5 import T5ForConditionalGeneration
    t5 = T5ForConditionalGeneration.from_pretrained("tiny-flan-t5").eval()
    pv = PolicyWithValueHead(t5)
    assert pv.is_encoder_decoder
    tr = PPOTrainer(pv, _Tok(), lambda p, r: torch.zeros(len(r)), PPOConfig(batch_size=2, mini_batch_size=2,
                    max_new_tokens=3, temperature=0.8), generator=torch.Generator().manual_seed(0))
    prompts, pm = torch.tensor([[5, 6, 7], [0, 8, 9]]), torch.tensor([[1, 1, 1], [0, 1, 1]])
    ro = tr.rollout(prompts, pm)
    assert ro.prompt_len == 1 and (ro.sequences[:, 0] == 0).all()  # [decoder_start | response]
    rmask = _mask_by_hand(ro.sequences[:, 1:], 1)
    assert torch.equal(ro.response_mask, rmask)
    assert torch.equal(ro.attention_mask, torch.cat([torch.ones(2, 1, dtype=torch.long), rmask], 1))
    assert torch.equal(ro.encoder_input_ids, prompts) and torch.equal(ro.encoder_attention_mask, pm)
    assert torch.equal(ro.prompts[0], prompts) and torch.equal(ro.prompts[1], pm)
    with torch.no_grad():
        logits = t5(prompts, attention_mask=pm, decoder_input_ids=ro.sequences, decoder_attention_mask=ro.attention_mask)
        enc = t5.encode(prompts, pm)
        h = t5.decoder_hidden_states(ro.sequences, enc, pm, ro.attention_mask)
    R = ro.sequences.shape[1] - 1
    for i in range(2):
        for t in range(R):
            ls = torch.log_softmax(logits[i, t] / 0.8, -1)
            assert ro.logprobs[i, t].item() == pytest.approx(ls[ro.sequences[i, 1 + t]].item(), abs=1e-5)
            assert ro.ref_logprobs[i, t].item() == pytest.approx(ro.logprobs[i, t].item(), abs=1e-5)  # ref = copy
            v = (h[i, t] * pv.v_head.summary.weight[0]).sum() + pv.v_head.summary.bias[0]
            assert ro.values[i, t].item() == pytest.approx(v.item(), abs=1e-5)
    p_txt, _ = tr.decode(ro)
    assert p_txt == ["5 6 7", "8 9"]
    st = tr.train_on(ro, torch.tensor([1.0, -1.0]))
    assert math.isfinite(st["policy_loss"]) and math.isfinite(st["value_loss"])
    with pytest.raises(ValueError, match="decoder_input_ids"):
        pv(prompts, pm)


def test_response_mask_from():
    resp = torch.tensor([[1, 5, 1], [4, 1, 1], [4, 4, 4], [4, 4, 1]])
    assert response_mask_from(resp, 1).tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]]
    assert response_mask_from(torch.tensor([3, 1, 2, 1]), 1).tolist() == [1, 1, 0, 0]  # one response
    assert response_mask_from(resp, None).tolist() == [[1] * 3] * 4


# ---------------- one update, by hand ----------------
def _gae_by_definition(r, v, gamma, lam):
    T = len(r)
    vv = list(v) + [0.0]
    d = [r[t] + gamma * vv[t + 1] - vv[t] for t in range(T)]
    return [sum((gamma * lam) ** k * d[t + k] for k in range(T - t)) for t in range(T)]


def _expected(ro, scores, beta, gamma, lam, whiten=True):
    """Advantages (raw and whitened) and returns from the rollout's numbers, by the papers' formulas
    (all response masks are ones here)."""
    lp, rlp, val = ro.logprobs.tolist(), ro.ref_logprobs.tolist(), ro.values.tolist()
    B, R = len(lp), len(lp[0])
    adv, ret = [], []
    for i in range(B):
        r = [-beta * (lp[i][t] - rlp[i][t]) for t in range(R)]
        r[-1] += scores[i]
        a = _gae_by_definition(r, val[i], gamma, lam)
        adv.append(a)
        ret.append([a[t] + val[i][t] for t in range(R)])
    flat = [x for row in adv for x in row]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)
    w = [[(x - mean) / math.sqrt(var + 1e-8) for x in row] for row in adv] if whiten else adv
    return torch.tensor(adv), torch.tensor(w), torch.tensor(ret), mean, math.sqrt(var)


def test_train_on_gradient_is_the_papers_loss():
    ref = _lm(seed=1)
    kw = dict(gamma=0.9, lam=0.8, vf_coef=0.5, ent_coef=0.3, init_kl_coef=0.1, adaptive_kl=False, temperature=0.7,
              batch_size=4, mini_batch_size=2, gradient_accumulation_steps=2, ppo_epochs=2, max_new_tokens=3)
    tr = _trainer(tok=_NoEos(), ref=ref, **kw)
    ro = tr.rollout(PROMPTS, PMASK)
    assert (ro.response_mask == 1).all()
    scores = [1.0, -0.5, 2.0, 0.0]
    adv, adv_w, ret, mean, std = _expected(ro, scores, 0.1, 0.9, 0.8)
    # the loss on the whole batch at the rollout's weights (the two minibatches of 2 have equal token counts,
    # and each epoch's optimizer step averages them)
    pol = copy.deepcopy(tr.policy)
    logits = pol.model(ro.sequences, attention_mask=ro.attention_mask)[:, 2:-1] / 0.7
    h = pol.model.transformer(ro.sequences, attention_mask=ro.attention_mask)[:, 2:-1]
    vpred = h @ pol.v_head.summary.weight[0] + pol.v_head.summary.bias[0]
    ls = torch.log_softmax(logits, -1)
    lp = ls.gather(-1, ro.responses.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(lp - ro.logprobs)
    l_pg = (-adv_w * ratio).mean()
    l_vf = 0.5 * ((vpred - ret) ** 2).mean()
    l_ent = -(ls.exp() * ls).sum(-1).mean()
    (l_pg + 0.5 * l_vf - 0.3 * l_ent).backward()

    st = tr.train_on(ro, torch.tensor(scores))
    for (name, p), q in zip(tr.policy.named_parameters(), pol.parameters()):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-7), name
    # and the logged statistics
    k1 = (ro.logprobs - ro.ref_logprobs).sum(-1)
    assert st["kl"] == pytest.approx(k1.mean().item(), abs=1e-6)
    assert st["kl_penalty"] == pytest.approx(-0.1 * k1.mean().item(), abs=1e-6)
    assert st["kl_coef"] == 0.1 and tr.kl_ctl.value == 0.1
    assert st["adv_mean"] == pytest.approx(mean, abs=1e-5) and st["adv_std"] == pytest.approx(std, rel=1e-4)
    assert st["value_loss"] == pytest.approx(0.5 * ((ro.values - ret) ** 2).mean().item(), rel=1e-4)
    assert st["policy_loss"] == pytest.approx(0.0, abs=1e-5)  # ratio 1: minus the mean whitened advantage
    assert st["clipfrac"] == 0.0 and st["approxkl"] == pytest.approx(0.0, abs=1e-10)
    assert st["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert st["score"] == pytest.approx(0.625) and st["score_std"] == pytest.approx(
        math.sqrt(sum((s - 0.625) ** 2 for s in scores) / 3))
    assert st["entropy"] == pytest.approx(ro.entropy.mean().item(), abs=1e-6)
    assert st["response_length"] == 3.0


def test_whitening_and_the_kl_fed_to_the_adaptive_controller():
    ref = _lm(seed=1)
    kw = dict(init_kl_coef=0.1, temperature=0.7, target_kl=6.0, horizon=40.0, kl_estimator="abs")
    tr = _trainer(ref=ref, whiten_advantages=False, **kw)
    ro = tr.rollout(PROMPTS, PMASK)
    R = ro.logprobs.shape[1]
    ro.ref_logprobs = ro.logprobs - torch.tensor([0.6, -0.2] * R)[:R]  # log-ratios of both signs
    m = ro.response_mask.float()
    k1 = ((ro.logprobs - ro.ref_logprobs) * m).sum(-1).mean().item()  # the summed k1, not the 'abs' penalty
    assert k1 > 0
    assert k1 != pytest.approx(((ro.logprobs - ro.ref_logprobs).abs() * m).sum(-1).mean().item(), abs=1e-3)
    tr.kl_ctl.target = k1 / 1.1  # error = KL/target - 1 = 0.1, inside the clip
    st = tr.train_on(ro, torch.tensor([5.0, 3.0, 4.0, 6.0]))
    assert st["kl"] == pytest.approx(k1, abs=1e-6) and st["kl_coef"] == 0.1
    assert tr.kl_ctl.value == pytest.approx(0.1 * (1 + 0.1 * 4 / 40.0), rel=1e-5)
    # unwhitened advantages: the first minibatch's loss at ratio 1 is minus their mean (large: scores ~ 5)
    assert st["policy_loss"] == pytest.approx(-st["adv_mean"], rel=1e-4) and st["adv_mean"] > 1
    tr2 = _trainer(ref=ref, **kw)  # the default whitens: mean 0
    st2 = tr2.train_on(ro, torch.tensor([5.0, 3.0, 4.0, 6.0]))  # the same rollout, same starting weights
    assert st2["adv_mean"] == pytest.approx(st["adv_mean"], rel=1e-5)
    assert st2["policy_loss"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.filterwarnings("ignore:mean KL to the reference is negative")
def test_full_kl_rewards_in_train_on():
    ref = _lm(seed=1)
    tr = _trainer(ref=ref, temperature=0.7, kl_estimator="full", init_kl_coef=0.3, adaptive_kl=False)
    ro = tr.rollout(PROMPTS, PMASK)
    m = ro.response_mask.float()
    with torch.no_grad():
        lg = tr.policy.model(ro.sequences, attention_mask=ro.attention_mask)[:, 2:-1] / 0.7
        rg = ref(ro.sequences, attention_mask=ro.attention_mask)[:, 2:-1] / 0.7
    p, lq = torch.log_softmax(lg, -1), torch.log_softmax(rg, -1)
    full = ((p.exp() * (p - lq)).sum(-1) * m).sum(-1).mean().item()
    lp_tok = p.gather(-1, ro.responses.unsqueeze(-1)).squeeze(-1)
    lq_tok = lq.gather(-1, ro.responses.unsqueeze(-1)).squeeze(-1)
    st = tr.train_on(ro, torch.zeros(4))
    assert st["kl_penalty"] == pytest.approx(-0.3 * full, rel=1e-4) and full > 0.01
    assert st["kl"] == pytest.approx(((lp_tok - lq_tok) * m).sum(-1).mean().item(), abs=1e-5)


# ---------------- the loop's mechanics ----------------
def test_update_clips_the_gradient_and_steps():
    tr = _trainer(lr=1e-2, max_grad_norm=1e-3, batch_size=4, mini_batch_size=2)
    before = [p.detach().clone() for p in tr.policy.parameters()]
    ro = tr.rollout(PROMPTS, PMASK)
    tr.train_on(ro, torch.tensor([1.0, -1.0, 2.0, 0.0]))
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in tr.policy.parameters() if p.grad is not None))
    assert norm.item() <= 1e-3 * (1 + 1e-4)
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.policy.parameters()))
    # the reference is a frozen copy: untouched
    assert tr.ref_model is not tr.policy.model and not tr.ref_model.training
    assert all(not p.requires_grad for p in tr.ref_model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, tr.ref_model.parameters()))


def test_given_reference_is_frozen_and_used():
    ref = _lm(seed=1).train()
    tr = _trainer(ref=ref)
    assert tr.ref_model is ref and not ref.training and all(not p.requires_grad for p in ref.parameters())


def test_train_on_runs_the_policy_in_eval_mode():
    # dropout would make pi_theta / pi_old differ from 1 before any update
    tr = _trainer(lm=_lm(pdrop=0.5))
    ro = tr.rollout(PROMPTS, PMASK)
    tr.policy.train()
    st = tr.train_on(ro, torch.tensor([1.0, -1.0, 2.0, 0.0]))
    assert st["approxkl"] == pytest.approx(0.0, abs=1e-10) and not tr.policy.training


def test_batch_of_one_and_two():
    tr = _trainer(tok=_NoEos(), batch_size=1, mini_batch_size=1, gen=False,
                  score_fn=lambda p, r: torch.tensor([float(len(r[0].split()))]))
    st = tr.step(PROMPTS[:1], PMASK[:1])
    assert st["score"] == 4.0 and st["score_std"] == 0.0 and all(math.isfinite(v) for v in st.values())
    tr2 = _trainer(batch_size=2, mini_batch_size=2, score_fn=lambda p, r: torch.tensor([1.0, 3.0]))
    st2 = tr2.step(PROMPTS[:2], PMASK[:2])
    assert st2["score"] == 2.0 and st2["score_std"] == pytest.approx(math.sqrt(2))


def test_step_passes_texts_to_the_scorer():
    seen = []

    def score(prompts, responses):
        seen.append((prompts, responses))
        return [0.5] * len(responses)  # a list is fine
    tr = _trainer(score_fn=score)
    st = tr.step(PROMPTS, PMASK)
    assert seen[0][0] == ["2 3", "4 5 6", "2 2 2", "7"] and len(seen[0][1]) == 4
    assert st["score"] == 0.5
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        _trainer(score_fn=lambda p, r: torch.zeros(4, 1)).step(PROMPTS, PMASK)


def test_negative_kl_warning_threshold():
    tr = _trainer(tok=_NoEos(), max_new_tokens=3)
    ro = tr.rollout(PROMPTS, PMASK)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # KL 0 at the start: no warning
        tr.train_on(ro, torch.zeros(4))
    ro.ref_logprobs = ro.logprobs + 0.06 / 3  # summed KL -0.06 per sequence: below -0.05
    with pytest.warns(UserWarning, match="negative"):
        tr.train_on(ro, torch.zeros(4))


def test_top_k_or_top_p_warns():
    for kw in (dict(top_k=5), dict(top_p=0.9)):
        with pytest.warns(UserWarning, match="top-k/top-p"):
            _trainer(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _trainer()


def test_one_optimizer_step_per_accumulated_minibatches():
    # 2 minibatches accumulated into one AdamW step: its first step moves each weight by -lr * g / (|g| + eps),
    # g being the mean gradient of the two minibatches (the gradient left on the weights afterwards)
    tr = _trainer(tok=_NoEos(), lr=1e-3, batch_size=4, mini_batch_size=2, gradient_accumulation_steps=2,
                  max_new_tokens=3)
    ro = tr.rollout(PROMPTS, PMASK)
    before = [p.detach().clone() for p in tr.policy.parameters()]
    tr.train_on(ro, torch.tensor([1.0, -1.0, 2.0, 0.0]))
    for b, p in zip(before, tr.policy.parameters()):
        want = b - 1e-3 * p.grad / (p.grad.abs() + 1e-8)
        assert torch.allclose(p.detach(), want, atol=1e-7), (p.detach() - want).abs().max()
