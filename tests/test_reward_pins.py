"""Reward model pins (issue #13): rlhf/reward.py is mapped to this file alone (test_reward.py takes ~70 s),
so it covers the whole file directly and fast: the margin loss and accuracy by hand, rankings -> pairs,
the head and its pooling, save/load, score_texts' batching and truncation, RewardScorer's normaliser and
eval mode, the training loss_fn, the length check, and train_reward_model's logged records (epoch loss,
train accuracy over the first 1000 pairs), its defaults, quiet mode, progress lines and final eval mode.
Expected values are computed by hand with `math` or by scoring one text at a time."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from minillm.data.preference import join_text
from minillm.data.readers import DataError
from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
from minillm.rlhf.reward import (RewardModel, RewardScorer, check_pair_lengths, pairwise_accuracy,
                                 pairwise_margin_loss, rankings_to_pairs, reward_loss_fn, score_texts,
                                 train_reward_model)

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "a b c d e f g h i j".split()


@pytest.fixture(scope="module")
def tok():
    from minillm.demos.rlhf_demo import build_tokenizer
    return build_tokenizer([" ".join(WORDS)])  # 4 specials + 10 words


def _nll(z):  # -log sigmoid(z)
    return math.log1p(math.exp(-z))


def _gpt2(seed=0, n_positions=16, pdrop=0.0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=n_positions,
                                      resid_pdrop=pdrop, embd_pdrop=pdrop, attn_pdrop=pdrop))


class _Encoder(nn.Module):
    """An encoder stand-in: (ids, mask) -> (B, T, H) token embeddings; `unused` gets a zero gradient."""

    def __init__(self, H=4, seed=0, scale=1.0, max_positions=None):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(16, H)
        with torch.no_grad():
            self.emb.weight.mul_(scale)
        self.unused = nn.Parameter(torch.ones(H))
        if max_positions:
            self.config = SimpleNamespace(max_position_embeddings=max_positions)

    def forward(self, input_ids, attention_mask=None):
        return self.emb(input_ids) + 0 * self.unused


def _reward_one(rm, tok, prompt, response):
    """The reward of one text, unpadded, no batching."""
    with torch.no_grad():
        return rm(torch.tensor([tok.encode(join_text(prompt, response))])).item()


# ---------------- the margin loss and accuracy ----------------
def test_margin_loss_by_hand():
    rc, rr = torch.tensor([0.87, 0.1]), torch.tensor([0.34, 0.5])
    want_plain = (_nll(0.87 - 0.34) + _nll(0.1 - 0.5)) / 2
    assert pairwise_margin_loss(rc, rr).item() == pytest.approx(want_plain, rel=1e-6)
    m = torch.tensor([1.0, -2.0])
    want_margin = (_nll(0.87 - 0.34 - 1.0) + _nll(0.1 - 0.5 + 2.0)) / 2
    assert pairwise_margin_loss(rc, rr, m).item() == pytest.approx(want_margin, rel=1e-6)
    # the book's worked numbers: -log s(0.87 - 0.34) = 0.4629, margin 1: 0.9555
    assert pairwise_margin_loss(torch.tensor([0.87]), torch.tensor([0.34])).item() == pytest.approx(0.4629, abs=5e-5)
    # reward centering: + c * mean((r_c + r_r)^2); the default c = 0 adds nothing
    want_c = want_margin + 0.3 * ((0.87 + 0.34) ** 2 + (0.1 + 0.5) ** 2) / 2
    assert pairwise_margin_loss(rc, rr, m, center_coef=0.3).item() == pytest.approx(want_c, rel=1e-6)
    assert pairwise_margin_loss(rc, rr, m, center_coef=0.0).item() == pairwise_margin_loss(rc, rr, m).item()


def test_margin_loss_accepts_lists_and_checks_input():
    # plain Python numbers work (the lists become tensors), the margin too
    got = pairwise_margin_loss([0.87, 0.1], [0.34, 0.5], [1.0, -2.0])
    assert got.item() == pytest.approx((_nll(0.87 - 0.34 - 1.0) + _nll(0.1 - 0.5 + 2.0)) / 2, rel=1e-6)
    assert pairwise_margin_loss([2.0], [1.0]).item() == pytest.approx(_nll(1.0), rel=1e-6)
    with pytest.raises(ValueError, match="must match"):
        pairwise_margin_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="no pairs"):
        pairwise_margin_loss(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="margin has shape"):
        pairwise_margin_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2))
    for bad in ((torch.tensor([math.nan]), torch.zeros(1), None), (torch.zeros(1), torch.tensor([math.inf]), None),
                (torch.zeros(1), torch.zeros(1), torch.tensor([math.nan]))):
        with pytest.raises(ValueError, match="NaN or Inf"):
            pairwise_margin_loss(*bad)


def test_pairwise_accuracy_ties_are_wrong():
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 0.0, 5.0]), torch.tensor([0.0, 3.0, 0.0, 1.0])) == 0.5
    assert pairwise_accuracy(torch.tensor([1.0]), torch.tensor([1.0])) == 0.0
    with pytest.raises(ValueError, match="must match"):
        pairwise_accuracy(torch.zeros(3), torch.zeros(2))


# ---------------- rankings -> pairs ----------------
def test_rankings_to_pairs():
    assert rankings_to_pairs(["a", "b", "c"]) == [("a", "b", 0.0), ("a", "c", 0.0), ("b", "c", 0.0)]
    assert rankings_to_pairs(r for r in "ab") == [("a", "b", 0.0)]  # any iterable of responses
    pairs = rankings_to_pairs(("x", "y", "z"), scores=[2, 9, 5])
    assert pairs == [("y", "z", 4.0), ("y", "x", 7.0), ("z", "x", 3.0)]
    assert all(type(m) is float for *_, m in pairs)  # margins are floats whatever the scores' type
    assert rankings_to_pairs(["x", "y", "z"], scores=[5, 5, 1]) == [("x", "z", 4.0), ("y", "z", 4.0)]  # no tie pair
    assert len(rankings_to_pairs(list("abcd"), scores=[1, 2, 3, 4])) == 6
    with pytest.raises(ValueError, match="NaN or infinite"):
        rankings_to_pairs(["a", "b"], [1.0, math.nan])
    with pytest.raises(ValueError, match="NaN or infinite"):
        rankings_to_pairs(["a", "b"], [math.inf, 1.0])
    with pytest.raises(ValueError, match="2 responses but 3 scores"):
        rankings_to_pairs(["a", "b"], [1, 2, 3])


# ---------------- the model ----------------
def test_reward_is_the_head_on_the_last_real_token():
    rm = RewardModel(_gpt2(), 8).eval()
    assert RewardModel(_gpt2(), 8).pool == "last"  # the default
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        r = rm(ids, mask)
        assert r.shape == (2,)
        want = [rm.score.weight[0] @ rm.backbone.transformer(ids[i:i + 1, :n])[0, -1] for i, n in ((0, 4), (1, 3))]
        assert r.tolist() == pytest.approx([w.item() for w in want], abs=1e-5)
        # no mask: every token is real, the same as an all-ones mask, the same through hidden_states
        assert torch.equal(rm(ids[:1]), rm(ids[:1], torch.ones(1, 4, dtype=torch.long)))
        assert torch.equal(rm.hidden_states(ids), rm.hidden_states(ids, torch.ones_like(ids)))
        assert rm(ids[:1]).shape == (1,)


def test_first_pool_on_an_encoder_and_bad_pool():
    enc = _Encoder()
    rm = RewardModel(enc, 4, pool="first")
    ids = torch.tensor([[3, 4, 5], [6, 4, 5]])
    with torch.no_grad():
        want = [(rm.score.weight[0] @ enc.emb.weight[i]).item() for i in (3, 6)]
        assert rm(ids).tolist() == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="pool"):
        RewardModel(enc, 4, pool="mean")


def test_head_init_is_normal_with_std_one_over_sqrt_h_plus_one():
    # rewards start O(1) whatever the width: N(0, 1/(H+1)) weights (as trl's value head)
    w = torch.cat([RewardModel(nn.Identity(), 3).score.weight.flatten() for _ in range(3000)])
    assert w.std().item() == pytest.approx(0.5, rel=0.03)  # 1/sqrt(3+1)
    assert abs(w.mean().item()) < 0.03
    w1 = torch.cat([RewardModel(nn.Identity(), 1).score.weight.flatten() for _ in range(6000)])
    assert w1.std().item() == pytest.approx(1 / math.sqrt(2), rel=0.03)


def test_save_load_round_trip(tmp_path):
    from minillm.hub import CheckpointError
    rm = RewardModel(_gpt2(), 8, pool="first").eval()
    ids = torch.tensor([[3, 4, 5], [3, 9, 9]])
    with torch.no_grad():
        r = rm(ids)
    d = rm.save_pretrained(tmp_path / "rm")
    assert d == tmp_path / "rm"
    cfg = json.loads((d / "reward_config.json").read_text())
    assert cfg["pool"] == "first" and cfg["hidden_size"] == 8
    back = RewardModel.from_pretrained(d).eval()
    assert back.pool == "first" and isinstance(back.backbone, GPT2LMHeadModel)
    with torch.no_grad():
        assert torch.equal(back(ids), r)
    with pytest.raises(CheckpointError, match="reward_config.json"):
        RewardModel.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="save_pretrained"):
        RewardModel(_Encoder(), 4).save_pretrained(tmp_path / "x")


# ---------------- scoring texts ----------------
class _Recording:
    """Wraps a tokenizer, recording how many texts each call encodes."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def __call__(self, texts, **kw):
        self.sizes.append(len(texts))
        return self.tok(texts, **kw)


