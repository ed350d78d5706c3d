"""Pick the compute device: cuda, then mps, then cpu (or the one asked for); run a block on n CPU threads."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


def pick_device(name: Optional[str] = None) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@contextlib.contextmanager
def cpu_threads(n: Optional[int]) -> Iterator[None]:
    """Run the block with torch on `n` CPU threads (None: leave torch's setting), then restore the old count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
