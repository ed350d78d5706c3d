"""RoBERTa (minillm.models.roberta) by hand: positions = padding_idx + running count of real tokens (fairseq's
make_positions) for any pad id, the zero, gradient-free pad row of the position table, the classification head
written out (tanh(dense(h_<s>)) -> out_proj, its dropout rule), roberta-base's config defaults and their checks,
and from_pretrained's label handling. Found by scripts/mutation.py: test_roberta.py uses pad 1 and hub configs
only. Tiny random models (hidden 16, 2 layers) and the tiny checkpoints under weights/."""

from pathlib import Path

import pytest
import torch

from minillm import hub
from minillm.models.roberta import (RobertaConfig, RobertaForSequenceClassification, RobertaModel,
                                    position_ids_from_input_ids)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "weights" / "tiny-roberta"
TINY_CLS = ROOT / "weights" / "tiny-roberta-classifier"
SMALL = dict(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)


def positions_by_hand(ids, pad):
    out = []
    for row in ids:
        count, r = 0, []
        for t in row:
            if t == pad:
                r.append(pad)
            else:
                count += 1
                r.append(pad + count)
        out.append(r)
    return out


@pytest.mark.parametrize("pad", [0, 1, 4])
def test_positions_count_real_tokens_from_pad_plus_one(pad):
    ids = [[7, 8, pad, 9, pad, pad], [pad, pad, 5, 6, 7, 8], [5, 6, 7, 8, 9, 10]]
    got = position_ids_from_input_ids(torch.tensor(ids), pad)
    assert got.tolist() == positions_by_hand(ids, pad)


def test_model_uses_those_positions_by_default():
    torch.manual_seed(0)
    m = RobertaModel(RobertaConfig(**SMALL, pad_token_id=3, max_position_embeddings=20)).eval()
    ids = torch.tensor([[5, 6, 3, 7, 3], [3, 8, 9, 10, 11]])
    with torch.no_grad():
        default = m(ids)
        explicit = m(ids, position_ids=torch.tensor(positions_by_hand(ids.tolist(), 3)))
        shifted = m(ids, position_ids=torch.tensor(positions_by_hand(ids.tolist(), 3)) + 1)
    assert torch.equal(default, explicit)
    assert not torch.allclose(default, shifted)


def test_pad_row_of_the_position_table_is_zero_and_gets_no_gradient():
    torch.manual_seed(1)
    cfg = RobertaConfig(**SMALL, pad_token_id=2, max_position_embeddings=12)
    m = RobertaModel(cfg)
    table = m.embeddings.position_embeddings
    assert table.weight.shape == (12, 16) and torch.equal(table.weight[2], torch.zeros(16))
    ids = torch.tensor([[5, 6, 2, 2], [2, 7, 8, 9]])
    m(ids, attention_mask=(ids != 2).long()).pow(2).sum().backward()
    assert torch.equal(table.weight.grad[2], torch.zeros(16))
    assert table.weight.grad[3].abs().sum() > 0  # the first real position does learn


def test_config_defaults_are_roberta_bases():
    c = RobertaConfig(**SMALL)
    assert c.max_position_embeddings == 514 and c.type_vocab_size == 1 and c.layer_norm_eps == 1e-5
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (1, 0, 2) and c.model_type == "roberta"
    assert c.max_input_length == 512  # positions 2 .. 513
    assert RobertaConfig(**SMALL, pad_token_id=4, max_position_embeddings=20).max_input_length == 15
    assert c.to_hub_dict()["architectures"] == ["RobertaModel"]
    assert c.to_hub_dict("RobertaForSequenceClassification")["architectures"] == ["RobertaForSequenceClassification"]
    m = RobertaModel(RobertaConfig(**SMALL, max_position_embeddings=10))
    assert m.max_input_length() == 8
    m(torch.full((1, 8), 5))
    with pytest.raises(ValueError, match="exceeds the model's 8 positions"):
        m(torch.full((1, 9), 5))


@pytest.mark.parametrize("kw", [dict(pad_token_id=None), dict(pad_token_id=-1), dict(pad_token_id=30),
                                dict(pad_token_id=5, max_position_embeddings=6),
                                dict(pad_token_id=5, max_position_embeddings=5)])
def test_bad_pad_or_position_count_is_refused(kw):
    with pytest.raises(hub.CheckpointError):
        RobertaConfig(**{**SMALL, **kw})


@pytest.mark.parametrize("kw", [dict(pad_token_id=0, max_position_embeddings=2),
                                dict(pad_token_id=29, max_position_embeddings=31)])
