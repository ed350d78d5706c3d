"""Checkpoints in the hub layout: find them, read their config, load and save their tensors.

A hub checkpoint is a folder: `config.json` (the architecture), `model.safetensors` (the
tensors, by name; large models split them over shards listed in
`model.safetensors.index.json`) and the tokenizer files. minillm keeps the hub's parameter
names, so loading is a name-for-name copy, checked strictly first: every expected tensor
present, nothing unexpected, every shape right — or one error naming them, with the model
untouched. Pickle checkpoints (`pytorch_model.bin`) are refused, never unpickled.

Where a name is looked for, in order: an existing directory; `weights/<name>/` (`$MINILLM_WEIGHTS`,
the repo's `weights/`, the tiny checkpoints packaged in the wheel, or `./weights`); a download through huggingface_hub of the
safetensors, JSON and tokenizer files only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

REPO_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"  # a source checkout's weights/
PACKAGED_WEIGHTS = Path(__file__).resolve().parent / "_weights"    # the same tiny checkpoints inside a wheel
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "vocab.txt", "merges.txt"]


class CheckpointError(ValueError):
    """A checkpoint that does not fit: missing/unexpected/mis-shaped tensors, bad files, bad config."""


def weights_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("MINILLM_WEIGHTS"):
        dirs.append(Path(os.environ["MINILLM_WEIGHTS"]))
    dirs += [REPO_WEIGHTS, PACKAGED_WEIGHTS, Path.cwd() / "weights"]
    return dirs


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Map a local directory, a `weights/<name>` entry, or a hub id to a local directory."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    name = str(name_or_path)
    for base in weights_dirs():
        for cand in (base / name, base / name.split("/")[-1]):
            if cand.is_dir():
                return cand
    if p.exists():
        raise CheckpointError(f"{p} is a file; a checkpoint is a directory holding config.json and model.safetensors")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id=name, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, or bad id
        looked = ", ".join(str(b / name.split("/")[-1]) for b in weights_dirs())
        raise CheckpointError(
            f"checkpoint '{name}' not found: no such directory, nothing at {looked}, and the hub download "
            f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Download it when online "
            f"(huggingface-cli download {name} --include '*.safetensors' '*.json' --local-dir weights/{name.split('/')[-1]}) "
            f"or pass a local directory.") from None


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def config_from_dict(cls, d: dict, path: str = "config.json"):
    """Build a dataclass config from a hub config dict: unknown keys ignored, missing required keys an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = [n for n, f in fields.items()
               if n not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise CheckpointError(f"{path}: missing required key(s) {missing} for {cls.__name__}")
    return cls(**{k: v for k, v in d.items() if k in fields})


def load_safetensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or shards), on CPU."""
    d = Path(directory)
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        shards = json.loads(index.read_text())["weight_map"].values()
        files = [d / f for f in sorted(set(shards))]
    else:
        pickles = [f.name for f in d.glob("*.bin")] + [f.name for f in d.glob("*.pt")] + [f.name for f in d.glob("*.pth")]
        if pickles:
            raise CheckpointError(
                f"{d}: only pickle checkpoints found ({', '.join(pickles)}); minillm loads safetensors only and never "
                f"unpickles. Convert it once with a trusted tool (e.g. safetensors' convert script) to model.safetensors.")
        raise CheckpointError(f"{d}: no model.safetensors (or model.safetensors.index.json)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_safetensors_file(f))
    return state


def read_safetensors_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
        raise CheckpointError(f"{path}: pickle files are refused; use safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({e})") from None


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Optional[dict[str, str]] = None) -> None:
    """Write atomically: a temporary file in the same folder, then a rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """Atomic JSON write (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def load_state_dict_strict(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: str = "checkpoint",
    prefix: str = "",
    transpose: Iterable[str] = (),
    ignore_unexpected: Iterable[str] = (),
    optional: Iterable[str] = (),
) -> None:
    """Copy `state` into `model` by name after checking everything; on any problem raise, touching nothing.

    prefix: the model's base prefix (e.g. "transformer."), added to checkpoint names that lack it
    (hub base-model checkpoints save without it). transpose: regexes of names stored transposed
    (GPT-2's Conv1D). ignore_unexpected: regexes of checkpoint names to skip (buffers, unused heads).
    optional: regexes of model names that may be absent (tied weights).
    """
    transpose = [re.compile(p) for p in transpose]
    ignore = [re.compile(p) for p in ignore_unexpected]
    optional = [re.compile(p) for p in optional]
    expected = model.state_dict()
    if prefix and not any(k.startswith(prefix) for k in state) and any(k.startswith(prefix) for k in expected):
        state = {prefix + k: v for k, v in state.items()}
    problems, plan = [], []
    for name, t in state.items():
        if name not in expected:
            if not any(p.search(name) for p in ignore):
                problems.append(f"unexpected tensor '{name}' {tuple(t.shape)}")
            continue
        if any(p.search(name) for p in transpose) and t.dim() == 2:
            t = t.t()
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            problems.append(f"tensor '{name}': expected shape {tuple(want.shape)}, found {tuple(t.shape)}")
            continue
        if t.is_floating_point() != want.is_floating_point():
            problems.append(f"tensor '{name}': expected dtype {want.dtype}, found {t.dtype}")
            continue
        plan.append((name, t))
    for name in expected:
        if name not in state and not any(p.search(name) for p in optional):
            problems.append(f"missing tensor '{name}' {tuple(expected[name].shape)}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}:\n  {shown}")
    with torch.no_grad():
        for name, t in plan:
            expected[name].copy_(t)


def save_checkpoint_dir(directory: str | os.PathLike, state: dict[str, torch.Tensor], config: dict,
                        transpose: Iterable[str] = (), skip: Iterable[str] = ()) -> Path:
    """Write config.json + model.safetensors (metadata format=pt, as transformers writes)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    transpose = [re.compile(p) for p in transpose]
    skip = [re.compile(p) for p in skip]
    out = {}
    for k, v in state.items():
        if any(p.search(k) for p in skip):
            continue
        out[k] = v.t() if any(p.search(k) for p in transpose) and v.dim() == 2 else v
    save_safetensors(out, d / "model.safetensors", metadata={"format": "pt"})
    save_json(config, d / "config.json")
    return d


def copy_tokenizer_files(src: Optional[Path], dst: str | os.PathLike) -> None:
    """Copy tokenizer.json and friends beside a saved checkpoint, when the source has them."""
    if src is None:
        return
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "preprocessor_config.json", "generation_config.json"):
        f = Path(src) / name
        if f.is_file() and Path(dst).resolve() != Path(src).resolve():
            (Path(dst) / name).write_bytes(f.read_bytes())


