"""Blockwise 8-bit quantization with bitsandbytes' "dynamic" map: what NF4's double quantization stores
its per-block scales in.

The dynamic map is 256 sorted float32 values that are dense near 0 and sparse near ±1: a sign, then for
each decade e = 6..0 a linear grid of fractions d, so the code holds d · 10^-e (plus 0 and 1). A vector is
cut into blocks of 256 (BLOCKSIZE); each block is scaled into [-1, 1] by its absolute maximum and every
value replaced by the index of its nearest code:

    absmax_b = max_{i in b} |x_i|,   c_i = nearest(DYNAMIC_CODE, x_i / absmax_b),   x̂_i = DYNAMIC_CODE[c_i] · absmax_b

bitsandbytes' CPU kernel finds "nearest" through a 65536-step lookup table rather than a search; that
two-stage rounding is reproduced bit for bit (bitsandbytes 0.50.2).

Sources: Dettmers, "8-Bit Approximations for Parallelism in Deep Learning" (2016) for the dynamic map;
Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (2022) for blockwise quantization;
bitsandbytes' functional.py (create_dynamic_map, quantize_blockwise) and backends/cpu/ops.py.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

BLOCKSIZE = 256  # bitsandbytes' blocksize for the nested (double-quantization) statistics

def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit code: values d · 10^-e for decades e = 6..0, where the linear
    fraction d gets fewer points at small magnitudes; plus 0 and 1. Sorted, 256 float32 values.
    (Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", 2016.)"""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        n_frac = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                     else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, n_frac, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0  # fraction points: midpoints of the grid
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        # in the last decade: bitsandbytes scales by 10^(-(max_exponent_bits - 1) + i) with the loop's last i,
        # which is 10^0 = 1
        data += means.tolist()
        if signed:
            data += (-means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


DYNAMIC_CODE = create_dynamic_map()
_LUT_SIZE = 65536


def _dynamic_lut(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU 8-bit quantizer does not search the code per value: it cuts [-1, 1] into
    65536 equal steps and precomputes, for each step value v_i = -1 + 2i/65535, the nearest code
    (the number of code midpoints below v_i). A value is then rounded to its step first. This
    two-stage rounding is what we reproduce (NF4's quirk 1: it can differ from the exact nearest code
    for values within 1/65535 of a midpoint)."""
    midpoints = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(_LUT_SIZE, dtype=torch.float32)
    v = -1.0 + (2.0 * i) / (_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, v, right=False).to(torch.uint8)  # count of midpoints < v


_DYNAMIC_LUT = _dynamic_lut(DYNAMIC_CODE)


@contextlib.contextmanager
def _one_thread():
    """Small tensors (the absmax vectors) are quantized on one thread: splitting a few thousand values
    over threads costs more in synchronisation than it saves (badly so on a loaded machine)."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of a float32 vector with the dynamic map -> (codes uint8, absmax float32)."""
    if x.numel() <= 1 << 20 and x.device.type == "cpu":
        with _one_thread():
            return _quantize_blockwise_8bit(x, blocksize)
    return _quantize_blockwise_8bit(x, blocksize)


def _quantize_blockwise_8bit(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.reshape(-1).float()
    n = x.numel()
    nblocks = -(-n // blocksize)
    padded = F.pad(x, (0, nblocks * blocksize - n)).view(nblocks, blocksize)  # (blocks, blocksize); pads are 0
    absmax = padded.abs().amax(dim=1)                                          # (blocks,)
    inv = torch.where(absmax == 0, 0.0, 1.0 / absmax)                          # reciprocal, then multiply
    v = padded * inv[:, None]
    big = torch.isinf(inv)  # absmax < 2^-128 (tiny weights): 1/absmax overflows and 0·inf is NaN; divide there
    if bool(big.any()):
        v = torch.where(big[:, None], padded / absmax[:, None], v)
    v = v.clamp_(-1.0, 1.0)
    step = v.add_(1.0).mul_(0.5).mul_(_LUT_SIZE - 1).add_(0.5).to(torch.int32)  # ((v+1)·0.5)·65535 + 0.5, truncated
    codes = _DYNAMIC_LUT.to(x.device).index_select(0, step.view(-1)).view(nblocks, blocksize)
    codes[absmax == 0] = 0  # an all-zero block stores code 0 everywhere (bitsandbytes' memset)
    return codes.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor,
                              blocksize: int = BLOCKSIZE) -> torch.Tensor:
    n = codes.numel()
    nblocks = absmax.numel()
    vals = DYNAMIC_CODE.to(codes.device)[codes.long()]
    vals = F.pad(vals, (0, nblocks * blocksize - n)).view(nblocks, blocksize) * absmax[:, None]
    return vals.reshape(-1)[:n]
