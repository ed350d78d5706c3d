"""Helpers shared by the golden parts: seeding and deterministic safetensors writing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_golden(root: Path, name: str, tensors: dict, meta: dict | None = None) -> Path:
    """tests/golden/<name>.safetensors. The metadata goes in one key, "info" (JSON): safetensors writes a
    header map of several keys in an unspecified order, which would make reruns differ byte-wise."""
    path = root / "tests" / "golden" / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())}
    save_file(tensors, str(path), metadata={"info": json.dumps(meta or {}, sort_keys=True)})
    print(f"  wrote {path.relative_to(root)} ({len(tensors)} tensors)")
    return path
