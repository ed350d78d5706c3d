"""Golden part `prompt_tuning`: a peft PROMPT_TUNING adapter on the tiny GPT-2, and peft's outputs.

Needs the `gpt2` part's weights/tiny-gpt2. Writes
  weights/tiny-gpt2-prompt/                 a peft prompt-tuning adapter: 5 virtual tokens, RANDOM init (seeded)
  tests/golden/prompt_tuning.safetensors    input_ids, a right-padded attention_mask, labels (−100 on the padding),
                                            peft's logits (B, 5 + T, V) with and without the mask, and its loss
Right padding only: with left padding transformers 5 counts the pads in the positions, minillm does not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from golden.common import seed_all, write_golden


def make(root: Path) -> None:
    from peft import PeftModel, PromptTuningConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    base_dir = root / "weights" / "tiny-gpt2"
    d = root / "weights" / "tiny-gpt2-prompt"
    seed_all(21)
    pm = get_peft_model(GPT2LMHeadModel.from_pretrained(base_dir),
                        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="RANDOM"))
    shutil.rmtree(d, ignore_errors=True)
    pm.save_pretrained(d)
    (d / "README.md").unlink(missing_ok=True)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "weights/tiny-gpt2"  # reproducible: a relative path
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    # outputs of the adapter as peft loads it from the files (what minillm will load too)
    pm = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir), d).eval()
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(0, 512, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = pm(input_ids=ids, attention_mask=mask, labels=labels)
        plain = pm(input_ids=ids).logits
    write_golden(root, "prompt_tuning", {"input_ids": ids, "attention_mask": mask, "labels": labels,
                                         "logits_masked": out.logits, "logits": plain, "loss": out.loss},
                 {"adapter": "weights/tiny-gpt2-prompt", "num_virtual_tokens": 5})
