"""Decoding (minillm/generation.py): greedy against transformers, batching, the sampling filters."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from minillm.generation import generate, next_token, top_k_filter, top_p_filter
from minillm.models.gpt2 import GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent
EOS = 0  # <|endoftext|> in the tiny tokenizer


@pytest.fixture(scope="module")
def model():
    return GPT2LMHeadModel.from_pretrained(str(ROOT / "weights" / "tiny-gpt2")).eval()


def test_greedy_equals_transformers_generate(model):
    g = load_file(ROOT / "tests" / "golden" / "gpt2_tiny-gpt2.safetensors")
    out = generate(model, g["prompt_ids"], attention_mask=g["prompt_mask"], max_new_tokens=24,
                   eos_token_id=EOS, pad_token_id=EOS)
    assert torch.equal(out, g["greedy"])  # identical token ids


def test_left_padded_batch_equals_row_by_row(model):
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 512, (n,), generator=gen) for n in (3, 7, 5)]
    T = 7
    ids = torch.full((3, T), EOS)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    batch = generate(model, ids, attention_mask=mask, max_new_tokens=15)
    for i, r in enumerate(rows):
        alone = generate(model, r[None], max_new_tokens=15)
        assert torch.equal(batch[i, T:], alone[0, len(r):])


def test_cache_and_no_cache_agree(model):
    ids = torch.randint(1, 512, (2, 6), generator=torch.Generator().manual_seed(4))
    assert torch.equal(generate(model, ids, max_new_tokens=12), generate(model, ids, max_new_tokens=12, use_cache=False))


def test_top_k_one_and_temperature_zero_equal_greedy(model):
    ids = torch.randint(1, 512, (2, 5), generator=torch.Generator().manual_seed(5))
    greedy = generate(model, ids, max_new_tokens=10)
    assert torch.equal(generate(model, ids, max_new_tokens=10, do_sample=True, top_k=1), greedy)
    assert torch.equal(generate(model, ids, max_new_tokens=10, do_sample=True, temperature=0.0), greedy)


def test_rows_stop_at_eos_then_pad():
    class Scripted(torch.nn.Module):  # row 0 says EOS at step 2, row 1 never does
        config = None
        def __init__(self):
            super().__init__()
            self.step = 0
        def new_cache(self, n):
            return None
        def forward(self, ids, attention_mask=None, cache=None):
            logits = torch.zeros(ids.shape[0], ids.shape[1], 10)
            logits[0, -1, 1 if self.step == 2 else 5] = 1.0
            if ids.shape[0] > 1:
                logits[1, -1, 6] = 1.0
            self.step += 1
            return logits
    out = generate(Scripted(), torch.tensor([[3], [4]]), max_new_tokens=5, eos_token_id=1, pad_token_id=9)
    assert out.tolist() == [[3, 5, 5, 1, 9, 9], [4, 6, 6, 6, 6, 6]]
    # every row finished -> stop early
    out = generate(Scripted(), torch.tensor([[3]]), max_new_tokens=10, eos_token_id=5)
    assert out.tolist() == [[3, 5]]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_top_k_keeps_exactly_k_distinct_logits(k, seed):
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(seed))
    kept = top_k_filter(logits, k).isfinite()
    assert (kept.sum(-1) == k).all()
    # the kept ones are the k largest
    assert (logits.masked_fill(~kept, float("inf")).min(-1).values >= logits.masked_fill(kept, float("-inf")).max(-1).values).all()


def test_top_k_keeps_ties_at_the_boundary():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0]])
    assert top_k_filter(logits, 2).isfinite().tolist() == [[True, True, True, False]]


@settings(max_examples=50, deadline=None)
@given(st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_top_p_smallest_set_reaching_p(p, seed):
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(seed)) * 2
    kept = top_p_filter(logits, p).isfinite()[0]
    probs = torch.softmax(logits[0].double(), -1)
    n = int(kept.sum())
    top = probs.sort(descending=True).values
    assert top[:n].sum() >= p - 1e-6  # the set reaches p
    assert n == 1 or top[:n - 1].sum() < p + 1e-6  # and is the smallest such set
    assert probs[kept].min() >= probs[~kept].max() if (~kept).any() else True


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    counts = {}
    for t in (0.5, 1.0, 2.0):
        draws = torch.stack([next_token(logits, True, t, generator=gen) for _ in range(4000)])
        counts[t] = (draws == 0).float().mean().item()
    expect = {t: torch.softmax(logits / t, -1)[0, 0].item() for t in counts}
    for t in counts:  # 4000 draws: std of a frequency <= 0.008; 4 sigma
        assert abs(counts[t] - expect[t]) < 0.032, (t, counts[t], expect[t])
    assert counts[0.5] > counts[1.0] > counts[2.0]


def test_generation_errors(model):
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, torch.tensor([[5, 6]]), attention_mask=torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        generate(model, torch.ones(1, 100, dtype=torch.long), max_new_tokens=40)
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(torch.zeros(1, 3), 1.5)


@pytest.mark.reference
def test_live_greedy_equals_transformers(tmp_path):
    tr = pytest.importorskip("transformers")
    torch.manual_seed(1)
    hf = tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=120, n_positions=64,
                                          bos_token_id=0, eos_token_id=0, initializer_range=0.2)).eval()
    hf.save_pretrained(tmp_path)
    ours = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(1, 120, (4, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :5] = 0
    a = hf.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=0, pad_token_id=0)
    b = generate(ours, ids, attention_mask=mask, max_new_tokens=30, eos_token_id=0, pad_token_id=0)
    assert torch.equal(a, b)
