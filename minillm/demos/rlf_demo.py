"""The book's ch. 9 RL loop, offline: PPO on a T5 summarizer, rewarded by two classifiers' logits.

(a) A tiny T5 (from a config; word-level tokenizer) is taught to summarize synthetic visit reports
    (synthetic_summaries.py) with the one training loop (SFT, teacher forcing). With `policy=` a hub name
    ("google/flan-t5-small") the checkpoint is used as it is, as the book does.
(b) Two tiny RoBERTa classifiers (random init) learn grammar (acceptable / scrambled word order) and
    sentiment (negative / neutral / positive). With `grammar=` / `sentiment=` hub names
    ("textattack/roberta-base-CoLA", "cardiffnlp/twitter-roberta-base-sentiment") those are loaded instead.
(c) PPO (rlhf/ppo.py, encoder-decoder path) tunes the policy on "summarize: " + text with the book's reward

        reward = 1 × grammar logit["LABEL_1" = acceptable] + 0.5 × sentiment logit["LABEL_1" = neutral]

    and a per-token KL penalty to the frozen SFT policy (adaptive β). kl_coef 0 shows what the penalty
    prevents: the summaries drift from the documents (ROUGE and KL) to please the classifiers.

Evaluation on 200 held-out documents, before and after PPO: mean and median of each classifier's logit and
of the combined reward, ROUGE against the reference summaries, the KL to the SFT policy, and on how many
documents PPO beats SFT. Files in cfg.out: metrics.jsonl, summary.json, report.md, curves.png (matplotlib).

Source: the book, ch. 9 (FLAN-T5 + trl PPO, rewards from CoLA and sentiment logits, 200 held-out items
compared by mean and median per classifier); trl's AutoModelForSeq2SeqLMWithValueHead.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from minillm.data.seq2seq import Seq2SeqCollator, encode_seq2seq
from minillm.demos import synthetic_summaries as ss
from minillm.demos.rlhf_report import finish, samples_and_checks
from minillm.generation import generate
from minillm.losses import next_token_logprobs
from minillm.models.auto import load_model
from minillm.models.roberta import RobertaConfig, RobertaForSequenceClassification
from minillm.models.t5 import T5Config, T5ForConditionalGeneration
from minillm.rlhf.classifier_reward import ClassifierReward, load_classifier_reward, parse_spec
from minillm.rlhf.ppo import PolicyWithValueHead, PPOConfig, PPOTrainer, response_mask_from
from minillm.text_metrics import rouge
from minillm.tokenizer import Tokenizer
from minillm.train.loop import TrainConfig, seq2seq_loss, train
from minillm.train.device import cpu_threads
from minillm.train.runlog import RunLog, format_eta


def _sft_settings() -> TrainConfig:
    return TrainConfig(lr=3e-3, weight_decay=0.0, warmup_steps=30, max_steps=300, batch_size=64, log_every=50)


def _clf_settings() -> TrainConfig:
    return TrainConfig(lr=1e-3, weight_decay=0.0, warmup_steps=20, max_steps=150, batch_size=64, log_every=50)


def _ppo_settings() -> PPOConfig:
    return PPOConfig(lr=1e-4, batch_size=64, mini_batch_size=16, ppo_epochs=4, init_kl_coef=0.2, adaptive_kl=True,
                     target_kl=2.0, horizon=1000.0, max_new_tokens=16)


@dataclass
class RLFDemoConfig:
    out: str = "runs/rlf-demo"
    seed: int = 0
    policy: Optional[str] = None      # None: a tiny T5 taught to summarize here; or e.g. "google/flan-t5-small"
    grammar: Optional[str] = None     # None: a tiny RoBERTa trained here; or "textattack/roberta-base-CoLA"
    sentiment: Optional[str] = None   # None: a tiny RoBERTa trained here; or "cardiffnlp/twitter-roberta-base-sentiment"
    grammar_label: str = "LABEL_1"    # CoLA's LABEL_1 = acceptable (the book)
    grammar_weight: float = 1.0
    sentiment_label: str = "LABEL_1"  # cardiffnlp's LABEL_1 = neutral (the book)
    sentiment_weight: float = 0.5
    reward_classifiers: tuple[str, ...] = ()  # "DIR:LABEL:WEIGHT" terms that replace the two above
    data: Optional[str] = None        # JSONL of {"text", "summary"}; None: the synthetic reports
    d_model: int = 64                 # the tiny T5 and RoBERTas
    n_layers: int = 2
    n_heads: int = 4
    sft: TrainConfig = field(default_factory=_sft_settings)
    sft_examples: int = 3000
    slip_prob: float = 0.25           # share of training summaries with a word-order slip
    clf: TrainConfig = field(default_factory=_clf_settings)
    clf_examples: int = 4000
    ppo: PPOConfig = field(default_factory=_ppo_settings)
    ppo_steps: int = 50
    n_heldout: int = 200              # the book's 200 held-out items
    eval_samples: int = 2             # sampled summaries per held-out item
    threads: Optional[int] = 1        # 1 is fastest on a shared 2-core machine
    device: Optional[str] = None      # None: cpu

    @classmethod
    def make(cls, tiny: bool = False, **kw) -> "RLFDemoConfig":
        """A config from flat settings: the demo's own fields and PPOConfig's (init_kl_coef, target_kl, ...).
        tiny: seconds-scale settings for tests (everything runs, numbers rough)."""
        ppo_names = {f.name for f in fields(PPOConfig)}
        ppo_kw = {k: kw.pop(k) for k in list(kw) if k in ppo_names}
        if isinstance(kw.get("reward_classifiers"), list):
            kw["reward_classifiers"] = tuple(kw["reward_classifiers"])
        cfg = cls(**kw)
        if tiny:
            base = dict(d_model=32, n_layers=1, sft_examples=600, clf_examples=800, n_heldout=200, eval_samples=1,
                        sft=replace(cfg.sft, max_steps=60), clf=replace(cfg.clf, max_steps=60, warmup_steps=5, lr=2e-3),
                        ppo=replace(cfg.ppo, batch_size=32, mini_batch_size=16, ppo_epochs=2), ppo_steps=3)
            cfg = replace(cfg, **{k: v for k, v in base.items() if k not in kw})
        return replace(cfg, ppo=replace(cfg.ppo, **ppo_kw))


# ---------------------------------------------------------------------------------------------
# tokenizers and models built from configs
# ---------------------------------------------------------------------------------------------


def word_tokenizer(texts: list[str], template: str, padding_side: str) -> Tokenizer:
    """Word-level tokenizer with T5's special ids (<pad> 0, </s> 1, <unk> 2) and <s> 3; `template` adds the
    specials on encoding ("$A </s>" for the policy, "<s> $A </s>" for a RoBERTa classifier)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    t = HFTokenizer(models.WordLevel(unk_token=ss.UNK))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(special_tokens=[ss.PAD, ss.EOS, ss.UNK, ss.BOS]))
    t.post_processor = TemplateProcessing(single=template, special_tokens=[(s, t.token_to_id(s)) for s in (ss.BOS, ss.EOS)])
    return Tokenizer(t, padding_side=padding_side, pad_token=ss.PAD, eos_token=ss.EOS, unk_token=ss.UNK,
                     bos_token=ss.BOS, cls_token=ss.BOS)


