"""The VQA demo: tiny ViT + DistilBERT encoders fused into a tiny GPT-2 decoder, trained on synthetic shapes.

The book's pipeline (ch. 9) at toy scale so it trains on a CPU in minutes: questions about
coloured shapes (minillm.demos.shapes) are encoded by a DistilBERT, the images by a ViT, both
fused as in MultiModalModel and decoded by a GPT-2 with cross-attention, all randomly
initialised and trained together (freeze mode 'nothing', as the book trains). Word-level
tokenizers are built from the templates' vocabulary. Each epoch draws fresh training scenes (the
synthetic world is unlimited; a fixed set of 2,400 images is memorised instead of learned). Reported: held-out exact-match accuracy
per question type next to the majority-answer baseline (each type answered with its most
common training answer), for each fusion ("mean": the book's one fused vector; "tokens": every
projected token). Training is a plain AdamW loop with linear warmup and cosine decay. On a CPU with two
or more cores the fusions train side by side, one child process each (configuration and results as
JSON files), in the wall time of one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers, processors

from minillm.data.vqa import VQACollator
from minillm.demos import shapes
from minillm.losses import lm_loss_sum
from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
from minillm.models.vqa import MultiModalModel, answer_texts, greedy_answer
from minillm.tokenizer import Tokenizer
from minillm.train.loop import TrainConfig, train

EOT = "<|endoftext|>"


@dataclass
class VQADemoConfig:
    n_images: int = 3000          # scenes; 5 questions each; the last 20% held out
    image_size: int = 32
    patch_size: int = 16          # one ViT patch per grid cell: 4 patches + [CLS]
    hidden: int = 64              # width of all three models
    layers: int = 2               # layers of each model
    heads: int = 4
    text_max_length: int = 12     # the text encoder's position limit
    decoder_init_std: float = 0.1  # GPT-2's initializer_range (0.02 in the hub config): trains faster from scratch
    vit_position_init_std: float = 0.5  # ViT's position table init (0.02 in ViT): at 0.02 "where" is never learned
    epochs: int = 18              # at 15 the tokens fusion sat just below 90% on shapes (seed 0)
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    fresh_scenes: bool = True     # draw new training scenes every epoch (the synthetic world is unlimited)
    fusions: tuple = ("mean", "tokens")
    parallel: bool = True         # on a CPU with ≥ 2 cores, train the fusions side by side, one process each
    seed: int = 0
    device: Optional[str] = None
    threads: Optional[int] = None  # torch CPU threads for the run (None: leave torch's setting)
    eval_batch_size: int = 256


# ---- tokenizers for the template vocabulary ----
def text_tokenizer(max_length: int) -> Tokenizer:
    """A word-level, BERT-style tokenizer: [CLS] question [SEP], lower-cased, '?' split off."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {t: i for i, t in enumerate(specials + shapes.question_vocabulary())}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return Tokenizer(tok, model_max_length=max_length, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                     sep_token="[SEP]")


def answer_tokenizer() -> Tokenizer:
    """A word-level, GPT-2-style tokenizer: '<|endoftext|>' is bos, eos and pad at once, as in GPT-2."""
    vocab = {t: i for i, t in enumerate([EOT, "<unk>"] + shapes.answer_vocabulary())}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([EOT])
    return Tokenizer(tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token="<unk>")


# ---- models ----
def tiny_encoders(cfg: VQADemoConfig, text_vocab_size: int) -> tuple[nn.Module, nn.Module]:
    """A tiny DistilBERT and a tiny ViT from minillm, randomly initialised."""
    from minillm.models.distilbert import DistilBertConfig, DistilBertModel
    from minillm.models.vit import ViTConfig, ViTModel

    text = DistilBertModel(DistilBertConfig(vocab_size=text_vocab_size, dim=cfg.hidden, n_layers=cfg.layers,
                                            n_heads=cfg.heads, hidden_dim=4 * cfg.hidden,
                                            max_position_embeddings=cfg.text_max_length, dropout=0.0,
                                            attention_dropout=0.0, pad_token_id=0))
    image = ViTModel(ViTConfig(hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                               intermediate_size=4 * cfg.hidden, image_size=cfg.image_size,
                               patch_size=cfg.patch_size, num_channels=3, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0), add_pooling_layer=False)
    # Position embeddings at ViT's std 0.02 are ~20x smaller than a patch's content: the model then answers
    # colour/shape/count perfectly but never learns where things are (measured: position at chance).
    nn.init.trunc_normal_(image.embeddings.position_embeddings, std=cfg.vit_position_init_std)
    return text, image


