"""Prompt tuning: learn a few "virtual token" embeddings, prepended to the input, for a frozen LM.

The model stays frozen; only a matrix P of n virtual-token vectors (n = 20–100, each as wide as
a token embedding) trains. The input embeddings of a text x_1..x_T become

    E' = [P_1, …, P_n, W_te[x_1], …, W_te[x_T]]          (B, n + T, d)
    mask' = [1]*n ++ mask,      labels' = [−100]*n ++ labels,      positions: 0..n−1 for P, the text after

and the frozen model runs on E'. Only P (n·d numbers, e.g. 20·768 = 15,360 for GPT-2) gets
gradients; a task is then a tiny file, swapped at inference (the course's "soft prompts"). The
loss is peft's: the logits cover n + T positions, and the last virtual token predicts the first
text token (labels' shifted by one), so a trained prompt also learns how texts begin.

P starts random (peft's RANDOM: nn.Embedding's N(0, 1)), from the embeddings of a text ("TEXT":
the text's token ids, cut or repeated to n; Lester et al.'s class-label init), or from random
vocabulary rows ("SAMPLE_VOCAB").

Plugging in a model. Two things are read from the base model:
- its token-embedding module: `get_input_embeddings()` when the model has it (transformers'
  convention; Llama/T5 ports are expected to offer it), else GPT-2's `transformer.wte`;
- a forward from embeddings: `model(inputs_embeds=..., attention_mask=...)` when the model's forward
  accepts `inputs_embeds`; minillm's GPT-2 does not, so `gpt2_logits_from_embeds` below runs its body
  piece by piece (wpe + dropout, the blocks, ln_f, lm_head) — the same computation GPT2Model.forward
  does after its embedding lookup. Anything else passes `forward_embeds=`.
Positions come from the extended mask (cumsum − 1, minillm's GPT-2 rule), so without left padding
the virtual tokens take positions 0..n−1 and the text n..n+T−1, as in peft. (With left padding peft
under transformers 5 counts pads too; minillm does not — the same rule as its GPT-2.)

Files are peft's PROMPT_TUNING adapters: adapter_config.json (peft_type "PROMPT_TUNING",
num_virtual_tokens, token_dim, num_transformer_submodules 1, prompt_tuning_init, ...) and
adapter_model.safetensors with one tensor `prompt_embeddings` (n, d).

Sources: Lester, Al-Rfou & Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(2021); peft's tuners/prompt_tuning and PeftModelForCausalLM.forward; the course (soft prompts).
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from minillm import hub
from minillm.attention import causal_mask, padding_mask
from minillm.losses import IGNORE_INDEX, lm_loss_sum

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_KEY = "prompt_embeddings"
INITS = {"random": "RANDOM", "text": "TEXT", "sample_vocab": "SAMPLE_VOCAB"}


@dataclass
class PromptTuningConfig:
    """What sft_job's prompt tuning trains: num_virtual_tokens soft-prompt vectors (0: off), initialised by
    `init` (random | text | sample_vocab); init='text' without init_text uses the first record's prompt."""
    num_virtual_tokens: int = 0
    init: str = "text"
    init_text: Optional[str] = None

    def __post_init__(self):
        if self.num_virtual_tokens < 0:
            raise ValueError(f"num_virtual_tokens must be >= 0 (0: off), got {self.num_virtual_tokens}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {sorted(INITS)}, got {self.init!r}")


