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

SAWYER (the book ch. 10; `policy="llama"`): the same pipeline with a Llama policy built from a config,
fine-tuned with QLoRA (NF4 base linears, bf16 compute where the CPU has bf16 instructions, else fp32; no
double quantization; LoRA on every linear with the book's α/r = 32/128 and dropout 0.05; the embedding and
untied head train beside it, as sft_job does for new chat tokens) on single-turn Q/A in the
###HUMAN### / ###BOT### / ###STOP### format with the loss on the bot reply only; a RoBERTa reward model with
the margin loss; PPO with the book's batch 8 × gradient accumulation 4 and 2 PPO epochs (the learning rate
scaled up for a tiny model). `policy` and `rm_backbone` also take hub names or checkpoint directories
(e.g. a Llama checkpoint and roberta-base): the same steps then run on the real models.

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
from minillm.demos.rlhf_report import finish, summary_table, write_report
from minillm.generation import generate
from minillm.models.gpt2 import GPT2Config, GPT2LMHeadModel
from minillm.data.sft import BOT, CHAT_TOKENS, HUMAN, STOP, CausalLMCollator, add_chat_tokens
from minillm.lora import AdapterConfig, merge_and_unload, prepare_adapters, save_adapter, trainable_report
from minillm.losses import IGNORE_INDEX, next_token_logprobs
from minillm.rlhf.ppo import PolicyWithValueHead, PPOConfig, PPOTrainer, response_mask_from
from minillm.rlhf.reward import RewardModel, RewardScorer, rankings_to_pairs, train_reward_model
from minillm.tokenizer import Tokenizer
from minillm.train.loop import TrainConfig, causal_lm_loss, train
from minillm.train.device import cpu_threads
from minillm.train.runlog import RunLog, format_eta


def _sft_settings() -> TrainConfig:
    return TrainConfig(lr=2e-3, weight_decay=0.0, warmup_steps=30, max_steps=300, batch_size=64, max_grad_norm=1.0,
                       log_every=50, device="cpu")


def _rm_settings() -> TrainConfig:
    return TrainConfig(lr=1e-3, epochs=4, batch_size=64, weight_decay=0.0)


def _ppo_settings() -> PPOConfig:
    return PPOConfig(lr=1e-4, batch_size=64, mini_batch_size=16, ppo_epochs=4, init_kl_coef=0.1, adaptive_kl=True,
                     target_kl=3.0, horizon=1000.0, kl_estimator="k1", max_new_tokens=20)


def _sawyer_settings(cfg: "DemoConfig") -> dict:
    """SAWYER's recipe (the book ch. 10) scaled to a 2-layer, 64-wide Llama: QLoRA with α/r = 32/128 = 1/4 and
    dropout 0.05 (r 32 instead of 128 on a 64-wide model); PPO with minibatches of 8, gradient accumulation 4 and
    2 PPO epochs, as the book; its lr 1.41e-5 suits an 8B model, a tiny LoRA policy needs a larger one."""
    return dict(rm_backbone="roberta", chat_format="sawyer",
                adapters=AdapterConfig(lora_r=32, lora_alpha=8.0, lora_dropout=0.05, quantize="nf4"),
                sft=replace(cfg.sft, lr=3e-3),
                ppo=replace(cfg.ppo, lr=1e-3, batch_size=64, mini_batch_size=8, gradient_accumulation_steps=4,
                            ppo_epochs=2))


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
    rm_backbone: str = "bert"         # "bert" / "roberta": a small encoder from scratch, first token pooled; "gpt2": the
                                      # SFT body, last token; or a hub name / checkpoint directory (e.g. roberta-base)
    policy: str = "gpt2"              # "gpt2" / "llama" (SAWYER: QLoRA, chat format, RoBERTa RM) from a config, or a
                                      # causal-LM hub name / checkpoint directory (its own tokenizer + the chat tokens)
    chat_format: str = "plain"        # "plain": "review of ... :" -> review [EOS]; "sawyer": ###HUMAN### / ###BOT### / ###STOP###
    adapters: AdapterConfig = field(default_factory=AdapterConfig)  # the policy's SFT (and PPO): full, LoRA or QLoRA
    ppo: PPOConfig = field(default_factory=_ppo_settings)     # (c) PPO (max_new_tokens: the response length)
    ppo_steps: int = 40
    n_heldout: int = 64               # evaluation
    probe_prompts: int = 32           # held-out prompts sampled after every PPO step (proxy and true score curves)
    eval_samples: int = 4
    threads: Optional[int] = 1     # 1 is fastest on a shared 2-core machine (2 threads oversubscribe badly)

    @classmethod
    def make(cls, tiny: bool = False, **kw) -> "DemoConfig":
        """A config from flat settings: DemoConfig's own fields, and PPOConfig's (kl coefficient, target,
        estimator, ...) for the PPO step. tiny: seconds-scale settings for tests (everything runs, numbers rough)."""
        ppo_names = {f.name for f in fields(PPOConfig)}
        ppo_kw = {k: kw.pop(k) for k in list(kw) if k in ppo_names}
        cfg = cls(**kw)
        if cfg.policy != "gpt2":  # SAWYER's recipe for a Llama (or any hub) policy, unless set explicitly
            cfg = replace(cfg, **{k: v for k, v in _sawyer_settings(cfg).items() if k not in kw})
        if tiny:
            base = dict(n_embd=32, n_layer=1, n_head=2, sft_examples=800, k_responses=4, n_heldout=64, eval_samples=1,
                        sft=replace(cfg.sft, max_steps=120, batch_size=32), rm=replace(cfg.rm, epochs=2),
                        ppo_steps=3)
            if cfg.policy == "gpt2":
                base["ppo"] = replace(cfg.ppo, batch_size=32, mini_batch_size=16, ppo_epochs=2, max_new_tokens=16)
            else:  # SAWYER: keep minibatches of 8 x accumulation 4
                base.update(sft=replace(cfg.sft, max_steps=150, batch_size=32),
                            ppo=replace(cfg.ppo, batch_size=32, ppo_epochs=2, max_new_tokens=16))
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