def tiny_t5(cfg: RLFDemoConfig, vocab: int) -> T5ForConditionalGeneration:
    d = cfg.d_model
    return T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=d, d_kv=d // cfg.n_heads, d_ff=2 * d,
                                               num_layers=cfg.n_layers, num_heads=cfg.n_heads, dropout_rate=0.0,
                                               feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                               pad_token_id=0, eos_token_id=1))


def tiny_roberta(cfg: RLFDemoConfig, vocab: int, labels: list[str]) -> RobertaForSequenceClassification:
    d = cfg.d_model
    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=vocab, hidden_size=d, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        intermediate_size=2 * d, max_position_embeddings=40, pad_token_id=0, bos_token_id=3, eos_token_id=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label={str(i): n for i, n in enumerate(labels)}))


def classification_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, L)
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), batch["labels"].shape[0]


def collate_classification(pad_id: int):
    def collate(rows):
        T = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, :len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["labels"] for r in rows])}
    return collate


@torch.no_grad()
def accuracy(model, tok: Tokenizer, data: list[tuple[str, int]]) -> float:
    enc = tok([t for t, _ in data], padding_side="right")
    pred = model(enc["input_ids"], attention_mask=enc["attention_mask"]).argmax(-1)
    return (pred == torch.tensor([y for _, y in data])).float().mean().item()


