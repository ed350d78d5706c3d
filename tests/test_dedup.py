"""Semantic dedup: the greedy rule on hand-built vectors, block-independence (hypothesis), the JSONL entry,
and the kept set against sentence-transformers' embeddings (real all-MiniLM-L6-v2)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.dedup import dedup_jsonl, embed_texts, greedy_dedup

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
MINILM = ROOT / "weights" / "all-MiniLM-L6-v2"


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def naive(e, threshold):
    kept = []
    for i in range(e.shape[0]):
        if all(float(e[i] @ e[j]) < threshold for j in kept):
            kept.append(i)
    return kept


def test_greedy_rule_on_hand_built_vectors():
    a, b = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    e = unit(a, [1.0, 0.1, 0.0], b, [1.0, 0.0, 0.0], [0.0, 1.0, 0.05], [0.0, 0.0, 1.0])
    assert greedy_dedup(e, 0.99) == [0, 2, 5]  # the first of each group survives
    assert greedy_dedup(e, 0.9) == [0, 2, 5] and greedy_dedup(e[[0, 2, 5]], 0.5) == [0, 1, 2]
    # a chain: x1 ~ x0 and x2 ~ x1, but x2 is not ~ x0 → x1 dropped, x2 kept (compared with kept texts only)
    angle = torch.tensor([0.0, 0.3, 0.6])
    chain = torch.stack([angle.cos(), angle.sin()], 1)
    assert greedy_dedup(chain, float(torch.cos(torch.tensor(0.35)))) == [0, 2]
    # the threshold is inclusive: cosine == threshold drops
    assert greedy_dedup(unit(a, a), 1.0) == [0]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 60), block=st.integers(1, 70), chunk=st.integers(1, 20),
       threshold=st.floats(0.0, 0.99))
def test_blocks_and_chunks_do_not_change_the_result(seed, n, block, chunk, threshold):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(max(1, n // 3), 4, generator=g)
    e = F.normalize(base[torch.randint(0, base.shape[0], (n,), generator=g)] + 0.2 * torch.randn(n, 4, generator=g),
                    dim=-1)
    assert greedy_dedup(e, threshold, block_size=block, chunk_size=chunk) == naive(e, threshold)


def test_bad_arguments():
    with pytest.raises(ValueError, match="threshold"):
        greedy_dedup(unit([1.0, 0.0]), 1.5)
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        greedy_dedup(torch.ones(3), 0.9)


def test_dedup_jsonl_with_tiny_bert(tmp_path):
    from minillm.models.bert import BertModel
    from minillm.tokenizer import Tokenizer
    m = BertModel.from_pretrained("tiny-bert").eval()
    tok = Tokenizer.from_pretrained("tiny-bert")
    texts = ["the cat sat", "a dog ran far away", "the cat sat", "hello there", "a dog ran far away"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out.jsonl"
    res = dedup_jsonl(src, out, "text", 0.9999, model=m, tokenizer=tok)
    ids = [json.loads(l)["id"] for l in out.read_text().splitlines()]
    emb = embed_texts(texts, model=m, tokenizer=tok)
    assert ids == naive(emb, 0.9999) and 2 not in ids and 4 not in ids and ids[0] == 0
    assert res["records"] == 5 and res["kept"] == len(ids)
    # the length-sorted batching does not change the embeddings
    torch.testing.assert_close(emb, embed_texts(texts[::-1], model=m, tokenizer=tok).flip(0), atol=1e-5, rtol=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        dedup_jsonl(bad, out, "text", 0.9, model=m, tokenizer=tok)


SENTENCES = [
    "The cat sat on the mat.", "A cat was sitting on the mat.", "The cat is sitting on the mat.",
    "Stock markets fell sharply today.", "Shares dropped steeply on the stock market today.",
    "I love eating pizza on Fridays.", "Pizza on Friday is my favourite meal.", "I love to eat pizza on Fridays.",
    "The weather is sunny and warm.", "It is warm and sunny outside.", "Today the weather is sunny and warm.",
    "He plays the guitar in a band.", "She is learning to play the violin.", "He plays guitar in a rock band.",
    "The train was late again this morning.", "This morning the train was delayed again.",
    "Python is a popular programming language.", "Python is a widely used programming language.",
    "The museum opens at nine o'clock.", "The museum opens at 9 am.", "Dogs are loyal animals.",
    "Dogs are very loyal animals.", "Quantum computers use qubits.", "The recipe needs two eggs and flour.",
    "You need flour and two eggs for this recipe.", "The meeting was moved to Tuesday.",
    "We rescheduled the meeting for Tuesday.", "Mount Everest is the highest mountain.",
    "The highest mountain on Earth is Everest.", "Bananas are rich in potassium.",
]

minilm = pytest.mark.skipif(not (MINILM / "model.safetensors").is_file(),
                            reason="weights/all-MiniLM-L6-v2 absent: run python scripts/fetch_minilm.py")


@pytest.mark.reference
@pytest.mark.minilm
@minilm
@pytest.mark.parametrize("threshold", [0.7, 0.8, 0.9])
def test_kept_set_equals_sentence_transformers_live(threshold):
    st_mod = pytest.importorskip("sentence_transformers")
    ref_model = st_mod.SentenceTransformer(str(MINILM), device="cpu")
    ref = torch.as_tensor(ref_model.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True))
    ours = embed_texts(SENTENCES, model_name=str(MINILM))
    sims_ref, sims_ours = ref @ ref.T, ours @ ours.T
    margin = (sims_ref - threshold).abs().min()
    assert (sims_ours - sims_ref).abs().max() < 1e-5 < margin  # the test is meaningful: no pair sits on the edge
    kept = greedy_dedup(ours, threshold)
    assert kept == naive(ref, threshold)
    assert 5 <= len(SENTENCES) - len(kept)  # near-duplicates were found and dropped
