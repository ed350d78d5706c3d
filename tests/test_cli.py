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
