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


# Float dtypes by torch's names and by safetensors' header names.
FLOAT_DTYPES = {"torch.float64", "torch.float32", "torch.float16", "torch.bfloat16", "torch.float8_e4m3fn",
                "torch.float8_e5m2", "F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


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


def read_json(path: str | os.PathLike) -> dict:
    """A checkpoint's JSON file (config.json, adapter_config.json, ...) as a dict; missing, malformed or not an
    object is a CheckpointError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing {path.name}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        where = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else type(e).__name__
        raise CheckpointError(f"{path}: not valid JSON ({where})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def read_config(directory: str | os.PathLike) -> dict:
    return read_json(Path(directory) / "config.json")


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory: model.safetensors, or the shards its index names
    (checked: each shard path stays inside the directory, and exists). Pickle-only folders are refused."""
    d = Path(directory)
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        return sorted(set(read_shard_index(d).values()))
    pickles = [f.name for f in d.glob("*.bin")] + [f.name for f in d.glob("*.pt")] + [f.name for f in d.glob("*.pth")]
    if pickles:
        raise CheckpointError(
            f"{d}: only pickle checkpoints found ({', '.join(pickles)}); minillm loads safetensors only and never "
            f"unpickles. Convert it once with a trusted tool (e.g. safetensors' convert script) to model.safetensors.")
    raise CheckpointError(f"{d}: no model.safetensors (or model.safetensors.index.json)")


def read_shard_index(directory: str | os.PathLike) -> dict[str, Path]:
    """model.safetensors.index.json -> {tensor name: shard path}. Refused: a shard path that is absolute or
    leaves the directory (`../x`, or a symlink out of it), a tensor listed twice, a shard file missing."""
    d = Path(directory)
    path = d / "model.safetensors.index.json"

    def no_duplicates(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen and isinstance(v, str):
                raise CheckpointError(f"{path}: tensor '{k}' listed twice (in '{seen[k]}' and '{v}')")
            seen[k] = v
        return seen
    try:
        index = json.loads(path.read_text(), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise CheckpointError(f"{path}: no 'weight_map' of tensor names to shard files")
    root = d.resolve()
    out: dict[str, Path] = {}
    for name, shard in wmap.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{path}: tensor '{name}': shard must be a file name, got {shard!r}")
        f = (d / shard)
        if Path(shard).is_absolute() or ".." in Path(shard).parts or root not in f.resolve().parents:
            raise CheckpointError(f"{path}: tensor '{name}': shard '{shard}' is outside the checkpoint directory")
        if not f.is_file():
            raise CheckpointError(f"{path}: tensor '{name}': shard file '{shard}' is missing")
        out[name] = f
    return out


def load_safetensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or shards), on CPU."""
    state: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(directory):
        part = read_safetensors_file(f)
        twice = sorted(set(part) & set(state))
        if twice:
            raise CheckpointError(f"{f}: tensor '{twice[0]}' is also in another shard")
        state.update(part)
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


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write) -> None:
    """A temporary file beside `path`, written by write(tmp_path), fsynced, given the permissions a plain
    open() would (0666 less the umask; mkstemp makes 0600), then renamed over `path`. Any failure (disk full,
    a kill) leaves the old `path` as it was and removes the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Optional[dict[str, str]] = None) -> None:
    """Write atomically: a temporary file in the same folder, then a rename over the target."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_json(obj: Any, path: str | os.PathLike) -> None:
    """Atomic JSON write (temporary file, then rename)."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"  # fails (unserializable) before any file exists

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _atomic_write(path, write)


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise a CheckpointError naming every float tensor (up to 5) holding NaN or Inf."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{source}: non-finite values (NaN/Inf) in tensor(s) {', '.join(repr(b) for b in bad[:5])}"
                              f"{' ...' if len(bad) > 5 else ''}; pass allow_nonfinite=True to load them anyway")


