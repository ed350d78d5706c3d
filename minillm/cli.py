"""The command line: `minillm <command> ...` (also `python -m minillm`).

Thin by design: each command parses its arguments, then calls library functions. One
function per command, `cmd_<name>(args)`, and one `add_<name>(subparsers)` beside it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a GPT-2 checkpoint")
    p.add_argument("--model", default="tiny-gpt2", help="checkpoint directory, weights/<name>, or hub id")
    p.add_argument("--prompt", default="The movie was", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    import torch

    from minillm.generation import generate
    from minillm.models.gpt2 import GPT2LMHeadModel
    from minillm.tokenizer import Tokenizer
    from minillm.train.device import pick_device

    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    model = GPT2LMHeadModel.from_pretrained(args.model, device=device).eval()
    tok = Tokenizer.from_pretrained(args.model)
    enc = tok([args.prompt], padding_side="left")
    out = generate(model, enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                   max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


def add_rlhf_demo(sub) -> None:
    p = sub.add_parser("rlhf-demo", help="offline RLHF end to end: SFT -> reward model -> PPO with a KL penalty")
    p.add_argument("--name", default="rlhf-demo", help="run name: results go to <out-dir>/<name>/")
    p.add_argument("--out-dir", default="runs")
    p.add_argument("--kl-coef", type=float, default=0.1, help="initial β of the KL penalty (0: off, shows reward hacking)")
    p.add_argument("--fixed-kl", action="store_true", help="keep β fixed (default: adaptive controller)")
    p.add_argument("--target-kl", type=float, default=3.0, help="adaptive controller's target, nats per response")
    p.add_argument("--kl-estimator", default="k1", choices=["k1", "abs", "mse", "k3", "full"])
    p.add_argument("--ppo-steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core box)")
    p.add_argument("--tiny", action="store_true", help="seconds-scale settings (a smoke run; numbers are rough)")
    p.set_defaults(func=cmd_rlhf_demo)


def cmd_rlhf_demo(args) -> int:
    from minillm.demos.rlhf_demo import DemoConfig, run_demo

    kw = dict(name=args.name, out_dir=args.out_dir, kl_coef=args.kl_coef, adaptive_kl=not args.fixed_kl,
              target_kl=args.target_kl, kl_estimator=args.kl_estimator, seed=args.seed, threads=args.threads)
    if not args.tiny:
        kw["ppo_steps"] = args.ppo_steps
    cfg = DemoConfig.tiny(**kw) if args.tiny else DemoConfig(**kw)
    run_demo(cfg)
    return 0


def add_train_reward(sub) -> None:
    p = sub.add_parser("train-reward", help="train a reward model (GPT-2 or BERT + scalar head) on preference pairs")
    p.add_argument("--model", required=True, help="backbone checkpoint: directory, weights/<name>, or hub id")
    p.add_argument("--data", required=True, help="pairs.jsonl: prompt, chosen, rejected [, margin | score_chosen, "
                                                 "score_rejected]")
    p.add_argument("--out", default="runs/reward-model", help="output directory")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--eval-frac", type=float, default=0.1, help="share of pairs held out for accuracy")
    p.add_argument("--center-coef", type=float, default=0.0, help="reward centering coefficient")
    p.add_argument("--no-margin", action="store_true", help="ignore margins (InstructGPT's loss)")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--lora-r", type=int, default=0, help="train LoRA adapters of this rank and the head (0: full "
                                                         "fine-tune); merged into the saved backbone")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default=None, help="comma-separated module names (default: all attention and "
                                                        "MLP linears: c_attn,c_proj,c_fc for GPT-2; query,key,value,"
                                                        "intermediate.dense,output.dense for BERT)")
    p.add_argument("--nf4", action="store_true", help="QLoRA: store the frozen backbone linears in NF4 (needs --lora-r)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_train_reward)


def cmd_train_reward(args) -> int:
    from minillm.rlhf.jobs import train_reward_job
    from minillm.train.device import pick_device

    rec = train_reward_job(args.model, args.data, args.out, epochs=args.epochs, batch_size=args.batch_size,
                           lr=args.lr, eval_frac=args.eval_frac, center_coef=args.center_coef,
                           use_margin=not args.no_margin, seed=args.seed, device=str(pick_device(args.device)),
                           max_length=args.max_length, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                           lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
                           if args.lora_targets else None, nf4=args.nf4)
    print(f"held-out pairwise accuracy: {rec['eval_acc']}")
    return 0


def add_ppo(sub) -> None:
    p = sub.add_parser("ppo", help="PPO of a GPT-2 policy against a reward model, with a KL penalty")
    p.add_argument("--policy", required=True, help="GPT-2 checkpoint (directory, weights/<name>, or hub id)")
    p.add_argument("--reward-model", required=True, help="directory written by `minillm train-reward`")
    p.add_argument("--prompts", required=True, help='prompts.jsonl: {"prompt": ...} per line')
    p.add_argument("--out", default="runs/ppo-policy")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mini-batch-size", type=int, default=16)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1.41e-5)
    p.add_argument("--kl-coef", type=float, default=0.2, help="initial β")
    p.add_argument("--fixed-kl", action="store_true")
    p.add_argument("--target-kl", type=float, default=6.0)
    p.add_argument("--horizon", type=float, default=10000.0)
    p.add_argument("--kl-estimator", default="k1", choices=["k1", "abs", "mse", "k3", "full"])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lora-r", type=int, default=0, help="train LoRA adapters of this rank (0: full fine-tune); the "
                                                         "reference is then the base with adapters disabled")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default="c_attn,c_proj,c_fc", help="comma-separated module names")
    p.add_argument("--nf4", action="store_true", help="QLoRA: store the frozen base linears in NF4 (needs --lora-r)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_ppo)


def cmd_ppo(args) -> int:
    from minillm.rlhf.jobs import ppo_job
    from minillm.rlhf.ppo import PPOConfig
    from minillm.train.device import pick_device

    cfg = PPOConfig(lr=args.lr, batch_size=args.batch_size, mini_batch_size=args.mini_batch_size,
                    ppo_epochs=args.ppo_epochs, init_kl_coef=args.kl_coef, adaptive_kl=not args.fixed_kl,
                    target_kl=args.target_kl, horizon=args.horizon, kl_estimator=args.kl_estimator,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    ppo_job(args.policy, args.reward_model, args.prompts, args.out, steps=args.steps, config=cfg, seed=args.seed,
            device=str(pick_device(args.device)), lora_r=args.lora_r, lora_alpha=args.lora_alpha,
            lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()), nf4=args.nf4)
    return 0


def add_attention(sub) -> None:
    p = sub.add_parser("attention", help="print one layer/head's attention weights for a sentence (BERT, DistilBERT)")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="checkpoint directory, weights/<name>, or hub id")
    p.add_argument("--text", default="I like cats")
    p.add_argument("--layer", type=int, default=0, help="0-based; negative counts from the last layer")
    p.add_argument("--head", type=int, default=0)
    p.add_argument("--no-special", action="store_true", help="encode without [CLS]/[SEP]")
    p.add_argument("--png", default=None, help="also write a heatmap here (needs the plots extra: matplotlib)")
    p.set_defaults(func=cmd_attention)


def cmd_attention(args) -> int:
    from minillm.attention_map import attention_map, format_table, save_heatmap
    from minillm.hub import CheckpointError

    try:
        tokens, weights = attention_map(args.model, args.text, args.layer, args.head,
                                        add_special_tokens=not args.no_special)
    except (ValueError, CheckpointError) as e:
        print(f"minillm attention: {e}", file=sys.stderr)
        return 2
    print(f"{args.model}: layer {args.layer}, head {args.head} (row = query, column = key; rows sum to 100%)")
    print(format_table(tokens, weights))
    if args.png:
        path = save_heatmap(tokens, weights, args.png, title=f"{args.model} layer {args.layer} head {args.head}")
        print(f"wrote {path}")
# ---- training: sft, classify ----
def _add_train_args(p, epochs: int, batch_size: int, lr: float) -> None:
    p.add_argument("--eval-data", default=None, help="JSONL/CSV evaluated every --eval-every steps and at the end")
    p.add_argument("--out", default=None, help="output directory (model, tokenizer, metrics.jsonl, checkpoints)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="examples per micro-batch (per process)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--max-length", type=int, default=None, help="truncate examples to this many tokens")
    p.add_argument("--group-by-length", action="store_true", help="batch similar lengths together")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)


def _train_config(args, out: str):
    from minillm.train.loop import TrainConfig
    return TrainConfig(lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                       schedule=args.schedule, epochs=args.epochs, max_steps=args.max_steps,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm,
                       precision=args.precision, group_by_length=args.group_by_length, eval_every=args.eval_every,
                       log_every=args.log_every, save_every=args.save_every, out_dir=out, seed=args.seed,
                       device=args.device, resume=args.resume)


def add_sft(sub) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning of a GPT-2 checkpoint (full, LoRA, or QLoRA)",
                       description="Records: {prompt, completion} | {english, latex} (the book's LaTeX format) | "
                                   "{messages: [{role, content}...]} (the ###HUMAN###/###BOT###/###STOP### chat "
                                   "format) | {text}. Runs under torchrun for DDP.")
    p.add_argument("--model", default="tiny-gpt2", help="checkpoint directory, weights/<name>, or hub id")
    p.add_argument("--data", required=True, help="training JSONL or CSV")
    p.add_argument("--completion-only", action="store_true", help="loss only on the final response")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="c_attn", help="comma-separated module names to adapt")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="freeze the base in NF4 (QLoRA; needs --lora-r)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block's activations in backward (less memory, ~1 more forward)")
    _add_train_args(p, epochs=1, batch_size=1, lr=5e-5)
    p.set_defaults(func=cmd_sft)


def cmd_sft(args) -> int:
    import json
    from pathlib import Path

    import torch

    from minillm.models.gpt2 import GPT2LMHeadModel
    from minillm.tokenizer import Tokenizer
    from minillm.train.data import CausalLMCollator, add_chat_tokens, encode_sft, read_records
    from minillm.train.loop import causal_lm_loss, evaluate, setup_distributed, teardown_distributed, train

    if args.quantize and not args.lora_r:
        raise SystemExit("--quantize nf4 freezes the base weights: it needs --lora-r (QLoRA)")
    out = args.out or "sft-out"
    rank, _ = setup_distributed()
    # Everything that can fail on bad data happens here, before any training.
    records = read_records(args.data)
    eval_records = read_records(args.eval_data) if args.eval_data else []
    model = GPT2LMHeadModel.from_pretrained(args.model)
    tok = Tokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    chat = any("messages" in r for r in records + eval_records)
    if chat:
        add_chat_tokens(tok, model)
    max_length = args.max_length or model.config.n_positions
    train_set = encode_sft(records, tok, max_length, args.completion_only)
    eval_set = encode_sft(eval_records, tok, max_length, args.completion_only) if eval_records else None
    if args.lora_r:
        from minillm.lora import apply_lora, merge_and_unload, save_adapter
        if args.quantize:
            from minillm.nf4 import quantize_model
            compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
            quantize_model(model, compute_dtype=compute)  # the book's QLoRA: NF4, bf16 compute, no double quant
        apply_lora(model, [t.strip() for t in args.lora_targets.split(",") if t.strip()], r=args.lora_r,
                   alpha=args.lora_alpha, dropout=args.lora_dropout)
        if chat:  # the new chat-token rows must learn (peft's modules_to_save for the embeddings)
            model.transformer.wte.weight.requires_grad_(True)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    collate = CausalLMCollator(tok.pad_token_id)
    eval_fn = (lambda m: evaluate(m, eval_set, collate, causal_lm_loss, args.batch_size)) if eval_set else None
    result = train(model, train_set, collate, causal_lm_loss, _train_config(args, out), eval_fn=eval_fn,
                   lengths=[len(e["input_ids"]) for e in train_set])
    if rank == 0:
        if args.lora_r:
            save_adapter(model, Path(out) / "adapter")
            merge_and_unload(model)
        model.cpu().save_pretrained(out)
        tok.save_pretrained(out)
        summary = {"steps": result.step, "first_loss": result.losses[0] if result.losses else None,
                   "final_loss": result.losses[-1] if result.losses else None, "evals": result.evals}
        Path(out, "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"saved {out} (load with GPT2LMHeadModel.from_pretrained); final loss "
              f"{summary['final_loss']:.4f}" if result.losses else f"saved {out}")
    teardown_distributed()
    return 0


def add_classify(sub) -> None:
    p = sub.add_parser("classify", help="multi-label classification fine-tuning of BERT / DistilBERT",
                       description="Records {text, labels}: labels a JSON list of names or, in CSV, names "
                                   "separated by ';'. Reports micro F1, micro Jaccard, subset accuracy, micro ROC-AUC.")
    p.add_argument("--model", default="tiny-distilbert", help="BERT or DistilBERT checkpoint")
    p.add_argument("--data", required=True, help="training JSONL or CSV")
    p.add_argument("--text-key", default="text")
    p.add_argument("--labels-key", default="labels")
    p.add_argument("--labels", default=None, help="comma-separated label set (default: those in --data)")
    p.add_argument("--freeze-up-to", type=int, default=None,
                   help="freeze the embeddings and encoder layers 0..N-1 (the book freezes up to layer 4 of 6)")
    p.add_argument("--threshold", type=float, default=0.5)
    _add_train_args(p, epochs=1, batch_size=8, lr=5e-5)
    p.set_defaults(func=cmd_classify)


def cmd_classify(args) -> int:
    import json
    from pathlib import Path

    import torch
    import torch.nn.functional as F

    from minillm import hub
    from minillm.tokenizer import Tokenizer
    from minillm.train.data import ClassificationCollator, encode_classification, label_set, read_records
    from minillm.train.loop import setup_distributed, teardown_distributed, to_device, train
    from minillm.train.metrics import multilabel_metrics

    try:
        from minillm.models.bert import BertForSequenceClassification
        from minillm.models.distilbert import DistilBertForSequenceClassification
        from minillm.train.freezing import freeze_below_layer
    except ImportError:
        raise SystemExit("classify needs minillm.models.bert / distilbert / heads, which this checkout does not "
                         "have yet") from None
    out = args.out or "classify-out"
    rank, _ = setup_distributed()
    records = read_records(args.data)
    eval_records = read_records(args.eval_data) if args.eval_data else []
    names = [n.strip() for n in args.labels.split(",")] if args.labels else label_set(records, args.labels_key)
    d = hub.resolve(args.model)
    kind = hub.read_config(d).get("model_type")
    classes = {"bert": BertForSequenceClassification, "distilbert": DistilBertForSequenceClassification}
    if kind not in classes:
        raise SystemExit(f"{d}: model_type {kind!r}; classify supports {sorted(classes)}")
    tok = Tokenizer.from_pretrained(str(d))
    max_length = args.max_length or tok.model_max_length or 512
    train_set = encode_classification(records, tok, names, max_length, args.text_key, args.labels_key)
    eval_set = encode_classification(eval_records, tok, names, max_length, args.text_key,
                                     args.labels_key) if eval_records else None
    model = classes[kind].from_pretrained(str(d), num_labels=len(names), problem_type="multi_label_classification",
                                          id2label={str(i): n for i, n in enumerate(names)},
                                          label2id={n: i for i, n in enumerate(names)})
    if args.freeze_up_to is not None:
        frozen = freeze_below_layer(model, args.freeze_up_to)
        if rank == 0:
            print(f"froze {frozen} parameter tensors (embeddings + layers < {args.freeze_up_to})")
    collate = ClassificationCollator(tok.pad_token_id if tok.pad_token_id is not None else 0)

    def loss_fn(m, batch):  # BCE summed over every (example, label); the loop divides by their count
        logits = m(batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.binary_cross_entropy_with_logits(logits.float(), batch["labels"], reduction="sum"), batch["labels"].numel()

    def eval_fn(m):
        device = next(m.parameters()).device
        logits, targets = [], []
        for i in range(0, len(eval_set), args.batch_size):
            b = to_device(collate(eval_set[i:i + args.batch_size]), device)
            logits.append(m(b["input_ids"], attention_mask=b["attention_mask"]).float().cpu())
            targets.append(b["labels"].cpu())
        logits, targets = torch.cat(logits), torch.cat(targets)
        return {"loss": float(F.binary_cross_entropy_with_logits(logits, targets)),
                **multilabel_metrics(logits, targets, args.threshold)}

    result = train(model, train_set, collate, loss_fn, _train_config(args, out),
                   eval_fn=eval_fn if eval_set else None, lengths=[len(e["input_ids"]) for e in train_set])
    if rank == 0:
        model.cpu().save_pretrained(out)
        tok.save_pretrained(out)
        final = result.evals[-1] if result.evals else {}
        Path(out, "train_summary.json").write_text(json.dumps(
            {"labels": names, "steps": result.step, "final_loss": result.losses[-1], "eval": final}, indent=2) + "\n")
        print(" | ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float)) or f"saved {out}")
    teardown_distributed()
    return 0


def add_vqa_demo(sub) -> None:
    p = sub.add_parser("vqa-demo", help="train a tiny ViT + DistilBERT + GPT-2 VQA model on synthetic shapes (CPU, minutes)")
    p.add_argument("--images", type=int, default=None, help="synthetic scenes (5 questions each, 20%% held out)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--fusion", choices=["mean", "tokens", "both"], default="both",
                   help="mean: the book's one fused vector; tokens: every projected token; both: compare")
    p.add_argument("--out-dir", default="runs/vqa-demo", help="where the example figure goes (needs the plots extra)")
    p.add_argument("--no-plot", action="store_true", help="skip the figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_vqa_demo)


def cmd_vqa_demo(args) -> int:
    from minillm.demos.vqa_demo import VQADemoConfig, run_vqa_demo

    cfg = VQADemoConfig(seed=args.seed, device=args.device, threads=args.threads,
                        fusions=("mean", "tokens") if args.fusion == "both" else (args.fusion,))
    if args.images is not None:
        cfg.n_images = args.images
    if args.epochs is not None:
        cfg.epochs = args.epochs
    plot = not args.no_plot
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("(no figure: matplotlib is not installed; pip install 'minillm[plots]')")
            plot = False
    run_vqa_demo(cfg, out_dir=args.out_dir, plot=plot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="minillm", description="minillm: LLM fine-tuning machinery, written out.")
    sub = ap.add_subparsers(dest="command", required=True)
    add_generate(sub)
    add_rlhf_demo(sub)
    add_train_reward(sub)
    add_ppo(sub)
    add_attention(sub)
    add_sft(sub)
    add_classify(sub)
    add_vqa_demo(sub)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
