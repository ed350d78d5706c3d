"""The fine-tuning recipes behind `minillm sft` and `minillm classify`: files in, a trained checkpoint out.

A recipe is the plain sequence a practitioner would write: read and check the data (every error
before any training), load the model and tokenizer, turn adapters on (full / LoRA / QLoRA:
lora.prepare_adapters), train with the one loop (loop.train), save in the hub layout that
from_pretrained and transformers read, and write a summary.

sft: causal-LM fine-tuning on {prompt, completion} | {english, latex} | {messages} | {text} records
(data/sft.py), optionally completion-only (the loss on the response alone, as SAWYER's SFT); with
LoRA the adapter is saved in peft's files under <out>/adapter and merged into the saved model.
An encoder-decoder checkpoint (a model_type of models.auto's "seq2seq" kind: T5) trains instead on
{input, target} | {prompt, completion} | {english, latex} records (data/seq2seq.py): the encoder
reads the input, the decoder is taught the target (seq2seq_loss); the rest of the recipe is the same.

classify: multi-label sequence classification (the book's movie genres, ch. 10) with BCE over every
(example, label), partial freezing, and micro F1 / Jaccard / subset accuracy / ROC-AUC at the end.

Source: the book, ch. 10 (LaTeX SFT, SAWYER's QLoRA SFT, multi-label classification); litgpt's
finetune recipes for the shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from minillm.data.classification import ClassificationCollator, encode_classification, label_set
from minillm.data.readers import read_records
from minillm.data.seq2seq import Seq2SeqCollator, encode_seq2seq
from minillm.data.sft import (CHAT_FORMATS, CausalLMCollator, add_chat_tokens, chat_format_for, encode_sft,
                              prompt_and_completion)
from minillm.lora import AdapterConfig, merge_and_unload, prepare_adapters, save_adapter
from minillm.models.auto import KINDS, load_model, model_class, model_type
from minillm.prompt_tuning import PromptTuningConfig, apply_prompt_tuning, prompt_tuning_loss, save_prompt_tuning
from minillm.tokenizer import Tokenizer
from minillm.train.checkpoint import directory_lock
from minillm.train.freezing import freeze_below_layer
from minillm.train.loop import (PRECISIONS, TrainConfig, causal_lm_loss, evaluate, setup_distributed,
                                seq2seq_loss, teardown_distributed, to_device, train)
from minillm.train.metrics import multilabel_metrics


def load_tokenizer(name_or_dir: str) -> Tokenizer:
    """The checkpoint's tokenizer; without a pad token, the EOS token pads (as usual for GPT-2)."""
    tok = Tokenizer.from_pretrained(name_or_dir)
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"{name_or_dir}: the tokenizer has neither a pad nor an eos token; add one")
        tok.pad_token = tok.eos_token
    return tok


def file_digest(path: Optional[str]) -> Optional[str]:
    """sha256 of a file's bytes (the data a run trained on), for the resume fingerprint."""
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_max_length(max_length: Optional[int]) -> None:
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1):
        raise ValueError(f"--max-length must be a positive integer, got {max_length!r}")


