"""Bench: semantic dedup throughput on CPU (not a test). Embeds `n` short synthetic review texts with
minillm's BERT on the real all-MiniLM-L6-v2 (run scripts/fetch_minilm.py first), times the greedy rule
on them and on 100k random unit vectors (the rule alone), and extrapolates the embedding time to 100k texts
(embedding is linear in the number of texts; the greedy rule is timed at full size).

    python scripts/benches/dedup.py [n=5000] [threads=1]
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent


def main(n: int = 5000, threads: int = 1) -> None:
    sys.path.insert(0, str(ROOT))
    from minillm.demos.synthetic_reviews import all_prompts, sample_review
    from minillm.dedup import embed_texts, greedy_dedup
    from minillm.models.bert import BertModel
    from minillm.tokenizer import Tokenizer

    torch.set_num_threads(threads)
    rng = random.Random(0)
    prompts = all_prompts()
    texts = [sample_review(rng, rng.choice(prompts)[1]) for _ in range(n)]
    d = ROOT / "weights" / "all-MiniLM-L6-v2"
    model, tok = BertModel.from_pretrained(d).eval(), Tokenizer.from_pretrained(d)
    t0 = time.perf_counter()
    emb = embed_texts(texts, model=model, tokenizer=tok, batch_size=128)
    t1 = time.perf_counter()
    kept = greedy_dedup(emb, 0.95)
    t2 = time.perf_counter()
    big = torch.nn.functional.normalize(torch.randn(100_000, emb.shape[1]), dim=-1)
    t3 = time.perf_counter()
    kept_big = greedy_dedup(big, 0.95)
    t4 = time.perf_counter()
    per = (t1 - t0) / n
    print(f"{threads} thread(s); {n} texts (mean {sum(len(t.split()) for t in texts) / n:.1f} words): "
          f"embed {t1 - t0:.1f}s ({n / (t1 - t0):.0f} texts/s), greedy rule {t2 - t1:.2f}s, kept {len(kept)}")
    print(f"greedy rule on 100k random 384-d unit vectors: {t4 - t3:.1f}s (kept {len(kept_big)})")
    print(f"100k texts estimated: embed {per * 1e5 / 60:.1f} min + rule ≈ {(per * 1e5 + (t4 - t3)) / 60:.1f} min; "
          f"embeddings {1e5 * emb.shape[1] * 4 / 1e6:.0f} MB")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
