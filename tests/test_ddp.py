"""DistributedDataParallel: 2 gloo processes on CPU end with the same weights as one process
taking the same global batch (the loop normalizes by the global real-token count)."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from minillm.hub import save_safetensors
from minillm.models.gpt2 import GPT2LMHeadModel
from minillm.data.sft import IGNORE, CausalLMCollator
from minillm.train.loop import TrainConfig, causal_lm_loss, setup_distributed, train


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def data(n=16):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        L = int(torch.randint(4, 24, (1,), generator=g))
        ids = torch.randint(1, 512, (L,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * (L // 3) + ids[L // 3:]})
    return out


def grad_norms(out_dir):
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    return [r["grad_norm"] for r in rows if "grad_norm" in r]


def config(batch_size, out_dir=None):
    # eps=1e-6: see test_loop.test_accumulation_equals_one_large_batch (zero-gradient key biases carry fp noise)
    return TrainConfig(lr=1e-3, eps=1e-6, weight_decay=0.1, batch_size=batch_size, max_steps=3, seed=5,
                       out_dir=out_dir, quiet=True, log_every=1)


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    r, w = setup_distributed()  # the torchrun path: env:// rendezvous, gloo on CPU
    assert (r, w) == (rank, world) and dist.get_backend() == "gloo"
    model = GPT2LMHeadModel.from_pretrained("tiny-gpt2", **NO_DROPOUT)
    res = train(model, data(), CausalLMCollator(0), causal_lm_loss, config(2, out_dir=os.path.join(out, "run")))
    if rank == 0:
        save_safetensors({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"},
                         os.path.join(out, "ddp.safetensors"))
        save_safetensors({"losses": torch.tensor(res.losses, dtype=torch.float64)}, os.path.join(out, "losses.safetensors"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_gloo_processes_equal_one_process_with_the_global_batch(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ddp = load_file(str(tmp_path / "ddp.safetensors"))
    ddp_losses = load_file(str(tmp_path / "losses.safetensors"))["losses"].tolist()
    single = GPT2LMHeadModel.from_pretrained("tiny-gpt2", **NO_DROPOUT)
    res = train(single, data(), CausalLMCollator(0), causal_lm_loss,
                config(4, out_dir=str(tmp_path / "single")))  # 2 processes x 2 examples = 4
    start = GPT2LMHeadModel.from_pretrained("tiny-gpt2").state_dict()
    moved = 0.0
    for k, v in ddp.items():
        diff = float((v - single.state_dict()[k]).abs().max())
        assert diff < 1e-6, (k, diff)  # fp32; only the all-reduce summation order differs
        moved = max(moved, float((v - start[k]).abs().max()))
    assert moved > 1e-3  # the weights really trained
    assert ddp_losses == pytest.approx(res.losses, rel=1e-6)  # rank 0 logs the global token-mean loss
    # Adam hides a wrong gradient scale in the weights; the pre-clip gradient norm does not
    assert grad_norms(tmp_path / "run") == pytest.approx(grad_norms(tmp_path / "single"), rel=1e-5)
    # rank 0 alone wrote the checkpoint and the metrics
    assert (tmp_path / "run" / "checkpoints" / "latest.json").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 2
