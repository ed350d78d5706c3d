"""One training loop for every fine-tune in minillm (SFT, classification, reward model, VQA).

A plain loop you can step through. Each optimizer step takes `grad_accum` micro-batches; for
each, `loss_fn(model, batch)` returns the SUM of the per-token (per-example, per-pair) losses
and the number N of real tokens it summed over; the gradients of the sums are accumulated and
divided once by the total count, so the update is that of the mean over every real token of
the whole accumulated (and, under DDP, global) batch:

    g = ∇ (Σ_micro-batches Σ_tokens ℓ) / Σ_micro-batches N

k micro-batches with accumulation therefore give the same update as one batch k times larger
(dividing each micro-batch by its own count, or by k, would weight short batches wrongly).
Then: unscale (fp16) → clip ‖g‖₂ to max_grad_norm → AdamW with the scheduled learning rate
(warmup, then linear or cosine decay: schedule.py). Weight decay goes on matrices only
(ndim ≥ 2: linear weights and embeddings, as nanoGPT and transformers' Trainer do) — never on
biases or LayerNorm gains, which set scale and offset rather than capacity. A batch with
N = 0 (every label masked) is no update at all: the loss is reported as 0 and AdamW is not
stepped (its weight decay and moments would otherwise move the weights).

Interface (everything else in minillm calls this):

    result = train(model, dataset, collate, loss_fn, TrainConfig(...), eval_fn=None, lengths=None)

    dataset  a sequence of examples (len + indexing); collate(list_of_examples) -> dict of tensors
    loss_fn  (model, batch) -> (loss_sum: scalar tensor, n: int or tensor); `causal_lm_loss`, `seq2seq_loss` below
    eval_fn  (model) -> dict of floats, run every eval_every steps and at the end (no_grad, eval mode)
    lengths  per-example lengths, for length-grouped batching (config.group_by_length)
    result   TrainResult: per-step losses, eval rows, tokens, seconds

Mixed precision is torch.autocast (bf16, or fp16 with a GradScaler); the device is cuda → mps →
cpu unless given. Under `torchrun --nproc_per_node N` (or any initialized process group) the
model is wrapped in DistributedDataParallel, each process reads its DistributedSampler shard,
counts are all-reduced so the normalization above is global, and only rank 0 logs and saves.
Progress goes to stderr as one line per log_every steps; metrics to <out_dir>/metrics.jsonl;
checkpoints to <out_dir>/checkpoints (checkpoint.py), and `resume` continues from them bit for bit
(the data order and schedule are functions of the step; the loop seeds torch's global generator
with seed + rank at the start of a fresh run). A NaN/Inf loss stops the run with a message
before the weights are touched.

Sources: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (AdamW, 2019); Micikevicius
et al., "Mixed Precision Training" (2018); Li et al., "PyTorch Distributed" (DDP, 2020); the
book, ch. 10 (gradient accumulation, dynamic padding, mixed precision).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from minillm.configs import validate_config
from minillm.data.batching import length_grouped
from minillm.hub import CheckpointError
from minillm.losses import lm_loss_sum, token_loss_sum
from minillm.train.checkpoint import (directory_lock, latest_checkpoint, load_checkpoint, read_trainer_state,
                                      save_checkpoint)
from minillm.train.device import pick_device
from minillm.train.runlog import RunLog, format_eta
from minillm.train.schedule import SCHEDULES, lr_factor

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Settings that fix the data order and the meaning of a step; a resumed run must keep them. (epochs and
# max_steps may change — to train longer — but then the schedule follows the new total.)
ORDER_KEYS = ("batch_size", "grad_accum", "seed", "shuffle", "group_by_length")


@dataclass
class TrainConfig:
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "linear"            # linear | cosine | constant (after warmup)
    epochs: int = 1
    max_steps: Optional[int] = None     # overrides epochs when given
    batch_size: int = 8                 # examples per micro-batch, per process
    grad_accum: int = 1                 # micro-batches per optimizer step
    max_grad_norm: Optional[float] = 1.0
    precision: str = "fp32"             # fp32 | bf16 | fp16
    shuffle: bool = True
    group_by_length: bool = False
    eval_every: int = 0                 # 0: evaluate at the end only
    log_every: int = 10
    save_every: int = 0                 # 0: save at the end only (when out_dir is set)
    keep_checkpoints: int = 1
    out_dir: Optional[str] = None
    seed: int = 0
    device: Optional[str] = None
    resume: Any = False                 # False | True (out_dir/checkpoints if there is one) | a path
    quiet: bool = False
    fsdp: bool = False                  # under torchrun: shard params, grads, AdamW states (fsdp.py) instead of DDP

    def __post_init__(self):
        # types and ranges of every field (ints real ints >= 1 unless listed, floats finite, bools bools)
        validate_config(self, error=ValueError, zero_ok=("warmup_steps", "eval_every", "save_every",
                                                         "keep_checkpoints", "seed"),
                        ranges={"lr": (0.0, math.inf, False), "weight_decay": (0.0, math.inf, True),
                                "max_grad_norm": (0.0, math.inf, False)})
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"config: betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("batch_size", "grad_accum", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)   # one per optimizer step run here (token-weighted mean)
    evals: list[dict] = field(default_factory=list)
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the run stopped before updating the weights."""


