"""Preference data on disk: JSON-lines files of pairs (for reward models, DPO) and of prompts (for PPO).

pairs.jsonl, one object per line:
    {"prompt": str, "chosen": str, "rejected": str}
    optional: "margin": number  — or "score_chosen"/"score_rejected" (margin = their difference)
prompts.jsonl: {"prompt": str} per line (a bare JSON string per line is accepted too).

Every problem is reported with the file and line number: missing keys, empty texts, NaN scores,
a chosen response scored below the rejected one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def _lines(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None


def _number(path, n, key, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ValueError(f"{path}:{n}: '{key}' must be a finite number, got {v!r}")
    return float(v)


def load_pairs(path: str | Path) -> list[dict]:
    """-> [{"prompt", "chosen", "rejected", "margin"}] (margin 0.0 when the file gives none)."""
    out = []
    for n, d in _lines(path):
        if not isinstance(d, dict):
            raise ValueError(f"{path}:{n}: expected an object with prompt/chosen/rejected, got {type(d).__name__}")
        for k in ("prompt", "chosen", "rejected"):
            if not isinstance(d.get(k), str):
                raise ValueError(f"{path}:{n}: missing or non-string '{k}'")
        for k in ("chosen", "rejected"):
            if not d[k].strip():
                raise ValueError(f"{path}:{n}: '{k}' is an empty response")
        margin = 0.0
        if "margin" in d:
            margin = _number(path, n, "margin", d["margin"])
        elif "score_chosen" in d or "score_rejected" in d:
            sc = _number(path, n, "score_chosen", d.get("score_chosen"))
            sj = _number(path, n, "score_rejected", d.get("score_rejected"))
            if sc < sj:
                raise ValueError(f"{path}:{n}: score_chosen {sc} < score_rejected {sj}: chosen must be the preferred one")
            margin = sc - sj
        out.append({"prompt": d["prompt"], "chosen": d["chosen"], "rejected": d["rejected"], "margin": margin})
    if not out:
        raise ValueError(f"{path}: no pairs")
    return out


def load_prompts(path: str | Path) -> list[str]:
    out = []
    for n, d in _lines(path):
        p = d.get("prompt") if isinstance(d, dict) else d
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{path}:{n}: expected {{\"prompt\": non-empty string}}")
        out.append(p)
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def join_text(prompt: str, response: str) -> str:
    """prompt + response as one text for a reward model (a space between them unless one is already there)."""
    if not prompt or prompt[-1].isspace() or (response and response[0].isspace()):
        return prompt + response
    return prompt + " " + response
