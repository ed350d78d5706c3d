"""Number formats for weights: fp32, fp16, bf16, int8 — range, precision, and absmax int8 quantization.

A float is sign · 2^(exponent − bias) · 1.fraction. More exponent bits buy range, more fraction
bits buy precision: fp32 (1 sign, 8 exponent, 23 fraction bits, 4 bytes, up to ~3.4e38);
fp16 (5 exponent, 10 fraction, 2 bytes, up to 65504); bf16 (8 exponent, 7 fraction, 2 bytes: fp32's
range with less precision). int8 holds the integers −128..127. π stored in fp16 reads back as
3.140625, and projected onto int8 as 3 (the course's example).

Absmax int8 quantization maps a tensor onto int8 by its largest magnitude:

    s = 127 / max|x|,   q = round(x · s) ∈ [−127, 127],   x̂ = q / s

so the largest value maps to ±127 and the rounding error is at most 1/(2s) = max|x| / 254.
Memory: fp32 weights take 4 bytes per parameter; training with Adam needs about 20 more bytes per
parameter (gradients, two optimizer states, activations and temporaries) — roughly 6× the weights,
so 1B parameters need about 24 GB to train in fp32.

Source: the course's quantization notes ("Generative AI with Large Language Models"); IEEE 754;
Dettmers et al., "LLM.int8()" (2022) §2 for absmax quantization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TRAINING_EXTRA_BYTES_PER_PARAM = 20  # the course's figure: grads + Adam states + activations + temporaries


@dataclass(frozen=True)
class FloatFormat:
    name: str
    dtype: torch.dtype
    exponent_bits: int
    fraction_bits: int

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.fraction_bits

    @property
    def bytes(self) -> int:
        return self.bits // 8

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def max(self) -> float:
        """Largest finite value: the top exponent is reserved for inf/NaN, so (2 − 2^−f) · 2^bias."""
        return (2 - 2.0 ** -self.fraction_bits) * 2.0 ** self.bias

    @property
    def smallest_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def eps(self) -> float:
        """The gap between 1 and the next representable number: the relative precision."""
        return 2.0 ** -self.fraction_bits


FP32 = FloatFormat("fp32", torch.float32, 8, 23)
FP16 = FloatFormat("fp16", torch.float16, 5, 10)
BF16 = FloatFormat("bf16", torch.bfloat16, 8, 7)
FLOAT_FORMATS = (FP32, FP16, BF16)
INT8_MIN, INT8_MAX = -128, 127


def stored_value(x: float, fmt: FloatFormat) -> float:
    """The number a format actually stores for x (round to nearest even), read back as a Python float."""
    return torch.tensor(x, dtype=torch.float64).to(fmt.dtype).item()


def to_int8(x: torch.Tensor) -> torch.Tensor:
    """Project onto int8 without scaling: round to the nearest integer, clip to [−128, 127] (π -> 3)."""
    if not x.is_floating_point():
        raise TypeError(f"to_int8 expects a float tensor, got {x.dtype}")
    return x.round().clamp(INT8_MIN, INT8_MAX).to(torch.int8)


def absmax_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (q int8, scale float32) with q = round(x · 127 / max|x|); an all-zero x gets scale 1."""
    if not x.is_floating_point():
        raise TypeError(f"absmax_quantize expects a float tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError("absmax_quantize: empty tensor")
    if not torch.isfinite(x).all():
        raise ValueError("absmax_quantize: tensor holds inf or NaN")
    amax = x.abs().max().float()
    scale = torch.where(amax > 0, 127.0 / amax, torch.ones_like(amax))
    q = (x.float() * scale).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if q.dtype != torch.int8:
        raise TypeError(f"absmax_dequantize expects int8 codes, got {q.dtype}")
    return (q.float() / scale).to(dtype)


def training_memory_gb(n_params: float, bytes_per_param: int = 4) -> dict:
    """The course's rule of thumb: weights at `bytes_per_param`, plus ~20 bytes/param to train."""
    weights = n_params * bytes_per_param
    return {"weights_gb": weights / 1e9, "training_gb": (weights + n_params * TRAINING_EXTRA_BYTES_PER_PARAM) / 1e9}


def format_table() -> str:
    """A table of the formats: bits, bytes, range, precision, and what each stores for π."""
    rows = [f"{'format':6} {'sign':>4} {'exp':>4} {'frac':>4} {'bytes':>5} {'max':>12} {'eps':>10}  pi"]
    for f in FLOAT_FORMATS:
        rows.append(f"{f.name:6} {1:>4} {f.exponent_bits:>4} {f.fraction_bits:>4} {f.bytes:>5} {f.max:>12.5g} "
                    f"{f.eps:>10.3g}  {stored_value(math.pi, f)!r}")
    rows.append(f"{'int8':6} {1:>4} {'-':>4} {7:>4} {1:>5} {INT8_MAX:>12} {1:>10}  "
                f"{int(to_int8(torch.tensor(math.pi)))}")
    return "\n".join(rows)
