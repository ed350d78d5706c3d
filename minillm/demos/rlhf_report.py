"""The RLHF demo's outputs: the summary table it prints, runs/<name>/report.md and curves.png.

All three read the demo's summary dict (rlhf_demo._run) and its metrics.jsonl, one JSON record per
line with a "phase" ("setup", "sft", "rm", "ppo", "eval", "done"); nothing here trains or scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from minillm import hub


def summary_table(s: dict) -> str:
    b, a = s["sft"], s["ppo"]

    def ms(d):
        return f"{d['mean']:+.3f} ± {d['std']:.3f}"
    rows = [("", "SFT policy", "PPO policy"),
            ("proxy reward (RM)", ms(b["proxy"]), ms(a["proxy"])),
            ("true score (1-10; best 8.5)", ms(b["true"]), ms(a["true"])),
            ("KL to reference (nats)", ms(b["kl"]), ms(a["kl"])),
            ("distinct-2", f"{b['distinct2']:.3f}", f"{a['distinct2']:.3f}"),
            ("unique responses", f"{b['unique_frac']:.3f}", f"{a['unique_frac']:.3f}"),
            ("mean length (words)", f"{b['length']:.1f}", f"{a['length']:.1f}")]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(w[i]) for i in range(3)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    n = a["n_prompts"]
    lines.append(f"(mean ± std over {n} held-out prompts; PPO beats SFT on {s['wins_true']}/{n} prompts by true score, "
                 f"{s['wins_proxy']}/{n} by proxy)")
    lines.append(f"reward model held-out pairwise accuracy: {s['reward_model']['heldout_acc']:.3f} "
                 f"({s['reward_model']['n_heldout_pairs']} pairs)")
    cfg = s["config"].get("ppo", {})
    if cfg.get("init_kl_coef", 1) == 0:
        lines.append(f"no KL penalty (beta 0); elapsed {s['elapsed_s']:.0f}s")
    elif cfg.get("adaptive_kl", True):
        lines.append(f"KL target {s['kl_target']} nats per response, final beta {s['final_kl_coef']:.4f}; "
                     f"elapsed {s['elapsed_s']:.0f}s")
    else:
        lines.append(f"fixed beta {s['final_kl_coef']:.4f}; elapsed {s['elapsed_s']:.0f}s")
    lines.append("checks: " + ", ".join(f"{k} {'OK' if v else 'MISSED'}" for k, v in s["checks"].items()))
    return "\n".join(lines)


def write_report(out: Path, s: dict) -> None:
    ppo = [json.loads(l) for l in open(out / "metrics.jsonl") if '"phase": "ppo"' in l]
    rm = [json.loads(l) for l in open(out / "metrics.jsonl") if '"phase": "rm"' in l and "epoch" in l]
    lines = [f"# RLHF demo report — {Path(s['config']['out']).name}", "",
             "SFT → labelers → reward model (margin loss) → PPO with a KL penalty, on synthetic reviews. "
             "The true score is the hidden judge the labelers approximate (1–10; a perfect review scores 8.5: "
             "on-topic, clearly positive, finished, 4–16 words; it judges words, not grammar, so a clumsy sentence "
             "of the right words still scores well); the proxy reward is the reward model's (normalized) score. "
             "KL is in nats per response (the sum over its tokens). Run with `--kl-coef 0 --out runs/hacking` and "
             "compare: without the penalty the proxy climbs while the true score falls (reward hacking). Fewer "
             "distinct responses after PPO is expected with the penalty too: PPO concentrates the policy on the "
             "phrasings the reward model likes; the penalty bounds how far, not the loss of variety.", "",
             "## Summary", "", "```", summary_table(s), "```", "",
             *(["![proxy reward, true score, KL and β per PPO step](curves.png)", ""]
               if (out / "curves.png").exists() or _has_matplotlib() else []),
             *([f"Policy: {s['policy']}.", ""] if "policy" in s else []),
             "## Reward model", "",
             f"- backbone: {s['reward_model_backbone']}; {s['reward_model']['n_train_pairs']} training pairs",
             f"- held-out pairwise accuracy: **{s['reward_model']['heldout_acc']:.3f}** "
             f"({s['reward_model']['n_heldout_pairs']} pairs from held-out prompts); train: {s['reward_model']['train_acc']:.3f}",
             "", "| epoch | loss | train acc | held-out acc |", "|---|---|---|---|"]
    lines += [f"| {r['epoch']} | {r['loss']:.3f} | {r['train_acc']:.3f} | {r['heldout_acc']:.3f} |" for r in rm]
    lines += ["", "## PPO per step", "",
              "| step | score (proxy) | held-out proxy | held-out true | KL | β | entropy | clip frac | approx-KL | "
              "value loss | adv mean | adv std | length |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['score']:+.3f} | {r.get('proxy_heldout', float('nan')):+.3f} | "
              f"{r.get('true_heldout', float('nan')):.2f} | {r['kl']:.3f} | {r['kl_coef']:.4f} | {r['entropy']:.3f} | "
              f"{r['clipfrac']:.3f} | {r['approxkl']:.4f} | {r['value_loss']:.3f} | {r['adv_mean']:+.3f} | "
              f"{r['adv_std']:.3f} | {r['response_length']:.1f} |" for r in ppo]
    lines += samples_and_checks(s, ("prompt", "response", "proxy", "true"),
                                lambda d: (d["prompt"], d["response"], f"{d['proxy']:+.2f}", f"{d['true']:.1f}"))
    (out / "report.md").write_text("\n".join(lines) + "\n")


def samples_and_checks(s: dict, header: tuple[str, ...], cells) -> list[str]:
    """report.md's closing sections: sample tables before and after PPO (`cells(sample)` -> one row) and the
    checks."""
    lines = []
    for title, key in (("Samples before (SFT policy)", "sft"), ("Samples after (PPO policy)", "ppo")):
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells(d)) + " |" for d in s[key]["samples"]]
    return lines + ["", "## Checks", ""] + [f"- {k}: {'OK' if v else 'MISSED'}" for k, v in s["checks"].items()]


def plot_curves(out: Path, panels=(("score", "reward"), ("kl", "KL to reference (nats/response)"), ("kl_coef", "β"))
                ) -> Optional[Path]:
    """curves.png, one panel per (key, title) of metrics.jsonl's "ppo" records against the PPO step, when
    matplotlib is installed (`pip install minillm[plots]`)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ppo = [json.loads(line) for line in open(out / "metrics.jsonl") if '"phase": "ppo"' in line]
    if not ppo:
        return None
    fig, ax = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for a, (key, title) in zip(ax, panels):
        a.plot([r["step"] for r in ppo], [r[key] for r in ppo])
        a.set_title(title)
        a.set_xlabel("PPO step")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    return out / "curves.png"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def finish(out: Path, summary: dict, log, write_report, summary_table, quiet: bool = False, **plot) -> dict:
    """The end of a demo run: summary.json, the last log record, curves.png, report.md, the printed table and
    where the outputs are."""
    hub.save_json(summary, out / "summary.json")
    log("done", f"{summary['elapsed_s']:.0f}s", summary={k: v for k, v in summary.items() if k != "config"})
    log.close()
    png = plot_curves(out, **plot)
    write_report(out, summary)
    if not quiet:
        print(summary_table(summary))
        print(f"report: {out / 'report.md'}; metrics: {out / 'metrics.jsonl'}; " + (
            f"curves: {png}" if png else "no curves.png (pip install 'minillm[plots]' for matplotlib)"))
    return summary
