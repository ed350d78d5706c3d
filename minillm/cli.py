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
    add_vqa_demo(sub)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
