"""VQA batches: questions for the text encoder, images as pixel values, answers as decoder targets.

A VQA record is {question, answer, image} (plus ids). The question is tokenized for the text encoder
([CLS] … [SEP], right-padded, truncated with a warning past its limit); the image becomes pixel values
(x/255 − mean)/std, (3, H, W); the answer becomes the decoder text the book uses, bos + ' ' + answer +
eos, whose labels are the same ids with padding set to −100:

    labels_t = answer_ids_t   where decoder_attention_mask_t = 1,   −100 elsewhere

Source: the book, ch. 9 (VQA: labels with pad → −100, bos + ' ' + answer + eos).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from minillm.losses import IGNORE_INDEX


def make_labels(decoder_input_ids: torch.Tensor, decoder_attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels = the answer ids with padding -> -100 (ignored by the loss). Pads are found through the
    attention mask, not the pad id: GPT-2 pads with its eos token, and the answer's own closing eos must stay
    a target, or the model never learns to stop."""
    return decoder_input_ids.masked_fill(decoder_attention_mask == 0, IGNORE_INDEX)


def to_pixel_values(image: np.ndarray, image_size: int, mean: float = 0.5, std: float = 0.5,
                    what: str = "image") -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W), (x/255 - mean)/std (ViT's default normalisation).
    Images of the wrong size or with the wrong number of channels are refused, with the name given in `what`."""
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{what}: expected an RGB image of shape ({image_size}, {image_size}, 3), got shape "
                         f"{a.shape} ({a.shape[2] if a.ndim == 3 else 1} channel(s))")
    if a.shape[:2] != (image_size, image_size):
        raise ValueError(f"{what}: expected {image_size}×{image_size} pixels, got {a.shape[0]}×{a.shape[1]} "
                         f"(resize it first, e.g. vqa_v2.load_image(path, image_size))")
    if a.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 pixels (0..255), got {a.dtype}")
    x = torch.from_numpy(a.astype(np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    return (x - mean) / std


def format_answer(answer: str, bos: str, eos: str) -> str:
    """The book's decoder text: bos + ' ' + multiple_choice_answer + eos."""
    return f"{bos} {answer}{eos}"


class VQACollator:
    """Records {question, answer, image} -> a batch: input_ids, attention_mask (question, for the text
    encoder), pixel_values, decoder_input_ids, decoder_attention_mask, labels (answer, for the decoder).
    Questions longer than `text_max_length` tokens are truncated with a warning; answers that tokenize to
    nothing are an error naming the record. Images must already be image_size × image_size RGB uint8
    (to_pixel_values), unless an `image_processor` (e.g. minillm's ViT ImageProcessor for a hub checkpoint:
    images -> {"pixel_values": (B, 3, H, W)}) is given to resize and normalise them."""

    def __init__(self, text_tokenizer, decoder_tokenizer, image_size: int, text_max_length: int,
                 mean: float = 0.5, std: float = 0.5, image_processor: Optional[Callable] = None):
        self.text_tok, self.dec_tok = text_tokenizer, decoder_tokenizer
        self.image_size, self.text_max_length = image_size, text_max_length
        self.mean, self.std = mean, std
        self.image_processor = image_processor
        for k in ("bos_token", "eos_token"):
            if decoder_tokenizer.special.get(k) is None:
                raise ValueError(f"the decoder tokenizer needs a {k}")
        if decoder_tokenizer.pad_token_id is None:
            raise ValueError("the decoder tokenizer needs a pad token (GPT-2 usually reuses eos)")
        if text_tokenizer.pad_token_id is None:
            raise ValueError("the text tokenizer needs a pad token")

    def encode_questions(self, questions: Sequence[str], ids: Sequence = ()) -> dict[str, torch.Tensor]:
        rows = []
        sep = self.text_tok.special.get("sep_token")
        for i, q in enumerate(questions):
            r = self.text_tok.encode(q)
            if len(r) > self.text_max_length:
                name = f"question {ids[i]}" if ids else f"question {i}"
                warnings.warn(f"{name} has {len(r)} tokens, more than the text encoder's limit of "
                              f"{self.text_max_length}; truncated: {q[:60]!r}", stacklevel=3)
                keep_sep = sep is not None and r[-1] == self.text_tok.token_to_id(sep)
                r = r[:self.text_max_length - 1] + r[-1:] if keep_sep else r[:self.text_max_length]
            rows.append(r)
        return self.text_tok.pad(rows, padding_side="right")

    def encode_answers(self, answers: Sequence[str], ids: Sequence = ()) -> dict[str, torch.Tensor]:
        tok = self.dec_tok
        bos, eos = tok.special["bos_token"], tok.special["eos_token"]
        rows = []
        for i, a in enumerate(answers):
            r = tok.encode(format_answer(a, bos, eos), add_special_tokens=False)
            if len(r) <= 2:  # only bos and eos
                name = f"record {ids[i]}" if ids else f"answer {i}"
                raise ValueError(f"{name}: answer {a!r} tokenizes to nothing between bos and eos; "
                                 f"an empty answer cannot be learned (drop or fix the record)")
            rows.append(r)
        enc = tok.pad(rows, padding_side="right")
        return {"decoder_input_ids": enc["input_ids"], "decoder_attention_mask": enc["attention_mask"],
                "labels": make_labels(enc["input_ids"], enc["attention_mask"])}

    def pixel_values(self, records: Sequence[dict]) -> torch.Tensor:
        if self.image_processor is not None:
            return self.image_processor([r["image"] for r in records])["pixel_values"]
        return torch.stack([to_pixel_values(r["image"], self.image_size, self.mean, self.std,
                                            what=f"image of record {r.get('question_id', i)}")
                            for i, r in enumerate(records)])  # (B, 3, S, S)

    def __call__(self, records: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids = [r.get("question_id", i) for i, r in enumerate(records)]
        batch = dict(self.encode_questions([r["question"] for r in records], ids))
        batch["pixel_values"] = self.pixel_values(records)
        batch.update(self.encode_answers([r["answer"] for r in records], ids))
        return batch