def tiny_decoder(cfg: VQADemoConfig, vocab_size: int, eos_id: int) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=cfg.hidden, n_layer=cfg.layers, n_head=cfg.heads,
                                      n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      initializer_range=cfg.decoder_init_std, add_cross_attention=True, bos_token_id=eos_id, eos_token_id=eos_id,
                                      pad_token_id=eos_id))


# ---- training and evaluation ----
class FreshScenes:
    """The training set as the loop sees it: epoch 0 is the split's training scenes; with fresh_scenes, every
    later epoch draws new scenes from another seed (the synthetic world is unlimited, so the model cannot
    memorise images). The loop calls set_epoch before each epoch's batches."""

    def __init__(self, train_set: list[dict], cfg: "VQADemoConfig"):
        self.first, self.cfg, self.records = train_set, cfg, train_set
        self.n_scenes = len({r["image_id"] for r in train_set})

    def set_epoch(self, epoch: int) -> None:
        if epoch == 0 or not self.cfg.fresh_scenes:
            self.records = self.first
        else:
            self.records = shapes.make_shapes_dataset(self.n_scenes, self.cfg.image_size,
                                                      seed=self.cfg.seed + 1000 * epoch, test_fraction=0.0)[0]

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, i: int) -> dict:
        return self.records[i]


def vqa_loss_sum(model: MultiModalModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """loss_fn for the training loop: the answer tokens' next-token cross-entropy, summed, and their count."""
    logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["decoder_input_ids"],
                   batch["decoder_attention_mask"])
    return lm_loss_sum(logits, batch["labels"])


def train_vqa(model: MultiModalModel, collate: VQACollator, scenes: FreshScenes, cfg: "VQADemoConfig",
              device: torch.device, log: Callable[[str], None] = print) -> list[float]:
    """The one training loop (train/loop.py): AdamW, warmup then cosine decay, clipping. -> mean loss per epoch."""
    steps_per_epoch = math.ceil(len(scenes) / cfg.batch_size)
    tcfg = TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, schedule="cosine",
                       epochs=cfg.epochs, batch_size=cfg.batch_size, max_grad_norm=1.0, seed=cfg.seed,
                       device=str(device), quiet=True)
    result = train(model, scenes, collate, vqa_loss_sum, tcfg)
    losses = [sum(result.losses[e * steps_per_epoch:(e + 1) * steps_per_epoch]) / steps_per_epoch
              for e in range(cfg.epochs)]
    for e, loss in enumerate(losses):
        log(f"  epoch {e + 1}/{cfg.epochs}: loss {loss:.4f}")
    return losses


@torch.no_grad()
def predict(model: MultiModalModel, collate: VQACollator, records: list[dict], device: torch.device,
            batch_size: int = 256) -> tuple[list[str], list[float]]:
    """Greedy answers and their aggregated probabilities for every record."""
    tok = collate.dec_tok
    answers, probs = [], []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        q = collate.encode_questions([r["question"] for r in chunk])
        pix = collate.pixel_values(chunk)
        tokens, p = greedy_answer(model, q["input_ids"].to(device), q["attention_mask"].to(device), pix.to(device),
                                  tok.bos_token_id, tok.eos_token_id, max_new_tokens=4)
        answers += answer_texts(tokens, tok, tok.eos_token_id)
        probs += p.tolist()
    return answers, probs


