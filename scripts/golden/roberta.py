"""Golden part `roberta`: tiny RoBERTa checkpoints built by transformers in the hub layout, a byte-level BPE
tokenizer trained here with `tokenizers`, and transformers' outputs on a padded batch.

Writes
  weights/tiny-roberta/              RobertaModel (base layout, no prefix, with pooler), 2 layers, 32 wide,
                                     40 positions (inputs up to 38 tokens: positions start at pad + 1 = 2)
  weights/tiny-roberta-classifier/   RobertaForSequenceClassification (`roberta.` + `classifier.*`, no pooler),
                                     3 labels named as cardiffnlp's sentiment model: negative, neutral, positive
  both with tokenizer.json (byte-level BPE, RobertaProcessing: <s> A </s>, <s> A </s></s> B </s>),
  tokenizer_config.json and special_tokens_map.json
  tests/golden/roberta_tiny-roberta.safetensors              inputs, last hidden states, pooler output
  tests/golden/roberta_tiny-roberta-classifier.safetensors   inputs, logits, last hidden states
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from golden.common import seed_all, write_golden

CORPUS = [
    "I like cats. Cats like warm places and quiet rooms.",
    "The movie was wonderful and the acting was superb!",
    "The movie was boring, the plot made no sense at all.",
    "What a great day :) the sun is out and everyone is happy.",
    "Terrible service, I waited an hour and the food was cold.",
    "It is cold outside. It is very cold outside.",
    "This response is helpful, polite and grammatically correct.",
    "this response is rude and full of grammar mistakes",
    "Café, naïve, résumé: bytes cover every character — even emoji 🙂.",
    "0 1 2 3 4 5 6 7 8 9 10 100 + - * / = ( ) ? ! . , ; :",
] * 3

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # roberta-base's ids 0, 1, 2, 3 and (here) 4
LABELS = ["negative", "neutral", "positive"]  # cardiffnlp/twitter-roberta-base-sentiment-latest
TEXTS = ["I like cats", "The movie was boring, the plot made no sense at all.", "Café 🙂 is great"]


def train_bpe():
    """A byte-level BPE tokenizer as roberta-base's: ByteLevel pre-tokenizer (no prefix space), the 256 byte
    symbols as the alphabet, merges learned from CORPUS, RobertaProcessing post-processor, <mask> stripping
    the space on its left. BpeTrainer breaks ties between equally frequent pairs by the pair itself, so the
    vocabulary is the same on every run (checked by regenerating)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=2, show_progress=False,
                                  special_tokens=[AddedToken(t, special=True, lstrip=(t == "<mask>"))
                                                  for t in SPECIALS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIALS] == list(range(len(SPECIALS)))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                      add_prefix_space=False)
    return tok


def save_tokenizer(tok, d: Path, max_len: int) -> None:
    tok.save(str(d / "tokenizer.json"))
    special = {"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "mask_token": "<mask>",
               "pad_token": "<pad>", "sep_token": "</s>", "unk_token": "<unk>"}
    conf = {**special, "model_max_length": max_len, "padding_side": "right", "add_prefix_space": False,
            "tokenizer_class": "RobertaTokenizer"}
    (d / "tokenizer_config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def text_batch(tok, V: int):
    """TEXTS encoded (<s> … </s>) and padded with <pad> = 1: rows 0-1 on the right, row 2 on the left
    (RoBERTa's positions skip pads, so both give the unpadded row's outputs); plus random ids without pads."""
    rows = [e.ids for e in tok.encode_batch(TEXTS)]
    T = max(len(r) for r in rows) + 2
    ids = torch.full((len(rows), T), 1, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if i == 2 else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    g = torch.Generator().manual_seed(13)
    rand_ids = torch.randint(3, V, (2, 20), generator=g)
    return ids, mask, rand_ids


def fresh_dir(root: Path, name: str) -> Path:
    d = root / "weights" / name
    shutil.rmtree(d, ignore_errors=True)
    return d


def config(tok, **kw):
    from transformers import RobertaConfig
    return RobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=40, initializer_range=0.2, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                         layer_norm_eps=1e-5, **kw)  # roberta-base's values (the class defaults are BERT's)


def make_base(root: Path, tok) -> None:
    from transformers import RobertaModel
    seed_all(5678)
    model = RobertaModel(config(tok), add_pooling_layer=True).eval()
    d = fresh_dir(root, "tiny-roberta")
    model.save_pretrained(d)
    save_tokenizer(tok, d, 38)
    ids, mask, rand_ids = text_batch(tok, model.config.vocab_size)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        plain = model(rand_ids)
    write_golden(root, "roberta_tiny-roberta", {
        "input_ids": ids, "attention_mask": mask, "last_hidden_state": out.last_hidden_state,
        "pooler_output": out.pooler_output, "rand_ids": rand_ids, "rand_last_hidden_state": plain.last_hidden_state},
        {"source": "transformers RobertaModel", "checkpoint": "weights/tiny-roberta", "texts": TEXTS})


def make_classifier(root: Path, tok) -> None:
    from transformers import RobertaForSequenceClassification
    seed_all(6789)
    cfg = config(tok, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    model = RobertaForSequenceClassification(cfg).eval()
    d = fresh_dir(root, "tiny-roberta-classifier")
    model.save_pretrained(d)
    save_tokenizer(tok, d, 38)
    ids, mask, rand_ids = text_batch(tok, cfg.vocab_size)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        plain = model(rand_ids).logits
    write_golden(root, "roberta_tiny-roberta-classifier", {
        "input_ids": ids, "attention_mask": mask, "logits": out.logits, "last_hidden_state": out.hidden_states[-1],
        "rand_ids": rand_ids, "rand_logits": plain},
        {"source": "transformers RobertaForSequenceClassification", "checkpoint": "weights/tiny-roberta-classifier",
         "texts": TEXTS})


def make(root: Path) -> None:
    torch.set_num_threads(1)
    tok = train_bpe()
    make_base(root, tok)
    make_classifier(root, tok)
