"""Training data: file readers, the chat format, label masking, padding collators, length grouping.

Causal-LM fine-tuning learns p(next token | previous tokens); the labels are the input ids
themselves (the loop's loss shifts them by one) with −100 wherever no loss is wanted: padding,
and — for completion-only SFT — every prompt token, so the model is taught to write the
response, not to reproduce the question:

    labels_t = input_ids_t   if t is inside the final response (or no masking)
             = −100          for padding and (completion-only) the prompt and earlier turns

Every record reduces to a (prompt, completion) pair of strings, tokenized separately (so the
split is exact) and concatenated: `{"prompt", "completion"}`; `{"english", "latex"}` (the
book's English → LaTeX example, in its prompt format LATEX_TEMPLATE); `{"messages": [...]}`
turns in the book's chat format

    ###HUMAN### {human text}\\n###BOT### {bot text}###STOP###\\n ... ###HUMAN### {q}\\n###BOT### {answer}###STOP###

where the completion is the final bot answer (and its ###STOP###); or `{"text"}` (no prompt).
The three markers are added to the tokenizer as special tokens (never split) and the model's
embedding matrix is resized, the new rows starting at the mean embedding.

Batches are padded dynamically — to the longest row of the batch, not a global maximum (the
book's "dynamic padding", ch. 10); length-grouped batching puts similar lengths together so
less of each batch is padding. Bad data fails before training, naming file and line.

Source: the book, ch. 10 (LaTeX example, SAWYER's chat tokens and completion-only loss,
dynamic padding); trl's DataCollatorForCompletionOnlyLM for the masking idea.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Optional, Sequence

import torch

HUMAN, BOT, STOP = "###HUMAN###", "###BOT###", "###STOP###"
CHAT_TOKENS = (HUMAN, BOT, STOP)
LATEX_TEMPLATE = "Convert English to LaTeX\nEnglish: {english}\nLaTeX: {latex}"
IGNORE = -100


class DataError(ValueError):
    """Bad training data, found before training starts; the message names file and line."""


# ---- readers ----
def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON object per line (blank lines skipped). Each record gets `_where` = "file:line"."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, found {type(obj).__name__}")
            obj["_where"] = f"{path}:{lineno}"
            records.append(obj)
    if not records:
        raise DataError(f"{path}: empty dataset (no records)")
    return records


def read_csv(path: str | Path) -> list[dict]:
    """A CSV file with a header row; rows with a wrong number of fields are an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    records = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty dataset (no header row)")
        for row in reader:
            lineno = reader.line_num
            if None in row or any(v is None for v in row.values()):
                raise DataError(f"{path}:{lineno}: expected {len(reader.fieldnames)} fields "
                                f"({', '.join(reader.fieldnames)}), found a different number")
            row["_where"] = f"{path}:{lineno}"
            records.append(row)
    if not records:
        raise DataError(f"{path}: empty dataset (a header but no rows)")
    return records


def read_records(path: str | Path) -> list[dict]:
    """JSONL (.jsonl / .json lines) or CSV (.csv), by suffix."""
    return read_csv(path) if str(path).lower().endswith(".csv") else read_jsonl(path)


# ---- chat format and special tokens ----
def add_chat_tokens(tokenizer, model=None) -> int:
    """Add ###HUMAN###, ###BOT###, ###STOP### as special tokens; resize the model's embeddings
    (new rows = mean embedding). Also sets a pad token (eos) when there is none. Returns #new."""
    n = tokenizer.add_special_tokens(list(CHAT_TOKENS))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and len(tokenizer) != model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    return n


def format_chat(messages: Sequence[dict], where: str = "record") -> tuple[str, str]:
    """Turns -> (prompt, completion); the completion is the final bot turn."""
    roles = {"human": HUMAN, "user": HUMAN, "bot": BOT, "assistant": BOT}
    if not messages:
        raise DataError(f"{where}: 'messages' is empty")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in roles or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role in {sorted(roles)} and a string content, found {m!r}")
    if roles[messages[-1]["role"]] != BOT:
        raise DataError(f"{where}: the last message must be the bot's response (role 'bot'/'assistant')")
    prompt = ""
    for m in messages[:-1]:
        tag = roles[m["role"]]
        prompt += f"{tag} {m['content']}" + (f"{STOP}\n" if tag == BOT else "\n")
    return prompt + BOT, f" {messages[-1]['content']}{STOP}"


