"""ROUGE and BLEU: equal to rouge-score and sacrebleu (golden file; live on fixed and generated texts),
the course's worked example, and the properties every input must satisfy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from minillm.text_metrics import (ROUGE_TYPES, bleu, bleu_score, lcs_indices, lcs_length, rouge, rouge_scores,
                                  rouge_tokenize, tokenize_13a)

GOLDEN = Path(__file__).resolve().parent / "golden" / "text_metrics.safetensors"
TOL = 1e-6  # the bar; in practice the values are bit-identical (same operations in the same order)


def _golden():
    with safe_open(str(GOLDEN), "pt") as f:
        return json.loads(f.metadata()["info"]), f.get_tensor("rouge"), f.get_tensor("bleu")


# ---- the golden file (rouge-score / sacrebleu values, no reference library needed) ----

def test_rouge_equals_rouge_score_golden():
    meta, ref, _ = _golden()
    assert meta["rouge_types"] == list(ROUGE_TYPES)
    ours = torch.tensor([[list(rouge_scores(p, r)[t]) for t in ROUGE_TYPES] for p, r in meta["pairs"]],
                        dtype=torch.float64)  # (N, 4, 3): type × (precision, recall, F)
    assert (ours - ref).abs().max().item() <= TOL
    preds, refs = zip(*meta["pairs"])
    means = rouge(list(preds), list(refs))
    for i, t in enumerate(ROUGE_TYPES):
        assert abs(means[t] - ref[:, i, 2].mean().item()) <= TOL


def test_bleu_equals_sacrebleu_golden():
    meta, _, ref = _golden()
    ours = [bleu(p, r) for p, r in meta["corpora"]]
    assert max(abs(a - b) for a, b in zip(ours, ref.tolist())) <= TOL


# ---- the course's worked example ----

def test_course_rouge_example():
    """Reference "It is cold outside", output "It is very cold outside".
    ROUGE-1: 4 matched unigrams; recall 4/4, precision 4/5, F = 2·0.8·1/1.8 = 8/9 ≈ 0.89 (as the course says).
    ROUGE-2: bigrams "it is", "cold outside" match, of 3 (ref) and 4 (output): F = 2·(1/2)(2/3)/(7/6) = 4/7 ≈ 0.57.
    ROUGE-L: the course says LCS 2, but the longest common *subsequence* is "it is cold outside" (4 words,
    the inserted "very" is skipped): recall 1, precision 4/5, F = 8/9, as rouge-score computes."""
    s = rouge_scores("It is very cold outside", "It is cold outside")
    assert s["rouge1"] == pytest.approx((4 / 5, 1.0, 8 / 9), abs=1e-12)
    assert s["rouge2"] == pytest.approx((2 / 4, 2 / 3, 4 / 7), abs=1e-12)
    assert round(s["rouge1"].fmeasure, 2) == 0.89 and round(s["rouge2"].fmeasure, 2) == 0.57
    assert s["rougeL"] == pytest.approx((4 / 5, 1.0, 8 / 9), abs=1e-12)
    assert lcs_length(rouge_tokenize("It is very cold outside"), rouge_tokenize("It is cold outside")) == 4
    # "not" instead of "very": the same ROUGE-1 (negation is invisible to unigram overlap)
    assert rouge_scores("It is not cold outside", "It is cold outside")["rouge1"] == s["rouge1"]
    # clipping: "cold" occurs once in the reference, so only one of the four counts
    assert rouge_scores("cold cold cold cold", "It is cold outside")["rouge1"].precision == 1 / 4
    # word order: all unigrams match, but the LCS is 2 ("it is")
    shuffled = rouge_scores("outside cold it is", "It is cold outside")
    assert shuffled["rouge1"].fmeasure == 1.0 and shuffled["rougeL"].recall == 2 / 4


def test_bleu_parts_written_out():
    """One segment: 4 unigrams and 3 bigrams, ... all match, but the reference has 7 tokens:
    BP = exp(1 − 7/4), BLEU = 100 · BP."""
    s = bleu_score(["a much longer reference"], [["a much longer reference than the hypothesis"]])
    assert s.counts == [4, 3, 2, 1] and s.totals == [4, 3, 2, 1] and (s.sys_len, s.ref_len) == (4, 7)
    assert s.score == pytest.approx(100 * math.exp(1 - 7 / 4), abs=1e-9)
    # exp smoothing: no 4-gram matches -> p_4 = 100 / (2 · #4-grams)
    s = bleu_score(["a b c x e"], [["a b c d e"]])
    assert s.counts == [4, 2, 1, 0] and s.precisions[3] == 100 / (2 * 2)
    assert tokenize_13a("Hello, world! It's 3.5 - x-ray.") == "Hello , world ! It's 3.5 - x-ray ."  # ' and - stay


def test_bad_arguments_are_clear_errors():
    with pytest.raises(TypeError, match="reference streams"):
        bleu(["a b"], ["a b"])
    with pytest.raises(ValueError, match="reference stream 0 has 1 segments, predictions have 2"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(TypeError):
        rouge("a", "a")


def test_multiple_references_take_the_best():
    r = rouge(["the cat sat"], [["a dog ran", "the cat sat"]])
    assert all(v == 1.0 for v in r.values())


# ---- properties ----

WORDS = ["the", "The", "cat", "CAT", "sat", "on", "mat", "it", "is", "cold", "outside", "very", "3.5", "1,000",
         "x-ray", "e.g.", "don't", "Café", "naïve", "über", "日本", "🙂", "!", ",", ".", "?", "--", "&amp;", "(a)"]
SEPS = [" ", " ", " ", "  ", "\n", ", ", "\t"]


@st.composite
def texts(draw, min_words=0, max_words=25):
    words = draw(st.lists(st.sampled_from(WORDS), min_size=min_words, max_size=max_words))
    seps = draw(st.lists(st.sampled_from(SEPS), min_size=len(words), max_size=len(words)))
    return "".join(w + s for w, s in zip(words, seps)).strip(" ") if words else ""


@settings(max_examples=60, deadline=None)
@given(t=texts())
def test_rouge_of_a_text_with_itself_is_one(t):
    n = len(rouge_tokenize(t))
    s = rouge_scores(t, t)
    for k in ROUGE_TYPES:
        want = 1.0 if (n >= 2 or (n == 1 and k != "rouge2")) else 0.0  # no bigram in one token, nothing in none
        assert s[k].fmeasure == pytest.approx(want, abs=1e-12), k


@settings(max_examples=60, deadline=None)
@given(a=texts(), b=texts())
def test_rouge_f_symmetric_and_bounded(a, b):
    ab, ba = rouge_scores(a, b), rouge_scores(b, a)
    for k in ("rouge1", "rouge2", "rougeL"):
        assert ab[k].fmeasure == pytest.approx(ba[k].fmeasure, abs=1e-12), k  # P and R swap, F stays
        assert ab[k].precision == pytest.approx(ba[k].recall, abs=1e-12)
    for k in ROUGE_TYPES:
        assert all(0.0 <= x <= 1.0 + 1e-12 for x in ab[k])
    assert ab["rougeL"].fmeasure <= ab["rouge1"].fmeasure + 1e-12  # an LCS's words are matched unigrams


@settings(max_examples=40, deadline=None)
@given(a=st.lists(st.sampled_from("abcd"), max_size=12), b=st.lists(st.sampled_from("abcd"), max_size=12))
def test_lcs_indices_is_a_common_subsequence_of_lcs_length(a, b):
    idx = lcs_indices(a, b)
    assert len(idx) == lcs_length(a, b) == lcs_length(b, a)
    assert idx == sorted(set(idx))
    it = iter(b)
    assert all(any(a[i] == y for y in it) for i in idx)  # a[idx] appears in b in order


@settings(max_examples=40, deadline=None)
@given(corpus=st.lists(texts(min_words=4), min_size=1, max_size=5))
def test_bleu_of_identity_is_100(corpus):
    corpus = [t for t in corpus if len(tokenize_13a(t.rstrip()).split()) >= 4] or ["one two three four"]
    assert bleu(corpus, [corpus]) == pytest.approx(100.0, abs=1e-9)


# ---- live against the reference libraries ----

def _rouge_scorer():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)


@pytest.mark.reference
def test_fixed_set_live():
    scorer = _rouge_scorer()
    sacrebleu = pytest.importorskip("sacrebleu")
    meta, _, _ = _golden()
    worst = 0.0
    for p, r in meta["pairs"]:
        ours, ref = rouge_scores(p, r), scorer.score(r, p)
        worst = max([worst] + [abs(x - y) for k in ROUGE_TYPES for x, y in zip(ours[k], ref[k])])
    for p, r in meta["corpora"]:
        worst = max(worst, abs(bleu(p, r) - sacrebleu.corpus_bleu(p, r).score))
    assert worst <= TOL


@pytest.mark.reference
@settings(max_examples=150, deadline=None)
@given(pairs=st.lists(st.tuples(texts(), texts()), min_size=1, max_size=6))
def test_rouge_equals_rouge_score_on_generated_texts(pairs):
    scorer = _rouge_scorer()
    for p, r in pairs:
        ours, ref = rouge_scores(p, r), scorer.score(r, p)
        for k in ROUGE_TYPES:
            assert max(abs(x - y) for x, y in zip(ours[k], ref[k])) <= TOL, (k, p, r)
    means = rouge([p for p, _ in pairs], [r for _, r in pairs])
    for k in ROUGE_TYPES:
        assert abs(means[k] - sum(scorer.score(r, p)[k].fmeasure for p, r in pairs) / len(pairs)) <= TOL


@pytest.mark.reference
@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(1, 6), k=st.integers(1, 3))
def test_bleu_equals_sacrebleu_on_generated_texts(data, n, k):
    sacrebleu = pytest.importorskip("sacrebleu")
    preds = [data.draw(texts()) for _ in range(n)]
    streams = [[data.draw(texts()) for _ in range(n)] for _ in range(k)]
    assert abs(bleu(preds, streams) - sacrebleu.corpus_bleu(preds, streams).score) <= TOL
    # a paraphrase-like corpus (high scores): references are the predictions with some words dropped
    streams = [[" ".join(w for j, w in enumerate(p.split(" ")) if (j + i) % 4) for p in preds] for i in range(k)]
    assert abs(bleu(preds, streams) - sacrebleu.corpus_bleu(preds, streams).score) <= TOL
