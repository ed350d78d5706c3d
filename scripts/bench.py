"""Benchmarks: minillm next to the reference library, side by side in one process.

Each area adds rows in scripts/benches/<area>.py with `run(args) -> list[dict]`; a row is
{"name", "minillm", "reference", "unit", "ratio", "better", "target", "note"} where `ratio`
is minillm / reference for times and memory (lower is better) or for throughputs (higher is
better) as `better` says. Same checkpoint, dtype and thread count on both sides; medians of
repeated runs. Prints JSON and writes BENCHMARKS.md. Needs `pip install -e ".[reference]"`.

    python scripts/bench.py                 # all areas, CPU
    python scripts/bench.py gpt2 --device cuda
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

AREAS = ["gpt2", "encoders", "quant", "train", "text_metrics", "t5", "llama", "memory", "qlora"]
MODULES = {"qlora": "qlora_memory"}  # area -> benches/<module>.py where the names differ


def interleaved(fn_a, fn_b, repeat: int = 5, warmup: int = 1, sync=None, pairs: bool = False) -> tuple:
    """Median seconds of a and b, alternating calls so that machine noise hits both alike; with pairs=True
    also the median of the pair-by-pair ratios a/b (which a drift of the machine's speed cannot bias). The
    order within a pair alternates (a b, b a, a b, ...), so that neither side always runs second."""
    for _ in range(warmup):
        fn_a(); fn_b()
    ta, tb = [], []
    for i in range(repeat):
        for fn, acc in ((fn_a, ta), (fn_b, tb))[::1 if i % 2 == 0 else -1]:
            if sync:
                sync()
            t = time.perf_counter()
            fn()
            if sync:
                sync()
            acc.append(time.perf_counter() - t)
    if pairs:
        return statistics.median(ta), statistics.median(tb), statistics.median(a / b for a, b in zip(ta, tb))
    return statistics.median(ta), statistics.median(tb)


def row(name, ours, ref, unit, better="lower", target=None, note="", ratio=None):
    """ratio: ours / ref unless given (e.g. the median of pair-by-pair ratios, which drift cannot bias)."""
    ratio = ratio if ratio is not None else (ours / ref if ref else float("nan"))
    return {"name": name, "minillm": ours, "reference": ref, "unit": unit, "ratio": ratio,
            "better": better, "target": target, "note": note}


def machine(device: str) -> str:
    import torch
    s = f"{platform.machine()}, {platform.processor() or platform.system()}, torch {torch.__version__}, " \
        f"{torch.get_num_threads()} threads"
    if device == "cuda":
        s += f", {torch.cuda.get_device_name(0)}"
    return s


def write_md(rows, device, area, path: Path) -> None:
    import torch
    versions = []
    for mod in ("transformers", "peft", "bitsandbytes"):
        try:
            versions.append(f"{mod} {importlib.import_module(mod).__version__}")
        except Exception:
            pass
    lines = [f"### {area} — {device.upper()}: {machine(device)}; {', '.join(versions)}", "",
             "| benchmark | minillm | reference | unit | ratio (minillm/ref) | better | target | met | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        met = ""
        if r["target"] is not None:
            ok = r["ratio"] <= r["target"] if r["better"] == "lower" else r["ratio"] >= r["target"]
            met = "yes" if ok else "**no**"
        lines.append(f"| {r['name']} | {r['minillm']:.4g} | {r['reference']:.4g} | {r['unit']} | {r['ratio']:.3f} | "
                     f"{r['better']} | {r['target'] if r['target'] is not None else ''} | {met} | "
                     + r["note"].replace("|", "\\|") + " |")
    section = "\n".join(lines) + "\n"
    marker_start, marker_end = f"<!-- bench:{device}:{area} -->", f"<!-- /bench:{device}:{area} -->"
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nWritten by `python scripts/bench.py` (minillm and the reference library side by side in "
        "one process, same checkpoint, dtype and threads; medians; ratios survive a noisy machine, absolute times "
        "do not).\n\n")
    block = f"{marker_start}\n{section}{marker_end}"
    if marker_start in text:
        pre, rest = text.split(marker_start, 1)
        text = pre + block + rest.split(marker_end, 1)[1]
    else:
        text += "\n" + block + "\n"
    path.write_text(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("areas", nargs="*", default=AREAS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    for area in args.areas:
        print(f"[bench] {area}", file=sys.stderr, flush=True)
        rows = importlib.import_module(f"benches.{MODULES.get(area, area)}").run(args)
        print(json.dumps({area: rows}, indent=2), flush=True)
        write_md(rows, args.device, area, Path(args.out))  # one section per (device, area), replaced in place


if __name__ == "__main__":
    main()
