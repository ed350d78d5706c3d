"""Checkpoints: exact round trip, bit-exact resume on CPU, and nothing lost when killed (SIGKILL) mid-write."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minillm.hub import CheckpointError
from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
from minillm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from minillm.data.sft import IGNORE, CausalLMCollator
from minillm.train.loop import TrainConfig, causal_lm_loss, make_optimizer, train


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


ROOT = Path(__file__).resolve().parent.parent
collate = CausalLMCollator(pad_id=0)


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(4, 24, (1,), generator=g))
        ids = torch.randint(1, 512, (L,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * (L // 4) + ids[L // 4:]})
    return out


def config(out_dir, **kw):
    # dropout stays ON (0.1 in tiny-gpt2): resuming must restore the RNG to reproduce the masks
    base = dict(lr=3e-3, batch_size=4, grad_accum=2, max_steps=6, warmup_steps=2, schedule="cosine",
                out_dir=str(out_dir), quiet=True, seed=1)
    return TrainConfig(**{**base, **kw})


def model():
    torch.manual_seed(0)
    return GPT2LMHeadModel.from_pretrained("tiny-gpt2")


def state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_round_trip_is_exact(tmp_path):
    m = model()
    opt = make_optimizer(m, TrainConfig())
    b = collate(data(4))
    causal_lm_loss(m, b)[0].backward()
    opt.step()
    torch.manual_seed(123)
    save_checkpoint(tmp_path, m, opt, step=7, extra={"note": "hi"})
    expected_draw = torch.rand(3)
    m2 = GPT2LMHeadModel.from_pretrained("tiny-gpt2")
    opt2 = make_optimizer(m2, TrainConfig())
    torch.manual_seed(999)
    st = load_checkpoint(tmp_path, m2, opt2)
    assert st["step"] == 7 and st["extra"] == {"note": "hi"}
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m.state_dict().items())
    assert m2.lm_head.weight is m2.transformer.wte.weight  # tying survives (stored once, aliased)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k])
    # no pickle anywhere
    files = {p.name for p in (tmp_path / "step-000007").iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"}


def test_wrong_model_is_refused_untouched(tmp_path):
    m = model()
    save_checkpoint(tmp_path, m, step=1)
    other = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    before = state(other)
    with pytest.raises(CheckpointError, match="wpe"):
        load_checkpoint(tmp_path, other)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run: its losses and final weights."""
    full = model()
    ref = train(full, data(), collate, causal_lm_loss, config(tmp_path_factory.mktemp("ref")))
    return ref.losses, state(full)


class Interrupt(Exception):
    pass


def interrupted_loss(after_calls):
    calls = {"n": 0}

    def fn(model, batch):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Interrupt()
        return causal_lm_loss(model, batch)
    return fn


def test_resume_reproduces_losses_bit_for_bit(tmp_path, reference_run):
    ref_losses, ref_state = reference_run
    m = model()
    with pytest.raises(Interrupt):  # killed during step 4 (after the step-3 checkpoint)
        train(m, data(), collate, interrupted_loss(3 * 2 + 1), config(tmp_path / "b", save_every=3))
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-000003"
    m2 = model()
    torch.manual_seed(4321)  # a different global RNG: resume must restore the saved one
    res = train(m2, data(), collate, causal_lm_loss, config(tmp_path / "b", resume=True))
    assert res.losses == ref_losses[3:]  # exact float equality
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in ref_state.items())


def test_resume_with_different_batching_is_refused(tmp_path):
    m = model()
    train(m, data(8), collate, causal_lm_loss, config(tmp_path, max_steps=1))
    with pytest.raises(CheckpointError, match="batch_size"):
        cfg = config(tmp_path, resume=True)
        cfg.batch_size = 2
        train(model(), data(8), collate, causal_lm_loss, cfg)


CHILD = r"""
import sys, time, os
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)  # the same thread count as the parent's runs: identical float reductions
import minillm.train.checkpoint as ck
import test_checkpoint as T
marker, phase = Path({marker!r}), {phase!r}
real_save, real_json = ck.save_safetensors, ck.save_json
def pause():
    marker.write_text("paused")
    time.sleep(120)
def torn_save(tensors, path, metadata=None):
    if "step-000004" in str(path) and path.name == "optimizer.safetensors" and phase == "tensors":
        real_save(tensors, str(path) + ".full")
        data = Path(str(path) + ".full").read_bytes()
        os.unlink(str(path) + ".full")
        with open(path, "wb") as f:   # half a file, as if killed inside the write
            f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
        pause()
    return real_save(tensors, path, metadata)
def slow_json(obj, path):
    if Path(path).name == "latest.json" and obj.get("name") == "step-000004" and phase == "pointer":
        pause()  # the new checkpoint folder is complete and renamed; the pointer not yet moved
    return real_json(obj, path)
ck.save_safetensors, ck.save_json = torn_save, slow_json
T.train(T.model(), T.data(), T.collate, T.causal_lm_loss, T.config({out!r}, save_every=2))
"""


@pytest.mark.parametrize("phase", ["tensors", "pointer"])
def test_sigkill_while_writing_keeps_previous_checkpoint(tmp_path, phase, reference_run):
    out, marker = tmp_path / "run", tmp_path / "marker"
    code = CHILD.format(tests=str(ROOT / "tests"), marker=str(marker), phase=phase, out=str(out))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    t0 = time.time()
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read().decode()[-2000:]}")
        if time.time() - t0 > 240:
            proc.kill()
            raise AssertionError("child never reached the checkpoint write")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpts = out / "checkpoints"
    # the previous checkpoint is what latest.json names, and it loads
    assert json.loads((ckpts / "latest.json").read_text()) == {"name": "step-000002"}
    assert latest_checkpoint(ckpts).name == "step-000002"
    if phase == "tensors":
        assert any(p.name.startswith(".step-000004.tmp") for p in ckpts.iterdir())  # the torn write, hidden
    else:
        assert (ckpts / "step-000004").is_dir()  # complete but not yet pointed to
    probe = model()
    assert load_checkpoint(ckpts, probe, make_optimizer(probe, TrainConfig()))["step"] == 2
    # resuming from it reproduces the uninterrupted run's losses exactly
    res = train(model(), data(), collate, causal_lm_loss, config(out, resume=True))
    assert res.losses == reference_run[0][2:]
    assert not any(p.name.startswith(".step-") for p in ckpts.iterdir())  # stale temp folders cleaned