def accuracy_by_type(records: list[dict], predictions: list[str]) -> dict[str, float]:
    """Exact-match accuracy per question type and overall."""
    out = {}
    for qtype in shapes.QUESTION_TYPES:
        rows = [(r, p) for r, p in zip(records, predictions) if r["question_type"] == qtype]
        if rows:
            out[qtype] = sum(r["answer"] == p for r, p in rows) / len(rows)
    out["overall"] = sum(r["answer"] == p for r, p in zip(records, predictions)) / max(len(records), 1)
    return out


def run_vqa_demo(cfg: VQADemoConfig = VQADemoConfig(), out_dir: Optional[str] = None, plot: bool = False,
                 log: Callable[[str], None] = print,
                 build_encoders: Optional[Callable[[VQADemoConfig, int], tuple[nn.Module, nn.Module]]] = None) -> dict:
    """Train one model per fusion and evaluate on the held-out scenes.
    -> {'baseline': {type: acc}, '<fusion>': {'accuracy': {type: acc}, 'losses': [...], 'seconds': s,
        'examples': [(question, answer, prediction, probability), ...]}}."""
    from minillm.train.device import cpu_threads, pick_device

    device = pick_device(cfg.device)
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log("(no figures: matplotlib is not installed; pip install 'minillm[plots]')")
            plot = False
    with cpu_threads(cfg.threads):
        return _run(cfg, device, out_dir, plot, log, build_encoders)


