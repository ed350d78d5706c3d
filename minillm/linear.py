"""The linear layer, y = x Wᵀ + b, and which CPU kernel computes it.

    x (..., in),  W (out, in),  b (out,)  ->  y (..., out)

Every projection in a transformer is this one product, and on a CPU it is nearly all of the time
(≥ 95% of a Llama forward). torch sends a float32 `F.linear` on CPU to MKL's sgemm; on the AMD EPYC
this project is measured on, oneDNN (torch's other CPU GEMM library, which it already uses for
bfloat16) computes the same float32 product 2–2.5× faster (1.5–2× for one row, the decoding step).
On Intel CPUs, where MKL picks its own best kernels, expect the two to be close. So `linear` routes
float32 CPU products to oneDNN when nothing needs their gradient (oneDNN's op has no backward:
under autograd it falls back to F.linear), and everything else — CUDA, bfloat16 / float16 (already
oneDNN inside F.linear on CPU), training — to F.linear unchanged.

oneDNN pays ~20 µs per call before any arithmetic, so small products stay on F.linear (4–5× faster
there: a 64-wide toy model's layers): oneDNN takes a product only when W has ≥ 2¹⁹ entries (a 768×768
projection and up) or the product has ≥ 2²² multiply-adds; both thresholds measured on this machine.

Both are IEEE float32 products that differ only in summation order: results agree to float32
rounding (relative ~1e-6 for K = 2048), not bit for bit. `Linear.fast = False` on a layer (or
`set_fast(model, False)`) restores F.linear exactly.

Source: torch's `torch.ops.mkldnn._linear_pointwise` (the oneDNN linear torch.compile's CPU backend
calls); Intel oneDNN's matmul primitive. The measured ratios are in BENCHMARKS.md (area llama).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def _onednn_linear_op():
    """torch's oneDNN linear, or None where this torch build lacks oneDNN or the op."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear_op()
ONEDNN_MIN_WEIGHT = 1 << 19  # entries of W from which oneDNN wins even for one row (decoding)
ONEDNN_MIN_MACS = 1 << 22  # multiply-adds (rows · in · out) from which it wins for smaller W


def uses_onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """True when `linear` sends this product to oneDNN: float32 dense CPU tensors, a product big enough,
    no gradient needed, no CPU autocast, not being traced by torch.compile."""
    if _ONEDNN_LINEAR is None or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False  # under autocast F.linear casts to the autocast dtype; oneDNN's op would not
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(type(t) not in (torch.Tensor, nn.Parameter) or t.device.type != "cpu" or t.dtype != torch.float32
           or t.layout != torch.strided for t in tensors):
        return False
    macs = x.numel() * weight.shape[0]  # rows · in · out
    if weight.dim() != 2 or (weight.numel() < ONEDNN_MIN_WEIGHT and macs < ONEDNN_MIN_MACS):
        return False  # too small: oneDNN's per-call overhead outweighs its faster arithmetic
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           fast: bool = True) -> torch.Tensor:
    """x Wᵀ + b: oneDNN for float32 CPU products that need no gradient (with fast=True), else F.linear."""
    if fast and uses_onednn(x, weight, bias):
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and init) whose forward is `linear` above; fast=False: F.linear."""

    fast: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.fast)


def set_fast(model: nn.Module, fast: bool) -> None:
    """Turn the oneDNN float32 path of every `Linear` in `model` on or off."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.fast = fast
