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
it (itself a temp file + rename), and only then are older checkpoints deleted. Re-saving a step
that exists (a finished run re-run with resume) writes `step-N.1` (.2, ...) beside it and deletes
the old folder only after latest.json names the new one — nothing is ever renamed away from
under latest.json. A process killed at any moment leaves `latest.json` pointing at a complete
checkpoint. Weights holding NaN/Inf are never saved (the last good checkpoint stays). One writer
at a time: `<dir>/.lock` holds the writer's pid (created O_EXCL; a lock whose pid is dead is
taken over). keep-N keeps the newest N by step number.

Under DDP rank 0 writes the checkpoint, so the RNG states saved are rank 0's and every rank
restores them on resume; bit-exact resume is promised for single-process runs (and for DDP
runs without dropout).

Source: the layout follows transformers' Trainer checkpoints (optimizer, scheduler, scaler,
rng_state) with pickle replaced by safetensors + JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from minillm.hub import (CheckpointError, check_finite, load_state_dict_strict, read_json, read_safetensors_file,
                         save_json,
                         save_safetensors)

LATEST = "latest.json"
LOCK = ".lock"
CKPT_NAME = re.compile(r"^step-(\d+)(?:\.(\d+))?$")  # step-000100, or step-000100.1 for a re-save


class LockedError(RuntimeError):
    """Another live process is writing to the same directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


_held: dict[str, int] = {}  # directories this process has locked -> nesting depth


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike):
    """Hold `<directory>/.lock` (pid inside, created with O_EXCL) for the block. Re-entrant within a process; a
    lock left by a dead process is taken over; a live one raises LockedError naming the pid and the file.
    Creating the lock also proves early that the directory is writable (a read-only --out fails here). A
    directory the lock created and nothing else filled is removed again on release."""
    d = Path(directory)
    created = not d.exists()
    d.mkdir(parents=True, exist_ok=True)
    key = str(d.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    path = d / LOCK
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and _pid_alive(owner):
                raise LockedError(f"{d} is in use by another minillm process (pid {owner}, lock file {path}); "
                                  f"wait for it, or choose another output directory") from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        break
    else:
        raise LockedError(f"{path}: could not take the lock (another process keeps re-creating it)")
    _held[key] = 1
    try:
        yield
    finally:
        _held.pop(key, None)
        with contextlib.suppress(OSError):
            if path.read_text().strip() == str(os.getpid()):
                path.unlink()
        if created:  # a job that failed before writing anything leaves no empty output folder behind
            with contextlib.suppress(OSError):
                d.rmdir()


def checkpoint_order(name: str) -> tuple[int, int]:
    """(step, re-save number) of a checkpoint folder name; keep-N and resume order by it (not as strings)."""
    m = CKPT_NAME.match(name)
    if not m:
        raise CheckpointError(f"'{name}' is not a checkpoint name (step-<N>[.<k>])")
    return int(m.group(1)), int(m.group(2) or 0)


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
    for name, v in meta.get("scalars", {}).items():  # absent = no scalar state (as _check_optimizer_meta allows)
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
        if not 0 <= idx < len(params):
            raise CheckpointError(f"{where}: optimizer state for parameter {idx}, but the optimizer has "
                                  f"{len(params)} parameters")
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
    """Write `<directory>/step-<step>/` atomically, point latest.json at it, keep the newest `keep`.

    Refused, with nothing written: weights holding NaN/Inf (FloatingPointError naming the tensor)."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    root = Path(directory)
    tensors, aliases = model_tensors(model)
    try:
        check_finite(tensors, "the model")
    except CheckpointError as e:
        raise FloatingPointError(f"not saving a checkpoint at step {step} to {root}: {str(e).split(';')[0]} "
                                 f"(the last good checkpoint is kept)") from None
    with directory_lock(root):
        base = f"step-{step:06d}"
        existing = {p.name for p in root.iterdir() if p.is_dir() and CKPT_NAME.match(p.name)}
        name, k = base, 0
        while name in existing:  # a re-save of this step: a new folder beside the old, never a rename over it
            k += 1
            name = f"{base}.{k}"
        tmp = root / f".{name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
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
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        save_json({"name": name}, root / LATEST)
        # Only now, with latest.json on the new one, remove older checkpoints and stale temp folders.
        done = sorted((p for p in root.iterdir() if p.is_dir() and CKPT_NAME.match(p.name)),
                      key=lambda p: checkpoint_order(p.name))
        for old in done[:-keep] if keep > 0 else []:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        for old in done:  # an older copy of this same step (a re-save) is superseded
            if old.name != name and checkpoint_order(old.name)[0] == step and old.exists():
                shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".step-*.tmp-*"):  # under the lock: no other live writer owns these
            shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | os.PathLike) -> Optional[Path]:
    """The checkpoint latest.json names (or `directory` itself if it is one); None if there is none.
    latest.json must name a checkpoint folder inside `directory` (step-<N>[.<k>]: no path, no `..`)."""
    d = Path(directory)
    if (d / "trainer_state.json").is_file():
        return d
    pointer = d / LATEST
    if not pointer.is_file():
        return None
    try:
        obj = json.loads(pointer.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as e:
        raise CheckpointError(f"{pointer}: unreadable ({type(e).__name__}: {e})") from None
    name = obj.get("name") if isinstance(obj, dict) else None
    if not isinstance(name, str) or not CKPT_NAME.match(name):
        raise CheckpointError(f"{pointer}: 'name' must be a checkpoint folder name step-<N> inside {d}, "
                              f"got {name!r}")
    ckpt = d / name
    if not (ckpt / "trainer_state.json").is_file():
        raise CheckpointError(f"{pointer} names {name}, but {ckpt} is missing or incomplete")
    return ckpt


def read_trainer_state(ckpt: Path) -> dict:
    """trainer_state.json of a checkpoint folder, with every field load_checkpoint uses checked."""
    path = ckpt / "trainer_state.json"
    state = read_json(path)
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: 'step' must be an integer >= 0, got {step!r}")
    aliases = state.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CheckpointError(f"{path}: 'aliases' must map tensor names to tensor names")
    if not isinstance(state.get("extra", {}), dict):
        raise CheckpointError(f"{path}: 'extra' must be a JSON object")
    if "scaler" in state and not isinstance(state["scaler"], dict):
        raise CheckpointError(f"{path}: 'scaler' must be a JSON object")
    state.setdefault("aliases", {})
    state.setdefault("extra", {})
    return state


def _check_optimizer_meta(meta: Any, tensors: dict[str, torch.Tensor], where: str) -> None:
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list) \
            or not isinstance(meta.get("scalars", {}), dict):
        raise CheckpointError(f"{where}: 'optimizer' must hold 'param_groups' (a list) and 'scalars' (an object)")
    for g in meta["param_groups"]:
        if not isinstance(g, dict) or not isinstance(g.get("params"), list) \
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in g["params"]):
            raise CheckpointError(f"{where}: each optimizer parameter group needs 'params', a list of integers")
        for k in ("lr", "weight_decay", "eps"):
            if k in g and not (isinstance(g[k], (int, float)) and not isinstance(g[k], bool) and math.isfinite(g[k])):
                raise CheckpointError(f"{where}: optimizer group '{k}' must be a finite number, got {g[k]!r}")
    names = list(tensors) + [f"state.{k}" for k in meta.get("scalars", {})]
    for n in names:
        parts = n.split(".", 2)
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2]:
            raise CheckpointError(f"{where}: optimizer entry '{n}' is not 'state.<parameter index>.<key>'")
    for n, v in meta.get("scalars", {}).items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise CheckpointError(f"{where}: optimizer scalar '{n}' must be a number, got {v!r}")
    for n, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where}: optimizer tensor '{n}' holds NaN/Inf")


