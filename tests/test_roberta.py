"""RoBERTa: golden outputs of transformers' RobertaModel / RobertaForSequenceClassification, positions that
start at pad + 1 and skip pads, padding invariance, the byte-level BPE tokenizer, hub layouts, saving, and
bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from minillm import hub
from minillm.losses import classification_loss
from minillm.models.roberta import (RobertaConfig, RobertaForSequenceClassification, RobertaModel,
                                    position_ids_from_input_ids)
from minillm.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
TINY = ROOT / "weights" / "tiny-roberta"
TINY_CLS = ROOT / "weights" / "tiny-roberta-classifier"
ATOL = 1e-4  # fp32 bar for hidden states and logits against transformers


def golden(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / f"roberta_{name}.safetensors"))


_CACHE: dict = {}


def _tiny() -> RobertaModel:
    if "m" not in _CACHE:
        _CACHE["m"] = RobertaModel.from_pretrained(TINY).eval()
    return _CACHE["m"]


# ---- golden outputs ----

@pytest.mark.parametrize("use_sdpa", [True, False])
def test_tiny_roberta_matches_transformers_golden(use_sdpa):
    g = golden("tiny-roberta")
    m = RobertaModel.from_pretrained(TINY, use_sdpa=use_sdpa).eval()
    with torch.no_grad():
        out = m(g["input_ids"], attention_mask=g["attention_mask"], return_pooled=True)
        plain = m(g["rand_ids"])
    real = g["attention_mask"].bool()  # pad positions are computed but meaningless: compare real tokens
    torch.testing.assert_close(out.last_hidden_state[real], g["last_hidden_state"][real], atol=ATOL, rtol=0)
    # row 2 is left-padded: its <s> sits at a later index, so compare the pooled vector on rows 0-1 only
    torch.testing.assert_close(out.pooler_output[:2], g["pooler_output"][:2], atol=ATOL, rtol=0)
    torch.testing.assert_close(plain, g["rand_last_hidden_state"], atol=ATOL, rtol=0)


def test_tiny_classifier_matches_transformers_golden():
    g = golden("tiny-roberta-classifier")
    m = RobertaForSequenceClassification.from_pretrained(TINY_CLS).eval()
    assert m.config.id2label == {"0": "negative", "1": "neutral", "2": "positive"}
    with torch.no_grad():
        logits = m(g["input_ids"], attention_mask=g["attention_mask"])
        h = m.roberta(g["input_ids"], attention_mask=g["attention_mask"])
        plain = m(g["rand_ids"])
    assert logits.shape == (3, 3)
    real = g["attention_mask"].bool()
    torch.testing.assert_close(h[real], g["last_hidden_state"][real], atol=ATOL, rtol=0)
    # rows 0-1 are right-padded, so <s> is at index 0 as in transformers; row 2's index 0 is a pad there too
    torch.testing.assert_close(logits, g["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(plain, g["rand_logits"], atol=ATOL, rtol=0)


# ---- positions ----

def test_position_ids_start_after_pad_and_skip_pads():
    ids = torch.tensor([[0, 5, 6, 2, 1, 1],
                        [1, 1, 0, 7, 8, 2]])
    assert position_ids_from_input_ids(ids, 1).tolist() == [[2, 3, 4, 5, 1, 1],
                                                            [1, 1, 2, 3, 4, 5]]


def test_positions_from_zero_would_not_match_the_golden():
    """The golden only matches with positions counted from pad + 1: explicit 0-based positions (BERT's) differ,
    explicit pad + 1-based positions agree with the default."""
    g = golden("tiny-roberta")
    m = _tiny()
    ids = g["rand_ids"]  # no pads
    T = ids.shape[1]
    with torch.no_grad():
        bert_like = m(ids, position_ids=torch.arange(T)[None])
        roberta_like = m(ids, position_ids=torch.arange(T)[None] + 2)
    assert (bert_like - g["rand_last_hidden_state"]).abs().max() > 0.1
    torch.testing.assert_close(roberta_like, g["rand_last_hidden_state"], atol=ATOL, rtol=0)


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 10), min_size=1, max_size=4), extra=st.integers(1, 5),
       left=st.booleans(), seed=st.integers(0, 99))
def test_pads_do_not_change_real_tokens(lengths, extra, left, seed):
    """Right or left padding: each real token's hidden state equals the unpadded row's (positions skip pads)."""
    m = _tiny()
    g = torch.Generator().manual_seed(seed)
    T = max(lengths) + extra
    ids = torch.randint(3, m.config.vocab_size, (len(lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, (T - n if left else 0):(T if left else n)] = 1
    ids[mask == 0] = m.config.pad_token_id
    with torch.no_grad():
        padded = m(ids, attention_mask=mask)
        for i in range(len(lengths)):
            row = mask[i].bool()
            alone = m(ids[i:i + 1, row])
            torch.testing.assert_close(padded[i, row], alone[0], atol=1e-5, rtol=0)


def test_classifier_padded_rows_equal_unpadded_rows():
    g = golden("tiny-roberta-classifier")
    m = RobertaForSequenceClassification.from_pretrained(TINY_CLS).eval()
    with torch.no_grad():
        padded = m(g["input_ids"][:2], attention_mask=g["attention_mask"][:2])
        for i in range(2):
            row = g["attention_mask"][i].bool()
            torch.testing.assert_close(padded[i], m(g["input_ids"][i:i + 1, row])[0], atol=1e-5, rtol=0)


# ---- tokenizer ----

def test_tokenizer_is_byte_level_bpe_with_s_and_slash_s():
    tok = Tokenizer.from_pretrained(TINY)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.special["mask_token"] == "<mask>" and tok.special["unk_token"] == "<unk>"
    pieces = tok.tokenize("I like cats", add_special_tokens=True)
    assert pieces[0] == "<s>" and pieces[-1] == "</s>" and "Ġlike" in pieces  # Ġ: a byte-level space
    assert tok.decode(tok.encode("Café 🙂 is great"), skip_special_tokens=True) == "Café 🙂 is great"
    g = golden("tiny-roberta")
    ids = tok.encode("I like cats")
    assert ids == g["input_ids"][0, :len(ids)].tolist()  # the ids the golden batch was made from
    enc = tok(["I like cats", "hi"])
    assert enc["input_ids"][1, -1].item() == 1 and enc["attention_mask"][1, -1].item() == 0


# ---- hub layouts, save, errors ----

def _ckpt(tmp_path: Path, state: dict, config: dict, name: str = "ckpt") -> Path:
    d = tmp_path / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    save_file(state, str(d / "model.safetensors"))
    return d


def test_base_model_reads_classifier_and_masked_lm_layouts(tmp_path):
    cls_state = load_file(str(TINY_CLS / "model.safetensors"))
    assert any(k.startswith("roberta.") for k in cls_state) and "classifier.out_proj.weight" in cls_state
    m = RobertaModel.from_pretrained(TINY_CLS)
    assert m.pooler is None
    assert torch.equal(m.embeddings.word_embeddings.weight, cls_state["roberta.embeddings.word_embeddings.weight"])
    base = load_file(str(TINY / "model.safetensors"))
    H, V = base["embeddings.word_embeddings.weight"].shape[1], base["embeddings.word_embeddings.weight"].shape[0]
    mlm = {"roberta." + k: v for k, v in base.items() if not k.startswith("pooler.")}
    mlm.update({"lm_head.dense.weight": torch.zeros(H, H), "lm_head.dense.bias": torch.zeros(H),
                "lm_head.layer_norm.weight": torch.ones(H), "lm_head.layer_norm.bias": torch.zeros(H),
                "lm_head.bias": torch.zeros(V), "roberta.embeddings.position_ids": torch.arange(40)[None]})
    cfg = json.loads((TINY / "config.json").read_text())
    m2 = RobertaModel.from_pretrained(_ckpt(tmp_path, mlm, {**cfg, "architectures": ["RobertaForMaskedLM"]}))
    assert torch.equal(m2.encoder.layer[1].output.dense.weight, base["encoder.layer.1.output.dense.weight"])


def test_classifier_from_base_checkpoint_gets_a_new_head(tmp_path):
    torch.manual_seed(0)
    m = RobertaForSequenceClassification.from_pretrained(
        TINY, num_labels=4, problem_type="multi_label_classification",
        id2label={str(i): n for i, n in enumerate("abcd")}, label2id={n: i for i, n in enumerate("abcd")})
    base = load_file(str(TINY / "model.safetensors"))
    assert torch.equal(m.roberta.encoder.layer[0].attention.self.query.weight,
                       base["encoder.layer.0.attention.self.query.weight"])
    assert m.classifier.out_proj.weight.shape == (4, 32) and m.config.num_labels == 4
    m.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["RobertaForSequenceClassification"] and cfg["model_type"] == "roberta"
    assert cfg["id2label"] == {"0": "a", "1": "b", "2": "c", "3": "d"} and cfg["label2id"]["d"] == 3
    assert cfg["problem_type"] == "multi_label_classification" and "use_sdpa" not in cfg
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "classifier.dense.weight" in saved and all(k.startswith(("roberta.", "classifier.")) for k in saved)
    assert not any("pooler" in k for k in saved)
    m2 = RobertaForSequenceClassification.from_pretrained(tmp_path / "out")
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    with pytest.raises(ValueError, match="id2label has 2 labels, num_labels=3"):
        RobertaForSequenceClassification.from_pretrained(TINY, num_labels=3, id2label={"0": "a", "1": "b"})


def test_base_save_round_trip(tmp_path):
    m = _tiny()
    m.save_pretrained(tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "pooler.dense.weight" in saved and not any(k.startswith("roberta.") for k in saved)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["RobertaModel"] and cfg["pad_token_id"] == 1 and cfg["type_vocab_size"] == 1
    m2 = RobertaModel.from_pretrained(tmp_path / "out")
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_bad_checkpoints_are_named_errors_and_leave_the_model_untouched(tmp_path):
    with pytest.raises(hub.CheckpointError, match="model_type 'bert'.*not 'roberta'"):
        RobertaModel.from_pretrained(ROOT / "weights" / "tiny-bert")
    with pytest.raises(hub.CheckpointError, match="model_type 'bert'.*not 'roberta'"):
        RobertaForSequenceClassification.from_pretrained(ROOT / "weights" / "tiny-bert", num_labels=2)
    base = load_file(str(TINY / "model.safetensors"))
    cfg = json.loads((TINY / "config.json").read_text())
    missing = {k: v for k, v in base.items() if k != "encoder.layer.1.output.dense.bias"}
    with pytest.raises(hub.CheckpointError, match="missing tensor 'encoder.layer.1.output.dense.bias'"):
        RobertaModel.from_pretrained(_ckpt(tmp_path, missing, cfg, "a"))
    stray = dict(base, **{"encoder.layer.0.extra.weight": torch.zeros(2)})
    with pytest.raises(hub.CheckpointError, match="unexpected tensor 'encoder.layer.0.extra.weight'"):
        RobertaModel.from_pretrained(_ckpt(tmp_path, stray, cfg, "b"))
    # the strict loader checks everything before copying: a model loaded into and refused is unchanged
    m = RobertaModel.from_pretrained(TINY)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    changed = {k: v + 1 for k, v in missing.items()}
    with pytest.raises(hub.CheckpointError, match="missing tensor 'encoder.layer.1.output.dense.bias'"):
        hub.load_state_dict_strict(m, changed)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    with pytest.raises(hub.CheckpointError, match="missing required key"):
        RobertaModel.from_pretrained(_ckpt(tmp_path, base, {"model_type": "roberta", "vocab_size": 400}, "c"))


def test_bad_inputs_are_clear_errors():
    m = _tiny()
    V = m.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {V} outside the vocabulary"):
        m(torch.tensor([[0, V]]))
    with pytest.raises(ValueError, match=r"token_type_ids: value 1 outside \[0, 1\)"):
        m(torch.tensor([[0, 5]]), token_type_ids=torch.tensor([[0, 1]]))
    # 40 position rows, positions from pad + 1 = 2: at most 38 tokens
    m(torch.full((1, 38), 5))
    with pytest.raises(ValueError, match="exceeds the model's 38 positions"):
        m(torch.full((1, 39), 5))
    with pytest.raises(hub.CheckpointError, match="pad_token_id"):
        RobertaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=8, pad_token_id=None)


def test_lora_targets_name_every_attention_and_mlp_linear():
    from minillm.lora import apply_lora
    m = RobertaForSequenceClassification.from_pretrained(TINY_CLS)
    apply_lora(m, list(m.lora_targets), r=2)
    wrapped = {n for n, mod in m.named_modules() if hasattr(mod, "lora_A")}
    assert len(wrapped) == 2 * 6  # q, k, v, attention.output.dense, intermediate.dense, output.dense per layer
    assert not any(n.startswith("classifier") for n in wrapped)


# ---- live comparisons against transformers ----

CONFIGS = [
    dict(vocab_size=97, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
         max_position_embeddings=30, type_vocab_size=1, layer_norm_eps=1e-5),
    dict(vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=8, intermediate_size=96,
         hidden_act="gelu_new", type_vocab_size=2, layer_norm_eps=1e-6, max_position_embeddings=40),
    dict(vocab_size=50, hidden_size=30, num_hidden_layers=2, num_attention_heads=5, intermediate_size=31,
         hidden_act="relu", type_vocab_size=1, pad_token_id=4, max_position_embeddings=20),
]


@pytest.mark.reference
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_random_configs_match_transformers_live(cfg, use_sdpa, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = transformers.RobertaModel(transformers.RobertaConfig(**cfg, initializer_range=0.3)).eval()
    ref.save_pretrained(tmp_path)
    m = RobertaModel.from_pretrained(tmp_path, use_sdpa=use_sdpa).eval()
    pad = cfg.get("pad_token_id", 1)
    ids = torch.randint(5, cfg["vocab_size"], (3, 11))
    types = torch.randint(0, cfg["type_vocab_size"], (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, :6] = 0  # left padding
    ids[mask == 0] = pad
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
    m = RobertaForSequenceClassification.from_pretrained(TINY, num_labels=4, problem_type=problem).eval()
    m.save_pretrained(tmp_path)
    ref = transformers.RobertaForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(5, 300, (3, 7))
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    ids[mask == 0] = 1
    labels = torch.tensor([0, 3, 1]) if problem.startswith("single") else torch.randint(0, 2, (3, 4)).float()
    with torch.no_grad():
        logits = m(ids, attention_mask=mask)
        loss = classification_loss(logits, labels, m.config.problem_type)
        r = ref(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(logits, r.logits, atol=ATOL, rtol=0)
    assert abs(loss.item() - r.loss.item()) < 1e-5


@pytest.mark.reference
def test_classifier_checkpoint_matches_transformers_live():
    transformers = pytest.importorskip("transformers")
    ref = transformers.RobertaForSequenceClassification.from_pretrained(str(TINY_CLS)).eval()
    m = RobertaForSequenceClassification.from_pretrained(TINY_CLS).eval()
    tok = Tokenizer.from_pretrained(TINY_CLS)
    enc = tok(["What a great day :)", "Terrible service, I waited an hour.", "ok"])
    with torch.no_grad():
        torch.testing.assert_close(m(enc["input_ids"], enc["attention_mask"]), ref(**enc).logits, atol=ATOL, rtol=0)


@pytest.mark.reference
def test_tokenizer_ids_equal_transformers_live():
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(TINY))
    tok = Tokenizer.from_pretrained(TINY)
    for s in ["I like cats", "Café 🙂 is great", "  two  spaces", "a <mask> b", "It is very cold outside."]:
        assert tok.encode(s) == ref(s)["input_ids"], s
    assert tok.tok.encode("a", "b").ids == ref("a", "b")["input_ids"]  # <s> A </s></s> B </s>


@pytest.mark.reference
def test_roberta_base_names_and_shapes_equal_transformers():
    """roberta-base's config: every parameter name and shape as transformers has them (no weights needed)."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)
    with torch.device("meta"):
        ref = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**cfg, num_labels=3))
        ours = RobertaForSequenceClassification(RobertaConfig(**cfg, id2label={"0": "a", "1": "b", "2": "c"}))
    r = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith(("position_ids", "token_type_ids"))}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == r
