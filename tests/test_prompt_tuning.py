"""Prompt tuning: peft-equal outputs (golden + live), adapter files both ways, frozen base, errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minillm.hub import CheckpointError
from minillm.models.gpt2 import GPT2LMHeadModel
from minillm.prompt_tuning import (apply_prompt_tuning, gpt2_logits_from_embeds, load_prompt_tuning,
                                   prompt_tuning_loss, save_prompt_tuning)
from minillm.tokenizer import Tokenizer
from minillm.data.sft import CausalLMCollator
from minillm.train.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "prompt_tuning.safetensors"
ADAPTER = ROOT / "weights" / "tiny-gpt2-prompt"
ATOL = 1e-4  # fp32 logits


def golden():
    with safe_open(str(GOLDEN), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def tiny():
    return GPT2LMHeadModel.from_pretrained("tiny-gpt2").eval()


# ---- against peft (golden file) ----
def test_peft_adapter_logits_and_loss_match_golden():
    g = golden()
    pt = load_prompt_tuning(tiny(), ADAPTER).eval()
    with torch.no_grad():
        masked = pt(g["input_ids"], g["attention_mask"])
        plain = pt(g["input_ids"])
        total, n = prompt_tuning_loss(pt, {k: g[k] for k in ("input_ids", "attention_mask", "labels")})
    assert masked.shape == g["logits_masked"].shape == (3, 5 + 9, 512)
    real = torch.cat([torch.ones(3, 5, dtype=torch.bool), g["attention_mask"].bool()], 1)  # padded rows differ
    torch.testing.assert_close(masked[real], g["logits_masked"][real], atol=ATOL, rtol=0)
    torch.testing.assert_close(plain, g["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(total / n, g["loss"], atol=ATOL, rtol=0)


def test_body_from_embeddings_equals_gpt2_forward():
    """gpt2_logits_from_embeds(wte(ids)) must be GPT2LMHeadModel(ids), padded or not (the GPT-2 path we rewrote)."""
    m = tiny()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    with torch.no_grad():
        e = m.transformer.wte(ids)
        torch.testing.assert_close(gpt2_logits_from_embeds(m, e), m(ids), atol=1e-5, rtol=0)
        ours, ref = gpt2_logits_from_embeds(m, e, mask), m(ids, attention_mask=mask)
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)


def test_left_padded_row_equals_unpadded_row():
    """Positions follow the mask: a left-padded row gives the same text logits as the row alone."""
    pt = load_prompt_tuning(tiny(), ADAPTER).eval()
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], 1)
    mask = torch.tensor([[0, 0] + [1] * 6])
    with torch.no_grad():
        alone, left = pt(ids), pt(padded, mask)
    torch.testing.assert_close(left[:, 5 + 2:], alone[:, 5:], atol=1e-5, rtol=0)
    torch.testing.assert_close(left[:, :5], alone[:, :5], atol=1e-5, rtol=0)


# ---- files ----
def test_save_load_round_trip_and_peft_layout(tmp_path):
    tok = Tokenizer.from_pretrained("tiny-gpt2")
    pt = apply_prompt_tuning(tiny(), 7, init="text", init_text="hello world", tokenizer=tok)
    save_prompt_tuning(pt, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 7 and cfg["token_dim"] == 64
    assert cfg["num_transformer_submodules"] == 1 and cfg["prompt_tuning_init"] == "TEXT"
    assert cfg["prompt_tuning_init_text"] == "hello world" and cfg["task_type"] == "CAUSAL_LM"
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert list(state) == ["prompt_embeddings"] and state["prompt_embeddings"].shape == (7, 64)
    back = load_prompt_tuning(tiny(), tmp_path)
    assert torch.equal(back.prompt_embeddings, pt.prompt_embeddings)


def test_text_init_repeats_the_text_embeddings():
    tok = Tokenizer.from_pretrained("tiny-gpt2")
    m = tiny()
    ids = tok.encode("hello world")
    pt = apply_prompt_tuning(m, 2 * len(ids) + 1, init="text", init_text="hello world", tokenizer=tok)
    want = m.transformer.wte.weight[torch.tensor((ids * 3)[:2 * len(ids) + 1])]
    assert torch.equal(pt.prompt_embeddings.detach(), want.detach())
    short = apply_prompt_tuning(tiny(), 1, init="text", init_text="hello world", tokenizer=tok)
    assert torch.equal(short.prompt_embeddings.detach(), want[:1].detach())


def test_bad_files_are_refused_and_model_untouched(tmp_path):
    m = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    d = tmp_path / "a"
    shutil.copytree(ADAPTER, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    for change, msg in [({"peft_type": "LORA"}, "PROMPT_TUNING"), ({"token_dim": 32}, "token_dim"),
                        ({"num_virtual_tokens": 6}, "shape"), ({"num_transformer_submodules": 2}, "submodules")]:
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError, match=msg):
            load_prompt_tuning(m, d)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({"prompt_embeddings": torch.full((5, 64), float("nan"))}, str(d / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="finite"):
        load_prompt_tuning(m, d)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in m.parameters())  # a failed load froze nothing


# ---- training ----
def test_only_the_prompt_trains_and_the_base_stays_bit_identical():
    m = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    pt = apply_prompt_tuning(m, 4, generator=torch.Generator().manual_seed(0))
    p0 = pt.prompt_embeddings.detach().clone()
    assert [n for n, p in pt.named_parameters() if p.requires_grad] == ["prompt_embeddings"]
    g = torch.Generator().manual_seed(3)
    rows = [{"input_ids": torch.randint(0, 512, (int(k),), generator=g).tolist()}
            for k in torch.randint(3, 9, (16,), generator=g)]
    res = train(pt, rows, CausalLMCollator(0), prompt_tuning_loss,
                TrainConfig(lr=1e-2, max_steps=4, batch_size=4, quiet=True, device="cpu"))
    assert res.step == 4
    assert not torch.equal(pt.prompt_embeddings.detach(), p0)
    after = m.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_loss_counts_the_first_text_token_as_peft():
    """peft's labels: −100 on the virtual tokens only, so the last virtual token predicts text token 0."""
    pt = load_prompt_tuning(tiny(), ADAPTER).eval()
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(4))
    _, n = prompt_tuning_loss(pt, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    assert int(n) == 2 * 5


# ---- live: peft ----
@pytest.mark.reference
def test_peft_reads_ours_and_we_read_peft_live(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.from_pretrained("tiny-gpt2")
    ours = apply_prompt_tuning(tiny(), 6, init="text", init_text="the cat sat", tokenizer=tok,
                               tokenizer_name_or_path=str(ROOT / "weights" / "tiny-gpt2"))
    with torch.no_grad():
        ours.prompt_embeddings.add_(torch.randn(6, 64, generator=torch.Generator().manual_seed(5)))
    save_prompt_tuning(ours, tmp_path / "ours")
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    real = torch.cat([torch.ones(2, 6, dtype=torch.bool), mask.bool()], 1)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(ROOT / "weights" / "tiny-gpt2"))
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        ref, mine = pm(input_ids=ids, attention_mask=mask).logits, ours.eval()(ids, mask)
    torch.testing.assert_close(mine[real], ref[real], atol=ATOL, rtol=0)

    # peft's own TEXT-initialised prompt (it tokenizes with transformers' AutoTokenizer) -> our loader
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init="TEXT",
                                  prompt_tuning_init_text="a b c", tokenizer_name_or_path=str(ROOT / "weights" / "tiny-gpt2"))
    pm2 = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(str(ROOT / "weights" / "tiny-gpt2")), cfg)
    pm2.save_pretrained(tmp_path / "peft")
    back = load_prompt_tuning(tiny(), tmp_path / "peft").eval()
    real = torch.cat([torch.ones(2, 4, dtype=torch.bool), mask.bool()], 1)
    with torch.no_grad():
        ref, mine = pm2.eval()(input_ids=ids, attention_mask=mask).logits, back(ids, mask)
    torch.testing.assert_close(mine[real], ref[real], atol=ATOL, rtol=0)
    mine_text = apply_prompt_tuning(tiny(), 4, init="text", init_text="a b c", tokenizer=tok)
    assert torch.equal(mine_text.prompt_embeddings.detach(), back.prompt_embeddings.detach())


# ---- the course's comparison ----
def test_compare_peft_methods_rows():
    from minillm.demos.peft_comparison import compare_peft_methods, format_rows
    rows = compare_peft_methods(steps=3, batch_size=4, n_train=16, n_eval=8)
    full, lora, prompt = rows
    assert full["trainable"] == full["total"] == 141_056
    assert lora["trainable"] == 2 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))  # r·(in+out), 2 layers
    assert prompt["trainable"] == 20 * 64 and prompt["total"] == 141_056 + 1_280
    assert all(r["final_train_loss"] > 0 and r["heldout_loss"] > 0 for r in rows)
    assert "prompt tuning" in format_rows(rows)
