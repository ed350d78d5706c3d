"""The tokenizer wrapper (minillm/tokenizer.py): padding sides, special tokens, round trips."""

from pathlib import Path

import pytest
import torch

from minillm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def tok():
    t = Tokenizer.from_pretrained(str(ROOT / "weights" / "tiny-gpt2"))
    t.pad_token = t.eos_token
    return t


def test_special_tokens_from_config(tok):
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 and tok.pad_token_id == 0
    assert tok.model_max_length == 128


def test_round_trip(tok):
    text = "The movie was wonderful and the acting was superb."
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_sides(tok, side):
    enc = tok(["I like cats", "The movie was wonderful"], padding_side=side)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n0 = len(tok.encode("I like cats"))
    assert mask[0].sum() == n0 and mask[1].all()
    real = ids[0][mask[0].bool()].tolist()
    assert real == tok.encode("I like cats")
    if side == "left":
        assert mask[0, -1] == 1 and mask[0, 0] == 0
    else:
        assert mask[0, 0] == 1 and mask[0, -1] == 0
    assert (ids[0][~mask[0].bool()] == tok.pad_token_id).all()


def test_truncation(tok):
    enc = tok(["The movie was wonderful and the acting was superb."], truncation=True, max_length=3)
    assert enc["input_ids"].shape == (1, 3)


def test_truncation_keeps_cls_and_sep():
    bert = Tokenizer.from_pretrained(str(ROOT / "weights" / "tiny-bert"))
    full = bert.encode("the movie was wonderful and the acting was superb")
    cut = bert(["the movie was wonderful and the acting was superb"], truncation=True, max_length=5)["input_ids"][0]
    assert cut.tolist() == full[:4] + full[-1:]  # [CLS] + 3 text tokens + [SEP]


def test_added_special_tokens_are_never_split(tok):
    n_before = len(tok)
    assert tok.add_special_tokens(["###HUMAN###", "###BOT###", "###STOP###"]) == 3
    assert len(tok) == n_before + 3
    ids = tok.encode("###HUMAN### hi ###BOT###")
    assert ids[0] == tok.token_to_id("###HUMAN###") and tok.token_to_id("###BOT###") in ids
    assert tok.decode(ids, skip_special_tokens=True).strip() == "hi"


def test_save_and_reload(tok, tmp_path):
    tok.add_special_tokens(["###STOP###"])
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(str(tmp_path))
    assert again.encode("x ###STOP###") == tok.encode("x ###STOP###")
    assert again.pad_token_id == tok.pad_token_id


def test_errors(tmp_path):
    t = Tokenizer.from_pretrained(str(ROOT / "weights" / "tiny-gpt2"))
    with pytest.raises(ValueError, match="no pad token"):
        t(["a", "a b c"])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        t.pad_token = "<pad>"
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


@pytest.mark.reference
def test_live_same_ids_as_transformers():
    tr = pytest.importorskip("transformers")
    ref = tr.PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "weights" / "tiny-gpt2" / "tokenizer.json"))
    ours = Tokenizer.from_pretrained(str(ROOT / "weights" / "tiny-gpt2"))
    for s in ["I like cats", "Convert English to LaTeX\nEnglish: x squared\nLaTeX: x^2"]:
        assert ours.encode(s) == ref.encode(s)
