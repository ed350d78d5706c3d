"""The command line: `minillm <command> ...` (also `python -m minillm`).

Each command parses its arguments and makes one library call; the recipes live in jobs modules (train/jobs.py,
rlhf/jobs.py, the demos). Options are generated from the config dataclasses and library signatures (cli_args.py),
one name per concept across commands (--out, --lora-r, --quantize, --seed, --device); choices are the library's.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from minillm.cli_args import (DATA_FORMATS, add_adapter_args, add_config_args, add_function_args, add_prompt_tuning_args,
                             add_train_args, base_parser, config_from_args, function_kwargs, given_fields, report_error)


# ---- commands ----
def cmd_generate(args) -> int:
    from minillm.inference import generate_text
    print(generate_text(args.model, args.prompt, **function_kwargs(generate_text, args)))
    return 0


def add_generate(sub) -> None:
    from minillm.inference import generate_text
    p = sub.add_parser("generate", help="continue a prompt with a causal LM (or answer it with a T5) checkpoint")
    p.add_argument("--model", default="tiny-gpt2", help="checkpoint directory, weights/<name>, or hub id")
    p.add_argument("--prompt", default="The movie was", help="text to continue")
    add_function_args(p, generate_text, ["max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed",
                                         "device", "prepack"],
                      help={"prepack": "CPU: pack the big weights once for faster decoding (one more copy of them)"})
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
    from minillm.prompt_tuning import PromptTuningConfig
    from minillm.train.jobs import sft_job
    from minillm.train.loop import TrainConfig
    s = sft_job(args.model, args.data, args.out, config_from_args(TrainConfig, args, out_dir=args.out),
                config_from_args(AdapterConfig, args), prompt_tuning=config_from_args(PromptTuningConfig, args),
                **function_kwargs(sft_job, args))
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
    p.add_argument("--chat-format", choices=["sawyer", "llama3"], default=None,
                   help="how {messages} records are written (default: llama3 when the tokenizer has Llama-3's chat "
                        "tokens, else the book's ###HUMAN### format)")
    add_adapter_args(p)
    add_prompt_tuning_args(p)
    add_train_args(p, epochs=1, batch_size=1, lr=5e-5)
    p.set_defaults(func=cmd_sft)


def cmd_classify(args) -> int:
    from minillm.train.jobs import classify_job
    from minillm.train.loop import TrainConfig
    s = classify_job(args.model, args.data, args.out, config_from_args(TrainConfig, args, out_dir=args.out),
                     **function_kwargs(classify_job, args))
    print(" | ".join(f"{k} {v:.4f}" for k, v in s["eval"].items() if isinstance(v, float)) or f"saved {args.out}")
    return 0


def add_classify(sub) -> None:
    from minillm.train.jobs import classify_job
    p = sub.add_parser("classify", help="multi-label classification fine-tuning of an encoder (BERT, DistilBERT)",
                       description="Records {text, labels}: labels a JSON list of names or, in CSV, names "
                                   "separated by ';'. Reports micro F1, micro Jaccard, subset accuracy, micro ROC-AUC.")
    p.add_argument("--model", default="tiny-distilbert", help="encoder checkpoint")
    p.add_argument("--data", required=True, help="training JSONL or CSV")
    p.add_argument("--out", default="runs/classify", help="output directory")
    p.add_argument("--labels", default=None, type=lambda s: [n.strip() for n in s.split(",")],
                   help="comma-separated label set (default: those in --data)")
    add_function_args(p, classify_job, ["text_key", "labels_key", "freeze_up_to", "threshold"],
                      help={"freeze_up_to": "freeze the embeddings and encoder layers 0..N-1 (the book: 4 of 6)"})
    add_train_args(p, epochs=1, batch_size=8, lr=5e-5)
    p.set_defaults(func=cmd_classify)


def cmd_evaluate(args) -> int:
    from minillm.evaluation import evaluate_rouge
    s = evaluate_rouge(args.model, args.data, **function_kwargs(evaluate_rouge, args))
    print(" | ".join(f"{k} {s[k]:.4f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")) + f" (n={s['n']})")
    return 0


def add_evaluate(sub) -> None:
    from minillm.evaluation import evaluate_rouge
    p = sub.add_parser("evaluate", help="greedy-generate for each record and score against its target (ROUGE)",
                       description="Records {input, target} | {prompt, completion} | {english, latex}. Encoder-"
                                   "decoder (T5) or causal LM checkpoints. Prints mean F1 of rouge1/2/L/Lsum.")
    p.add_argument("--model", required=True, help="checkpoint directory, weights/<name>, or hub id")
    p.add_argument("--data", required=True, help="JSONL or CSV")
    p.add_argument("--metric", default="rouge", choices=["rouge"])
    add_function_args(p, evaluate_rouge, ["max_new_tokens", "batch_size", "device"])
    p.set_defaults(func=cmd_evaluate)


def cmd_train_reward(args) -> int:
    from minillm.lora import AdapterConfig
    from minillm.rlhf.jobs import train_reward_job
    rec = train_reward_job(args.model, args.data, args.out, adapters=config_from_args(AdapterConfig, args),
                           **function_kwargs(train_reward_job, args))
    print(f"held-out pairwise accuracy: {rec['eval_acc']:.3f}; reward model saved to {args.out}"
          if rec["eval_acc"] is not None else f"reward model saved to {args.out}")
    return 0


def add_train_reward(sub) -> None:
    from minillm.rlhf.jobs import train_reward_job
    p = sub.add_parser("train-reward", help="train a reward model (a causal LM or an encoder + scalar head) on "
                                            "preference pairs")
    p.add_argument("--model", required=True, help="backbone checkpoint: directory, weights/<name>, or hub id")
    p.add_argument("--data", required=True, help="pairs.jsonl: prompt, chosen, rejected [, margin | score_chosen, "
                                                 "score_rejected]")
    p.add_argument("--out", default="runs/reward-model", help="output directory")
    add_function_args(p, train_reward_job, ["epochs", "batch_size", "lr", "eval_frac", "center_coef", "use_margin",
                                            "max_length", "seed", "device"],
                      help={"eval_frac": "share of pairs held out for accuracy",
                            "center_coef": "reward centering coefficient",
                            "use_margin": "--no-use-margin: ignore margins (InstructGPT's loss)"})
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
    run_demo(DemoConfig.make(args.tiny, **given_fields(args, DemoConfig, PPOConfig)))
    return 0


def add_rlhf_demo(sub) -> None:
    from minillm.demos.rlhf_demo import DemoConfig
    from minillm.rlhf.kl import KL_ESTIMATORS
    from minillm.rlhf.ppo import PPOConfig
    p = sub.add_parser("rlhf-demo", help="offline RLHF end to end: SFT -> reward model -> PPO with a KL penalty")
    add_config_args(p, DemoConfig, ["out", "ppo_steps", "seed", "threads", "policy", "rm_backbone"],
                    defaults={"ppo_steps": None, "policy": None, "rm_backbone": None},
                    help={"threads": "torch CPU threads (1 is fastest on a busy 2-core box)",
                          "policy": "gpt2 (default) | llama (SAWYER: QLoRA SFT in the ###HUMAN### format, RoBERTa "
                                    "reward model, PPO mb 8 x accumulation 4) | a causal-LM hub name or directory",
                          "rm_backbone": "bert | roberta | gpt2 | a hub name or directory (e.g. roberta-base)"})
    add_config_args(p, PPOConfig, ["init_kl_coef", "adaptive_kl", "target_kl", "kl_estimator"],
                    defaults={n: None for n in ("init_kl_coef", "adaptive_kl", "target_kl", "kl_estimator")},
                    help={"init_kl_coef": "initial β of the KL penalty (0: off, shows reward hacking)",
                          "target_kl": "adaptive controller's target, nats per response"},
                    choices={"kl_estimator": KL_ESTIMATORS}, flags={"init_kl_coef": "--kl-coef"})
    p.add_argument("--tiny", action="store_true", help="seconds-scale settings (a smoke run; numbers are rough)")
    p.set_defaults(func=cmd_rlhf_demo)


def cmd_rlf_demo(args) -> int:
    from minillm.demos.rlf_demo import RLFDemoConfig, run_rlf_demo
    from minillm.rlhf.ppo import PPOConfig
    run_rlf_demo(RLFDemoConfig.make(args.tiny, **given_fields(args, RLFDemoConfig, PPOConfig)))
    return 0


def add_rlf_demo(sub) -> None:
    from minillm.demos.rlf_demo import RLFDemoConfig
    from minillm.rlhf.ppo import PPOConfig
    p = sub.add_parser("rlf-demo", help="the book's ch. 9 loop offline: PPO on a T5 summarizer, reward = weighted "
                                        "classifier logits, KL penalty")
    add_config_args(p, RLFDemoConfig, ["out", "ppo_steps", "seed", "threads", "policy", "grammar", "sentiment", "device"],
                    defaults={"ppo_steps": None},
                    help={"policy": "seq2seq checkpoint (e.g. google/flan-t5-small); default: a tiny T5 taught here"})
    add_config_args(p, PPOConfig, ["init_kl_coef", "target_kl"], defaults={"init_kl_coef": None, "target_kl": None},
                    help={"init_kl_coef": "initial β of the KL penalty (0: off, shows what it prevents)"},
                    flags={"init_kl_coef": "--kl-coef"})
    p.add_argument("--reward-classifier", dest="reward_classifiers", action="append", metavar="DIR:LABEL:WEIGHT",
                   help="a reward term (repeatable); replaces the grammar + sentiment classifiers")
    p.add_argument("--tiny", action="store_true", help="seconds-scale settings (a smoke run; numbers are rough)")
    p.set_defaults(func=cmd_rlf_demo)


def cmd_vqa_demo(args) -> int:
    from minillm.demos.vqa_demo import VQADemoConfig, run_vqa_demo
    fusions = ("mean", "tokens") if args.fusion == "both" else (args.fusion,)
    run_vqa_demo(VQADemoConfig(**given_fields(args, VQADemoConfig), fusions=fusions), out_dir=args.out,
                 plot=not args.no_plot)
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


def cmd_distill(args) -> int:
    from minillm.distill import distill
    s = distill(args.teacher, args.student, args.data, args.out, **function_kwargs(distill, args))
    print(f"student saved to {args.out} (loss {s['first_loss']:.4f} -> {s['final_loss']:.4f})")
    return 0


def add_distill(sub) -> None:
    from minillm.distill import distill
    p = sub.add_parser("distill", help="distil a causal LM teacher into a student (soft targets at temperature T)",
                       description="loss = α·T²·KL(teacher_T ‖ student_T) + (1−α)·CE. " + DATA_FORMATS)
    p.add_argument("--teacher", required=True, help="teacher checkpoint (GPT-2)")
    p.add_argument("--student", required=True, help="student checkpoint (GPT-2, the teacher's tokenizer)")
    p.add_argument("--data", required=True, help="training JSONL or CSV")
    p.add_argument("--out", default="runs/distill", help="where the trained student goes")
    add_function_args(p, distill, ["temperature", "alpha", "completion_only", "max_length", "epochs", "lr",
                                   "batch_size", "seed", "device"], help={"alpha": "weight of the soft term"})
    p.set_defaults(func=cmd_distill)


def cmd_memory(args) -> int:
    from minillm.memory import estimate_memory, memory_report
    print(memory_report(args.model, **function_kwargs(estimate_memory, args)))
    return 0


def add_memory(sub) -> None:
    from minillm.memory import DTYPE_BYTES, OPTIMIZER_BYTES, QUANT_BYTES, estimate_memory
    p = sub.add_parser("memory", help="training memory (weights, gradients, optimizer, activations) and compute")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="checkpoint (its config.json: layer shapes, activations modelled)")
    g.add_argument("--params", type=float, help="a parameter count, e.g. 1e9 (the course's per-parameter rule)")
    add_function_args(p, estimate_memory, ["dtype", "optimizer", "lora_r", "quantize", "gradient_checkpointing",
                                           "batch", "seq"],
                      choices={"dtype": list(DTYPE_BYTES), "optimizer": list(OPTIMIZER_BYTES), "quantize": list(QUANT_BYTES)})
    p.set_defaults(func=cmd_memory)


def cmd_dedup(args) -> int:
    from minillm.dedup import dedup_jsonl
    s = dedup_jsonl(args.data, args.out, args.field, args.threshold, model_name=args.model)
    print(f"kept {s['kept']} of {s['records']} records ({s['dropped']} near-duplicates dropped) -> {args.out}")
    return 0


def add_dedup(sub) -> None:
    from minillm.dedup import dedup_jsonl
    p = sub.add_parser("dedup", help="drop near-duplicate records (sentence-embedding cosine >= threshold)")
    p.add_argument("--data", required=True, help="input JSONL")
    add_function_args(p, dedup_jsonl, ["field", "threshold"], help={"field": "the string field compared"})
    p.add_argument("--out", required=True, help="output JSONL (the kept records, in order)")
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="sentence encoder (BERT) checkpoint")
    p.set_defaults(func=cmd_dedup)


def cmd_peft_compare(args) -> int:
    from minillm.demos.peft_comparison import compare_peft_methods, format_rows
    print(format_rows(compare_peft_methods(args.model, **function_kwargs(compare_peft_methods, args))))
    return 0


def add_peft_compare(sub) -> None:
    from minillm.demos.peft_comparison import compare_peft_methods
    p = sub.add_parser("peft-compare", help="full fine-tuning vs LoRA vs prompt tuning on synthetic reviews (CPU)")
    p.add_argument("--model", default="tiny-gpt2", help="GPT-2 base checkpoint")
    add_function_args(p, compare_peft_methods, ["steps", "batch_size", "lora_r", "num_virtual_tokens", "seed"],
                      flags={"num_virtual_tokens": "--prompt-tuning"})
    p.set_defaults(func=cmd_peft_compare)


def build_parser() -> argparse.ArgumentParser:
    ap, sub = base_parser()
    for add in (add_generate, add_rlhf_demo, add_rlf_demo, add_train_reward, add_ppo, add_attention, add_sft,
                add_classify, add_evaluate, add_vqa_demo, add_distill, add_memory, add_dedup, add_peft_compare):
        add(sub)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    """Run a command; an error is one or two lines on stderr (cli_args.report_error; --debug: the traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `minillm`: the command list
        return parser.print_help() or 0
    try:
        return args.func(args) or 0
    except (KeyboardInterrupt, Exception) as e:  # noqa: BLE001 — every error is reported the same way
        if args.debug or os.environ.get("MINILLM_DEBUG"):
            raise
        return report_error(args.command, e)


if __name__ == "__main__":
    sys.exit(main())
