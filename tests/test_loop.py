"""The training loop: accumulation normalized by real tokens, masking, all-masked batches, AMP, NaN stop,
AdamW groups, schedule, logging."""

import json
import math

import pytest
import torch

from minillm.models.gpt2 import GPT2LMHeadModel
from minillm.data.sft import IGNORE, CausalLMCollator
from minillm.train.loop import (NonFiniteLossError, TrainConfig, accumulate_gradients, causal_lm_loss,
                                lm_loss_sum, make_optimizer, train)
from minillm.train.schedule import lr_factor


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def tiny(**kw):
    return GPT2LMHeadModel.from_pretrained("tiny-gpt2", **{**NO_DROPOUT, **kw})


def dataset(n=16, seed=0, lo=3, hi=30, mask_prompt=True):
    """Sequences of very different lengths; the first third of each is a masked 'prompt'."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(1, 512, (L,), generator=g).tolist()
        k = L // 3 if mask_prompt else 0
        out.append({"input_ids": ids, "labels": [IGNORE] * k + ids[k:]})
    return out


collate = CausalLMCollator(pad_id=0)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_accumulation_equals_one_large_batch():
    data = dataset(16)
    # eps=1e-6, not 1e-8: the attention KEY bias has an exactly-zero true gradient (softmax ignores a shift
    # shared by all keys), so its computed gradient is fp noise (~1e-10) in both runs, and Adam's g/(|g|+eps)
    # blows noise up to ±lr when eps << noise. With eps above the noise floor the updates agree to 1e-6;
    # the gradients themselves are compared at eps-independent 1e-6 in the next test.
    base = dict(lr=1e-3, weight_decay=0.1, max_steps=2, shuffle=False, quiet=True, warmup_steps=0, eps=1e-6)
    m1, m2 = tiny(), tiny()
    r1 = train(m1, data, collate, causal_lm_loss, TrainConfig(batch_size=2, grad_accum=4, **base))
    r2 = train(m2, data, collate, causal_lm_loss, TrainConfig(batch_size=8, grad_accum=1, **base))
    assert max_diff(weights(m1), weights(m2)) < 1e-6  # fp32, the bar
    assert r1.losses == pytest.approx(r2.losses, rel=1e-6, abs=0)
    assert 0 < max_diff(weights(m1), weights(tiny())) # it trained


def test_gradient_is_the_token_mean_not_the_mean_of_micro_batch_means():
    data = dataset(8, seed=1)
    micro = [collate(data[i:i + 2]) for i in range(0, 8, 2)]
    big = [collate(data)]
    m = tiny()
    s1, n1, _ = accumulate_gradients(m, micro, causal_lm_loss)
    g_micro = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    s2, n2, _ = accumulate_gradients(m, big, causal_lm_loss)
    g_big = {k: p.grad.clone() for k, p in m.named_parameters()}
    assert n1 == n2 == sum(sum(l != IGNORE for l in d["labels"][1:]) for d in data)
    assert s1 == pytest.approx(s2, rel=1e-6)
    assert max_diff(g_micro, g_big) < 1e-6  # fp32
    # the wrong normalization (each micro-batch by its own count, then / k) is visibly different: the test can fail
    m.zero_grad()
    for b in micro:
        loss, n = causal_lm_loss(m, b)
        (loss / n / len(micro)).backward()
    g_naive = {k: p.grad.clone() for k, p in m.named_parameters()}
    assert max_diff(g_naive, g_big) > 1e-4


def test_masked_positions_get_zero_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, 1:4] = IGNORE
    labels[1, 5] = IGNORE
    loss, n = lm_loss_sum(logits, labels)
    loss.backward()
    assert n == 10 - 4
    # position t predicts label t+1: masked labels at t+1 -> zero gradient at t, exactly
    for b, t in [(0, 0), (0, 1), (0, 2), (1, 4)]:
        assert torch.count_nonzero(logits.grad[b, t]) == 0
    for b, t in [(0, 3), (0, 4), (1, 0), (1, 3)]:
        assert logits.grad[b, t].abs().sum() > 0
    assert torch.count_nonzero(logits.grad[:, -1]) == 0  # the last position predicts nothing
    # and the masked labels' values do not matter at all
    labels2 = labels.clone()
    labels2[0, 1:4] = IGNORE
    logits2 = logits.detach().clone().requires_grad_()
    lm_loss_sum(logits2, labels2)[0].backward()
    assert torch.equal(logits2.grad, logits.grad)


def test_masked_tokens_do_not_change_the_model_gradient():
    """Through the whole model: changing a masked response token's label changes nothing."""
    data = dataset(4, seed=2)
    b = collate(data)
    m = tiny()
    accumulate_gradients(m, [b], causal_lm_loss)
    g1 = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    b2 = {k: v.clone() for k, v in b.items()}
    b2["labels"][b2["labels"] == IGNORE] = IGNORE  # still masked
    b2["input_ids"][b2["attention_mask"] == 0] = 7  # pad ids changed: invisible behind the attention mask
    accumulate_gradients(m, [b2], causal_lm_loss)
    g2 = {k: p.grad.clone() for k, p in m.named_parameters()}
    assert max_diff(g1, g2) < 1e-6