def _run(cfg, device, out_dir, plot, log, build_encoders, report: bool = True) -> dict:
    build_encoders = build_encoders or tiny_encoders
    train_set, test_set = shapes.make_shapes_dataset(cfg.n_images, cfg.image_size, seed=cfg.seed)

    ttok, atok = text_tokenizer(cfg.text_max_length), answer_tokenizer()
    collate = VQACollator(ttok, atok, cfg.image_size, cfg.text_max_length)
    result: dict = {"baseline": shapes.majority_baseline(train_set, test_set),
                    "n_train": len(train_set), "n_test": len(test_set)}
    if report:
        log(f"VQA demo: {len(train_set)} training / {len(test_set)} held-out questions "
            f"({cfg.n_images} scenes, {cfg.image_size}×{cfg.image_size}), device {device}")
    if (cfg.parallel and len(cfg.fusions) > 1 and device.type == "cpu" and build_encoders is tiny_encoders
            and (os.cpu_count() or 1) >= 2):
        for fusion, res in zip(cfg.fusions, _run_side_by_side(cfg, out_dir, plot, log)):
            result[fusion] = res
        log(format_report(result, cfg.fusions))
        return result
    for fusion in cfg.fusions:
        torch.manual_seed(cfg.seed)
        text_enc, image_enc = build_encoders(cfg, len(ttok))
        model = MultiModalModel(text_enc, image_enc, tiny_decoder(cfg, len(atok), atok.eos_token_id), fusion=fusion)
        model.to(device)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"[fusion={fusion}] {n_params:,} parameters")
        t0 = time.perf_counter()
        losses = train_vqa(model, collate, FreshScenes(train_set, cfg), cfg, device, log)
        seconds = time.perf_counter() - t0
        preds, probs = predict(model, collate, test_set, device, cfg.eval_batch_size)
        acc = accuracy_by_type(test_set, preds)
        log("  held-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()) + f" ({seconds:.0f}s training)")
        result[fusion] = {"accuracy": acc, "losses": losses, "seconds": seconds, "parameters": n_params,
                          "examples": [(r["question"], r["answer"], p, q) for r, p, q in
                                       zip(test_set[:10], preds[:10], probs[:10])]}
        if plot and out_dir:
            path = plot_examples(test_set[:10], preds[:10], probs[:10], Path(out_dir) / f"vqa_examples_{fusion}.png")
            log(f"  figure: {path}")
    if report:
        log(format_report(result, cfg.fusions))
    return result


def _run_side_by_side(cfg: VQADemoConfig, out_dir, plot: bool, log: Callable[[str], None]) -> list[dict]:
    """One child process per fusion (`python -m minillm.demos.vqa_demo CONFIG.json RESULT.json`), each on
    one thread: the models are tiny, so two cores train two of them in the time of one. Configuration
    and results travel as JSON files; the children's log lines are relayed, prefixed with their fusion."""
    n_threads = max(1, (cfg.threads or os.cpu_count() or 2) // len(cfg.fusions))
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the minillm package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for fusion in cfg.fusions:
            child = {**asdict(cfg), "fusions": [fusion], "threads": n_threads, "parallel": False}
            cfg_path, res_path = Path(tmp) / f"{fusion}.json", Path(tmp) / f"{fusion}-result.json"
            cfg_path.write_text(json.dumps({"config": child, "out_dir": out_dir, "plot": plot}))
            procs.append((fusion, res_path, subprocess.Popen(
                [sys.executable, "-m", "minillm.demos.vqa_demo", str(cfg_path), str(res_path)], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)))
        log(f"training the fusions {', '.join(cfg.fusions)} side by side, {n_threads} thread(s) each")
        relay = [threading.Thread(target=_relay, args=(f, proc.stdout, log), daemon=True) for f, _, proc in procs]
        for t in relay:
            t.start()
        results = []
        for (fusion, res_path, proc), t in zip(procs, relay):
            rc = proc.wait()
            t.join()
            if rc != 0:
                raise RuntimeError(f"vqa-demo: the fusion={fusion} process failed (exit {rc}); its log is above")
            results.append(json.loads(res_path.read_text()))
    return results


def _relay(fusion: str, stream, log: Callable[[str], None]) -> None:
    for line in stream:
        line = line.rstrip("\n")
        if line:
            log(line if line.startswith("[fusion=") else f"[fusion={fusion}] {line.strip()}")


def _child_main(cfg_path: str, result_path: str) -> None:
    """The child side of _run_side_by_side: one fusion, result written as JSON (examples as lists)."""
    spec = json.loads(Path(cfg_path).read_text())
    c = spec["config"]
    cfg = VQADemoConfig(**{**c, "fusions": tuple(c["fusions"])})
    from minillm.train.device import pick_device
    torch.set_num_threads(cfg.threads)
    result = _run(cfg, pick_device(cfg.device), spec["out_dir"], spec["plot"], lambda m: print(m, flush=True),
                  tiny_encoders, report=False)
    Path(result_path).write_text(json.dumps(result[cfg.fusions[0]]))


def format_report(result: dict, fusions) -> str:
    cols = [f for f in fusions if f in result]
    lines = ["held-out exact-match accuracy (majority = each type's most common training answer):",
             f"  {'type':<10}{'majority':>10}" + "".join(f"{'fusion=' + f:>15}" for f in cols)]
    for qtype in list(shapes.QUESTION_TYPES) + ["overall"]:
        row = f"  {qtype:<10}{result['baseline'].get(qtype, float('nan')):>10.1%}"
        row += "".join(f"{result[f]['accuracy'].get(qtype, float('nan')):>15.1%}" for f in cols)
        lines.append(row)
    lines.append("  train time" + " " * 10 + "".join(f"{result[f]['seconds']:>14.0f}s" for f in cols))
    if "mean" in cols:
        lines.append("  fusion=mean (the book's) hands GPT-2 ONE fused vector: every cross-attention weight is then 1, so the\n"
                     "  decoder sees a linear map of one pooled vector, which cannot say which object sits where; shape\n"
                     "  and position stay near the majority baseline. fusion=tokens passes every projected token.")
    return "\n".join(lines)


def plot_examples(records: list[dict], predictions: list[str], probabilities: list[float], path: Path) -> Path:
    """A grid like the book's figure 9.7: each image with its question and the predicted answer + probability."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minillm.models.vqa import format_prediction

    n = len(records)
    cols = min(5, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 3.5 * rows), squeeze=False)  # room for 3-line titles
    for ax in axes.flat:
        ax.axis("off")
    for ax, r, p, q in zip(axes.flat, records, predictions, probabilities):
        ax.imshow(r["image"])
        ok = "" if p == r["answer"] else f"\n(true: {r['answer']})"
        ax.set_title(f"{r['question']}\n{format_prediction(p, q)}{ok}", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    _child_main(*sys.argv[1:3])
