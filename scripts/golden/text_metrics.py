"""Golden part `text_metrics`: rouge-score's and sacrebleu's values on a fixed, varied set of texts, so the
default test suite checks minillm.text_metrics without the reference libraries.

Writes
  tests/golden/text_metrics.safetensors
      rouge      (N, 4, 3) float64: for pair i, rouge1/rouge2/rougeL/rougeLsum × precision/recall/F
                 = RougeScorer([...], use_stemmer=False).score(REFERENCES[i], PREDICTIONS[i])
      bleu       (C,) float64: sacrebleu.corpus_bleu(predictions, streams).score for each corpus in CORPORA
      the texts and corpora in the metadata ("info")
"""

from __future__ import annotations

import torch

from golden.common import write_golden

# (prediction, reference): punctuation, case, empty strings, repeats, newlines (rougeLsum), unicode, numbers
PAIRS = [
    ("It is very cold outside", "It is cold outside"),  # the course's worked example
    ("It is not cold outside", "It is cold outside"),
    ("cold cold cold cold", "It is cold outside"),  # clipping
    ("outside cold it is", "It is cold outside"),  # order: same unigrams, shorter LCS
    ("The cat sat on the mat.", "the cat, the CAT: sat on the mat!!"),
    ("", "a reference with words"),
    ("a prediction with words", ""),
    ("", ""),
    ("!!! ... ???", "some words"),
    ("the the the the the", "the the"),
    ("Café naïve résumé – über straße", "cafe naive resume uber strasse"),
    ("日本語のテキスト 🙂 emoji 42", "emoji 42 🙂"),
    ("The quick brown fox.\nIt jumps over the lazy dog.", "A quick brown fox jumps.\nOver the lazy dog it went."),
    ("first line\n\nsecond line\nthird", "second line\nfirst line"),
    ("one sentence only", "one sentence\nonly here"),
    ("a b a b a b\nb a b a", "a a b b\nb b a a\na b"),
    ("police killed the gunman", "the gunman killed police"),
    ("x-ray e.g. 3.14 1,000 U.S.A. don't", "x ray eg 3 14 1 000 usa don t"),
    ("  leading and trailing spaces  ", "leading and trailing spaces"),
    ("tabs\tand\r\nwindows newlines\r\n", "tabs and windows newlines"),
]

CORPORA = [  # (predictions, reference streams)
    (["I am very happy to say that I am drinking a warm cup of tea"],
     [["I am very happy to say that I am drinking a warm cup of tea"]]),  # the course's reference, identity
    (["I am very happy that I am drinking a cup of tea"],
     [["I am very happy to say that I am drinking a warm cup of tea"]]),
    (["I am happy to say that I am drinking a warm tea", "Hello, world!"],
     [["I am very happy to say that I am drinking a warm cup of tea", "Hello world."],
      ["I'm happy to say I'm drinking warm tea.", "Hello, world!"]]),  # two reference streams
    (["The cat sat on the mat.", "It is 3.5 degrees - cold; isn't it?", "", "a b c"],
     [["The cat is on the mat.", "It's 3.5 degrees — cold, isn't it?", "nothing", "a b c d e f"]]),
    (["a much longer reference"], [["a much longer reference than the hypothesis"]]),  # brevity penalty
    (["no overlap at all"], [["completely different words here"]]),  # zero
    (["the the the the the the the"], [["the cat is on the mat"]]),  # clipping
    (["He said &quot;hi&quot; &amp; left <skipped> early", "x-\nray"],
     [['He said "hi" & left early', "xray"], ["He said hi and left early", None]]),  # 13a's entities; a None ref
    (["one two three four five", "six seven eight nine ten eleven"],
     [["one two three four five", "six seven eight nine ten eleven"]]),
]


def make(root) -> None:
    from rouge_score import rouge_scorer
    import sacrebleu
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=False)
    rouge = torch.tensor([[list(scorer.score(ref, pred)[t]) for t in types] for pred, ref in PAIRS],
                         dtype=torch.float64)  # (N, 4, 3)
    bleu = torch.tensor([sacrebleu.corpus_bleu(p, r).score for p, r in CORPORA], dtype=torch.float64)
    write_golden(root, "text_metrics", {"rouge": rouge, "bleu": bleu},
                 {"source": f"rouge-score RougeScorer(use_stemmer=False), sacrebleu {sacrebleu.__version__} "
                            f"corpus_bleu (13a, exp)", "pairs": PAIRS, "corpora": CORPORA, "rouge_types": types})
