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