# ---- the two adapter functions: what a base model must offer ----
def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The model's token-embedding module: `get_input_embeddings()` if defined, else GPT-2's `transformer.wte`."""
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings()
    wte = getattr(getattr(model, "transformer", None), "wte", None)
    if isinstance(wte, nn.Embedding):
        return wte
    raise TypeError(f"{type(model).__name__}: cannot find its token embeddings (no get_input_embeddings() and no "
                    f"transformer.wte); pass embed_fn=<the nn.Embedding> to apply_prompt_tuning")


def gpt2_logits_from_embeds(model: nn.Module, embeds: torch.Tensor,
                            attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """minillm GPT-2 on input embeddings instead of ids: (B, T, C) -> logits (B, T, V).

    GPT2Model.forward after its `wte(input_ids)` lookup, written out: positions from the mask,
    wpe + dropout, the blocks under a causal (& padding) mask, ln_f, the tied LM head."""
    body = model.transformer
    B, T, C = embeds.shape
    if T > body.cfg.n_positions:
        raise ValueError(f"{T} positions (virtual tokens + text) exceed the model's n_positions={body.cfg.n_positions}")
    dev = embeds.device
    if attention_mask is None:
        pos = torch.arange(T, device=dev)[None]  # (1, T)
        mask = None  # plain causal attention
    else:
        pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # (B, T)
        mask = causal_mask(T, T, dev)[None, None] & padding_mask(attention_mask)  # (B, 1, T, T)
    x = body.drop(embeds + body.wpe(pos))  # (B, T, C)
    checkpointing = body.gradient_checkpointing and body.training and torch.is_grad_enabled()
    for block in body.h:
        if checkpointing:
            x = torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False)
        else:
            x = block(x, mask=mask)
    return model.lm_head(body.ln_f(x))


def default_forward_embeds(model: nn.Module) -> Callable:
    """`model(inputs_embeds=, attention_mask=)` when its forward takes inputs_embeds, else the GPT-2 path."""
    if "inputs_embeds" in inspect.signature(model.forward).parameters:
        return lambda m, e, a: m(inputs_embeds=e, attention_mask=a)
    if hasattr(model, "transformer") and hasattr(model.transformer, "wpe") and hasattr(model, "lm_head"):
        return gpt2_logits_from_embeds
    raise TypeError(f"{type(model).__name__}.forward takes no inputs_embeds and is not a GPT-2; pass "
                    f"forward_embeds=(model, embeds, attention_mask) -> logits")


# ---- the wrapper ----
class PromptTuningModel(nn.Module):
    """A frozen causal LM with n trainable virtual tokens in front. forward -> logits (B, n + T, V), as peft."""

    def __init__(self, model: nn.Module, num_virtual_tokens: int, prompt: torch.Tensor,
                 embed_fn: Optional[nn.Module] = None, forward_embeds: Optional[Callable] = None,
                 config: Optional[dict] = None):
        super().__init__()
        self.base_model = model.requires_grad_(False)
        self.embed = embed_fn if embed_fn is not None else input_embeddings(model)
        self.forward_embeds = forward_embeds or default_forward_embeds(model)
        self.num_virtual_tokens = num_virtual_tokens
        self.prompt_embeddings = nn.Parameter(prompt.detach().clone().float())  # (n, d), always fp32 as peft
        self.prompt_config = dict(config or {})

    def prompted_inputs(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        """-> (embeds (B, n+T, d), mask (B, n+T) or None): the prompt prepended to the token embeddings."""
        B = input_ids.shape[0]
        tok = self.embed(input_ids)  # (B, T, d)
        prompt = self.prompt_embeddings.to(tok.dtype)[None].expand(B, -1, -1)  # (B, n, d)
        embeds = torch.cat([prompt, tok], dim=1)  # (B, n + T, d)
        if attention_mask is not None:
            ones = attention_mask.new_ones(B, self.num_virtual_tokens)
            attention_mask = torch.cat([ones, attention_mask], dim=1)  # (B, n + T)
        return embeds, attention_mask

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """-> logits (B, n + T, V); logits[:, n − 1 + t] predicts text token t + 1 … as in peft."""
        embeds, mask = self.prompted_inputs(input_ids, attention_mask)
        return self.forward_embeds(self.base_model, embeds, mask)

    def extend_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, n + T) with −100 on the virtual tokens."""
        pad = labels.new_full((labels.shape[0], self.num_virtual_tokens), IGNORE_INDEX)
        return torch.cat([pad, labels], dim=1)

    def text_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits at the text positions only, (B, T, V) — GPT2LMHeadModel's contract (for generate without a cache)."""
        return self(input_ids, attention_mask)[:, self.num_virtual_tokens:]


def prompt_tuning_loss(model: PromptTuningModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """loss_fn for minillm.train.loop.train: peft's loss (labels −100 on the virtual tokens), as (sum, count)."""
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, n+T, V)
    return lm_loss_sum(logits, model.extend_labels(batch["labels"]))


