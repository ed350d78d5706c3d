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
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="minillm", description="minillm: LLM fine-tuning machinery, written out.")
    sub = ap.add_subparsers(dest="command", required=True)
    add_generate(sub)
    add_attention(sub)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
