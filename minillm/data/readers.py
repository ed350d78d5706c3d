"""Reading training data: one JSONL reader, one CSV reader, one error type naming file and line.

Every dataset in minillm is a file of records — one JSON object per line (JSONL), or a CSV file
with a header row. A record is a dict; the reader adds `_where` = "file:line" so that every later
check (a missing field, an empty response, an unknown label) can say where the bad record is.
Anything wrong with the file itself — missing, not UTF-8, malformed JSON, a line that is not an
object, a CSV row with the wrong number of fields, no records at all — is a DataError raised
before training starts.

Source: the JSON Lines convention (jsonlines.org); RFC 4180 for CSV.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Optional, Sequence


class DataError(ValueError):
    """Bad training data, found before training starts; the message names file and line."""


# ---- readers ----
def read_jsonl(path: str | Path, string_key: Optional[str] = None) -> list[dict]:
    """One JSON object per line (blank lines skipped). Each record gets `_where` = "file:line".
    string_key: also accept a bare JSON string on a line, as the record {string_key: that string}."""
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
            if string_key is not None and isinstance(obj, str):
                obj = {string_key: obj}
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


def shuffled(records: Sequence, seed: int) -> list:
    """A seeded shuffled copy (for train/eval splits)."""
    rng = random.Random(seed)
    out = list(records)
    rng.shuffle(out)
    return out