def test_score_texts_batches_and_truncation(tok):
    rm = RewardModel(_gpt2(), 8).eval()
    prompts = ["a b", "c", "d e f", "g", "h i"]
    responses = ["c d", "e f g h", "a", "b c", "j"]
    rec = _Recording(tok)
    with torch.no_grad():
        got = score_texts(rm, rec, prompts, responses, batch_size=2)
    assert rec.sizes == [2, 2, 1]
    want = [_reward_one(rm, tok, p, r) for p, r in zip(prompts, responses)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    # by default 64 texts per batch, no truncation
    rec = _Recording(tok)
    with torch.no_grad():
        got = score_texts(rm, rec, ["a"] * 130, ["b c d e f g h i j"] * 130)
    assert rec.sizes == [64, 64, 2]
    assert got.tolist() == pytest.approx([_reward_one(rm, tok, "a", "b c d e f g h i j")] * 130, abs=1e-5)
    # max_length truncates: "a b c d e" read as its first 3 tokens
    with torch.no_grad():
        cut = score_texts(rm, tok, ["a b"], ["c d e"], max_length=3)
    assert cut.item() == pytest.approx(_reward_one(rm, tok, "a b", "c"), abs=1e-5)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_texts(rm, tok, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match=r"response\(s\) \[1\] are empty"):
        score_texts(rm, tok, ["a", "b"], ["c", "  "])


def test_scorer_normalises_in_eval_mode(tok):
    rm = RewardModel(_gpt2(pdrop=0.5), 8).train()  # dropout on: the scorer must switch it off
    with torch.no_grad():
        raw = [_reward_one(rm.eval(), tok, p, r) for p, r in (("a", "b c"), ("d", "e"))]
    rm.train()
    s = RewardScorer(rm, tok)  # defaults: mean 0, std 1 -> the raw reward, untruncated
    got = s(["a", "d"], ["b c", "e"])
    assert not rm.training
    assert got.tolist() == pytest.approx(raw, abs=1e-5)
    rm.train()
    assert torch.equal(s(["a", "d"], ["b c", "e"]), got)
    norm = RewardScorer(rm, tok, mean=0.3, std=2.0)
    assert norm(["a", "d"], ["b c", "e"]).tolist() == pytest.approx([(r - 0.3) / 2.0 for r in raw], abs=1e-5)
    assert norm.raw(["a"], ["b c"]).tolist() == pytest.approx(raw[:1], abs=1e-5)
    long = RewardScorer(rm, tok)(["a"], ["b c d e f g h i j"])  # no max_length by default: all 10 tokens read
    assert long.item() == pytest.approx(_reward_one(rm, tok, "a", "b c d e f g h i j"), abs=1e-5)
    assert RewardScorer(rm, tok, max_length=2)(["a"], ["b c d"]).item() == pytest.approx(
        _reward_one(rm, tok, "a", "b"), abs=1e-5)
    RewardScorer(rm, tok, std=0.5)  # any std > 0
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="std must be > 0"):
            RewardScorer(rm, tok, std=bad)


