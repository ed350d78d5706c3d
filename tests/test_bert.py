"""BERT: golden outputs of transformers' BertModel, the real all-MiniLM-L6-v2 against sentence-transformers,
padding/batch-order properties, hub layouts, classifier head and freezing, and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from minillm import hub
from minillm.models.bert import BertConfig, BertForSequenceClassification, BertModel, sentence_embeddings
from minillm.losses import classification_loss, mean_pool
from minillm.train.freezing import freeze_below_layer, freeze_by_name
from minillm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
TINY = ROOT / "weights" / "tiny-bert"
MINILM = ROOT / "weights" / "all-MiniLM-L6-v2"
ATOL = 1e-4  # fp32 bar for hidden states against transformers


def golden(name):
    return load_file(str(GOLDEN / f"encoders_{name}.safetensors"))


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_tiny_bert_matches_transformers_golden(use_sdpa):
    g = golden("tiny-bert")
    m = BertModel.from_pretrained(TINY, use_sdpa=use_sdpa).eval()
    with torch.no_grad():
        out = m(g["input_ids"], attention_mask=g["attention_mask"], token_type_ids=g["token_type_ids"],
                return_pooled=True)
        plain = m(g["rand_ids"])
    real = g["attention_mask"].bool()
    # pad positions are computed but meaningless; compare real tokens (transformers computes them the same way)
    torch.testing.assert_close(out.last_hidden_state[real], g["last_hidden_state"][real], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooler_output, g["pooler_output"], atol=ATOL, rtol=0)
    torch.testing.assert_close(plain, g["rand_last_hidden_state"], atol=ATOL, rtol=0)


def test_sdpa_and_math_paths_agree():
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=64)
    a = BertModel(BertConfig(**cfg, use_sdpa=True)).eval()
    b = BertModel(BertConfig(**cfg, use_sdpa=False)).eval()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        torch.testing.assert_close(a(ids, mask), b(ids, mask), atol=1e-5, rtol=0)  # same math, fused vs written out


_CACHE = {}


def _tiny() -> BertModel:
    if "m" not in _CACHE:
        _CACHE["m"] = BertModel.from_pretrained(TINY).eval()
    return _CACHE["m"]


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 10), min_size=1, max_size=4), extra=st.integers(1, 5), seed=st.integers(0, 99))
def test_pads_do_not_change_real_tokens(lengths, extra, seed):
    m = _tiny()
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(5, m.config.vocab_size, (len(lengths), T + extra), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    with torch.no_grad():
        padded = m(ids, attention_mask=mask)
        for i, n in enumerate(lengths):
            alone = m(ids[i:i + 1, :n])
            torch.testing.assert_close(padded[i, :n], alone[0], atol=1e-5, rtol=0)  # pads are invisible


def test_outputs_independent_of_batch_order():
    g = golden("tiny-bert")
    m = BertModel.from_pretrained(TINY).eval()
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        a = m(g["input_ids"], g["attention_mask"], g["token_type_ids"])
        b = m(g["input_ids"][perm], g["attention_mask"][perm], g["token_type_ids"][perm])
    torch.testing.assert_close(a[perm], b, atol=1e-6, rtol=0)


def test_tokenizer_of_tiny_bert_is_wordpiece_with_cls_sep():
    tok = Tokenizer.from_pretrained(TINY)
    assert tok.tokenize("I like cats", add_special_tokens=True)[0] == "[CLS]"
    assert tok.tokenize("I like cats", add_special_tokens=True)[-1] == "[SEP]"
    assert tok.pad_token_id == 0
    g = golden("tiny-bert")
    ids = tok.encode("I like cats")
    assert ids == g["input_ids"][0, :len(ids)].tolist()  # the ids the golden batch was made from


def test_save_pretrained_round_trip_and_names(tmp_path):
    m = BertModel.from_pretrained(TINY)
    m.save_pretrained(tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "embeddings.word_embeddings.weight" in saved and not any(k.startswith("bert.") for k in saved)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["BertModel"] and "use_sdpa" not in cfg
    m2 = BertModel.from_pretrained(tmp_path / "out")
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def _copy_with_state(tmp_path, state, config=None) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(TINY / "config.json", d / "config.json")
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    save_file(state, str(d / "model.safetensors"))
    return d


def test_task_layout_with_prefix_and_heads_loads(tmp_path):
    base = load_file(str(TINY / "model.safetensors"))
    state = {"bert." + k: v for k, v in base.items()}
    state["cls.predictions.bias"] = torch.zeros(base["embeddings.word_embeddings.weight"].shape[0])
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]
    m = BertModel.from_pretrained(_copy_with_state(tmp_path, state))
    assert torch.equal(m.embeddings.word_embeddings.weight, base["embeddings.word_embeddings.weight"])


def test_stray_tensor_missing_tensor_and_shape_are_errors(tmp_path):
    base = load_file(str(TINY / "model.safetensors"))
    bad = dict(base, **{"encoder.layer.0.extra.weight": torch.zeros(2)})
    with pytest.raises(hub.CheckpointError, match="unexpected tensor 'encoder.layer.0.extra.weight'"):
        BertModel.from_pretrained(_copy_with_state(tmp_path / "a", bad) if (tmp_path / "a").mkdir() is None else None)
    missing = {k: v for k, v in base.items() if k != "encoder.layer.1.output.dense.bias"}
    with pytest.raises(hub.CheckpointError, match="missing tensor 'encoder.layer.1.output.dense.bias'"):
        BertModel.from_pretrained(_copy_with_state(tmp_path / "b", missing) if (tmp_path / "b").mkdir() is None else None)


def test_other_architecture_is_refused():
    with pytest.raises(hub.CheckpointError, match="model_type 'distilbert'.*not 'bert'"):
        BertModel.from_pretrained(ROOT / "weights" / "tiny-distilbert")
    with pytest.raises(hub.CheckpointError, match="model_type 'vit'"):
        BertModel.from_pretrained(ROOT / "weights" / "tiny-vit")


def test_bad_ids_and_token_types_are_clear_errors():
    m = BertModel.from_pretrained(TINY)
    V = m.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {V} outside the vocabulary"):
        m(torch.tensor([[1, V]]))
    with pytest.raises(ValueError, match=r"token_type_ids: value 2 outside \[0, 2\)"):
        m(torch.tensor([[1, 2]]), token_type_ids=torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match=r"token_type_ids: value -1 outside"):
        m(torch.tensor([[1, 2]]), token_type_ids=torch.tensor([[0, -1]]))
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        m(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        m(torch.ones(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4, dtype=torch.long))


def test_mean_pooling_ignores_pads():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(mean_pool(h, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_classifier_single_and_multi_label_losses():
    torch.manual_seed(0)
    m = BertForSequenceClassification.from_pretrained(TINY, num_labels=3).eval()
    assert m.classifier.weight.shape == (3, 32)
    ids = torch.randint(5, 100, (2, 6))
    with torch.no_grad():
        logits = m(ids)
        loss = classification_loss(logits, torch.tensor([2, 0]), m.config.problem_type)
        # cross-entropy written out: −log softmax(z)_y, averaged
        ce = -(logits.log_softmax(-1)[0, 2] + logits.log_softmax(-1)[1, 0]) / 2
        assert math.isclose(loss.item(), ce.item(), abs_tol=1e-6)
        y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
        loss_ml = classification_loss(logits, y, m.config.problem_type)
        p = torch.sigmoid(logits)
        bce = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
        assert math.isclose(loss_ml.item(), bce.item(), abs_tol=1e-6)


def test_freezing_helpers():
    m = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=4,
                                                 num_attention_heads=2, intermediate_size=20))
    freeze_below_layer(m, 2)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert all(n.startswith("bert.embeddings.") or ".layer.0." in n or ".layer.1." in n for n in frozen)
    assert any(".layer.1." in n for n in frozen) and any(n.startswith("bert.embeddings.") for n in frozen)
    assert not any(".layer.2." in n or "classifier" in n or "pooler" in n for n in frozen)
    assert freeze_by_name(m, [r"^bert\.pooler\."]) == 2
    assert not m.bert.pooler.dense.weight.requires_grad


# ---- the real all-MiniLM-L6-v2 ----

minilm = pytest.mark.skipif(not (MINILM / "model.safetensors").is_file(),
                            reason="weights/all-MiniLM-L6-v2 absent: run python scripts/fetch_minilm.py")


@pytest.mark.minilm
@minilm
def test_minilm_sentence_embeddings_match_sentence_transformers():
    from safetensors import safe_open
    with safe_open(str(GOLDEN / "encoders_minilm.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["info"])
        ref = f.get_tensor("embeddings")
    sentences = meta["sentences"]
    m = BertModel.from_pretrained(MINILM).eval()
    tok = Tokenizer.from_pretrained(MINILM)
    emb = sentence_embeddings(m, tok, sentences, max_length=int(meta["max_seq_length"]), batch_size=4)
    cos = torch.nn.functional.cosine_similarity(emb, ref, dim=-1)
    assert cos.min() >= 0.99999, f"cosine to sentence-transformers: min {cos.min().item():.7f} (bar 0.99999)"
    assert (emb - ref).abs().max() < 1e-5  # fp32 elementwise


@pytest.mark.reference
@pytest.mark.minilm
@minilm
def test_minilm_hidden_states_match_transformers_live():
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertModel.from_pretrained(str(MINILM)).eval()
    m = BertModel.from_pretrained(MINILM).eval()
    tok = Tokenizer.from_pretrained(MINILM)
    enc = tok(["I like cats", "A monkey is playing drums in the rain."])
    with torch.no_grad():
        r = ref(**enc)
        o = m(enc["input_ids"], enc["attention_mask"], return_pooled=True)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(o.last_hidden_state[real], r.last_hidden_state[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(o.pooler_output, r.pooler_output, atol=ATOL, rtol=0)


# ---- live comparisons on other configs ----

CONFIGS = [
    dict(vocab_size=97, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40),
    dict(vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=8, intermediate_size=96,
         hidden_act="gelu_new", type_vocab_size=3, layer_norm_eps=1e-6, max_position_embeddings=40),
    dict(vocab_size=50, hidden_size=30, num_hidden_layers=2, num_attention_heads=5, intermediate_size=31,
         hidden_act="relu", type_vocab_size=1),
]


@pytest.mark.reference
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_random_configs_match_transformers_live(cfg, use_sdpa, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = transformers.BertModel(transformers.BertConfig(**cfg, initializer_range=0.3)).eval()
    ref.save_pretrained(tmp_path)
    m = BertModel.from_pretrained(tmp_path, use_sdpa=use_sdpa).eval()
    ids = torch.randint(0, cfg["vocab_size"], (3, 11))
    types = torch.randint(0, cfg.get("type_vocab_size", 2), (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        r = ref(ids, attention_mask=mask, token_type_ids=types)
        o = m(ids, attention_mask=mask, token_type_ids=types, return_pooled=True)
    real = mask.bool()
    torch.testing.assert_close(o.last_hidden_state[real], r.last_hidden_state[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(o.pooler_output, r.pooler_output, atol=ATOL, rtol=0)


@pytest.mark.reference
@pytest.mark.parametrize("problem", ["single_label_classification", "multi_label_classification"])
def test_classifier_save_loads_in_transformers(problem, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    m = BertForSequenceClassification.from_pretrained(TINY, num_labels=4, problem_type=problem).eval()
    m.save_pretrained(tmp_path)
    ref = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(5, 100, (3, 7))
    labels = torch.tensor([0, 3, 1]) if problem.startswith("single") else torch.randint(0, 2, (3, 4)).float()
    with torch.no_grad():
        logits = m(ids)
        loss = classification_loss(logits, labels, m.config.problem_type)
        r = ref(ids, labels=labels)
    torch.testing.assert_close(logits, r.logits, atol=ATOL, rtol=0)
    assert abs(loss.item() - r.loss.item()) < 1e-5


@pytest.mark.reference
def test_real_configs_names_and_shapes_equal_transformers():
    """bert-base-uncased and all-MiniLM-L6-v2 configs: every parameter name and shape as transformers has them."""
    transformers = pytest.importorskip("transformers")
    for cfg in (dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
                dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)):
        with torch.device("meta"):
            ref = transformers.BertModel(transformers.BertConfig(**cfg))
            ours = BertModel(BertConfig(**cfg))
        r = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == r
