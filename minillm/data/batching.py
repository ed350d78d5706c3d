"""Length-grouped batching: put examples of similar length in one batch, so less of it is padding.

A batch is padded to its longest row; random batches of mixed lengths waste compute on pads.
Sorting within large shuffled chunks keeps most of the randomness and removes most of the padding.

Source: transformers' LengthGroupedSampler; the book, ch. 10 (dynamic padding).
"""

from __future__ import annotations

from typing import Sequence


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
