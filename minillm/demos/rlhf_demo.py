"""The RLHF demo, end to end and offline: SFT -> labelers -> reward model -> PPO with a KL penalty.

(a) A word-level tokenizer (trained with `tokenizers`) and a small GPT-2 built from a config are
    fine-tuned (SFT) on synthetic reviews of mixed sentiment and quality (synthetic_reviews.py).
(b) The SFT policy answers the training prompts K times; a hidden "true" judge, seen through
    labelers' noise, rates each response 1–10; the K ratings become K(K−1)/2 preference pairs with
    margins; a reward model (by default a small BERT + a scalar head on [CLS]; with rm_backbone="gpt2",
    the SFT GPT-2 body, as InstructGPT initializes it) is trained with the margin loss and checked on
    pairs from held-out prompts.
(c) PPO tunes the SFT policy against the reward model, with a per-token KL penalty to the frozen
    SFT reference and the adaptive KL controller. `init_kl_coef=0` turns the penalty off: the proxy
    reward still rises, while the true score or the diversity of the text falls (reward hacking).

Held-out evaluation (64 prompts never used for training) compares the SFT and PPO policies on
the proxy reward, the true score, the KL to the reference and distinct-2. Everything lands in
runs/rlhf-demo/ (cfg.out): metrics.jsonl, summary.json, report.md, the checkpoints, and curves.png when
matplotlib is installed (the report's layout: rlhf_report.py).

Source: Ouyang et al. (2022) and Ziegler et al. (2019) for the pipeline; the book ch. 9–10 and the
course for the three steps and the KL penalty's purpose.
"""

from __future__ import annotations

import copy
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import torch

from minillm import hub
from minillm.demos import synthetic_reviews as sr
from minillm.demos.rlhf_report import plot_curves, summary_table, write_report
from minillm.generation import generate
from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
from minillm.data.sft import CausalLMCollator
from minillm.losses import IGNORE_INDEX, next_token_logprobs
from minillm.rlhf.ppo import PolicyWithValueHead, PPOConfig, PPOTrainer, response_mask_from
from minillm.rlhf.reward import RewardModel, RewardScorer, rankings_to_pairs, train_reward_model
from minillm.tokenizer import Tokenizer
from minillm.train.loop import TrainConfig, causal_lm_loss, train
from minillm.train.runlog import RunLog


def _sft_settings() -> TrainConfig:
    return TrainConfig(lr=2e-3, weight_decay=0.0, warmup_steps=30, max_steps=300, batch_size=64, max_grad_norm=1.0,
                       log_every=50, device="cpu")


def _rm_settings() -> TrainConfig:
    return TrainConfig(lr=1e-3, epochs=4, batch_size=64, weight_decay=0.0)


def _ppo_settings() -> PPOConfig:
    return PPOConfig(lr=1e-4, batch_size=64, mini_batch_size=16, ppo_epochs=4, init_kl_coef=0.1, adaptive_kl=True,
                     target_kl=3.0, horizon=1000.0, kl_estimator="k1", max_new_tokens=20)


@dataclass
class DemoConfig:
    out: str = "runs/rlhf-demo"      # everything the run writes goes here
    seed: int = 0
    n_embd: int = 64                 # the GPT-2 policy (and the BERT reward model: same size)
    n_layer: int = 2
    n_head: int = 4
    sft: TrainConfig = field(default_factory=_sft_settings)   # (a) SFT with the one training loop
    sft_examples: int = 4000
    rm: TrainConfig = field(default_factory=_rm_settings)     # (b) labels and reward model (epochs, batch, lr)
    k_responses: int = 6
    label_noise: float = 0.5
    rm_center_coef: float = 0.01
    use_margin: bool = True
    rm_backbone: str = "bert"         # "bert": a small BERT from scratch, [CLS] pooled; "gpt2": the SFT body, last token
    ppo: PPOConfig = field(default_factory=_ppo_settings)     # (c) PPO (max_new_tokens: the response length)
    ppo_steps: int = 40
    n_heldout: int = 64               # evaluation
    eval_samples: int = 4
    threads: Optional[int] = 1     # 1 is fastest on a shared 2-core machine (2 threads oversubscribe badly)

    @classmethod
    def make(cls, tiny: bool = False, **kw) -> "DemoConfig":
        """A config from flat settings: DemoConfig's own fields, and PPOConfig's (kl coefficient, target,
        estimator, ...) for the PPO step. tiny: seconds-scale settings for tests (everything runs, numbers rough)."""
        ppo_names = {f.name for f in fields(PPOConfig)}
        ppo_kw = {k: kw.pop(k) for k in list(kw) if k in ppo_names}
        cfg = cls(**kw)
        if tiny:
            base = dict(n_embd=32, n_layer=1, n_head=2, sft_examples=800, k_responses=4, n_heldout=64, eval_samples=1,
                        sft=replace(cfg.sft, max_steps=120, batch_size=32), rm=replace(cfg.rm, epochs=2),
                        ppo=replace(cfg.ppo, batch_size=32, mini_batch_size=16, ppo_epochs=2, max_new_tokens=16),
                        ppo_steps=3)
            cfg = replace(cfg, **{k: v for k, v in base.items() if k not in kw})
        return replace(cfg, ppo=replace(cfg.ppo, **ppo_kw))