def _plan_load(model: torch.nn.Module, shapes: dict[str, tuple[tuple, str]], source: str, prefix: str,
               transpose: Iterable[str], ignore_unexpected: Iterable[str], optional: Iterable[str]
               ) -> list[tuple[str, str, bool]]:
    """Check checkpoint tensors, given as {name: (shape, dtype name)}, against the model; raise one error naming
    every problem, or return the copy plan [(model name, checkpoint name, transposed)]."""
    transpose = [re.compile(p) for p in transpose]
    ignore = [re.compile(p) for p in ignore_unexpected]
    optional = [re.compile(p) for p in optional]
    expected = model.state_dict()
    add = prefix if prefix and not any(k.startswith(prefix) for k in shapes) and \
        any(k.startswith(prefix) for k in expected) else ""
    problems, plan, seen = [], [], set()
    for ck_name, (shape, dtype) in shapes.items():
        name = add + ck_name
        is_float = dtype in FLOAT_DTYPES
        seen.add(name)
        if name not in expected:
            if not any(p.search(name) for p in ignore):
                problems.append(f"unexpected tensor '{name}' {tuple(shape)}")
            continue
        tr = any(p.search(name) for p in transpose) and len(shape) == 2
        shape = tuple(shape)[::-1] if tr else tuple(shape)
        want = expected[name]
        if shape != tuple(want.shape):
            problems.append(f"tensor '{name}': expected shape {tuple(want.shape)}, found {shape}")
            continue
        if is_float != want.is_floating_point():
            problems.append(f"tensor '{name}': expected dtype {want.dtype}, found {dtype}")
            continue
        plan.append((name, ck_name, tr))
    for name in expected:
        if name not in seen and not any(p.search(name) for p in optional):
            problems.append(f"missing tensor '{name}' {tuple(expected[name].shape)}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}:\n  {shown}")
    return plan


def load_state_dict_strict(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: str = "checkpoint",
    prefix: str = "",
    transpose: Iterable[str] = (),
    ignore_unexpected: Iterable[str] = (),
    optional: Iterable[str] = (),
    allow_nonfinite: bool = False,
) -> None:
    """Copy `state` into `model` by name after checking everything; on any problem raise, touching nothing.
    A NaN/Inf in any loaded tensor is an error naming it (allow_nonfinite=True loads it anyway).

    prefix: the model's base prefix (e.g. "transformer."), added to checkpoint names that lack it
    (hub base-model checkpoints save without it). transpose: regexes of names stored transposed
    (GPT-2's Conv1D). ignore_unexpected: regexes of checkpoint names to skip (buffers, unused heads).
    optional: regexes of model names that may be absent (tied weights).
    """
    shapes = {k: (tuple(t.shape), str(t.dtype)) for k, t in state.items()}
    plan = _plan_load(model, shapes, source, prefix, transpose, ignore_unexpected, optional)
    if not allow_nonfinite:
        check_finite({ck: state[ck] for _, ck, _ in plan}, source)
    expected = model.state_dict()
    with torch.no_grad():
        for name, ck_name, tr in plan:
            t = state[ck_name]
            expected[name].copy_(t.t() if tr else t)


