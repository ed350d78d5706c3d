"""Seq2seq SFT data (T5 / FLAN-T5): {input, target} records -> encoder ids, decoder ids, labels.

An encoder-decoder model reads the whole input with its encoder and writes the target with its
decoder. Training uses *teacher forcing*: the decoder is fed the target shifted one step right,
starting with decoder_start_token_id (T5: the pad id, 0), so decoder position t sees the target
tokens before t and its logits predict target token t:

    input_ids          = tok(input) + [eos]                              (B, S)   padded with pad_id
    labels             = tok(target) + [eos]                             (B, T)   padded with −100
    decoder_input_ids  = [start] + labels[:-1],   −100 -> pad_id         (B, T)   (transformers' `_shift_right`)
    loss               = CE(decoder_logits_t, labels_t) over labels_t ≠ −100   — no further shift

Records: `{"input", "target"}`, or `{"prompt", "completion"}`, or the book's `{"english", "latex"}`
(the input is then "Convert English to LaTeX\\nEnglish: {english}" and the target the LaTeX).
Bad records fail before training, naming file:line. Batches are padded to their longest row.

Source: Raffel et al. (2020), §3.1 (text-to-text, teacher forcing); transformers' T5
`_shift_right` and DataCollatorForSeq2Seq (labels padded with −100).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from minillm.data.readers import DataError
from minillm.losses import IGNORE_INDEX as IGNORE

LAYOUTS = (("input", "target"), ("prompt", "completion"), ("english", "latex"))
LATEX_INPUT = "Convert English to LaTeX\nEnglish: {english}"


def input_and_target(record: dict) -> tuple[str, str]:
    """Any supported record -> (input, target) strings; DataError naming file:line otherwise."""
    where = record.get("_where", "record")
    for a, b in LAYOUTS:
        if a in record and b in record:
            x, y = record[a], record[b]
            if not isinstance(x, str) or not isinstance(y, str):
                raise DataError(f"{where}: '{a}' and '{b}' must be strings, found {type(x).__name__} and "
                                f"{type(y).__name__}")
            return (LATEX_INPUT.format(english=x), y) if a == "english" else (x, y)
    keys = sorted(k for k in record if k != "_where")
    raise DataError(f"{where}: unknown record layout {keys}; expected input+target, prompt+completion or english+latex")


def encode_seq2seq(records: Sequence[dict], tokenizer, max_length: Optional[int] = None,
                   max_target_length: Optional[int] = None) -> list[dict]:
    """Records -> [{"input_ids": tok(input) + [eos], "labels": tok(target) + [eos]}] (truncated, eos kept last)."""
    if not records:
        raise DataError("empty dataset (no records)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; seq2seq targets end with one")
    out = []
    for i, r in enumerate(records):
        where = r.get("_where", f"record {i}")
        x, y = input_and_target(r)
        x_ids = tokenizer.encode(x, add_special_tokens=False)
        y_ids = tokenizer.encode(y, add_special_tokens=False)
        if not x_ids:
            raise DataError(f"{where}: the input is empty")
        if not y_ids:
            raise DataError(f"{where}: the target is empty")
        if max_length is not None:
            x_ids = x_ids[:max_length - 1]
        if max_target_length is not None:
            y_ids = y_ids[:max_target_length - 1]
        out.append({"input_ids": x_ids + [eos], "labels": y_ids + [eos]})
    return out


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """(B, T) labels -> (B, T) decoder inputs: [start, y_0, …, y_{T−2}], with −100 replaced by pad_id."""
    dec = torch.full_like(labels, start_id)
    dec[:, 1:] = labels[:, :-1]
    return dec.masked_fill(dec == IGNORE, pad_id)


class Seq2SeqCollator:
    """Pad {"input_ids", "labels"} rows (right padding) into input_ids, attention_mask, decoder_input_ids,
    decoder_attention_mask, labels. A row with m labels has m real decoder positions (start, y_0 … y_{m−2}):
    decoder_attention_mask is 1 there, 0 on padding."""

    def __init__(self, pad_id: int, decoder_start_token_id: Optional[int] = None):
        self.pad_id = pad_id
        self.start_id = pad_id if decoder_start_token_id is None else decoder_start_token_id  # T5: start = pad

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        B = len(rows)
        S = max(len(r["input_ids"]) for r in rows)
        T = max(len(r["labels"]) for r in rows)
        ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, S), dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        dec_mask = torch.zeros((B, T), dtype=torch.long)
        for i, r in enumerate(rows):
            n, m = len(r["input_ids"]), len(r["labels"])
            ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
            labels[i, :m] = torch.tensor(r["labels"], dtype=torch.long)
            dec_mask[i, :m] = 1  # decoder inputs 0..m−1 are start, y_0..y_{m−2}: all real
        return {"input_ids": ids, "attention_mask": mask,
                "decoder_input_ids": shift_right(labels, self.start_id, self.pad_id),  # (B, T)
                "decoder_attention_mask": dec_mask, "labels": labels}
