"""Pick the compute device: cuda, then mps, then cpu (or the one asked for)."""

from __future__ import annotations

from typing import Optional

import torch


def pick_device(name: Optional[str] = None) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
