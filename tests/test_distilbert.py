"""DistilBERT: golden outputs of transformers' DistilBertModel (learned and sinusoidal positions), pads,
hub layouts, the book's partial freezing, the classifier head, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minillm import hub
from minillm.models.distilbert import (DistilBertConfig, DistilBertForSequenceClassification, DistilBertModel,
                                       sinusoidal_positions)
from minillm.losses import classification_loss
from minillm.train.freezing import count_trainable, freeze_before, freeze_below_layer

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
ATOL = 1e-4  # fp32 bar for hidden states against transformers


@pytest.mark.parametrize("name", ["tiny-distilbert", "tiny-distilbert-sinusoidal"])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_matches_transformers_golden(name, use_sdpa):
    g = load_file(str(GOLDEN / f"encoders_{name}.safetensors"))
    m = DistilBertModel.from_pretrained(ROOT / "weights" / name, use_sdpa=use_sdpa).eval()
    assert m.config.hidden_size == 32
    with torch.no_grad():
        out = m(g["input_ids"], attention_mask=g["attention_mask"])
        plain = m(g["rand_ids"])
    real = g["attention_mask"].bool()
    torch.testing.assert_close(out[real], g["last_hidden_state"][real], atol=ATOL, rtol=0)
    torch.testing.assert_close(plain, g["rand_last_hidden_state"], atol=ATOL, rtol=0)


def test_sinusoidal_table_equals_transformers():
    g = load_file(str(GOLDEN / "encoders_tiny-distilbert-sinusoidal.safetensors"))
    torch.testing.assert_close(sinusoidal_positions(64, 32), g["position_embeddings"], atol=1e-6, rtol=0)
    m = DistilBertModel(DistilBertConfig(vocab_size=10, dim=32, n_heads=4, hidden_dim=8, n_layers=1,
                                         max_position_embeddings=64, sinusoidal_pos_embds=True))
    torch.testing.assert_close(m.embeddings.position_embeddings.weight, g["position_embeddings"], atol=1e-6, rtol=0)
    assert not m.embeddings.position_embeddings.weight.requires_grad  # fixed, not learned


def test_pads_do_not_change_real_tokens():
    m = DistilBertModel.from_pretrained(ROOT / "weights" / "tiny-distilbert").eval()
    ids = torch.randint(5, m.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad():
        torch.testing.assert_close(m(ids, mask)[0, :4], m(ids[:1, :4])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(m(ids, mask)[1], m(ids[1:])[0], atol=1e-5, rtol=0)


def test_task_layout_loads_and_other_architecture_refused(tmp_path):
    src = ROOT / "weights" / "tiny-distilbert"
    base = load_file(str(src / "model.safetensors"))
    d = tmp_path / "mlm"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    state = {"distilbert." + k: v for k, v in base.items()}
    state["vocab_projector.bias"] = torch.zeros(3)
    state["vocab_transform.weight"] = torch.zeros(32, 32)
    save_file(state, str(d / "model.safetensors"))
    m = DistilBertModel.from_pretrained(d)
    assert torch.equal(m.transformer.layer[1].ffn.lin2.weight, base["transformer.layer.1.ffn.lin2.weight"])
    with pytest.raises(hub.CheckpointError, match="model_type 'bert'.*not 'distilbert'"):
        DistilBertModel.from_pretrained(ROOT / "weights" / "tiny-bert")


def test_bad_ids():
    m = DistilBertModel.from_pretrained(ROOT / "weights" / "tiny-distilbert")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m(torch.tensor([[0, m.config.vocab_size + 3]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m(torch.tensor([[-1, 2]]))


def test_book_partial_freezing():
    """The book freezes every parameter named before distilbert.transformer.layer.4: embeddings + layers 0-3."""
    cfg = DistilBertConfig(vocab_size=40, dim=16, n_heads=2, hidden_dim=24, n_layers=6, id2label={"0": "a", "1": "b", "2": "c"},
                           problem_type="multi_label_classification")
    m = DistilBertForSequenceClassification(cfg)
    n = freeze_before(m, "distilbert.transformer.layer.4")
    frozen = [k for k, p in m.named_parameters() if not p.requires_grad]
    assert n == len(frozen) == 4 + 4 * 16  # word + position embeddings, LayerNorm (w, b); 16 tensors per layer
    assert frozen[0] == "distilbert.embeddings.word_embeddings.weight"
    assert frozen[-1].startswith("distilbert.transformer.layer.3.")
    m2 = DistilBertForSequenceClassification(cfg)
    freeze_below_layer(m2, 4)
    assert [k for k, p in m2.named_parameters() if not p.requires_grad] == frozen
    trainable, total = count_trainable(m)
    assert 0 < trainable < total
    with pytest.raises(ValueError, match="no parameter name contains"):
        freeze_before(m, "bert.encoder.layer.4")


@pytest.mark.reference
@pytest.mark.parametrize("sinusoidal", [False, True])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_random_configs_match_transformers_live(sinusoidal, use_sdpa, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    cfg = transformers.DistilBertConfig(vocab_size=77, dim=48, n_layers=3, n_heads=6, hidden_dim=50,
                                        max_position_embeddings=30, sinusoidal_pos_embds=sinusoidal,
                                        activation="relu" if sinusoidal else "gelu", initializer_range=0.3)
    ref = transformers.DistilBertModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    m = DistilBertModel.from_pretrained(tmp_path, use_sdpa=use_sdpa).eval()
    ids = torch.randint(0, 77, (3, 13))
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    with torch.no_grad():
        r = ref(ids, attention_mask=mask).last_hidden_state
        o = m(ids, attention_mask=mask)
    torch.testing.assert_close(o[mask.bool()], r[mask.bool()], atol=ATOL, rtol=0)


@pytest.mark.reference
def test_classifier_save_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    m = DistilBertForSequenceClassification.from_pretrained(ROOT / "weights" / "tiny-distilbert", num_labels=5,
                                                            problem_type="multi_label_classification").eval()
    m.save_pretrained(tmp_path)
    names = load_file(str(tmp_path / "model.safetensors")).keys()
    assert {"pre_classifier.weight", "classifier.weight", "distilbert.embeddings.word_embeddings.weight"} <= set(names)
    ref = transformers.DistilBertForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(5, 100, (2, 6))
    y = torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 0, 0, 1]])
    with torch.no_grad():
        logits = m(ids)
        loss = classification_loss(logits, y, m.config.problem_type)
        r = ref(ids, labels=y)
    torch.testing.assert_close(logits, r.logits, atol=ATOL, rtol=0)
    assert abs(loss.item() - r.loss.item()) < 1e-5
    assert json.loads((tmp_path / "config.json").read_text())["problem_type"] == "multi_label_classification"


@pytest.mark.reference
def test_real_config_names_and_shapes_equal_transformers():
    """distilbert-base-uncased's config: every parameter name and shape as transformers has them."""
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        ref = transformers.DistilBertModel(transformers.DistilBertConfig())
        ours = DistilBertModel(DistilBertConfig())
    r = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == r
