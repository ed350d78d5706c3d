"""Seq2seq SFT for T5: the collator's shift and masking, the loss (no causal shift) against a hand
computation and transformers, `minillm sft` on tiny-flan-t5, and `minillm evaluate --metric rouge`."""

import json
import math
import re

import pytest
import torch

from minillm.cli import main
from minillm.data.readers import DataError
from minillm.data.seq2seq import Seq2SeqCollator, encode_seq2seq, shift_right
from minillm.evaluation import evaluate_rouge, load_for_generation
from minillm.generation import generate
from minillm.losses import IGNORE_INDEX
from minillm.models.auto import KINDS, load_model
from minillm.models.t5 import T5ForConditionalGeneration
from minillm.tokenizer import Tokenizer
from minillm.train.loop import seq2seq_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RECORDS = [{"input": f"say {w}", "target": w} for w in ["yes", "no", "cat", "dog", "sun", "moon", "red", "blue"]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_registry_has_t5_as_seq2seq():
    assert KINDS["seq2seq"] == {"t5": T5ForConditionalGeneration}
    assert isinstance(load_model("tiny-flan-t5", "seq2seq"), T5ForConditionalGeneration)


def test_collator_shift_and_masks():
    rows = [{"input_ids": [5, 6, 1], "labels": [7, 8, 9, 1]}, {"input_ids": [4, 1], "labels": [3, 1]}]
    b = Seq2SeqCollator(pad_id=0, decoder_start_token_id=0)(rows)
    assert b["input_ids"].tolist() == [[5, 6, 1], [4, 1, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[7, 8, 9, 1], [3, 1, IGNORE_INDEX, IGNORE_INDEX]]
    assert b["decoder_input_ids"].tolist() == [[0, 7, 8, 9], [0, 3, 1, 0]]  # -100 never reaches the embedding
    assert b["decoder_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert shift_right(torch.tensor([[4, 5]]), start_id=2, pad_id=0).tolist() == [[2, 4]]


def test_encode_records_and_errors(tmp_path):
    tok = Tokenizer.from_pretrained("tiny-flan-t5")
    (e,) = encode_seq2seq([{"prompt": "say cat", "completion": "cat"}], tok)
    assert e["input_ids"] == tok.encode("say cat", add_special_tokens=False) + [tok.eos_token_id]
    assert e["labels"] == tok.encode("cat", add_special_tokens=False) + [tok.eos_token_id]
    (l,) = encode_seq2seq([{"english": "x squared", "latex": "x^2"}], tok)
    assert l["labels"][-1] == tok.eos_token_id
    with pytest.raises(DataError, match=r"d\.jsonl:2: unknown record layout \['text'\]"):
        encode_seq2seq([{"input": "a", "target": "b", "_where": "d.jsonl:1"}, {"text": "a", "_where": "d.jsonl:2"}],
                       tok)
    with pytest.raises(DataError, match=r"d\.jsonl:3: the target is empty"):
        encode_seq2seq([{"input": "a", "target": "", "_where": "d.jsonl:3"}], tok)


def _batch():
    tok = Tokenizer.from_pretrained("tiny-flan-t5")
    model = T5ForConditionalGeneration.from_pretrained("tiny-flan-t5").eval()
    recs = [{"input": "translate hello world", "target": "a long target sentence here"}, RECORDS[2], RECORDS[5]]
    batch = Seq2SeqCollator(tok.pad_token_id, model.config.start_token_id)(encode_seq2seq(recs, tok))
    return model, batch


def test_loss_equals_hand_computation():
    model, batch = _batch()
    with torch.no_grad():
        total, n = seq2seq_loss(model, batch)
        logits = model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                       batch["decoder_attention_mask"])
    want, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):  # logit t is scored against label t: the same position
            y = int(batch["labels"][b, t])
            if y != IGNORE_INDEX:
                z = logits[b, t].double()
                want -= float(z[y] - torch.logsumexp(z, 0))
                count += 1
    assert int(n) == count == int((batch["labels"] != IGNORE_INDEX).sum())
    assert math.isclose(float(total), want, rel_tol=1e-5)


@pytest.mark.reference
def test_live_loss_and_shift_equal_transformers():
    tr = pytest.importorskip("transformers")
    hf = tr.T5ForConditionalGeneration.from_pretrained("weights/tiny-flan-t5").eval()
    model, batch = _batch()
    assert torch.equal(hf._shift_right(batch["labels"]), batch["decoder_input_ids"])
    with torch.no_grad():
        want = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        total, n = seq2seq_loss(model, batch)
    assert abs(float(total / n) - float(want)) <= 1e-5


def test_sft_t5_lowers_loss_and_reloads(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    out = tmp_path / "out"
    assert main(["sft", "--model", "tiny-flan-t5", "--data", str(data), "--max-steps", "20", "--lr", "3e-3",
                 "--batch-size", "4", "--out", str(out), "--log-every", "10"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 20 and summary["final_loss"] < summary["first_loss"]
    model = T5ForConditionalGeneration.from_pretrained(str(out))
    before = T5ForConditionalGeneration.from_pretrained("tiny-flan-t5")
    assert not torch.equal(model.shared.weight, before.shared.weight)  # it trained, and saved what it trained
    assert Tokenizer.from_pretrained(str(out)).eos_token_id == 1


@pytest.mark.parametrize("quantize", [[], ["--quantize", "nf4"]])
def test_sft_t5_lora_and_qlora(tmp_path, capsys, quantize):
    """LoRA (and QLoRA: NF4 base) on T5's q,k,v,o,wi_0,wi_1,wo: the loss falls, the saved model is merged (only
    the adapted linears moved; embeddings, norms, position biases bit-identical), the adapter is in peft's files
    as a SEQ_2_SEQ_LM adapter, and `minillm generate` reads the result."""
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    out = tmp_path / "out"
    assert main(["sft", "--model", "tiny-flan-t5", "--data", str(data), "--max-steps", "12", "--lr", "1e-2",
                 "--batch-size", "4", "--lora-r", "4", "--out", str(out)] + quantize) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["final_loss"] < summary["first_loss"]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM" and "wi_0" in cfg["target_modules"]
    base = T5ForConditionalGeneration.from_pretrained("tiny-flan-t5").state_dict()
    got = T5ForConditionalGeneration.from_pretrained(str(out)).state_dict()
    adapted = re.compile(r"\.(q|k|v|o|wi_0|wi_1|wo)\.weight$")
    for k, v in base.items():
        assert torch.equal(got[k], v) != bool(adapted.search(k)), k
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", RECORDS[0]["input"], "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != RECORDS[0]["input"]  # the decoder's own text, not the prompt echoed


def test_sft_t5_bad_record_names_line(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], {"question": "a"}])
    assert main(["sft", "--model", "tiny-flan-t5", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert re.search(r"bad\.jsonl:2: unknown record layout", capsys.readouterr().err)


def _own_greedy(name, inputs, n=10):
    """The model's greedy outputs, computed here with generate directly (not through evaluation.py)."""
    model, tok = load_for_generation(name)
    outs = []
    for x in inputs:
        ids = tok.encode(x, add_special_tokens=False)
        if getattr(model, "is_encoder_decoder", False):
            ids = ids + [tok.eos_token_id]
        g = generate(model, torch.tensor([ids]), max_new_tokens=n, eos_token_id=tok.eos_token_id)[0].tolist()
        new = g[1:] if getattr(model, "is_encoder_decoder", False) else g[len(ids):]
        if tok.eos_token_id in new:
            new = new[:new.index(tok.eos_token_id)]
        outs.append(tok.decode(new, skip_special_tokens=True).strip())
    return outs


def test_evaluate_decoder_only_predictions_are_own_greedy():
    inputs = ["say cat", "translate hello world", "a b c"]
    s = evaluate_rouge("tiny-gpt2", [{"input": x, "target": "x"} for x in inputs], max_new_tokens=6, batch_size=2)
    assert s["predictions"] == _own_greedy("tiny-gpt2", inputs, n=6)  # left padding does not change them


def test_evaluate_rouge_own_outputs_score_one(tmp_path, capsys):
    name = "tiny-flan-t5"
    inputs = ["say cat", "translate hello world", "a b c"]
    preds = _own_greedy(name, inputs, n=16)
    from minillm.text_metrics import rouge_tokenize
    assert all(len(rouge_tokenize(p)) >= 2 for p in preds)  # at least a bigram each, so all four can reach 1
    s = evaluate_rouge(name, [{"input": x, "target": p} for x, p in zip(inputs, preds)], max_new_tokens=16,
                       batch_size=2)  # batches of 2: padding must not change the outputs
    assert s["n"] == 3 and s["predictions"] == preds
    assert all(s[k] == 1.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    unrelated = [{"input": x, "target": "the quick brown fox jumps"} for x in inputs]
    s = evaluate_rouge(name, unrelated, max_new_tokens=16)
    assert all(s[k] < 1.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    data = write_jsonl(tmp_path / "e.jsonl", [{"input": x, "target": p} for x, p in zip(inputs, preds)])
    assert main(["evaluate", "--model", name, "--data", str(data), "--metric", "rouge", "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out.strip() == "rouge1 1.0000 | rouge2 1.0000 | rougeL 1.0000 | rougeLsum 1.0000 (n=3)"
