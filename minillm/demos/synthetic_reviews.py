"""A synthetic world for the RLHF demo: product reviews from a small grammar, and a hidden "true" judge.

Prompts ask for a review of an item ("review of the cheap pizza :"); responses are short
reviews built from clauses ("the pizza was great", "i hated it", "the price was very bad",
"i would recommend it"). The SFT corpus mixes sentiment (half positive, half negative) and
quality: some reviews repeat words, drift to another item, contradict themselves, stop too
soon or ramble.

`true_score` is the hidden judge the demo's labelers approximate: it prefers positive, on-topic,
coherent, non-repetitive reviews of sensible length that end properly. Labelers see it through
noise and round to 1–10, as human raters would; the reward model only ever sees their labels.
Everything is seeded and offline.
"""

from __future__ import annotations

import random
from typing import Optional

ITEMS = ["pizza", "burger", "pasta", "salad", "coffee", "soup", "hotel", "room", "phone", "laptop",
         "movie", "book", "game", "camera", "chair", "bike", "shoes", "jacket", "tea", "cake"]
ITEM_ADJ = ["new", "old", "cheap", "big", "small", "red", "local", "famous", "fancy", "simple"]
ASPECTS = ["price", "service", "quality", "design", "taste", "size"]
POS_ADJ = ["great", "good", "excellent", "lovely", "perfect", "nice"]
NEG_ADJ = ["bad", "awful", "terrible", "poor", "boring", "horrible"]
POS_VERB = ["loved", "liked", "enjoyed"]
NEG_VERB = ["hated", "disliked", "regretted"]
INTENS = ["very", "really"]
EOS, PAD, UNK, CLS = "[EOS]", "[PAD]", "[UNK]", "[CLS]"

POS_WORDS, NEG_WORDS = set(POS_ADJ) | set(POS_VERB), set(NEG_ADJ) | set(NEG_VERB)


def all_prompts() -> list[tuple[str, str]]:
    """(prompt text, item) for every item x qualifier: 200 prompts."""
    return [(f"review of the {a} {it} :", it) for it in ITEMS for a in ITEM_ADJ]


def split_prompts(seed: int = 0, n_heldout: int = 64) -> tuple[list, list]:
    ps = all_prompts()
    random.Random(seed).shuffle(ps)
    return ps[n_heldout:], ps[:n_heldout]


def _clause(rng: random.Random, item: str, positive: bool) -> list[str]:
    adj = rng.choice(POS_ADJ if positive else NEG_ADJ)
    kind = rng.randrange(4)
    if kind == 0:
        words = ["the", item, "was"] + ([rng.choice(INTENS)] if rng.random() < 0.3 else []) + [adj]
    elif kind == 1:
        words = ["i", rng.choice(POS_VERB if positive else NEG_VERB), "it"]
    elif kind == 2:
        words = ["the", rng.choice(ASPECTS), "was"] + ([rng.choice(INTENS)] if rng.random() < 0.3 else []) + [adj]
    else:
        words = ["i", "would", "recommend", "it"] if positive else ["i", "would", "not", "recommend", "it"]
    return words


def sample_review(rng: random.Random, item: str, positive: Optional[bool] = None,
                  quality: Optional[str] = None) -> str:
    """One review (without EOS). quality: 'good' or one of the defects; random when None."""
    if positive is None:
        positive = rng.random() < 0.5
    if quality is None:
        quality = "good" if rng.random() < 0.55 else rng.choice(["repeat", "offtopic", "mixed", "short", "long"])
    n = rng.choice([2, 2, 3])
    clauses = [_clause(rng, item, positive) for _ in range(n)]
    if quality == "offtopic":
        other = rng.choice([x for x in ITEMS if x != item])
        clauses = [_clause(rng, other, positive) for _ in range(n)]
        clauses[0] = ["the", other, "was", rng.choice(POS_ADJ if positive else NEG_ADJ)]
    elif quality == "mixed":
        clauses[-1] = _clause(rng, item, not positive)
    elif quality == "short":
        clauses = [[rng.choice(["ok", "fine", "meh"])]]
    elif quality == "long":
        clauses = [_clause(rng, item, positive) for _ in range(5)]
    words: list[str] = []
    for i, c in enumerate(clauses):
        if i:
            words.append(rng.choice(["and", "but"]) if quality == "mixed" and i == len(clauses) - 1 else "and")
        words += c
    if quality == "repeat":
        j = max(i for i, w in enumerate(words) if w in POS_WORDS | NEG_WORDS | {"it"})
        words = words[:j + 1] + [words[j]] * rng.choice([2, 3]) + words[j + 1:]
    words.append(".")
    return " ".join(words)


def sft_corpus(n: int, seed: int = 0, prompts: Optional[list] = None) -> list[tuple[str, str]]:
    """n (prompt, response) pairs for supervised fine-tuning."""
    rng = random.Random(seed)
    prompts = prompts or all_prompts()
    out = []
    for _ in range(n):
        p, item = rng.choice(prompts)
        out.append((p, sample_review(rng, item)))
    return out


def prompt_item(prompt: str) -> Optional[str]:
    words = prompt.split()
    return next((w for w in reversed(words) if w in ITEMS), None)


def true_score(prompt: str, response: str) -> float:
    """The hidden judge: 1–10, higher is better. `response` may end with the EOS token text.

    5.5 base; sentiment +1 per positive word (−1 per negative, 'not recommend' negative), clipped to ±2;
    on-topic +1 / another item −1.5; mixed sentiment −1; each repeated neighbour word −1.5; fewer than 4 words −2;
    more than 16 words −1 per 2 extra; no final '.' + EOS (cut off or run-on) −2."""
    words = response.split()
    finished = bool(words) and words[-1] == EOS
    words = [w for w in words if w not in (EOS, PAD)]
    item = prompt_item(prompt)
    s = 5.5
    pos = sum(w in POS_WORDS for w in words)
    neg = sum(w in NEG_WORDS for w in words)
    for i in range(len(words) - 2):
        if words[i:i + 3] == ["not", "recommend", "it"]:
            neg += 1
        elif words[i:i + 3] == ["would", "recommend", "it"]:
            pos += 1
    s += max(-2, min(2, pos - neg))
    if pos and neg:
        s -= 1.0
    mentioned = [w for w in words if w in ITEMS]
    if item in mentioned:
        s += 1.0
    if any(w != item for w in mentioned):
        s -= 1.5
    s -= 1.5 * sum(words[i] == words[i + 1] for i in range(len(words) - 1))
    if len(words) < 4:
        s -= 2.0
    if len(words) > 16:
        s -= (len(words) - 16) / 2
    if not (finished and words and words[-1] == "."):
        s -= 2.0
    return float(max(1.0, min(10.0, s)))


def labeler_score(prompt: str, response: str, rng: random.Random, noise: float = 0.5) -> int:
    """What a labeler reports: the true score plus Gaussian noise, rounded and clamped to 1..10."""
    return int(max(1, min(10, round(true_score(prompt, response) + rng.gauss(0.0, noise)))))


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over a set of texts: a simple diversity measure (1 = no n-gram repeats)."""
    grams, total = set(), 0
    for t in texts:
        w = t.split()
        for i in range(len(w) - n + 1):
            grams.add(tuple(w[i:i + n]))
            total += 1
    return len(grams) / total if total else 0.0
