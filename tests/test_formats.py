"""The course's number formats: the π example, ranges from the bit layout, absmax int8."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.formats import (BF16, FLOAT_FORMATS, FP16, FP32, absmax_dequantize, absmax_quantize, format_table,
                             stored_value, to_int8, training_memory_gb)


def test_pi_example():
    assert stored_value(math.pi, FP16) == 3.140625  # the course's number
    assert stored_value(math.pi, FP32) == 3.1415927410125732
    assert stored_value(math.pi, BF16) == 3.140625
    assert to_int8(torch.tensor(math.pi)).item() == 3
    assert to_int8(torch.tensor(math.pi)).dtype == torch.int8


@pytest.mark.parametrize("fmt", FLOAT_FORMATS, ids=lambda f: f.name)
def test_layout_gives_torch_finfo(fmt):
    fi = torch.finfo(fmt.dtype)
    assert fmt.bits == fi.bits and fmt.bytes == fi.bits // 8
    assert fmt.max == fi.max and fmt.eps == fi.eps and fmt.smallest_normal == fi.tiny


def test_course_ranges():
    assert (FP32.exponent_bits, FP32.fraction_bits, FP32.bytes) == (8, 23, 4)
    assert (FP16.exponent_bits, FP16.fraction_bits, FP16.bytes) == (5, 10, 2)
    assert (BF16.exponent_bits, BF16.fraction_bits, BF16.bytes) == (8, 7, 2)
    assert FP16.max == 65504
    assert 3.3e38 < FP32.max < 3.5e38 and 3.3e38 < BF16.max < 3.5e38  # bf16 keeps fp32's range
    assert stored_value(70000.0, FP16) == math.inf and stored_value(70000.0, BF16) == 70144.0


def test_training_memory_rule():
    m = training_memory_gb(1e9)
    assert m["weights_gb"] == 4 and m["training_gb"] == 24  # 1B params: 4 GB of weights, ~24 GB to train


def test_table_mentions_pi():
    t = format_table()
    assert "3.140625" in t and "65504" in t and t.splitlines()[-1].rstrip().endswith("3")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=200))
def test_absmax_int8_error_bound(xs):
    x = torch.tensor(xs, dtype=torch.float32)
    q, scale = absmax_quantize(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    amax = x.abs().max()
    if amax > 0:
        assert int(q.abs().max()) == 127  # the largest magnitude maps to ±127
    err = (absmax_dequantize(q, scale) - x).abs().max()
    assert err <= amax / 254 * (1 + 1e-5) + 1e-30  # half a step of max|x|/127 (fp32 rounding slack)


def test_absmax_int8_example():
    x = torch.tensor([0.5, -1.27, 0.0, 1.0])
    q, s = absmax_quantize(x)
    assert q.tolist() == [50, -127, 0, 100]
    assert torch.allclose(absmax_dequantize(q, s), torch.tensor([0.5, -1.27, 0.0, 1.0]))


def test_bad_input():
    with pytest.raises(TypeError, match="float"):
        absmax_quantize(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="float"):
        to_int8(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="inf or NaN"):
        absmax_quantize(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="int8"):
        absmax_dequantize(torch.tensor([1.0]), torch.tensor(1.0))
