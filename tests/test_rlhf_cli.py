"""`minillm train-reward` and `minillm ppo` on a tiny checkpoint: files written, accuracy learned, and a reward
model whose tokenizer differs from the policy's (text is re-encoded)."""

import json
import random

import pytest
import torch

from minillm.cli import main
from minillm.demos.rlhf_demo import DemoConfig, build_policy, build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    words = ["good", "great", "bad", "awful", "the", "food", "was", "q", ":"]
    tok = build_tokenizer([" ".join(words)])
    torch.manual_seed(0)
    m = build_policy(DemoConfig(n_embd=16, n_layer=1, n_head=2), tok)
    m.save_pretrained(str(d / "gpt"))
    tok.save_pretrained(d / "gpt")
    rng = random.Random(0)
    rows = []
    for _ in range(96):  # chosen reviews are positive, rejected negative: easy to learn
        rows.append({"prompt": "q :", "chosen": f"the food was {rng.choice(['good', 'great'])}",
                     "rejected": f"the food was {rng.choice(['bad', 'awful'])}", "score_chosen": 8, "score_rejected": 3})
    (d / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": "q :"}) for _ in range(8)) + "\n")
    return d


def test_train_reward_then_ppo(ckpt, tmp_path):
    assert main(["train-reward", "--model", str(ckpt / "gpt"), "--data", str(ckpt / "pairs.jsonl"),
                 "--out", str(tmp_path / "rm"), "--epochs", "3", "--lr", "3e-3", "--batch-size", "16",
                 "--eval-frac", "0.25", "--device", "cpu"]) == 0
    recs = [json.loads(l) for l in open(tmp_path / "rm" / "metrics.jsonl") if '"epoch"' in l]
    assert recs[-1]["eval_acc"] >= 0.9  # 24 held-out pairs of an easy preference
    for f in ("score.safetensors", "reward_config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "rm" / f).is_file()
    # PPO with the tiny-gpt2 BPE policy: a different tokenizer than the reward model's word-level one
    assert main(["ppo", "--policy", "tiny-gpt2", "--reward-model", str(tmp_path / "rm"),
                 "--prompts", str(ckpt / "prompts.jsonl"), "--out", str(tmp_path / "pol"), "--steps", "2",
                 "--batch-size", "8", "--mini-batch-size", "4", "--ppo-epochs", "1", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    lines = [json.loads(l) for l in open(tmp_path / "pol" / "metrics.jsonl")]
    assert any("re-encoded" in l["msg"] for l in lines)  # the tokenizers differ, and the job says so
    steps = [l for l in lines if "step" in l]
    assert [l["step"] for l in steps] == [1, 2] and abs(steps[0]["kl"]) < 1e-4
    assert (tmp_path / "pol" / "value_head.safetensors").is_file()


def test_ppo_qlora_policy(ckpt, tmp_path, capsys):
    """--lora-r with --nf4: adapters only, NF4 base, reference = adapters off (KL 0 at step 1)."""
    main(["train-reward", "--model", str(ckpt / "gpt"), "--data", str(ckpt / "pairs.jsonl"),
          "--out", str(tmp_path / "rm"), "--epochs", "1", "--device", "cpu"])
    assert main(["ppo", "--policy", str(ckpt / "gpt"), "--reward-model", str(tmp_path / "rm"),
                 "--prompts", str(ckpt / "prompts.jsonl"), "--out", str(tmp_path / "pol"), "--steps", "2",
                 "--batch-size", "8", "--mini-batch-size", "4", "--ppo-epochs", "1", "--max-new-tokens", "4",
                 "--lora-r", "4", "--quantize", "nf4", "--lr", "1e-2", "--device", "cpu"]) == 0
    steps = [json.loads(l) for l in open(tmp_path / "pol" / "metrics.jsonl") if '"step"' in l]
    assert abs(steps[0]["kl"]) < 1e-4  # adapters start at B = 0: policy = reference
    assert (tmp_path / "pol" / "adapter" / "adapter_model.safetensors").is_file()  # peft's files, beside
    from minillm.models.gpt2 import GPT2LMHeadModel  # the merged policy loads directly
    merged, base = GPT2LMHeadModel.from_pretrained(str(tmp_path / "pol")), GPT2LMHeadModel.from_pretrained(str(ckpt / "gpt"))
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, merged.state_dict()[k])]
    assert changed and all(k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for k in changed)
    assert main(["ppo", "--policy", str(ckpt / "gpt"), "--reward-model", str(tmp_path / "rm"),
                 "--prompts", str(ckpt / "prompts.jsonl"), "--out", str(tmp_path / "p2"), "--quantize", "nf4"]) == 2
    assert "needs LoRA" in capsys.readouterr().err


def _pairs_accuracy(rm_dir, pairs_file):
    from minillm.rlhf.jobs import load_tokenizer
    from minillm.rlhf.reward import RewardModel, pairwise_accuracy, score_texts
    rm = RewardModel.from_pretrained(str(rm_dir)).eval()
    tok = load_tokenizer(str(rm_dir))
    rows = [json.loads(l) for l in open(pairs_file)]
    p = [r["prompt"] for r in rows]
    return pairwise_accuracy(score_texts(rm, tok, p, [r["chosen"] for r in rows]),
                             score_texts(rm, tok, p, [r["rejected"] for r in rows]))


def test_train_reward_lora_bert(ckpt, tmp_path):
    """--lora-r on a BERT backbone: only the LoRA targets' weights move (merged into the saved backbone), the
    rest of the backbone is bit-identical to the base, the adapter is saved in peft's files, and the saved
    reward model ranks the pairs."""
    from minillm.models.bert import BertModel
    assert main(["train-reward", "--model", "tiny-bert", "--data", str(ckpt / "pairs.jsonl"),
                 "--out", str(tmp_path / "rm"), "--epochs", "4", "--lr", "1e-2", "--batch-size", "16",
                 "--eval-frac", "0.25", "--lora-r", "4", "--device", "cpu"]) == 0
    assert (tmp_path / "rm" / "adapter" / "adapter_model.safetensors").is_file()
    cfg = json.loads((tmp_path / "rm" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and "query" in cfg["target_modules"]
    base, got = BertModel.from_pretrained("tiny-bert").state_dict(), BertModel.from_pretrained(str(tmp_path / "rm")).state_dict()
    assert set(base) == set(got)
    targets = (".query.weight", ".key.weight", ".value.weight", "intermediate.dense.weight", "output.dense.weight")
    for k in base:
        if k.endswith(targets):
            assert not torch.equal(got[k], base[k]), k
        else:
            assert torch.equal(got[k], base[k]), k  # embeddings, norms, biases, pooler: frozen
    assert _pairs_accuracy(tmp_path / "rm", ckpt / "pairs.jsonl") >= 0.9


def test_train_reward_qlora_gpt2(ckpt, tmp_path, capsys):
    """--lora-r --nf4: the backbone is trained as NF4 + LoRA and saved dequantized and merged (full precision);
    the saved reward model loads as a plain one and ranks the pairs."""
    from minillm.models.gpt2 import GPT2LMHeadModel
    from minillm.nf4 import dequantize_nf4, quantize_nf4
    assert main(["train-reward", "--model", str(ckpt / "gpt"), "--data", str(ckpt / "pairs.jsonl"),
                 "--out", str(tmp_path / "rm"), "--epochs", "3", "--lr", "1e-2", "--batch-size", "16",
                 "--eval-frac", "0.25", "--lora-r", "4", "--quantize", "nf4", "--device", "cpu"]) == 0
    assert main(["train-reward", "--model", str(ckpt / "gpt"), "--data", str(ckpt / "pairs.jsonl"),
                 "--out", str(tmp_path / "rm2"), "--quantize", "nf4"]) == 2
    assert "needs LoRA" in capsys.readouterr().err
    base = GPT2LMHeadModel.from_pretrained(str(ckpt / "gpt")).state_dict()
    got = GPT2LMHeadModel.from_pretrained(str(tmp_path / "rm")).state_dict()
    for k, w in base.items():
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            # every LoRA target: the NF4 round trip plus a low-rank update of rank ≤ 4
            resid = got[k] - dequantize_nf4(*quantize_nf4(w))
            assert 0 < torch.linalg.matrix_rank(resid).item() <= 4, k
        else:
            assert torch.equal(got[k], w), k  # embeddings, norms, biases: untouched full precision
    assert _pairs_accuracy(tmp_path / "rm", ckpt / "pairs.jsonl") >= 0.9


def test_train_reward_roberta_backbone(ckpt, tmp_path):
    """A RoBERTa checkpoint is a reward backbone like BERT's: <s> (position 0) pooled, saved, reloaded, ranking."""
    from minillm.models.roberta import RobertaModel
    from minillm.rlhf.reward import RewardModel
    assert main(["train-reward", "--model", "tiny-roberta", "--data", str(ckpt / "pairs.jsonl"),
                 "--out", str(tmp_path / "rm"), "--epochs", "4", "--lr", "3e-3", "--batch-size", "16",
                 "--eval-frac", "0.25", "--device", "cpu"]) == 0
    rm = RewardModel.from_pretrained(str(tmp_path / "rm"))
    assert isinstance(rm.backbone, RobertaModel) and rm.pool == "first"
    assert _pairs_accuracy(tmp_path / "rm", ckpt / "pairs.jsonl") >= 0.9
