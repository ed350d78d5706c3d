"""Bench rows for the text metrics: ROUGE (rouge1, rouge2, rougeL, rougeLsum mean F) on 1,000 summary pairs
against rouge-score, one line per text and three newline-separated sentences per text (rougeLsum's
summary-level path); corpus BLEU on 1,000 segments against sacrebleu. Pure Python on both sides.

The texts are seeded: references of 3 sentences × 8–20 words from a 300-word vocabulary, predictions made
from them by dropping, replacing and swapping words (so the scores are in a realistic 0.3–0.8 range).
Both 13a tokenizers memoize lines (lru_cache); the caches are cleared before every BLEU run, so each run
tokenizes the corpus afresh, as a single evaluation does."""

from __future__ import annotations

import random

from bench import interleaved, row

VOCAB = [f"w{i}" for i in range(260)] + ["the", "a", "of", "and", "to", "in", "is", "was", "for", "on", "it", "that",
                                         "with", "as", "he", "she", "they", "at", "by", "this", "from", "or",
                                         "but", "not", "are", "have", "be", "had", "were", "Mr.", "U.S.", "3.5",
                                         "1,000", "x-ray", "don't", "(say)", "\"quote\"", "well,", "end.", "why?"]


def corpus(n: int = 1000, seed: int = 0) -> tuple[list[str], list[str]]:
    """n (prediction, reference) pairs, each text 3 sentences joined by newlines."""
    rng = random.Random(seed)
    preds, refs = [], []
    for _ in range(n):
        ref_s, pred_s = [], []
        for _ in range(3):
            words = [rng.choice(VOCAB) for _ in range(rng.randint(8, 20))]
            out = []
            for w in words:
                u = rng.random()
                if u < 0.15:
                    continue  # dropped
                out.append(rng.choice(VOCAB) if u < 0.3 else w)  # replaced or kept
            if len(out) > 3 and rng.random() < 0.5:
                i = rng.randrange(len(out) - 1)
                out[i], out[i + 1] = out[i + 1], out[i]  # a local swap
            ref_s.append(" ".join(words))
            pred_s.append(" ".join(out))
        refs.append("\n".join(ref_s))
        preds.append("\n".join(pred_s))
    return preds, refs


def run(args) -> list[dict]:
    from rouge_score import rouge_scorer
    import sacrebleu
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    from sacrebleu.tokenizers.tokenizer_re import TokenizerRegexp
    from minillm.text_metrics import ROUGE_TYPES, bleu, rouge, tokenize_13a

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)

    def ref_rouge(preds, refs):
        s = [scorer.score(r, p) for p, r in zip(preds, refs)]
        return {k: sum(x[k].fmeasure for x in s) / len(s) for k in ROUGE_TYPES}

    preds, refs = corpus()
    flat_p, flat_r = [p.replace("\n", " ") for p in preds], [r.replace("\n", " ") for r in refs]
    rows = []
    for name, (p, r) in (("ROUGE 1,000 pairs, one line each", (flat_p, flat_r)),
                         ("ROUGE 1,000 pairs, 3 sentences each (rougeLsum split)", (preds, refs))):
        ours, ref = rouge(p, r), ref_rouge(p, r)
        diff = max(abs(ours[k] - ref[k]) for k in ROUGE_TYPES)
        t_ours, t_ref = interleaved(lambda: rouge(p, r), lambda: ref_rouge(p, r), repeat=args.repeat, warmup=1)
        rows.append(row(name, t_ours, t_ref, "s", target=1.0,
                        note=f"rouge-score RougeScorer(use_stemmer=False); max |Δ mean F| {diff:.1e}"))

    streams = [flat_r]

    def ours_bleu():
        tokenize_13a.cache_clear()
        return bleu(flat_p, streams)

    def ref_bleu():
        Tokenizer13a.__call__.cache_clear()
        TokenizerRegexp.__call__.cache_clear()
        return sacrebleu.corpus_bleu(flat_p, streams).score

    diff = abs(ours_bleu() - ref_bleu())
    t_ours, t_ref = interleaved(ours_bleu, ref_bleu, repeat=args.repeat, warmup=1)
    rows.append(row("BLEU corpus of 1,000 segments", t_ours, t_ref, "s", target=1.0,
                    note=f"sacrebleu {sacrebleu.__version__} corpus_bleu (13a, exp), caches cleared per run; "
                         f"|Δ BLEU| {diff:.1e}"))
    return rows
