"""Multi-label classification data: records {text, labels} -> token ids and multi-hot targets, padded batches.

A record names any subset of the label set (the book's movie genres, ch. 10): a JSON list of
names, or in CSV a string of names separated by ';'. The target is multi-hot — y_k = 1 when label
k is named — for one sigmoid per label (losses.classification_loss, multi-label). An unknown label
is an error naming the record.

Source: the book, ch. 10 (multi-label genre classification).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from minillm.data.readers import DataError, shown


def split_labels(value, where: str) -> list[str]:
    """A JSON list of names, or a string of names separated by ';' (CSV)."""
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str):
        return [v.strip() for v in value.split(";") if v.strip()]
    raise DataError(f"{where}: 'labels' must be a list of names or a ';'-separated string, found {shown(value)}")


def label_set(records: Sequence[dict], labels_key: str = "labels") -> list[str]:
    """The sorted union of label names in the records."""
    names = set()
    for i, r in enumerate(records):
        where = r.get("_where", f"record {i}")
        if labels_key not in r:
            raise DataError(f"{where}: no '{labels_key}' field")
        names.update(split_labels(r[labels_key], where))
    return sorted(names)


def encode_classification(records: Sequence[dict], tokenizer, label_names: Sequence[str],
                          max_length: Optional[int] = None, text_key: str = "text",
                          labels_key: str = "labels") -> list[dict]:
    """Records {"text", "labels"} -> [{"input_ids", "labels": multi-hot floats}]; unknown label -> error."""
    if not records:
        raise DataError("empty dataset (no records)")
    index = {n: i for i, n in enumerate(label_names)}
    out = []
    for i, r in enumerate(records):
        where = r.get("_where", f"record {i}")
        if text_key not in r or labels_key not in r:
            raise DataError(f"{where}: needs fields '{text_key}' and '{labels_key}', found {sorted(r)}")
        target = [0.0] * len(index)
        for name in split_labels(r[labels_key], where):
            if name not in index:
                raise DataError(f"{where}: label {name!r} is not in the label set {list(label_names)}")
            target[index[name]] = 1.0
        if not isinstance(r[text_key], str):
            raise DataError(f"{where}: '{text_key}' must be a string, found {type(r[text_key]).__name__}")
        ids = tokenizer.encode(r[text_key])
        if max_length is not None:
            ids = ids[:max_length]
        if not ids:
            raise DataError(f"{where}: empty text")
        out.append({"input_ids": ids, "labels": target})
    return out


class ClassificationCollator:
    """Pad {"input_ids", "labels" (multi-hot)} rows: input_ids, attention_mask (B, T), labels (B, L) float."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        T = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"], dtype=torch.long)
            mask[i, :len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.float32)}
