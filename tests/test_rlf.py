"""The book's ch. 9 loop: the classifier reward, PPO on an encoder-decoder (against trl 0.11's seq2seq path,
live, and end to end on a tiny T5), and the rlf demo through the CLI (--tiny)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minillm.models.t5 import T5Config, T5ForConditionalGeneration
from minillm.rlhf.classifier_reward import ClassifierReward, label_index, load_classifier_reward, parse_spec
from minillm.rlhf.ppo import PPOConfig, PPOTrainer, PolicyWithValueHead

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
CLF = str(ROOT / "weights" / "tiny-roberta-classifier")  # labels negative / neutral / positive


# ---------------- the classifier reward ----------------
def test_labels_by_name_default_name_or_index():
    cfg = SimpleNamespace(num_labels=3, id2label={"0": "negative", "1": "neutral", "2": "positive"})
    assert label_index(cfg, "neutral") == label_index(cfg, "LABEL_1") == label_index(cfg, "1") == label_index(cfg, 1) == 1
    with pytest.raises(ValueError, match="not one of"):
        label_index(cfg, "angry")
    with pytest.raises(ValueError, match="3 labels"):
        label_index(cfg, "LABEL_3")
    assert parse_spec("C:/x/y:LABEL_1:0.5") == ("C:/x/y", "LABEL_1", 0.5)
    with pytest.raises(ValueError, match="DIR:LABEL:WEIGHT"):
        parse_spec("dir:0.5")


def test_reward_is_the_weighted_sum_of_chosen_logits():
    from minillm.models.auto import load_model
    from minillm.tokenizer import Tokenizer
    r = load_classifier_reward([f"{CLF}:neutral:0.5", f"{CLF}:LABEL_2:-1"], batch_size=2, strip=["</s>"])
    model, tok = load_model(CLF, "classifier").eval(), Tokenizer.from_pretrained(CLF)
    texts = ["the food was okay .", "great", "the staff was awful and rude ."]
    with torch.no_grad():
        want = torch.stack([model(**{k: v for k, v in tok([t]).items()})[0] for t in texts])  # (3, 3), one at a time
    got = r(["ignored"] * 3, [t + " </s>" for t in texts])  # the EOS text is stripped before scoring
    assert got.shape == (3,) and got.dtype == torch.float32
    assert torch.allclose(got, 0.5 * want[:, 1] - want[:, 2], atol=1e-5)
    s = r.scores(texts)
    assert torch.allclose(s["0:neutral"], want[:, 1], atol=1e-5) and torch.allclose(s["reward"], got, atol=1e-5)
    with pytest.raises(ValueError, match="not one of"):
        ClassifierReward([(model, tok, "LABEL_X", 1.0)])


# ---------------- PPO on an encoder-decoder ----------------
class _Tok:
    """Stand-in tokenizer over ids 0..9: 0 pad (= T5's decoder start), 1 eos; text is the ids joined by spaces."""
    eos_token_id, pad_token_id = 1, 0

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def _tiny_t5(seed=0):
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(vocab_size=10, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                               dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                               tie_word_embeddings=False))


