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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_train_reward)


def cmd_train_reward(args) -> int:
    from minillm.rlhf.jobs import train_reward_job
    from minillm.train.device import pick_device

    rec = train_reward_job(args.model, args.data, args.out, epochs=args.epochs, batch_size=args.batch_size,
                           lr=args.lr, eval_frac=args.eval_frac, center_coef=args.center_coef,
                           use_margin=not args.no_margin, seed=args.seed, device=str(pick_device(args.device)),
                           max_length=args.max_length)
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
            device=str(pick_device(args.device)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="minillm", description="minillm: LLM fine-tuning machinery, written out.")
    sub = ap.add_subparsers(dest="command", required=True)
    add_generate(sub)
    add_rlhf_demo(sub)
    add_train_reward(sub)
    add_ppo(sub)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
