"""The CLI's generic argument helpers: options generated from config dataclasses (one name per concept across
commands: --out, --lora-r, --quantize, --seed, --device), the adapter and trainer option groups, and the data-format
text the training commands show. cli.py imports these; each command there stays one parse and one library call.
"""

from __future__ import annotations

import argparse
import sys
import dataclasses
import inspect
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
        elif typ is Any:  # a switch that may carry a value (--resume, or --resume PATH)
            p.add_argument(flag, nargs="?", const=True, **kw)
        elif typing.get_origin(typ) in (list, tuple) or name == "lora_targets":
            p.add_argument(flag, type=lambda s: tuple(t.strip() for t in s.split(",") if t.strip()), **kw,
                           metavar="NAME,NAME")
        else:
            p.add_argument(flag, type=typ if typ in (int, float, str) else str, choices=choices.get(name), **kw)


def given_fields(args: argparse.Namespace, *classes) -> dict:
    """The parsed arguments that name a field of one of `classes` and were given (not None)."""
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def config_from_args(cls, args: argparse.Namespace, **extra):
    """Build `cls` from the parsed arguments that name its fields (plus `extra`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **extra)


def add_function_args(p: argparse.ArgumentParser, fn, names: list[str], **kw) -> None:
    """add_config_args for keyword parameters of a library function: type and default from its signature."""
    hints, params = typing.get_type_hints(fn), inspect.signature(fn).parameters
    cls = dataclasses.make_dataclass(fn.__name__, [(n, hints[n], dataclasses.field(default=params[n].default))
                                                   for n in names])
    add_config_args(p, cls, names, **kw)


def function_kwargs(fn, args: argparse.Namespace) -> dict:
    """The parsed arguments that name keyword parameters (those with defaults) of `fn`."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in vars(args).items() if k in params and params[k].default is not inspect.Parameter.empty}


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
                                     "eval_every", "log_every", "save_every", "resume", "seed", "device", "fsdp"],
                    defaults=defaults,
                    help={"max_steps": "optimizer steps (overrides --epochs)",
                          "batch_size": "examples per micro-batch (per process)",
                          "grad_accum": "micro-batches per optimizer step", "resume": "continue from <out>/checkpoints",
                          "save_every": "checkpoint every N steps (and at the end)",
                          "fsdp": "under torchrun: shard parameters, gradients and AdamW states over the processes "
                                  "(ZeRO-3, torch FSDP2) instead of DDP"},
                    choices={"schedule": SCHEDULES, "precision": list(PRECISIONS)})
    p.add_argument("--eval-data", default=None, help="JSONL/CSV evaluated every --eval-every steps and at the end")
    p.add_argument("--max-length", type=int, default=None, help="truncate examples to this many tokens")


def add_prompt_tuning_args(p: argparse.ArgumentParser) -> None:
    from minillm.prompt_tuning import INITS, PromptTuningConfig
    add_config_args(p, PromptTuningConfig, ["num_virtual_tokens", "init", "init_text"], choices={"init": list(INITS)},
                    flags={"num_virtual_tokens": "--prompt-tuning", "init": "--prompt-init",
                           "init_text": "--prompt-init-text"},
                    help={"num_virtual_tokens": "N: train N soft-prompt vectors, the base frozen (peft's PROMPT_TUNING "
                                                "files in --out; wants a high --lr, e.g. 3e-2)",
                          "init_text": "text whose token embeddings start the prompt (default: the first prompt)"})


def base_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """`minillm` itself: --version, --debug, and the subcommands' home."""
    from minillm import __version__
    ap = argparse.ArgumentParser(prog="minillm", description="minillm: LLM fine-tuning machinery, written out. "
                                 "'The book' in the help texts is S. Ozdemir, Quick Start Guide to Large Language "
                                 "Models (2nd ed.); see README.md, Sources.")
    ap.add_argument("--version", action="version", version=f"minillm {__version__}")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return ap, ap.add_subparsers(dest="command", metavar="COMMAND")


def report_error(command: str, e: BaseException) -> int:
    """One or two lines on stderr naming what went wrong; the exit code: 2 bad input, 1 runtime failure, 130 Ctrl-C."""
    if isinstance(e, KeyboardInterrupt):
        print(f"minillm {command}: interrupted", file=sys.stderr)
        return 130
    lines = str(e).strip().splitlines() or [type(e).__name__]
    if isinstance(e, OSError) and e.filename and str(e.filename) not in lines[0]:
        lines[0] += f": {e.filename}"  # disk full, read-only: always the path
    more = f" (+{len(lines) - 2} more lines; --debug shows all)" if len(lines) > 2 else ""
    print(f"minillm {command}: {lines[0]}" + (f"\n  {lines[1].strip()}{more}" if len(lines) > 1 else ""),
          file=sys.stderr)
    # 2: the input is wrong (data, checkpoint, arguments, a missing file); 1: running failed (NaN loss, disk full,
    # a read-only or locked output directory, no permission to write)
    bad_input = isinstance(e, (ValueError, TypeError, LookupError, FileNotFoundError, IsADirectoryError,
                               NotADirectoryError)) and not isinstance(e, FloatingPointError)
    return 2 if bad_input else 1
