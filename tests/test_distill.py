"""Knowledge distillation: the loss equals the textbook formula and torch's kl_div; properties (hypothesis)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.distill import distillation_loss, distillation_loss_fn, distillation_loss_sum
from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel

pytestmark = pytest.mark.usefixtures("one_thread")


def transcription(zs, zt, labels, T, alpha):
    """Hinton et al. written out with loops over positions (fp64): α T² KL(p_t‖p_s) + (1−α) CE, mean over labels."""
    B, L, V = zs.shape
    total, n = 0.0, 0
    for b in range(B):
        for t in range(L - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            pt = torch.softmax(zt[b, t].double() / T, -1)
            ps = torch.softmax(zs[b, t].double() / T, -1)
            kl = sum(float(pt[v]) * (math.log(float(pt[v])) - math.log(float(ps[v]))) for v in range(V))
            ce = -math.log(float(torch.softmax(zs[b, t].double(), -1)[y]))
            total += alpha * T * T * kl + (1 - alpha) * ce
            n += 1
    return total / n


def case(seed, B=2, L=5, V=7, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zs, zt = torch.randn(B, L, V, generator=g) * scale, torch.randn(B, L, V, generator=g) * scale
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 2] = -100
    labels[1, 3:] = -100
    return zs, zt, labels


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (2.0, 0.5), (4.0, 0.9), (0.5, 0.1), (2.0, 1.0), (3.0, 0.0)])
def test_equals_the_transcribed_formula(T, alpha):
    zs, zt, labels = case(0)
    got = distillation_loss(zs.double(), zt.double(), labels, T, alpha)
    assert abs(float(got) - transcription(zs, zt, labels, T, alpha)) < 1e-9


def test_soft_term_equals_torch_kl_div():
    zs, zt, labels = case(1, B=3, L=6, V=11)
    T = 2.5
    keep = F.pad(labels[:, 1:], (0, 1), value=-100) != -100  # the labelled positions (B, L)
    ref = F.kl_div(F.log_softmax(zs[keep] / T, -1), F.log_softmax(zt[keep] / T, -1), log_target=True,
                   reduction="batchmean") * T * T
    got = distillation_loss(zs, zt, labels, T, alpha=1.0)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    hard = distillation_loss(zs, zt, labels, T, alpha=0.0)
    shift = F.pad(labels[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(hard, F.cross_entropy(zs.reshape(-1, 11), shift.reshape(-1)), atol=1e-5, rtol=1e-5)


def test_sum_and_count_follow_the_lm_loss_mask():
    zs, zt, labels = case(2)
    total, n = distillation_loss_sum(zs, zt, labels)
    assert int(n) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total / n, distillation_loss(zs, zt, labels))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), T=st.floats(0.1, 50.0), alpha=st.floats(0.0, 1.0), V=st.integers(2, 30))
def test_zero_kl_when_student_equals_teacher(seed, T, alpha, V):
    zs, _, labels = case(seed, V=V)
    soft = distillation_loss(zs, zs.clone(), labels, T, alpha=1.0)
    assert abs(float(soft)) < 1e-5 * T * T
    mixed = distillation_loss(zs, zs.clone(), labels, T, alpha)
    hard = distillation_loss(zs, zs.clone(), labels, T, alpha=0.0)
    assert abs(float(mixed) - (1 - alpha) * float(hard)) < 1e-4 * max(1.0, T * T)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), T=st.floats(0.3, 20.0))
def test_kl_is_nonnegative_and_loss_finite(seed, T):
    zs, zt, labels = case(seed, scale=10.0)
    assert float(distillation_loss(zs, zt, labels, T, 1.0)) >= -1e-6
    assert math.isfinite(float(distillation_loss(zs, zt, labels, T, 0.5)))


def soft_grad_norm(zs, zt, labels, T, squared=True):
    zs = zs.clone().double().requires_grad_(True)
    loss = distillation_loss(zs, zt.double(), labels, T, alpha=1.0)
    if not squared:
        loss = loss / (T * T)
    loss.backward()
    return zs.grad.norm().item(), zs.grad


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_gradient_scale_independent_of_temperature_thanks_to_t_squared(seed):
    """Hinton et al.: with T², ∂loss/∂z_s → (z_s − z_t − mean)/(V·N) as T grows; without it the gradient shrinks as 1/T²."""
    zs, zt, labels = case(seed, scale=1.0)
    n20, _ = soft_grad_norm(zs, zt, labels, 20.0)
    n80, _ = soft_grad_norm(zs, zt, labels, 80.0)
    assert abs(n80 / n20 - 1) < 0.02
    raw20, _ = soft_grad_norm(zs, zt, labels, 20.0, squared=False)
    raw80, _ = soft_grad_norm(zs, zt, labels, 80.0, squared=False)
    assert abs(raw20 / raw80 - 16) < 0.5  # the unscaled KL's gradient falls as 1/T²
    keep = F.pad(labels[:, 1:], (0, 1), value=-100) != -100
    d = (zs - zt).double()
    limit = (d - d.mean(-1, keepdim=True)) / zs.shape[-1] * keep[..., None] / keep.sum()
    _, g400 = soft_grad_norm(zs, zt, labels, 400.0)  # the O(|z|/T) correction is ~1% here
    torch.testing.assert_close(g400, limit, atol=0.03 * limit.abs().max().item(), rtol=0)


def test_loss_fn_freezes_teacher_and_trains_student():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=30, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    teacher, student = GPT2LMHeadModel(cfg), GPT2LMHeadModel(cfg)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    fn = distillation_loss_fn(teacher, temperature=2.0, alpha=0.5)
    ids = torch.randint(0, 30, (3, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    total, n = fn(student, batch)
    total.backward()
    assert int(n) == 3 * 7 and all(p.grad is None for p in teacher.parameters())
    assert student.transformer.wte.weight.grad is not None and not teacher.training
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t0.items())
    with torch.no_grad():
        want = distillation_loss_sum(student(ids), teacher(ids), ids, 2.0, 0.5)[0]
    torch.testing.assert_close(total.detach(), want)


def test_mismatched_vocab_and_bad_arguments_are_errors():
    zs, zt, labels = case(3)
    with pytest.raises(ValueError, match="differ"):
        distillation_loss(zs, zt[..., :-1], labels)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(zs, zt, labels, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(zs, zt, labels, alpha=1.5)


def test_distill_demo_runs_small():
    from minillm.demos.distill_demo import distill_demo, format_result
    r = distill_demo(teacher_examples=64, student_examples=16, heldout=16, teacher_steps=3, student_steps=3)
    assert r["student_params"] < r["teacher_params"]
    assert all(r[k] > 0 for k in ("teacher_heldout_loss", "student_hard_heldout_loss", "student_distilled_heldout_loss"))
    assert "distilled" in format_result(r)


@pytest.mark.slow
def test_distilled_student_beats_hard_labels():
    from minillm.demos.distill_demo import distill_demo
    r = distill_demo()
    assert r["student_distilled_heldout_loss"] < r["student_hard_heldout_loss"] - 0.03
