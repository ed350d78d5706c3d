"""`minillm attention`: one layer/head's attention weights for a sentence, checked against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minillm.attention_map import attention_map, format_table
from minillm.cli import main

ROOT = Path(__file__).resolve().parent.parent
MINILM = ROOT / "weights" / "all-MiniLM-L6-v2"


def test_rows_are_distributions_and_table_lists_tokens():
    tokens, w = attention_map(str(ROOT / "weights" / "tiny-bert"), "I like cats", layer=1, head=2)
    assert tokens == ["[CLS]", "i", "like", "cats", "[SEP]"]
    assert w.shape == (5, 5) and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(5), atol=1e-6, rtol=0)
    table = format_table(tokens, w).splitlines()
    assert len(table) == 6 and table[2].startswith("i ") and table[0].split()[-1] == "[SEP]"


def test_cli_prints_table_and_refuses_bad_layer(capsys):
    assert main(["attention", "--model", str(ROOT / "weights" / "tiny-distilbert"), "--text", "I like cats",
                 "--layer", "-1", "--head", "3", "--no-special"]) == 0
    out = capsys.readouterr().out
    assert "like" in out and "\n".join(out.splitlines()[2:]).count("%") == 9  # 3 x 3 cells
    assert main(["attention", "--model", str(ROOT / "weights" / "tiny-bert"), "--layer", "7"]) == 2
    assert "layer 7 out of range: the model has 2 layers" in capsys.readouterr().err
    assert main(["attention", "--model", str(ROOT / "weights" / "tiny-vit")]) == 2
    assert "model_type 'vit'" in capsys.readouterr().err


@pytest.mark.reference
@pytest.mark.parametrize("name,cls", [("tiny-bert", "BertModel"), ("tiny-distilbert", "DistilBertModel"),
                                      ("all-MiniLM-L6-v2", "BertModel")])
def test_weights_match_transformers_output_attentions(name, cls):
    transformers = pytest.importorskip("transformers")
    d = ROOT / "weights" / name
    if not (d / "model.safetensors").is_file():
        pytest.skip(f"{d} absent: run python scripts/fetch_minilm.py")
    ref = getattr(transformers, cls).from_pretrained(str(d), attn_implementation="eager").eval()
    tokens, w = attention_map(str(d), "I like cats", layer=1, head=1)
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    with torch.no_grad():
        r = ref(**tok("I like cats", return_tensors="pt"), output_attentions=True).attentions[1][0, 1]
    torch.testing.assert_close(w, r, atol=1e-5, rtol=0)  # probabilities, fp32


def test_png_heatmap_with_plots_extra(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the plots extra (matplotlib) is not installed")
    out = tmp_path / "att.png"
    assert main(["attention", "--model", str(ROOT / "weights" / "tiny-bert"), "--png", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