def prompt_and_completion(record: dict, eos: Optional[str] = None) -> tuple[str, str]:
    """Any supported record -> (prompt, completion) strings (see the module docstring)."""
    where = record.get("_where", "record")
    if "messages" in record:
        return format_chat(record["messages"], where)
    end = eos or ""
    if "prompt" in record and "completion" in record:
        return str(record["prompt"]), str(record["completion"]) + end
    if "english" in record and "latex" in record:
        prompt, _ = LATEX_TEMPLATE.split(" {latex}")
        return prompt.format(english=record["english"]), f" {record['latex']}" + end
    if "text" in record:
        return "", str(record["text"]) + end
    keys = sorted(k for k in record if k != "_where")
    raise DataError(f"{where}: unknown record layout {keys}; expected prompt+completion, english+latex, "
                    f"messages, or text")


def encode_sft(records: Sequence[dict], tokenizer, max_length: Optional[int] = None,
               completion_only: bool = True) -> list[dict]:
    """Records -> [{"input_ids": [...], "labels": [...]}]; prompt labels -100 when completion_only.

    Raises DataError (before any training) for an empty dataset or a sample whose labelled part
    is truncated away entirely by max_length."""
    if not records:
        raise DataError("empty dataset (no records)")
    eos = tokenizer.eos_token
    out = []
    for i, r in enumerate(records):
        where = r.get("_where", f"record {i}")
        prompt, completion = prompt_and_completion(r, eos)
        p_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        c_ids = tokenizer.encode(completion, add_special_tokens=False)
        if not c_ids:
            raise DataError(f"{where}: the response is empty")
        ids = p_ids + c_ids
        labels = ([IGNORE] * len(p_ids) if completion_only else list(p_ids)) + list(c_ids)
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        if not any(l != IGNORE for l in labels[1:]):  # position 0 is never predicted
            if max_length is not None and len(p_ids) + len(c_ids) > max_length:
                raise DataError(f"{where}: the response is truncated away entirely (prompt {len(p_ids)} tokens + "
                                f"response {len(c_ids)} tokens, max_length {max_length}); raise max_length or "
                                f"shorten the prompt")
            raise DataError(f"{where}: nothing to learn from (needs at least 2 tokens, found {len(ids)})")
        out.append({"input_ids": ids, "labels": labels})
    return out


class CausalLMCollator:
    """Pad a list of {"input_ids", "labels"} to the batch's longest row (right padding):
    input_ids with pad_id, attention_mask 0, labels -100. Without "labels", labels = input_ids."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        T = max(len(r["input_ids"]) for r in rows)
        B = len(rows)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(r.get("labels", r["input_ids"]), dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---- multi-label classification ----
def split_labels(value, where: str) -> list[str]:
    """A JSON list of names, or a string of names separated by ';' (CSV)."""
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str):
        return [v.strip() for v in value.split(";") if v.strip()]
    raise DataError(f"{where}: 'labels' must be a list of names or a ';'-separated string, found {value!r}")


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
        ids = tokenizer.encode(str(r[text_key]))
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


# ---- length-grouped order ----
def length_grouped(order: Sequence[int], lengths: Sequence[int], batch_size: int, mega: int = 50) -> list[int]:
    """Reorder a (shuffled) index list so each batch holds similar lengths: cut it into chunks of
    mega·batch_size, sort each chunk by length (longest first). The chunk order stays random, so
    batches still vary; the longest batch of the epoch moves to the front (an early out-of-memory
    instead of a late one), as transformers' LengthGroupedSampler does."""
    order = list(order)
    size = mega * batch_size
    out = []
    for i in range(0, len(order), size):
        out += sorted(order[i:i + size], key=lambda j: -lengths[j])
    batches = [out[i:i + batch_size] for i in range(0, len(out), batch_size)]
    if batches:
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches[0], batches[longest] = batches[longest], batches[0]
    return [j for b in batches for j in b]


def shuffled(records: Sequence, seed: int) -> list:
    """A seeded shuffled copy (for train/eval splits)."""
    rng = random.Random(seed)
    out = list(records)
    rng.shuffle(out)
    return out