# ---- the loss_fn for causal LMs ----
def causal_lm_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """loss_fn for causal LMs: batch has input_ids, attention_mask, labels (-100 = no loss)."""
    mask = batch.get("attention_mask")
    if mask is not None and bool(mask.all()):
        mask = None  # fast path: no padding, the fused kernel's own causal mask (same logits)
    logits = model(batch["input_ids"], attention_mask=mask)  # (B, T, V)
    return lm_loss_sum(logits, batch["labels"])


def seq2seq_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """loss_fn for encoder-decoders (T5): batch from data/seq2seq.Seq2SeqCollator. The decoder reads
    decoder_input_ids = labels shifted right, so its logits at t are scored against labels at t —
    plain cross-entropy, WITHOUT the causal LM's next-token shift (token_loss_sum)."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=batch["decoder_input_ids"],
                   decoder_attention_mask=batch.get("decoder_attention_mask"))  # (B, T_dec, V)
    return token_loss_sum(logits, batch["labels"])


# ---- pieces of the loop ----
def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...): NCCL on GPUs,
    gloo on CPU. A no-op when not launched by torchrun. Returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist_info()


def teardown_distributed() -> None:
    """Leave the process group (end of a torchrun job)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices (ndim >= 2), none on biases and norm weights."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # tied weights appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_tokens(batch: dict) -> int:
    """Input tokens in a batch, for tokens/s: real (unpadded) tokens when there is a mask."""
    if isinstance(batch, dict):
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return batch["input_ids"].numel()
    return 0


def epoch_batches(n: int, epoch: int, cfg: TrainConfig, rank: int = 0, world: int = 1,
                  lengths: Optional[Sequence[int]] = None) -> list[list[int]]:
    """This process's micro-batches (lists of example indices) for one epoch.

    The order is DistributedSampler's (a seeded permutation per epoch, shard i::world) — a pure
    function of (seed, epoch), so a resumed run sees the same batches."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=cfg.shuffle, seed=cfg.seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    if cfg.group_by_length and lengths is not None:
        order = length_grouped(order, lengths, cfg.batch_size)
    return [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]


def accumulate_gradients(model, batches: Sequence[dict], loss_fn: Callable, scaler=None,
                         amp_dtype: Optional[torch.dtype] = None) -> tuple[float, float, int]:
    """Forward + backward over micro-batches; leave ∇(Σ loss_sum)/ΣN (× loss scale) in .grad.

    Returns (global loss sum, global count N, local input tokens). Under DDP, gradients are
    all-reduced on the last micro-batch only (no_sync before) and DDP's averaging over W
    processes is undone by multiplying by W, so .grad holds the global token mean's gradient."""
    rank, world = dist_info()
    device_type = next(model.parameters()).device.type
    loss_sum = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if (last or world == 1) else model.no_sync()
        with sync:
            with torch.autocast(device_type=device_type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                loss, n = loss_fn(model, batch)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach().double().cpu()
        count += torch.as_tensor(n).double().cpu()
        tokens += batch_tokens(batch)
    totals = torch.stack([loss_sum, count])
    if world > 1:
        dist.all_reduce(totals)
    loss_sum, count = float(totals[0]), float(totals[1])
    if count > 0 and math.isfinite(loss_sum):
        factor = world / count
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
    return loss_sum, count, tokens


def train_step(model, optimizer: torch.optim.Optimizer, batches: Sequence[dict], loss_fn: Callable, scaler=None,
               amp_dtype: Optional[torch.dtype] = None, max_grad_norm: Optional[float] = None
               ) -> tuple[float, float, int, float]:
    """One optimizer step over accumulated micro-batches: gradients → unscale (fp16) → clip → AdamW.

    Skips the update when no token carries a label (count 0). Raises NonFiniteLossError, with
    the weights untouched, on a NaN/Inf loss. Returns (loss sum, count, tokens, grad norm)."""
    loss_sum, count, tokens = accumulate_gradients(model, batches, loss_fn, scaler, amp_dtype)
    if not math.isfinite(loss_sum):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"the loss is {loss_sum}")
    grad_norm = float("nan")
    if count > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        if max_grad_norm is not None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        if scaler is not None:
            scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
            scaler.update()
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, count, tokens, grad_norm