# ---------------- training ----------------
def _batch(tok, pairs):
    from minillm.data.preference import RewardPairCollator
    return RewardPairCollator(tok)(pairs)


PAIRS = [{"prompt": "a b", "chosen": "c d", "rejected": "e", "margin": 1.0},
         {"prompt": "f", "chosen": "g h i", "rejected": "j a", "margin": 0.5},
         {"prompt": "b c", "chosen": "d", "rejected": "f g", "margin": 2.0}]


def _loss_by_hand(rm, tok, pairs, use_margin=True):
    zs = [_reward_one(rm, tok, d["prompt"], d["chosen"]) - _reward_one(rm, tok, d["prompt"], d["rejected"])
          - (d["margin"] if use_margin else 0.0) for d in pairs]
    return sum(_nll(z) for z in zs) / len(zs)


def _acc_by_hand(rm, tok, pairs):
    return sum(_reward_one(rm, tok, d["prompt"], d["chosen"]) > _reward_one(rm, tok, d["prompt"], d["rejected"])
               for d in pairs) / len(pairs)


def test_reward_loss_fn_is_the_summed_margin_loss(tok):
    rm = RewardModel(_gpt2(), 8).eval()
    b = _batch(tok, PAIRS)
    loss, n = reward_loss_fn()(rm, b)  # defaults: margin used, no centering
    assert n == 3
    assert loss.item() == pytest.approx(3 * _loss_by_hand(rm, tok, PAIRS), rel=1e-5)
    loss, n = reward_loss_fn(use_margin=False)(rm, b)
    assert loss.item() == pytest.approx(3 * _loss_by_hand(rm, tok, PAIRS, use_margin=False), rel=1e-5)
    with torch.no_grad():
        rc, rr = rm(b["chosen_ids"], b["chosen_mask"]), rm(b["rejected_ids"], b["rejected_mask"])
    loss, _ = reward_loss_fn(center_coef=0.5)(rm, b)
    centre = 0.5 * sum((c + r) ** 2 for c, r in zip(rc.tolist(), rr.tolist())) / 3
    assert loss.item() == pytest.approx(3 * (_loss_by_hand(rm, tok, PAIRS) + centre), rel=1e-5)


