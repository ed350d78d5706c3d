"""FSDP (ZeRO-3, torch FSDP2): 2 gloo processes on CPU give the same losses and weights as one process taking
the same global batch, while each rank holds half the parameters, gradients and AdamW states."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from minillm.data.sft import CausalLMCollator
from minillm.hub import save_safetensors
from minillm.models.gpt2 import GPT2LMHeadModel
from minillm.train.fsdp import fsdp_available, local_numel, local_state_bytes, shard_model
from minillm.train.loop import TrainConfig, causal_lm_loss, make_optimizer, setup_distributed, to_device, train, \
    train_step
from test_ddp import NO_DROPOUT, data, free_port

pytestmark = [pytest.mark.usefixtures("one_thread"),  # tests/conftest.py
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available() or not fsdp_available(),
                                 reason="needs torch.distributed gloo and FSDP2 (fully_shard)")]


def config(batch_size, out_dir=None, fsdp=False):
    return TrainConfig(lr=1e-3, eps=1e-6, weight_decay=0.1, batch_size=batch_size, max_steps=3, seed=5,
                       out_dir=out_dir, quiet=True, log_every=1, grad_accum=2, fsdp=fsdp)


def memory_on_this_rank() -> dict:
    """Parameters, gradients and AdamW states held by this rank after one step (world 1: the plain model)."""
    model = GPT2LMHeadModel.from_pretrained("tiny-gpt2", **NO_DROPOUT)
    full = sum(p.numel() for p in model.parameters())
    twin = shard_model(model) if dist.is_initialized() else model
    opt = make_optimizer(twin, TrainConfig())
    batch = to_device(CausalLMCollator(0)(data()[:2]), torch.device("cpu"))
    train_step(twin, opt, [batch], causal_lm_loss)
    for p in twin.parameters():  # train_step zeroes the grads; keep one set to count them
        p.grad = torch.zeros_like(p)
    return {"full_numel": full, "local_numel": local_numel(twin), **local_state_bytes(twin, opt)}


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    r, w = setup_distributed()
    assert (r, w) == (rank, world) and dist.get_backend() == "gloo"
    model = GPT2LMHeadModel.from_pretrained("tiny-gpt2", **NO_DROPOUT)
    res = train(model, data(), CausalLMCollator(0), causal_lm_loss,
                config(2, out_dir=os.path.join(out, "run"), fsdp=True))
    # after training every rank holds the plain full model again (gathered from the shards)
    assert all(not hasattr(p, "to_local") for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight  # tying survives
    mem = memory_on_this_rank()
    with open(os.path.join(out, f"mem{rank}.json"), "w") as f:
        json.dump(mem, f)
    if rank == 0:
        save_safetensors({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"},
                         os.path.join(out, "fsdp.safetensors"))
        save_safetensors({"losses": torch.tensor(res.losses, dtype=torch.float64)},
                         os.path.join(out, "losses.safetensors"))
    dist.destroy_process_group()


def test_two_fsdp_processes_equal_one_process_and_halve_the_state(tmp_path):
    try:
        mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    except mp.ProcessRaisedException as e:
        if "gloo" in str(e).lower() and "not supported" in str(e).lower():
            pytest.skip(f"FSDP2 collectives unavailable on gloo here: {str(e).splitlines()[-1]}")
        raise
    losses = load_file(str(tmp_path / "losses.safetensors"))["losses"].tolist()
    sharded = load_file(str(tmp_path / "fsdp.safetensors"))
    single = GPT2LMHeadModel.from_pretrained("tiny-gpt2", **NO_DROPOUT)
    res = train(single, data(), CausalLMCollator(0), causal_lm_loss, config(4))  # 2 ranks x 2 examples = 4
    assert len(losses) == 3
    assert losses == pytest.approx(res.losses, abs=1e-5)
    start = GPT2LMHeadModel.from_pretrained("tiny-gpt2").state_dict()
    moved = 0.0
    for k, v in sharded.items():
        assert float((v - single.state_dict()[k]).abs().max()) < 1e-5, k
        moved = max(moved, float((v - start[k]).abs().max()))
    assert moved > 1e-3  # it trained
    # the loop saved no optimizer checkpoint under FSDP, but rank 0 logged
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 3
    # memory per rank: each holds half of every parameter (dim 0 split in two, padded when odd)
    mem = [json.loads((tmp_path / f"mem{r}.json").read_text()) for r in range(2)]
    full = mem[0]["full_numel"]
    assert sum(m["local_numel"] for m in mem) == full
    for m in mem:
        assert abs(m["local_numel"] - full / 2) <= 0.01 * full, (m["local_numel"], full)
        assert m["optimizer"] == 2 * m["params"] and m["grads"] == m["params"]  # AdamW: two fp32 moments
        assert m["params"] + m["grads"] + m["optimizer"] <= 0.51 * 16 * full  # vs 16 B/param on one process


def test_fsdp_refuses_mid_run_checkpoints_before_training(tmp_path):
    from minillm.train.fsdp import check_fsdp_config
    with pytest.raises(ValueError, match="--save-every"):
        check_fsdp_config(TrainConfig(fsdp=True, save_every=5))
    with pytest.raises(ValueError, match="--resume"):
        check_fsdp_config(TrainConfig(fsdp=True, resume=True))
    check_fsdp_config(TrainConfig(fsdp=True))  # plain FSDP training is fine
