"""NF4: 4-bit NormalFloat quantization of weights, blockwise, with optional double quantization.

A weight tensor is cut into blocks of `blocksize` consecutive values (flattened, row-major).
Each block is scaled by its absolute maximum into [-1, 1], and each scaled value is replaced
by the index of the nearest of 16 fixed code values, NF4_CODE, chosen so that normally
distributed weights fill the 16 bins equally. Two 4-bit indices share a byte.

    absmax_b = max_{i in b} |x_i|
    q_i      = argmin_j |x_i / absmax_b - NF4_CODE[j]|     (ties to the lower code: midpoints)
    x̂_i      = NF4_CODE[q_i] · absmax_b

Double quantization stores the per-block absmax values themselves in 8 bits: subtract their
mean (the offset), then quantize blockwise again (blocks of 256) with bitsandbytes' signed
8-bit "dynamic" map (minillm/dynamic8bit.py), keeping one float32 scale per 256 blocks:
absmax_b ≈ DYNAMIC_CODE[c_b] · nested_absmax_{b // 256} + offset. At block size 64 that is
0.5 + 4/64 = 0.5625 bytes per weight without, ≈ 0.516 with double quantization.

Everything here reproduces bitsandbytes 0.50.2 on CPU bit for bit (its quantize_4bit /
dequantize_4bit with quant_type="nf4" and compress_statistics=double_quant): the same
float32 operations in the same order, including two quirks noted where they happen (the first
in dynamic8bit.py).

Sources: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023), §3;
Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (2022) for the dynamic map;
bitsandbytes' functional.py and backends/{default,cpu}/ops.py for the exact arithmetic.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm.dynamic8bit import BLOCKSIZE, dequantize_blockwise_8bit, quantize_blockwise_8bit
from minillm.linear import linear

# The 16 NF4 values, exactly as bitsandbytes defines them. Derivation (bitsandbytes'
# create_normal_map(offset=0.9677083, use_extra_value=True)): take the standard normal
# quantiles Φ⁻¹(p) at 8 probabilities evenly spaced from 0.5 to `offset` for the positive side
# and at 7 for the negative side (dropping p = 0.5 each time), add an exact 0, and divide by
# the largest magnitude so the table spans [-1, 1]. Asymmetric on purpose: 0 is representable
# exactly, and there are 8 positive but 7 negative nonzero values.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

# A scaled value goes to code j when MIDPOINTS[j-1] < v <= MIDPOINTS[j] (float32 midpoints).
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
NESTED_BLOCKSIZE = BLOCKSIZE  # double quantization: blocks of 256 absmax values
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# NF4 quantization
# ---------------------------------------------------------------------------------------------

@dataclass
class NF4State:
    """Everything needed to undo quantize_nf4: the original shape and dtype, the block size and
    the per-block scales — float32 absmax, or with double quantization the 8-bit absmax codes,
    one float32 nested absmax per 256 blocks and the float32 offset (the mean absmax)."""
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    absmax_f32: Optional[torch.Tensor] = None     # (blocks,) float32, without double quantization
    absmax_codes: Optional[torch.Tensor] = None   # (blocks,) uint8, with double quantization
    nested_absmax: Optional[torch.Tensor] = None  # (ceil(blocks / 256),) float32
    offset: Optional[torch.Tensor] = None         # () float32

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    @property
    def absmax(self) -> torch.Tensor:
        """The per-block scales as float32 (decoded from the 8-bit codes under double quantization)."""
        if not self.double_quant:
            return self.absmax_f32
        return (dequantize_blockwise_8bit(self.absmax_codes, self.nested_absmax) + self.offset).float()

    def nbytes(self) -> int:
        """Bytes of the scales (the packed codes are counted by the caller)."""
        ts = [self.absmax_f32] if not self.double_quant else [self.absmax_codes, self.nested_absmax, self.offset]
        return sum(t.numel() * t.element_size() for t in ts)


def check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"unsupported NF4 block size {blocksize}: bitsandbytes accepts {list(BLOCKSIZES)}")


def codes_reference(scaled: torch.Tensor) -> torch.Tensor:
    """Written out: the code index is the number of midpoints strictly below the value (int32)."""
    q = torch.zeros(scaled.shape, dtype=torch.int32, device=scaled.device)
    for m in NF4_MIDPOINTS.tolist():  # 15 comparisons, one per midpoint
        q += (scaled > m).int()
    return q


def codes_fast(scaled: torch.Tensor) -> torch.Tensor:
    """The same indices by binary search (torch.bucketize: boundaries[i-1] < v <= boundaries[i])."""
    return torch.bucketize(scaled, NF4_MIDPOINTS.to(scaled.device), out_int32=True)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first element in the high nibble; an odd tail is padded
    with the code of 0.0 (index 7), as bitsandbytes pads the scaled values with zero."""
    q = q.reshape(-1)
    if q.numel() % 2:
        q = F.pad(q, (0, 1), value=7)
    return torch.add(q[1::2], q[0::2], alpha=16).to(torch.uint8)  # 16·high + low


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_nibbles: the n codes (uint8) in order."""
    q = torch.stack([packed >> 4, packed & 0xF], dim=1)  # (bytes, 2)
    return q.reshape(-1)[:n]


def quantize_nf4(x: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                 fast: bool = True) -> tuple[torch.Tensor, NF4State]:
    """Quantize a float tensor (fp32, fp16 or bf16, any shape) to NF4.

    Returns (packed, state): packed is a flat uint8 tensor of (x.numel() + 1) // 2 bytes.
    fast=False uses the written-out code search (codes_reference); both give the same bytes.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize_nf4 needs a float32, float16 or bfloat16 tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    check_blocksize(blocksize)
    if x.numel() == 0:
        raise ValueError(f"quantize_nf4: empty tensor of shape {tuple(x.shape)}")
    flat = x.reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(-1, blocksize)  # (full blocks, blocksize)
    if fast:  # max|x| = max(-min x, max x): one read of the block, no |x| temporary
        lo, hi = torch.aminmax(blocks, dim=1)
        absmax = torch.maximum(-lo, hi)
    else:
        absmax = blocks.abs().amax(dim=1)
    # Full blocks multiply by the reciprocal of absmax (clamped away from 0 for all-zero blocks,
    # whose stored absmax stays 0) ...
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)
    if rem:
        # ... quirk 2: the short last block divides instead, and stores its absmax clamped to 1e-38.
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, flat[full:] / tail_absmax])
    # bitsandbytes clamps the scaled values to [-1, 1]; rounding can push |v| a hair past 1, but
    # such values fall beyond the outermost midpoints either way, so the codes need no clamp.
    q = codes_fast(scaled) if fast else codes_reference(scaled)
    packed = pack_nibbles(q)
    state = NF4State(shape=x.shape, dtype=x.dtype, blocksize=blocksize)
    if double_quant:
        offset = absmax.mean()
        state.absmax_codes, state.nested_absmax = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
        state.offset = offset
    else:
        state.absmax_f32 = absmax
    return packed, state


