"""Golden part `encoders`: tiny BERT / DistilBERT / ViT checkpoints built by transformers, their outputs,
ViTImageProcessor's pixels, and sentence-transformers' embeddings from the real all-MiniLM-L6-v2.

Writes
  weights/tiny-bert/                  BertModel (with pooler), 2 layers, 32 wide, + a WordPiece tokenizer
                                      (tokenizers, trained here on CORPUS) so it is usable end to end
  weights/tiny-distilbert/            DistilBertModel, learned positions (same tokenizer)
  weights/tiny-distilbert-sinusoidal/ DistilBertModel, sinusoidal positions
  weights/tiny-vit/                   google/vit layout: ViTModel with pooler, 32x32 images, 8x8 patches,
                                      preprocessor_config.json (bilinear, mean/std 0.5)
  weights/tiny-dino/                  facebook/dino layout: ViTModel without pooler, preprocessor with
                                      bicubic resampling and ImageNet mean/std
  tests/golden/encoders_<name>.safetensors   inputs and transformers' last hidden states (+ pooler)
  tests/golden/encoders_preprocess.safetensors   a fixed uint8 image and ViTImageProcessor's pixel_values
  tests/golden/encoders_minilm.safetensors       sentence-transformers' embeddings (needs
                                      weights/all-MiniLM-L6-v2: run scripts/fetch_minilm.py first)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from golden.common import seed_all, write_golden

CORPUS = [
    "I like cats. Cats like warm places and quiet rooms.",
    "The movie was wonderful and the acting was superb.",
    "The movie was boring, the plot made no sense at all.",
    "What is the cat sitting on? The cat is sitting on a red sofa.",
    "How many people are in the picture? Two people are standing outside.",
    "A young boy throws a ball to his dog in the park.",
    "This response is helpful, polite and grammatically correct.",
    "this response is rude and full of grammar mistakes",
    "A comedy about a family road trip that goes wrong in every possible way.",
    "A dark thriller: a detective hunts a killer through a rainy city.",
    "Science fiction, drama and romance on a spaceship far from earth.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "0 1 2 3 4 5 6 7 8 9 10 100 + - * / = ( ) ? ! . , ; :",
] * 3

SENTENCES = [  # for the real MiniLM (one is longer than its 256-token limit, to check truncation)
    "I like cats",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A monkey is playing drums.",
    "Two men pushed carts through the woods.",
    "Transformers encode every token in the context of every other token.",
    "unbelievably, the hyper-parameter sweep's results were reproducible ... 42 times!",
    " ".join(["the long sentence keeps going"] * 60),
]


def train_wordpiece():
    """A WordPiece tokenizer (BERT normalizer, pre-tokenizer, [CLS] A [SEP] template) whose vocabulary is
    built deterministically from CORPUS: the special tokens, every character alone and as a '##' suffix piece,
    then every whole word, each group sorted. (tokenizers' WordPieceTrainer breaks frequency ties in hash
    order, so its vocabulary differs from run to run; golden files must not.)"""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({w for line in CORPUS for w, _ in pre.pre_tokenize_str(norm.normalize_str(line))})
    chars = sorted({c for w in words for c in w})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + chars + ["##" + c for c in chars] + [w for w in words if len(w) > 1]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = norm, pre, decoders.WordPiece()
    for t in specials:
        tok.add_special_tokens([t])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def save_tokenizer(tok, d: Path, max_len: int) -> None:
    tok.save(str(d / "tokenizer.json"))
    conf = {"cls_token": "[CLS]", "mask_token": "[MASK]", "model_max_length": max_len, "pad_token": "[PAD]",
            "padding_side": "right", "sep_token": "[SEP]", "unk_token": "[UNK]", "do_lower_case": True}
    (d / "tokenizer_config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def fresh_dir(root: Path, name: str) -> Path:
    d = root / "weights" / name
    shutil.rmtree(d, ignore_errors=True)
    return d


def text_batch(tok, V: int):
    """A padded batch of real sentences (right padding, a sentence pair with token types) + random ids."""
    rows = [e for e in tok.encode_batch(["I like cats", "The movie was boring, the plot made no sense at all."])]
    pair = tok.encode("What is the cat sitting on?", "A red sofa.")
    rows.append(pair)
    T = max(len(r.ids) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r.ids)] = torch.tensor(r.ids)
        types[i, :len(r.ids)] = torch.tensor(r.type_ids)
        mask[i, :len(r.ids)] = 1
    g = torch.Generator().manual_seed(11)
    rand_ids = torch.randint(0, V, (2, 20), generator=g)
    return ids, types, mask, rand_ids


def make_bert(root: Path, tok) -> None:
    from transformers import BertConfig, BertModel
    seed_all(1234)
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64, type_vocab_size=2, initializer_range=0.2,
                     pad_token_id=0)
    model = BertModel(cfg).eval()
    d = fresh_dir(root, "tiny-bert")
    model.save_pretrained(d)
    save_tokenizer(tok, d, 64)
    ids, types, mask, rand_ids = text_batch(tok, cfg.vocab_size)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, token_type_ids=types)
        plain = model(rand_ids)
    write_golden(root, "encoders_tiny-bert", {
        "input_ids": ids, "token_type_ids": types, "attention_mask": mask, "last_hidden_state": out.last_hidden_state,
        "pooler_output": out.pooler_output, "rand_ids": rand_ids, "rand_last_hidden_state": plain.last_hidden_state},
        {"source": "transformers BertModel", "checkpoint": "weights/tiny-bert"})


def make_distilbert(root: Path, tok, name: str, sinusoidal: bool) -> None:
    from transformers import DistilBertConfig, DistilBertModel
    seed_all(2345)
    cfg = DistilBertConfig(vocab_size=tok.get_vocab_size(), dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                           max_position_embeddings=64, sinusoidal_pos_embds=sinusoidal, initializer_range=0.2)
    model = DistilBertModel(cfg).eval()
    d = fresh_dir(root, name)
    model.save_pretrained(d)
    save_tokenizer(tok, d, 64)
    ids, _, mask, rand_ids = text_batch(tok, cfg.vocab_size)
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
        plain = model(rand_ids).last_hidden_state
    write_golden(root, f"encoders_{name}", {
        "input_ids": ids, "attention_mask": mask, "last_hidden_state": out, "rand_ids": rand_ids,
        "rand_last_hidden_state": plain, "position_embeddings": model.embeddings.position_embeddings.weight},
        {"source": "transformers DistilBertModel", "checkpoint": f"weights/{name}"})


def make_vit(root: Path, name: str, pooler: bool, processor: dict) -> None:
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel
    seed_all(3456 if pooler else 4567)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
                    patch_size=8, initializer_range=0.2)
    model = ViTModel(cfg, add_pooling_layer=pooler).eval()
    d = fresh_dir(root, name)
    model.save_pretrained(d)
    ViTImageProcessorPil(size={"height": 32, "width": 32}, **processor).save_pretrained(d)
    g = torch.Generator().manual_seed(5)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    big = torch.randn(2, 3, 48, 40, generator=g)  # another size: interpolated positions
    t = {"pixel_values": pixels, "pixel_values_48x40": big}
    with torch.no_grad():
        out = model(pixels)
        t["last_hidden_state"] = out.last_hidden_state
        if pooler:
            t["pooler_output"] = out.pooler_output
        t["last_hidden_state_48x40"] = model(big, interpolate_pos_encoding=True).last_hidden_state
    write_golden(root, f"encoders_{name}", t, {"source": "transformers ViTModel", "checkpoint": f"weights/{name}"})


def test_image() -> np.ndarray:
    """A fixed 45x61 RGB uint8 image: smooth gradients plus noise (edges and flat parts both)."""
    rs = np.random.RandomState(0)
    yy, xx = np.mgrid[0:45, 0:61].astype(np.float64)
    base = np.stack([128 + 100 * np.sin(xx / 7), 255 * yy / 44, 128 + 90 * np.cos((xx + yy) / 5)], axis=-1)
    return np.clip(base + rs.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def make_preprocess(root: Path) -> None:
    from transformers import AutoImageProcessor
    img = test_image()
    t = {"image": torch.from_numpy(img)}
    for name in ("tiny-vit", "tiny-dino"):
        proc = AutoImageProcessor.from_pretrained(root / "weights" / name, use_fast=False)
        t[f"pixel_values_{name}"] = proc(img, return_tensors="pt")["pixel_values"]
        proc224 = AutoImageProcessor.from_pretrained(root / "weights" / name, use_fast=False,
                                                     size={"height": 224, "width": 224})
        t[f"pixel_values_{name}_224"] = proc224(img, return_tensors="pt")["pixel_values"]
    write_golden(root, "encoders_preprocess", t, {"source": "transformers ViTImageProcessor (Pillow backend)"})


def make_minilm(root: Path) -> None:
    d = root / "weights" / "all-MiniLM-L6-v2"
    if not (d / "model.safetensors").is_file():
        import subprocess
        import sys
        subprocess.run([sys.executable, str(root / "scripts" / "fetch_minilm.py")], check=True)
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(d), device="cpu")
    emb = st.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=False)  # the Normalize module runs anyway
    write_golden(root, "encoders_minilm", {"embeddings": emb.float().cpu()},
                 {"source": "sentence-transformers SentenceTransformer (Transformer, mean Pooling, Normalize)",
                  "checkpoint": "weights/all-MiniLM-L6-v2", "sentences": SENTENCES,
                  "max_seq_length": st.max_seq_length})


def make(root: Path) -> None:
    torch.set_num_threads(1)
    tok = train_wordpiece()
    make_bert(root, tok)
    make_distilbert(root, tok, "tiny-distilbert", sinusoidal=False)
    make_distilbert(root, tok, "tiny-distilbert-sinusoidal", sinusoidal=True)
    make_vit(root, "tiny-vit", pooler=True, processor={"resample": 2})
    make_vit(root, "tiny-dino", pooler=False, processor={"resample": 3, "image_mean": [0.485, 0.456, 0.406],
                                                         "image_std": [0.229, 0.224, 0.225]})
    make_preprocess(root)
    make_minilm(root)
