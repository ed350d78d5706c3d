"""Generation behaviour a user relies on that tests/test_generation.py leaves open (found by scripts/mutation.py):
top-p through next_token and generate, max_new_tokens=0, the caller's train/eval mode, and the defaults
(greedy, temperature 1, 20 new tokens). Expected values are worked out by hand from fixed distributions."""

import torch

from minillm.generation import generate, generate_encoder_decoder, next_token

PROBS = [0.5, 0.3, 0.15, 0.05]  # token 0 is the most likely; cumulative 0.5, 0.8, 0.95, 1.0


def _logits(batch=1):
    return torch.tensor([PROBS] * batch).log()


class FixedLM(torch.nn.Module):
    """Every step's next-token distribution is PROBS over a 4-token vocabulary; records the mode it ran in."""
    config = None

    def __init__(self):
        super().__init__()
        self.modes, self.calls = [], 0

    def new_cache(self, n):
        return None

    def forward(self, ids, attention_mask=None, cache=None):
        self.modes.append(self.training)
        self.calls += 1
        return _logits(ids.shape[0])[:, None, :].expand(ids.shape[0], ids.shape[1], 4).clone()


def _draws(n=4000, **kw):
    g = torch.Generator().manual_seed(0)
    return next_token(_logits(n), do_sample=True, generator=g, **kw)


def test_top_p_keeps_the_smallest_set_reaching_p_when_sampling():
    # p = 0.45: token 0 alone (0.5) reaches it -> sampling is deterministic
    assert set(_draws(top_p=0.45).tolist()) == {0}
    # p = 0.7: {0, 1} (0.5 < 0.7, 0.8 >= 0.7) renormalized: P(0) = 0.5/0.8 = 0.625
    d = _draws(top_p=0.7)
    assert set(d.tolist()) == {0, 1}
    assert abs((d == 0).float().mean().item() - 0.625) < 0.03  # 4000 draws: sd 0.008
    # p = 0.9: {0, 1, 2}; p = 1.0: everything
    assert set(_draws(top_p=0.9).tolist()) == {0, 1, 2}
    assert set(_draws(top_p=1.0).tolist()) == {0, 1, 2, 3}


def test_top_p_combines_with_temperature_and_top_k():
    # temperature 0.5 squares the probabilities: 0.25, 0.09, 0.0225, 0.0025 (sum 0.365) -> 0.685, 0.247, ...
    # top_p = 0.6 then keeps token 0 only
    assert set(_draws(temperature=0.5, top_p=0.6).tolist()) == {0}
    # top_k = 3 first (0.5, 0.3, 0.15 renormalized over 0.95: 0.526, 0.316, 0.158), then top_p = 0.8 keeps {0, 1}
    d = _draws(top_k=3, top_p=0.8)
    assert set(d.tolist()) == {0, 1}
    assert abs((d == 0).float().mean().item() - 0.5 / 0.8) < 0.03


def test_sampling_default_temperature_is_one():
    d = _draws()
    freq = torch.bincount(d, minlength=4).float() / d.numel()
    assert torch.allclose(freq, torch.tensor(PROBS), atol=0.03), freq
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(next_token(_logits(64), do_sample=True, generator=g1),
                       next_token(_logits(64), do_sample=True, temperature=1.0, generator=g2))


def test_generate_with_top_p_samples_only_the_nucleus():
    g = torch.Generator().manual_seed(0)
    out = generate(FixedLM(), torch.tensor([[2, 3]] * 8), max_new_tokens=6, do_sample=True, top_p=0.45, generator=g)
    assert out[:, 2:].eq(0).all()  # the nucleus is {0}
    out = generate(FixedLM(), torch.tensor([[2, 3]] * 64), max_new_tokens=6, do_sample=True, top_p=0.7, generator=g)
    new = out[:, 2:]
    assert set(new.flatten().tolist()) == {0, 1}


def test_generate_defaults_greedy_and_twenty_tokens():
    out = generate(FixedLM(), torch.tensor([[2, 3]]))
    assert out.shape == (1, 2 + 20)
    assert out[0, 2:].eq(0).all()  # greedy: the argmax every step
    assert out[0, :2].tolist() == [2, 3]