def _prompts(B=32):
    ids = torch.randint(2, 10, (B, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[::3, :2] = 0  # some left padding
    return ids.masked_fill(mask == 0, 0), mask


@torch.no_grad()
def _first_token_prob(lm, ids, mask, token):
    start = torch.zeros(ids.shape[0], 1, dtype=torch.long)
    return torch.softmax(lm(ids, attention_mask=mask, decoder_input_ids=start)[:, -1], -1)[:, token].mean().item()


def test_seq2seq_ppo_moves_the_policy_toward_the_reward():
    # reward = share of '7' tokens in the response: the probability of a 7 must rise within a few steps
    lm = _tiny_t5()
    score = lambda p, r: torch.tensor([x.split().count("7") / max(1, len(x.split())) for x in r])  # noqa: E731
    cfg = PPOConfig(lr=3e-3, batch_size=32, mini_batch_size=16, ppo_epochs=2, max_new_tokens=6, init_kl_coef=0.01)
    tr = PPOTrainer(PolicyWithValueHead(lm), _Tok(), score, cfg, generator=torch.Generator().manual_seed(0))
    ids, mask = _prompts()
    p0 = _first_token_prob(lm, ids, mask, 7)
    ro = tr.rollout(ids, mask)
    assert ro.prompt_len == 1 and bool((ro.sequences[:, 0] == 0).all())  # [decoder_start | response]
    assert torch.equal(ro.prompts[0], ids)  # the prompts are the encoder's input
    first = tr.train_on(ro, score(None, tr.decode(ro)[1]))
    assert first["kl"] == pytest.approx(0.0, abs=1e-5) and first["ratio"] == pytest.approx(1.0, abs=0.05)
    for _ in range(10):
        last = tr.step(ids, mask)
    assert _first_token_prob(lm, ids, mask, 7) > p0 + 0.2, (p0, _first_token_prob(lm, ids, mask, 7))
    assert last["score"] > first["score"] + 0.2 and last["kl"] > 0


def test_seq2seq_lora_policy_reference_is_the_base_with_adapters_off():
    from minillm.lora import apply_lora
    lm = _tiny_t5()
    base = _tiny_t5()  # same seed: the weights before LoRA
    apply_lora(lm, ["q", "v"], r=4, alpha=8)
    for name, p in lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    tr = PPOTrainer(PolicyWithValueHead(lm), _Tok(), lambda p, r: torch.zeros(len(r)), PPOConfig(batch_size=8, mini_batch_size=8),
                    generator=torch.Generator().manual_seed(0))
    assert tr.ref_model is None
    ro = tr.rollout(*_prompts(8))
    with torch.no_grad():
        want = base(**tr.rollout_inputs(ro))[:, :-1]
    lp_ref = torch.log_softmax(want, -1).gather(-1, ro.responses.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(ro.ref_logprobs * ro.response_mask, lp_ref * ro.response_mask, atol=1e-5)
    assert ((ro.logprobs - ro.ref_logprobs) * ro.response_mask).sum(-1).mean() > 0.01


@pytest.mark.reference
def test_seq2seq_forward_pass_equals_trl():
    """logprobs of the generated decoder tokens and values on the decoder's last hidden states, as trl 0.11's
    AutoModelForSeq2SeqLMWithValueHead + PPOTrainer.batched_forward_pass compute them (live, same weights).
    trl's seq2seq mask starts at index 1 ("start = 1"), dropping the first generated token from the loss and
    the KL; minillm keeps it (index 0 scores response token 0, as the decoder-only path does)."""
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    from trl.trainer.ppo_trainer import PPOTrainer as TRLPPOTrainer
    name = str(ROOT / "weights" / "tiny-flan-t5")
    lm = T5ForConditionalGeneration.from_pretrained(name)
    policy = PolicyWithValueHead(lm)
    tr = PPOTrainer(policy, SimpleNamespace(eos_token_id=1, pad_token_id=0), lambda p, r: torch.zeros(len(r)),
                    PPOConfig(batch_size=6, mini_batch_size=6, max_new_tokens=8), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, lm.config.vocab_size, (6, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[:2, 5:] = 0  # trl's collator pads on the right
    ids = ids.masked_fill(mask == 0, 0)
    ro = tr.rollout(ids, mask)

    hf = trl.AutoModelForSeq2SeqLMWithValueHead(transformers.T5ForConditionalGeneration.from_pretrained(name).eval())
    hf.is_peft_model = False  # set by trl's from_pretrained, which we bypass to keep the same weights
    hf.v_head.summary.load_state_dict(policy.v_head.summary.state_dict())
    # trl's responses: each generation (decoder_start … first EOS), right-padded; its decoder mask = real tokens
    dec_mask = ro.attention_mask
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ro.sequences.masked_fill(dec_mask == 0, 0),
              "decoder_attention_mask": dec_mask}
    fake = SimpleNamespace(config=SimpleNamespace(mini_batch_size=6), is_encoder_decoder=True)
    with torch.no_grad():
        lp, _, values, masks = TRLPPOTrainer.batched_forward_pass.__wrapped__(
            fake, hf, list(ids), [s[m.bool()] for s, m in zip(ro.sequences, dec_mask)], inputs)
    R = ro.responses.shape[1]
    m = ro.response_mask.float()
    assert torch.allclose(lp[:, :R] * m, ro.logprobs * m, atol=1e-4)
    assert torch.allclose(values[:, :R] * m, ro.values * m, atol=1e-4)
    trl_mask = m.clone()
    trl_mask[:, 0] = 0  # trl's start = 1
    assert torch.equal(masks[:, :R].float(), trl_mask)


# ---------------- the demo, through the CLI ----------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from minillm.cli import main
    out = tmp_path_factory.mktemp("runs") / "rlf"
    assert main(["rlf-demo", "--tiny", "--out", str(out), "--kl-coef", "0.1"]) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_tiny_rlf_demo_writes_its_files_and_numbers(tiny_run):
    d, s = tiny_run
    for f in ("metrics.jsonl", "report.md", "summary.json", "sft/model.safetensors", "policy/config.json"):
        assert (d / f).is_file(), f
    assert s["config"]["ppo"]["init_kl_coef"] == 0.1
    for k in ("sft", "ppo"):
        assert s[k]["n_items"] == 200
        for n in ("reward", "grammar", "sentiment", "kl"):
            assert set(s[k][n]) == {"mean", "median"}, (k, n)
        assert {"rouge1", "rouge2", "rougeL"} <= set(s[k]["rouge"])
    assert s["sft"]["kl"]["mean"] == 0.0  # the SFT policy is its own reference
    # the reward is the book's: 1 × grammar + 0.5 × sentiment logits, on every held-out item
    assert s["sft"]["reward"]["mean"] == pytest.approx(s["sft"]["grammar"]["mean"] + 0.5 * s["sft"]["sentiment"]["mean"],
                                                       abs=1e-4)
    assert s["classifiers"]["grammar"]["label_name"] == "acceptable"
    assert s["classifiers"]["sentiment"]["label_name"] == "neutral"
    rows = [json.loads(line) for line in open(d / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["phase"] == "ppo"] == [1, 2, 3]
    assert any("ETA" in r["msg"] for r in rows if r["phase"] == "ppo")
    report = (d / "report.md").read_text()
    for part in ("Samples before", "Samples after", "combined reward", "ROUGE-L", "| step | reward | KL |"):
        assert part in report, part