RM_BACKBONES = {"bert": "BERT from a config ([CLS] pooled) + scalar head",
                "roberta": "RoBERTa from a config (<s> pooled) + scalar head",
                "gpt2": "GPT-2 (SFT body, last token) + scalar head"}


def build_reward_model(cfg: DemoConfig, tok: Tokenizer, sft_lm: GPT2LMHeadModel) -> tuple[RewardModel, Tokenizer]:
    """BERT or RoBERTa (from a config, first token pooled), the SFT GPT-2 body (InstructGPT's choice, last token
    pooled), or a hub checkpoint (roberta-base: SAWYER's) with its own tokenizer."""
    if cfg.rm_backbone == "gpt2":
        return RewardModel(copy.deepcopy(sft_lm).requires_grad_(True), cfg.n_embd, pool="last"), tok
    if cfg.rm_backbone not in RM_BACKBONES:  # a hub name or directory
        from minillm.models.layers import hidden_size
        from minillm.rlhf.reward import load_backbone
        from minillm.train.jobs import load_tokenizer
        backbone = load_backbone(cfg.rm_backbone)
        pool = "last" if hasattr(backbone, "hidden_states") else "first"
        return RewardModel(backbone, hidden_size(backbone), pool=pool), load_tokenizer(cfg.rm_backbone)
    from minillm.models.bert import BertConfig, BertModel
    from minillm.models.roberta import RobertaConfig, RobertaModel
    config_cls, model_cls = (RobertaConfig, RobertaModel) if cfg.rm_backbone == "roberta" else (BertConfig, BertModel)
    # RoBERTa counts positions from pad_token_id + 1: leave room for them
    bcfg = config_cls(vocab_size=len(tok), hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                      num_attention_heads=cfg.n_head, intermediate_size=4 * cfg.n_embd, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, max_position_embeddings=64 + tok.pad_token_id + 1,
                      pad_token_id=tok.pad_token_id)
    return RewardModel(model_cls(bcfg, add_pooling_layer=False), cfg.n_embd, pool="first"), encoder_tokenizer(tok)


