"""A thin wrapper over `tokenizers.Tokenizer` (the hub's tokenizer.json) for batches of text.

Models read token ids, not text. The tokenizers library does the splitting (byte-level BPE for
GPT-2, WordPiece for BERT); this wrapper adds what training and generation need around it:
batch encoding to padded tensors with an attention mask (1 = real token, 0 = pad), the
padding side (left for generation, so that every row ends at its last real token; right for
training), truncation, special tokens read from tokenizer_config.json / special_tokens_map.json,
adding new tokens (e.g. the book's `###HUMAN###`), and decoding.

Source: the hub tokenizer layout; Hugging Face `tokenizers` documentation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

from minillm import hub

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


def _token_str(v) -> Optional[str]:
    if isinstance(v, dict):
        return v.get("content")
    return v


class Tokenizer:
    """tokenizer.json + special tokens + padding side."""

    def __init__(self, tokenizer: _HFTokenizer, padding_side: str = "right", model_max_length: Optional[int] = None,
                 **special_tokens: Optional[str]):
        self.tok = tokenizer
        self.tok.no_padding()
        self.tok.no_truncation()
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self.model_max_length = model_max_length
        self.special: dict[str, Optional[str]] = {k: special_tokens.get(k) for k in SPECIAL_KEYS}

    # ---- construction ----
    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 — the tokenizers library raises a bare Exception on a bad file
            raise hub.CheckpointError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0][:200]})") \
                from None
        return cls(tok, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "Tokenizer":
        """Read tokenizer.json and the special tokens of a checkpoint directory (or weights/<name>, or hub id)."""
        d = hub.resolve(name_or_path)
        conf: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = d / name
            if f.is_file():
                conf.update(hub.read_json(f))  # malformed or not an object: a CheckpointError naming the file
        special = {k: _token_str(conf.get(k)) for k in SPECIAL_KEYS if conf.get(k) is not None}
        bad = {k: v for k, v in special.items() if not isinstance(v, str) or not v}
        if bad:
            raise hub.CheckpointError(f"{d}: special token(s) {bad} in tokenizer_config.json / special_tokens_map.json "
                                      f"must be non-empty strings")
        if conf.get("padding_side", "right") not in ("left", "right"):
            raise hub.CheckpointError(f"{d / 'tokenizer_config.json'}: padding_side must be 'left' or 'right', got "
                                      f"{conf.get('padding_side')!r}")
        opts = {"padding_side": conf.get("padding_side", "right")}
        mml = conf.get("model_max_length")
        if isinstance(mml, int) and mml < 10**9:
            opts["model_max_length"] = mml
        opts.update(special)
        opts.update(kwargs)
        return cls.from_file(d / "tokenizer.json", **opts)

    def save_pretrained(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / "tokenizer.json"))
        conf = {k: v for k, v in self.special.items() if v is not None}
        conf["padding_side"] = self.padding_side
        if self.model_max_length:
            conf["model_max_length"] = self.model_max_length
        hub.save_json(conf, d / "tokenizer_config.json")

    # ---- special tokens ----
    def _id(self, key: str) -> Optional[int]:
        t = self.special.get(key)
        return None if t is None else self.tok.token_to_id(t)

    @property
    def pad_token_id(self) -> Optional[int]:
        return self._id("pad_token")

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._id("eos_token")

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._id("bos_token")

    @property
    def pad_token(self) -> Optional[str]:
        return self.special["pad_token"]

    @pad_token.setter
    def pad_token(self, token: str) -> None:
        if self.tok.token_to_id(token) is None:
            raise ValueError(f"pad token {token!r} is not in the vocabulary; add it with add_special_tokens first")
        self.special["pad_token"] = token

    @property
    def eos_token(self) -> Optional[str]:
        return self.special["eos_token"]

    def add_special_tokens(self, tokens: Iterable[str], **roles: str) -> int:
        """Add tokens that are never split (e.g. '###HUMAN###'); returns how many were new.
        `roles` may name one of them as pad_token, eos_token, ... . Resize the model's embeddings after."""
        tokens = list(tokens) + [t for t in roles.values() if t is not None]
        for k in roles:  # everything checked before the vocabulary changes
            if k not in SPECIAL_KEYS:
                raise ValueError(f"unknown special-token role {k!r}; one of {SPECIAL_KEYS}")
        for t in tokens:
            if not isinstance(t, str) or not t:
                raise ValueError(f"a special token must be a non-empty string, got {t!r}")
        n = self.tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        for k, v in roles.items():
            self.special[k] = v
        return n

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self.tok.id_to_token(i)

    # ---- encode / decode ----
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).tokens

    def __call__(self, texts: str | Sequence[str], padding: bool = True, truncation: bool = False,
                 max_length: Optional[int] = None, add_special_tokens: bool = True,
                 padding_side: Optional[str] = None, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        """Encode a batch -> {"input_ids": (B, T), "attention_mask": (B, T)} padded to the longest row."""
        if isinstance(texts, str):
            texts = [texts]
        if truncation:
            limit = max_length or self.model_max_length
            if limit is None:
                raise ValueError("truncation=True needs max_length (or a model_max_length in tokenizer_config.json)")
            ids = self.encode_truncated(texts, limit, add_special_tokens)
        else:
            ids = [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        return self.pad(ids, padding_side=padding_side) if padding else {"input_ids": ids}

    def encode_truncated(self, texts: Sequence[str], max_length: int, add_special_tokens: bool = True) -> list[list[int]]:
        """Ids cut to max_length *including* the special tokens: the text is shortened, [CLS]/[SEP] stay
        (as transformers truncates)."""
        post = self.tok.post_processor
        n_special = post.num_special_tokens_to_add(False) if (post is not None and add_special_tokens) else 0
        if max_length <= n_special:
            raise ValueError(f"max_length={max_length} leaves no room for text beside {n_special} special tokens")
        rows = []
        for e in self.tok.encode_batch(list(texts), add_special_tokens=False):
            e.truncate(max_length - n_special)
            rows.append(self.tok.post_process(e).ids if n_special else e.ids)
        return rows

    def pad(self, rows: Sequence[Sequence[int]], padding_side: Optional[str] = None,
            pad_id: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Pad lists of ids to the longest -> input_ids, attention_mask (long tensors)."""
        side = padding_side or self.padding_side
        pad = pad_id if pad_id is not None else self.pad_token_id
        if pad is None:
            lengths = {len(r) for r in rows}
            if len(lengths) > 1:
                raise ValueError("rows differ in length and the tokenizer has no pad token; set tokenizer.pad_token "
                                 "(GPT-2 usually reuses its eos token: tokenizer.pad_token = tokenizer.eos_token)")
            pad = 0
        T = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            if not r:
                continue
            sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(list(r), dtype=torch.long)
            mask[i, sl] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]