def _check_rng(tensors: dict[str, torch.Tensor], meta: Any, where: str) -> None:
    """Try every generator state on a throwaway generator, so set_rng_state cannot fail half-way."""
    try:
        torch.Generator().set_state(tensors["torch_cpu"])
        version, mt, gauss = meta["python"]
        random.Random().setstate((version, tuple(mt), gauss))
        name, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.RandomState().set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except Exception as e:  # noqa: BLE001 — any malformed entry is the same problem for the user
        raise CheckpointError(f"{where}: unusable random-generator state ({type(e).__name__}: {e})") from None


def load_checkpoint(directory: str | os.PathLike, model: torch.nn.Module,
                    optimizer: Optional[torch.optim.Optimizer] = None, scaler=None,
                    restore_rng: bool = True, allow_nonfinite: bool = False) -> dict:
    """Load a checkpoint (a step-N folder or the folder holding latest.json) into the given objects.

    Everything is read and checked before anything is changed (trainer state fields, optimizer layout, RNG
    states, weights' names, shapes and finiteness): a failed call leaves the model, optimizer, scaler and
    generators as they were. Returns the trainer state (step, extra)."""
    ckpt = latest_checkpoint(directory)
    if ckpt is None:
        raise CheckpointError(f"{directory}: no checkpoint (no latest.json, no trainer_state.json)")
    state = read_trainer_state(ckpt)
    tensors = read_safetensors_file(ckpt / "model.safetensors")
    for alias, name in state["aliases"].items():
        if name not in tensors:
            raise CheckpointError(f"{ckpt / 'trainer_state.json'}: alias '{alias}' names '{name}', which "
                                  f"model.safetensors does not hold")
        tensors[alias] = tensors[name]
    opt_sd = None
    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"{ckpt}: no optimizer state saved")
        where = str(ckpt / "optimizer.safetensors")
        opt_tensors = read_safetensors_file(ckpt / "optimizer.safetensors")
        _check_optimizer_meta(state["optimizer"], opt_tensors, where)
        opt_sd = optimizer_from_files(opt_tensors, state["optimizer"], optimizer, where)
        try:  # a throwaway optimizer over clones proves load_state_dict will accept it
            groups = [{**{k: v for k, v in g.items() if k != "params"},
                       "params": [torch.nn.Parameter(torch.empty_like(p, device="meta")) for p in g["params"]]}
                      for g in optimizer.param_groups]
            torch.optim.Optimizer(groups, dict(optimizer.defaults)).load_state_dict(opt_sd)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{where}: the optimizer state does not fit ({type(e).__name__}: {e})") from None
    rng_tensors = None
    if restore_rng:
        rng_tensors = read_safetensors_file(ckpt / "rng.safetensors")
        _check_rng(rng_tensors, state.get("rng"), str(ckpt / "rng.safetensors"))
    if scaler is not None and scaler.is_enabled() and "scaler" in state:
        try:
            type(scaler)(scaler._device, enabled=True).load_state_dict(state["scaler"])
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{ckpt / 'trainer_state.json'}: unusable 'scaler' ({type(e).__name__}: {e})") \
                from None
    load_state_dict_strict(unwrap(model), tensors, source=str(ckpt / "model.safetensors"),
                           allow_nonfinite=allow_nonfinite)
    if opt_sd is not None:
        optimizer.load_state_dict(opt_sd)
    if scaler is not None and scaler.is_enabled() and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        set_rng_state(rng_tensors, state["rng"])
    return {"step": state["step"], "extra": state.get("extra", {}), "path": str(ckpt)}