def build_policy(cfg: DemoConfig, tok: Tokenizer):
    """GPT-2 or (SAWYER) Llama from a config, sized by n_embd / n_layer / n_head."""
    if cfg.policy == "llama":
        from minillm.models.llama import LlamaConfig, LlamaForCausalLM
        lcfg = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.n_embd, intermediate_size=2 * cfg.n_embd,
                           num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                           num_key_value_heads=max(1, cfg.n_head // 2), max_position_embeddings=64,
                           initializer_range=0.02, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
        return LlamaForCausalLM(lcfg)
    gcfg = GPT2Config(vocab_size=len(tok), n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                      n_positions=48, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(gcfg)


def build_policy_and_tokenizer(cfg: DemoConfig, texts: list[str]):
    """The policy and its tokenizer. From a config: a word-level tokenizer trained on the synthetic texts (plus,
    for the chat format, the three chat tokens, ###STOP### ending a reply). From a hub name: its own tokenizer
    and weights, the chat tokens added and the embedding resized (add_chat_tokens)."""
    if cfg.policy in ("gpt2", "llama"):
        tok = build_tokenizer(texts)
        if cfg.chat_format == "sawyer":
            tok.add_special_tokens(CHAT_TOKENS, eos_token=STOP)
        return build_policy(cfg, tok), tok
    from minillm.models.auto import load_model
    from minillm.train.jobs import load_tokenizer
    lm, tok = load_model(cfg.policy, "causal-lm"), load_tokenizer(cfg.policy)
    if cfg.chat_format == "sawyer":
        add_chat_tokens(tok, lm)
        tok.add_special_tokens([], eos_token=STOP)
    return lm, tok


def chat_prompt(cfg: DemoConfig, prompt: str) -> str:
    """What the policy reads: the bare prompt, or the single-turn chat wrapping of SAWYER's SFT data."""
    return f"{HUMAN} {prompt}\n{BOT}" if cfg.chat_format == "sawyer" else prompt


def judged(response: str) -> str:
    """A response as the hidden judge reads it: the chat format's ###STOP### is its end-of-review mark."""
    return response.replace(STOP, " " + sr.EOS).replace("  ", " ").strip() if STOP in response else response


def compute_dtype() -> Optional[torch.dtype]:
    """bf16 (the book's QLoRA compute dtype) where the CPU has bf16 instructions (AVX512-BF16 / AMX), else
    None (= the input's dtype, fp32): emulated bf16 matmuls are slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else None


def save_lm(lm, tok: Tokenizer, d: Path) -> None:
    """A loadable checkpoint: with adapters, peft's adapter files in d/adapter and the merged model in d."""
    from minillm.lora import lora_layers
    if lora_layers(lm):
        save_adapter(lm, d / "adapter")
        lm = merge_and_unload(copy.deepcopy(lm))
    lm.save_pretrained(str(d))
    tok.save_pretrained(d)


def sft_examples(tok: Tokenizer, pairs: list[tuple[str, str]]) -> list[dict]:
    """[prompt response EOS] ids with labels −100 on the prompt: completion-only SFT examples for the loop."""
    out = []
    for p, r in pairs:
        pi, ri = tok.encode(p), tok.encode(r, add_special_tokens=False) + [tok.eos_token_id]  # as the policy reads it
        out.append({"input_ids": pi + ri, "labels": [IGNORE_INDEX] * len(pi) + ri})
    return out


def train_sft(model, tok: Tokenizer, corpus: list, cfg: DemoConfig, log: RunLog) -> None:
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
        scores = [sr.labeler_score(p, judged(r), rng, noise) for r in resps]
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


@torch.no_grad()
def probe(model, tok: Tokenizer, scorer: RewardScorer, prompts: list[str], generator: torch.Generator,
          max_new_tokens: int) -> dict:
    """One sampled response per held-out prompt, scored by the reward model (proxy) and the hidden judge (true):
    the two curves whose parting is reward hacking."""
    resps = sample_responses(model, tok, prompts, max_new_tokens, generator)
    true = [sr.true_score(p, judged(r)) for p, r in zip(prompts, resps)]
    return {"proxy_heldout": scorer(prompts, resps).mean().item(), "true_heldout": statistics.mean(true)}


def evaluate(model, ref, tok: Tokenizer, scorer: RewardScorer, prompts: list[tuple[str, str]], n: int,
             generator: torch.Generator, max_new_tokens: int) -> dict:
    """n samples per held-out prompt; per-prompt means, then mean and spread over prompts."""
    texts = [p for p, _ in prompts for _ in range(n)]
    resps = sample_responses(model, tok, texts, max_new_tokens, generator)
    proxy = scorer(texts, resps).tolist()
    true = [sr.true_score(p, judged(r)) for p, r in zip(texts, resps)]
    kl = sequence_kl(model, ref, tok, texts, resps)

    def per_prompt(xs):
        return [statistics.mean(xs[i * n:(i + 1) * n]) for i in range(len(prompts))]

    def summary(xs):
        pp = per_prompt(xs)
        return {"mean": statistics.mean(pp), "std": statistics.pstdev(pp),
                "sem": statistics.pstdev(pp) / math.sqrt(len(pp))}

    clean = [judged(r).replace(sr.EOS, "").strip() for r in resps]
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
    with cpu_threads(cfg.threads):
        return _run(cfg, quiet)


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
    tok_texts = [p + " " + r for p, r in corpus] + [p for p, _ in sr.all_prompts()]
    # the chat format wraps every prompt the policy reads (SFT, labeling, PPO, evaluation) in ###HUMAN### ... ###BOT###
    train_prompts = [(chat_prompt(cfg, p), it) for p, it in train_prompts]
    heldout = [(chat_prompt(cfg, p), it) for p, it in heldout]
    corpus = [(chat_prompt(cfg, p), r) for p, r in corpus]
    policy_lm, tok = build_policy_and_tokenizer(cfg, tok_texts)
    n_params = sum(p.numel() for p in policy_lm.parameters())
    name = {"gpt2": "GPT-2", "llama": "Llama"}.get(cfg.policy, cfg.policy)
    qlora = ""
    if cfg.adapters.lora_r:  # (Q)LoRA; the embedding and an untied head train too (new chat-token rows)
        dtype = compute_dtype() if cfg.adapters.quantize else None
        rows = [policy_lm.get_input_embeddings().weight]
        if policy_lm.lm_head.weight is not rows[0]:
            rows.append(policy_lm.lm_head.weight)
        prepare_adapters(policy_lm, cfg.adapters, compute_dtype=dtype, also_train=rows)
        qlora = (f"; {'QLoRA (NF4, ' + ('bf16' if dtype else 'fp32') + ' compute)' if cfg.adapters.quantize else 'LoRA'}"
                 f" r={cfg.adapters.lora_r} alpha={cfg.adapters.lora_alpha:g} dropout={cfg.adapters.lora_dropout:g}, "
                 f"{trainable_report(policy_lm)}")
    log("sft", f"{name} {cfg.n_layer}x{cfg.n_embd}, {n_params / 1e3:.0f}K params, vocab {len(tok)}, "
               f"{len(corpus)} reviews{qlora}", compute_dtype=str(compute_dtype()) if qlora and cfg.adapters.quantize else None)
    train_sft(policy_lm, tok, corpus, cfg, log)
    save_lm(policy_lm, tok, out / "sft")
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
    t_ppo = time.time()
    prng = random.Random(cfg.seed + 4)
    probe_gen = torch.Generator().manual_seed(cfg.seed + 7)  # its own stream: probing leaves the PPO run unchanged
    for step in range(cfg.ppo_steps):
        batch = [tp[prng.randrange(len(tp))] for _ in range(cfg.ppo.batch_size)]
        enc = tok(batch, padding_side="left")
        st = trainer.step(enc["input_ids"], enc["attention_mask"])
        st.update(probe(policy_lm, tok, scorer, hp[:cfg.probe_prompts], probe_gen, cfg.ppo.max_new_tokens))
        log("ppo", f"step {step + 1}/{cfg.ppo_steps}  score {st['score']:+.3f}  held-out: proxy "
                   f"{st['proxy_heldout']:+.3f} true {st['true_heldout']:.2f}  kl {st['kl']:.3f}  beta "
                   f"{st['kl_coef']:.3f}  clip {st['clipfrac']:.3f}  len {st['response_length']:.1f}  "
                   f"ETA {format_eta((time.time() - t_ppo) / (step + 1) * (cfg.ppo_steps - step - 1))}",
            step=step + 1, **st)
    policy_lm.eval()
    save_lm(policy_lm, tok, out / "policy")
    after = evaluate(policy_lm, sft_lm, tok, scorer, heldout, cfg.eval_samples, gen, cfg.ppo.max_new_tokens)
    log("eval", f"PPO policy: proxy {after['proxy']['mean']:+.3f}  true {after['true']['mean']:.3f}  "
                f"KL {after['kl']['mean']:.3f}  distinct-2 {after['distinct2']:.3f}")

    summary = {
        "config": asdict(cfg), "policy": f"{name} {cfg.n_layer}x{cfg.n_embd}{qlora}", "reward_model": rm_stats,
        "reward_model_backbone": RM_BACKBONES.get(cfg.rm_backbone, f"{cfg.rm_backbone} (hub checkpoint) + scalar head"),
        "sft": {k: v for k, v in before.items() if not k.startswith("_")},
        "ppo": {k: v for k, v in after.items() if not k.startswith("_")},
        "kl_target": cfg.ppo.target_kl, "final_kl_coef": trainer.kl_ctl.value,
        "wins_proxy": sum(a > b for a, b in zip(after["_proxy_pp"], before["_proxy_pp"])),
        "wins_true": sum(a > b for a, b in zip(after["_true_pp"], before["_true_pp"])),
        "elapsed_s": round(time.time() - t_start, 1),
    }
    summary["checks"] = checks(summary, cfg)
    return finish(out, summary, log, write_report, summary_table, quiet,
                  panels=(("proxy_heldout", "proxy reward (held-out)"), ("true_heldout", "true score 1-10 (held-out)"),
                          ("kl", "KL to reference (nats/response)"), ("kl_coef", "β")))


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
