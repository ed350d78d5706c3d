"""A synthetic world for the ch. 9 RL-from-classifier-feedback demo: short visit reports, their summaries,
and the two labelled sets the demo's classifiers learn from (grammar, sentiment).

A document reports a visit: "i visited the cafe on monday . the coffee was great . the staff was okay .
we went home after that ." Its reference summary keeps the two judgements: "the coffee was great and the
staff was okay ." Each judgement is drawn from three moods — positive (great, lovely, ...), neutral
(okay, fine, average, ...) and negative (awful, poor, ...). The training summaries are crowd-written: a
quarter of them carry a word-order slip ("the coffee great was and ..."), so the SFT policy learns to
slip too. Held-out references are clean.

The classifiers' data: grammar = sentences of the grammar (label "acceptable") against the same words in
a scrambled order ("unacceptable"), as CoLA separates acceptable from unacceptable English; sentiment =
sentences whose judgements share one mood ("negative" / "neutral" / "positive"), as cardiffnlp's labels.
Everything is seeded and offline.
"""

from __future__ import annotations

import random

PLACES = {"cafe": ["coffee", "cake", "staff", "music"], "hotel": ["room", "bed", "staff", "view"],
          "restaurant": ["food", "menu", "service", "wine"], "cinema": ["film", "seats", "sound", "popcorn"],
          "shop": ["price", "staff", "choice", "queue"], "museum": ["art", "guide", "hall", "ticket"],
          "gym": ["trainer", "shower", "class", "equipment"], "bakery": ["bread", "pie", "staff", "price"]}
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MOODS = {"positive": ["great", "excellent", "lovely", "wonderful", "amazing"],
         "neutral": ["okay", "fine", "average", "ordinary", "standard"],
         "negative": ["awful", "terrible", "poor", "horrible", "bad"]}
SENTIMENT_LABELS = ["negative", "neutral", "positive"]  # cardiffnlp's order: LABEL_1 = neutral
GRAMMAR_LABELS = ["unacceptable", "acceptable"]         # CoLA's order: LABEL_1 = acceptable
CLOSINGS = ["we went home after that .", "it was a busy day .", "we might come back .", "that was our trip ."]
PREFIX = "summarize: "                                  # the book's policy input: "summarize: " + text
PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"     # T5's pad = decoder start = 0, eos = 1


def _mood_adj(rng: random.Random, mood: str) -> str:
    return rng.choice(MOODS[mood])


def slip(words: list[str], rng: random.Random) -> list[str]:
    """A word-order slip: two adjacent words (not the final '.') swapped."""
    w = list(words)
    i = rng.randrange(max(1, len(w) - 2))
    w[i], w[i + 1] = w[i + 1], w[i]
    return w


def scramble(words: list[str], rng: random.Random) -> list[str]:
    """A word order no grammar allows: a shuffle (or at least two slips) that differs from the original."""
    for _ in range(10):
        w = list(words)
        if rng.random() < 0.5:
            rng.shuffle(w)
        else:
            for _ in range(rng.randint(1, 3)):
                w = slip(w, rng)
        if w != words:
            return w
    return slip(words, rng)


def make_item(rng: random.Random, slip_prob: float = 0.0) -> dict:
    """{"text": document, "summary": reference summary, "moods": the two judgements' moods}."""
    place = rng.choice(list(PLACES))
    n1, n2 = rng.sample(PLACES[place], 2)
    m1, m2 = rng.choice(list(MOODS)), rng.choice(list(MOODS))
    a1, a2 = _mood_adj(rng, m1), _mood_adj(rng, m2)
    text = (f"i visited the {place} on {rng.choice(DAYS)} . the {n1} was {a1} . the {n2} was {a2} . "
            f"{rng.choice(CLOSINGS)}")
    words = f"the {n1} was {a1} and the {n2} was {a2} .".split()
    if rng.random() < slip_prob:
        words = slip(words, rng)
    return {"text": text, "summary": " ".join(words), "moods": [m1, m2]}


def corpus(n: int, seed: int, slip_prob: float = 0.0) -> list[dict]:
    rng = random.Random(seed)
    return [make_item(rng, slip_prob) for _ in range(n)]


def _sentence(rng: random.Random, moods: list[str]) -> str:
    place = rng.choice(list(PLACES))
    nouns = rng.sample(PLACES[place], len(moods))
    clauses = [f"the {n} was {_mood_adj(rng, m)}" for n, m in zip(nouns, moods)]
    return " and ".join(clauses) + " ."


def grammar_data(n: int, seed: int) -> list[tuple[str, int]]:
    """(sentence, 1) for sentences of the grammar, (scrambled sentence, 0) for the same words out of order."""
    rng = random.Random(seed)
    out = []
    for _ in range(n // 2):
        moods = [rng.choice(list(MOODS)) for _ in range(rng.choice([1, 2, 2]))]
        s = _sentence(rng, moods) if rng.random() < 0.8 else make_item(rng)["text"]
        out.append((s, 1))
        out.append((" ".join(scramble(s.split(), rng)), 0))
    rng.shuffle(out)
    return out


def sentiment_data(n: int, seed: int) -> list[tuple[str, int]]:
    """(sentence, label) with every judgement of one mood; label = SENTIMENT_LABELS.index(mood)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        mood = rng.choice(SENTIMENT_LABELS)
        out.append((_sentence(rng, [mood] * rng.choice([1, 2])), SENTIMENT_LABELS.index(mood)))
    return out


def vocabulary_texts() -> list[str]:
    """Every word the world uses, for a word-level tokenizer."""
    words = set(PLACES) | {w for v in PLACES.values() for w in v} | set(DAYS) | {w for v in MOODS.values() for w in v}
    words |= {w for c in CLOSINGS for w in c.split()} | set("i visited the on was and .".split()) | {PREFIX.strip()}
    return [" ".join(sorted(words))]
