"""Fully sharded data parallelism (ZeRO-3) on torch's own engine: each of W processes keeps 1/W of the model.

Data parallelism copies the whole training state to every process. Per parameter, AdamW in fp32 keeps
4 bytes of weight + 4 of gradient + 8 of moments = 16 bytes, so N parameters cost 16·N bytes on EVERY
rank under DDP. ZeRO (Rajbhandari et al. 2020) removes the redundancy in three stages:

    stage 1  shard the optimizer states      per rank: 4N + 4N + 8N/W
    stage 2  + shard the gradients            per rank: 4N + (4N + 8N)/W     (reduce-scatter, not all-reduce)
    stage 3  + shard the parameters           per rank: 16N/W                (all-gather a layer just in time)

Stage 3 is FSDP. Each parameter is cut into W equal flat pieces (dim 0, padded); rank r owns piece r of the
weight, of its gradient and of its Adam moments. For each block the forward all-gathers the full weights,
computes, and frees them again; the backward all-gathers again, computes the gradient and reduce-scatters
it, so each rank ends with the gradient of its own piece (summed over ranks, then averaged, as DDP's
all-reduce). AdamW then updates each piece where it lives: elementwise maths needs no communication. The
price is one more all-gather per step than DDP (≈1.5× its traffic); only one block is ever whole at once,
so activations plus the largest gathered block are the rest of the memory.

Here torch's FSDP2 (`torch.distributed.fsdp.fully_shard`) does the sharding, one unit per block of the
model (each element of an nn.ModuleList: GPT-2's transformer.h, Llama's layers) and one for the rest
(embeddings, final norm, tied head). minillm's loop (loop.train with TrainConfig(fsdp=True), under
torchrun) calls `shard_model` where it would wrap in DDP. The model handed to train() keeps its
structure: training runs on a sharded twin that shares the same modules' code, the caller's parameters
are emptied meanwhile (their memory is what sharding frees) and, at the end, `gather_full_model` all-gathers
the full state dict (torch's full-state-dict API, every rank) back into them — so save_pretrained, LoRA
merging and evaluation see a plain model afterwards. Mid-run checkpoints (--save-every, --resume) and
mid-run evaluation are refused under FSDP: the optimizer state lives in shards (left for a later change).

Sources: Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models" (2020);
Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel" (2023); torch's FSDP2
documentation (fully_shard, per-parameter sharding on DTensor).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn


def fsdp_available() -> bool:
    """torch's FSDP2 (fully_shard) is importable."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def check_fsdp_config(cfg, eval_fn=None) -> None:
    """What FSDP does not do here yet, refused before anything starts."""
    if not fsdp_available():
        raise RuntimeError(f"--fsdp needs torch.distributed.fsdp.fully_shard (FSDP2); torch {torch.__version__} "
                           f"lacks it")
    refused = [name for name, on in (("--save-every", cfg.save_every), ("--resume", cfg.resume),
                                     ("--eval-every", cfg.eval_every and eval_fn is not None)) if on]
    if refused:
        raise ValueError(f"--fsdp: {', '.join(refused)} not supported (mid-run checkpoints and evaluation need the "
                         f"sharded optimizer state gathered; the final model is saved and evaluated)")


def units(model: nn.Module) -> list[nn.Module]:
    """The sharding units: every element of every nn.ModuleList (the transformer blocks)."""
    return [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]


def shard_model(model: nn.Module) -> nn.Module:
    """A sharded twin of `model` (same modules, parameters as 1/W DTensor pieces); `model`'s own parameters are
    emptied until gather_full_model puts the trained weights back. Call inside an initialized process group,
    after moving the model to its device."""
    from torch.distributed.fsdp import fully_shard
    # The twin shares the tensors (no copy); fully_shard then keeps only this rank's piece of each.
    memo = {id(t): (nn.Parameter(t.detach(), requires_grad=t.requires_grad) if isinstance(t, nn.Parameter)
                    else t) for t in list(model.parameters()) + list(model.buffers())}
    twin = copy.deepcopy(model, memo)
    for block in units(twin):
        fully_shard(block)
    fully_shard(twin)
    for p in model.parameters():  # the full copies go; what each rank keeps is its shard in `twin`
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    @contextlib.contextmanager
    def no_sync():  # DDP's name for "accumulate locally, reduce on the last micro-batch"
        twin.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            twin.set_requires_gradient_sync(True)

    twin.no_sync = no_sync
    return twin


def gather_full_model(model: nn.Module, twin: nn.Module) -> None:
    """All-gather the twin's full state dict (a collective: every rank calls it) into `model`'s parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(twin, options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=True):  # a tied weight is filled once
            p.data = full[name].detach().to(p.device).clone()


def local_numel(module: nn.Module) -> int:
    """Numbers of parameters this rank holds (its shards under FSDP; everything otherwise)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in module.parameters())


def local_state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds (local shards of DTensors)."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t
    params = sum(local(p).numel() * p.element_size() for p in module.parameters())
    grads = sum(local(p.grad).numel() * p.grad.element_size() for p in module.parameters() if p.grad is not None)
    opt = sum(local(v).numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
              if torch.is_tensor(v) and v.dim() > 0)
    return {"params": params, "grads": grads, "optimizer": opt}
