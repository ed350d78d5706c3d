"""Semantic deduplication: embed texts with a bi-encoder, drop those too close to one already kept.

Each text becomes a unit vector e_i (all-MiniLM-L6-v2: BERT, mean pooling, L2 norm), so cosine
similarity is a dot product. The greedy rule walks the texts in their order:

    keep i  ⇔  max_{j kept, j < i} e_i · e_j < threshold

so the first of a group of near-duplicates survives, and a text is compared with the *kept* texts
only (a text close to a dropped one but not to any kept one stays). The result depends only on
the order, never on how the work is blocked: texts go in blocks of `block_size`; a block is first
compared with every text kept before it (in chunks, so memory stays O(block · chunk)), then resolved
inside itself in order. 100k texts × 384 dims is 150 MB of embeddings; the similarity matrix is
never built whole.

Source: the book, ch. 10 (semantic dedup with a bi-encoder and a cosine threshold); Reimers &
Gurevych, "Sentence-BERT" (2019); Abbas et al., "SemDeDup" (2023) for dedup by embedding similarity.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from minillm.data.readers import DataError, read_jsonl


def greedy_dedup(embeddings: torch.Tensor, threshold: float, block_size: int = 1024,
                 chunk_size: int = 16384) -> list[int]:
    """Indices kept by the greedy rule (module docstring) for unit vectors (N, d). drop ⇔ cosine ≥ threshold."""
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (N, d), got {tuple(embeddings.shape)}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    if block_size < 1 or chunk_size < 1:
        raise ValueError("block_size and chunk_size must be >= 1")
    e = embeddings.float()
    N = e.shape[0]
    kept: list[int] = []
    kept_vecs = torch.empty(N, e.shape[1])  # (N, d) buffer; the first K rows hold the kept vectors
    for start in range(0, N, block_size):
        block = e[start:start + block_size]  # (b, d)
        alive = np.ones(block.shape[0], dtype=bool)
        K = len(kept)
        for c in range(0, K, chunk_size):  # against everything kept before the block
            sims = block @ kept_vecs[c:min(c + chunk_size, K)].T  # (b, chunk)
            alive &= ~(sims >= threshold).any(dim=1).numpy()
        inner = (block @ block.T >= threshold).numpy()  # (b, b)
        new = []
        for j in range(block.shape[0]):  # inside the block, in order
            if not alive[j]:
                continue
            new.append(j)
            alive[j + 1:] &= ~inner[j, j + 1:]
        kept_vecs[K:K + len(new)] = block[new]
        kept += [start + j for j in new]
    return kept


def embed_texts(texts: Sequence[str], model=None, tokenizer=None, model_name: str = "all-MiniLM-L6-v2",
                batch_size: int = 64, max_length: int = 256) -> torch.Tensor:
    """Unit sentence embeddings (N, H) with minillm's BERT (`sentence_embeddings`). Texts are batched by length
    (less padding; the result is in the input order and does not depend on it)."""
    from minillm.models.bert import BertModel, sentence_embeddings
    from minillm.tokenizer import Tokenizer
    if model is None:
        model = BertModel.from_pretrained(model_name).eval()
    if tokenizer is None:
        tokenizer = Tokenizer.from_pretrained(getattr(model, "source_dir", model_name))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    emb = sentence_embeddings(model, tokenizer, [texts[i] for i in order], normalize=True, max_length=max_length,
                              batch_size=batch_size)
    out = torch.empty_like(emb)
    out[torch.tensor(order, dtype=torch.long)] = emb
    return out


def dedup_texts(texts: Sequence[str], threshold: float = 0.95, **embed_kwargs) -> list[int]:
    """Indices of the texts kept (embed, then the greedy rule)."""
    if not texts:
        return []
    return greedy_dedup(embed_texts(texts, **embed_kwargs), threshold)


def dedup_jsonl(path: Union[str, Path], out_path: Union[str, Path], field: str = "text", threshold: float = 0.9,
                model_name: str = "all-MiniLM-L6-v2", batch_size: int = 64, max_length: int = 256,
                model=None, tokenizer=None) -> dict:
    """Read a JSONL file, keep the records whose `field` is not a near-duplicate (cosine ≥ threshold) of an earlier
    kept one, write them, in order, to out_path (one JSON object a line). Returns counts and seconds."""
    records = read_jsonl(path)
    for rec in records:
        if not isinstance(rec.get(field), str):
            raise DataError(f"{rec['_where']}: expected an object with a string field '{field}'")
    lines = [json.dumps({k: v for k, v in rec.items() if k != "_where"}, ensure_ascii=False) for rec in records]
    texts = [rec[field] for rec in records]
    t0 = time.perf_counter()
    emb = embed_texts(texts, model=model, tokenizer=tokenizer, model_name=model_name, batch_size=batch_size,
                      max_length=max_length) if texts else torch.empty(0, 1)
    t1 = time.perf_counter()
    kept = greedy_dedup(emb, threshold) if texts else []
    t2 = time.perf_counter()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name("." + out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in kept:
            f.write(lines[i] + "\n")
    tmp.replace(out)
    return {"records": len(texts), "kept": len(kept), "dropped": len(texts) - len(kept), "threshold": threshold,
            "embed_seconds": t1 - t0, "dedup_seconds": t2 - t1, "out_path": str(out)}
