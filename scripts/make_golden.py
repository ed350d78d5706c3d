"""Generate the golden reference outputs (needs `pip install -e ".[reference]"`).

Each part lives in scripts/golden/<part>.py with a `make(root: Path) -> None` that writes
tiny checkpoints under weights/tiny-*/ and reference outputs under tests/golden/*.safetensors,
from the reference library only. Everything is seeded: rerunning reproduces the files.

    python scripts/make_golden.py            # all parts
    python scripts/make_golden.py gpt2 nf4   # some parts
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# The parts, in dependency order (later parts may use earlier parts' tiny checkpoints).
PARTS = ["gpt2", "encoders", "nf4", "lora", "metrics", "rlhf", "vqa", "roberta", "text_metrics", "t5", "llama", "prompt_tuning"]


def main(argv: list[str]) -> None:
    parts = argv or PARTS
    for name in parts:
        if name not in PARTS:
            raise SystemExit(f"unknown part '{name}'; parts: {PARTS}")
        print(f"[make_golden] {name}", flush=True)
        importlib.import_module(f"golden.{name}").make(ROOT)


if __name__ == "__main__":
    main(sys.argv[1:])
