"""ROUGE and BLEU: n-gram overlap between generated text and reference text, written out.

Both count how many of the model's word n-grams also appear in a reference, clipping each n-gram's
matches at the number of times it occurs on the other side (so "cold cold cold cold" does not get
credit four times for one "cold"). ROUGE (recall-oriented, for summaries) reports precision, recall and
their harmonic mean per text pair; BLEU (precision-oriented, for translation) pools the counts over the
whole corpus, takes a geometric mean over n = 1..4 and penalizes outputs shorter than the references.

ROUGE-N (Lin 2004), for a prediction p and a reference r, with c(g, x) the count of n-gram g in x:

    overlap = Σ_g min(c(g, p), c(g, r))
    P = overlap / #n-grams(p),   R = overlap / #n-grams(r),   F = 2PR / (P + R)   (0 when P + R = 0)

ROUGE-L replaces the n-gram overlap by the length of the longest common *subsequence* (LCS: words in
the same order, gaps allowed), P = LCS / |p|, R = LCS / |r|. ROUGE-Lsum is the summary-level variant
(Lin 2004, §3.2): texts are split into sentences at newlines; for each reference sentence r_i the union
of its LCS with every predicted sentence counts as hits (each word at most as often as it occurs on both
sides, as ROUGE-1.5.5 does), P = hits / |p|, R = hits / |r|. Tokens: lowercase, every run of characters
other than a-z and 0-9 becomes a space (so "café" is "caf", and non-Latin scripts vanish); exactly
rouge-score's tokenizer without stemming. `rouge` returns the mean F over the pairs.

BLEU (Papineni et al. 2002), over the corpus, with the sacrebleu conventions (Post 2018):

    tokens      mteval-v13a: ASCII punctuation split off (not "'" or "-"), "-" split after a digit, "." and ","
                split unless between digits; case kept
    p_n         = Σ_segments Σ_g min(c(g, hyp), max_refs c(g, ref)) / Σ_segments #n-grams(hyp)   (n = 1..4)
    smoothing   "exp" (NIST, mteval-v13a): the k-th order with no match gets p_n = 1 / (2^k · #n-grams)
    BP          = 1 if c ≥ r else exp(1 − r / c),   c = total hypothesis length, r = Σ over segments of the
                reference length closest to the hypothesis length (ties: the shorter)
    BLEU        = 100 · BP · exp( (1/4) Σ_n log p_n )   (0 when no unigram matches)

The course's worked example (reference "It is cold outside", output "It is very cold outside"):
ROUGE-1 R = 4/4, P = 4/5, F = 0.89; ROUGE-2 R = 2/3, P = 2/4, F = 4/7 = 0.57. The course then counts the
ROUGE-L "LCS" as 2 ("it is", "cold outside"): that is the longest common *substring*-like chunk, not the
longest common subsequence. The LCS is "it is cold outside", length 4, so ROUGE-L R = 1, P = 4/5, F = 0.89
(as rouge-score and ROUGE-1.5.5 compute); we follow rouge-score.

Where we differ from the libraries on purpose: bleu refuses reference streams whose length differs from
the predictions' (sacrebleu silently truncates to the shortest); rouge's use_stemmer (rouge-score's Porter
stemmer via nltk) is not offered.

Source: Lin, "ROUGE: A Package for Automatic Evaluation of Summaries" (2004); Papineni et al., "BLEU: a
Method for Automatic Evaluation of Machine Translation" (2002); Post, "A Call for Clarity in Reporting
BLEU Scores" (2018); Chen & Cherry, "A Systematic Comparison of Smoothing Techniques for Sentence-Level
BLEU" (2014) for the exp smoothing; google-research/rouge (rouge-score) and mjpost/sacrebleu for the
exact conventions; the course ("Generative AI with Large Language Models") for the worked example.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Optional, Sequence, Union

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


# ---------------------------------------------------------------------------------------------
# ROUGE
# ---------------------------------------------------------------------------------------------

class Score(NamedTuple):
    precision: float
    recall: float
    fmeasure: float


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokenize(text: str) -> list[str]:
    """rouge-score's tokens: lowercase, runs of anything but a-z0-9 -> one space, split."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def _score(overlap: int, n_pred: int, n_ref: int) -> Score:
    p = overlap / max(n_pred, 1)
    r = overlap / max(n_ref, 1)
    return Score(p, r, 2 * p * r / (p + r) if p + r > 0 else 0.0)


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of the n-grams (tuples of n consecutive tokens)."""
    return Counter(zip(*(tokens[i:] for i in range(n))))


def rouge_n(pred: list[str], ref: list[str], n: int) -> Score:
    p, r = ngrams(pred, n), ngrams(ref, n)
    overlap = sum(min(c, p[g]) for g, c in r.items())  # clipped: each n-gram counts at most as often as on both sides
    return _score(overlap, sum(p.values()), sum(r.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, the classic dynamic programme kept one row at a time:
    L[i][j] = L[i-1][j-1] + 1 if a_i = b_j else max(L[i-1][j], L[i][j-1])."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def lcs_indices(ref: Sequence[str], can: Sequence[str]) -> list[int]:
    """Indices into `ref` of one longest common subsequence: the full table, then a walk back from the corner.
    Which LCS (when several exist) decides ROUGE-Lsum's union, so the walk breaks ties as rouge-score does:
    on a mismatch it moves left only when the left cell is strictly larger, else up."""
    rows, cols = len(ref), len(can)
    t = [[0] * (cols + 1) for _ in range(rows + 1)]  # (rows + 1, cols + 1)
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if ref[i - 1] == can[j - 1] else max(t[i - 1][j], t[i][j - 1])
    i, j, out = rows, cols, []
    while i > 0 and j > 0:
        if ref[i - 1] == can[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif t[i][j - 1] > t[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out[::-1]


def rouge_l(pred: list[str], ref: list[str]) -> Score:
    if not pred or not ref:
        return Score(0.0, 0.0, 0.0)
    return _score(lcs_length(pred, ref), len(pred), len(ref))


def rouge_lsum(prediction: str, reference: str) -> Score:
    """Summary-level ROUGE-L over newline-separated sentences (empty lines dropped), union LCS per
    reference sentence, each word counted at most as often as it occurs in both summaries."""
    ref_sents = [rouge_tokenize(s) for s in reference.split("\n") if s]
    pred_sents = [rouge_tokenize(s) for s in prediction.split("\n") if s]
    m, n = sum(map(len, ref_sents)), sum(map(len, pred_sents))
    if not m or not n:
        return Score(0.0, 0.0, 0.0)
    ref_left = Counter(w for s in ref_sents for w in s)
    pred_left = Counter(w for s in pred_sents for w in s)
    hits = 0
    for r in ref_sents:
        union = sorted(set().union(*(lcs_indices(r, c) for c in pred_sents)))
        for i in union:
            w = r[i]
            if ref_left[w] > 0 and pred_left[w] > 0:
                hits += 1
                ref_left[w] -= 1
                pred_left[w] -= 1
    return _score(hits, n, m)


def rouge_scores(prediction: str, reference: str) -> dict[str, Score]:
    """Precision, recall and F of rouge1, rouge2, rougeL, rougeLsum for one pair
    (= rouge-score's RougeScorer(...).score(reference, prediction); note its argument order)."""
    pred, ref = rouge_tokenize(prediction), rouge_tokenize(reference)
    out = {"rouge1": rouge_n(pred, ref, 1), "rouge2": rouge_n(pred, ref, 2), "rougeL": rouge_l(pred, ref)}
    # one line each: a single sentence per side, whose union LCS is the LCS itself, so Lsum = L (same counts)
    one_line = "\n" not in prediction and "\n" not in reference
    out["rougeLsum"] = out["rougeL"] if one_line else rouge_lsum(prediction, reference)
    return out


def rouge(predictions: Sequence[str], references: Sequence[Union[str, Sequence[str]]]) -> dict[str, float]:
    """Mean F-measure of rouge1, rouge2, rougeL, rougeLsum over the pairs. A reference may be a list of
    references: each type then takes the best F among them (rouge-score's score_multi)."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("rouge takes lists of texts: rouge([prediction, ...], [reference, ...])")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge needs at least one (prediction, reference) pair")
    total = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        if not refs:
            raise ValueError("an empty list of references")
        scores = [rouge_scores(pred, r) for r in refs]
        for k in ROUGE_TYPES:
            total[k] += max(s[k].fmeasure for s in scores)
    return {k: v / len(predictions) for k, v in total.items()}


# ---------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------

_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # ASCII punctuation but . , - and ': split off
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # "." and "," after a non-digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # "." and "," before a non-digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # "-" after a digit
]


@lru_cache(maxsize=2**16)
def tokenize_13a(line: str) -> str:
    """mteval-v13a tokenization, as sacrebleu's default: returns the tokens joined by single spaces."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A_RULES:
        line = pattern.sub(repl, line)
    return " ".join(line.split())


def _bleu_ngrams(line: str, max_n: int) -> tuple[Counter, int]:
    tokens = line.split()
    return Counter(g for n in range(1, max_n + 1) for g in zip(*(tokens[i:] for i in range(n)))), len(tokens)


@dataclass
class BleuScore:
    score: float  # 0..100
    counts: list[int]  # matched (clipped) n-grams, n = 1..max_n
    totals: list[int]  # hypothesis n-grams
    precisions: list[float]  # percent, after smoothing
    bp: float
    sys_len: int
    ref_len: int


def bleu_score(predictions: Sequence[str], references: Sequence[Sequence[Optional[str]]],
               max_n: int = 4) -> BleuScore:
    """Corpus BLEU with its parts. references are *streams* (sacrebleu's layout): references[k][i] is the
    k-th reference of predictions[i]; a None entry means segment i has fewer references."""
    if isinstance(predictions, str) or isinstance(references, str) or \
            (len(references) and isinstance(references[0], str)):
        raise TypeError("bleu takes predictions [p_0, p_1, ...] and reference streams [[r_0, r_1, ...], ...] "
                        "(one list per reference set, parallel to the predictions)")
    for k, stream in enumerate(references):
        if len(stream) != len(predictions):
            raise ValueError(f"reference stream {k} has {len(stream)} segments, predictions have {len(predictions)}")
    correct, total = [0] * max_n, [0] * max_n
    sys_len = ref_len = 0
    for i, hyp in enumerate(predictions):
        refs = [tokenize_13a(s[i].rstrip()) for s in references if s[i] is not None]
        ref_counts: Counter = Counter()
        ref_lens = []
        for r in refs:
            counts, length = _bleu_ngrams(r, max_n)
            ref_lens.append(length)
            for g, c in counts.items():
                if c > ref_counts[g]:
                    ref_counts[g] = c  # each n-gram clipped at its largest count in any one reference
        hyp_counts, hyp_len = _bleu_ngrams(tokenize_13a(hyp.rstrip()), max_n)
        sys_len += hyp_len
        ref_len += min(ref_lens, key=lambda L: (abs(hyp_len - L), L)) if ref_lens else 0  # closest; ties: shorter
        for g, c in hyp_counts.items():
            total[len(g) - 1] += c
            if g in ref_counts:
                correct[len(g) - 1] += min(c, ref_counts[g])
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    precisions = [0.0] * max_n
    if not any(correct):
        return BleuScore(0.0, correct, total, precisions, bp, sys_len, ref_len)
    halvings = 1.0
    for n in range(max_n):
        if total[n] == 0:
            break  # no n-grams this long: p_n stays 0 and the score is 0 (sacrebleu floors log 0)
        if correct[n] == 0:
            halvings *= 2  # exp smoothing: 1/2, 1/4, ... of a match for each order without one
            precisions[n] = 100.0 / (halvings * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    log_sum = sum(math.log(p) if p > 0 else -9999999999 for p in precisions)
    return BleuScore(bp * math.exp(log_sum / max_n), correct, total, precisions, bp, sys_len, ref_len)


def bleu(predictions: Sequence[str], references: Sequence[Sequence[Optional[str]]]) -> float:
    """Corpus BLEU in 0..100, = sacrebleu.corpus_bleu(predictions, references).score (13a, exp smoothing)."""
    return bleu_score(predictions, references).score
