"""Text generation: pick the next token from the logits, append it, repeat.

A language model gives, at each step, logits z over the vocabulary. Decoding turns them into
one token:

    greedy:       argmax_i z_i
    temperature:  p = softmax(z / t)   (t < 1 sharper, t > 1 flatter, t = 1 unchanged; t = 0 means greedy)
    top-k:        keep the k largest logits (all those tied with the k-th are kept too), renormalize
    top-p:        keep the smallest set of most likely tokens whose probabilities reach p, renormalize
    sampling:     draw from p

Batches are left-padded so that every row's last real token sits in the last column;
positions come from the attention mask, so a padded row decodes exactly as it would alone.
A row that emits EOS is finished: it gets `pad_token_id` from then on, and the loop ends
when every row is finished or `max_new_tokens` are made. A KV cache keeps the keys and
values of the past, so each step feeds only the newest token.

Source: the course (greedy, random sampling, top-k, top-p, temperature); Holtzman et al.,
"The Curious Case of Neural Text Degeneration" (2019) for top-p; transformers' generate.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 here (0 means greedy), got {temperature}")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest (per row) to -inf; ties with the k-th stay."""
    if k <= 0:
        raise ValueError(f"top_k must be >= 1, got {k}")
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches p (at least one)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above this one
    drop_sorted = mass_before >= p  # the set already reached p without this token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
             pad_token_id: Optional[int] = None, use_cache: bool = True,
             generator: Optional[torch.Generator] = None, **model_kwargs) -> torch.Tensor:
    """Continue left-padded prompts (B, T) -> (B, T + new) with new <= max_new_tokens.

    `model(input_ids, attention_mask=..., cache=..., **model_kwargs)` must return logits (B, T, V);
    extra keyword arguments (e.g. encoder_hidden_states) are passed at every step.
    Encoder-decoder models (`model.is_encoder_decoder`, e.g. T5) go to generate_encoder_decoder: the
    result is then the decoder's ids (B, 1 + new), not the prompt plus new tokens.
    """
    if getattr(model, "is_encoder_decoder", False):
        return generate_encoder_decoder(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature,
                                        top_k, top_p, eos_token_id, pad_token_id, use_cache, generator, **model_kwargs)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, prompt_len >= 1), got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    elif bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded for generation: some row's last position is padding "
                         "(tokenize with padding_side='left')")
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    n_pos = getattr(getattr(model, "config", None), "n_positions", None)
    if n_pos is not None and T + max_new_tokens > n_pos:
        raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds the model's {n_pos} positions")
    was_training = model.training
    model.eval()
    cache = model.new_cache(T + max_new_tokens) if use_cache else None
    prompt_mask = attention_mask.long()

    # a model that can compute the head on the last position only is asked to (transformers does the same)
    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def step(ids: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        mask = F.pad(prompt_mask, (0, ids.shape[1] - T), value=1)  # generated tokens are real: (B, T + done)
        if cache is not None:
            return model(new, attention_mask=mask, cache=cache, **last, **model_kwargs)[:, -1, :]
        return model(ids, attention_mask=mask, **last, **model_kwargs)[:, -1, :]

    ids = decode_loop(step, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                      pad_token_id, generator)
    model.train(was_training)
    return ids


def decode_loop(step, ids: torch.Tensor, max_new_tokens: int, do_sample: bool, temperature: float,
                top_k: Optional[int], top_p: Optional[float], eos_token_id: Optional[int], pad_token_id: int,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """The loop both kinds of model share: step(ids so far, newest tokens) -> logits of the next token (B, V);
    pick a token per row (next_token), give rows that already emitted EOS the pad token, append; stop after
    max_new_tokens or when every row has finished. -> ids (B, start + new)."""
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new = ids
    for _ in range(max_new_tokens):
        tok = next_token(step(ids, new), do_sample, temperature, top_k, top_p, generator)
        tok = tok.masked_fill(finished, pad_token_id)
        ids = torch.cat([ids, tok[:, None]], dim=1)
        new = tok[:, None]
        if eos_token_id is not None:
            finished = finished | (tok == eos_token_id)
            if bool(finished.all()):
                break
    return ids


# ---- encoder-decoder models (T5): encode once, then decode from decoder_start_token_id ----

@torch.no_grad()
def generate_encoder_decoder(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                             max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                             top_k: Optional[int] = None, top_p: Optional[float] = None,
                             eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                             use_cache: bool = True, generator: Optional[torch.Generator] = None,
                             decoder_start_token_id: Optional[int] = None) -> torch.Tensor:
    """Inputs (B, S), padded on either side -> decoder ids (B, 1 + new), new <= max_new_tokens, starting
    with decoder_start_token_id.

    The encoder runs once; each step feeds the decoder its newest token, with a cache holding the
    decoder's self-attention keys/values and the cross-attention keys/values of the encoder output
    (computed at the first step). The model provides encode(ids, mask) -> states, decode(dec_ids,
    states, mask, cache=...) -> logits and new_cache(max_length). eos_token_id, pad_token_id and
    decoder_start_token_id default to the model's config (T5: 1, 0, 0), as transformers' generate does.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, seq_len >= 1), got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    cfg = model.config
    if eos_token_id is None:
        eos_token_id = getattr(cfg, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(cfg, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    if decoder_start_token_id is None:
        decoder_start_token_id = getattr(cfg, "decoder_start_token_id", None)
        decoder_start_token_id = decoder_start_token_id if decoder_start_token_id is not None else pad_token_id
    B = input_ids.shape[0]
    was_training = model.training
    model.eval()
    encoded = model.encode(input_ids, attention_mask)  # (B, S, d_model), once
    start = torch.full((B, 1), decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    cache = model.new_cache(1 + max_new_tokens) if use_cache else None

    def step(ids: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if cache is not None:
            return model.decode(new, encoded, attention_mask, cache=cache)[:, -1, :]
        return model.decode(ids, encoded, attention_mask)[:, -1, :]

    ids = decode_loop(step, start, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                      pad_token_id, generator)
    model.train(was_training)
    return ids