def init_prompt(embed: nn.Embedding, num_virtual_tokens: int, init: str = "random", init_text: Optional[str] = None,
                tokenizer=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The starting prompt (n, d): random N(0,1) / the embeddings of init_text's tokens (cut or repeated) /
    random vocabulary rows."""
    n, d = num_virtual_tokens, embed.weight.shape[1]
    if init == "random":
        return torch.randn(n, d, generator=generator)  # nn.Embedding's default init, as peft's RANDOM
    if init == "sample_vocab":
        ids = torch.randint(0, embed.weight.shape[0], (n,), generator=generator)
    elif init == "text":
        if not init_text or tokenizer is None:
            raise ValueError("init='text' needs init_text and a tokenizer")
        ids_list = tokenizer.encode(init_text)
        if not ids_list:
            raise ValueError(f"init_text {init_text!r} encodes to no tokens")
        ids_list = (ids_list * math.ceil(n / len(ids_list)))[:n]  # cut or repeat to n, as peft
        ids = torch.tensor(ids_list, dtype=torch.long)
    else:
        raise ValueError(f"init must be one of {sorted(INITS)}, got {init!r}")
    with torch.no_grad():
        return embed.weight[ids.to(embed.weight.device)].detach().float().cpu()


def apply_prompt_tuning(model: nn.Module, num_virtual_tokens: int = 20, init: str = "random",
                        init_text: Optional[str] = None, tokenizer=None, embed_fn: Optional[nn.Module] = None,
                        forward_embeds: Optional[Callable] = None, tokenizer_name_or_path: Optional[str] = None,
                        generator: Optional[torch.Generator] = None) -> PromptTuningModel:
    """Freeze `model` and wrap it with `num_virtual_tokens` trainable virtual tokens. Returns the wrapper."""
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
    embed = embed_fn if embed_fn is not None else input_embeddings(model)
    prompt = init_prompt(embed, num_virtual_tokens, init, init_text, tokenizer, generator)
    src = getattr(model, "source_dir", None)
    config = {"prompt_tuning_init": INITS[init], "prompt_tuning_init_text": init_text if init == "text" else None,
              "tokenizer_name_or_path": tokenizer_name_or_path or (str(src) if init == "text" and src else None),
              "base_model_name_or_path": str(src) if src is not None else None}
    wrapped = PromptTuningModel(model, num_virtual_tokens, prompt.to(embed.weight.device), embed, forward_embeds,
                                config)
    return wrapped


# ---- peft's files ----
def save_prompt_tuning(model: PromptTuningModel, directory: Union[str, os.PathLike]) -> Path:
    """adapter_config.json + adapter_model.safetensors (`prompt_embeddings` (n, d)) in peft's format."""
    n, d = model.prompt_embeddings.shape
    base = model.base_model
    cfg = {"auto_mapping": None, "base_model_name_or_path": None, "inference_mode": True, "modules_to_save": None,
           "num_attention_heads": None, "num_layers": None, "num_transformer_submodules": 1,
           "num_virtual_tokens": n, "peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM",
           "prompt_tuning_init_text": None, "revision": None, "task_type": "CAUSAL_LM", "token_dim": d,
           "tokenizer_kwargs": None, "tokenizer_name_or_path": None}
    bcfg = getattr(base, "config", None)
    for ours, theirs in (("n_layer", "num_layers"), ("n_head", "num_attention_heads"),
                         ("num_hidden_layers", "num_layers"), ("num_attention_heads", "num_attention_heads")):
        if hasattr(bcfg, ours):
            cfg[theirs] = getattr(bcfg, ours)
    cfg.update({k: v for k, v in model.prompt_config.items() if k in cfg})
    d_ = Path(directory)
    hub.save_safetensors({WEIGHT_KEY: model.prompt_embeddings.detach().float()}, d_ / ADAPTER_WEIGHTS,
                         metadata={"format": "pt"})
    hub.save_json(cfg, d_ / ADAPTER_CONFIG)
    return d_


def read_prompt_tuning_config(directory: Union[str, os.PathLike]) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    cfg = hub.read_json(path)
    if cfg.get("peft_type") != "PROMPT_TUNING":
        raise hub.CheckpointError(f"{path}: peft_type {cfg.get('peft_type')!r} is not PROMPT_TUNING")
    n = cfg.get("num_virtual_tokens")
    if not isinstance(n, int) or n < 1:
        raise hub.CheckpointError(f"{path}: num_virtual_tokens must be a positive integer, got {n!r}")
    if cfg.get("num_transformer_submodules", 1) not in (1, None):
        raise hub.CheckpointError(f"{path}: num_transformer_submodules={cfg['num_transformer_submodules']} "
                                  f"(encoder-decoder prompts) is not supported; causal LMs use 1")
    if cfg.get("task_type") not in ("CAUSAL_LM", None):
        raise hub.CheckpointError(f"{path}: task_type {cfg.get('task_type')!r}: only CAUSAL_LM is supported")
    return cfg


def load_prompt_tuning(model: nn.Module, directory: Union[str, os.PathLike], embed_fn: Optional[nn.Module] = None,
                       forward_embeds: Optional[Callable] = None) -> PromptTuningModel:
    """Wrap `model` with the prompt saved in `directory` (ours or peft's). Checked before anything is built."""
    d = Path(directory)
    cfg = read_prompt_tuning_config(d)
    state = hub.read_safetensors_file(d / ADAPTER_WEIGHTS)
    embed = embed_fn if embed_fn is not None else input_embeddings(model)
    n, dim = cfg["num_virtual_tokens"], embed.weight.shape[1]
    if cfg.get("token_dim") not in (None, dim):
        raise hub.CheckpointError(f"{d / ADAPTER_CONFIG}: token_dim {cfg['token_dim']} does not match the model's "
                                  f"embedding width {dim} (a prompt for another base model?)")
    extra = sorted(set(state) - {WEIGHT_KEY})
    if WEIGHT_KEY not in state or extra:
        raise hub.CheckpointError(f"{d / ADAPTER_WEIGHTS}: expected exactly one tensor '{WEIGHT_KEY}', found "
                                  f"{sorted(state)}")
    p = state[WEIGHT_KEY]
    if tuple(p.shape) != (n, dim):
        raise hub.CheckpointError(f"{d / ADAPTER_WEIGHTS}: '{WEIGHT_KEY}' has shape {tuple(p.shape)}, expected "
                                  f"{(n, dim)} (num_virtual_tokens, token_dim)")
    if not p.is_floating_point() or not bool(torch.isfinite(p).all()):
        raise hub.CheckpointError(f"{d / ADAPTER_WEIGHTS}: '{WEIGHT_KEY}' must be finite floats ({p.dtype})")
    keep = {k: cfg.get(k) for k in ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                                    "base_model_name_or_path")}
    return PromptTuningModel(model, n, p.to(embed.weight.device), embed, forward_embeds, keep)


