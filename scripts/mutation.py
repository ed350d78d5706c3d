"""Mutation testing for minillm's core math: does the test suite notice when the code is wrong?

A *mutant* is a copy of one source file with one small change (a `+` made `-`, a `<` made `<=`, a
constant bumped, a statement deleted, a slice bound dropped). The mapped tests are run against it:
if they fail the mutant is *killed*; if they pass it *survived* — either the change is equivalent
(the program still computes the same thing; see EQUIVALENT below) or the tests have a gap.

    python scripts/mutation.py --list --files losses.py            # the mutants, nothing run
    nice -n 10 python scripts/mutation.py --files losses.py rlhf/dpo.py --sample 8 --seed 0
    python scripts/mutation.py --files rlhf/dpo.py --survivors --json out.json

Mechanics (standard library only, no mutmut): each file is parsed with `ast`; every mutation site
outside docstrings, f-strings, type hints, `raise`/`assert` messages and logging calls becomes one
mutant; the mutated tree is written back with `ast.unparse`. `minillm/` is copied once into a
temporary directory; for each mutant the one file is overwritten there, the mapped tests run with

    python -P -m pytest -x -q -p no:cacheprovider -m "not slow and not cuda and not reference" <tests>

with PYTHONPATH=<temp dir> and cwd = the repository (tests read weights/ and tests/golden from it;
`-P` keeps cwd off sys.path so the temp copy, not the checkout, is imported), and a timeout of 3x the
clean run's time; then the file is restored. A clean run against the unmutated copy comes first and
must pass, or the file is skipped.

score = (killed + timeout) / mutants;  score_ne = the same over mutants not listed in EQUIVALENT.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "minillm"

# file (relative to minillm/) -> the test files that exercise it (found by grepping the tests' imports;
# only the files that test the module's math directly, so a mutant runs in seconds).
FILE_TESTS: dict[str, list[str]] = {
    # the fast pin file first, so that (under -x) a mutant only it kills stops early
    "attention.py": ["tests/test_attention_pins.py", "tests/test_attention.py", "tests/test_gpt2.py"],
    "generation.py": ["tests/test_generation_pins.py", "tests/test_generation.py"],
    "lora.py": ["tests/test_lora_pins.py", "tests/test_lora.py"],
    "nf4.py": ["tests/test_nf4_pins.py", "tests/test_nf4.py"],
    "dynamic8bit.py": ["tests/test_nf4_pins.py", "tests/test_nf4.py"],
    "linear.py": ["tests/test_linear.py"],
    "dropout.py": ["tests/test_dropout.py", "tests/test_lora.py"],
    # test_bert/test_reward/test_vqa also use losses.py but take 70-90 s each on 2 cores: left out
    "losses.py": ["tests/test_losses_pins.py", "tests/test_loop.py", "tests/test_ppo.py"],
    "formats.py": ["tests/test_formats_pins.py", "tests/test_formats.py"],
    "rlhf/gae.py": ["tests/test_ppo.py", "tests/test_rlhf_pins.py"],
    "rlhf/kl.py": ["tests/test_ppo.py", "tests/test_rlhf_pins.py"],
    "rlhf/reward.py": ["tests/test_reward_pins.py"],  # test_reward.py (~70 s, CLI-level) left out for speed
    "rlhf/dpo.py": ["tests/test_dpo.py", "tests/test_rlhf_pins.py"],
    "rlhf/ppo.py": ["tests/test_ppo.py", "tests/test_rlhf_pins.py", "tests/test_ppo_pins.py"],
    # test_loop.py (~17 s) left out: the pins kill every non-equivalent schedule mutant on their own (27/27)
    "train/schedule.py": ["tests/test_losses_pins.py"],
    "train/metrics.py": ["tests/test_metrics.py", "tests/test_metrics_pins.py"],
    "models/gpt2.py": ["tests/test_gpt2_pins.py", "tests/test_gpt2.py"],
    "models/llama.py": ["tests/test_llama_pins.py", "tests/test_llama.py"],
    "models/t5_layers.py": ["tests/test_t5.py", "tests/test_t5_pins.py"],
    "models/roberta.py": ["tests/test_roberta.py", "tests/test_roberta_pins.py"],
}

# Survivors judged equivalent by a person (run with --survivors to see them), kept as JSON files in
# scripts/equivalent/ (one per group of source files, {key: reason}). Key: file::the mutated line's original
# source (stripped)::column::the operator's description — stable when lines move.
EQUIVALENT: dict[str, str] = {}
for _f in sorted((REPO / "scripts" / "equivalent").glob("*.json")):
    EQUIVALENT.update(json.loads(_f.read_text()))

PYTEST_MARKS = "not slow and not cuda and not reference"
LOG_NAMES = {"print", "debug", "info", "warning", "warn", "error", "exception", "log", "critical"}

_ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
          ast.FloorDiv: ast.Mult}
_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
        ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
_SYM = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**", ast.FloorDiv: "//",
        ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is",
        ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in", ast.And: "and", ast.Or: "or"}


@dataclass
class Mutant:
    file: str          # relative to minillm/
    index: int         # position of the target node in ast.walk order
    kind: str          # operator family
    desc: str          # e.g. "+ -> -"
    line: int
    col: int
    source_line: str   # the original line, stripped

    @property
    def key(self) -> str:
        return f"{self.file}::{self.source_line}::{self.col}::{self.desc}"


# ---- finding mutation sites ----
def _parents(tree: ast.AST) -> dict[int, tuple[ast.AST, str, int | None]]:
    out = {}
    for node in ast.walk(tree):
        for field, value in ast.iter_fields(node):
            if isinstance(value, list):
                for i, child in enumerate(value):
                    if isinstance(child, ast.AST):
                        out[id(child)] = (node, field, i)
            elif isinstance(value, ast.AST):
                out[id(value)] = (node, field, None)
    return out


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _skipped(tree: ast.AST) -> set[int]:
    """ids of nodes that are not mutated: docstrings, f-strings, type hints, raise/assert messages, logging."""
    roots: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                roots.append(first)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            roots += [a.annotation for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs if a.annotation]
            roots += [a.annotation for a in (node.args.vararg, node.args.kwarg) if a is not None and a.annotation]
            roots += node.decorator_list
            if node.returns:
                roots.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            roots.append(node.annotation)
        elif isinstance(node, ast.JoinedStr):
            roots.append(node)
        elif isinstance(node, ast.Raise) and node.exc is not None:
            roots.append(node)  # the exception and its message; the condition that raises is still mutated
        elif isinstance(node, ast.Assert) and node.msg is not None:
            roots.append(node.msg)
        elif isinstance(node, ast.Call) and _call_name(node) in LOG_NAMES:
            roots.append(node)
        elif isinstance(node, (ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal)):
            roots.append(node)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            roots.append(node)
    return {id(n) for r in roots for n in ast.walk(r)}


def _default_nones(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for d in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
                if isinstance(d, ast.Constant) and d.value is None:
                    out.add(id(d))
    return out


def _is_one(node) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int and node.value == 1


def _sites(node: ast.AST, parent, default_nones: set[int]):
    """(kind, desc) for each mutation of this node; applied by _apply with the same arguments."""
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        yield "arith", f"{_SYM[type(node.op)]} -> {_SYM[_ARITH[type(node.op)]]}"
    elif isinstance(node, ast.AugAssign) and type(node.op) in _ARITH:
        yield "arith", f"{_SYM[type(node.op)]}= -> {_SYM[_ARITH[type(node.op)]]}="
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in _CMP:
                yield "compare", f"#{i} {_SYM[type(op)]} -> {_SYM[_CMP[type(op)]]}"
    if isinstance(node, ast.BoolOp):
        yield "bool", f"{_SYM[type(node.op)]} -> {'or' if isinstance(node.op, ast.And) else 'and'}"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "bool", "not x -> x"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        yield "unary", "-x -> x"
    if isinstance(node, ast.Constant):
        v = node.value
        if v is True or v is False:
            yield "const", f"{v} -> {not v}"
        elif type(v) is int:
            yield "const", f"{v} -> {v + 1}"
        elif type(v) is float:
            yield "const", f"{v!r} -> {(v * 1.5 if v else 1.0)!r}"
        elif v is None and id(node) in default_nones:
            yield "const", "None default -> 0"
    if isinstance(node, (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign)) and parent is not None:
        yield "delete", "statement -> pass"
    if isinstance(node, ast.Return) and node.value is not None and not (
            isinstance(node.value, ast.Constant) and node.value.value is None):
        yield "delete", "return x -> return None"
    if isinstance(node, ast.Slice):
        if node.lower is not None:
            yield "slice", "a[lo:...] -> a[:...]"
        if node.upper is not None:
            yield "slice", "a[...:hi] -> a[...:]"
    if isinstance(node, ast.Subscript):
        idx = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        for j, e in enumerate(idx):
            if isinstance(e, ast.BinOp) and isinstance(e.op, (ast.Add, ast.Sub)) and _is_one(e.right):
                yield "slice", f"x[i{_SYM[type(e.op)]}1] -> x[i] (#{j})"


def _apply(node: ast.AST, parent, desc: str) -> None:
    """Mutate `node` in place (or in its parent) as described by desc."""
    par, field, i = parent if parent else (None, None, None)

    def replace(new):
        if i is None:
            setattr(par, field, new)
        else:
            getattr(par, field)[i] = new

    if desc.startswith("#") and isinstance(node, ast.Compare):
        j = int(desc[1:].split()[0])
        node.ops[j] = _CMP[type(node.ops[j])]()
    elif isinstance(node, ast.BinOp) and " -> " in desc and desc.split()[0] == _SYM.get(type(node.op)):
        node.op = _ARITH[type(node.op)]()
    elif isinstance(node, ast.AugAssign) and desc.endswith("=") and "statement" not in desc:
        node.op = _ARITH[type(node.op)]()
    elif isinstance(node, ast.BoolOp):
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif desc in ("not x -> x", "-x -> x"):
        replace(node.operand)
    elif isinstance(node, ast.Constant):
        v = node.value
        node.value = (not v) if isinstance(v, bool) else v + 1 if type(v) is int else \
            (v * 1.5 if v else 1.0) if type(v) is float else 0
    elif desc == "statement -> pass":
        replace(ast.Pass())
    elif desc == "return x -> return None":
        node.value = ast.Constant(None)
    elif desc == "a[lo:...] -> a[:...]":
        node.lower = None
    elif desc == "a[...:hi] -> a[...:]":
        node.upper = None
    elif desc.startswith("x[i"):
        j = int(desc.rsplit("#", 1)[1].rstrip(")"))
        if isinstance(node.slice, ast.Tuple):
            node.slice.elts[j] = node.slice.elts[j].left
        else:
            node.slice = node.slice.left
    else:
        raise AssertionError(f"no rule for {desc} on {type(node).__name__}")


def find_mutants(rel: str) -> list[Mutant]:
    src = (PKG / rel).read_text()
    lines = src.splitlines()
    tree = ast.parse(src)
    skip, parents, nones = _skipped(tree), _parents(tree), _default_nones(tree)
    out = []
    for index, node in enumerate(ast.walk(tree)):
        if id(node) in skip:
            continue
        for kind, desc in _sites(node, parents.get(id(node)), nones):
            line, col = getattr(node, "lineno", 0), getattr(node, "col_offset", 0)
            out.append(Mutant(rel, index, kind, desc, line, col, lines[line - 1].strip() if line else ""))
    return sorted(out, key=lambda m: (m.line, m.col, m.index, m.desc))


def mutated_source(m: Mutant) -> str:
    tree = ast.parse((PKG / m.file).read_text())
    parents = _parents(tree)
    node = list(ast.walk(tree))[m.index]
    _apply(node, parents.get(id(node)), m.desc)
    ast.fix_missing_locations(tree)
    return ast.unparse(tree)


def diff(m: Mutant, mutated: str) -> str:
    original = ast.unparse(ast.parse((PKG / m.file).read_text()))
    return "".join(difflib.unified_diff(original.splitlines(True), mutated.splitlines(True),
                                        f"a/minillm/{m.file}", f"b/minillm/{m.file}", n=1))


# ---- running ----
def run_tests(tmp: Path, tests: list[str], timeout: float | None) -> tuple[str, float]:
    # one torch thread per run: parallel workers (--jobs) would otherwise fight over the cores
    env = dict(os.environ, PYTHONPATH=str(tmp), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    # -o pythonpath= : setup.cfg's `pythonpath = .` would put the checkout ahead of the temp copy
    cmd = [sys.executable, "-P", "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "pythonpath=",
           "-m", PYTEST_MARKS, *tests]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0
    dt = time.perf_counter() - t0
    if r.returncode == 0:
        return "survived", dt
    if r.returncode in (4, 5):  # usage error / nothing collected: the run says nothing about the mutant
        return "error", dt
    return "killed", dt


def check_import_path(tmp: Path) -> None:
    """A canary: break the temp copy's minillm/__init__.py and check that the tests notice; otherwise the
    tests import some other copy (the checkout, an editable install) and every mutant would 'survive'."""
    init = tmp / "minillm" / "__init__.py"
    original = init.read_text()
    init.write_text(original + "\nraise ImportError('mutation.py canary')\n")
    try:
        status, _ = run_tests(tmp, ["tests/test_formats.py"], None)
    finally:
        init.write_text(original)
    if status != "killed":
        sys.exit(f"canary: a broken temp copy still passed the tests ({status}): they do not import the temp copy; "
                 "refusing to report meaningless scores")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", nargs="+", default=list(FILE_TESTS), help="files relative to minillm/")
    ap.add_argument("--sample", type=int, default=20,
                    help="mutants per file (random, seeded; 0 = all). The default 20 on all 17 files is ~340 runs "
                         "of ~3-15 s: about 40 min on 2 cores with --jobs 2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--match", nargs="*", default=[], metavar="TEXT",
                    help="keep only the mutants whose key (file::line source::col::operator) contains one of these "
                         "(applied before --sample): re-check survivors after adding a test")
    ap.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    ap.add_argument("--json", type=Path, help="write every mutant's result here")
    ap.add_argument("--skip-tests", nargs="*", default=[], metavar="SUBSTRING",
                    help="leave out mapped test files whose path contains one of these (e.g. _pins: the score "
                         "of the suite without the pin tests)")
    ap.add_argument("--survivors", action="store_true", help="print each survivor's diff")
    ap.add_argument("--jobs", type=int, default=2,
                    help="mutants run at once, each in its own copy of minillm/ (default 2: one per core; the tests "
                         "run torch with one thread)")
    args = ap.parse_args(argv)

    plan: dict[str, list[Mutant]] = {}
    for rel in args.files:
        rel = rel.removeprefix("minillm/")
        if rel not in FILE_TESTS:
            ap.error(f"{rel} has no test mapping; known: {', '.join(FILE_TESTS)}")
        muts = find_mutants(rel)
        if args.match:
            muts = [m for m in muts if any(t in m.key for t in args.match)]
        if args.sample and args.sample < len(muts):
            rng = random.Random(f"{args.seed}:{rel}")
            muts = sorted(rng.sample(muts, args.sample), key=lambda m: (m.line, m.col, m.index, m.desc))
        plan[rel] = muts
    # the test files are fixed now: a test file added while a long run goes does not change its later files
    tests_of = {rel: [t for t in FILE_TESTS[rel] if (REPO / t).exists() and not any(x in t for x in args.skip_tests)]
                for rel in plan}

    if args.list:
        for rel, muts in plan.items():
            print(f"== {rel}: {len(muts)} mutants")
            for m in muts:
                eq = "  [equivalent]" if m.key in EQUIVALENT else ""
                print(f"  {m.line:4d}:{m.col:<3d} {m.kind:8s} {m.desc:28s} {m.source_line[:70]}{eq}")
        return 0

    results, rows = [], []
    with tempfile.TemporaryDirectory(prefix="minillm-mut-") as td:
        # one copy of minillm/ per worker: each mutant overwrites one file in its worker's copy
        copies = [Path(td) / f"w{i}" for i in range(args.jobs)]
        for c in copies:
            shutil.copytree(PKG, c / "minillm", ignore=shutil.ignore_patterns("__pycache__"))
            check_import_path(c)
        free: queue.Queue = queue.Queue()
        for c in copies:
            free.put(c)
        for rel, muts in plan.items():
            tests = tests_of[rel]
            status, clean = run_tests(copies[0], tests, None)
            if status != "survived":
                print(f"!! {rel}: the clean run of {tests} did not pass ({status}); skipped", flush=True)
                continue
            timeout = 3 * clean * max(1, args.jobs // 2 + 1)  # parallel workers share the cores
            print(f"== {rel}: {len(muts)} mutants, clean run {clean:.1f}s, timeout {timeout:.1f}s", flush=True)
            original = (PKG / rel).read_text()
            counts = dict(killed=0, survived=0, timeout=0, error=0, equivalent=0)

            def one(m: Mutant):
                try:
                    mutated = mutated_source(m)
                    compile(mutated, rel, "exec")
                except (SyntaxError, ValueError, TypeError, AssertionError) as e:
                    return m, None, f"skip: {e}", 0.0
                copy = free.get()
                target = copy / "minillm" / rel
                try:
                    target.write_text(mutated)
                    status, dt = run_tests(copy, tests, timeout)
                finally:
                    target.write_text(original)
                    free.put(copy)
                return m, mutated, status, dt

            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                for m, mutated, status, dt in pool.map(one, muts):
                    if mutated is None:
                        print(f"   {status} ({m.line} {m.desc})", flush=True)
                        continue
                    counts[status] += 1
                    equivalent = status == "survived" and m.key in EQUIVALENT
                    counts["equivalent"] += equivalent
                    flag = " (equivalent)" if equivalent else ""
                    print(f"   {status:8s} {dt:5.1f}s  {m.line:4d} {m.desc:26s} {m.source_line[:60]}{flag}", flush=True)
                    if status == "survived" and args.survivors:
                        print(diff(m, mutated), flush=True)
                    results.append(dict(asdict(m), key=m.key, status=status, seconds=round(dt, 2),
                                        equivalent=equivalent, diff=diff(m, mutated) if status == "survived" else ""))
            n = counts["killed"] + counts["survived"] + counts["timeout"]
            detected = counts["killed"] + counts["timeout"]
            rows.append((rel, n, counts["killed"], counts["survived"], counts["timeout"], counts["equivalent"],
                         detected / n if n else float("nan"),
                         detected / (n - counts["equivalent"]) if n - counts["equivalent"] else float("nan")))

    print("\n| file | mutants | killed | survived | timeout | equivalent | score | score (non-equiv.) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for rel, n, k, s, t, e, sc, sne in rows:
        print(f"| {rel} | {n} | {k} | {s} | {t} | {e} | {sc:.0%} | {sne:.0%} |")
    if args.json:
        args.json.write_text(json.dumps(dict(rows=[dict(zip(("file", "mutants", "killed", "survived", "timeout",
                                                                "equivalent", "score", "score_ne"), r)) for r in rows],
                                             mutants=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
