"""SFT data: prompt/completion records, the chat format, completion-only label masking, the padding collator.

Causal-LM fine-tuning learns p(next token | previous tokens); the labels are the input ids
themselves (the loop's loss shifts them by one) with −100 wherever no loss is wanted: padding,
and — for completion-only SFT — every prompt token, so the model is taught to write the
response, not to reproduce the question:

    labels_t = input_ids_t   if t is inside the final response (or no masking)
             = −100          for padding and (completion-only) the prompt and earlier turns

Every record reduces to a (prompt, completion) pair of strings, tokenized separately (so the
split is exact) and concatenated: `{"prompt", "completion"}`; `{"english", "latex"}` (the
book's English → LaTeX example, in its prompt format LATEX_TEMPLATE); `{"messages": [...]}`
turns in the book's chat format

    ###HUMAN### {human text}\\n###BOT### {bot text}###STOP###\\n ... ###HUMAN### {q}\\n###BOT### {answer}###STOP###

where the completion is the final bot answer (and its ###STOP###); or `{"text"}` (no prompt).
The three markers are added to the tokenizer as special tokens (never split) and the model's
embedding matrix is resized, the new rows starting at the mean embedding. A tokenizer that already
knows Llama-3's chat tokens gets Llama-3's own template instead (chat_format_for; or ask for one):

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>

(contents stripped, as Meta's template does; a "system" turn is allowed first).

Batches are padded dynamically — to the longest row of the batch, not a global maximum (the
book's "dynamic padding", ch. 10). Bad data fails before training, naming file and line.

Source: the book, ch. 10 (LaTeX example, SAWYER's chat tokens and completion-only loss,
dynamic padding); trl's DataCollatorForCompletionOnlyLM for the masking idea.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from minillm.data.readers import DataError, shown
from minillm.losses import IGNORE_INDEX as IGNORE

HUMAN, BOT, STOP = "###HUMAN###", "###BOT###", "###STOP###"
CHAT_TOKENS = (HUMAN, BOT, STOP)
# Llama-3's chat template tokens (Meta's tokenizer has them; a base model has them untrained)
L3_BOS, L3_START, L3_END, L3_EOT = "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
LLAMA3_TOKENS = (L3_START, L3_END, L3_EOT)
CHAT_FORMATS = ("sawyer", "llama3")
LATEX_TEMPLATE = "Convert English to LaTeX\nEnglish: {english}\nLaTeX: {latex}"


# ---- chat format and special tokens ----
def add_chat_tokens(tokenizer, model=None) -> int:
    """Add ###HUMAN###, ###BOT###, ###STOP### as special tokens; resize the model's embeddings
    (new rows = mean embedding). Also sets a pad token (eos) when there is none. Returns #new."""
    n = tokenizer.add_special_tokens(list(CHAT_TOKENS))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and len(tokenizer) != model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    return n


def check_messages(messages, where: str) -> None:
    """'messages' must be a non-empty list of turns."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' must be a list of {{role, content}} turns, found {type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: 'messages' is empty")


def format_chat(messages: Sequence[dict], where: str = "record") -> tuple[str, str]:
    """Turns -> (prompt, completion); the completion is the final bot turn."""
    roles = {"human": HUMAN, "user": HUMAN, "bot": BOT, "assistant": BOT}
    check_messages(messages, where)
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in roles or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role in {sorted(roles)} and a string content, "
                            f"found {shown(m)}")
    if roles[messages[-1]["role"]] != BOT:
        raise DataError(f"{where}: the last message must be the bot's response (role 'bot'/'assistant')")
    prompt = ""
    for m in messages[:-1]:
        tag = roles[m["role"]]
        prompt += f"{tag} {m['content']}" + (f"{STOP}\n" if tag == BOT else "\n")
    return prompt + BOT, f" {messages[-1]['content']}{STOP}"


def format_llama3_chat(messages: Sequence[dict], where: str = "record", bos: bool = True) -> tuple[str, str]:
    """Turns -> (prompt, completion) in Llama-3's template: the prompt ends with the assistant header, the
    completion is the final assistant turn and its <|eot_id|> (Llama-3-Instruct's end of turn)."""
    roles = {"system": "system", "human": "user", "user": "user", "bot": "assistant", "assistant": "assistant"}
    check_messages(messages, where)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in roles or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role in {sorted(roles)} and a string content, "
                            f"found {shown(m)}")
        if roles[m["role"]] == "system" and i:
            raise DataError(f"{where}: a system message may only come first (message {i})")
    if roles[messages[-1]["role"]] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's response (role 'bot'/'assistant')")

    def header(role: str) -> str:
        return f"{L3_START}{role}{L3_END}\n\n"
    prompt = L3_BOS if bos else ""
    for m in messages[:-1]:
        prompt += header(roles[m["role"]]) + m["content"].strip() + L3_EOT
    return prompt + header("assistant"), messages[-1]["content"].strip() + L3_EOT


