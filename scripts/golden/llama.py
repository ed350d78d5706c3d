"""Golden part `llama`: tiny Llama / Mistral / Qwen2 checkpoints built by transformers, and its outputs on them.

Writes (hidden sizes and widths are multiples of 64 where NF4 tests quantize them: bitsandbytes' CPU
dequantize restarts blocks at every row otherwise, see DESIGN.md)
  weights/tiny-llama/          llama: GQA (4 heads, 2 kv heads), untied head, llama3 rope scaling (all three
                               frequency bands in use), a byte-level BPE tokenizer with <|begin_of_text|> /
                               <|end_of_text|> (tokenizers, trained here on gpt2's CORPUS)
  weights/tiny-llama-mqa/      llama: multi-query (1 kv head), explicit head_dim 32 ≠ hidden/heads, linear rope
                               scaling, attention_bias and mlp_bias, tied head
  weights/tiny-mistral/        mistral: GQA, sliding_window 64 (longer than every test input), untied
  weights/tiny-qwen2/          qwen2: q/k/v biases (no o bias), rope_theta 1e6, tied head
  tests/golden/llama_<name>.safetensors   input_ids, attention_mask, logits (plain, and left-padded with
                               explicit position_ids = cumsum(mask) − 1: transformers 5's plain forward takes
                               positions from the cache position, not the mask), greedy continuations of a
                               left-padded prompt batch from transformers' generate with an EOS id that fires
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from golden.common import seed_all, write_golden
from golden.gpt2 import CORPUS

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
PROMPTS = ["The movie was", "I like cats", "Convert English to LaTeX\nEnglish: x squared\nLaTeX:"]

BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-5)
CHECKPOINTS = {
    "tiny-llama": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "tiny-llama-mqa": ("llama", dict(num_key_value_heads=1, head_dim=32, intermediate_size=64, attention_bias=True,
                                     mlp_bias=True, tie_word_embeddings=True,
                                     rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "tiny-mistral": ("mistral", dict(sliding_window=64)),
    "tiny-qwen2": ("qwen2", dict(rope_theta=1e6, tie_word_embeddings=True, intermediate_size=64)),
}


def train_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def build(root: Path, name: str, tok):
    import transformers as tr
    kind, extra = CHECKPOINTS[name]
    cfg_cls, model_cls = {"llama": (tr.LlamaConfig, tr.LlamaForCausalLM),
                          "mistral": (tr.MistralConfig, tr.MistralForCausalLM),
                          "qwen2": (tr.Qwen2Config, tr.Qwen2ForCausalLM)}[kind]
    seed_all(1234)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    assert tok.get_vocab_size() == BASE["vocab_size"]
    model = model_cls(cfg_cls(**{**BASE, **extra}, bos_token_id=bos, eos_token_id=eos)).eval()
    with torch.no_grad():  # RMSNorm weights start at 1 and biases at 0: randomize them so a mix-up shows
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if n.endswith("norm.weight") else 0.0) + 0.2 * torch.randn(p.shape))
    d = root / "weights" / name
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d)
    (d / "generation_config.json").unlink(missing_ok=True)  # not needed, and it carries the transformers version
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "model_max_length": BASE["max_position_embeddings"],
         "padding_side": "left", "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2, sort_keys=True) + "\n")
    return model, eos


def outputs(model, tok, eos, name: str, root: Path):
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    t = {"input_ids": ids, "attention_mask": mask}
    rows = [tok.encode(p).ids for p in PROMPTS]  # <|begin_of_text|> first
    T = max(map(len, rows))
    pids = torch.full((len(rows), T), eos)
    pmask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        pids[i, T - len(r):] = torch.tensor(r)
        pmask[i, T - len(r):] = 1
    kw = dict(attention_mask=pmask, max_new_tokens=20, do_sample=False, pad_token_id=eos)
    with torch.no_grad():
        t["logits"] = model(ids).logits
        t["logits_padded"] = model(ids, attention_mask=mask, position_ids=pos).logits
        # A random model rarely says <|end_of_text|>; so that the EOS path is exercised, the EOS id of the greedy
        # run is a token the plain run emits in row 1 at step 4 (that row stops there, the others pad on from
        # wherever they meet it).
        free = model.generate(pids, eos_token_id=None, **kw)
        stop = int(free[1, T + 3])
        out = model.generate(pids, eos_token_id=stop, **kw)
    t.update(prompt_ids=pids, prompt_mask=pmask, greedy=out, greedy_eos=torch.tensor(stop))
    write_golden(root, f"llama_{name}", t, {"source": f"transformers {type(model).__name__}",
                                            "checkpoint": f"weights/{name}", "pad_token_id": eos})


def make(root: Path) -> None:
    tok = train_tokenizer()
    for name in CHECKPOINTS:
        model, eos = build(root, name, tok)
        outputs(model, tok, eos, name, root)
