"""The command line: `minillm <command> ...` (also `python -m minillm`).

Each command parses its arguments and makes one library call; the recipes live in jobs modules
(train/jobs.py, rlhf/jobs.py, the demos). Options that set a config dataclass are generated from its
fields (one name per concept across commands: --out, --lora-r, --quantize, --seed, --device), and
choices come from the library's own constants.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Any, Optional

DATA_FORMATS = ("Records: {prompt, completion} | {english, latex} (the book's LaTeX prompt) | {messages: [{role, "
                "content}, ...]} (roles human/user, bot/assistant; the ###HUMAN###/###BOT###/###STOP### chat format) | "
                "{text}. A T5 checkpoint takes {input, target} (or {prompt, completion}, {english, latex}). "
                "Runs under torchrun for DDP.")


# ---- options generated from config dataclasses ----
def _field_type(cls, f: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and typing.get_origin(hint) is typing.Union else hint


def add_config_args(p: argparse.ArgumentParser, cls, names: list[str], defaults: Optional[dict] = None,
                    help: Optional[dict] = None, choices: Optional[dict] = None, flags: Optional[dict] = None) -> None:
    """--field-name for each named field of `cls` (or the flag `flags` gives it, so that one concept has one name
    across commands): type and default from the dataclass (or `defaults`); bools become --flag / --no-flag."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults, help, choices, flags = defaults or {}, help or {}, choices or {}, flags or {}
    for name in names:
        f = fields[name]
        default = defaults.get(name, f.default)
        flag = flags.get(name, "--" + name.replace("_", "-"))
        typ = _field_type(cls, f)
        kw = dict(dest=name, default=default, help=help.get(name))
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(typ) in (list, tuple) or name == "lora_targets":
            p.add_argument(flag, type=lambda s: tuple(t.strip() for t in s.split(",") if t.strip()), **kw,
                           metavar="NAME,NAME")
        else:
            p.add_argument(flag, type=typ if typ in (int, float, str) else str, choices=choices.get(name), **kw)


