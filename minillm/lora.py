"""LoRA: freeze a linear layer's weight W and learn a low-rank update B·A beside it.

    h = W x + b + (α / r) · B A dropout(x)        A: (r, in), B: (out, r), r ≪ min(in, out)

A starts Kaiming-uniform (a = √5), B starts at zero, so training starts exactly at the base
model. With rsLoRA the scale is α/√r instead of α/r. Only A and B train: a 512×64 weight at
r = 8 trains 8·64 + 512·8 = 4,608 numbers instead of 32,768 (the course's example). For
inference B·A can be merged into W (W ← W + (α/r)·B A) and unmerged again; adapters are
small files swapped per task.

The wrapper mirrors peft's LoraLayer (`base_layer`, `lora_A`, `lora_B`, `scaling`), and
save_adapter / load_adapter read and write peft's files (adapter_config.json +
adapter_model.safetensors, keys `base_model.model.<module>.lora_A.weight`), so adapters move
between minillm and peft. GPT-2's hub layers are Conv1D (weight stored (in, out)); peft then
sets fan_in_fan_out=True, but lora_A / lora_B keep the (r, in) / (out, r) shapes, which are
exactly ours. The base layer may be a Linear4bit (QLoRA: LoRA on a frozen NF4 weight).

Sources: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021); Kalajdzievski,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (2023); peft's tuners/lora.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from minillm import hub
from minillm.dropout import Dropout
from minillm.linear import Linear
from minillm.nf4 import Linear4bit, quantize_model

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
KEY_PREFIX = "base_model.model."


def _merge_warning() -> None:
    warnings.warn("merging LoRA into a 4-bit layer re-quantizes the weight to NF4: the result is lossy "
                  "(outputs differ from the unmerged model by the quantization error)", UserWarning, stacklevel=4)


class LoRALinear(nn.Module):
    """A frozen linear (nn.Linear or Linear4bit) plus the trainable low-rank update."""

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        ref = base_layer.weight if isinstance(base_layer, nn.Linear) else base_layer.weight_packed
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=ref.device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=ref.device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged = False
        self.disabled = False  # True: compute the frozen base layer only (adapters_disabled), as torchtune/peft

    def delta_weight(self) -> torch.Tensor:
        """(α/r) · B A, shape (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or self.disabled:
            return result
        x = x.to(self.lora_A.weight.dtype)
        return (result + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if isinstance(self.base_layer, Linear4bit):
            _merge_warning()
            w = self.base_layer.dequantize_weight(torch.float32)
            self.base_layer.set_weight(w + self.delta_weight().float())
        else:
            w = self.base_layer.weight
            w += self.delta_weight().to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if isinstance(self.base_layer, Linear4bit):
            _merge_warning()
            w = self.base_layer.dequantize_weight(torch.float32)
            self.base_layer.set_weight(w - self.delta_weight().float())
        else:
            w = self.base_layer.weight
            w -= self.delta_weight().to(w.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def _target_matches(name: str, target_modules: Union[str, Sequence[str]]) -> bool:
    """peft's rule: a string is a regex that must match the whole module name; a list holds
    names that match exactly or as the last dotted components."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _find_targets(model: nn.Module, target_modules: Union[str, Sequence[str]]) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs apply_lora would wrap; raises if none match or a match is not linear."""
    if isinstance(target_modules, (list, tuple, set)) and not target_modules:
        raise ValueError("target_modules is empty")
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression ({e})") from None
    elif not isinstance(target_modules, (list, tuple, set)) or not all(isinstance(t, str) for t in target_modules):
        raise ValueError(f"target_modules must be a regex or a list of module names, got {target_modules!r}")
    inside_lora = {n for n, _ in _lora_modules(model)}
    found, not_linear = [], []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside_lora):
            continue
        if not _target_matches(name, target_modules):
            continue
        if isinstance(m, LoRALinear):
            raise ValueError(f"module '{name}' already carries a LoRA adapter")
        if isinstance(m, (nn.Linear, Linear4bit)):
            found.append((name, m))
        else:
            not_linear.append(f"{name} ({type(m).__name__})")
    if not_linear:
        raise ValueError(f"target_modules {target_modules!r} matched modules that are not linear layers: "
                         f"{', '.join(not_linear[:5])}{' ...' if len(not_linear) > 5 else ''}")
    if not found:
        names = sorted({n.rsplit('.', 1)[-1] for n, m in model.named_modules()  # an adapter counts as its layer
                        if isinstance(m, (nn.Linear, Linear4bit, LoRALinear))
                        and not any(n.startswith(p + ".") for p in inside_lora)})
        raise ValueError(f"target_modules {target_modules!r} matched no module of {type(model).__name__}; "
                         f"its linear layers are named: {', '.join(names)}")
    return found


def check_lora_args(r, alpha, dropout, use_rslora, where: str = "LoRA", error: type = ValueError) -> None:
    """The values a LoRA layer uses, checked by type and range (r a positive int, alpha a finite number > 0,
    dropout in [0, 1), use_rslora a bool) — before any model is changed."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise error(f"{where}: rank r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise error(f"{where}: lora_alpha must be a finite number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise error(f"{where}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(use_rslora, bool):
        raise error(f"{where}: use_rslora must be true or false, got {use_rslora!r}")


def apply_lora(model: nn.Module, target_modules: Union[str, Sequence[str]], r: int = 8, alpha: float = 8,
               dropout: float = 0.0, use_rslora: bool = False) -> nn.Module:
    """Wrap each matching linear layer of `model` in a LoRALinear, in place, and freeze every
    parameter except the new lora_A / lora_B (peft's bias="none"). Returns the model. Every argument and
    target is checked before anything changes."""
    check_lora_args(r, alpha, dropout, use_rslora, "apply_lora")
    targets = _find_targets(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = LoRALinear(layer, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        setattr(parent, child, wrapper.train(layer.training))  # an eval-mode model stays in eval mode
    model.lora_config = {"target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
                         "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora}
    return model


QUANTIZATIONS = (None, "nf4")


@dataclass
class AdapterConfig:
    """How a job adapts a model: full fine-tuning (lora_r = 0), LoRA, or QLoRA (quantize="nf4" + LoRA)."""
    lora_r: int = 0                          # LoRA rank; 0 = full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: Optional[Sequence[str]] = None  # None: the model's `lora_targets` (all attention + MLP linears)
    quantize: Optional[str] = None           # "nf4": the frozen base linears in 4 bits (QLoRA; needs lora_r)

    def __post_init__(self):
        if not isinstance(self.lora_r, int) or isinstance(self.lora_r, bool) or self.lora_r < 0:
            raise ValueError(f"lora_r must be an integer >= 0, got {self.lora_r!r}")
        if not (isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {self.quantize!r}")
        if self.quantize and not self.lora_r:
            raise ValueError(f"quantize={self.quantize!r} freezes the base weights in 4 bits: it needs LoRA adapters "
                             f"to train (lora_r > 0)")


def default_lora_targets(model: nn.Module) -> tuple[str, ...]:
    """The `lora_targets` a model class declares (its attention and MLP linears); searched in submodules too,
    so a reward model or a policy wrapper finds its backbone's."""
    for m in model.modules():
        targets = getattr(type(m), "lora_targets", None)
        if targets:
            return tuple(targets)
    raise ValueError(f"{type(model).__name__} declares no lora_targets; pass the module names to adapt")


def prepare_adapters(model: nn.Module, config: AdapterConfig, compute_dtype: Optional[torch.dtype] = None,
                     also_train: Iterable[nn.Parameter] = ()) -> nn.Module:
    """The one place a job turns adapters on, in place: (1) quantize="nf4": every base linear becomes a frozen
    Linear4bit computing in `compute_dtype` (QLoRA: NF4, bf16 compute, no double quantization, as the book);
    (2) lora_r > 0: LoRA on the targets, everything else frozen; (3) `also_train` parameters stay trainable
    (peft's modules_to_save: new chat-token embeddings, a reward head). lora_r = 0 leaves the model as it is
    (full fine-tuning). Targets are checked before anything changes."""
    if not config.lora_r:
        return model
    targets = list(config.lora_targets or default_lora_targets(model))
    _find_targets(model, targets)  # raises, touching nothing, when a target names no linear
    if config.quantize == "nf4":
        quantize_model(model, compute_dtype=compute_dtype)
    apply_lora(model, targets, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout)
    for p in also_train:
        p.requires_grad_(True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """W ← W + (α/r)·B A in every LoRA layer (warns for 4-bit layers: re-quantization is lossy)."""
    for _, m in _lora_modules(model):
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """W ← W − (α/r)·B A in every merged LoRA layer."""
    for _, m in _lora_modules(model):
        m.unmerge()
    return model


def _plain_linear(layer: nn.Module, delta: Optional[torch.Tensor] = None) -> nn.Linear:
    """A plain linear (minillm.linear.Linear, an nn.Linear) holding `layer`'s weight (+ delta), computed in
    float32. A 4-bit layer is dequantized and written back in the dtype it was quantized from; an nn.Linear
    keeps its dtype."""
    if isinstance(layer, Linear4bit):
        w, dtype = layer.dequantize_weight(torch.float32), layer.weight_dtype
    else:
        w, dtype = layer.weight.detach().float(), layer.weight.dtype
    if delta is not None:
        w = w + delta.detach().float()
    lin = Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if layer.bias is not None:
            lin.bias.copy_(layer.bias)
    return lin.requires_grad_(False)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace, in place, every LoRALinear by a plain nn.Linear holding W + (α/r)·B A, and every other
    Linear4bit by its dequantized weight, so that `save_pretrained` writes plain hub names that any
    loader reads (peft's merge_and_unload). The sum is formed in float32 from the dequantized NF4 weight,
    so a QLoRA merge adds no second rounding; it is written in the weight's original dtype.
    The new layers are frozen. Returns the model."""
    for kind in (LoRALinear, Linear4bit):  # wrappers first; then 4-bit layers that had no adapter
        for name, m in list(model.named_modules()):
            if not isinstance(m, kind):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if kind is LoRALinear:
                lin = _plain_linear(m.base_layer, None if m.merged else m.delta_weight())
            else:
                lin = _plain_linear(m)
            setattr(parent, child, lin.train(m.training))
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total): shared (tied) tensors counted once; a Linear4bit's frozen weight counts
    as its in·out parameters."""
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    return trainable, total


def trainable_report(model: nn.Module) -> str:
    """'trainable N of M (p%)', as the book quotes QLoRA's 54.5M of 8B (0.67%)."""
    n, m = count_parameters(model)
    return f"trainable {n:,} of {m:,} ({100.0 * n / m:.2f}%)"


# ---------------------------------------------------------------------------------------------
# peft-format adapter files
# ---------------------------------------------------------------------------------------------

def _fan_in_fan_out(model: nn.Module, names: list[str]) -> bool:
    """True where the hub stores these layers transposed (GPT-2's Conv1D), as peft records it. A model
    declares such weights in a class attribute `hub_transposed` (regexes of parameter names)."""
    patterns = {p for m in model.modules() for p in getattr(type(m), "hub_transposed", ())}
    return any(re.search(p, n + ".weight") for p in patterns for n in names)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft's keys: base_model.model.<module>.lora_A.weight / .lora_B.weight."""
    out = {}
    for name, m in _lora_modules(model):
        out[f"{KEY_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{KEY_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def save_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write adapter_model.safetensors + adapter_config.json in peft's format (atomic writes)."""
    mods = _lora_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to save (call apply_lora first)")
    cfg = dict(getattr(model, "lora_config", {}))
    first = mods[0][1]
    cfg.setdefault("target_modules", sorted({n.rsplit(".", 1)[-1] for n, _ in mods}))
    cfg.setdefault("r", first.r)
    cfg.setdefault("lora_alpha", first.alpha)
    cfg.setdefault("lora_dropout", first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0)
    cfg.setdefault("use_rslora", first.use_rslora)
    src = getattr(model, "source_dir", None)
    cfg.update({
        "peft_type": "LORA",
        "task_type": ("SEQ_2_SEQ_LM" if getattr(model, "is_encoder_decoder", False)
                      else "CAUSAL_LM" if hasattr(model, "lm_head") else None),
        "base_model_name_or_path": str(src) if src is not None else None,
        "fan_in_fan_out": _fan_in_fan_out(model, [n for n, _ in mods]),
        "bias": "none", "lora_bias": False, "use_dora": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "init_lora_weights": True, "inference_mode": True,
    })
    d = Path(directory)
    hub.save_safetensors(adapter_state_dict(model), d / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    hub.save_json(cfg, d / ADAPTER_CONFIG)
    return d


UNSUPPORTED = {"use_dora": (False, None), "modules_to_save": (None, []), "rank_pattern": ({}, None),
               "alpha_pattern": ({}, None), "layers_to_transform": (None,), "lora_bias": (False, None),
               "bias": ("none", None), "target_parameters": (None, []), "exclude_modules": (None, []),
               "layer_replication": (None,), "trainable_token_indices": (None,), "use_qalora": (False, None),
               "alora_invocation_tokens": (None,)}


def read_adapter_config(directory: Union[str, os.PathLike]) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    cfg = hub.read_json(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise hub.CheckpointError(f"{path}: peft_type '{cfg.get('peft_type')}' is not LORA")
    for key, ok in UNSUPPORTED.items():
        if key in cfg and cfg[key] not in ok:
            raise hub.CheckpointError(f"{path}: '{key}': {cfg[key]!r} is not supported by minillm's LoRA")
    for key in ("target_modules", "r", "lora_alpha"):
        if cfg.get(key) in (None, [], ""):
            raise hub.CheckpointError(f"{path}: missing required key '{key}'")
    return cfg


def load_adapter(model: nn.Module, directory: Union[str, os.PathLike], allow_nonfinite: bool = False) -> nn.Module:
    """Load a peft-format LoRA adapter into `model`: wraps the target layers (unless already
    wrapped with the same rank) and copies lora_A / lora_B. Every config value, key, shape and value (NaN/Inf
    an error naming the tensor unless allow_nonfinite) is checked before the model is touched; a mismatch (an
    adapter for another base) names the tensor."""
    d = Path(directory)
    cfg = read_adapter_config(d)
    where = str(d / ADAPTER_CONFIG)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    dropout, rslora = cfg.get("lora_dropout", 0.0), cfg.get("use_rslora", False)
    dropout = 0.0 if dropout is None else dropout
    rslora = False if rslora is None else rslora
    check_lora_args(r, alpha, dropout, rslora, where, hub.CheckpointError)
    targets = cfg["target_modules"]
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) and t for t in targets))):
        raise hub.CheckpointError(f"{where}: target_modules must be a regex or a list of module names, got {targets!r}")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise hub.CheckpointError(f"{where}: target_modules is not a valid regex ({e})") from None
    state = hub.read_safetensors_file(d / ADAPTER_WEIGHTS)
    state = {re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", k): v for k, v in state.items()}

    existing = dict(_lora_modules(model))
    merged = [n for n, m in existing.items() if m.merged]
    if merged:
        raise ValueError(f"LoRA layer '{merged[0]}' is merged; unmerge before loading another adapter")
    if existing:
        plan = {n: (m.in_features, m.out_features, m.r) for n, m in existing.items()}
    else:
        plan = {n: (m.in_features, m.out_features, r) for n, m in _find_targets(model, targets)}
    expected = {}
    for n, (fin, fout, rank) in plan.items():
        expected[f"{KEY_PREFIX}{n}.lora_A.weight"] = (rank, fin)
        expected[f"{KEY_PREFIX}{n}.lora_B.weight"] = (fout, rank)
    problems = []
    for k, v in state.items():
        if k not in expected:
            problems.append(f"unexpected tensor '{k}' {tuple(v.shape)} (no such LoRA layer in the model)")
        elif tuple(v.shape) != expected[k]:
            problems.append(f"tensor '{k}': expected shape {expected[k]}, found {tuple(v.shape)}")
        elif not v.is_floating_point():
            problems.append(f"tensor '{k}': expected a float tensor, found {v.dtype}")
    problems += [f"missing tensor '{k}' {shape}" for k, shape in expected.items() if k not in state]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise hub.CheckpointError(f"adapter {d / ADAPTER_WEIGHTS} does not fit {type(model).__name__} "
                                  f"(an adapter for another base model?):\n  {shown}")
    if not allow_nonfinite:
        hub.check_finite(state, str(d / ADAPTER_WEIGHTS))
    if not existing:
        apply_lora(model, targets, r=r, alpha=alpha, dropout=dropout, use_rslora=rslora)
    mods = dict(_lora_modules(model))
    with torch.no_grad():
        for n, m in mods.items():
            m.lora_A.weight.copy_(state[f"{KEY_PREFIX}{n}.lora_A.weight"])
            m.lora_B.weight.copy_(state[f"{KEY_PREFIX}{n}.lora_B.weight"])
            if not existing:
                continue
            m.alpha, m.use_rslora = alpha, rslora
            m.scaling = alpha / math.sqrt(m.r) if rslora else alpha / m.r
    if hasattr(model, "lora_config"):  # save_adapter writes what is loaded now (into wrapped layers: not the first)
        model.lora_config.update(lora_alpha=alpha, use_rslora=rslora)
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """Every LoRA layer of a model (empty when it has none)."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block every LoRA layer computes its frozen base layer only (the `disabled` flag, checked
    in LoRALinear.forward): the model IS the pre-LoRA reference, with no second copy of the base weights
    (PPO's reference for a LoRA policy; peft's `disable_adapter`, torchtune's `disable_adapter`)."""
    mods = lora_layers(model)
    merged = [m for m in mods if m.merged]
    if merged:
        raise ValueError(f"{len(merged)} LoRA adapter(s) are merged into their base weights, so the base model is "
                         f"gone; unmerge_lora(model) first")
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b
