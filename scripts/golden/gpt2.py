"""Golden part `gpt2`: tiny GPT-2 checkpoints built by transformers, and transformers' outputs on them.

Writes
  weights/tiny-gpt2/          the embedded default: 2 layers, 64 wide, a byte-level BPE tokenizer
                              (tokenizers, trained here on CORPUS) — what `minillm generate` runs on
  weights/tiny-gpt2-relu/     other config paths: relu, n_inner, inverse-layer-idx scaling, untied head
  weights/tiny-gpt2-cross/    add_cross_attention=True
  tests/golden/gpt2_<name>.safetensors   input_ids, attention_mask, logits (plain and left-padded),
                              greedy continuations from transformers' generate
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from golden.common import seed_all, write_golden

CORPUS = [
    "The movie was wonderful and the acting was superb.",
    "The movie was boring, the plot made no sense at all.",
    "I like cats. Cats like warm places and quiet rooms.",
    "Convert English to LaTeX\nEnglish: x squared\nLaTeX: x^2",
    "Convert English to LaTeX\nEnglish: sum from 1 to 10 of x squared\nLaTeX: \\sum_{1}^{10} x^2",
    "A reward model scores responses; the policy learns to write what scores well.",
    "Attention lets every token look at every earlier token and take what it needs.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Fine-tuning adapts a pretrained model to a task with a little labelled data.",
    "Low-rank adapters train two small matrices beside each frozen weight matrix.",
    "Quantization stores weights in four bits and dequantizes them for each matmul.",
    "Great food, friendly staff, and the dessert was the best I have ever had!",
    "Terrible service. The soup was cold and the waiter never came back.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } ^ _ \\ ' \" ? ! . , ; :",
] * 4

PROMPTS = ["The movie was", "I like cats", "Convert English to LaTeX\nEnglish: x squared\nLaTeX:"]


def train_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def build(root: Path, name: str, tok, **cfg):
    from transformers import GPT2Config, GPT2LMHeadModel
    seed_all(1234)
    eos = tok.token_to_id("<|endoftext|>")
    config = GPT2Config(vocab_size=tok.get_vocab_size(), bos_token_id=eos, eos_token_id=eos, **cfg)
    model = GPT2LMHeadModel(config).eval()
    d = root / "weights" / name
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        '{\n  "bos_token": "<|endoftext|>",\n  "eos_token": "<|endoftext|>",\n  "model_max_length": '
        f'{cfg["n_positions"]},\n  "padding_side": "right",\n  "unk_token": "<|endoftext|>"\n}}\n')
    gen_cfg = d / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()  # not needed, and it carries the transformers version
    return model, eos


def outputs(model, tok, eos, name: str, root: Path, cross: bool = False):
    V, C = model.config.vocab_size, model.config.n_embd
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    t = {"input_ids": ids, "attention_mask": mask}
    kw = {}
    if cross:
        enc = torch.randn(3, 5, C, generator=g)
        enc_mask = torch.ones(3, 5, dtype=torch.long)
        enc_mask[2, 3:] = 0
        t.update(encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
        kw = dict(encoder_hidden_states=enc)
    with torch.no_grad():
        t["logits"] = model(ids, **kw).logits
        t["logits_padded"] = model(ids, attention_mask=mask, position_ids=pos, **kw).logits
        if cross:
            t["logits_enc_mask"] = model(ids, encoder_hidden_states=enc, encoder_attention_mask=enc_mask).logits
        if not cross:
            rows = [tok.encode(p).ids for p in PROMPTS]
            T = max(map(len, rows))
            pids = torch.full((len(rows), T), eos)
            pmask = torch.zeros((len(rows), T), dtype=torch.long)
            for i, r in enumerate(rows):
                pids[i, T - len(r):] = torch.tensor(r)
                pmask[i, T - len(r):] = 1
            out = model.generate(pids, attention_mask=pmask, max_new_tokens=24, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos)
            t.update(prompt_ids=pids, prompt_mask=pmask, greedy=out)
    write_golden(root, f"gpt2_{name}", t, {"source": "transformers GPT2LMHeadModel", "checkpoint": f"weights/{name}"})


def make(root: Path) -> None:
    tok = train_tokenizer()
    base = dict(n_positions=128, n_embd=64, n_layer=2, n_head=4, initializer_range=0.1)
    m, eos = build(root, "tiny-gpt2", tok, **base)
    outputs(m, tok, eos, "tiny-gpt2", root)
    m, eos = build(root, "tiny-gpt2-relu", tok, **{**base, "n_embd": 32, "n_inner": 48, "activation_function": "relu",
                                                   "scale_attn_by_inverse_layer_idx": True,
                                                   "tie_word_embeddings": False, "layer_norm_epsilon": 1e-6})
    outputs(m, tok, eos, "tiny-gpt2-relu", root)
    m, eos = build(root, "tiny-gpt2-cross", tok, **{**base, "n_embd": 32, "add_cross_attention": True})
    outputs(m, tok, eos, "tiny-gpt2-cross", root, cross=True)
