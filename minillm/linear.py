"""The linear layer, y = x Wᵀ + b, and which CPU kernel computes it.

    x (..., in),  W (out, in),  b (out,)  ->  y (..., out)

Every projection in a transformer is this one product, and on a CPU it is nearly all of the time
(≥ 95% of a Llama forward). torch sends a float32 `F.linear` on CPU to MKL's sgemm; on the AMD EPYC
this project is measured on, oneDNN (torch's other CPU GEMM library, which it already uses for
bfloat16) computes the same float32 product 2–2.5× faster (1.5–2× for one row, the decoding step).
On Intel CPUs, where MKL picks its own best kernels, expect the two to be close. So `linear` routes
float32 CPU products to oneDNN, and everything else — CUDA, bfloat16 / float16 (already oneDNN inside
F.linear on CPU), autocast, torch.compile — to F.linear unchanged. oneDNN's op has no backward of its
own, so under autograd the product goes through `_OneDNNLinear`, whose backward is the two products
of the chain rule, on oneDNN as well (F.linear when create_graph records a second derivative):

    dx = g W              (..., out) · (out, in)
    dW = gᵀ x             (out, rows) · (rows, in)
    db = Σ_rows g

oneDNN pays ~20 µs per call before any arithmetic, so small layers stay on F.linear (2–5× faster
there: a 64-wide toy model's layers): oneDNN takes a product only when W has ≥ 2¹⁸ entries (a 512×512
projection and up; measured here: from there it wins from a few rows on and loses ~5 µs for one row).
The choice depends on the layer alone, never on the batch, so a layer sums in the same order whatever
the batch size or cache state (what accumulation = one large batch, cached = uncached rely on).

Both are IEEE float32 products that differ only in summation order: results agree to float32
rounding (relative ~1e-6 for K = 2048), not bit for bit. `Linear.fast = False` on a layer (or
`set_fast(model, False)`) restores F.linear exactly.

Prepacking (inference). oneDNN's fast kernels read W in a blocked layout (for bfloat16, pairs of
k interleaved), not the row-major (out, in) a Parameter holds, so every call first re-packs the whole
W. A forward reads each weight once, so that copy is ~5–10% of a 128-row product, but it is most of a
decoding step's (one row): there a bfloat16 product on a packed W takes 1/3 of the time (float32: 0.7–0.9;
measured here; TinyLlama's bf16 greedy generation runs 2.1–2.5× faster, BENCHMARKS.md). The
context `prepacked(model)` packs every big float32 / bfloat16 `Linear` weight once on entry and drops
the copies on exit; inside, products without autograd read the packed copy — the same kernel on the
same numbers, so bfloat16 results are bit for bit those outside (F.linear on contiguous rows; on a
strided 3-D view with a bias F.linear rounds the product before adding b) and float32 ones equal to
rounding (one-row products take another kernel). It costs one more copy of those weights while it
lasts. A weight changed inside (an optimizer step, load_state_dict, `.to()`, a new Parameter) is
seen — by its version counter, storage and identity — and that layer goes back to the plain product;
an in-place change through `.data` (W.data.mul_(2)) bypasses the version counter and is not seen.

Source: torch's `torch.ops.mkldnn._linear_pointwise` and `_reorder_linear_weight` (the oneDNN linear
and weight prepacking torch.compile's CPU backend uses); Intel oneDNN's matmul primitive and its
blocked ("any") weight formats. The measured ratios are in BENCHMARKS.md (area llama).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator, Optional

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
ONEDNN_MIN_WEIGHT = 1 << 18  # entries of W from which a layer's products go to oneDNN


def _onednn_may_run() -> bool:
    """oneDNN's op is there, no CPU autocast (F.linear casts to the autocast dtype; the op would not) and
    no torch.compile tracing (it traces F.linear)."""
    return _ONEDNN_LINEAR is not None and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")


def _dense_cpu(t: Optional[torch.Tensor], dtype: torch.dtype) -> bool:
    """A plain (or Parameter) strided CPU tensor of `dtype`; None (no bias) passes."""
    return t is None or (type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" and t.dtype == dtype
                         and t.layout == torch.strided)


def _big_enough(weight: torch.Tensor) -> bool:
    """A 2-D W of ≥ 2¹⁸ entries: below, oneDNN's per-call overhead outweighs its faster arithmetic."""
    return weight.dim() == 2 and weight.numel() >= ONEDNN_MIN_WEIGHT


