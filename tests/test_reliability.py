"""Promises kept under bad input and faults: a failure injected at every write/rename step of a checkpoint save
loses nothing; one writer per directory; non-finite weights never saved; keep-N by step number; files honour
the umask; a resume that changes the data, model or loss is refused by name; seeded runs repeat exactly; the
CLI answers bad input in one or two lines with exit 2 and runtime failures with exit 1."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm import hub
from minillm.cli import main
from minillm.data.readers import DataError
from minillm.data.sft import IGNORE, CausalLMCollator, prompt_and_completion
from minillm.models.gpt2 import GPT2LMHeadModel
from minillm.rlhf.dpo import dpo_loss
from minillm.tokenizer import Tokenizer
from minillm.train import checkpoint as ck
from minillm.train.checkpoint import LockedError, latest_checkpoint, load_checkpoint, save_checkpoint
from minillm.train.loop import TrainConfig, causal_lm_loss, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def model(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel.from_pretrained("tiny-gpt2")


def trained(seed=0):
    m = model(seed)
    opt = make_optimizer(m, TrainConfig(lr=1e-2))
    ids = torch.randint(1, 512, (2, 6))
    causal_lm_loss(m, {"input_ids": ids, "labels": ids})[0].backward()
    opt.step()
    return m, opt


# ---- fault injection inside every write / rename / delete of a save ----
class Fault(Exception):
    pass


def inject(monkeypatch, fail_at: int) -> list:
    """Make the fail_at-th filesystem step of a save (os.replace, os.fsync, os.chmod, a safetensors write,
    shutil.rmtree) raise — and every step after it too, so no cleanup runs: the directory is left as a kill
    at that moment would leave it. Returns the list the steps are recorded in."""
    calls = []

    def wrap(name, fn):
        def f(*a, **k):
            calls.append(name)
            if len(calls) >= fail_at:
                raise Fault(f"injected at step {len(calls)} ({name})")
            return fn(*a, **k)
        return f
    monkeypatch.setattr(os, "replace", wrap("replace", os.replace))
    monkeypatch.setattr(os, "fsync", wrap("fsync", os.fsync))
    monkeypatch.setattr(os, "chmod", wrap("chmod", os.chmod))
    monkeypatch.setattr(hub, "save_file", wrap("save_file", hub.save_file))
    monkeypatch.setattr(ck.shutil, "rmtree", wrap("rmtree", ck.shutil.rmtree))
    return calls


@pytest.mark.parametrize("same_step", [False, True])
def test_failure_at_every_save_step_keeps_a_complete_checkpoint(tmp_path, monkeypatch, same_step):
    """Save step 1, then save again (step 2, or step 1 again: a finished run re-run with resume) with a
    failure injected at step k of that second save, for every k: latest.json always names a complete
    checkpoint that loads (the old one or the new one), and the next clean save succeeds."""
    m, opt = trained()
    root = tmp_path / "ck"
    save_checkpoint(root, m, opt, step=1)
    old = {k: v.clone() for k, v in m.state_dict().items()}
    with monkeypatch.context() as mp:  # count the steps of a clean second save
        calls = inject(mp, 10**9)
        save_checkpoint(tmp_path / "count", m, opt, step=1)
        save_checkpoint(tmp_path / "count", m, opt, step=1 if same_step else 2)
        n_steps = len(calls) // 2 + 2
    new_step = 1 if same_step else 2
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)  # the second save holds different weights
    new = {k: v.clone() for k, v in m.state_dict().items()}
    seen = set()
    for k in range(1, n_steps + 1):
        r = tmp_path / f"run{k}"
        save_checkpoint(r, model(), step=1)  # placeholder, then the real first checkpoint
        m2 = model()
        m2.load_state_dict(old)
        save_checkpoint(r, m2, opt, step=1)
        with monkeypatch.context() as mp:
            calls = inject(mp, k)
            try:
                save_checkpoint(r, m, opt, step=new_step)
            except Fault:
                pass
            seen.add(tuple(calls))
        (r / ".lock").unlink(missing_ok=True)  # a killed writer leaves its lock; a dead pid is taken over anyway
        probe = model(5)
        st = load_checkpoint(r, probe, restore_rng=False)
        got = probe.state_dict()
        is_old = all(torch.equal(got[n], old[n]) for n in old)
        is_new = all(torch.equal(got[n], new[n]) for n in new)
        assert is_old or is_new, f"failure at step {k} ({calls[-1] if calls else '-'}) lost the checkpoint"
        assert st["step"] in (1, new_step)
        save_checkpoint(r, m, opt, step=new_step)  # a clean save afterwards works and tidies up
        assert latest_checkpoint(r) is not None
        assert not list(r.glob(".step-*.tmp-*"))
    assert len(seen) >= n_steps - 1  # every step was reached


def test_resave_same_step_never_renames_away_from_latest(tmp_path):
    m, opt = trained()
    root = tmp_path / "ck"
    first = save_checkpoint(root, m, opt, step=5)
    second = save_checkpoint(root, m, opt, step=5)
    assert first.name == "step-000005" and second.name == "step-000005.1"
    assert latest_checkpoint(root) == second and not first.exists()
    assert save_checkpoint(root, m, opt, step=6).name == "step-000006"


def test_keep_orders_by_step_number(tmp_path):
    m, _ = trained()
    root = tmp_path / "ck"
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        save_checkpoint(root, m, step=step, keep=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-1000000", "step-1000001"]
    assert latest_checkpoint(root).name == "step-1000001"


def test_nonfinite_weights_never_saved(tmp_path):
    m, opt = trained()
    root = tmp_path / "ck"
    save_checkpoint(root, m, opt, step=1)
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight"):
        save_checkpoint(root, m, opt, step=2)
    assert latest_checkpoint(root).name == "step-000001"
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-000001"]


def test_latest_json_cannot_leave_the_directory(tmp_path):
    m, _ = trained()
    root = tmp_path / "ck"
    save_checkpoint(root, m, step=1)
    save_checkpoint(tmp_path / "elsewhere", m, step=1)
    for name in ("../elsewhere/step-000001", str(tmp_path / "elsewhere" / "step-000001"), "step-000001/..", ".."):
        (root / "latest.json").write_text(json.dumps({"name": name}))
        with pytest.raises(hub.CheckpointError, match="latest.json"):
            latest_checkpoint(root)


# ---- one writer per directory ----
def test_second_writer_is_refused_and_stale_lock_taken_over(tmp_path):
    m, _ = trained()
    root = tmp_path / "ck"
    root.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (root / ".lock").write_text(f"{live.pid}\n")
        with pytest.raises(LockedError, match=f"pid {live.pid}"):
            save_checkpoint(root, m, step=1)
        assert not any(p.name.startswith("step") for p in root.iterdir())
    finally:
        live.kill()
        live.wait()
    (root / ".lock").write_text(f"{live.pid}\n")  # now a dead pid: stale
    save_checkpoint(root, m, step=1)
    assert latest_checkpoint(root).name == "step-000001" and not (root / ".lock").exists()


def test_cli_second_writer_exit_1(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}] * 4)
    out = tmp_path / "out"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{live.pid}\n")
        assert main(["sft", "--data", str(data), "--out", str(out), "--max-steps", "1"]) == 1
        err = capsys.readouterr().err
        assert "in use by another minillm process" in err and "Traceback" not in err
    finally:
        live.kill()
        live.wait()


# ---- permissions follow the umask ----
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_honour_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        m, opt = trained()
        hub.save_json({"a": 1}, tmp_path / "x.json")
        hub.save_safetensors({"w": torch.zeros(2)}, tmp_path / "x.safetensors")
        ckpt = save_checkpoint(tmp_path / "ck", m, opt, step=1)
        files = [tmp_path / "x.json", tmp_path / "x.safetensors", tmp_path / "ck" / "latest.json",
                 *ckpt.iterdir()]
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == mode, f
    finally:
        os.umask(old)


# ---- CLI: resume fingerprint, reproducibility, one- or two-line errors ----
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft(data, out, *extra):
    return main(["sft", "--data", str(data), "--out", str(out), "--batch-size", "2", "--lr", "1e-2",
                 "--log-every", "1", *extra])


def losses(out):
    return [json.loads(l)["loss"] for l in open(Path(out) / "metrics.jsonl") if '"loss"' in l and '"eval' not in l]


def test_resume_refuses_changed_inputs(tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    common = ["--lora-r", "2", "--lora-alpha", "4", "--save-every", "1"]
    assert sft(data, out, "--max-steps", "2", *common) == 0
    capsys.readouterr()
    other = write_jsonl(tmp_path / "d2.jsonl", rows[::-1])
    for flags, name in ((["--max-length", "16"], "max_length"), (["--completion-only"], "completion_only"),
                        (["--data", str(other)], "data"), (["--lora-alpha", "8"], "adapters")):
        args = ["--max-steps", "3", "--resume", str(out / "checkpoints"), *common, *flags]
        assert sft(data, out, *args) == 2, flags
        err = capsys.readouterr().err
        assert f"{name} changed" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    assert sft(data, out, "--max-steps", "3", "--resume", str(out / "checkpoints"), *common) == 0  # unchanged
    assert "resumed from" in capsys.readouterr().err


def test_lora_sft_and_classify_are_reproducible(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(8)])
    for run in ("a", "b"):
        assert sft(data, tmp_path / run, "--max-steps", "3", "--lora-r", "4", "--lora-dropout", "0.1") == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 3
    rows = [{"text": f"{w} story", "labels": ["x"] if w in "ab" else ["y"]} for w in "abcdef"]
    cdata = write_jsonl(tmp_path / "c.jsonl", rows)
    for run in ("ca", "cb"):
        assert main(["classify", "--data", str(cdata), "--out", str(tmp_path / run), "--max-steps", "3",
                     "--batch-size", "3", "--log-every", "1"]) == 0
    assert losses(tmp_path / "ca") == losses(tmp_path / "cb")
    from safetensors.torch import load_file  # the classifier heads are equal too (seeded before they are built)
    ha, hb = load_file(str(tmp_path / "ca" / "model.safetensors")), load_file(str(tmp_path / "cb" / "model.safetensors"))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)


BAD_ARGS = [
    (["--max-grad-norm", "-1"], "max_grad_norm"), (["--max-grad-norm", "0"], "max_grad_norm"),
    (["--max-length", "-5"], "max-length"), (["--weight-decay", "-1"], "weight_decay"),
    (["--log-every", "0"], "log_every"), (["--lr", "inf"], "lr"), (["--lr", "nan"], "lr"),
    (["--batch-size", "0"], "batch_size"), (["--lora-r", "-1"], "lora_r"), (["--lora-alpha", "nan"], "lora_alpha"),
    (["--lora-dropout", "2"], "lora_dropout"),
]


@pytest.mark.parametrize("flags,needle", BAD_ARGS)
def test_cli_bad_arguments_one_line_exit_2(tmp_path, capsys, flags, needle):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}] * 2)
    assert sft(data, tmp_path / "o", "--max-steps", "1", *flags) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err


def test_cli_classify_empty_label_and_ppo_zero(tmp_path, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "labels": ["pos"]}])
    assert main(["classify", "--data", str(data), "--labels", "pos,,neg", "--out", str(tmp_path / "o")]) == 2
    assert "--labels" in capsys.readouterr().err
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}])
    for flags, needle in ((["--ppo-epochs", "0"], "ppo_epochs"), (["--batch-size", "0"], "batch_size"),
                          (["--kl-coef", "nan"], "init_kl_coef")):
        assert main(["ppo", "--policy", "tiny-gpt2", "--reward-model", "tiny-gpt2", "--prompts", str(prompts),
                     "--out", str(tmp_path / "p"), *flags]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err


def test_cli_disk_full_exit_1_with_path(tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}] * 2)

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", path)
    monkeypatch.setattr(hub, "save_file", full)
    assert sft(data, tmp_path / "o", "--max-steps", "1") == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(tmp_path / "o") in err and "Traceback" not in err


def test_cli_read_only_out_fails_before_training(tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}] * 2)
    real_open = os.open

    def ro(path, flags, *a, **k):
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", ro)
    assert sft(data, tmp_path / "o", "--max-steps", "1") == 1
    err = capsys.readouterr().err
    assert "Read-only file system" in err and str(tmp_path / "o") in err and "Traceback" not in err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # failed before training


# ---- data and small loaders ----
@pytest.mark.parametrize("value", [None, ["a"], 34, {"x": 1}, True])
def test_completion_must_be_a_string(value):
    with pytest.raises(DataError, match=r"d\.jsonl:3: 'completion' must be a string"):
        prompt_and_completion({"prompt": "p", "completion": value, "_where": "d.jsonl:3"})


def test_add_special_tokens_checks_before_adding():
    tok = Tokenizer.from_pretrained("tiny-gpt2")
    n = len(tok)
    with pytest.raises(ValueError, match="unknown special-token role"):
        tok.add_special_tokens(["###X###"], nonsense_token="###Y###")
    with pytest.raises(ValueError, match="non-empty string"):
        tok.add_special_tokens(["###X###", ""])
    assert len(tok) == n and tok.token_to_id("###X###") is None


@pytest.mark.parametrize("beta", [float("nan"), -0.1, 0.0, float("inf")])
def test_dpo_beta_checked(beta):
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(z, z, z, z, beta=beta)


def test_overlong_reward_pair_named_before_training(tmp_path, capsys):
    rows = [{"prompt": "q", "chosen": "good", "rejected": "bad"}] * 3 + \
           [{"prompt": "q " * 300, "chosen": "good", "rejected": "bad"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert main(["train-reward", "--model", "tiny-gpt2", "--data", str(data), "--out", str(tmp_path / "rm"),
                 "--eval-frac", "0"]) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl:4" in err and "positions" in err and "Traceback" not in err


def test_invalid_utf8_and_deep_json_are_data_errors(tmp_path):
    from minillm.data.readers import read_records
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="b.jsonl"):
        read_records(str(bad))
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100000 + "\n")
    with pytest.raises(DataError, match="deep.jsonl:1"):
        read_records(str(deep))


def test_half_load_of_checkpoint_leaves_everything(tmp_path):
    """A malformed `step` or RNG entry found after the weights used to be copied: now nothing changes."""
    m, opt = trained()
    root = tmp_path / "ck"
    save_checkpoint(root, m, opt, step=2)
    state_file = root / "step-000002" / "trainer_state.json"
    good = json.loads(state_file.read_text())
    for edit in ({"step": "2"}, {"step": None}, {"rng": {"python": [3, [1, 2], None], "numpy": []}}):
        state_file.write_text(json.dumps({**good, **edit}))
        fresh, fopt = model(3), None
        fopt = make_optimizer(fresh, TrainConfig())
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        rng = torch.get_rng_state().clone()
        with pytest.raises(hub.CheckpointError):
            load_checkpoint(root, fresh, fopt)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
        assert not fopt.state and torch.equal(torch.get_rng_state(), rng)
