"""Golden part `t5`: tiny T5 / T5 v1.1 / FLAN-T5 checkpoints built by transformers, and transformers' outputs.

Writes
  weights/tiny-t5/          T5 v1.0 layout: ReLU FF (`wi`, `wo`), LM head tied to `shared` (output rescaled by
                            d_model^-0.5), default 32 buckets / max distance 128
  weights/tiny-flan-t5/     FLAN-T5 as transformers 5 saves it: gated GELU (`wi_0`, `wi_1`, `wo`), separate
                            `lm_head.weight`, config `tie_word_embeddings: true` + `scale_decoder_outputs: false`;
                            inner dim num_heads·d_kv = 24 ≠ d_model = 16; 3 encoder / 2 decoder layers;
                            8 buckets, max distance 12 (sequences here reach the capped bucket)
  weights/tiny-t5-v1_1/     T5 v1.1 as published on the hub: config `tie_word_embeddings: false` (no
                            scale_decoder_outputs key), the file carries the `encoder.embed_tokens.weight` /
                            `decoder.embed_tokens.weight` aliases; 2 encoder / 3 decoder layers (no generation
                            golden: transformers 5 generate crashes when num_decoder_layers > num_layers)
  each with a Unigram tokenizer.json (tokenizers; pieces and scores counted here from CORPUS; T5's pieces: `<pad>` 0, `</s>` 1,
  `<unk>` 2, "▁" word starts, `</s>` appended) and tokenizer_config.json
  tests/golden/t5_<name>.safetensors   input_ids / attention_mask (rows padded right and left),
                            decoder_input_ids / decoder_attention_mask, logits (plain, padded encoder,
                            padded decoder), encoder states, decoder last hidden states; for the first two,
                            greedy ids from transformers' generate on a padded batch of texts with EOS
  tests/golden/t5_tokenizer.safetensors   transformers' tokenizer ids for TEXTS (the tiny-t5 tokenizer)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from golden.common import seed_all, write_golden
from golden.gpt2 import CORPUS

TEXTS = ["translate English to German: The house is wonderful.", "summarize: I like cats",
         "cola sentence: The quick brown fox jumps over the lazy dog while the cat sleeps.", "x squared"]
SPECIALS = ["<pad>", "</s>", "<unk>"]


def train_tokenizer(n_words: int = 60, n_ngrams: int = 60):
    """A small Unigram tokenizer, built deterministically (tokenizers' UnigramTrainer is not reproducible run to
    run): pieces = the specials, every character of the corpus, the most frequent "▁word"s and character
    n-grams (2..4, within words); score = log relative frequency, as a trained Unigram model's log-probabilities."""
    import math
    from collections import Counter
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    words = Counter("▁" + w for line in CORPUS + TEXTS for w in line.split())
    chars, grams = Counter(), Counter()
    for w, c in words.items():
        for ch in w:
            chars[ch] += c
        for n in (2, 3, 4):
            for i in range(len(w) - n + 1):
                grams[w[i:i + n]] += c
    by_count = lambda cnt: sorted(cnt.items(), key=lambda kv: (-kv[1], kv[0]))
    pieces: dict[str, int] = {}
    for table, limit in ((chars, None), (words, n_words), (grams, n_ngrams)):
        for p, c in by_count(table)[:limit]:
            pieces.setdefault(p, c)
    total = sum(pieces.values())
    vocab = [(t, 0.0) for t in SPECIALS] + [(p, math.log(c / total)) for p, c in by_count(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2]
    return tok


def build(root: Path, name: str, tok, untie: bool, hub_v1_1_layout: bool = False, **cfg):
    from safetensors.torch import load_file, save_file
    from transformers import T5Config, T5ForConditionalGeneration
    seed_all(1234)
    vocab = tok.get_vocab_size() + 8  # as the hub's T5 (32128 rows for 32100 pieces): a few unused rows
    # tie_word_embeddings=False is what turns the d_model^-0.5 rescaling off (transformers: scale_decoder_outputs)
    config = T5Config(vocab_size=vocab, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                      **({"tie_word_embeddings": False} if untie else {}), **cfg)
    model = T5ForConditionalGeneration(config).eval()
    if untie:  # transformers 5 ties every T5 it builds; v1.1 / FLAN-T5 have their own head
        model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, config.d_model))
    d = root / "weights" / name
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d)
    (d / "generation_config.json").unlink(missing_ok=True)  # not needed, and it carries the transformers version
    conf = json.loads((d / "config.json").read_text())
    conf.pop("transformers_version", None)
    if hub_v1_1_layout:  # the hub's google/t5-v1_1-* files: tie_word_embeddings false, aliases of shared in the file
        conf["tie_word_embeddings"] = False
        conf.pop("scale_decoder_outputs", None)
        state = load_file(d / "model.safetensors")
        state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
        state["decoder.embed_tokens.weight"] = state["shared.weight"].clone()
        save_file(dict(sorted(state.items())), str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 512,
         "padding_side": "right", "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2, sort_keys=True) + "\n")
    again = T5ForConditionalGeneration.from_pretrained(d).eval()  # what a user of these files gets
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    return again


def outputs(model, name: str, root: Path, generation: bool) -> None:
    from transformers import AutoTokenizer
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, V, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 17:] = 0  # right padding
    mask[2, :5] = 0  # left padding: positions are relative, either side works
    dec = torch.randint(3, V, (3, 10), generator=g)
    dec[:, 0] = 0
    dec_mask = torch.ones_like(dec)
    dec_mask[1, 7:] = 0
    t = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask}
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=dec)
        t["logits"], t["encoder_hidden_states"] = out.logits, out.encoder_last_hidden_state
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        t["logits_padded"], t["encoder_hidden_states_padded"] = out.logits, out.encoder_last_hidden_state
        t["logits_padded_decoder"] = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                                           decoder_attention_mask=dec_mask).logits
        t["decoder_hidden_states"] = model.decoder(input_ids=dec, encoder_hidden_states=out.encoder_last_hidden_state,
                                                   encoder_attention_mask=mask).last_hidden_state
        if generation:
            tok = AutoTokenizer.from_pretrained(root / "weights" / name)
            enc = tok(TEXTS, padding=True, return_tensors="pt")
            pids, pmask = enc["input_ids"], enc["attention_mask"]
            free = model.generate(pids, attention_mask=pmask, max_new_tokens=16, do_sample=False,
                                  eos_token_id=V - 1, pad_token_id=0)  # V − 1: never said, so no row stops
            eos = pick_eos(free[:, 1:])
            greedy = model.generate(pids, attention_mask=pmask, max_new_tokens=16, do_sample=False,
                                    eos_token_id=eos, pad_token_id=0)
            t.update(prompt_ids=pids, prompt_mask=pmask, greedy=greedy, eos_token_id=torch.tensor(eos))
    write_golden(root, f"t5_{name}", t, {"source": "transformers T5ForConditionalGeneration",
                                         "checkpoint": f"weights/{name}"})


