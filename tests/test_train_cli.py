"""`minillm sft` / `minillm classify` end to end on the tiny checkpoints: bad data fails before training,
outputs load with from_pretrained, the loss goes down."""

import json
import re

import pytest
import torch

from minillm.cli import main
from minillm.models.gpt2 import GPT2LMHeadModel
from minillm.tokenizer import Tokenizer
from minillm.data.readers import DataError
from minillm.data.sft import BOT, STOP


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py



def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CHAT = [{"messages": [{"role": "human", "content": f"say {w}"}, {"role": "bot", "content": w}]}
        for w in ["yes", "no", "cat", "dog", "sun", "moon", "red", "blue"]]


def test_sft_chat_completion_only(tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    out = tmp_path / "out"
    assert main(["sft", "--model", "tiny-gpt2", "--data", str(data), "--completion-only", "--max-steps", "8",
                 "--batch-size", "4", "--lr", "3e-3", "--out", str(out), "--log-every", "4"]) == 0
    model = GPT2LMHeadModel.from_pretrained(str(out))
    tok = Tokenizer.from_pretrained(str(out))
    assert model.config.vocab_size == 512 + 3 and tok.token_to_id(STOP) == 514
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 8 and summary["final_loss"] < summary["first_loss"]
    ids = torch.tensor([tok.encode(f"###HUMAN### say cat\n{BOT}", add_special_tokens=False)])
    assert model(ids).shape == (1, ids.shape[1], 515)


def test_sft_bad_data_fails_before_training(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n')
    assert main(["sft", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert re.search(r"bad\.jsonl:2: malformed JSON", capsys.readouterr().err)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 200, "completion": " x"}])
    assert main(["sft", "--data", str(long), "--completion-only", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"long\.jsonl:1: the response is truncated away entirely", err) and "Traceback" not in err
    with pytest.raises(DataError):  # --debug shows the error itself
        main(["--debug", "sft", "--data", str(bad), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # nothing started


def test_sft_lora(tmp_path):
    pytest.importorskip("minillm.lora")
    data = write_jsonl(tmp_path / "d.jsonl", [{"english": "x squared", "latex": "x^2"}] * 4)
    out = tmp_path / "out"
    main(["sft", "--data", str(data), "--completion-only", "--lora-r", "4", "--lora-alpha", "8", "--lora-targets",
          "c_attn", "--max-steps", "3",
          "--batch-size", "2", "--lr", "1e-2", "--out", str(out)])
    merged = GPT2LMHeadModel.from_pretrained(str(out))
    base = GPT2LMHeadModel.from_pretrained("tiny-gpt2")
    ms, bs = merged.state_dict(), base.state_dict()
    changed = {k for k in bs if not torch.equal(ms[k], bs[k])}
    assert changed and all(".attn.c_attn.weight" in k for k in changed)  # only LoRA targets moved (merged)
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_classify(tmp_path, capsys):
    pytest.importorskip("minillm.models.distilbert")
    rows = [{"text": f"{a} {b} story", "labels": [x for x, on in (("action", a == "fight"), ("romance", b == "love"))
                                                   if on]}
            for a in ("fight", "walk", "talk") for b in ("love", "rain", "sun")]
    data = write_jsonl(tmp_path / "train.jsonl", rows * 2)
    out = tmp_path / "out"
    assert main(["classify", "--data", str(data), "--eval-data", str(data), "--max-steps", "4", "--batch-size", "6",
                 "--lr", "1e-3", "--freeze-up-to", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["labels"] == ["action", "romance"]
    for k in ("eval_f1_micro", "eval_jaccard_micro", "eval_subset_accuracy", "eval_roc_auc_micro"):
        assert 0.0 <= summary["eval"][k] <= 1.0
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "labels": ["horror"]}])
    assert main(["classify", "--data", str(data), "--eval-data", str(bad), "--out", str(tmp_path / "o2")]) == 2
    assert "bad.jsonl:1: label 'horror' is not in the label set" in capsys.readouterr().err


def test_sft_qlora_output_loads(tmp_path):
    pytest.importorskip("minillm.nf4")
    pytest.importorskip("minillm.lora")
    data = write_jsonl(tmp_path / "d.jsonl", [{"english": "x squared", "latex": "x^2"}] * 4)
    out = tmp_path / "out"
    main(["sft", "--data", str(data), "--completion-only", "--lora-r", "4", "--quantize", "nf4", "--precision", "bf16",
          "--max-steps", "2", "--batch-size", "2", "--out", str(out)])
    merged = GPT2LMHeadModel.from_pretrained(str(out)).state_dict()
    base = GPT2LMHeadModel.from_pretrained("tiny-gpt2").state_dict()
    for k, v in base.items():
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            # NF4 rounding of a weight with init std 0.1 (absmax per 64-block): well under 0.1
            assert 0 < float((merged[k] - v).abs().max()) < 0.1, k
        else:
            assert torch.equal(merged[k], v), k  # embeddings, norms, biases: untouched, full precision


def test_sft_gradient_checkpointing_same_model(tmp_path):
    """--gradient-checkpointing changes memory, not results: after 4 steps (dropout on) the weights equal the
    plain run's within 1e-6."""
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    outs = []
    for flag in ([], ["--gradient-checkpointing"]):
        out = tmp_path / f"out{len(outs)}"
        assert main(["sft", "--model", "tiny-gpt2", "--data", str(data), "--completion-only", "--max-steps", "4",
                     "--batch-size", "4", "--lr", "3e-3", "--out", str(out), *flag]) == 0
        outs.append(GPT2LMHeadModel.from_pretrained(str(out)).state_dict())
    base = GPT2LMHeadModel.from_pretrained("tiny-gpt2").state_dict()
    assert not torch.equal(outs[0]["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"])
    for k in outs[0]:
        torch.testing.assert_close(outs[1][k], outs[0][k], atol=1e-6, rtol=1e-6, msg=k)


def test_classify_roberta(tmp_path):
    """RoBERTa's classifier (dense → tanh → out_proj on <s>) plugs into `minillm classify` like BERT's."""
    from minillm.models.roberta import RobertaForSequenceClassification
    rows = [{"text": f"{a} story", "labels": ["action"] if a == "fight" else ["calm"]} for a in ("fight", "walk")] * 6
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    assert main(["classify", "--model", "tiny-roberta", "--data", str(data), "--eval-data", str(data),
                 "--max-steps", "30", "--batch-size", "4", "--lr", "3e-3", "--out", str(out)]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["eval"]["eval_subset_accuracy"] == 1.0  # two separable labels, learned
    m = RobertaForSequenceClassification.from_pretrained(str(out))
    assert m.config.id2label == {"0": "action", "1": "calm"}


def test_sft_llama_qlora_chat(tmp_path):
    """The same sft job on a Llama checkpoint: chat tokens added (embedding and untied head resized, their rows
    trained), QLoRA on every Llama linear, merged and saved loadable; generate reads it."""
    from minillm.models.llama import LlamaForCausalLM
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    out = tmp_path / "out"
    assert main(["sft", "--model", "tiny-llama", "--data", str(data), "--completion-only", "--lora-r", "4",
                 "--quantize", "nf4", "--max-steps", "6", "--batch-size", "4", "--lr", "3e-3", "--out", str(out)]) == 0
    base, tuned = LlamaForCausalLM.from_pretrained("tiny-llama"), LlamaForCausalLM.from_pretrained(str(out))
    assert tuned.config.vocab_size == base.config.vocab_size + 3
    new = tuned.get_input_embeddings().weight[-3:]
    assert not torch.allclose(new, base.get_input_embeddings().weight.mean(0, keepdim=True).expand_as(new))  # learned
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["final_loss"] < summary["first_loss"]
    assert main(["generate", "--model", str(out), "--prompt", "say", "--max-new-tokens", "3"]) == 0