def _write_summary(out: Path, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _out_lock(out: str):
    """<out>/.lock for the whole job on rank 0 (training, checkpoints and the final save): a second job writing
    the same --out is refused at once, a read-only --out fails before any work (train() re-enters it)."""
    return directory_lock(out) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()


def sft_job(model: str, data: str, out: str, train_config: TrainConfig, adapters: AdapterConfig = AdapterConfig(),
            eval_data: Optional[str] = None, completion_only: bool = False, max_length: Optional[int] = None,
            gradient_checkpointing: bool = False, prompt_tuning: PromptTuningConfig = PromptTuningConfig(),
            chat_format: Optional[str] = None) -> dict:
    """Supervised fine-tuning of a causal LM or (T5) an encoder-decoder; returns the summary written to
    <out>/train_summary.json. With prompt_tuning.num_virtual_tokens > 0 the base stays frozen and only the soft
    prompt trains (prompt_tuning.py); <out> then holds peft's PROMPT_TUNING files, not a model. chat_format
    ("sawyer" | "llama3"; None: "llama3" when the tokenizer has Llama-3's chat tokens, else "sawyer") decides how
    {messages} records are written; "sawyer" adds the book's three tokens (embedding resized, rows trained)."""
    check_max_length(max_length)
    if prompt_tuning.num_virtual_tokens and (adapters.lora_r or adapters.quantize or gradient_checkpointing):
        raise ValueError("prompt tuning trains the soft prompt alone: drop --lora-r / --quantize / "
                         "--gradient-checkpointing")
    with _out_lock(out):
        return _sft_job(model, data, out, train_config, adapters, eval_data, completion_only, max_length,
                        gradient_checkpointing, prompt_tuning, chat_format)


def _sft_job(model, data, out, train_config, adapters, eval_data, completion_only, max_length,
             gradient_checkpointing, prompt_tuning, chat_format) -> dict:
    n_virtual = prompt_tuning.num_virtual_tokens
    rank, _ = setup_distributed()
    # Everything that can fail on bad data happens here, before any training.
    if chat_format not in (None,) + CHAT_FORMATS:
        raise ValueError(f"chat_format must be one of {CHAT_FORMATS}, got {chat_format!r}")
    records = read_records(data)
    fingerprint = {"model": str(model), "data": file_digest(data), "max_length": max_length,
                   "completion_only": bool(completion_only), "adapters": dataclasses.asdict(adapters)}
    eval_records = read_records(eval_data) if eval_data else []
    torch.manual_seed(train_config.seed)  # new LoRA matrices and resized embedding rows are seeded too
    is_seq2seq = model_type(model)[1] in KINDS["seq2seq"]
    if is_seq2seq:  # encoder-decoder: {input, target}; the loss is on the target alone by construction
        lm = load_model(model, "seq2seq")
        tok = load_tokenizer(model)
        train_set = encode_seq2seq(records, tok, max_length, max_length)
        eval_set = encode_seq2seq(eval_records, tok, max_length, max_length) if eval_records else None
        collate, loss_fn, new_rows = Seq2SeqCollator(tok.pad_token_id, lm.config.start_token_id), seq2seq_loss, []
        if gradient_checkpointing or n_virtual:
            raise ValueError("gradient checkpointing and prompt tuning are not implemented for encoder-decoders")
    else:
        lm = load_model(model, "causal-lm")
        tok = load_tokenizer(model)
        chat_format = chat_format or chat_format_for(tok)
        chat = any("messages" in r for r in records + eval_records) and chat_format == "sawyer"
        if chat and n_virtual:
            raise ValueError("chat records add tokens whose embeddings must train; prompt tuning freezes them "
                             "(use LoRA or full fine-tuning)")
        if chat:
            add_chat_tokens(tok, lm)
        n_pos = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", None)
        max_length = max_length or n_pos or tok.model_max_length
        if n_virtual and n_pos:
            max_length = min(max_length, n_pos - n_virtual)  # the virtual tokens take positions too
        train_set = encode_sft(records, tok, max_length, completion_only, chat_format)
        eval_set = encode_sft(eval_records, tok, max_length, completion_only, chat_format) if eval_records else None
        new_rows = []  # with chat tokens, the embedding (and an untied head) must learn their rows: modules_to_save
        if chat:
            new_rows = [lm.get_input_embeddings().weight]
            if lm.lm_head.weight is not new_rows[0]:
                new_rows.append(lm.lm_head.weight)
        collate, loss_fn = CausalLMCollator(tok.pad_token_id), causal_lm_loss
    if n_virtual:  # the frozen base wrapped; only the (n, d) prompt is a parameter that trains
        init_text = prompt_tuning.init_text or prompt_and_completion(records[0])[0] or "Answer the following."
        lm = apply_prompt_tuning(lm, n_virtual, prompt_tuning.init, init_text, tok, tokenizer_name_or_path=model,
                                 generator=torch.Generator().manual_seed(train_config.seed))
        lm.prompt_config["base_model_name_or_path"] = lm.prompt_config["base_model_name_or_path"] or model
        loss_fn = prompt_tuning_loss
    prepare_adapters(lm, adapters, compute_dtype=PRECISIONS[train_config.precision], also_train=new_rows)
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    eval_fn = (lambda m: evaluate(m, eval_set, collate, loss_fn, train_config.batch_size)) if eval_set else None
    result = train(lm, train_set, collate, loss_fn, train_config, eval_fn=eval_fn,
                   lengths=[len(e["input_ids"]) for e in train_set], fingerprint=fingerprint)
    summary = {"steps": result.step, "first_loss": result.losses[0] if result.losses else None,
               "final_loss": result.losses[-1] if result.losses else None, "evals": result.evals, "out": out}
    if n_virtual:
        summary.update(num_virtual_tokens=n_virtual, trainable=lm.prompt_embeddings.numel())
    if rank == 0:
        if adapters.lora_r:
            save_adapter(lm, Path(out) / "adapter")
            merge_and_unload(lm)
        if n_virtual:
            save_prompt_tuning(lm, out)
        else:
            lm.cpu().save_pretrained(out)
        tok.save_pretrained(out)
        _write_summary(Path(out), summary)
    teardown_distributed()
    return summary


def bce_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """loss_fn for multi-label classification: BCE summed over every (example, label); the loop divides by
    their count."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.binary_cross_entropy_with_logits(logits.float(), batch["labels"], reduction="sum"), batch["labels"].numel()


@torch.no_grad()
def classification_eval(model, dataset: list, collate, batch_size: int, threshold: float) -> dict:
    """Mean BCE and the multi-label metrics over a dataset."""
    device = next(model.parameters()).device
    logits, targets = [], []
    for i in range(0, len(dataset), batch_size):
        b = to_device(collate(dataset[i:i + batch_size]), device)
        logits.append(model(b["input_ids"], attention_mask=b["attention_mask"]).float().cpu())
        targets.append(b["labels"].cpu())
    logits, targets = torch.cat(logits), torch.cat(targets)
    return {"loss": float(F.binary_cross_entropy_with_logits(logits, targets)),
            **multilabel_metrics(logits, targets, threshold)}


def classify_job(model: str, data: str, out: str, train_config: TrainConfig, eval_data: Optional[str] = None,
                 labels: Optional[list[str]] = None, text_key: str = "text", labels_key: str = "labels",
                 freeze_up_to: Optional[int] = None, threshold: float = 0.5, max_length: Optional[int] = None) -> dict:
    """Multi-label classification fine-tuning of an encoder classifier; returns the summary it writes."""
    check_max_length(max_length)
    if labels is not None:
        bad = [n for n in labels if not isinstance(n, str) or not n.strip()]
        if bad or len(set(labels)) != len(labels) or not labels:
            raise ValueError(f"--labels must be distinct non-empty names separated by commas, got {labels!r}")
    with _out_lock(out):
        return _classify_job(model, data, out, train_config, eval_data, labels, text_key, labels_key, freeze_up_to,
                             threshold, max_length)


def _classify_job(model, data, out, train_config, eval_data, labels, text_key, labels_key, freeze_up_to,
                  threshold, max_length) -> dict:
    rank, _ = setup_distributed()
    records = read_records(data)
    eval_records = read_records(eval_data) if eval_data else []
    names = labels or label_set(records, labels_key)
    fingerprint = {"model": str(model), "data": file_digest(data), "max_length": max_length, "labels": list(names),
                   "text_key": text_key, "labels_key": labels_key, "freeze_up_to": freeze_up_to}
    d, cls = model_class(model, "classifier")
    tok = Tokenizer.from_pretrained(str(d))
    max_length = max_length or tok.model_max_length or 512
    train_set = encode_classification(records, tok, names, max_length, text_key, labels_key)
    eval_set = encode_classification(eval_records, tok, names, max_length, text_key, labels_key) if eval_records else None
    torch.manual_seed(train_config.seed)  # the new classifier head is seeded
    clf = cls.from_pretrained(str(d), num_labels=len(names), problem_type="multi_label_classification",
                              id2label={str(i): n for i, n in enumerate(names)},
                              label2id={n: i for i, n in enumerate(names)})
    if freeze_up_to is not None:
        frozen = freeze_below_layer(clf, freeze_up_to)
        if rank == 0:
            print(f"froze {frozen} parameter tensors (embeddings + layers < {freeze_up_to})")
    collate = ClassificationCollator(tok.pad_token_id if tok.pad_token_id is not None else 0)
    eval_fn = (lambda m: classification_eval(m, eval_set, collate, train_config.batch_size, threshold)) \
        if eval_set else None
    result = train(clf, train_set, collate, bce_loss_sum, train_config, eval_fn=eval_fn,
                   lengths=[len(e["input_ids"]) for e in train_set], fingerprint=fingerprint)
    summary = {"labels": names, "steps": result.step, "final_loss": result.losses[-1],
               "eval": result.evals[-1] if result.evals else {}, "out": out}
    if rank == 0:
        clf.cpu().save_pretrained(out)
        tok.save_pretrained(out)
        _write_summary(Path(out), summary)
    teardown_distributed()
    return summary