def test_smallest_valid_configs(kw):
    c = RobertaConfig(**{**SMALL, **kw})
    assert c.max_input_length == 1
    m = RobertaModel(c).eval()
    assert m(torch.tensor([[5]])).shape == (1, 1, 16)


def test_classification_head_by_hand():
    torch.manual_seed(2)
    cfg = RobertaConfig(**SMALL, id2label={"0": "a", "1": "b", "2": "c"})
    m = RobertaForSequenceClassification(cfg).eval()
    ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        logits = m(ids, attention_mask=mask)
        h = m.roberta(ids, attention_mask=mask)
        head = m.classifier
        x = torch.tanh(h[:, 0] @ head.dense.weight.T + head.dense.bias)  # on <s>, the first token
        want = x @ head.out_proj.weight.T + head.out_proj.bias
        # no attention mask: the same as an all-ones mask
        assert torch.equal(m(ids[:1]), m(ids[:1], attention_mask=torch.ones(1, 5, dtype=torch.long)))
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-6)
    # a new head: BERT's init, N(0, initializer_range) weights and zero biases; no pooler anywhere
    assert torch.equal(head.dense.bias, torch.zeros(16)) and torch.equal(head.out_proj.bias, torch.zeros(3))
    assert head.dense.weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert m.roberta.pooler is None and not any("pooler" in k for k in m.state_dict())


def test_head_dropout_is_classifier_dropout_else_hidden_dropout():
    ids = torch.tensor([[0, 5, 6, 2]])
    base = dict(SMALL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(3)
    m = RobertaForSequenceClassification(RobertaConfig(**base)).train()
    assert torch.equal(m(ids), m(ids))  # no dropout anywhere
    m = RobertaForSequenceClassification(RobertaConfig(**base, classifier_dropout=0.9)).train()
    outs = [m(ids) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # the head's own rate
    m = RobertaForSequenceClassification(RobertaConfig(**dict(base, hidden_dropout_prob=0.9),
                                                       classifier_dropout=0.0)).train()
    h = m.roberta(ids)
    with torch.no_grad():
        assert torch.equal(m.classifier(h), m.classifier(h))  # 0 given: the head does not fall back to 0.9
        m.eval()
        assert torch.equal(m(ids), m(ids))


def test_from_pretrained_labels():
    m = RobertaForSequenceClassification.from_pretrained(TINY_CLS, num_labels=3)  # the checkpoint's own names kept
    assert m.config.id2label == {"0": "negative", "1": "neutral", "2": "positive"}
    torch.manual_seed(4)
    m = RobertaForSequenceClassification.from_pretrained(TINY, num_labels=3)
    assert m.config.id2label == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert m.classifier.out_proj.weight.shape == (3, 32)
    m = RobertaForSequenceClassification.from_pretrained(TINY, id2label={0: "x", 1: "y"})  # no label2id needed
    assert m.config.id2label == {"0": "x", "1": "y"} and m.config.num_labels == 2
    m = RobertaForSequenceClassification.from_pretrained(TINY, num_labels=2, id2label={0: "x", 1: "y"},
                                                         label2id={"x": 0, "y": 1}, problem_type="regression")
    assert m.config.problem_type == "regression" and m.config.id2label == {"0": "x", "1": "y"}
    assert RobertaForSequenceClassification.from_pretrained(TINY_CLS).config.problem_type is None
    with pytest.raises(ValueError, match="not the inverse"):
        RobertaForSequenceClassification.from_pretrained(TINY, id2label={0: "x", 1: "y"}, label2id={"x": 1, "y": 0})
    m = RobertaForSequenceClassification.from_pretrained(TINY_CLS, classifier_dropout=0.25, use_sdpa=False)
    assert m.config.classifier_dropout == 0.25 and m.config.use_sdpa is False  # overrides reach the config
    m = RobertaForSequenceClassification.from_pretrained(TINY_CLS, dtype=torch.float64)
    assert m.classifier.dense.weight.dtype == torch.float64
    assert RobertaModel.from_pretrained(TINY).max_input_length() == 38


def test_save_pretrained_returns_the_directory_it_wrote(tmp_path):
    torch.manual_seed(5)
    m = RobertaForSequenceClassification(RobertaConfig(**SMALL)).eval()
    out = m.save_pretrained(tmp_path / "cls")
    assert Path(out) == tmp_path / "cls" and (Path(out) / "model.safetensors").is_file()
    again = RobertaForSequenceClassification.from_pretrained(out).eval()
    ids = torch.tensor([[0, 5, 6, 2]])
    with torch.no_grad():
        assert torch.equal(again(ids), m(ids))
