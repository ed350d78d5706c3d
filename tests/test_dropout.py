"""minillm.dropout: the byte-at-a-time Bernoulli mask drops at rate p, scales by 1/(1−p), replays with the
seed, and its slow path is nn.Dropout."""

import math

import pytest
import torch
import torch.nn as nn

from minillm.dropout import Dropout


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_dropout_rate_and_scale(p):
    """Each element dropped with probability p (within 5 σ of the binomial, on even and odd positions alike:
    each int32 half of a 64-bit draw must be uniform), the rest scaled by exactly 1/(1−p)."""
    n = 1 << 21
    x = torch.randn(n // 1024, 1024)
    torch.manual_seed(0)
    y = Dropout(p)(x)
    dropped = (y == 0) & (x != 0)
    for part in (dropped.view(-1)[0::2], dropped.view(-1)[1::2]):
        sigma = math.sqrt(p * (1 - p) / part.numel())
        assert abs(part.double().mean().item() - p) < 5 * sigma, (p, part.double().mean().item())
    kept = ~dropped
    torch.testing.assert_close(y[kept].double(), x[kept].double() / (1 - p), rtol=1.2e-7, atol=0)  # 1 fp32 rounding


def test_dropout_tiny_p_uses_32_bits():
    """p = 2⁻²⁰ is 4,096 of the 2³² draws: ~2 drops per 2M elements, not 0 (16 bits would round p to 0) and
    not ~half (a threshold missing its −2³¹)."""
    torch.manual_seed(0)
    n = 0
    for _ in range(8):
        n += int((Dropout(2 ** -20)(torch.ones(1 << 21)) == 0).sum())
    assert 4 <= n <= 40, n  # mean 16: P(n < 4) ≈ 1e-4, P(n > 40) ≈ 1e-7


def test_dropout_odd_sizes_and_p_near_one():
    """A count that is not a multiple of the 8 bytes a draw gives keeps x's shape; p within 2⁻⁴⁰ of 1 (t clamps
    to 2³² − 1: its top byte 255) drops everything."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5)
    y = Dropout(0.5)(x)
    assert y.shape == x.shape and ((y == 0) | torch.isclose(y, x * 2)).all() and (y == 0).any() and (y != 0).any()
    assert (Dropout(1 - 2 ** -40)(torch.ones(4099)) == 0).all()


def test_dropout_replays_with_the_seed_and_backpropagates_through_the_mask():
    x = torch.randn(64, 33, requires_grad=True)
    d = Dropout(0.3)
    torch.manual_seed(5)
    y1 = d(x)
    torch.manual_seed(5)
    y2 = d(x)
    assert torch.equal(y1, y2)  # checkpoint replay restores the RNG state and must get the same mask
    assert not torch.equal(y1, d(x))
    g = torch.randn_like(y1)
    y1.backward(g)
    keep = (y1 != 0).float()
    torch.testing.assert_close(x.grad, g * keep / 0.7, rtol=1.2e-7, atol=0)
    assert torch.equal(d.eval()(x), x)  # eval: identity


def test_dropout_slow_path_is_nn_dropout():
    x = torch.randn(16, 40)
    torch.manual_seed(3)
    y = Dropout(0.2, fast=False)(x)
    torch.manual_seed(3)
    assert torch.equal(y, nn.functional.dropout(x, 0.2, training=True))


def test_the_fast_path_runs_on_cpu_by_default_and_nn_dropout_otherwise():
    """By default, on CPU in training, the mask comes from integer draws, not bernoulli_ (what nn.Dropout
    calls); fast=False and eval do not draw that way."""
    from torch.profiler import profile

    def ops(d, x):
        with profile() as p:
            d(x)
        return {e.key for e in p.key_averages()}

    x = torch.randn(64, 64)
    fast = ops(Dropout(0.3), x)
    assert "aten::random_" in fast and "aten::bernoulli_" not in fast
    slow = ops(Dropout(0.3, fast=False), x)
    assert "aten::bernoulli_" in slow and "aten::random_" not in slow
    assert "aten::random_" not in ops(Dropout(0.3).eval(), x)
