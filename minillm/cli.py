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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="minillm", description="minillm: LLM fine-tuning machinery, written out.")
    sub = ap.add_subparsers(dest="command", required=True)
    add_generate(sub)
    add_rlhf_demo(sub)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
