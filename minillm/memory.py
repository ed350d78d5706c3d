"""How much memory training needs, and how much compute: the course's rules, itemized.

Training memory is the sum of five things (bytes; N parameters, N_t of them trainable):

    weights      N · bytes(dtype)              (NF4: frozen linear weights at ½ byte + one fp32 absmax per
                                                64 weights = 0.5625 B/param; double quantization 0.5159)
    gradients    N_t · bytes(trainable dtype)  (LoRA's A, B are fp32 as peft keeps them)
    optimizer    N_t · 8 for AdamW (two fp32 moments), 2 for 8-bit Adam, 4 for SGD+momentum, 0 for SGD
    activations  what the forward keeps for backward: per token and layer, for a GPT-2 block in fp32
                 (elements of width h, MLP width I, a heads, context T):
                     attention  ln_1 in, c_attn in, q, k, v, attention out           6h
                                + with attention dropout, torch's math path: scaled q and k,
                                  scores, probs, dropped probs                       2h + 3·a·T  (+ a·T mask bytes)
                     MLP        ln_2 in, c_fc in, gelu in, c_proj in                 2h + 2I
                     dropout    the two residual dropout masks (1 byte each)         2h bytes
                 a Llama (SwiGLU, RMSNorm, grouped KV of width k = kv_heads·h/a, no dropout):
                     attention  norm in, q/k/v in, q, k, v, rotated q and k, out     5h + 3k
                     MLP        norm in, gate/up in, gate, up, silu(gate), product   2h + 4I
                 plus, once: the embedding sum and ln_f (2h), and at the LM head the fp32 log-softmax, its
                 gradient and the logits' gradient (3·V per token: the vocabulary is often the largest term).
                 Gradient checkpointing keeps only each block's input (h per layer) plus one block's insides.
    total        the sum (how the course counts: 1B params in fp32 → 4 GB weights + 4 gradients + 8 Adam
                 + "activations and temporaries"; with no config given the activations default to the
                 course's remaining 8 B/param, so total = 24 B/param = 24 GB for 1B)
    peak         the high-water mark of one step, which the sum overstates because activations are freed as
                 gradients appear:  weights + optimizer + max(activations + head-gradient, gradients)
                 It counts live tensors; a process's RSS adds the allocator's slack (glibc keeps freed blocks
                 below its dynamic mmap threshold: +5–25% measured on CPU, see scripts/benches/memory.py).

Compute: training costs ≈ 6·N·D FLOPs for D tokens (2 forward + 4 backward per parameter per token;
Kaplan et al. 2020), and a compute-optimal model sees D ≈ 20·N tokens (Hoffmann et al. 2022, "Chinchilla").

Sources: the course (4 B/param, ~20 extra B/param, 1B ≈ 24 GB; LoRA 512×64 r=8); the book ch. 10
(QLoRA r=128: 54.5M trainable of 8B = 0.67%); Korthikanti et al., "Reducing Activation Recomputation in
Large Transformer Models" (2022) for the per-layer activation count; Dettmers et al., "QLoRA" (2023).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

DTYPE_BYTES = {"fp32": 4, "float32": 4, "tf32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2,
               "int8": 1, "fp8": 1}
OPTIMIZER_BYTES = {"adamw": 8, "adam": 8, "adamw_8bit": 2, "sgd_momentum": 4, "sgd": 0}
QUANT_BYTES = {"nf4": 0.5 + 4 / 64, "nf4_double": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1 + 4 / 64}
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_LINEARS = ("c_attn", "c_proj", "c_fc", "mlp.c_proj")
COURSE_EXTRA_ACTIVATION_BYTES = 8  # the course's ~20 extra B/param = 4 grads + 8 Adam + 8 activations/temporaries


@dataclass
class DecoderShape:
    """The sizes that fix a decoder's parameters and activations (GPT-2 or Llama style)."""
    layers: int
    hidden: int
    heads: int
    vocab: int
    intermediate: int
    kv_heads: Optional[int] = None
    style: str = "gpt2"          # gpt2: LayerNorm, GELU MLP, biases, learned positions | llama: RMSNorm, SwiGLU
    positions: int = 0           # learned position embeddings (GPT-2)
    tied: bool = True
    dropout: bool = True         # GPT-2's dropouts are on in training; Llama has none

    @property
    def kv_dim(self) -> int:
        return (self.kv_heads or self.heads) * (self.hidden // self.heads)


def decoder_shape(config) -> DecoderShape:
    """A DecoderShape from a GPT-2 or Llama config (a dict from config.json, or a config dataclass)."""
    if isinstance(config, DecoderShape):
        return config
    c = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    if "n_embd" in c:  # GPT-2
        drop = any(c.get(k, 0.1) > 0 for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"))
        return DecoderShape(layers=c["n_layer"], hidden=c["n_embd"], heads=c["n_head"], vocab=c["vocab_size"],
                            intermediate=c.get("n_inner") or 4 * c["n_embd"], style="gpt2",
                            positions=c.get("n_positions", 1024), tied=c.get("tie_word_embeddings", True),
                            dropout=drop)
    if "hidden_size" in c and "intermediate_size" in c:  # Llama / Mistral / Qwen2
        return DecoderShape(layers=c["num_hidden_layers"], hidden=c["hidden_size"], heads=c["num_attention_heads"],
                            vocab=c["vocab_size"], intermediate=c["intermediate_size"],
                            kv_heads=c.get("num_key_value_heads"), style="llama",
                            tied=c.get("tie_word_embeddings", False), dropout=False)
    raise ValueError(f"config: cannot read a decoder shape from keys {sorted(c)[:12]}...; expected GPT-2 "
                     f"(n_layer, n_embd, n_head) or Llama (num_hidden_layers, hidden_size, intermediate_size)")


# Llama-3-8B's config (meta-llama/Meta-Llama-3-8B config.json), for the book's QLoRA example.
LLAMA3_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False}


def linear_shapes(shape: DecoderShape) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one block, by its hub name."""
    h, I, k = shape.hidden, shape.intermediate, shape.kv_dim
    if shape.style == "gpt2":
        return {"c_attn": (h, 3 * h), "attn.c_proj": (h, h), "c_fc": (h, I), "mlp.c_proj": (I, h)}
    return {"q_proj": (h, h), "k_proj": (h, k), "v_proj": (h, k), "o_proj": (h, h),
            "gate_proj": (h, I), "up_proj": (h, I), "down_proj": (I, h)}


def parameter_count(config) -> dict[str, int]:
    """{'linear': weights of the blocks' linear layers (what NF4 quantizes / LoRA targets), 'other': embeddings,
    norms, biases, LM head; 'total'}."""
    s = decoder_shape(config)
    lin = s.layers * sum(i * o for i, o in linear_shapes(s).values())
    h = s.hidden
    if s.style == "gpt2":
        biases = s.layers * sum(o for _, o in linear_shapes(s).values())
        other = s.vocab * h + s.positions * h + biases + s.layers * 4 * h + 2 * h  # wte, wpe, biases, 2 LN/layer, ln_f
    else:
        other = s.vocab * h + s.layers * 2 * h + h  # embed_tokens, 2 RMSNorm/layer, final norm
    if not s.tied:
        other += s.vocab * h
    return {"linear": lin, "other": other, "total": lin + other}


def lora_parameter_count(config, r: int, target_modules: Optional[Sequence[str]] = None) -> int:
    """Σ over targeted linears of r·(in + out). Default targets: every linear layer of every block.
    A target matches a hub name exactly or as its last part ("c_proj" matches both GPT-2 c_proj layers)."""
    s = decoder_shape(config)
    shapes = linear_shapes(s)
    targets = list(target_modules) if target_modules is not None else list(shapes)
    chosen = [n for n in shapes if any(n == t or n.endswith("." + t) or n.split(".")[-1] == t for t in targets)]
    if not chosen:
        raise ValueError(f"target_modules {targets} match none of {list(shapes)}")
    return s.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in chosen)


def activation_bytes(config, batch: int = 1, seq: int = 512, dtype: str = "fp32",
                     gradient_checkpointing: bool = False) -> dict[str, float]:
    """Bytes the forward keeps for backward (see the module docstring): {'layers', 'head', 'total'}."""
    s = decoder_shape(config)
    b = DTYPE_BYTES[dtype]
    tokens = batch * seq
    h, I, a, k, V = s.hidden, s.intermediate, s.heads, s.kv_dim, s.vocab
    if s.style == "gpt2":
        per_tok = (6 * h + 2 * h + 2 * I) * b
        if s.dropout:
            # residual masks; the math path of attention with dropout: scaled q and k, scores, probs, dropped probs, mask
            per_tok += 2 * h + (2 * h + 3 * a * seq) * b + a * seq
    else:
        per_tok = (5 * h + 3 * k + 2 * h + 4 * I) * b
    layer = per_tok * tokens
    if gradient_checkpointing:
        layers = s.layers * h * b * tokens + layer  # every block's input + one block recomputed
    else:
        layers = s.layers * layer
    emb = 2 * h * b * tokens + (h * tokens if s.dropout else 0)  # embedding sum / ln_f in and out; dropout mask
    head = 3 * V * 4 * tokens  # fp32 log-softmax, its gradient, the logits' gradient
    return {"layers": float(layers + emb), "head": float(head), "total": float(layers + emb + head)}


def estimate_memory(params: Optional[float] = None, config=None, dtype: str = "fp32", optimizer: str = "adamw",
                    lora_r: Optional[int] = None, lora_targets: Optional[Sequence[str]] = None,
                    quantize: Optional[str] = None, gradient_checkpointing: bool = False, batch: int = 1,
                    seq: int = 512) -> dict[str, float]:
    """Training memory in bytes: weights, gradients, optimizer, activations, total (their sum) and peak.

    Give `params` (a count) or a `config` (GPT-2 / Llama dict or dataclass; then activations are modelled).
    lora_r: train LoRA adapters of that rank (fp32) on lora_targets (default all linears), base frozen.
    quantize: 'nf4' / 'nf4_double' / 'int8' stores the blocks' linear weights so (QLoRA), the rest in dtype."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_BYTES)}, got {optimizer!r}")
    if quantize is not None and quantize not in QUANT_BYTES:
        raise ValueError(f"quantize must be one of {sorted(QUANT_BYTES)} or None, got {quantize!r}")
    if params is None and config is None:
        raise ValueError("give params (a count) or config (a model config)")
    b = DTYPE_BYTES[dtype]
    if config is not None:
        counts = parameter_count(config)
        N = counts["total"]
        lin = counts["linear"]
    else:
        N = float(params)
        lin = N  # without a config, every weight counts as quantizable
        if lora_r is not None:
            raise ValueError("lora_r needs a config (the LoRA count depends on the layer shapes)")
    if quantize:
        weights = lin * QUANT_BYTES[quantize] + (N - lin) * b
    else:
        weights = N * b
    if lora_r is not None:
        trainable = lora_parameter_count(config, lora_r, lora_targets)
        weights += trainable * 4  # adapters in fp32
        grad_b = 4
    else:
        if quantize:
            raise ValueError("a quantized base cannot be fully fine-tuned: give lora_r (QLoRA)")
        trainable, grad_b = N, b
    grads = trainable * grad_b
    opt = trainable * OPTIMIZER_BYTES[optimizer]
    if config is not None:
        act = activation_bytes(config, batch, seq, dtype, gradient_checkpointing)
        activations = act["total"]
        s = decoder_shape(config)
        head_grad = s.vocab * s.hidden * grad_b if lora_r is None else 0  # the (tied) head's gradient, made first
        peak = weights + opt + max(activations + head_grad, grads)
    else:
        activations = N * COURSE_EXTRA_ACTIVATION_BYTES
        peak = weights + opt + grads + activations
    total = weights + grads + opt + activations
    return {"params": float(N), "trainable": float(trainable), "weights": float(weights), "gradients": float(grads),
            "optimizer": float(opt), "activations": float(activations), "total": float(total), "peak": float(peak)}


def training_flops(N: float, D: float) -> float:
    """≈ 6·N·D: forward 2 FLOPs per parameter per token, backward 4 (Kaplan et al. 2020)."""
    return 6.0 * N * D


def chinchilla_tokens(N: float) -> float:
    """Compute-optimal training tokens ≈ 20 per parameter (Hoffmann et al. 2022)."""
    return 20.0 * N


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB ({x / 2 ** 30:,.2f} GiB)"


def format_report(est: dict, tokens: Optional[float] = None) -> str:
    """A readable table of estimate_memory's result (decimal GB and binary GiB), plus compute if tokens given."""
    lines = [f"parameters   {est['params']:,.0f} (trainable {est['trainable']:,.0f} = "
             f"{100 * est['trainable'] / max(est['params'], 1):.2f}%)"]
    for k in ("weights", "gradients", "optimizer", "activations", "total", "peak"):
        lines.append(f"{k:<12} {_gb(est[k])}")
    if tokens is not None:
        lines.append(f"compute      {training_flops(est['params'], tokens):.3e} FLOPs for {tokens:,.0f} tokens "
                     f"(6·N·D); Chinchilla-optimal tokens {chinchilla_tokens(est['params']):,.0f}")
    return "\n".join(lines)


def memory_report(model: Union[str, dict, None] = None, params: Optional[float] = None, **kwargs) -> str:
    """The entry a CLI line calls: `model` is a checkpoint dir / name (its config.json is read), a config dict,
    or None with `params`; kwargs go to estimate_memory (dtype, optimizer, lora_r, quantize, batch, seq, ...)."""
    config = model
    if isinstance(model, str):
        from minillm import hub
        config = hub.read_config(hub.resolve(model))
    est = estimate_memory(params=params, config=config, **kwargs)
    return format_report(est, tokens=chinchilla_tokens(est["params"]))


def lora_params(in_features: int, out_features: int, r: int) -> int:
    """Trainable numbers of one LoRA adapter: A (r × in) + B (out × r) = r·(in + out)."""
    return r * (in_features + out_features)
