"""The RLHF demo: a tiny-settings run end to end (files, fields, numbers), the synthetic judge, and the
full-size run's must-reach targets (slow)."""

import json
import random

import pytest

from minillm.demos import synthetic_reviews as sr
from minillm.demos.rlhf_demo import DemoConfig, run_demo

PPO_KEYS = {"score", "kl", "kl_coef", "entropy", "clipfrac", "approxkl", "value_loss", "adv_mean", "adv_std",
            "response_length", "policy_loss"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    s = run_demo(DemoConfig.make(tiny=True, out=str(out / "t")), quiet=True)
    return out / "t", s


def test_tiny_run_writes_report_and_metrics(tiny_run):
    d, s = tiny_run
    for f in ("metrics.jsonl", "report.md", "summary.json", "pairs.jsonl", "prompts.jsonl",
              "sft/model.safetensors", "sft/tokenizer.json", "rm/score.safetensors", "policy/config.json"):
        assert (d / f).is_file(), f
    rows = [json.loads(l) for l in open(d / "metrics.jsonl")]
    ppo = [r for r in rows if r["phase"] == "ppo"]
    assert [r["step"] for r in ppo] == [1, 2, 3]
    assert all(PPO_KEYS <= set(r) for r in ppo)
    report = (d / "report.md").read_text()
    for field in ("held-out pairwise accuracy", "proxy reward", "true score", "KL to reference",
                  "Samples before", "Samples after", "| step | score (proxy) | held-out proxy | held-out true | KL |"):
        assert field in report, field
    # the true score per PPO step (held-out probe), the curve the reward-hacking story needs, is logged
    assert all(1.0 <= r["true_heldout"] <= 10.0 and "proxy_heldout" in r for r in ppo)
    assert json.loads((d / "summary.json").read_text())["ppo"]["n_prompts"] == 64


def test_tiny_run_numbers(tiny_run):
    _, s = tiny_run
    # the reward model beats chance on pairs from held-out prompts (tiny settings: 1 layer, 2 epochs)
    assert s["reward_model"]["heldout_acc"] > 0.6
    assert s["reward_model"]["n_heldout_pairs"] > 100
    # the SFT policy is its own reference: KL exactly 0; true scores lie in the judge's range
    assert s["sft"]["kl"]["mean"] == 0.0
    for k in ("sft", "ppo"):
        assert 1.0 <= s[k]["true"]["mean"] <= 10.0
    # the proxy reward is normalized on SFT samples: near 0 mean for the SFT policy (64 prompts, loose 0.5)
    assert abs(s["sft"]["proxy"]["mean"]) < 0.5


def test_true_judge_prefers_what_it_says():
    p = "review of the cheap pizza :"
    good = "the pizza was great and i loved it . [EOS]"
    assert sr.true_score(p, good) == 8.5  # 5.5 + 2 (sentiment, clipped) + 1 (on topic)
    assert sr.true_score(p, "the pizza was awful and i hated it . [EOS]") == 4.5
    assert sr.true_score(p, "the pizza was great great and i loved it . [EOS]") == 7.0  # one repeat: −1.5
    assert sr.true_score(p, "the burger was great and i loved it . [EOS]") == 6.0  # off topic: −1.5
    assert sr.true_score(p, "the pizza was great and i loved it .") == 6.5  # cut off: −2
    assert sr.true_score(p, "i would not recommend it . [EOS]") == 4.5
    scores = [sr.labeler_score(p, good, random.Random(i), noise=0.5) for i in range(50)]
    assert all(1 <= x <= 10 for x in scores) and 7 <= sum(scores) / 50 <= 10


def test_corpus_is_mixed():
    c = sr.sft_corpus(400, seed=1)
    t = [sr.true_score(p, r + " [EOS]") for p, r in c]
    assert min(t) <= 3 and max(t) >= 8  # both bad and good reviews
    assert 0.3 < sum(any(w in sr.POS_WORDS for w in r.split()) for _, r in c) / len(c) < 0.9


@pytest.mark.slow
def test_full_demo_reaches_targets(tmp_path):
    s = run_demo(DemoConfig(out=str(tmp_path)), quiet=True)
    assert s["reward_model"]["heldout_acc"] >= 0.80
    assert s["ppo"]["proxy"]["mean"] > s["sft"]["proxy"]["mean"]
    assert s["ppo"]["true"]["mean"] > s["sft"]["true"]["mean"]
    assert s["ppo"]["kl"]["mean"] <= 2 * s["kl_target"]
    assert s["elapsed_s"] < 600


@pytest.mark.slow
def test_kl0_shows_reward_hacking(tmp_path):
    s = run_demo(DemoConfig.make(out=str(tmp_path), init_kl_coef=0.0), quiet=True)
    assert s["ppo"]["proxy"]["mean"] > s["sft"]["proxy"]["mean"]
    assert s["checks"]["reward_hacking_shown"]