def load_checkpoint_strict(model: torch.nn.Module, directory: str | os.PathLike, prefix: str = "",
                           transpose: Iterable[str] = (), ignore_unexpected: Iterable[str] = (),
                           optional: Iterable[str] = (), skip: Iterable[str] = (),
                           allow_nonfinite: bool = False) -> None:
    """load_state_dict_strict straight from the files of a checkpoint directory (single file or shards),
    with about one copy of the weights in memory instead of two.

    First every file's header is read (names, shapes, dtypes; no tensor data) and checked against the
    model — shard paths inside the directory, no tensor in two shards, the index agreeing with the
    shards — and any problem raises with the model untouched. Then each tensor is read (memory-mapped)
    and copied into its parameter, one at a time. skip: regexes of checkpoint names not to load at all
    (e.g. a tied head's copy)."""
    from safetensors import safe_open
    d = Path(directory)
    files = checkpoint_files(d)
    listed = read_shard_index(d) if files != [d / "model.safetensors"] else None
    skip = [re.compile(p) for p in skip]
    where: dict[str, Path] = {}
    shapes: dict[str, tuple[tuple, str]] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    if k in where:
                        raise CheckpointError(f"{f}: tensor '{k}' is also in shard '{where[k].name}'")
                    if listed is not None and listed.get(k) != f:
                        raise CheckpointError(f"{f}: tensor '{k}' is not listed for this shard in "
                                              f"model.safetensors.index.json")
                    sl = h.get_slice(k)
                    where[k] = f
                    shapes[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except SafetensorError as e:
            raise CheckpointError(f"{f}: unreadable or truncated safetensors file ({e})") from None
    if listed is not None:
        absent = sorted(set(listed) - set(where))
        if absent:
            raise CheckpointError(f"{d / 'model.safetensors.index.json'}: tensor '{absent[0]}' is listed in "
                                  f"'{listed[absent[0]].name}' but that shard does not hold it")
    shapes = {k: v for k, v in shapes.items() if not any(p.search(k) for p in skip)}
    plan = _plan_load(model, shapes, str(d), prefix, transpose, ignore_unexpected, optional)
    expected = model.state_dict()
    by_file: dict[Path, list[tuple[str, str, bool]]] = {}
    for item in plan:
        by_file.setdefault(where[item[1]], []).append(item)
    if not allow_nonfinite:  # one tensor at a time (memory-mapped), before the first copy
        for f, items in by_file.items():
            with safe_open(str(f), "pt") as h:
                for _, ck_name, _ in items:
                    check_finite({ck_name: h.get_tensor(ck_name)}, str(f))
    with torch.no_grad():
        for f, items in by_file.items():
            with safe_open(str(f), "pt") as h:
                for name, ck_name, tr in items:
                    t = h.get_tensor(ck_name)
                    expected[name].copy_(t.t() if tr else t)
                    del t


def save_checkpoint_dir(directory: str | os.PathLike, state: dict[str, torch.Tensor], config: dict,
                        transpose: Iterable[str] = (), skip: Iterable[str] = (),
                        max_shard_size: Optional[int] = None, source: Optional[Path] = None) -> Path:
    """Write config.json + model.safetensors (metadata format=pt, as transformers writes), and the tokenizer files
    of `source` (the directory the model was loaded from) when it has them. With max_shard_size
    (bytes) and more tensor bytes than that: model-0000i-of-0000n.safetensors shards, tensors in order, each
    shard at most max_shard_size unless one tensor alone is larger, plus model.safetensors.index.json."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    transpose = [re.compile(p) for p in transpose]
    skip = [re.compile(p) for p in skip]
    out = {}
    for k, v in state.items():
        if any(p.search(k) for p in skip):
            continue
        out[k] = v.t() if any(p.search(k) for p in transpose) and v.dim() == 2 else v
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    total = sum(nbytes(v) for v in out.values())
    if max_shard_size is None or total <= max_shard_size:
        save_safetensors(out, d / "model.safetensors", metadata={"format": "pt"})
        (d / "model.safetensors.index.json").unlink(missing_ok=True)  # a stale index would name old shards
    else:
        (d / "model.safetensors").unlink(missing_ok=True)  # a stale single file would win over the shards
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in out.items():
            if shards[-1] and size + nbytes(v) > max_shard_size:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes(v)
        wmap = {}
        for i, part in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(part, d / name, metadata={"format": "pt"})
            wmap.update({k: name for k in part})
        save_json({"metadata": {"total_size": total}, "weight_map": wmap}, d / "model.safetensors.index.json")
    save_json(config, d / "config.json")
    copy_tokenizer_files(source, d)
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


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], directory: Path, dtype=None, device=None,
              **strict) -> torch.nn.Module:
    """The last steps of every from_pretrained: strict copy (load_state_dict_strict's options), remember where the
    model came from (its tokenizer files are copied on save), move to dtype/device."""
    load_state_dict_strict(model, state, source=str(directory), **strict)
    model.source_dir = directory
    return model.to(device=device, dtype=dtype)


def save_model(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """save_pretrained for models whose hub layout is their own state_dict: config.json (architecture = the class
    name) + model.safetensors + the source's tokenizer files."""
    return save_checkpoint_dir(directory, model.state_dict(), model.config.to_hub_dict(type(model).__name__),
                               source=getattr(model, "source_dir", None))
