"""Configs: a hub config.json as a checked dataclass, and back.

A model is built from its config before a single weight is read, so a bad value must be caught there:
`n_head: 0` divides by zero, `n_embd: "64"` is a string, `n_layer: 100000` allocates gigabytes. Every config
dataclass's __post_init__ calls validate_config (types and ranges from the annotations and the field names);
config_from_dict reads a config.json into one and, beside safetensors files, compares the parameter count the
config implies (a lower bound) with what the files' headers hold — before any model exists:

    min_parameters = layers · width · (MLP width + heads · head size) + (vocabulary + positions) · width

Source: the hub's config.json conventions (transformers' PretrainedConfig: id2label, label2id, architectures).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from pathlib import Path
from typing import Iterable, Optional

from safetensors import SafetensorError

from minillm.hub import CheckpointError, checkpoint_files


def config_from_dict(cls, d: dict, path: str = "config.json"):
    """Build a dataclass config from a hub config dict: unknown keys ignored, missing required keys an error,
    every value checked (the dataclass's __post_init__, through validate_config) — any problem is a
    CheckpointError naming the file. For a model config.json beside safetensors files, the parameter count the
    config implies is checked against the files' headers before any model is built (check_config_size)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [n for n, f in fields.items()
               if n not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise CheckpointError(f"{path}: missing required key(s) {missing} for {cls.__name__}")
    try:
        cfg = cls(**{k: v for k, v in d.items() if k in fields})
    except (ValueError, TypeError, ArithmeticError, LookupError) as e:  # a check, or an unchecked bad value
        raise CheckpointError(f"{path}: {e}") from None
    if Path(path).name == "config.json":
        check_config_size(cfg, Path(path).parent)
    return cfg


def classifier_config(raw: dict, num_labels: Optional[int], problem_type: Optional[str]) -> dict:
    """A sequence classifier's config dict: `num_labels` new labels (LABEL_0…) unless the checkpoint already has
    that many; the problem type when given."""
    raw = dict(raw)
    if num_labels is not None and (not raw.get("id2label") or len(raw["id2label"]) != num_labels):
        raw["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    if problem_type is not None:
        raw["problem_type"] = problem_type
    return raw


def as_config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def hub_config(cfg, architecture: str, optional: Iterable[str] = ("id2label", "problem_type", "classifier_dropout")
               ) -> dict:
    """A config dataclass as the hub's config.json: minillm's own `use_sdpa` flag dropped, optional keys left out
    when None, label2id written beside id2label, `architectures` set."""
    d = dataclasses.asdict(cfg)
    d.pop("use_sdpa", None)
    for k in optional:
        if k in d and d[k] is None:
            d.pop(k)
    if d.get("id2label"):
        d["label2id"] = {v: int(k) for k, v in d["id2label"].items()}
    d["architectures"] = [architecture]
    return d


# ---- config values: checked by type and range before anything is allocated ----
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _base_type(hint):
    """(type, optional) of a field annotation: Optional[X] -> (X, True); other unions -> (None, ...)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else None), type(None) in args
    return (typing.get_origin(hint) or hint), False


def validate_config(cfg, error: type = None, zero_ok: Iterable[str] = (), ranges: Optional[dict] = None,
                    heads: Optional[tuple[str, str]] = None) -> None:
    """Check every field of a config dataclass against its annotation and its name, before anything is allocated:
    bools real bools (not "no", not 0); ints real ints (not bool, not "64"), >= 1 — or >= 0 for token ids
    (`*_id`) and the names in `zero_ok`; floats finite numbers, probabilities (`*dropout*`, `*pdrop*`,
    `*_prob`) in [0, 1), epsilons (`*eps*`) > 0, `initializer_*` >= 0; strings strings; dicts and lists what
    they say. `ranges` adds {name: (low, high, low_inclusive)} for other floats. Raises `error` (CheckpointError
    by default: a model config) with "config: <name> must be ..., got <value>"; the first problem wins.
    heads=(width, n_heads): the width must split evenly over the attention heads."""
    error = error or CheckpointError
    zero_ok, ranges = set(zero_ok), ranges or {}
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        name, v = f.name, getattr(cfg, f.name)
        typ, optional = _base_type(hints.get(name))
        if v is None:
            if optional or typ is None:
                continue
            raise error(f"config: {name} must not be null")
        bad = None
        if typ is bool:
            if not isinstance(v, bool):
                bad = "must be true or false"
        elif typ is int:
            low = 0 if name.endswith("_id") or name in zero_ok else 1
            if not _is_int(v):
                bad = "must be an integer"
            elif v < low:
                bad = f"must be >= {low}"
        elif typ is float:
            low = name.lower()
            if not _is_num(v):
                bad = "must be a finite number"
            elif ("dropout" in low or "pdrop" in low or low.endswith("_prob")) and not 0 <= v < 1:
                bad = "must be a probability in [0, 1)"
            elif re.search(r"(^|_)(eps|epsilon)($|_)", low) and v <= 0:
                bad = "must be > 0"
            elif low.startswith("initializer") and not 0 <= v <= 100:
                bad = "must be in [0, 100]"  # a standard deviation (factor) for new weights
            elif name in ranges:
                lo, hi, inclusive = ranges[name]
                if not ((v >= lo if inclusive else v > lo) and v <= hi):
                    bad = f"must be in {'[' if inclusive else '('}{lo}, {hi}]"
        elif typ is str:
            if not isinstance(v, (str, os.PathLike)):
                bad = "must be a string"
        elif typ in (dict, list, tuple):
            if not isinstance(v, (list, tuple) if typ in (list, tuple) else dict):
                bad = f"must be a {'list' if typ in (list, tuple) else 'JSON object'}"
        if bad:
            raise error(f"config: {name} {bad}, got {v!r}")
    if heads and getattr(cfg, heads[0]) % getattr(cfg, heads[1]):
        raise error(f"config: {heads[0]}={getattr(cfg, heads[0])} is not divisible by "
                    f"{heads[1]}={getattr(cfg, heads[1])}")


# The fields that give a model's width, depth, MLP width and vocabulary, across the families' configs.
_WIDTH = ("n_embd", "hidden_size", "d_model", "dim")
_DEPTH = ("n_layer", "num_hidden_layers", "num_layers", "num_decoder_layers", "n_layers")
_INNER = ("n_inner", "intermediate_size", "d_ff", "hidden_dim")


def min_parameters(cfg) -> int:
    """A lower bound on the parameters a transformer config implies: every layer holds at least one
    (width x MLP width) matrix, plus the (vocabulary x width) embedding and any learned position table.
    0 when the config is not a model's."""
    width = next((getattr(cfg, k) for k in _WIDTH if _is_int(getattr(cfg, k, None))), None)
    if width is None:
        return 0
    layers = sum(getattr(cfg, k) for k in _DEPTH if _is_int(getattr(cfg, k, None)))
    inner = next((getattr(cfg, k) for k in _INNER if _is_int(getattr(cfg, k, None))), 4 * width)
    rows = sum(getattr(cfg, k) for k in ("vocab_size", "type_vocab_size") if _is_int(getattr(cfg, k, None)))
    # learned position tables: GPT-2's n_positions, the BERT family's max_position_embeddings (Llama and T5
    # have none: rotary / relative positions)
    names = {f.name for f in dataclasses.fields(cfg)}
    pos = "n_positions" if "n_positions" in names else "max_position_embeddings" \
        if names & {"type_vocab_size", "sinusoidal_pos_embds"} else None
    rows += getattr(cfg, pos) if pos and _is_int(getattr(cfg, pos, None)) else 0
    # attention's query projection (width x heads*head_dim) where the head size is its own field (T5's d_kv, Llama's
    # head_dim), and T5's relative-position bias table (buckets x heads)
    heads = next((getattr(cfg, k) for k in ("num_heads", "num_attention_heads") if _is_int(getattr(cfg, k, None))), 0)
    head_dim = next((getattr(cfg, k) for k in ("d_kv", "head_dim") if _is_int(getattr(cfg, k, None))), 0)
    buckets = getattr(cfg, "relative_attention_num_buckets", 0) if _is_int(
        getattr(cfg, "relative_attention_num_buckets", None)) else 0
    return layers * width * (inner + heads * head_dim) + rows * width + buckets * heads


def checkpoint_capacity(directory: str | os.PathLike) -> int:
    """How many parameters a checkpoint's safetensors files hold, read from their headers only (no tensor
    data); a packed 4-bit byte counts as two."""
    from safetensors import safe_open
    total = 0
    for f in checkpoint_files(directory):
        try:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    n = math.prod(sl.get_shape())
                    total += 2 * n if sl.get_dtype() in ("U8", "I8") else n
        except SafetensorError as e:
            raise CheckpointError(f"{f}: unreadable or truncated safetensors file ({e})") from None
    return total


def check_config_size(cfg, directory: str | os.PathLike) -> None:
    """Refuse, before any model is built, a config implying more parameters than the checkpoint's files hold
    (n_layer: 100000 beside a 1 MB file would otherwise allocate gigabytes first)."""
    d = Path(directory)
    need = min_parameters(cfg)
    if not need or not ((d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file()):
        return
    have = checkpoint_capacity(d)
    if need > have:
        raise CheckpointError(f"{d / 'config.json'}: the config implies at least {need:,} parameters, but the "
                              f"checkpoint's safetensors files hold {have:,} (a wrong config.json?)")
