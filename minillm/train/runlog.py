"""The run log: one progress line per event for the person watching, one JSON record per event for the files.

Every long job in minillm (the trainer, the RLHF jobs, the demos) reports through one RunLog:

    [  12.3s] sft   step 100/300 | loss 1.234 | ETA 0:00:41       (printed, when not quiet)
    {"phase": "sft", "time_s": 12.3, "msg": ..., "step": 100, "loss": 1.234}  (appended to metrics.jsonl)

Lines are flushed at once and records written as they come, so a killed run keeps its log.

Source: cleanrl's and nanoGPT's habit of one plain line per logged step.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional, TextIO


def format_eta(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RunLog:
    """log(phase, message, **record): print "[elapsed] phase message" and append {"phase", "time_s", "msg",
    **record} as one JSON line to `path` (when given)."""

    def __init__(self, path: Optional[str | Path] = None, quiet: bool = False, stream: Optional[TextIO] = None,
                 append: bool = False):
        self.t0, self.quiet = time.time(), quiet
        self.stream = stream
        self.file = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a" if append else "w")

    def __call__(self, phase: str, msg: str = "", **record) -> None:
        elapsed = time.time() - self.t0
        if msg and not self.quiet:
            print(f"[{elapsed:7.1f}s] {phase:<5} {msg}", file=self.stream or sys.stdout, flush=True)
        if self.file is not None:
            self.file.write(json.dumps({"phase": phase, "time_s": round(elapsed, 2), "msg": msg, **record}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