# ---- the entry point (the one SFT recipe, train/jobs.sft_job, with the base frozen) ----
def prompt_tune(model_dir: str, data_path: str, out_dir: str, num_virtual_tokens: int = 20, init: str = "text",
                init_text: Optional[str] = None, epochs: int = 3, lr: float = 3e-2, batch_size: int = 8,
                max_length: Optional[int] = 256, completion_only: bool = True, seed: int = 0,
                device: Optional[str] = None, quiet: bool = False) -> dict:
    """Prompt-tune a causal LM checkpoint on a JSONL/CSV SFT file; the adapter (peft's PROMPT_TUNING files) and
    the tokenizer go to out_dir. `minillm sft --prompt-tuning N` runs the same recipe (sft_job).

    init='text' without init_text uses the first record's prompt. Returns sft_job's summary dict. The learning
    rate default is high, as prompt tuning needs (Lester et al. use 0.3 with Adafactor)."""
    from minillm.train.jobs import sft_job
    from minillm.train.loop import TrainConfig
    cfg = TrainConfig(lr=lr, weight_decay=0.0, epochs=epochs, batch_size=batch_size, seed=seed, device=device,
                      quiet=quiet, out_dir=None)
    return sft_job(model_dir, data_path, out_dir, cfg, completion_only=completion_only, max_length=max_length,
                   prompt_tuning=PromptTuningConfig(num_virtual_tokens, init, init_text))
