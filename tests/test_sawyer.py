"""SAWYER (the book ch. 10) on a Llama: the Llama-3 chat template beside the book's ###HUMAN### format, PPO's
gradient accumulation, and the whole pipeline (QLoRA SFT -> RoBERTa reward model -> PPO) in tiny settings."""

import json

import pytest
import torch

from minillm.data.readers import DataError
from minillm.data.sft import (BOT, HUMAN, L3_EOT, LLAMA3_TOKENS, STOP, chat_format_for, encode_sft, format_chat,
                              format_llama3_chat)
from minillm.losses import IGNORE_INDEX
from minillm.tokenizer import Tokenizer

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " hi there "},
        {"role": "assistant", "content": "hello"}]


def word_tokenizer(llama3: bool) -> Tokenizer:
    """A word-level tokenizer; with llama3, Llama-3's chat tokens are special tokens of it (as in Meta's)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    specials = ["<pad>", "<unk>", "<|begin_of_text|>", "<|end_of_text|>"] + (list(LLAMA3_TOKENS) if llama3 else [])
    t = HFTokenizer(models.WordLevel(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(["be brief hi there hello system user assistant"],
                          trainer=trainers.WordLevelTrainer(special_tokens=specials))
    return Tokenizer(t, pad_token="<pad>", eos_token="<|end_of_text|>", unk_token="<unk>")


def test_llama3_template_text():
    prompt, completion = format_llama3_chat(MSGS)
    assert prompt == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
                      "<|start_header_id|>user<|end_header_id|>\n\nhi there<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert completion == "hello<|eot_id|>"
    with pytest.raises(DataError, match="last message"):
        format_llama3_chat(MSGS[:2])
    with pytest.raises(DataError, match="system"):
        format_llama3_chat([MSGS[1], MSGS[0], MSGS[2]])


def test_llama3_template_matches_transformers_chat_template():
    """The same string as Meta's Jinja template (Llama-3-Instruct's tokenizer_config.json) rendered by transformers."""
    jinja2 = pytest.importorskip("jinja2")
    template = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                "{{ content }}{% endfor %}")
    rendered = jinja2.Template(template).render(messages=MSGS, bos_token="<|begin_of_text|>")
    assert "".join(format_llama3_chat(MSGS)) == rendered


def test_chat_format_chosen_by_tokenizer():
    l3, plain = word_tokenizer(True), word_tokenizer(False)
    assert chat_format_for(l3) == "llama3" and chat_format_for(plain) == "sawyer"
    rec = [{"messages": MSGS[1:]}]
    (row,) = encode_sft(rec, l3)
    toks = [l3.id_to_token(i) for i in row["input_ids"]]
    assert toks[:3] == ["<|begin_of_text|>", "<|start_header_id|>", "user"]
    assert toks.count(L3_EOT) == 2 and toks[-1] == L3_EOT  # each chat token is one id, never split
    learned = [l3.id_to_token(i) for i, l in zip(row["input_ids"], row["labels"]) if l != IGNORE_INDEX]
    assert learned == ["hello", L3_EOT]  # the loss on the assistant reply (and its end of turn) only
    # the flag overrides the tokenizer: the book's format on the same tokenizer
    (row2,) = encode_sft(rec, l3, chat_format="sawyer")
    assert row2["input_ids"] != row["input_ids"]
    assert format_chat(MSGS[1:]) == (f"{HUMAN}  hi there \n{BOT}", f" hello{STOP}")
    with pytest.raises(ValueError, match="chat_format"):
        encode_sft(rec, l3, chat_format="chatml")


def test_ppo_gradient_accumulation_config():
    """The accumulation must divide the minibatches of a batch (the book: minibatches of 2 x 4 = batch 8)."""
    from minillm.rlhf.ppo import PPOConfig
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        PPOConfig(batch_size=16, mini_batch_size=8, gradient_accumulation_steps=4)
    assert PPOConfig(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=4).gradient_accumulation_steps == 4


@pytest.fixture(scope="module")
def sawyer_run(tmp_path_factory):
    from minillm.demos.rlhf_demo import DemoConfig, run_demo
    out = tmp_path_factory.mktemp("sawyer") / "run"
    return out, run_demo(DemoConfig.make(tiny=True, policy="llama", out=str(out)), quiet=True)


def test_tiny_sawyer_runs_end_to_end(sawyer_run):
    d, s = sawyer_run
    cfg = s["config"]
    assert cfg["policy"] == "llama" and cfg["rm_backbone"] == "roberta" and cfg["chat_format"] == "sawyer"
    assert cfg["adapters"]["quantize"] == "nf4" and cfg["adapters"]["lora_dropout"] == 0.05
    assert cfg["adapters"]["lora_alpha"] / cfg["adapters"]["lora_r"] == 32 / 128  # the book's alpha / r
    assert cfg["ppo"]["mini_batch_size"] == 8 and cfg["ppo"]["gradient_accumulation_steps"] == 4
    assert cfg["ppo"]["ppo_epochs"] == 2
    saved = json.loads((d / "summary.json").read_text())
    for key in ("config", "policy", "reward_model", "reward_model_backbone", "sft", "ppo", "kl_target",
                "final_kl_coef", "wins_proxy", "wins_true", "elapsed_s", "checks"):
        assert key in saved, key
    assert "QLoRA (NF4" in saved["policy"] and "RoBERTa" in saved["reward_model_backbone"]
    for f in ("report.md", "metrics.jsonl", "sft/adapter/adapter_model.safetensors", "sft/model.safetensors",
              "rm/score.safetensors", "policy/config.json", "policy/adapter/adapter_config.json"):
        assert (d / f).is_file(), f
    assert s["reward_model"]["heldout_acc"] > 0.6  # above chance (0.5) on pairs from held-out prompts
    ppo = [json.loads(l) for l in open(d / "metrics.jsonl") if '"phase": "ppo"' in l]
    assert [r["step"] for r in ppo] == [1, 2, 3]
    assert s["sft"]["kl"]["mean"] == 0.0 and s["ppo"]["kl"]["mean"] > 0.0
    # the policy speaks the chat format: prompts wrapped, replies ended by ###STOP###
    sample = s["ppo"]["samples"][0]
    assert sample["prompt"].startswith(HUMAN) and sample["prompt"].endswith(BOT)


def test_sawyer_checkpoints_load_and_read_the_chat_tokens(sawyer_run):
    """The saved SFT policy is a plain Llama checkpoint (adapters merged) whose tokenizer keeps the chat tokens."""
    from minillm.models.llama import LlamaForCausalLM
    d, _ = sawyer_run
    lm = LlamaForCausalLM.from_pretrained(str(d / "sft"))
    tok = Tokenizer.from_pretrained(str(d / "sft"))
    ids = tok.encode(f"{HUMAN} review of the cheap pizza :\n{BOT}")
    assert tok.token_to_id(HUMAN) in ids and tok.token_to_id(BOT) in ids
    assert tok.eos_token == STOP
    with torch.no_grad():
        assert lm(torch.tensor([ids])).shape == (1, len(ids), len(tok))


@pytest.mark.slow
@pytest.mark.xfail(reason="the reward model does not truncate yet: tiny-roberta's 38 positions are shorter than "
                          "the BPE-encoded chat prompt + response (a real roberta-base has 512)", strict=False)
def test_sawyer_takes_hub_checkpoints(tmp_path):
    """The same command on checkpoints in the hub layout (here the committed tiny ones, standing in for a Llama and
    roberta-base): the chat tokens are added to the Llama's own tokenizer and its embedding resized, the reward
    model reads text with RoBERTa's tokenizer. Numbers are not checked: random tiny weights."""
    from minillm.demos.rlhf_demo import DemoConfig, run_demo
    s = run_demo(DemoConfig.make(tiny=True, policy="tiny-llama", rm_backbone="tiny-roberta", out=str(tmp_path),
                                 ppo_steps=1, sft_examples=200), quiet=True)
    assert "QLoRA" in s["policy"] and "hub checkpoint" in s["reward_model_backbone"]
    tok = Tokenizer.from_pretrained(str(tmp_path / "sft"))
    assert all(tok.token_to_id(t) is not None for t in (HUMAN, BOT, STOP))