# byte -> (code of high nibble, code of low nibble): one table lookup decodes two values.
_PAIR_TABLE = torch.stack([NF4_CODE[torch.arange(256) >> 4], NF4_CODE[torch.arange(256) & 0xF]], dim=1)  # (256, 2)
_DEQUANT_CHUNK = 524288  # values per chunk of the fast dequantize (scratch: 2 MiB of codes, 2 MiB of fp32 values)


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: Optional[torch.dtype] = None,
                   fast: bool = True) -> torch.Tensor:
    """Undo quantize_nf4: NF4_CODE[q] · absmax in float32, then cast to the original dtype
    (or `dtype`); returns the original shape.

    fast=False is the equation in whole-tensor passes; fast=True gives the same bits, but decodes
    two codes per byte with one 8-byte table lookup and works through the blocks in chunks of ~512K
    values, scaling them in place in fp32 and casting into the output (the fp32 product rounded once to
    `dtype`), so only the result is written to memory in full: a checkpointed QLoRA step dequantizes every
    weight two or three times (forward, recompute; backward unless the recomputed W is kept, see
    _Linear4bitFunction), and this is most of what the 4-bit format costs."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"dequantize_nf4: packed codes must be uint8, got {packed.dtype}")
    n = math.prod(state.shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"dequantize_nf4: {packed.numel()} packed bytes do not hold {n} values "
                         f"(shape {tuple(state.shape)} needs {(n + 1) // 2})")
    absmax = state.absmax.to(packed.device)
    nblocks, bs = absmax.numel(), state.blocksize
    if nblocks != -(-n // bs):
        raise ValueError(f"dequantize_nf4: {nblocks} absmax values for {n} values in blocks of {bs}")
    out_dtype = dtype or state.dtype
    if not fast:
        vals = NF4_CODE.to(packed.device)[unpack_nibbles(packed.reshape(-1), n).long()]
        vals = F.pad(vals, (0, nblocks * bs - n))
        out = (vals.view(nblocks, bs) * absmax[:, None]).reshape(-1)[:n]  # (blocks, blocksize) -> flat
        return out.reshape(state.shape).to(out_dtype)
    # The pair table as one 8-byte word per byte value: one gather per byte yields its two fp32 values.
    table, codes = _PAIR_TABLE.view(torch.int64).reshape(256).to(packed.device), packed.reshape(-1)
    out, absmax = torch.empty(n, dtype=out_dtype, device=packed.device), absmax.detach()  # codes have no gradient
    step = max(2, _DEQUANT_CHUNK // bs // 2 * 2)  # blocks per chunk, even: every chunk starts on a byte boundary
    # two scratch buffers reused by every chunk (a fresh MiB-sized allocation per chunk costs page faults)
    index = torch.empty(min(codes.numel(), step * bs // 2), dtype=torch.int64, device=packed.device)
    words = torch.empty(index.numel(), dtype=torch.int64, device=packed.device)
    for b0 in range(0, nblocks, step):
        b1 = min(nblocks, b0 + step)
        k, v0, v1 = b1 - b0, b0 * bs, min(n, b1 * bs)  # blocks b0..b1-1 hold values v0..v1-1
        nb = (v1 + 1) // 2 - v0 // 2  # bytes of this chunk
        index[:nb].copy_(codes[v0 // 2:v0 // 2 + nb])
        # the lookup as a gather over a few rows, which torch spreads over threads (a 1-D index_select runs
        # on one; thousands of short rows cost more per row): (bytes,) -> (rows, bytes / rows)
        rows = math.gcd(nb, 16)
        vals = torch.gather(table.expand(rows, 256), 1, index[:nb].view(rows, -1), out=words[:nb].view(rows, -1))
        vals = vals.view(-1).view(torch.float32)  # (2·bytes,)
        if v1 - v0 == k * bs == vals.numel():  # whole blocks: the fp32 product, rounded once into `out`
            out[v0:v1].view(k, bs).copy_(vals.view(k, bs).mul_(absmax[b0:b1, None]))  # no fp32 temporary
        else:  # the short last block (and an odd count's pad nibble)
            vals = F.pad(vals[:v1 - v0], (0, k * bs - (v1 - v0))).view(k, bs) * absmax[b0:b1, None]
            out[v0:v1] = vals.view(-1)[:v1 - v0]
    return out.reshape(state.shape)


def nf4_nbytes(packed: torch.Tensor, state: NF4State) -> int:
    return packed.numel() * packed.element_size() + state.nbytes()


# ---------------------------------------------------------------------------------------------
# A frozen 4-bit linear layer
# ---------------------------------------------------------------------------------------------

class _Linear4bitFunction(torch.autograd.Function):
    """y = x·Wᵀ + b with W dequantized in the forward and again in the backward, so the
    full-precision weight is never held between the two: for QLoRA training only the 4-bit codes
    stay in memory (bitsandbytes' MatMul4Bit does the same). W gets no gradient; x and b do.

    With layer.save_weight_for_backward (set by a model's gradient_checkpointing_enable) the forward's
    W is saved for the backward instead. Under checkpointing that is one dequantization fewer per step
    (3 -> 2) for one block's weights at a time: the first forward's saved tensors are dropped, and the
    block's recomputed forward runs just before its backward. Without checkpointing it would keep every
    layer's full-precision weight alive from forward to backward — which is why it is off by default."""

    @staticmethod
    def forward(ctx, x, bias, layer, dtype):
        ctx.layer, ctx.dtype, ctx.has_bias = layer, dtype, bias is not None
        w = layer.dequantize_weight(dtype)
        if layer.save_weight_for_backward:
            ctx.save_for_backward(w)
        return linear(x, w, bias)  # autograd is off in here: float32 on CPU goes to oneDNN (minillm.linear)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            saved = ctx.saved_tensors  # read once: checkpointing lets a saved tensor be unpacked only once
            w = saved[0] if saved else ctx.layer.dequantize_weight(ctx.dtype)
            grad_x = linear(grad_out, w.t())  # (..., out) @ (out, in)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_b, None, None


class Linear4bit(nn.Module):
    """y = x · dequant(W_nf4)ᵀ + b, the weight frozen in NF4 and dequantized in the compute dtype
    (fp32, bf16 or fp16; default: the input's dtype) at every forward, as bitsandbytes'
    Linear4bit does. The bias is kept in full precision."""

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, state: NF4State,
                 bias: Optional[torch.Tensor] = None, compute_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.save_weight_for_backward = False  # see _Linear4bitFunction: True only under gradient checkpointing
        self.weight_shape, self.weight_dtype = tuple(state.shape), state.dtype
        self.blocksize = state.blocksize
        # Buffers only (frozen). The float32 scales are kept as their int32 bit patterns so that
        # model.to(torch.bfloat16) / .half() cannot round them (casts skip integer buffers).
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_absmax_codes", None)
        self.register_buffer("weight_nested_absmax", None)
        self.register_buffer("weight_offset", None)
        self.register_buffer("weight_absmax", None)
        self._store(state)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad) if bias is not None else None

    @classmethod
    def from_linear(cls, layer: nn.Linear, blocksize: int = 64, double_quant: bool = False,
                    compute_dtype: Optional[torch.dtype] = None) -> "Linear4bit":
        packed, state = quantize_nf4(layer.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(layer.in_features, layer.out_features, packed, state, layer.bias, compute_dtype)

    def _store(self, state: NF4State) -> None:
        bits = lambda t: t.contiguous().view(torch.int32)  # noqa: E731  float32 -> its bit pattern
        if state.double_quant:
            self.weight_absmax_codes = state.absmax_codes
            self.weight_nested_absmax, self.weight_offset = bits(state.nested_absmax), bits(state.offset)
        else:
            self.weight_absmax = bits(state.absmax_f32)

    @property
    def state(self) -> NF4State:
        s = NF4State(shape=torch.Size(self.weight_shape), dtype=self.weight_dtype, blocksize=self.blocksize)
        if self.double_quant:
            s.absmax_codes = self.weight_absmax_codes
            s.nested_absmax = self.weight_nested_absmax.view(torch.float32)
            s.offset = self.weight_offset.view(torch.float32)
        else:
            s.absmax_f32 = self.weight_absmax.view(torch.float32)
        return s

    @property
    def double_quant(self) -> bool:
        return self.weight_absmax_codes is not None

    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(out, in): the stored dtype's dequantization (bit-exact with bitsandbytes), then `dtype`."""
        if dtype is None or dtype == self.weight_dtype or self.weight_dtype == torch.float32:
            return dequantize_nf4(self.weight_packed, self.state, dtype)  # one rounding: fp32 -> dtype
        return dequantize_nf4(self.weight_packed, self.state).to(dtype)  # rounded to the stored dtype first

    def set_weight(self, weight: torch.Tensor) -> None:
        """Re-quantize a new full-precision weight into this layer (same block size and double quant)."""
        packed, state = quantize_nf4(weight.detach().to(self.weight_dtype), self.blocksize, self.double_quant)
        self.weight_packed = packed
        self._store(state)

    def weight_nbytes(self) -> int:
        return nf4_nbytes(self.weight_packed, self.state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        b = self.bias.to(dtype) if self.bias is not None else None
        xc = x.to(dtype)
        if torch.is_grad_enabled() and (xc.requires_grad or (b is not None and b.requires_grad)):
            return _Linear4bitFunction.apply(xc, b, self, dtype).to(x.dtype)  # re-dequantizes in backward
        return linear(xc, self.dequantize_weight(dtype), b).to(x.dtype)  # W: (out, in)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """A pattern matches a module name when it equals it, is its dotted suffix, or fully matches as a regex."""
    for p in patterns:
        if name == p or name.endswith("." + p):
            return True
        try:
            if re.fullmatch(p, name):
                return True
        except re.error:
            pass
    return False


def quantize_model(model: nn.Module, skip: Sequence[str] = ("lm_head",), blocksize: int = 64,
                   double_quant: bool = False, compute_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every nn.Linear (except names matched by `skip`) by a Linear4bit, in place.
    The LM head is skipped by default, as transformers does (GPT-2 ties it to the embedding)."""
    check_blocksize(blocksize)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not _matches(name, skip)]
    # a model that already checkpoints its blocks (models.layers.set_gradient_checkpointing) gets layers that
    # keep W for the backward, as if checkpointing had been turned on after quantizing
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = Linear4bit.from_linear(lin, blocksize, double_quant, compute_dtype)
        q.save_weight_for_backward = checkpointing
        setattr(parent, child, q.train(lin.training))  # an eval-mode model stays in eval mode
    return model


def memory_report(model: nn.Module) -> dict:
    """Bytes per parameter of the 4-bit layers' weights (packed codes + scales), and the model totals."""
    q_params = q_bytes = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            q_params += m.in_features * m.out_features
            q_bytes += m.weight_nbytes()
    other = {id(p): p for p in model.parameters()}
    other_bytes = sum(p.numel() * p.element_size() for p in other.values())
    other_bytes += sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                       if ".weight_" not in "." + n)  # a 4-bit layer's buffers, top-level ones included
    return {"nf4_params": q_params, "nf4_bytes": q_bytes,
            "nf4_bytes_per_param": q_bytes / q_params if q_params else float("nan"),
            "other_bytes": other_bytes, "total_bytes": q_bytes + other_bytes}


def format_memory_report(model: nn.Module) -> str:
    r = memory_report(model)
    return (f"NF4 weights: {r['nf4_params']:,} params in {r['nf4_bytes']:,} bytes "
            f"({r['nf4_bytes_per_param']:.4f} bytes/param); other tensors {r['other_bytes']:,} bytes; "
            f"total {r['total_bytes'] / 2**20:.1f} MiB")