# ---------------------------------------------------------------------------------------------
# (a) tokenizer and SFT
# ---------------------------------------------------------------------------------------------


def build_tokenizer(texts: list[str]) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    t = HFTokenizer(models.WordLevel(unk_token=sr.UNK))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(special_tokens=[sr.PAD, sr.UNK, sr.EOS, sr.CLS]))
    return Tokenizer(t, padding_side="left", pad_token=sr.PAD, eos_token=sr.EOS, unk_token=sr.UNK)


def encoder_tokenizer(tok: Tokenizer) -> Tokenizer:
    """The same vocabulary, with "[CLS] $A" added on encoding: the reward model's tokenizer for a BERT backbone."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.processors import TemplateProcessing
    t = HFTokenizer.from_str(tok.tok.to_str())
    t.post_processor = TemplateProcessing(single=f"{sr.CLS} $A", special_tokens=[(sr.CLS, t.token_to_id(sr.CLS))])
    return Tokenizer(t, padding_side="right", pad_token=sr.PAD, eos_token=sr.EOS, unk_token=sr.UNK, cls_token=sr.CLS)


def build_reward_model(cfg: DemoConfig, tok: Tokenizer, sft_lm: GPT2LMHeadModel) -> tuple[RewardModel, Tokenizer]:
    """BERT (from a config, [CLS] pooled) or the SFT GPT-2 body (InstructGPT's choice, last token pooled)."""
    if cfg.rm_backbone == "gpt2":
        return RewardModel(copy.deepcopy(sft_lm).requires_grad_(True), cfg.n_embd, pool="last"), tok
    if cfg.rm_backbone != "bert":
        raise ValueError(f"rm_backbone must be 'bert' or 'gpt2', got {cfg.rm_backbone!r}")
    from minillm.models.bert import BertConfig, BertModel
    bcfg = BertConfig(vocab_size=len(tok), hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                      num_attention_heads=cfg.n_head, intermediate_size=4 * cfg.n_embd, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    return RewardModel(BertModel(bcfg, add_pooling_layer=False), cfg.n_embd, pool="first"), encoder_tokenizer(tok)


def build_policy(cfg: DemoConfig, tok: Tokenizer) -> GPT2LMHeadModel:
    gcfg = GPT2Config(vocab_size=len(tok), n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                      n_positions=48, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(gcfg)


def sft_examples(tok: Tokenizer, pairs: list[tuple[str, str]]) -> list[dict]:
    """[prompt response EOS] ids with labels −100 on the prompt: completion-only SFT examples for the loop."""
    out = []
    for p, r in pairs:
        pi, ri = tok.encode(p), tok.encode(r) + [tok.eos_token_id]
        out.append({"input_ids": pi + ri, "labels": [IGNORE_INDEX] * len(pi) + ri})
    return out


def train_sft(model: GPT2LMHeadModel, tok: Tokenizer, corpus: list, cfg: DemoConfig, log: RunLog) -> None:
    """Completion-only causal-LM loss (the response and its EOS) with the one training loop: AdamW, warmup then
    linear decay, gradient clipping."""
    train(model, sft_examples(tok, corpus), CausalLMCollator(tok.pad_token_id), causal_lm_loss,
          replace(cfg.sft, seed=cfg.seed + 1), log=log, phase="sft")
    model.eval()


# ---------------------------------------------------------------------------------------------
# sampling and scoring
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_responses(model, tok: Tokenizer, prompts: list[str], max_new_tokens: int,
                     generator: torch.Generator, batch: int = 128) -> list[str]:
    """One sampled response per prompt (temperature 1), as text ending with the EOS text when it ended."""
    out = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        enc = tok(chunk, padding_side="left")
        seq = generate(model, enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=max_new_tokens,
                       do_sample=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       generator=generator)
        resp = seq[:, enc["input_ids"].shape[1]:]
        rmask = response_mask_from(resp, tok.eos_token_id)
        out += [tok.decode(r[m.bool()].tolist()) for r, m in zip(resp, rmask)]
    return out


# ---------------------------------------------------------------------------------------------
# (b) labels -> pairs -> reward model
# ---------------------------------------------------------------------------------------------


def label_pairs(prompts: list[str], responses_per_prompt: list[list[str]], rng: random.Random,
                noise: float, use_margin: bool) -> list[dict]:
    pairs = []
    for p, resps in zip(prompts, responses_per_prompt):
        scores = [sr.labeler_score(p, r, rng, noise) for r in resps]
        for chosen, rejected, margin in rankings_to_pairs(resps, scores):
            pairs.append({"prompt": p, "chosen": chosen, "rejected": rejected,
                          "margin": float(margin) if use_margin else 0.0})
    return pairs


def train_rm(rm: RewardModel, tok: Tokenizer, train_pairs: list[dict], test: list[dict], cfg: DemoConfig,
             log: RunLog) -> dict:
    def show(r):
        log("rm", f"epoch {r['epoch']}/{cfg.rm.epochs}  loss {r['loss']:.3f}  train acc {r['train_acc']:.3f}  "
                  f"held-out acc {r['eval_acc']:.3f}", epoch=r["epoch"], loss=r["loss"], train_acc=r["train_acc"],
            heldout_acc=r["eval_acc"])
    r = train_reward_model(rm, tok, train_pairs, test, epochs=cfg.rm.epochs, batch_size=cfg.rm.batch_size, lr=cfg.rm.lr,
                           center_coef=cfg.rm_center_coef, use_margin=cfg.use_margin, seed=cfg.seed + 2, log=show)
    return {"heldout_acc": r["eval_acc"], "train_acc": r["train_acc"], "n_train_pairs": len(train_pairs),
            "n_heldout_pairs": len(test)}


# ---------------------------------------------------------------------------------------------
# evaluation on held-out prompts
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def sequence_kl(model, ref, tok: Tokenizer, prompts: list[str], responses: list[str]) -> list[float]:
    """Σ_t log π(y_t) − log π_ref(y_t) over each response (the k1 estimate of KL(π‖π_ref) for that sample)."""
    P_enc = tok(prompts, padding_side="left")
    P = P_enc["input_ids"].shape[1]
    resp = tok.pad([tok.encode(r) for r in responses], padding_side="right")
    ids = torch.cat([P_enc["input_ids"], resp["input_ids"]], 1)
    attn = torch.cat([P_enc["attention_mask"], resp["attention_mask"]], 1)
    lp = next_token_logprobs(model(ids, attention_mask=attn), ids, start=P)  # (B, R)
    lr = next_token_logprobs(ref(ids, attention_mask=attn), ids, start=P)
    return ((lp - lr) * resp["attention_mask"]).sum(-1).tolist()


def evaluate(model, ref, tok: Tokenizer, scorer: RewardScorer, prompts: list[tuple[str, str]], n: int,
             generator: torch.Generator, max_new_tokens: int) -> dict:
    """n samples per held-out prompt; per-prompt means, then mean and spread over prompts."""
    texts = [p for p, _ in prompts for _ in range(n)]
    resps = sample_responses(model, tok, texts, max_new_tokens, generator)
    proxy = scorer(texts, resps).tolist()
    true = [sr.true_score(p, r) for p, r in zip(texts, resps)]
    kl = sequence_kl(model, ref, tok, texts, resps)

    def per_prompt(xs):
        return [statistics.mean(xs[i * n:(i + 1) * n]) for i in range(len(prompts))]

    def summary(xs):
        pp = per_prompt(xs)
        return {"mean": statistics.mean(pp), "std": statistics.pstdev(pp),
                "sem": statistics.pstdev(pp) / math.sqrt(len(pp))}

    clean = [r.replace(sr.EOS, "").strip() for r in resps]
    return {"proxy": summary(proxy), "true": summary(true), "kl": summary(kl),
            "distinct2": sr.distinct_n(clean, 2), "unique_frac": len(set(clean)) / len(clean),
            "length": statistics.mean(len(r.split()) for r in clean), "n_prompts": len(prompts),
            "samples": [{"prompt": p, "response": r, "proxy": round(a, 3), "true": t}
                        for p, r, a, t in list(zip(texts, resps, proxy, true))[:: max(1, n)][:8]],
            "_proxy_pp": per_prompt(proxy), "_true_pp": per_prompt(true)}


# ---------------------------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig, quiet: bool = False) -> dict:
    """Run (a)–(c) and the evaluation; returns the summary (also in runs/<name>/summary.json)."""
    n_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, quiet)
    finally:
        torch.set_num_threads(n_threads)


def _run(cfg: DemoConfig, quiet: bool) -> dict:
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out / "metrics.jsonl", quiet=quiet)
    log("setup", f"writing to {out}", config=asdict(cfg))

    # (a) SFT
    train_prompts, heldout = sr.split_prompts(cfg.seed, cfg.n_heldout)
    corpus = sr.sft_corpus(cfg.sft_examples, cfg.seed, train_prompts)
    tok = build_tokenizer([p + " " + r for p, r in corpus] + [p for p, _ in sr.all_prompts()])
    policy_lm = build_policy(cfg, tok)
    n_params = sum(p.numel() for p in policy_lm.parameters())
    log("sft", f"GPT-2 {cfg.n_layer}x{cfg.n_embd}, {n_params / 1e3:.0f}K params, vocab {len(tok)}, "
               f"{len(corpus)} reviews")
    train_sft(policy_lm, tok, corpus, cfg, log)
    tok.save_pretrained(out / "sft")
    policy_lm.save_pretrained(str(out / "sft"))
    sft_lm = copy.deepcopy(policy_lm).eval().requires_grad_(False)  # the frozen reference

    # (b) labelers -> pairs -> reward model
    rng = random.Random(cfg.seed + 3)
    tp = [p for p, _ in train_prompts]
    hp = [p for p, _ in heldout]
    def k_samples(prompts):
        flat = sample_responses(sft_lm, tok, [p for p in prompts for _ in range(cfg.k_responses)],
                                cfg.ppo.max_new_tokens, gen)
        return [flat[i * cfg.k_responses:(i + 1) * cfg.k_responses] for i in range(len(prompts))]
    rounds = max(1, math.ceil(2000 / (len(tp) * cfg.k_responses * (cfg.k_responses - 1) / 2 * 0.8)))
    train_pairs = []
    for _ in range(rounds):
        train_pairs += label_pairs(tp, k_samples(tp), rng, cfg.label_noise, cfg.use_margin)
    test_pairs = label_pairs(hp, k_samples(hp), rng, cfg.label_noise, cfg.use_margin)
    with open(out / "pairs.jsonl", "w") as f:
        for d in train_pairs:
            f.write(json.dumps(d) + "\n")
    with open(out / "prompts.jsonl", "w") as f:
        for p in hp:
            f.write(json.dumps({"prompt": p}) + "\n")
    log("rm", f"{len(train_pairs)} training pairs from {len(tp)} prompts x {rounds} round(s) of K={cfg.k_responses}; "
              f"{len(test_pairs)} held-out pairs", n_train_pairs=len(train_pairs), n_heldout_pairs=len(test_pairs))
    torch.manual_seed(cfg.seed + 5)
    rm, rm_tok = build_reward_model(cfg, tok, sft_lm)
    rm_stats = train_rm(rm, rm_tok, train_pairs, test_pairs, cfg, log)
    rm.eval().requires_grad_(False)
    rm.save_pretrained(out / "rm")
    rm_tok.save_pretrained(out / "rm")
    with torch.no_grad():
        sft_resps = sample_responses(sft_lm, tok, [p for p in tp for _ in range(2)], cfg.ppo.max_new_tokens, gen)
        raw = RewardScorer(rm, rm_tok).raw([p for p in tp for _ in range(2)], sft_resps)
    scorer = RewardScorer(rm, rm_tok, raw.mean().item(), raw.std().item())
    hub.save_json({"mean": scorer.mean, "std": scorer.std}, out / "rm" / "reward_normalization.json")
    log("rm", f"reward normalization on SFT samples: mean {scorer.mean:.3f}, std {scorer.std:.3f}")

    # held-out evaluation of the SFT policy (the baseline)
    before = evaluate(sft_lm, sft_lm, tok, scorer, heldout, cfg.eval_samples, gen, cfg.ppo.max_new_tokens)
    log("eval", f"SFT policy: proxy {before['proxy']['mean']:+.3f}  true {before['true']['mean']:.3f}  "
                f"distinct-2 {before['distinct2']:.3f}")

    # (c) PPO
    policy = PolicyWithValueHead(policy_lm)
    pcfg = replace(cfg.ppo, adaptive_kl=cfg.ppo.adaptive_kl and cfg.ppo.init_kl_coef > 0)
    trainer = PPOTrainer(policy, tok, scorer, pcfg, ref_model=sft_lm, generator=gen)
    prng = random.Random(cfg.seed + 4)
    for step in range(cfg.ppo_steps):
        batch = [tp[prng.randrange(len(tp))] for _ in range(cfg.ppo.batch_size)]
        enc = tok(batch, padding_side="left")
        st = trainer.step(enc["input_ids"], enc["attention_mask"])
        log("ppo", f"step {step + 1}/{cfg.ppo_steps}  score {st['score']:+.3f}  kl {st['kl']:.3f}  "
                   f"beta {st['kl_coef']:.3f}  ent {st['entropy']:.2f}  clip {st['clipfrac']:.3f}  "
                   f"len {st['response_length']:.1f}", step=step + 1, **st)
    policy_lm.eval()
    policy_lm.save_pretrained(str(out / "policy"))
    tok.save_pretrained(out / "policy")
    after = evaluate(policy_lm, sft_lm, tok, scorer, heldout, cfg.eval_samples, gen, cfg.ppo.max_new_tokens)
    log("eval", f"PPO policy: proxy {after['proxy']['mean']:+.3f}  true {after['true']['mean']:.3f}  "
                f"KL {after['kl']['mean']:.3f}  distinct-2 {after['distinct2']:.3f}")

    summary = {
        "config": asdict(cfg), "reward_model": rm_stats, "reward_model_backbone": {"bert": "BERT from a config ([CLS] pooled) + scalar head",
                                  "gpt2": "GPT-2 (SFT body, last token) + scalar head"}[cfg.rm_backbone],
        "sft": {k: v for k, v in before.items() if not k.startswith("_")},
        "ppo": {k: v for k, v in after.items() if not k.startswith("_")},
        "kl_target": cfg.ppo.target_kl, "final_kl_coef": trainer.kl_ctl.value,
        "wins_proxy": sum(a > b for a, b in zip(after["_proxy_pp"], before["_proxy_pp"])),
        "wins_true": sum(a > b for a, b in zip(after["_true_pp"], before["_true_pp"])),
        "elapsed_s": round(time.time() - t_start, 1),
    }
    summary["checks"] = checks(summary, cfg)
    hub.save_json(summary, out / "summary.json")
    log("done", f"{summary['elapsed_s']:.0f}s", summary={k: v for k, v in summary.items() if k != "config"})
    log.close()
    write_report(out, summary)
    plot_curves(out)
    if not quiet:
        print(summary_table(summary))
    return summary


def checks(s: dict, cfg: DemoConfig) -> dict:
    """The issue's must-reach targets, measured."""
    c = {"rm_heldout_acc>=0.80": s["reward_model"]["heldout_acc"] >= 0.80,
         "proxy_up": s["ppo"]["proxy"]["mean"] > s["sft"]["proxy"]["mean"],
         "n_heldout>=64": s["ppo"]["n_prompts"] >= 64}
    true_up = s["ppo"]["true"]["mean"] > s["sft"]["true"]["mean"]
    if cfg.ppo.init_kl_coef > 0:
        c["true_up"] = true_up
    if cfg.ppo.init_kl_coef > 0 and cfg.ppo.adaptive_kl:
        c["kl<=2*target"] = s["ppo"]["kl"]["mean"] <= 2 * cfg.ppo.target_kl
    if cfg.ppo.init_kl_coef == 0:  # no penalty: the point is reward hacking, proxy up while the truth or diversity falls
        c["reward_hacking_shown"] = c["proxy_up"] and (not true_up or
                                                       s["ppo"]["distinct2"] < s["sft"]["distinct2"])
    return c