def pick_eos(free: torch.Tensor) -> int:
    """The EOS for the generation golden: a token the free-running rows say, chosen so that rows stop at
    different steps and at least one row never stops (random tiny models rarely say `</s>` itself)."""
    def score(tok: int):
        steps = [int((r == tok).nonzero()[0]) if (r == tok).any() else None for r in free]
        stopped = [s for s in steps if s is not None]
        ok = 0 < len(stopped) < len(steps) and max(stopped) >= 2
        return (ok, len(set(stopped)), -tok)
    best = max(sorted(set(free.flatten().tolist())), key=score)
    assert score(best)[0], free
    return best


def make(root: Path) -> None:
    from transformers import AutoTokenizer
    tok = train_tokenizer()
    small = dict(d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, dropout_rate=0.1, initializer_factor=1.5)
    m = build(root, "tiny-t5", tok, untie=False, **small)
    outputs(m, "tiny-t5", root, generation=True)
    flan = dict(d_model=16, d_kv=6, d_ff=24, num_layers=3, num_decoder_layers=2, num_heads=4,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=12)
    m = build(root, "tiny-flan-t5", tok, untie=True, **flan)
    outputs(m, "tiny-flan-t5", root, generation=True)
    v11 = dict(d_model=16, d_kv=4, d_ff=20, num_layers=2, num_decoder_layers=3, num_heads=2,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=16, relative_attention_max_distance=20)
    m = build(root, "tiny-t5-v1_1", tok, untie=True, hub_v1_1_layout=True, **v11)
    outputs(m, "tiny-t5-v1_1", root, generation=False)
    hf_tok = AutoTokenizer.from_pretrained(root / "weights" / "tiny-t5")
    rows = [torch.tensor(hf_tok(x)["input_ids"]) for x in TEXTS]
    t = {f"ids_{i}": r for i, r in enumerate(rows)}
    write_golden(root, "t5_tokenizer", t, {"source": "transformers AutoTokenizer", "texts": TEXTS,
                                           "decoded": [hf_tok.decode(r, skip_special_tokens=True) for r in rows]})
