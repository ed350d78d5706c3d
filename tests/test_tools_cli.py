"""The course's remaining tools from the command line, on the tiny checkpoints: `minillm memory`, `dedup`,
`distill`, `sft --prompt-tuning`, `peft-compare`. Each checks the numbers the command prints or the files
it writes, not only its exit code."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from minillm.cli import main
from minillm.data.readers import read_records
from minillm.data.sft import CausalLMCollator, encode_sft
from minillm.memory import lora_parameter_count
from minillm.hub import read_config, resolve
from minillm.models.gpt2 import GPT2LMHeadModel
from minillm.tokenizer import Tokenizer
from minillm.train.loop import causal_lm_loss, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gb(out: str, key: str) -> float:
    return float(re.search(rf"^{key}\s+([\d,.]+) GB", out, re.M).group(1).replace(",", ""))


def pattern_records(words):
    return [{"prompt": f"repeat {w}:", "completion": f" {w} {w} {w}"} for w in words]


TRAIN_WORDS = ["cat", "dog", "sun", "moon", "red", "blue", "tree", "fish"]
HELD_OUT_WORDS = ["star", "rain", "bird", "rock"]


def test_memory_course_rule_1b_params(capsys):
    assert main(["memory", "--params", "1e9"]) == 0
    out = capsys.readouterr().out
    assert gb(out, "weights") == 4.0 and gb(out, "gradients") == 4.0 and gb(out, "optimizer") == 8.0
    assert gb(out, "total") == 24.0  # the course: 1B params in fp32 take ~24 GB to train with AdamW
    assert "1.200e+20 FLOPs" in out  # 6·N·D with D = 20·N (Chinchilla)
    assert "Chinchilla-optimal tokens 20,000,000,000" in out
    assert main(["memory", "--params", "1e9", "--dtype", "bf16", "--optimizer", "sgd"]) == 0
    out = capsys.readouterr().out
    assert gb(out, "weights") == 2.0 and gb(out, "optimizer") == 0.0


def test_memory_of_a_checkpoint_with_lora(capsys):
    assert main(["memory", "--model", "tiny-gpt2", "--lora-r", "8", "--quantize", "nf4", "--batch", "2",
                 "--seq", "64", "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    trainable = int(re.search(r"trainable ([\d,]+)", out).group(1).replace(",", ""))
    assert trainable == lora_parameter_count(read_config(resolve("tiny-gpt2")), 8) > 0
    assert main(["memory", "--params", "1e9", "--lora-r", "8"]) == 2  # LoRA counts need the layer shapes
    assert "lora_r needs a config" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one of --model / --params
        main(["memory"])


def test_dedup_drops_the_known_duplicates(tmp_path, capsys):
    texts = ["the cat sat", "a dog ran far away", "the cat sat", "hello there", "a dog ran far away"]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    out = tmp_path / "out.jsonl"
    assert main(["dedup", "--data", str(src), "--field", "text", "--threshold", "0.9999", "--out", str(out),
                 "--model", "tiny-bert"]) == 0
    assert "kept 3 of 5 records (2 near-duplicates dropped)" in capsys.readouterr().out
    assert [json.loads(l)["id"] for l in out.read_text().splitlines()] == [0, 1, 3]
    assert main(["dedup", "--data", str(src), "--field", "body", "--out", str(out), "--model", "tiny-bert"]) == 2
    assert "in.jsonl:1" in capsys.readouterr().err


def held_out_loss(model_dir, data_path) -> float:
    tok = Tokenizer.from_pretrained(model_dir)
    rows = encode_sft(read_records(data_path), tok, 64, False)
    model = GPT2LMHeadModel.from_pretrained(model_dir)
    return evaluate(model, rows, CausalLMCollator(tok.eos_token_id or 0), causal_lm_loss)["loss"]


def test_distill_student_improves_on_held_out_data(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", pattern_records(TRAIN_WORDS) * 4)
    held = write_jsonl(tmp_path / "held.jsonl", pattern_records(HELD_OUT_WORDS))
    out = tmp_path / "student"
    assert main(["distill", "--teacher", "tiny-gpt2", "--student", "tiny-gpt2-relu", "--data", str(data),
                 "--out", str(out), "--temperature", "2", "--alpha", "0.5", "--epochs", "2", "--lr", "3e-3",
                 "--batch-size", "8"]) == 0
    assert re.search(r"student saved to .* \(loss [\d.]+ -> [\d.]+\)", capsys.readouterr().out)
    before, after = held_out_loss(str(resolve("tiny-gpt2-relu")), held), held_out_loss(str(out), held)
    assert math.isfinite(after) and after < before - 0.1, (before, after)


def test_sft_prompt_tuning_trains_the_prompt_alone(tmp_path, capsys, monkeypatch):
    import minillm.train.jobs as jobs
    seen = {}

    def spy(model, *a, **kw):  # the model the one trainer receives
        seen["model"] = model
        seen["trainable"] = [n for n, p in model.named_parameters() if p.requires_grad]
        return real_train(model, *a, **kw)

    real_train = jobs.train
    monkeypatch.setattr(jobs, "train", spy)
    data = write_jsonl(tmp_path / "d.jsonl", pattern_records(TRAIN_WORDS))
    out = tmp_path / "pt"
    assert main(["sft", "--model", "tiny-gpt2", "--data", str(data), "--out", str(out), "--prompt-tuning", "5",
                 "--prompt-init", "text", "--prompt-init-text", "repeat the word", "--max-steps", "6",
                 "--batch-size", "4", "--lr", "3e-2"]) == 0
    assert seen["trainable"] == ["prompt_embeddings"]
    base = GPT2LMHeadModel.from_pretrained("tiny-gpt2").state_dict()
    for k, v in seen["model"].base_model.state_dict().items():
        assert torch.equal(v.cpu(), base[k]), k  # the base is bit-identical after training
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 5 and cfg["token_dim"] == 64
    assert cfg["prompt_tuning_init"] == "TEXT" and cfg["prompt_tuning_init_text"] == "repeat the word"
    prompt = load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"]
    tok = Tokenizer.from_pretrained("tiny-gpt2")
    ids = (tok.encode("repeat the word") * 5)[:5]
    init = base["transformer.wte.weight"][torch.tensor(ids)]
    assert prompt.shape == (5, 64) and float((prompt - init).abs().max()) > 1e-3  # it trained from the text init
    assert not (out / "model.safetensors").exists() and (out / "tokenizer.json").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["trainable"] == 5 * 64 and summary["steps"] == 6
    assert summary["final_loss"] < summary["first_loss"]
    # prompt tuning with LoRA is refused before anything trains
    assert main(["sft", "--data", str(data), "--out", str(tmp_path / "x"), "--prompt-tuning", "5",
                 "--lora-r", "4"]) == 2
    assert "soft prompt alone" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_prompt_tune_entry_runs_the_sft_recipe(tmp_path):
    from minillm.prompt_tuning import load_prompt_tuning, prompt_tune
    data = write_jsonl(tmp_path / "d.jsonl", pattern_records(TRAIN_WORDS))
    s = prompt_tune("tiny-gpt2", str(data), str(tmp_path / "pt"), num_virtual_tokens=4, epochs=2, batch_size=4,
                    quiet=True)
    assert s["trainable"] == 4 * 64 and s["steps"] == 4
    pt = load_prompt_tuning(GPT2LMHeadModel.from_pretrained("tiny-gpt2"), tmp_path / "pt")
    assert pt.num_virtual_tokens == 4


def test_peft_compare_prints_the_table(capsys):
    assert main(["peft-compare", "--steps", "2", "--batch-size", "4", "--prompt-tuning", "10", "--lora-r", "4"]) == 0
    out = capsys.readouterr().out
    rows = {l.split("  ")[0].strip(): l for l in out.splitlines()[2:]}
    assert set(rows) == {"full fine-tuning", "LoRA r=4", "prompt tuning (10 tokens)"}
    trainable = {k: int(re.search(r"\s([\d,]+)\s+[\d.]+%", v).group(1).replace(",", "")) for k, v in rows.items()}
    assert trainable["prompt tuning (10 tokens)"] == 10 * 64
    assert trainable["prompt tuning (10 tokens)"] < trainable["LoRA r=4"] < trainable["full fine-tuning"]
