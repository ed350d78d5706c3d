"""Data: readers report bad lines by file:line, masking puts loss only on the final response,
the collator pads dynamically with -100 labels, bad input fails before training."""

import json

import pytest
import torch

from minillm.models.gpt2 import GPT2LMHeadModel
from minillm.tokenizer import Tokenizer
from minillm.data.batching import length_grouped
from minillm.data.classification import ClassificationCollator, encode_classification, label_set
from minillm.data.readers import DataError, read_csv, read_jsonl, read_records
from minillm.data.sft import BOT, HUMAN, IGNORE, LATEX_TEMPLATE, STOP, CausalLMCollator, add_chat_tokens, encode_sft
from minillm.train.loop import TrainConfig, causal_lm_loss, train


@pytest.fixture
def tok():
    t = Tokenizer.from_pretrained("tiny-gpt2")
    t.pad_token = t.eos_token
    return t


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": }\n')
    with pytest.raises(DataError, match=r"train\.jsonl:3: malformed JSON"):
        read_jsonl(p)
    p.write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: expected a JSON object"):
        read_jsonl(p)


def test_empty_files_are_errors(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty dataset"):
        read_jsonl(tmp_path / "e.jsonl")
    (tmp_path / "e.csv").write_text("text,labels\n")
    with pytest.raises(DataError, match="empty dataset"):
        read_csv(tmp_path / "e.csv")


def test_csv_reader_and_bad_row(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,labels\n"hello, world",a;b\nbye,c\n')
    rows = read_records(p)
    assert [r["text"] for r in rows] == ["hello, world", "bye"]
    assert rows[1]["_where"].endswith("d.csv:3")
    assert label_set(rows) == ["a", "b", "c"]
    p.write_text("text,labels\nfine,a\ntoo,many,fields\n")
    with pytest.raises(DataError, match=r"d\.csv:3: expected 2 fields"):
        read_csv(p)


def test_completion_only_masks_prompt_and_earlier_turns(tok):
    add_chat_tokens(tok)
    rec = {"messages": [{"role": "human", "content": "hi there"}, {"role": "bot", "content": "hello"},
                        {"role": "human", "content": "what is 2+2?"}, {"role": "bot", "content": "four"}]}
    ex = encode_sft([rec], tok, completion_only=True)[0]
    ids, labels = ex["input_ids"], ex["labels"]
    # the labelled ids decode to exactly the final response and its STOP marker
    labelled = [i for i, l in zip(ids, labels) if l != IGNORE]
    assert tok.decode(labelled) == f" four{STOP}"
    assert labels[:len(ids) - len(labelled)] == [IGNORE] * (len(ids) - len(labelled))  # a masked prefix
    # the markers are single tokens, and the whole text is the chat format
    for m in (HUMAN, BOT, STOP):
        assert tok.token_to_id(m) is not None and tok.encode(m, add_special_tokens=False) == [tok.token_to_id(m)]
    assert tok.decode(ids) == f"{HUMAN} hi there\n{BOT} hello{STOP}\n{HUMAN} what is 2+2?\n{BOT} four{STOP}"
    # without completion-only every token is a label
    full = encode_sft([rec], tok, completion_only=False)[0]
    assert full["labels"] == full["input_ids"]


def test_latex_record_uses_the_book_template(tok):
    ex = encode_sft([{"english": "x squared", "latex": "x^2"}], tok, completion_only=True)[0]
    text = LATEX_TEMPLATE.format(english="x squared", latex="x^2") + tok.eos_token
    assert tok.decode(ex["input_ids"]) == text
    labelled = [i for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE]
    assert tok.decode(labelled) == " x^2" + tok.eos_token


def test_shipped_latex_pairs():
    from pathlib import Path
    import minillm
    p = Path(minillm.__file__).parent / "demos" / "data" / "latex.jsonl"
    recs = read_jsonl(p)
    assert len(recs) >= 45
    assert all(set(r) == {"english", "latex", "_where"} for r in recs)
    assert {"english": "x squared", "latex": "x^2"} in [{k: r[k] for k in ("english", "latex")} for r in recs]


def test_add_chat_tokens_resizes_with_mean_rows(tok):
    model = GPT2LMHeadModel.from_pretrained("tiny-gpt2")
    old = model.transformer.wte.weight.detach().clone()
    n = add_chat_tokens(tok, model)
    assert n == 3 and model.config.vocab_size == len(tok) == old.shape[0] + 3
    new = model.transformer.wte.weight.detach()
    assert torch.equal(new[:old.shape[0]], old)
    torch.testing.assert_close(new[-3:], old.mean(0, keepdim=True).expand(3, -1), rtol=0, atol=1e-7)
    logits = model(torch.tensor([[tok.token_to_id(HUMAN), 5]]))
    assert logits.shape[-1] == len(tok)


def test_truncated_response_is_an_error_before_training(tok):
    recs = [{"prompt": "a long prompt " * 20, "completion": " answer", "_where": "x.jsonl:7"}]
    with pytest.raises(DataError, match=r"x\.jsonl:7: the response is truncated away entirely"):
        encode_sft(recs, tok, max_length=16, completion_only=True)
    assert encode_sft(recs, tok, max_length=16, completion_only=False)  # full-text loss: still something to learn
    with pytest.raises(DataError, match="empty dataset"):
        encode_sft([], tok)


def test_empty_dataset_refused_by_the_loop():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="empty"):
        train(model, [], lambda r: r, causal_lm_loss, TrainConfig())


def test_collator_pads_dynamically(tok):
    exs = encode_sft([{"prompt": "ab", "completion": " c"}, {"prompt": "abc def ghi", "completion": " jkl mno"}],
                     tok, completion_only=True)
    b = CausalLMCollator(tok.pad_token_id)(exs)
    T = max(len(e["input_ids"]) for e in exs)
    assert b["input_ids"].shape == (2, T)  # to the longest of THIS batch
    n0 = len(exs[0]["input_ids"])
    assert b["attention_mask"][0].tolist() == [1] * n0 + [0] * (T - n0)
    assert (b["labels"][0, n0:] == IGNORE).all() and (b["input_ids"][0, n0:] == tok.pad_token_id).all()
    # the real eos at the end of a response keeps its label even though pad == eos
    assert b["labels"][0, n0 - 1].item() == tok.eos_token_id


def test_classification_labels_checked(tok):
    recs = [{"text": "a b", "labels": ["x", "y"]}, {"text": "c", "labels": "z", "_where": "t.csv:3"}]
    with pytest.raises(DataError, match=r"t\.csv:3: label 'z' is not in the label set"):
        encode_classification(recs, tok, ["x", "y"])
    exs = encode_classification(recs, tok, ["x", "y", "z"])
    b = ClassificationCollator(tok.pad_token_id)(exs)
    assert b["labels"].tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert b["input_ids"].shape[0] == 2 and b["attention_mask"][1].sum() == len(exs[1]["input_ids"])


def test_length_grouped_keeps_every_index_and_groups():
    lengths = [((i * 37) % 50) + 1 for i in range(200)]
    order = list(torch.randperm(200, generator=torch.Generator().manual_seed(0)))
    order = [int(i) for i in order]
    grouped = length_grouped(order, lengths, batch_size=4, mega=10)
    assert sorted(grouped) == list(range(200))
    batches = [grouped[i:i + 4] for i in range(0, 200, 4)]
    pad_waste = lambda bs: sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in bs)
    assert pad_waste(batches) < 0.3 * pad_waste([order[i:i + 4] for i in range(0, 200, 4)])
    assert max(lengths[j] for j in batches[0]) == max(lengths)  # longest batch first