def test_all_masked_batch_is_finite_and_no_update():
    data = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE] * 4} for _ in range(4)]
    m = tiny()
    before = weights(m)
    r = train(m, data, collate, causal_lm_loss, TrainConfig(batch_size=2, max_steps=2, lr=1e-2, quiet=True))
    assert r.losses == [0.0, 0.0] and all(math.isfinite(x) for x in r.losses)
    after = weights(m)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit: no weight decay, no step
    # an all-masked micro-batch inside an accumulated step contributes nothing
    good = dataset(2, seed=3)
    m1, m2 = tiny(), tiny()
    cfg = dict(batch_size=2, max_steps=1, lr=1e-3, shuffle=False, quiet=True)
    train(m1, good + data[:2], collate, causal_lm_loss, TrainConfig(grad_accum=2, **cfg))
    train(m2, good, collate, causal_lm_loss, TrainConfig(grad_accum=1, **cfg))
    assert max_diff(weights(m1), weights(m2)) < 1e-6


def test_nan_loss_stops_with_a_message_before_updating():
    m = tiny()
    before = weights(m)

    def bad_loss(model, batch):
        loss, n = causal_lm_loss(model, batch)
        return loss * float("nan"), n

    with pytest.raises(NonFiniteLossError, match=r"step 0 .*loss is nan"):
        train(m, dataset(4), collate, bad_loss, TrainConfig(batch_size=2, max_steps=3, quiet=True))
    assert all(torch.equal(before[k], v) for k, v in weights(m).items())