@torch.no_grad()
def evaluate(model, dataset: Sequence, collate: Callable, loss_fn: Callable, batch_size: int = 8,
             precision: str = "fp32") -> dict[str, float]:
    """Token-weighted mean loss over a dataset (eval mode, no grad)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for i in range(0, len(dataset), batch_size):
        batch = to_device(collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))]), device)
        with torch.autocast(device_type=device.type, dtype=PRECISIONS[precision] or torch.float32,
                            enabled=PRECISIONS[precision] is not None):
            loss, n = loss_fn(model, batch)
        total += float(loss)
        count += float(n)
    model.train(was_training)
    return {"loss": total / count if count else float("nan")}


# ---- the loop ----
def train(model: torch.nn.Module, dataset: Sequence, collate: Callable[[list], dict], loss_fn: Callable,
          config: TrainConfig, eval_fn: Optional[Callable[[torch.nn.Module], dict]] = None,
          lengths: Optional[Sequence[int]] = None, log: Optional[RunLog] = None, phase: str = "train",
          fingerprint: Optional[dict] = None) -> TrainResult:
    """Train `model` in place (see the module docstring). Returns the per-step losses and evals.

    log: a RunLog to report to (a demo's own); by default the loop opens <out_dir>/metrics.jsonl and prints to
    stderr. A dataset with a `set_epoch(epoch)` method is told each epoch before its batches are drawn (e.g. to
    draw fresh synthetic examples). fingerprint: what defines the job beyond this config (model name, a hash of
    the data file, max_length, the adapter config, ...), JSON values; saved in each checkpoint, and a resume
    with any of them changed is refused, naming them. With out_dir, rank 0 holds <out_dir>/.lock for the run
    (a second writer to the same directory is refused at once; a read-only out_dir fails before training)."""
    if config.out_dir and dist_info()[0] == 0:
        with directory_lock(config.out_dir):
            return _train(model, dataset, collate, loss_fn, config, eval_fn, lengths, log, phase, fingerprint)
    return _train(model, dataset, collate, loss_fn, config, eval_fn, lengths, log, phase, fingerprint)


def _train(model, dataset, collate, loss_fn, config: TrainConfig, eval_fn, lengths, log, phase,
           fingerprint: Optional[dict]) -> TrainResult:
    cfg = config
    fingerprint = json.loads(json.dumps(fingerprint or {}))  # as it will read back from the checkpoint
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty: nothing to train on")
    rank, world = dist_info()
    device = pick_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    model.to(device)
    model.train()
    wrapped = model
    fsdp = cfg.fsdp and world > 1
    if fsdp:  # ZeRO-3: a sharded twin trains; gather_full_model puts the weights back into `model` at the end
        from minillm.train.fsdp import check_fsdp_config, shard_model
        check_fsdp_config(cfg, eval_fn)
        wrapped = shard_model(model)
    elif world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(wrapped, cfg)
    amp_dtype = PRECISIONS[cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    micro_per_epoch = len(epoch_batches(len(dataset), 0, cfg, rank, world))
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    out = Path(cfg.out_dir) if cfg.out_dir else None
    ckpt_dir = out / "checkpoints" if out else None

    step = 0
    torch.manual_seed(cfg.seed + rank)  # dropout; a resumed run restores the saved generator states
    if cfg.resume:
        where = ckpt_dir if cfg.resume is True else Path(cfg.resume)
        if where is None:
            raise ValueError("resume=True needs out_dir (or pass the checkpoint path as resume)")
        if cfg.resume is not True or latest_checkpoint(where) is not None:
            ckpt = latest_checkpoint(where)
            if ckpt is None:
                raise CheckpointError(f"{where}: no checkpoint to resume from (no latest.json, no trainer_state.json)")
            extra = read_trainer_state(ckpt)["extra"]  # checked before the model is touched
            saved = extra.get("config", {}) if isinstance(extra.get("config"), dict) else {}
            changed = [k for k in ORDER_KEYS if k in saved and saved[k] != getattr(cfg, k)]
            if extra.get("world_size", world) != world:
                changed.append("world_size")
            if changed:
                raise CheckpointError(f"{ckpt}: cannot resume with different {changed} (they fix the "
                                      f"data order); saved: {[saved.get(k) for k in changed]}")
            old = extra.get("fingerprint") if isinstance(extra.get("fingerprint"), dict) else None
            if old is not None:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                if diff:
                    shown = "; ".join(f"{k}: saved {old.get(k)!r}, now {fingerprint.get(k)!r}" for k in diff[:4])
                    raise CheckpointError(f"{ckpt}: cannot resume: {', '.join(diff)} changed (they change the data, "
                                          f"the model or the loss)\n{shown}")
            state = load_checkpoint(ckpt, model, optimizer, scaler)
            step = state["step"]
            if rank == 0 and not cfg.quiet:
                print(f"[train] resumed from {state['path']} at step {step}", file=sys.stderr, flush=True)

    own_log = log is None
    if own_log:
        path = out / "metrics.jsonl" if out is not None and rank == 0 else None
        log = RunLog(path, quiet=cfg.quiet or rank != 0, stream=sys.stderr, append=True)

    def run_eval() -> None:
        if eval_fn is None:
            return
        if rank == 0:
            model.eval()
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                                                 enabled=amp_dtype is not None):
                metrics = eval_fn(model)
            model.train()
            row = {"step": step, **{f"eval_{k}": v for k, v in metrics.items()}}
            result.evals.append(row)
            log("eval", " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                **row)
        if world > 1:
            dist.barrier()

    def save() -> None:
        if ckpt_dir is None or fsdp:  # the optimizer state is in shards (fsdp.py): the job saves the model
            return
        if rank == 0:
            save_checkpoint(ckpt_dir, model, optimizer, scaler, step=step, keep=cfg.keep_checkpoints,
                            extra={"config": dataclasses.asdict(cfg), "world_size": world,
                                   "fingerprint": fingerprint})
        if world > 1:
            dist.barrier()

    result = TrainResult(step=step)
    t0, start_step, tokens_seen = time.perf_counter(), step, 0
    while step < total_steps:
        epoch, k = divmod(step, steps_per_epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        micro = epoch_batches(len(dataset), epoch, cfg, rank, world, lengths)
        groups = [micro[i:i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]
        for group in groups[k:]:
            if step >= total_steps:
                break
            lr = cfg.lr * lr_factor(step, cfg.warmup_steps, total_steps, cfg.schedule)
            for g in optimizer.param_groups:
                g["lr"] = lr
            batches = [to_device(collate([dataset[j] for j in idx]), device) for idx in group]
            try:
                loss_sum, count, tokens, grad_norm = train_step(wrapped, optimizer, batches, loss_fn, scaler,
                                                                amp_dtype, cfg.max_grad_norm)
            except NonFiniteLossError as e:
                raise NonFiniteLossError(
                    f"step {step} (epoch {epoch}): {e} — stopping before updating the weights. Lower the learning "
                    f"rate (now {lr:.3g}), use bf16 or fp32 instead of fp16, or check the data for NaN/Inf "
                    f"inputs.") from None
            loss = loss_sum / count if count > 0 else 0.0  # an all-masked step: no update, loss 0
            step += 1
            tokens_seen += tokens * world
            result.losses.append(loss)
            result.step, result.tokens = step, tokens_seen
            if rank == 0 and (step % cfg.log_every == 0 or step == total_steps or step == start_step + 1):
                elapsed = time.perf_counter() - t0
                tps = tokens_seen / max(elapsed, 1e-9)
                eta = elapsed / (step - start_step) * (total_steps - step)
                log(phase, f"step {step}/{total_steps} | epoch {epoch} | loss {loss:.4f} | lr {lr:.2e} | "
                           f"{tps:,.0f} tok/s | ETA {format_eta(eta)}",
                    step=step, epoch=epoch, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens_seen,
                    tokens_per_s=tps, count=count)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                run_eval()
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save()
    result.seconds = time.perf_counter() - t0
    if fsdp:
        from minillm.train.fsdp import gather_full_model
        gather_full_model(model, wrapped)
    run_eval()
    save()
    if own_log:
        log.close()
    return result
