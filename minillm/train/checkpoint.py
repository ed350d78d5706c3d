"""Training checkpoints: everything a run needs to continue exactly, written atomically, no pickle.

A run continues bit for bit only if everything that shapes the next update comes back: the
weights, the optimizer's moments (AdamW's exp_avg / exp_avg_sq and step count), the fp16 loss
scaler, every random-number generator (dropout masks, data shuffling) and the step counter (the
learning-rate schedule and the data order are pure functions of it, see schedule.py and loop.py).
Layout of one checkpoint, all safetensors + JSON:

    <dir>/latest.json                 {"name": "step-000100"}  — written last, atomically
    <dir>/step-000100/model.safetensors        parameters and buffers (tied copies stored once)
    <dir>/step-000100/optimizer.safetensors    "state.<param index>.<key>" tensors
    <dir>/step-000100/rng.safetensors          torch CPU / CUDA generator states (uint8)
    <dir>/step-000100/trainer_state.json       step, epoch, optimizer param groups, scaler,
                                               python / numpy RNG, tied-weight aliases, extras

Atomicity: a checkpoint is written into a hidden temporary folder, which is renamed to
`step-N` only once every file is complete (and fsynced); only then does `latest.json` move to
it (itself a temp file + rename), and only then are older checkpoints deleted. A process
killed at any moment leaves `latest.json` pointing at a complete checkpoint.

Under DDP rank 0 writes the checkpoint, so the RNG states saved are rank 0's and every rank
restores them on resume; bit-exact resume is promised for single-process runs (and for DDP
runs without dropout).

Source: the layout follows transformers' Trainer checkpoints (optimizer, scheduler, scaler,
rng_state) with pickle replaced by safetensors + JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from minillm.hub import CheckpointError, load_state_dict_strict, read_safetensors_file, save_json, save_safetensors

LATEST = "latest.json"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel (or torch.compile) wrapper."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


# ---- pieces: model, optimizer, RNG ----
def model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with tied tensors stored once: (tensors, {alias: stored name})."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in unwrap(model).state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t
    return tensors, aliases


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten optimizer.state_dict(): tensors -> "state.<i>.<key>", the rest -> JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = v
            else:
                scalars[f"{idx}.{key}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict, optimizer: torch.optim.Optimizer,
                         where: str) -> dict:
    """Rebuild an optimizer state dict, checking it fits `optimizer` before anything is loaded."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for name, v in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    groups = []
    for g in meta["param_groups"]:
        groups.append({k: (tuple(v) if k == "betas" else v) for k, v in g.items()})
    have = [len(g["params"]) for g in optimizer.param_groups]
    want = [len(g["params"]) for g in groups]
    if have != want:
        raise CheckpointError(f"{where}: optimizer has parameter groups of sizes {have}, the checkpoint {want} "
                              f"(a different model, or different trainable parameters)")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, st in state.items():
        for key, t in st.items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and tuple(t.shape) != tuple(params[idx].shape):
                raise CheckpointError(f"{where}: optimizer state '{key}' of parameter {idx} has shape "
                                      f"{tuple(t.shape)}, the parameter {tuple(params[idx].shape)}")
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(mt), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][:torch.cuda.device_count()])
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- whole checkpoints ----
def _fsync_tree(d: Path) -> None:
    for f in d.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: str | os.PathLike, model: torch.nn.Module,
                    optimizer: Optional[torch.optim.Optimizer] = None, scaler=None, step: int = 0,
                    extra: Optional[dict] = None, keep: int = 1) -> Path:
    """Write `<directory>/step-<step>/` atomically, point latest.json at it, keep the newest `keep`."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors, aliases = model_tensors(model)
    save_safetensors(tensors, tmp / "model.safetensors")
    state: dict[str, Any] = {"step": step, "aliases": aliases, "extra": extra or {}}
    if optimizer is not None:
        opt_tensors, state["optimizer"] = optimizer_to_files(optimizer)
        save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    rng_tensors, state["rng"] = rng_state()
    save_safetensors(rng_tensors, tmp / "rng.safetensors")
    save_json(state, tmp / "trainer_state.json")
    _fsync_tree(tmp)
    final = root / name
    if final.exists():  # re-saving the same step: move the old one aside first
        trash = root / f".{name}.old-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    save_json({"name": name}, root / LATEST)
    # Only now, with latest.json on the new one, remove older checkpoints and stale temp folders.
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in done[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | os.PathLike) -> Optional[Path]:
    """The checkpoint latest.json names (or `directory` itself if it is one); None if there is none."""
    d = Path(directory)
    if (d / "trainer_state.json").is_file():
        return d
    pointer = d / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["name"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{pointer}: unreadable ({e})") from None
    ckpt = d / name
    if not (ckpt / "trainer_state.json").is_file():
        raise CheckpointError(f"{pointer} names {name}, but {ckpt} is missing or incomplete")
    return ckpt


def load_checkpoint(directory: str | os.PathLike, model: torch.nn.Module,
                    optimizer: Optional[torch.optim.Optimizer] = None, scaler=None,
                    restore_rng: bool = True) -> dict:
    """Load a checkpoint (a step-N folder or the folder holding latest.json) into the given objects.

    Everything is read and checked before anything is changed. Returns the trainer state
    (step, extra)."""
    ckpt = latest_checkpoint(directory)
    if ckpt is None:
        raise CheckpointError(f"{directory}: no checkpoint (no latest.json, no trainer_state.json)")
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt / 'trainer_state.json'}: not valid JSON (line {e.lineno})") from None
    tensors = read_safetensors_file(ckpt / "model.safetensors")
    for alias, name in state["aliases"].items():
        tensors[alias] = tensors[name]
    opt_sd = None
    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"{ckpt}: no optimizer state saved")
        opt_sd = optimizer_from_files(read_safetensors_file(ckpt / "optimizer.safetensors"), state["optimizer"],
                                      optimizer, str(ckpt / "optimizer.safetensors"))
    rng_tensors = read_safetensors_file(ckpt / "rng.safetensors") if restore_rng else None
    load_state_dict_strict(unwrap(model), tensors, source=str(ckpt / "model.safetensors"))
    if opt_sd is not None:
        optimizer.load_state_dict(opt_sd)
    if scaler is not None and scaler.is_enabled() and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        set_rng_state(rng_tensors, state["rng"])
    return {"step": state["step"], "extra": state.get("extra", {}), "path": str(ckpt)}