def test_bf16_autocast_on_cpu_close_to_fp32():
    m = tiny()
    b = collate(dataset(4, seed=4))
    with torch.no_grad():
        l32, n = causal_lm_loss(m, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(b["input_ids"], attention_mask=b["attention_mask"])
            l16, n16 = causal_lm_loss(m, b)
    assert logits.dtype == torch.bfloat16  # the autocast path really ran
    assert float(l16 / n16) == pytest.approx(float(l32 / n), rel=2e-2)  # bf16 has 8 bits of mantissa
    ma, mb = tiny(), tiny()
    cfg = dict(batch_size=4, max_steps=3, lr=1e-3, shuffle=False, quiet=True)
    ra = train(ma, dataset(12), collate, causal_lm_loss, TrainConfig(precision="bf16", **cfg))
    rb = train(mb, dataset(12), collate, causal_lm_loss, TrainConfig(precision="fp32", **cfg))
    assert ra.losses == pytest.approx(rb.losses, rel=2e-2)
    assert 0 < max_diff(weights(ma), weights(mb)) < 1e-2  # different rounding, same direction


def test_fp16_with_grad_scaler_runs_on_cpu():
    m = tiny()
    cfg = dict(batch_size=4, max_steps=2, lr=1e-3, shuffle=False, quiet=True)
    r16 = train(m, dataset(8), collate, causal_lm_loss, TrainConfig(precision="fp16", **cfg))
    r32 = train(tiny(), dataset(8), collate, causal_lm_loss, TrainConfig(precision="fp32", **cfg))
    assert r16.losses[0] == pytest.approx(r32.losses[0], rel=1e-2)  # fp16: ~3 decimal digits


def test_weight_decay_only_on_matrices():
    m = tiny()
    opt = make_optimizer(m, TrainConfig(weight_decay=0.1))
    names = {id(p): n for n, p in m.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert "transformer.wte.weight" in decay and "transformer.h.0.attn.c_attn.weight" in decay
    assert "transformer.h.0.ln_1.weight" in no_decay and "transformer.h.0.attn.c_attn.bias" in no_decay
    assert all(n.endswith("bias") or ".ln_" in n for n in no_decay)
    assert len(decay) + len(no_decay) == len(list(m.parameters()))  # tied lm_head counted once


def test_schedule_values():
    assert [lr_factor(s, 2, 10, "linear") for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert lr_factor(2, 2, 10, "cosine") == 1.0
    assert lr_factor(6, 2, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 2, 10, "cosine") == pytest.approx(0.0, abs=1e-12)


@pytest.mark.reference
def test_schedule_matches_transformers():
    transformers = pytest.importorskip("transformers")
    for kind, fn in (("linear", transformers.get_linear_schedule_with_warmup),
                     ("cosine", transformers.get_cosine_schedule_with_warmup)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = fn(opt, num_warmup_steps=3, num_training_steps=17)
        for s in range(17):
            assert lr_factor(s, 3, 17, kind) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), (kind, s)
            opt.step()
            sched.step()


def test_progress_line_and_metrics_jsonl(tmp_path, capsys):
    m = tiny()
    cfg = TrainConfig(batch_size=4, max_steps=4, log_every=2, out_dir=str(tmp_path), eval_every=2, warmup_steps=1)
    train(m, dataset(8), collate, causal_lm_loss, cfg, eval_fn=lambda model: {"answer": 42.0})
    err = capsys.readouterr().err
    assert "step 2/4 | epoch 0 | loss " in err and "step 4/4 | epoch 1 | loss " in err and " tok/s | ETA 0:00:" in err and "lr 1.00e-04" not in err
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 4]
    # warmup 1 (update 0 at lr 0), then linear over updates 1..3: 1, 2/3, 1/3 of 5e-5
    assert steps[0]["lr"] == 0.0 and steps[1]["lr"] == 5e-5 and steps[2]["lr"] == pytest.approx(5e-5 / 3)
    evals = [r for r in rows if "eval_answer" in r]
    assert [r["step"] for r in evals] == [2, 4] and evals[0]["eval_answer"] == 42.0


from hypothesis import given, settings
from hypothesis import strategies as st


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(2, 7), st.integers(0, 10_000), st.integers(1, 4))
def test_token_normalized_split_equals_whole(B, T, seed, k):
    """For any split of a batch into micro-batches: Σ ∇loss_sum / Σ n == ∇ of the token mean of the whole."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.4] = IGNORE
    whole, n_whole = lm_loss_sum(logits, labels)
    if n_whole == 0:
        assert whole.item() == 0.0  # all masked: a finite zero, not NaN
        return
    (g_whole,) = torch.autograd.grad(whole / n_whole, logits)
    total, count = 0, 0
    for idx in torch.arange(B).chunk(k):
        s, n = lm_loss_sum(logits[idx], labels[idx])
        total, count = total + s, count + n
    (g_split,) = torch.autograd.grad(total / count, logits)
    torch.testing.assert_close(g_split, g_whole, rtol=0, atol=1e-12)  # float64
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1),
                                            ignore_index=IGNORE, reduction="mean")
    assert (whole / n_whole).item() == pytest.approx(ref.item(), rel=1e-12)  # = torch's mean over real tokens


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 20), st.integers(1, 200), st.sampled_from(["linear", "cosine", "constant"]))
def test_schedule_properties(warmup, total, kind):
    total = max(total, warmup + 1)
    f = [lr_factor(s, warmup, total, kind) for s in range(total + 1)]
    assert all(0.0 <= x <= 1.0 for x in f)
    assert f[:warmup] == sorted(f[:warmup])                       # warmup rises
    assert all(a >= b - 1e-12 for a, b in zip(f[warmup:], f[warmup + 1:]))  # then never rises
    if warmup:
        assert f[0] == 0.0
    assert f[warmup] == 1.0