def as_config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)



# ---- one checkpoint, two layouts: base (`BertModel`) and task (`bert.` prefix + heads) ----
# The hub stores an encoder two ways. A *base* checkpoint (`BertModel`, `ViTModel`) names its tensors
# without a prefix (`embeddings.word_embeddings.weight`); a *task* checkpoint (`BertForSequenceClassification`,
# `ViTForImageClassification`) puts the base under a prefix (`bert.`, `distilbert.`, `vit.`, `roberta.`) and adds
# head tensors. A base model reads both: the prefix is stripped and the *known* head tensors are skipped; any
# other stray tensor is still an error (strict loading). transformers calls the prefix `base_model_prefix`.
HEAD_TENSORS = [r"^cls\.", r"^classifier\.", r"^pre_classifier\.", r"^qa_outputs\.", r"^vocab_transform\.",
                r"^vocab_layer_norm\.", r"^vocab_projector\.", r"^lm_head\.", r"^decoder\."]


def read_config_of(name_or_path: str, model_type: str, loader: str) -> tuple[Path, dict]:
    """Resolve a checkpoint and read its config.json, refusing another architecture with a clear error."""
    d = resolve(name_or_path)
    raw = read_config(d)
    found = raw.get("model_type")
    if found != model_type:
        raise CheckpointError(
            f"{d / 'config.json'}: model_type '{found}' (architectures {raw.get('architectures')}) is not "
            f"'{model_type}'; {loader} loads {model_type} checkpoints only")
    return d, raw


def base_state(state: dict[str, torch.Tensor], prefix: str,
               head_tensors: Iterable[str] = HEAD_TENSORS) -> dict[str, torch.Tensor]:
    """The base model's tensors of a checkpoint: `prefix` stripped when present, known head tensors dropped.

    A checkpoint with no prefixed tensor is returned as is (it is already a base checkpoint)."""
    if not any(k.startswith(prefix) for k in state):
        return dict(state)
    heads = [re.compile(p) for p in head_tensors]
    out = {}
    for k, v in state.items():
        if k.startswith(prefix):
            out[k[len(prefix):]] = v
        elif not any(p.search(k) for p in heads):
            out[k] = v  # not a known head: left in, so strict loading reports it
    return out


def load_base_model(cls, config_cls, name_or_path: str, model_type: str, prefix: str, ignored: Iterable[str] = (),
                    dtype: Optional[torch.dtype] = None, device=None, **overrides):
    """The encoders' from_pretrained: read and check config.json (`model_type`), build `cls(config)` — with
    add_pooling_layer when `cls` takes it and the checkpoint has a pooler — load the base tensors (task
    layouts: `prefix` stripped, heads skipped) strictly, then move to dtype/device."""
    d, raw = read_config_of(name_or_path, model_type, cls.__name__)
    cfg = config_from_dict(config_cls, {**raw, **overrides}, str(d / "config.json"))
    state = base_state(load_safetensors(d), prefix)
    if "add_pooling_layer" in cls.__init__.__code__.co_varnames:
        model = cls(cfg, add_pooling_layer="pooler.dense.weight" in state)
    else:
        model = cls(cfg)
    load_state_dict_strict(model, state, source=str(d), ignore_unexpected=ignored)
    model.source_dir = d
    return model.to(device=device, dtype=dtype)