def config_from_args(cls, args: argparse.Namespace, **extra):
    """Build `cls` from the parsed arguments that name its fields (plus `extra`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **extra)


def add_adapter_args(p: argparse.ArgumentParser) -> None:
    from minillm.lora import QUANTIZATIONS, AdapterConfig
    add_config_args(p, AdapterConfig, ["lora_r", "lora_alpha", "lora_dropout", "lora_targets", "quantize"],
                    help={"lora_r": "LoRA rank (0: full fine-tuning)",
                          "lora_targets": "module names to adapt (default: the model's attention and MLP linears)",
                          "quantize": "nf4: the frozen base in 4 bits (QLoRA; needs --lora-r)"},
                    choices={"quantize": [q for q in QUANTIZATIONS if q]})


def add_train_args(p: argparse.ArgumentParser, **defaults) -> None:
    from minillm.train.loop import PRECISIONS, TrainConfig
    from minillm.train.schedule import SCHEDULES
    add_config_args(p, TrainConfig, ["epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay",
                                     "warmup_steps", "schedule", "max_grad_norm", "precision", "group_by_length",
                                     "eval_every", "log_every", "save_every", "resume", "seed", "device"],
                    defaults=defaults,
                    help={"max_steps": "optimizer steps (overrides --epochs)",
                          "batch_size": "examples per micro-batch (per process)",
                          "grad_accum": "micro-batches per optimizer step", "resume": "continue from <out>/checkpoints",
                          "save_every": "checkpoint every N steps (and at the end)"},
                    choices={"schedule": SCHEDULES, "precision": list(PRECISIONS)})
    p.add_argument("--eval-data", default=None, help="JSONL/CSV evaluated every --eval-every steps and at the end")
    p.add_argument("--max-length", type=int, default=None, help="truncate examples to this many tokens")


# ---- commands ----
def cmd_generate(args) -> int:
    from minillm.inference import generate_text
    print(generate_text(args.model, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        device=args.device))
    return 0


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a causal LM checkpoint")
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


def cmd_attention(args) -> int:
    from minillm.attention_map import show_attention
    show_attention(args.model, args.text, args.layer, args.head, add_special_tokens=not args.no_special,
                   png=args.png)
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


def cmd_sft(args) -> int:
    from minillm.lora import AdapterConfig
    from minillm.train.jobs import sft_job
    from minillm.train.loop import TrainConfig
    s = sft_job(args.model, args.data, args.out, config_from_args(TrainConfig, args, out_dir=args.out),
                config_from_args(AdapterConfig, args), eval_data=args.eval_data,
                completion_only=args.completion_only, max_length=args.max_length,
                gradient_checkpointing=args.gradient_checkpointing)
    print(f"saved {args.out} (final loss {s['final_loss']:.4f})" if s["final_loss"] is not None else f"saved {args.out}")
    return 0


def add_sft(sub) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning of a causal LM or T5 (full, LoRA, or QLoRA)",
                       description=DATA_FORMATS)
    p.add_argument("--model", default="tiny-gpt2", help="checkpoint directory, weights/<name>, or hub id")
    p.add_argument("--data", required=True, help="training JSONL or CSV")
    p.add_argument("--out", default="runs/sft", help="output directory (model, tokenizer, metrics.jsonl, checkpoints)")
    p.add_argument("--completion-only", action="store_true", help="loss only on the final response")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block's activations in backward (less memory, ~1 more forward)")
    add_adapter_args(p)
    add_train_args(p, epochs=1, batch_size=1, lr=5e-5)
    p.set_defaults(func=cmd_sft)


def cmd_classify(args) -> int:
    from minillm.train.jobs import classify_job
    from minillm.train.loop import TrainConfig
    s = classify_job(args.model, args.data, args.out, config_from_args(TrainConfig, args, out_dir=args.out),
                     eval_data=args.eval_data, labels=args.labels, text_key=args.text_key, labels_key=args.labels_key,
                     freeze_up_to=args.freeze_up_to, threshold=args.threshold, max_length=args.max_length)
    print(" | ".join(f"{k} {v:.4f}" for k, v in s["eval"].items() if isinstance(v, float)) or f"saved {args.out}")
    return 0


def add_classify(sub) -> None:
    p = sub.add_parser("classify", help="multi-label classification fine-tuning of an encoder (BERT, DistilBERT)",
                       description="Records {text, labels}: labels a JSON list of names or, in CSV, names "
                                   "separated by ';'. Reports micro F1, micro Jaccard, subset accuracy, micro ROC-AUC.")
    p.add_argument("--model", default="tiny-distilbert", help="encoder checkpoint")
    p.add_argument("--data", required=True, help="training JSONL or CSV")
    p.add_argument("--out", default="runs/classify", help="output directory")
    p.add_argument("--text-key", default="text")
    p.add_argument("--labels-key", default="labels")
    p.add_argument("--labels", default=None, type=lambda s: [n.strip() for n in s.split(",")],
                   help="comma-separated label set (default: those in --data)")
    p.add_argument("--freeze-up-to", type=int, default=None,
                   help="freeze the embeddings and encoder layers 0..N-1 (the book freezes up to layer 4 of 6)")
    p.add_argument("--threshold", type=float, default=0.5)
    add_train_args(p, epochs=1, batch_size=8, lr=5e-5)
    p.set_defaults(func=cmd_classify)


def cmd_evaluate(args) -> int:
    from minillm.evaluation import evaluate_rouge
    s = evaluate_rouge(args.model, args.data, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       device=args.device)
    print(" | ".join(f"{k} {s[k]:.4f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")) + f" (n={s['n']})")
    return 0


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="greedy-generate for each record and score against its target (ROUGE)",
                       description="Records {input, target} | {prompt, completion} | {english, latex}. Encoder-"
                                   "decoder (T5) or causal LM checkpoints. Prints mean F1 of rouge1/2/L/Lsum.")
    p.add_argument("--model", required=True, help="checkpoint directory, weights/<name>, or hub id")
    p.add_argument("--data", required=True, help="JSONL or CSV")
    p.add_argument("--metric", default="rouge", choices=["rouge"])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_evaluate)


def cmd_train_reward(args) -> int:
    from minillm.lora import AdapterConfig
    from minillm.rlhf.jobs import train_reward_job
    rec = train_reward_job(args.model, args.data, args.out, epochs=args.epochs, batch_size=args.batch_size,
                           lr=args.lr, eval_frac=args.eval_frac, center_coef=args.center_coef,
                           use_margin=not args.no_margin, seed=args.seed, device=args.device,
                           max_length=args.max_length, adapters=config_from_args(AdapterConfig, args))
    print(f"held-out pairwise accuracy: {rec['eval_acc']:.3f}; reward model saved to {args.out}"
          if rec["eval_acc"] is not None else f"reward model saved to {args.out}")
    return 0


def add_train_reward(sub) -> None:
    p = sub.add_parser("train-reward", help="train a reward model (a causal LM or an encoder + scalar head) on "
                                            "preference pairs")
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    add_adapter_args(p)
    p.set_defaults(func=cmd_train_reward)


def cmd_ppo(args) -> int:
    from minillm.lora import AdapterConfig
    from minillm.rlhf.jobs import ppo_job
    from minillm.rlhf.ppo import PPOConfig
    ppo_job(args.policy, args.reward_model, args.prompts, args.out, steps=args.steps,
            config=config_from_args(PPOConfig, args), seed=args.seed, device=args.device,
            adapters=config_from_args(AdapterConfig, args))
    print(f"policy saved to {args.out}")
    return 0


def add_ppo(sub) -> None:
    from minillm.rlhf.kl import KL_ESTIMATORS
    from minillm.rlhf.ppo import PPOConfig
    p = sub.add_parser("ppo", help="PPO of a causal LM policy against a reward model, with a KL penalty")
    p.add_argument("--policy", required=True, help="causal LM checkpoint (directory, weights/<name>, or hub id)")
    p.add_argument("--reward-model", required=True, help="directory written by `minillm train-reward`")
    p.add_argument("--prompts", required=True, help='prompts.jsonl: {"prompt": ...} per line')
    p.add_argument("--out", default="runs/ppo-policy")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    add_config_args(p, PPOConfig, ["lr", "batch_size", "mini_batch_size", "ppo_epochs", "init_kl_coef", "adaptive_kl",
                                   "target_kl", "horizon", "kl_estimator", "max_new_tokens", "temperature"],
                    defaults={"max_new_tokens": 32}, help={"init_kl_coef": "initial β of the KL penalty"},
                    choices={"kl_estimator": KL_ESTIMATORS}, flags={"init_kl_coef": "--kl-coef"})
    add_adapter_args(p)
    p.set_defaults(func=cmd_ppo)


def cmd_rlhf_demo(args) -> int:
    from minillm.demos.rlhf_demo import DemoConfig, run_demo
    from minillm.rlhf.ppo import PPOConfig
    names = {f.name for f in dataclasses.fields(DemoConfig)} | {f.name for f in dataclasses.fields(PPOConfig)}
    run_demo(DemoConfig.make(args.tiny, **{k: v for k, v in vars(args).items() if k in names and v is not None}))
    return 0


def add_rlhf_demo(sub) -> None:
    from minillm.demos.rlhf_demo import DemoConfig
    from minillm.rlhf.kl import KL_ESTIMATORS
    from minillm.rlhf.ppo import PPOConfig
    p = sub.add_parser("rlhf-demo", help="offline RLHF end to end: SFT -> reward model -> PPO with a KL penalty")
    add_config_args(p, DemoConfig, ["out", "ppo_steps", "seed", "threads"], defaults={"ppo_steps": None},
                    help={"threads": "torch CPU threads (1 is fastest on a busy 2-core box)"})
    add_config_args(p, PPOConfig, ["init_kl_coef", "adaptive_kl", "target_kl", "kl_estimator"],
                    defaults={n: None for n in ("init_kl_coef", "adaptive_kl", "target_kl", "kl_estimator")},
                    help={"init_kl_coef": "initial β of the KL penalty (0: off, shows reward hacking)",
                          "target_kl": "adaptive controller's target, nats per response"},
                    choices={"kl_estimator": KL_ESTIMATORS}, flags={"init_kl_coef": "--kl-coef"})
    p.add_argument("--tiny", action="store_true", help="seconds-scale settings (a smoke run; numbers are rough)")
    p.set_defaults(func=cmd_rlhf_demo)


def cmd_vqa_demo(args) -> int:
    from minillm.demos.vqa_demo import VQADemoConfig, run_vqa_demo
    fusions = ("mean", "tokens") if args.fusion == "both" else (args.fusion,)
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(VQADemoConfig)}
             and v is not None}
    run_vqa_demo(VQADemoConfig(**given, fusions=fusions), out_dir=args.out, plot=not args.no_plot)
    return 0


def add_vqa_demo(sub) -> None:
    from minillm.demos.vqa_demo import VQADemoConfig
    p = sub.add_parser("vqa-demo", help="train a tiny ViT + DistilBERT + GPT-2 VQA model on synthetic shapes (CPU, minutes)")
    add_config_args(p, VQADemoConfig, ["n_images", "epochs", "seed", "threads", "device"],
                    defaults={"n_images": None, "epochs": None},
                    help={"n_images": "synthetic scenes (5 questions each, 20%% held out)"})
    p.add_argument("--fusion", choices=["mean", "tokens", "both"], default="both",
                   help="mean: the book's one fused vector; tokens: every projected token; both: compare")
    p.add_argument("--out", default="runs/vqa-demo", help="where the example figures go (needs the plots extra)")
    p.add_argument("--no-plot", action="store_true", help="skip the figures")
    p.set_defaults(func=cmd_vqa_demo)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="minillm", description="minillm: LLM fine-tuning machinery, written out.")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = ap.add_subparsers(dest="command", required=True)
    for add in (add_generate, add_rlhf_demo, add_train_reward, add_ppo, add_attention, add_sft, add_classify,
                add_evaluate, add_vqa_demo):
        add(sub)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    """Run a command. Errors become one or two lines on stderr, no traceback (--debug or MINILLM_DEBUG=1 shows
    it): exit 2 for bad input (data, checkpoint, arguments), 1 for failures while running, 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"minillm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — every error is reported the same way
        if args.debug or os.environ.get("MINILLM_DEBUG"):
            raise
        lines = str(e).strip().splitlines() or [type(e).__name__]
        if isinstance(e, OSError) and e.filename and str(e.filename) not in lines[0]:
            lines[0] += f": {e.filename}"  # disk full, read-only: always the path
        more = f" (+{len(lines) - 2} more lines; --debug shows all)" if len(lines) > 2 else ""
        print(f"minillm {args.command}: {lines[0]}" + (f"\n  {lines[1].strip()}{more}" if len(lines) > 1 else ""),
              file=sys.stderr)
        # 2: the input is wrong (data, checkpoint, arguments, a missing file); 1: running failed (NaN loss,
        # disk full, a read-only or locked output directory, no permission to write)
        bad_input = isinstance(e, (ValueError, TypeError, LookupError, FileNotFoundError, IsADirectoryError,
                                   NotADirectoryError)) and not isinstance(e, FloatingPointError)
        return 2 if bad_input else 1


if __name__ == "__main__":
    sys.exit(main())
