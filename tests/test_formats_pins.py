"""Number-format edges tests/test_formats.py leaves open: int8 projection clipping at −128/127, absmax on
an all-zero tensor (scale 1, no division by zero), the ±127 code range for either sign, half-precision
inputs and the dequantize dtype, and the exponent bias. Expected values worked out by hand."""

import torch

from minillm.formats import BF16, FP16, FP32, absmax_dequantize, absmax_quantize, stored_value, to_int8


def test_to_int8_rounds_half_to_even_and_clips_to_the_int8_range():
    x = torch.tensor([300.0, -300.0, 127.4, -128.4, 2.5, -2.5, 3.6, -0.4])
    assert to_int8(x).tolist() == [127, -128, 127, -128, 2, -2, 4, 0]


def test_absmax_all_zero_gets_scale_one_and_zero_codes():
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        q, s = absmax_quantize(torch.zeros(5, dtype=dt))
        assert q.tolist() == [0] * 5 and q.dtype == torch.int8
        assert s.item() == 1.0 and s.dtype == torch.float32
        back = absmax_dequantize(q, s)
        assert torch.equal(back, torch.zeros(5)) and torch.isfinite(back).all()


def test_absmax_codes_are_symmetric_within_127():
    # max|x| = 2 on the negative side: scale 63.5, codes round(x * 63.5) with ties to even
    x = torch.tensor([-2.0, 2.0, 1.0, -1.0, 0.01])
    q, s = absmax_quantize(x)
    assert s.item() == 63.5
    assert q.tolist() == [-127, 127, 64, -64, 1]  # 63.5 -> 64 (even), 0.635 -> 1
    assert q.min().item() == -127  # never -128, although int8 holds it: the code range is symmetric


def test_absmax_half_inputs_and_dequantize_dtype():
    x = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float16)
    q, s = absmax_quantize(x)
    assert q.tolist() == [64, -127, 32]  # 63.5 -> 64, 31.75 -> 32
    back = absmax_dequantize(q, s, torch.float16)
    assert back.dtype == torch.float16
    assert torch.allclose(back.float(), torch.tensor([64 / 127, -1.0, 32 / 127]), atol=1e-3)
    assert absmax_dequantize(q, s).dtype == torch.float32  # the default


def test_exponent_bias_and_rounding_by_hand():
    assert (FP32.bias, FP16.bias, BF16.bias) == (127, 15, 127)
    assert FP16.smallest_normal == 2.0 ** -14 and FP16.eps == 2.0 ** -10
    assert stored_value(1 + 2 ** -11, FP16) == 1.0          # a tie rounds to even (1.0)
    assert stored_value(1 + 3 * 2 ** -11, FP16) == 1 + 2 ** -9  # a tie rounds to even (…10 binary)
    assert stored_value(1 + 2 ** -8, BF16) == 1.0