def test_max_new_tokens_zero_returns_the_prompt():
    lm = FixedLM()
    ids = torch.tensor([[0, 2, 3], [1, 1, 2]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    for use_cache in (True, False):
        out = generate(lm, ids, attention_mask=mask, max_new_tokens=0, use_cache=use_cache)
        assert torch.equal(out, ids)
    assert lm.calls == 0


def test_generate_runs_in_eval_and_restores_the_callers_mode():
    lm = FixedLM()
    lm.train()
    generate(lm, torch.tensor([[2]]), max_new_tokens=3)
    assert lm.training is True  # restored
    assert lm.modes and not any(lm.modes)  # every forward ran in eval mode (dropout off)
    lm.eval()
    generate(lm, torch.tensor([[2]]), max_new_tokens=3)
    assert lm.training is False


def test_eos_stops_and_pads_with_eos_by_default():
    # greedy always says 0; with eos 0 every row finishes at the first step
    out = generate(FixedLM(), torch.tensor([[2, 3], [3, 3]]), max_new_tokens=5, eos_token_id=0)
    assert out.tolist() == [[2, 3, 0], [3, 3, 0]]
    # sampling with eos 1: a row after its EOS gets the pad token, which defaults to the EOS id
    g = torch.Generator().manual_seed(1)
    out = generate(FixedLM(), torch.tensor([[2]] * 32), max_new_tokens=8, do_sample=True, eos_token_id=1, generator=g)
    for row in out[:, 1:].tolist():
        if 1 in row:
            first = row.index(1)
            assert all(t == 1 for t in row[first:])
    if out.shape[1] < 9:  # stopped early: only when every row had said EOS
        assert (out[:, 1:] == 1).any(1).all()


class FixedSeq2Seq(torch.nn.Module):
    """An encoder-decoder stand-in: every decoder step has the distribution PROBS; config as T5's ids."""
    is_encoder_decoder = True

    class config:
        eos_token_id, pad_token_id, decoder_start_token_id = 3, 2, 2

    def __init__(self):
        super().__init__()
        self.modes = []

    def new_cache(self, n):
        return None

    def encode(self, ids, mask=None):
        return torch.zeros(ids.shape[0], ids.shape[1], 4)

    def decode(self, dec_ids, states, mask=None, cache=None):
        self.modes.append(self.training)
        B, T = dec_ids.shape
        return _logits(B)[:, None, :].expand(B, T, 4).clone()


def test_encoder_decoder_generation_defaults_and_edges():
    lm = FixedSeq2Seq()
    lm.train()
    src = torch.tensor([[5, 6, 7], [5, 6, 0]])
    out = generate(lm, src, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert out.shape == (2, 1 + 20)  # default max_new_tokens
    assert out[:, 0].eq(2).all() and out[:, 1:].eq(0).all()  # starts with decoder_start, greedy = token 0
    assert lm.training is True and not any(lm.modes)  # eval inside, the caller's mode after
    assert generate(lm, src, max_new_tokens=0).tolist() == [[2], [2]]  # nothing generated: just the start
    g = torch.Generator().manual_seed(0)
    out = generate(lm, src.repeat(16, 1), max_new_tokens=4, do_sample=True, top_p=0.7, generator=g)  # no top_k
    assert set(out[:, 1:].flatten().tolist()) == {0, 1}
    # the same through generate_encoder_decoder itself, with its own defaults (20 tokens, no top-k)
    assert generate_encoder_decoder(lm, src).tolist() == [[2] + [0] * 20] * 2  # greedy by default
    out = generate_encoder_decoder(lm, src.repeat(16, 1), max_new_tokens=4, do_sample=True, top_p=0.7, generator=g)
    assert set(out[:, 1:].flatten().tolist()) == {0, 1}
    # with the config's EOS (3) rows end and pad with the config's pad (2)
    out = generate(lm, src.repeat(32, 1), max_new_tokens=6, do_sample=True, generator=g)
    for row in out[:, 1:].tolist():
        if 3 in row:
            assert all(t == 2 for t in row[row.index(3) + 1:])


# ---- filters and next_token: values, bounds, any leading shape ----

import pytest  # noqa: E402

from minillm.generation import apply_temperature, top_k_filter, top_p_filter  # noqa: E402

NEG = float("-inf")


def test_temperature_divides_and_rejects_non_positive():
    x = torch.tensor([[1.0, -2.0, 3.0]])
    assert apply_temperature(x, 0.5).tolist() == [[2.0, -4.0, 6.0]]
    assert apply_temperature(x, 4.0).tolist() == [[0.25, -0.5, 0.75]]
    for t in (0, 0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            apply_temperature(x, t)


def test_top_k_values_bounds_and_shapes():
    x = torch.tensor([1.0, 4.0, 2.0, 3.0])  # one row, no batch axis
    assert top_k_filter(x, 1).tolist() == [NEG, 4.0, NEG, NEG]
    assert top_k_filter(x, 2).tolist() == [NEG, 4.0, NEG, 3.0]
    assert top_k_filter(x, 9).tolist() == x.tolist()  # k beyond the vocabulary keeps everything
    x3 = torch.tensor([[[1.0, 4.0, 2.0], [3.0, 0.0, 5.0]]])  # (B, T, V)
    assert top_k_filter(x3, 2).tolist() == [[[NEG, 4.0, 2.0], [3.0, NEG, 5.0]]]
    for k in (0, -1):
        with pytest.raises(ValueError, match="top_k"):
            top_k_filter(x, k)


def test_top_p_values_bounds_and_shapes():
    row = torch.tensor(PROBS).log()  # 0.5, 0.3, 0.15, 0.05
    out = top_p_filter(row, 0.7)  # one row, no batch axis: {0, 1}
    assert out[:2].tolist() == row[:2].tolist() and out[2:].tolist() == [NEG, NEG]
    assert top_p_filter(row, 0.5).isfinite().tolist() == [True, False, False, False]  # 0.5 reaches 0.5 exactly
    shuffled = row[[2, 0, 3, 1]][None, None]  # (1, 1, V), most likely token not first
    assert top_p_filter(shuffled, 0.7).isfinite().tolist() == [[[False, True, False, True]]]
    assert top_p_filter(row, 1.0).tolist() == row.tolist()
    for p in (0.0, -0.1, 1.01, 1.2):
        with pytest.raises(ValueError, match="top_p"):
            top_p_filter(row, p)


def test_next_token_on_a_single_row():
    row = torch.tensor(PROBS).log()
    assert next_token(row).item() == 0  # greedy
    g = torch.Generator().manual_seed(0)
    assert next_token(row, do_sample=True, top_k=1, generator=g).item() == 0
    draws = [next_token(row, do_sample=True, generator=g).item() for _ in range(300)]
    assert set(draws) == {0, 1, 2, 3} or set(draws) >= {0, 1, 2}


# ---- generate: errors users hit ----

def test_generate_input_errors():
    lm = FixedLM()
    with pytest.raises(ValueError, match="input_ids"):
        generate(lm, torch.tensor([2, 3]))  # 1-D
    with pytest.raises(ValueError, match="input_ids"):
        generate(lm, torch.zeros(2, 0, dtype=torch.long))  # empty prompt
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(lm, torch.tensor([[2]]), max_new_tokens=-1)
    with pytest.raises(ValueError, match="does not match"):
        generate(lm, torch.tensor([[2, 3]]), attention_mask=torch.tensor([[1, 1, 1]]))
    assert generate(lm, torch.tensor([[2, 3]]), max_new_tokens=1).shape == (1, 3)  # a 1-token prompt of 2 is fine
    assert generate(lm, torch.tensor([[2]]), max_new_tokens=1).shape == (1, 2)


def test_generate_position_limit_is_inclusive():
    class Limited(FixedLM):
        class config:
            n_positions = 6
    assert generate(Limited(), torch.tensor([[2, 3]]), max_new_tokens=4).shape == (1, 6)  # exactly fits
    with pytest.raises(ValueError, match="exceeds"):
        generate(Limited(), torch.tensor([[2, 3]]), max_new_tokens=5)
    with pytest.raises(ValueError, match="exceeds"):
        generate(Limited(), torch.tensor([[2] * 7]), max_new_tokens=0)


# ---- generate through a model whose next token depends on every (id, mask, position) it sees ----

V = 7


class _Hist:
    """A stand-in cache: the ids fed so far. Records the length generate asked for."""
    def __init__(self, n):
        self.n, self.ids = n, None


class HistoryLM(torch.nn.Module):
    """Next token = (sum_j mask_j * id_j * (j + 1) + 1) mod V over the whole history; with a cache it is fed only
    the new ids and keeps the rest itself, without one the full ids. Checks that the mask covers the history."""
    config = None

    def __init__(self):
        super().__init__()
        self.caches = []

    def new_cache(self, n):
        self.caches.append(_Hist(n))
        return self.caches[-1]

    def forward(self, ids, attention_mask=None, cache=None):
        if cache is not None:
            cache.ids = ids if cache.ids is None else torch.cat([cache.ids, ids], 1)
            ids = cache.ids
        assert attention_mask.shape == ids.shape
        w = torch.arange(1, ids.shape[1] + 1)
        tok = ((attention_mask * ids * w).sum(-1) + 1) % V
        return F.one_hot(tok, V).float()[:, None, :].expand(ids.shape[0], ids.shape[1], V)


import torch.nn.functional as F  # noqa: E402


def _history_by_hand(rows, masks, n, eos=None, pad=None):
    out = []
    for r, m in zip(rows, masks):
        r, m, done = list(r), list(m), False
        for _ in range(n):
            tok = (sum(a * b * (j + 1) for j, (a, b) in enumerate(zip(r, m))) + 1) % V
            if done:
                tok = pad
            r.append(tok)
            m.append(1)
            done = done or tok == eos
        out.append(r)
    return out


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_feeds_the_history_and_mask(use_cache):
    ids = torch.tensor([[0, 3, 5], [2, 4, 1]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    lm = HistoryLM()
    out = generate(lm, ids, attention_mask=mask, max_new_tokens=6, use_cache=use_cache)
    assert out.tolist() == _history_by_hand(ids.tolist(), mask.tolist(), 6)
    if use_cache:
        assert [c.n for c in lm.caches] == [3 + 6]  # one cache, room for prompt + new tokens
    else:
        assert lm.caches == []
    out = generate(HistoryLM(), ids, max_new_tokens=4, use_cache=use_cache)  # no mask: every token real
    assert out.tolist() == _history_by_hand(ids.tolist(), [[1, 1, 1]] * 2, 4)


def test_generate_eos_with_explicit_pad_and_default_use_cache():
    ids = torch.tensor([[1, 2], [3, 3], [0, 6]])
    expect = _history_by_hand(ids.tolist(), [[1, 1]] * 3, 5, eos=4, pad=6)
    lm = HistoryLM()
    out = generate(lm, ids, max_new_tokens=5, eos_token_id=4, pad_token_id=6)
    n = out.shape[1]
    assert out.tolist() == [r[:n] for r in expect]
    assert len(lm.caches) == 1  # cached by default
    no_pad = _history_by_hand(ids.tolist(), [[1, 1]] * 3, 5, eos=4, pad=4)
    out = generate(HistoryLM(), ids, max_new_tokens=5, eos_token_id=4)
    assert out.tolist() == [r[:out.shape[1]] for r in no_pad]
    out = generate(HistoryLM(), ids, max_new_tokens=5)  # no EOS: nothing stops, pad unused
    assert out.shape == (3, 7)


# ---- encoder-decoder: a decoder whose next token depends on its history and the encoder's input ----

class HistorySeq2Seq(torch.nn.Module):
    is_encoder_decoder = True

    class config:
        pass  # no ids in the config: pad falls back to EOS, then 0; decoder start to pad

    def __init__(self):
        super().__init__()
        self.caches, self.encoded = [], 0

    def new_cache(self, n):
        self.caches.append(_Hist(n))
        return self.caches[-1]

    def encode(self, ids, mask=None):
        self.encoded += 1
        m = torch.ones_like(ids) if mask is None else mask
        return (ids * m).sum(-1, keepdim=True)[:, :, None].float()  # (B, 1, 1)

    def decode(self, dec_ids, states, mask=None, cache=None):
        if cache is not None:
            cache.ids = dec_ids if cache.ids is None else torch.cat([cache.ids, dec_ids], 1)
            dec_ids = cache.ids
        w = torch.arange(1, dec_ids.shape[1] + 1)
        tok = ((dec_ids * w).sum(-1) + states[:, 0, 0].long() + 1) % V
        return F.one_hot(tok, V).float()[:, None, :].expand(dec_ids.shape[0], dec_ids.shape[1], V)


def _seq2seq_by_hand(src, masks, start, n, eos=None, pad=None):
    out = []
    for s, m in zip(src, masks):
        enc, r, done = sum(a * b for a, b in zip(s, m)), [start], False
        for _ in range(n):
            tok = (sum(a * (j + 1) for j, a in enumerate(r)) + enc + 1) % V
            if done:
                tok = pad
            r.append(tok)
            done = done or tok == eos
        out.append(r)
    return out


@pytest.mark.parametrize("use_cache", [True, False])
def test_encoder_decoder_feeds_history_and_encodes_once(use_cache):
    src = torch.tensor([[1, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    lm = HistorySeq2Seq()
    out = generate_encoder_decoder(lm, src, mask, max_new_tokens=5, use_cache=use_cache, decoder_start_token_id=3)
    assert out.tolist() == _seq2seq_by_hand(src.tolist(), mask.tolist(), 3, 5)
    assert lm.encoded == 1
    assert [c.n for c in lm.caches] == ([1 + 5] if use_cache else [])


def test_encoder_decoder_id_fallbacks_and_explicit_ids():
    src = torch.tensor([[1, 2], [2, 2], [0, 3]])
    ones = [[1, 1]] * 3
    # nothing in the config or the call: pad = 0, start = pad = 0, no EOS; cached by default
    lm = HistorySeq2Seq()
    assert generate_encoder_decoder(lm, src, max_new_tokens=4).tolist() == _seq2seq_by_hand(src.tolist(), ones, 0, 4)
    assert len(lm.caches) == 1
    # EOS given: pad falls back to it, and the start to the pad
    exp = _seq2seq_by_hand(src.tolist(), ones, 5, 6, eos=5, pad=5)
    out = generate_encoder_decoder(HistorySeq2Seq(), src, max_new_tokens=6, eos_token_id=5)
    assert out.tolist() == [r[:out.shape[1]] for r in exp]
    # explicit pad and start
    exp = _seq2seq_by_hand(src.tolist(), ones, 1, 6, eos=5, pad=6)
    out = generate_encoder_decoder(HistorySeq2Seq(), src, max_new_tokens=6, eos_token_id=5, pad_token_id=6,
                                   decoder_start_token_id=1)
    assert out.tolist() == [r[:out.shape[1]] for r in exp]


def test_encoder_decoder_input_errors():
    lm = HistorySeq2Seq()
    with pytest.raises(ValueError, match="input_ids"):
        generate_encoder_decoder(lm, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="input_ids"):
        generate_encoder_decoder(lm, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_encoder_decoder(lm, torch.tensor([[1]]), max_new_tokens=-1)
    with pytest.raises(ValueError, match="does not match"):
        generate_encoder_decoder(lm, torch.tensor([[1, 2]]), torch.tensor([[1, 1, 1]]))
    assert generate_encoder_decoder(lm, torch.tensor([[1]]), max_new_tokens=1).shape == (1, 2)
    assert generate_encoder_decoder(lm, torch.tensor([[1, 2]]), torch.tensor([[1, 1]]), max_new_tokens=0).shape == (1, 1)


def test_encoder_decoder_start_id_from_the_config():
    class Cfg(HistorySeq2Seq):
        class config:
            decoder_start_token_id, pad_token_id = 4, 0  # a start id that is not the pad id
    src = torch.tensor([[1, 2], [0, 3]])
    exp = _seq2seq_by_hand(src.tolist(), [[1, 1]] * 2, 4, 3)
    assert generate_encoder_decoder(Cfg(), src, max_new_tokens=3).tolist() == exp
    assert generate(Cfg(), src, max_new_tokens=3).tolist() == exp
    exp = _seq2seq_by_hand(src.tolist(), [[1, 1]] * 2, 5, 3)  # the call's id wins over the config's
    assert generate_encoder_decoder(Cfg(), src, max_new_tokens=3, decoder_start_token_id=5).tolist() == exp