def train_classifier(cfg: RLFDemoConfig, name: str, labels: list[str], data_fn, tok: Tokenizer, log: RunLog,
                     seed: int) -> tuple[RobertaForSequenceClassification, float]:
    """A tiny RoBERTa from a config, trained with the one loop; -> (model, held-out accuracy)."""
    torch.manual_seed(seed)
    model = tiny_roberta(cfg, len(tok), labels)
    rows = [{"input_ids": tok.encode(t), "labels": y} for t, y in data_fn(cfg.clf_examples, seed)]
    train(model, rows, collate_classification(tok.pad_token_id), classification_loss_sum,
          replace(cfg.clf, seed=seed, device="cpu"), log=log, phase=name)
    model.eval().requires_grad_(False)
    return model, accuracy(model, tok, data_fn(400, seed + 1000))


# ---------------------------------------------------------------------------------------------
# sampling and evaluation
# ---------------------------------------------------------------------------------------------


def prompts_of(items: list[dict]) -> list[str]:
    return [ss.PREFIX + it["text"] for it in items]


@torch.no_grad()
def sample_summaries(model, ref, tok: Tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
                     gen: torch.Generator, device, batch: int = 100) -> tuple[list[str], list[float]]:
    """One sampled summary per prompt (text without specials) and its KL estimate Σ_t log π(y_t) − log π_ref(y_t)."""
    texts, kls = [], []
    for s in range(0, len(prompts), batch):
        enc = tok(prompts[s:s + batch], padding_side="right")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        dec = generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                       temperature=temperature, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       generator=gen)  # (b, 1 + R): decoder_start | response
        rmask = response_mask_from(dec[:, 1:], tok.eos_token_id)
        dmask = torch.cat([torch.ones_like(dec[:, :1]), rmask], 1)
        lp = [next_token_logprobs(m(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
                                  / temperature, dec, start=1) for m in (model, ref)]
        kls += ((lp[0] - lp[1]) * rmask).sum(-1).tolist()
        texts += [tok.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(dec[:, 1:], rmask)]
    return texts, kls


def stats(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "median": statistics.median(xs)}


def evaluate(model, ref, tok, reward: ClassifierReward, names: list[str], items: list[dict], cfg: RLFDemoConfig,
             gen: torch.Generator, device) -> dict:
    n = cfg.eval_samples
    prompts = [p for p in prompts_of(items) for _ in range(n)]
    texts, kls = sample_summaries(model, ref, tok, prompts, cfg.ppo.max_new_tokens, cfg.ppo.temperature, gen, device)
    sc = reward.scores(texts)
    per_item = [statistics.mean(sc["reward"][i * n:(i + 1) * n].tolist()) for i in range(len(items))]
    out = {"reward": stats(sc["reward"].tolist()), "kl": stats(kls),
           "rouge": rouge(texts, [it["summary"] for it in items for _ in range(n)]),
           "length": statistics.mean(len(t.split()) for t in texts), "n_items": len(items),
           "unique_frac": len(set(texts)) / len(texts),
           "samples": [{"text": it["text"], "reference": it["summary"], "summary": texts[i * n],
                        "reward": round(sc["reward"][i * n].item(), 3)} for i, it in enumerate(items[:8])],
           "_per_item": per_item}
    for k, name in enumerate(names):
        out[name] = stats(sc[next(key for key in sc if key.startswith(f"{k}:"))].tolist())
    return out


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def run_rlf_demo(cfg: RLFDemoConfig, quiet: bool = False) -> dict:
    """Run (a)–(c) and the evaluation; returns the summary (also cfg.out/summary.json)."""
    with cpu_threads(cfg.threads):
        return _run(cfg, quiet)


def load_items(cfg: RLFDemoConfig) -> tuple[list[dict], list[dict]]:
    """(training items, held-out items): cfg.data's {"text", "summary"} records (the last n_heldout held out),
    or the synthetic reports (training summaries with slips, held-out ones clean)."""
    if cfg.data is None:
        return ss.corpus(cfg.sft_examples, cfg.seed, cfg.slip_prob), ss.corpus(cfg.n_heldout, cfg.seed + 100)
    items = [json.loads(line) for line in open(cfg.data) if line.strip()]
    for i, it in enumerate(items):
        if not isinstance(it.get("text"), str) or not isinstance(it.get("summary"), str):
            raise ValueError(f"{cfg.data}:{i + 1}: each record needs string fields 'text' and 'summary'")
    if len(items) <= cfg.n_heldout:
        raise ValueError(f"{cfg.data}: {len(items)} records, need more than n_heldout={cfg.n_heldout}")
    return items[:-cfg.n_heldout], items[-cfg.n_heldout:]


def build_reward(cfg: RLFDemoConfig, policy_tok: Tokenizer, log: RunLog) -> tuple[ClassifierReward, list[str], dict]:
    """The weighted classifier reward: the spec'd checkpoints, the named hub classifiers, or tiny ones trained here."""
    strip = (policy_tok.eos_token, policy_tok.pad_token)
    if cfg.reward_classifiers:
        names = [f"{Path(d).name}:{label}" for d, label, _ in map(parse_spec, cfg.reward_classifiers)]
        return load_classifier_reward(cfg.reward_classifiers, device=cfg.device, strip=strip), names, {}
    terms, info = [], {}
    clf_tok = None
    for k, (name, path, labels, data_fn, label, weight) in enumerate((
            ("grammar", cfg.grammar, ss.GRAMMAR_LABELS, ss.grammar_data, cfg.grammar_label, cfg.grammar_weight),
            ("sentiment", cfg.sentiment, ss.SENTIMENT_LABELS, ss.sentiment_data, cfg.sentiment_label,
             cfg.sentiment_weight))):
        if path is not None:
            model, tok = load_model(path, "classifier", device=cfg.device), Tokenizer.from_pretrained(path)
            info[name] = {"checkpoint": path}
        else:
            if clf_tok is None:
                clf_tok = word_tokenizer(ss.vocabulary_texts(), f"{ss.BOS} $A {ss.EOS}", "right")
            tok = clf_tok
            model, acc = train_classifier(cfg, name, labels, data_fn, tok, log, cfg.seed + 10 + k)
            model.to(cfg.device or "cpu")
            info[name] = {"checkpoint": f"tiny RoBERTa {cfg.n_layers}x{cfg.d_model} trained here", "heldout_acc": acc}
            log(name, f"classifier trained: held-out accuracy {acc:.3f}", heldout_acc=acc)
        terms.append((model, tok, label, weight))
        info[name].update(label=label, label_name=model.config.id2label.get(
            str(ClassifierReward([(model, tok, label, weight)]).terms[0][2])), weight=weight)
    return ClassifierReward(terms, strip=strip), ["grammar", "sentiment"], info


def _run(cfg: RLFDemoConfig, quiet: bool) -> dict:
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device or "cpu")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / "metrics.jsonl", quiet=quiet)
    log("setup", f"writing to {out}", config=asdict(cfg))
    train_items, heldout = load_items(cfg)

    # (a) the policy: a hub checkpoint as it is, or a tiny T5 taught to summarize
    if cfg.policy is not None:
        lm, tok = load_model(cfg.policy, "seq2seq", device=device), Tokenizer.from_pretrained(cfg.policy)
        log("sft", f"policy {cfg.policy} used as it is (no SFT)")
    else:
        tok = word_tokenizer(ss.vocabulary_texts(), f"$A {ss.EOS}", "left")
        lm = tiny_t5(cfg, len(tok))
        records = [{"input": ss.PREFIX + it["text"], "target": it["summary"]} for it in train_items]
        n_params = sum(p.numel() for p in lm.parameters())
        log("sft", f"T5 {cfg.n_layers}+{cfg.n_layers} layers x {cfg.d_model}, {n_params / 1e3:.0f}K params, "
                   f"{len(records)} summaries ({cfg.slip_prob:.0%} with a word-order slip)")
        train(lm, encode_seq2seq(records, tok), Seq2SeqCollator(tok.pad_token_id, lm.config.start_token_id),
              seq2seq_loss, replace(cfg.sft, seed=cfg.seed + 1, device=str(device)), log=log, phase="sft")
        lm.save_pretrained(str(out / "sft"))
        tok.save_pretrained(out / "sft")
    lm.eval()
    sft_lm = copy.deepcopy(lm).eval().requires_grad_(False)  # the frozen reference

    # (b) the reward: Σ weight × classifier logit[label]
    reward, names, clf_info = build_reward(cfg, tok, log)
    before = evaluate(sft_lm, sft_lm, tok, reward, names, heldout, cfg, gen, device)
    log("eval", f"SFT policy: reward {before['reward']['mean']:+.3f} (median {before['reward']['median']:+.3f})  "
                f"ROUGE-L {before['rouge']['rougeL']:.3f}", **{k: v for k, v in before.items() if k[0] != "_"})

    # (c) PPO with the KL penalty to the SFT policy
    pcfg = replace(cfg.ppo, adaptive_kl=cfg.ppo.adaptive_kl and cfg.ppo.init_kl_coef > 0)
    trainer = PPOTrainer(PolicyWithValueHead(lm).to(device), tok, reward, pcfg, ref_model=sft_lm, generator=gen)
    prompts = prompts_of(train_items)
    order = torch.Generator().manual_seed(cfg.seed + 4)
    t_ppo = time.time()
    for step in range(cfg.ppo_steps):
        idx = torch.randint(len(prompts), (cfg.ppo.batch_size,), generator=order).tolist()
        enc = tok([prompts[i] for i in idx], padding_side="left")
        st = trainer.step(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        eta = (time.time() - t_ppo) / (step + 1) * (cfg.ppo_steps - step - 1)
        log("ppo", f"step {step + 1}/{cfg.ppo_steps}  reward {st['score']:+.3f}  kl {st['kl']:.3f}  "
                   f"beta {st['kl_coef']:.3f}  clip {st['clipfrac']:.3f}  len {st['response_length']:.1f}  "
                   f"ETA {format_eta(eta)}", step=step + 1, **st)
    lm.eval()
    lm.save_pretrained(str(out / "policy"))
    tok.save_pretrained(out / "policy")
    after = evaluate(lm, sft_lm, tok, reward, names, heldout, cfg, gen, device)
    log("eval", f"PPO policy: reward {after['reward']['mean']:+.3f} (median {after['reward']['median']:+.3f})  "
                f"ROUGE-L {after['rouge']['rougeL']:.3f}  KL {after['kl']['mean']:.3f}",
        **{k: v for k, v in after.items() if k[0] != "_"})

    summary = {"config": asdict(cfg), "classifiers": clf_info, "names": names,
               "sft": {k: v for k, v in before.items() if k[0] != "_"},
               "ppo": {k: v for k, v in after.items() if k[0] != "_"},
               "kl_target": cfg.ppo.target_kl, "final_kl_coef": trainer.kl_ctl.value,
               "wins": sum(a > b for a, b in zip(after["_per_item"], before["_per_item"])),
               "elapsed_s": round(time.time() - t_start, 1)}
    summary["checks"] = checks(summary, cfg)
    return finish(out, summary, log, write_report, summary_table, quiet,
                  panels=(("score", "reward (classifier logits)"), ("kl", "KL to SFT (nats/summary)"), ("kl_coef", "β")))


def checks(s: dict, cfg: RLFDemoConfig) -> dict:
    """The issue's must-reach targets, measured."""
    b, a = s["sft"], s["ppo"]
    c = {"reward_mean_up": a["reward"]["mean"] > b["reward"]["mean"],
         "reward_median_up": a["reward"]["median"] > b["reward"]["median"],
         **{f"{n}_mean_up": a[n]["mean"] > b[n]["mean"] for n in s["names"]},
         "ppo_wins_most_items": s["wins"] > a["n_items"] / 2, "n_heldout>=200": a["n_items"] >= 200}
    if cfg.ppo.init_kl_coef > 0:
        c["rouge_L_drop<0.2"] = b["rouge"]["rougeL"] - a["rouge"]["rougeL"] < 0.2
        if cfg.ppo.adaptive_kl:
            c["kl<=2*target"] = a["kl"]["mean"] <= 2 * cfg.ppo.target_kl
    return c


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------


def summary_table(s: dict) -> str:
    b, a = s["sft"], s["ppo"]
    rows = [("", "SFT policy", "PPO policy"),
            ("combined reward mean / median", f"{b['reward']['mean']:+.3f} / {b['reward']['median']:+.3f}",
             f"{a['reward']['mean']:+.3f} / {a['reward']['median']:+.3f}")]
    rows += [(f"{n} logit mean / median", f"{b[n]['mean']:+.3f} / {b[n]['median']:+.3f}",
              f"{a[n]['mean']:+.3f} / {a[n]['median']:+.3f}") for n in s["names"]]
    rows += [(f"ROUGE-{k[5:]}", f"{b['rouge'][k]:.3f}", f"{a['rouge'][k]:.3f}") for k in ("rouge1", "rouge2", "rougeL")]
    rows += [("KL to SFT (nats) mean", f"{b['kl']['mean']:.3f}", f"{a['kl']['mean']:.3f}"),
             ("unique summaries", f"{b['unique_frac']:.3f}", f"{a['unique_frac']:.3f}"),
             ("mean length (words)", f"{b['length']:.1f}", f"{a['length']:.1f}")]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(w[i]) for i in range(3)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    lines.append(f"({a['n_items']} held-out items; PPO beats SFT on {s['wins']}/{a['n_items']} by combined reward)")
    lines.append(f"KL target {s['kl_target']}, final beta {s['final_kl_coef']:.4f}; elapsed {s['elapsed_s']:.0f}s")
    lines.append("checks: " + ", ".join(f"{k} {'OK' if v else 'MISSED'}" for k, v in s["checks"].items()))
    return "\n".join(lines)


def write_report(out: Path, s: dict) -> None:
    ppo = [json.loads(line) for line in open(out / "metrics.jsonl") if '"phase": "ppo"' in line]
    cls = s["classifiers"]
    lines = [f"# RL from classifier feedback (book ch. 9) — {Path(s['config']['out']).name}", "",
             "A T5 summarizer tuned with PPO; reward = Σ weight × classifier logit[label], KL penalty to the SFT "
             "policy.", "", "## Summary", "", "```", summary_table(s), "```", "", "## Reward terms", ""]
    lines += [f"- {n}: {d.get('checkpoint')}, label {d.get('label')} ({d.get('label_name')}), weight {d.get('weight')}"
              + (f", held-out accuracy {d['heldout_acc']:.3f}" if "heldout_acc" in d else "") for n, d in cls.items()]
    lines += ["", "## PPO per step", "", "| step | reward | KL | β | clip frac | approx-KL | value loss | length |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['score']:+.3f} | {r['kl']:.3f} | {r['kl_coef']:.4f} | {r['clipfrac']:.3f} | "
              f"{r['approxkl']:.4f} | {r['value_loss']:.3f} | {r['response_length']:.1f} |" for r in ppo]
    lines += samples_and_checks(s, ("document", "reference", "summary", "reward"),
                                lambda d: (d["text"], d["reference"], d["summary"], f"{d['reward']:+.2f}"))
    (out / "report.md").write_text("\n".join(lines) + "\n")