def chat_format_for(tokenizer) -> str:
    """"llama3" when the tokenizer knows Llama-3's chat tokens, else "sawyer" (the book's ###HUMAN### format)."""
    known = all(tokenizer.token_to_id(t) is not None for t in LLAMA3_TOKENS)
    return "llama3" if known else "sawyer"


def prompt_and_completion(record: dict, eos: Optional[str] = None, chat_format: str = "sawyer") -> tuple[str, str]:
    """Any supported record -> (prompt, completion) strings (see the module docstring); `messages` in the
    book's format (chat_format "sawyer") or Llama-3's ("llama3")."""
    where = record.get("_where", "record")
    if "messages" in record:
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format must be one of {CHAT_FORMATS}, got {chat_format!r}")
        if chat_format == "llama3":
            return format_llama3_chat(record["messages"], where)
        return format_chat(record["messages"], where)
    end = eos or ""
    for fields in (("prompt", "completion"), ("english", "latex"), ("text",)):
        if all(k in record for k in fields):
            bad = [k for k in fields if not isinstance(record[k], str)]
            if bad:  # null, a list or a number would otherwise train as the text "None" / "['a']" / "34"
                raise DataError(f"{where}: '{bad[0]}' must be a string, found {type(record[bad[0]]).__name__} "
                                f"({record[bad[0]]!r:.40})")
            break
    if "prompt" in record and "completion" in record:
        return record["prompt"], record["completion"] + end
    if "english" in record and "latex" in record:
        prompt, _ = LATEX_TEMPLATE.split(" {latex}")
        return prompt.format(english=record["english"]), f" {record['latex']}" + end
    if "text" in record:
        return "", record["text"] + end
    keys = sorted(k for k in record if k != "_where")
    raise DataError(f"{where}: unknown record layout {keys}; expected prompt+completion, english+latex, "
                    f"messages, or text")


def encode_sft(records: Sequence[dict], tokenizer, max_length: Optional[int] = None,
               completion_only: bool = True, chat_format: Optional[str] = None) -> list[dict]:
    """Records -> [{"input_ids": [...], "labels": [...]}]; prompt labels -100 when completion_only.
    chat_format: how `messages` records are written; None = chat_format_for(tokenizer).

    Raises DataError (before any training) for an empty dataset or a sample whose labelled part
    is truncated away entirely by max_length."""
    if not records:
        raise DataError("empty dataset (no records)")
    eos = tokenizer.eos_token
    chat_format = chat_format or chat_format_for(tokenizer)
    out = []
    for i, r in enumerate(records):
        where = r.get("_where", f"record {i}")
        prompt, completion = prompt_and_completion(r, eos, chat_format)
        p_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        c_ids = tokenizer.encode(completion, add_special_tokens=False)
        if not c_ids:
            raise DataError(f"{where}: the response is empty")
        ids = p_ids + c_ids
        labels = ([IGNORE] * len(p_ids) if completion_only else list(p_ids)) + list(c_ids)
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        if not any(l != IGNORE for l in labels[1:]):  # position 0 is never predicted
            if max_length is not None and len(p_ids) + len(c_ids) > max_length:
                raise DataError(f"{where}: the response is truncated away entirely (prompt {len(p_ids)} tokens + "
                                f"response {len(c_ids)} tokens, max_length {max_length}); raise max_length or "
                                f"shorten the prompt")
            raise DataError(f"{where}: nothing to learn from (needs at least 2 tokens, found {len(ids)})")
        out.append({"input_ids": ids, "labels": labels})
    return out


class CausalLMCollator:
    """Pad a list of {"input_ids", "labels"} to the batch's longest row (right padding):
    input_ids with pad_id, attention_mask 0, labels -100. Without "labels", labels = input_ids."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        T = max(len(r["input_ids"]) for r in rows)
        B = len(rows)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(r.get("labels", r["input_ids"]), dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