def test_check_pair_lengths(tok):
    rm = RewardModel(_gpt2(n_positions=4), 8)
    fits = [{"prompt": "a b", "chosen": "c d", "rejected": "e"}]  # 4 and 3 tokens: exactly the 4 positions
    check_pair_lengths(rm, tok, fits, None)
    long = fits + [{"prompt": "a b", "chosen": "c", "rejected": "d e f", "_where": "p.jsonl:7"}]
    with pytest.raises(DataError, match=r"p.jsonl:7: prompt \+ rejected is 5 tokens, more than the model's 4"):
        check_pair_lengths(rm, tok, long, None)
    with pytest.raises(DataError, match="pair 0: prompt"):
        check_pair_lengths(rm, tok, [{"prompt": "a b c", "chosen": "d e", "rejected": "f"}], None)
    # an encoder's max_position_embeddings counts too
    enc_rm = RewardModel(_Encoder(max_positions=3), 4)
    check_pair_lengths(enc_rm, tok, [{"prompt": "a", "chosen": "b c", "rejected": "d"}], None)
    with pytest.raises(DataError, match="more than the model's 3"):
        check_pair_lengths(enc_rm, tok, [{"prompt": "a b", "chosen": "b c", "rejected": "d"}], None)
    # no positions limit known: nothing to check
    check_pair_lengths(RewardModel(_Encoder(), 4), tok, long, None)
    # with max_length the texts are truncated: only max_length itself is checked
    check_pair_lengths(rm, tok, long, 1)
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="max_length must be a positive integer"):
            check_pair_lengths(rm, tok, long, bad)


def test_train_logs_epoch_loss_and_accuracy_and_ends_in_eval_mode(tok):
    rm = RewardModel(_gpt2(), 8)
    pairs = PAIRS * 2
    expected = [{"loss": _loss_by_hand(rm.eval(), tok, pairs), "epoch": 1}]  # epoch 1 sees the untrained model
    logged = []

    def log(rec):
        logged.append(dict(rec))
        # the model now is the one the next epoch's single batch is computed with
        expected[-1].update(train_acc=_acc_by_hand(rm, tok, pairs))
        expected.append({"loss": _loss_by_hand(rm, tok, pairs), "epoch": len(expected) + 1})

    last = train_reward_model(rm, tok, pairs, epochs=2, batch_size=len(pairs), lr=0.05, log=log)
    assert [r["epoch"] for r in logged] == [1, 2]
    for got, want in zip(logged, expected):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["train_acc"] == pytest.approx(want["train_acc"], abs=1e-6)
        assert got["eval_acc"] is None
    assert logged[0]["loss"] != pytest.approx(logged[1]["loss"], rel=1e-3)  # the model did move
    assert last == logged[-1]
    assert not rm.training
    # eval pairs: their accuracy is logged, and they are length-checked too
    eval_pairs = [{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 0.0}]
    logged.clear()
    rm2 = RewardModel(_gpt2(), 8)
    last = train_reward_model(rm2, tok, PAIRS, eval_pairs=eval_pairs, log=lambda r: logged.append(dict(r)))
    assert len(logged) == 1 and last == logged[0]  # one epoch by default
    assert last["eval_acc"] == pytest.approx(_acc_by_hand(rm2, tok, eval_pairs), abs=1e-6)
    with pytest.raises(DataError):
        train_reward_model(RewardModel(_gpt2(n_positions=4), 8), tok, PAIRS[:1],
                           eval_pairs=[{"prompt": "a b c", "chosen": "d e", "rejected": "f"}])
    with pytest.raises(ValueError, match="no training pairs"):
        train_reward_model(rm2, tok, [])


