"""Golden part `nf4`: bitsandbytes' NF4 quantization (CPU) on seeded tensors.

Writes tests/golden/nf4.safetensors holding, for each case `c<i>` (shape, block size, dtype,
double quantization listed in the metadata as JSON):
  c<i>.x            the input
  c<i>.packed       quantize_4bit(...)'s packed bytes, flattened
  c<i>.absmax       float32 absmax per block (without double quantization), or the uint8 codes
  c<i>.nested_absmax, c<i>.offset      (with double quantization: state2.absmax, offset)
  c<i>.dequant      dequantize_4bit(...) in the input dtype, reshaped to the input shape
plus nf4_code / dynamic_code (bitsandbytes' tables) and one bitsandbytes Linear4bit forward
(linear.weight, linear.bias, linear.x; linear.y for compute dtype float32, linear.y_bf16 for bfloat16,
linear.y_dq for float32 with double quantization).
"""

from __future__ import annotations

from pathlib import Path

import torch

from golden.common import seed_all, write_golden

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# (shape, blocksize, dtype, double_quant): every accepted block size, all three dtypes, odd sizes,
# a size that is not a multiple of the block, and > 256 blocks for the nested quantization.
CASES = [
    ((33, 70), 64, "float32", False),
    ((33, 70), 64, "float32", True),
    ((5, 7, 9), 32, "float16", False),
    ((8224,), 32, "bfloat16", True),       # 257 blocks: two nested blocks, the second one short
    ((40, 129), 128, "float32", True),
    ((257,), 256, "float16", True),
    ((3, 700), 512, "bfloat16", False),
    ((1, 1), 1024, "float32", False),
    ((45, 100), 2048, "float16", False),
    ((4100,), 4096, "float32", True),
    ((64, 64), 64, "bfloat16", False),
    ((7,), 64, "float32", True),
]


def make(root: Path) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    seed_all(4)
    g = torch.Generator().manual_seed(4)
    t, meta = {}, []
    for i, (shape, bs, dt, dq) in enumerate(CASES):
        x = (torch.randn(shape, generator=g) * (0.5 + 2 * torch.rand(1, generator=g))).to(DT[dt])
        if i % 3 == 0 and x.numel() > bs:
            x.view(-1)[:bs] = 0  # an all-zero block
        packed, st = BF.quantize_4bit(x, blocksize=bs, quant_type="nf4", compress_statistics=dq)
        deq = BF.dequantize_4bit(packed, st, quant_type="nf4").reshape(shape)
        p = f"c{i}."
        t[p + "x"], t[p + "packed"], t[p + "absmax"], t[p + "dequant"] = x, packed.reshape(-1), st.absmax, deq
        if dq:
            t[p + "nested_absmax"], t[p + "offset"] = st.state2.absmax, st.offset.reshape(())
        meta.append({"shape": list(shape), "blocksize": bs, "dtype": dt, "double_quant": dq})
    t["nf4_code"] = BF.get_4bit_type("nf4", device="cpu")
    t["dynamic_code"] = BF.create_dynamic_map()

    # bitsandbytes' Linear4bit on CPU (compute dtype float32 and bfloat16), 48 -> 40 features.
    lin = torch.nn.Linear(48, 40)
    x = torch.randn(3, 5, 48, generator=g)
    outs = {}
    for name, cd, dq in (("y", torch.float32, False), ("y_bf16", torch.bfloat16, False), ("y_dq", torch.float32, True)):
        q = bnb.nn.Linear4bit(48, 40, bias=True, compute_dtype=cd, quant_type="nf4", compress_statistics=dq)
        q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     blocksize=64, compress_statistics=dq)  # Params4bit's default is True
        q.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        q = q.to("cpu")  # quantizes the weight (Params4bit._quantize)
        with torch.no_grad():
            outs[name] = q(x.to(cd))
    t.update({"linear.weight": lin.weight.detach(), "linear.bias": lin.bias.detach(), "linear.x": x,
              "linear.y": outs["y"], "linear.y_bf16": outs["y_bf16"], "linear.y_dq": outs["y_dq"]})
    write_golden(root, "nf4", t, {"source": f"bitsandbytes {bnb.__version__} quantize_4bit/dequantize_4bit (CPU)",
                                  "cases": meta})
