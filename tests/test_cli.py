"""The command line (minillm/cli.py) on the embedded tiny checkpoint."""

import subprocess
import sys
from pathlib import Path

import torch

from minillm.cli import main
from minillm.generation import generate
from minillm.models.gpt2 import GPT2LMHeadModel
from minillm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def test_generate_prints_the_greedy_continuation(capsys):
    assert main(["generate", "--model", str(ROOT / "weights" / "tiny-gpt2"), "--prompt", "I like cats",
                 "--max-new-tokens", "8", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.strip()
    tok = Tokenizer.from_pretrained(str(ROOT / "weights" / "tiny-gpt2"))
    model = GPT2LMHeadModel.from_pretrained(str(ROOT / "weights" / "tiny-gpt2"))
    ids = torch.tensor([tok.encode("I like cats")])
    expected = tok.decode(generate(model, ids, max_new_tokens=8, eos_token_id=0)[0], skip_special_tokens=True)
    assert printed == expected and printed.startswith("I like cats")


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "minillm", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "generate" in out.stdout


def test_generate_prepack_gives_the_same_text_with_packed_weights(capsys, monkeypatch):
    """--prepack: generation inside linear.prepacked (every linear packed here: the tiny model's layers are under
    the size that is packed by default), the same greedy text."""
    import contextlib

    from minillm import inference
    from minillm import linear as linear_mod

    monkeypatch.setattr(linear_mod, "ONEDNN_MIN_WEIGHT", 0)
    packed_layers = []

    @contextlib.contextmanager
    def watched(model):
        with linear_mod.prepacked(model):
            packed_layers.extend(m for m in model.modules() if getattr(m, "packed", None) is not None)
            yield model

    monkeypatch.setattr(inference, "prepacked", watched)
    args = ["generate", "--model", str(ROOT / "weights" / "tiny-llama"), "--prompt", "I like cats",
            "--max-new-tokens", "8", "--device", "cpu"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert packed_layers == []
    assert main(args + ["--prepack"]) == 0
    assert capsys.readouterr().out == plain
    assert len(packed_layers) == (7 * 2 + 1 if linear_mod._ONEDNN_LINEAR is not None else 0)  # 7 per layer + head
