"""Preference data on disk: JSON-lines files of pairs (for reward models, DPO) and of prompts (for PPO).

pairs.jsonl, one object per line:
    {"prompt": str, "chosen": str, "rejected": str}
    optional: "margin": number  — or "score_chosen"/"score_rejected" (margin = their difference)
prompts.jsonl: {"prompt": str} per line (a bare JSON string per line is accepted too).

Every problem is a DataError naming the file and line: missing keys, empty texts, NaN scores,
a chosen response scored below the rejected one. RewardPairCollator pads pairs into training batches.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from minillm.data.readers import DataError, read_jsonl


def _number(where: str, key: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise DataError(f"{where}: '{key}' must be a finite number, got {v!r}")
    return float(v)


def load_pairs(path: str | Path) -> list[dict]:
    """-> [{"prompt", "chosen", "rejected", "margin", "_where"}] (margin 0.0 when the file gives none)."""
    out = []
    for d in read_jsonl(path):
        where = d["_where"]
        for k in ("prompt", "chosen", "rejected"):
            if not isinstance(d.get(k), str):
                raise DataError(f"{where}: missing or non-string '{k}'")
        for k in ("chosen", "rejected"):
            if not d[k].strip():
                raise DataError(f"{where}: '{k}' is an empty response")
        margin = 0.0
        if "margin" in d:
            margin = _number(where, "margin", d["margin"])
        elif "score_chosen" in d or "score_rejected" in d:
            sc = _number(where, "score_chosen", d.get("score_chosen"))
            sj = _number(where, "score_rejected", d.get("score_rejected"))
            if sc < sj:
                raise DataError(f"{where}: score_chosen {sc} < score_rejected {sj}: chosen must be the preferred one")
            margin = sc - sj
        out.append({"prompt": d["prompt"], "chosen": d["chosen"], "rejected": d["rejected"], "margin": margin,
                    "_where": where})
    return out


def load_prompts(path: str | Path) -> list[str]:
    """prompts.jsonl: {"prompt": str} per line, or a bare JSON string per line."""
    out = []
    for d in read_jsonl(path, string_key="prompt"):
        p = d.get("prompt")
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"{d['_where']}: expected {{\"prompt\": non-empty string}}")
        out.append(p)
    return out


def join_text(prompt: str, response: str) -> str:
    """prompt + response as one text for a reward model (a space between them unless one is already there)."""
    if not prompt or prompt[-1].isspace() or (response and response[0].isspace()):
        return prompt + response
    return prompt + " " + response


class RewardPairCollator:
    """pairs -> {chosen_ids, chosen_mask, rejected_ids, rejected_mask, margin}, right-padded with the reward
    model's tokenizer (prompt and response joined by join_text), for the training loop. Pairs longer than
    max_length tokens are truncated."""

    def __init__(self, tokenizer, max_length: Optional[int] = None):
        self.tok, self.max_length = tokenizer, max_length

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        out = {}
        for key in ("chosen", "rejected"):
            enc = self.tok([join_text(d["prompt"], d[key]) for d in pairs], padding_side="right",
                           truncation=self.max_length is not None, max_length=self.max_length)
            out[f"{key}_ids"], out[f"{key}_mask"] = enc["input_ids"], enc["attention_mask"]
        out["margin"] = torch.tensor([float(d.get("margin", 0.0)) for d in pairs])
        return out