def test_train_acc_reads_the_first_1000_pairs(tok):
    rm = RewardModel(_Encoder(H=4, seed=3), 4)
    pairs = [{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 0.0}] * 1000 + \
            [{"prompt": "a", "chosen": "c", "rejected": "b", "margin": 0.0}]
    want = _acc_by_hand(rm.eval(), tok, pairs[:1000])  # 0 or 1; over all 1001 it would be 1/1001 or 1000/1001
    last = train_reward_model(rm, tok, pairs, batch_size=2048, lr=1e-12)
    assert last["train_acc"] == pytest.approx(want, abs=1e-7)


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def _train_stub(tok, pairs, progress=None, **kw):
    rm = RewardModel(_Encoder(H=8, seed=1, scale=0.3), 8)
    torch.manual_seed(0)
    nn.init.normal_(rm.score.weight, std=0.3)
    steps = []
    rec = train_reward_model(rm, tok, pairs, progress=progress or (lambda phase, msg="", **r: steps.append(r)), **kw)
    return rm, rec, [s for s in steps if "count" in s]  # the step lines, not the eval rows


STUB_PAIRS = [{"prompt": WORDS[i % 10], "chosen": WORDS[(3 * i + 1) % 10], "rejected": WORDS[(7 * i + 2) % 10],
               "margin": float(i % 7)} for i in range(40)]


def test_train_defaults(tok):
    # the defaults (1 epoch, batch 32, lr 1e-5, seed 0, clip 1.0, margin on, no centering, no weight decay)
    rm_d, rec_d, steps = _train_stub(tok, STUB_PAIRS)
    assert len(steps) == 2  # 40 pairs, batch 32: 2 steps
    rm_e, rec_e, _ = _train_stub(tok, STUB_PAIRS, epochs=1, batch_size=32, lr=1e-5, seed=0, grad_clip=1.0,
                                 use_margin=True, center_coef=0.0)
    assert rec_d == rec_e and all(torch.equal(a, b) for a, b in zip(_params(rm_d), _params(rm_e)))
    assert torch.equal(rm_d.backbone.unused, torch.ones(8))  # zero gradient and no weight decay: untouched
    # and each of those settings does change the run
    for kw in (dict(batch_size=33), dict(lr=1.5e-5), dict(seed=1), dict(use_margin=False), dict(center_coef=1.0)):
        rm_x, _, _ = _train_stub(tok, STUB_PAIRS, **kw)
        assert not all(torch.equal(a, b) for a, b in zip(_params(rm_d), _params(rm_x))), kw


def test_train_gradient_clipping(tok):
    # batch 1: gradient norms vary from step to step, some above 1, so the clip changes AdamW's steps
    _, _, steps = _train_stub(tok, STUB_PAIRS, batch_size=1, lr=1e-3)
    norms = [s["grad_norm"] for s in steps]
    assert any(1.0 < n < 1.5 for n in norms) and max(norms) > 1.5 and min(norms) < 1.0, norms
    run = lambda **c: _params(_train_stub(tok, STUB_PAIRS, batch_size=1, lr=1e-3, **c)[0])  # noqa: E731
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    default, one = run(), run(grad_clip=1.0)
    assert same(default, one)  # the default clips at 1.0
    assert not same(one, run(grad_clip=1.5))
    assert not same(one, run(grad_clip=0))  # 0: no clipping


def test_train_progress_lines_and_quiet(tok, capsys):
    # about 20 step lines whatever the run's length: every max(1, steps // 20) steps, plus the first
    _, _, steps = _train_stub(tok, STUB_PAIRS[:20], epochs=2, batch_size=1, lr=1e-3)
    assert [s["step"] for s in steps] == [1] + list(range(2, 41, 2))
    _, _, steps = _train_stub(tok, STUB_PAIRS[:5], epochs=1, batch_size=1, lr=1e-3)
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    capsys.readouterr()
    rm = RewardModel(_Encoder(), 4)
    train_reward_model(rm, tok, STUB_PAIRS[:4], lr=1e-3)  # no progress: quiet
    assert capsys.readouterr().out == ""


def test_train_out_dir_metrics(tok, tmp_path):
    rm = RewardModel(_Encoder(), 4)
    rec = train_reward_model(rm, tok, STUB_PAIRS[:4], lr=1e-3, out_dir=str(tmp_path / "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    assert evals and evals[-1]["eval_loss"] == pytest.approx(rec["loss"])
    assert evals[-1]["eval_train_acc"] == rec["train_acc"]
