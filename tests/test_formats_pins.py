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


def test_formats_are_immutable_and_hashable():
    import dataclasses

    import pytest
    assert {FP32: "a", FP16: "b", BF16: "c"}[FP16] == "b"  # usable as dict keys
    with pytest.raises(dataclasses.FrozenInstanceError):
        FP16.fraction_bits = 7


def test_absmax_refuses_an_empty_tensor():
    import pytest
    with pytest.raises(ValueError, match="empty"):
        absmax_quantize(torch.empty(0))
    q, s = absmax_quantize(torch.tensor([-0.5]))  # one value is fine: it maps to -127
    assert q.tolist() == [-127] and s.item() == 254.0


def test_training_memory_at_two_bytes_per_param():
    from minillm.formats import training_memory_gb
    m = training_memory_gb(1e9, bytes_per_param=2)
    assert m == {"weights_gb": 2.0, "training_gb": 22.0}  # 2 GB of weights + 20 bytes/param


def test_format_table_rows():
    from minillm.formats import format_table
    rows = format_table().splitlines()
    assert rows[0].split() == ["format", "sign", "exp", "frac", "bytes", "max", "eps", "pi"]
    assert rows[1].split() == ["fp32", "1", "8", "23", "4", "3.4028e+38", "1.19e-07", "3.1415927410125732"]
    assert rows[2].split() == ["fp16", "1", "5", "10", "2", "65504", "0.000977", "3.140625"]
    assert rows[3].split() == ["bf16", "1", "8", "7", "2", "3.3895e+38", "0.00781", "3.140625"]
    assert rows[4].split() == ["int8", "1", "-", "7", "1", "127", "1", "3"]



def test_absmax_codes_stay_within_127_for_tiny_tensors():
    # max|x| below ~3.7e-37: 127 / max|x| overflows float32 to inf; the codes still keep the symmetric range
    q, s = absmax_quantize(torch.tensor([1e-45, -1e-45]))
    assert q.tolist() == [127, -127]
    q, s = absmax_quantize(torch.tensor([4e-37, -1e-37]))  # just above: a finite scale; -31.75 -> -32
    assert q.tolist() == [127, -32] and torch.isfinite(s)
    torch.testing.assert_close(absmax_dequantize(q, s), torch.tensor([4e-37, -1e-37]), rtol=1e-2, atol=0)