def uses_onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """True when `linear` sends this product to oneDNN: float32 dense CPU tensors, a product big enough,
    no CPU autocast, not being traced by torch.compile."""
    return (_onednn_may_run() and all(_dense_cpu(t, torch.float32) for t in (x, weight, bias))
            and _big_enough(weight))


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a bᵀ for _OneDNNLinear's backward: oneDNN, or F.linear when a second derivative is being recorded
    (create_graph) or the summed dimension is empty (oneDNN refuses it)."""
    if torch.is_grad_enabled() or a.shape[-1] == 0:
        return F.linear(a, b)
    return _ONEDNN_LINEAR(a, b, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x Wᵀ + b on oneDNN, with the chain rule's products (on oneDNN too) as its backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])  # (rows, out), (rows, in)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _product(g, weight.t())  # (..., out) · (out, in)
        if ctx.needs_input_grad[1]:
            dw = _product(g2.t(), x2.t())  # (out, rows) · (rows, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           fast: bool = True) -> torch.Tensor:
    """x Wᵀ + b: oneDNN for big float32 CPU products (with fast=True; under autograd through
    _OneDNNLinear), else F.linear."""
    if fast and uses_onednn(x, weight, bias):
        if torch.is_grad_enabled():  # records a backward only where an input needs a gradient
            return _OneDNNLinear.apply(x, weight, bias)
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and init) whose forward is `linear` above; fast=False: F.linear.
    Inside `prepacked(model)`, products without autograd read the packed copy of W (see there)."""

    fast: bool = True
    packed: Optional["PackedWeight"] = None  # set inside prepacked()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and self.fast and not torch.is_grad_enabled():
            w = self._packed_weight(x)
            if w is not None:
                return _ONEDNN_LINEAR(x, w, self.bias, "none", [], "")
        return linear(x, self.weight, self.bias, self.fast)

    def _packed_weight(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The packed W when it is still this layer's W, unchanged, and x is a plain CPU tensor of its dtype."""
        p, w, b = self.packed, self.weight, self.bias
        if p.source() is not w or w._version != p.version or w.data_ptr() != p.address:
            return None  # W was replaced, changed in place or moved since it was packed
        if not (_onednn_may_run() and _dense_cpu(x, w.dtype) and _dense_cpu(b, w.dtype)):
            return None
        return p.tensor


def set_fast(model: nn.Module, fast: bool) -> None:
    """Turn the oneDNN float32 path of every `Linear` in `model` on or off."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.fast = fast


def _bfloat16_packable() -> bool:
    """Whether oneDNN has bfloat16 kernels on this CPU (without them its bf16 linear refuses to run)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


PACKABLE = (torch.float32, torch.bfloat16) if _bfloat16_packable() else (torch.float32,)


class PackedWeight:
    """A Linear's W packed by oneDNN (`tensor`, opaque), with what it was packed from: a weak reference to W,
    W's version counter and storage address. A deep copy of the layer is left unpacked (the packed tensor
    has no storage to copy, and the copy's W is another tensor)."""

    __slots__ = ("source", "version", "address", "tensor")

    def __init__(self, weight: torch.Tensor):
        self.source, self.version, self.address = weakref.ref(weight), weight._version, weight.data_ptr()
        self.tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)  # (out, in), blocked inside

    def __deepcopy__(self, memo) -> None:
        return None


def can_prepack(layer: nn.Module) -> bool:
    """True for a `Linear` whose W `prepacked` packs: a dense CPU float32 / bfloat16 W with ≥ 2¹⁸ entries."""
    if _ONEDNN_LINEAR is None or not isinstance(layer, Linear):
        return False
    w = layer.weight
    return w is not None and any(_dense_cpu(w, d) for d in PACKABLE) and _big_enough(w)


@contextmanager
def prepacked(model: nn.Module) -> Iterator[nn.Module]:
    """Inference with every big `Linear` weight of `model` packed once into oneDNN's blocked layout:

        with prepacked(model):
            generate(model, prompt, max_new_tokens=64)

    Results: bfloat16 bit for bit as outside, float32 to rounding. Memory: one more copy of the packed
    weights until the block ends. Autograd, autocast, other dtypes and changed weights: the plain product.
    Layers packed by an enclosing `prepacked` keep their copy when an inner one ends."""
    mine = []
    try:
        with torch.no_grad():
            for m in model.modules():
                if can_prepack(m) and m.packed is None:
                    m.packed = PackedWeight(m.weight)
                    mine.append(m)
        yield model
    finally:
        for m in mine:
            m.packed = None
