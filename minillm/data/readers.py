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
import io
import json
import random
from pathlib import Path
from typing import Optional, Sequence


class DataError(ValueError):
    """Bad training data, found before training starts; the message names file and line."""


# ---- readers ----
def read_text(path: str | Path) -> str:
    """A data file's text, decoded as UTF-8; a missing file or bytes that are not UTF-8 are a DataError naming
    the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); is it a binary file?") from None


def read_jsonl(path: str | Path, string_key: Optional[str] = None) -> list[dict]:
    """One JSON object per line (blank lines skipped). Each record gets `_where` = "file:line".
    string_key: also accept a bare JSON string on a line, as the record {string_key: that string}."""
    records = []
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{path}:{lineno}: JSON nested too deeply") from None
        if string_key is not None and isinstance(obj, str):
            obj = {string_key: obj}
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, found {type(obj).__name__}")
        records.append({**obj, "_where": f"{path}:{lineno}"})
    return _nonempty(records, path, "no records")


def read_csv(path: str | Path) -> list[dict]:
    """A CSV file with a header row; rows with a wrong number of fields are an error."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path}: empty dataset (no header row)")
    records = []
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            raise DataError(f"{path}:{reader.line_num}: expected {len(reader.fieldnames)} fields "
                            f"({', '.join(reader.fieldnames)}), found a different number")
        records.append({**row, "_where": f"{path}:{reader.line_num}"})
    return _nonempty(records, path, "a header but no rows")


def _nonempty(records: list[dict], path, what: str) -> list[dict]:
    if not records:
        raise DataError(f"{path}: empty dataset ({what})")
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


def shown(value, limit: int = 80) -> str:
    """A value for an error message: its repr cut to `limit` characters (a deeply nested value shows its type)."""
    try:
        text = repr(value)
    except RecursionError:
        return f"<a deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."
