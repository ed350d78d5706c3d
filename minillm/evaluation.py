"""Generation-based evaluation: greedily write an answer for each record, score it against the target.

For each {input, target} record (also {prompt, completion}, {english, latex}: data/seq2seq.py)
the model writes a prediction by greedy decoding, stopped at EOS or max_new_tokens:

    encoder-decoder (T5):  ŷ = argmax-decode(decoder | encoder(input))          (the decoder's ids, start dropped)
    decoder-only (GPT-2):  ŷ = argmax-continue(input)                            (only the new tokens)

and the predictions are scored with ROUGE (text_metrics.rouge: mean F1 of rouge1, rouge2, rougeL,
rougeLsum, as rouge-score). A prediction equal to its target scores 1.0 on all four.

Source: Lin, "ROUGE: A Package for Automatic Evaluation of Summaries" (2004); the book, ch. 10
(evaluating the fine-tuned model by generating); transformers' Seq2SeqTrainer(predict_with_generate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from minillm.data.readers import read_records
from minillm.data.seq2seq import input_and_target
from minillm.generation import generate
from minillm.models.auto import KINDS, load_model, model_type
from minillm.text_metrics import rouge
from minillm.tokenizer import Tokenizer


def load_for_generation(name_or_path: str, device=None) -> tuple[torch.nn.Module, Tokenizer]:
    """An encoder-decoder (models.auto kind "seq2seq") or a causal LM, with its tokenizer, in eval mode."""
    kind = "seq2seq" if model_type(name_or_path)[1] in KINDS["seq2seq"] else "causal-lm"
    model = load_model(name_or_path, kind).to(device or "cpu").eval()
    tok = Tokenizer.from_pretrained(name_or_path)
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model, tok


def _cut_at_eos(ids: list[int], eos: Optional[int]) -> list[int]:
    return ids[:ids.index(eos)] if eos is not None and eos in ids else ids


@torch.no_grad()
def greedy_predictions(model, tokenizer: Tokenizer, inputs: Sequence[str], max_new_tokens: int = 32,
                       batch_size: int = 8) -> list[str]:
    """Greedy outputs for each input text (special tokens and everything from EOS on removed)."""
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    enc_dec = getattr(model, "is_encoder_decoder", False)
    out = []
    for i in range(0, len(inputs), batch_size):
        chunk = inputs[i:i + batch_size]
        if enc_dec:  # the encoder input ends with EOS, as in training (data/seq2seq.py)
            rows = [tokenizer.encode(x, add_special_tokens=False) + [eos] for x in chunk]
            batch = tokenizer.pad(rows, padding_side="right")
        else:  # prompts left-padded so that every row continues from the last column
            rows = [tokenizer.encode(x, add_special_tokens=False) for x in chunk]
            batch = tokenizer.pad(rows, padding_side="left")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        gen = generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eos,
                       pad_token_id=tokenizer.pad_token_id)
        new = gen[:, 1:] if enc_dec else gen[:, ids.shape[1]:]  # (B, new): drop the start token / the prompt
        out += [tokenizer.decode(_cut_at_eos(r, eos), skip_special_tokens=True).strip() for r in new.tolist()]
    return out


def evaluate_rouge(model: Union[str, torch.nn.Module], data: Union[str, Path, Sequence[dict]],
                   max_new_tokens: int = 32, batch_size: int = 8, tokenizer: Optional[Tokenizer] = None,
                   device: Optional[str] = None) -> dict:
    """ROUGE of greedy predictions vs targets: {"rouge1", "rouge2", "rougeL", "rougeLsum", "n", "predictions"}.

    model: a checkpoint (directory, weights/<name>, hub id) or a loaded model (then pass its tokenizer);
    data: a JSONL/CSV path or a list of records."""
    if isinstance(model, (str, Path)):
        model, tokenizer = load_for_generation(str(model), device)
    elif tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer: evaluate_rouge(model, data, tokenizer=...)")
    records = read_records(data) if isinstance(data, (str, Path)) else list(data)
    if not records:
        raise ValueError("no records to evaluate")
    pairs = [input_and_target(r) for r in records]
    preds = greedy_predictions(model, tokenizer, [x for x, _ in pairs], max_new_tokens, batch_size)
    scores = rouge(preds, [y for _, y in pairs])
    return {**scores, "n": len(preds), "predictions": preds}
