"""Visual question answering: an image encoder and a text encoder feed a GPT-2 decoder through cross-attention.

The book's MultiModalModel (ch. 9): the question goes through a text encoder (DistilBERT),
the image through an image encoder (ViT); each last hidden state is averaged over its tokens
and projected to the decoder's width; the two vectors are averaged and handed to GPT-2 as
a one-token encoder sequence, which GPT-2 reads through cross-attention blocks (new and
randomly initialized: hub GPT-2 has none) while it writes the answer:

    t = W_t · mean_i TextEnc(q)_i + b_t            i over the question's real tokens
    v = W_v · mean_j ImageEnc(x)_j + b_v           j over [CLS] + patches
    e = (t + v) / 2                                 encoder_hidden_states = e[:, None, :]  (B, 1, C)
    p(a_k | a_<k, q, x) = GPT2(a_<k, cross-attending to e)

With one encoder token every cross-attention weight is 1, whatever the query: cross-attention
reduces to a learned linear map of e added to each decoder position (its query projection gets
no gradient), and all question-image interplay must happen in the decoder's MLPs.
fusion="tokens" instead passes every projected token, [W_t·TextEnc(q)_1..T ; W_v·ImageEnc(x)_1..P],
as the encoder sequence (B, T+P, C), with the question's padding masked out.

Answers are decoded greedily from the bos token; an answer's confidence is the product of
the probabilities of its chosen tokens, EOS included (the probability of the whole answer),
shown as the book shows it: "cat 66%".

Source: the book, ch. 9 "Moving Beyond Foundation Models" (VQA with DistilBERT + ViT + GPT-2);
Vaswani et al. (2017) §3.2 for cross-attention.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from minillm.linear import Linear
from minillm.losses import mean_pool
from minillm.models.gpt2 import GPT2LMHeadModel

FREEZE_MODES = ("nothing", "encoders", "decoder", "all")
FUSIONS = ("mean", "tokens")


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise a clear error when a float input holds NaN or Inf (the book checks inputs before use)."""
    if x.is_floating_point() and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist() if x.dim() > 1 else []
        raise ValueError(f"{name} contains NaN or Inf (batch rows {bad}); check the image files / preprocessing")


class MultiModalModel(nn.Module):
    """text_encoder(input_ids, attention_mask) -> (B, T, Ht); image_encoder(pixel_values) -> (B, P, Hv);
    decoder: a GPT2LMHeadModel built with add_cross_attention=True. Any encoder module returning
    (B, tokens, hidden) with `.config.hidden_size` fits."""

    def __init__(self, text_encoder: nn.Module, image_encoder: nn.Module, decoder: GPT2LMHeadModel,
                 fusion: str = "mean"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if not decoder.config.add_cross_attention:
            raise ValueError("the decoder has no cross-attention blocks; build it with add_cross_attention=True "
                             "(GPT2LMHeadModel.from_pretrained(name, add_cross_attention=True))")
        self.fusion = fusion
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.decoder = decoder
        C = decoder.config.n_embd
        # All three of the book's models are 768 wide; the projections are kept anyway as trainable translators.
        self.text_projection = Linear(text_encoder.config.hidden_size, C)
        self.image_projection = Linear(image_encoder.config.hidden_size, C)

    # ---- inputs ----
    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        check_finite("pixel_values", pixel_values)
        cfg = self.image_encoder.config
        C, S = getattr(cfg, "num_channels", None), getattr(cfg, "image_size", None)
        HW = None if S is None else (S, S) if isinstance(S, int) else tuple(S)  # hub configs allow [H, W]
        if pixel_values.dim() != 4 or (C is not None and pixel_values.shape[1] != C) or \
                (HW is not None and tuple(pixel_values.shape[2:]) != HW):
            want = f"(B, {C or 'C'}, {HW[0] if HW else 'H'}, {HW[1] if HW else 'W'})"
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; the image encoder expects {want}")

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
               pixel_values: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """-> (encoder_hidden_states (B, S, C), encoder_attention_mask (B, S) or None)."""
        self.check_pixel_values(pixel_values)
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"{input_ids.shape[0]} questions but {pixel_values.shape[0]} images in the batch")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text = self.text_encoder(input_ids, attention_mask)  # (B, T, Ht)
        image = self.image_encoder(pixel_values)  # (B, P, Hv)
        check_finite("text encoder output", text)
        check_finite("image encoder output", image)
        if self.fusion == "mean":
            t = self.text_projection(mean_pool(text, attention_mask))  # (B, C)
            v = self.image_projection(image.mean(dim=1))  # (B, C)
            return ((t + v) / 2).unsqueeze(1), None  # (B, 1, C)
        t = self.text_projection(text)  # (B, T, C)
        v = self.image_projection(image)  # (B, P, C)
        mask = torch.cat([attention_mask.long(), torch.ones(v.shape[:2], dtype=torch.long, device=v.device)], dim=1)
        return torch.cat([t, v], dim=1), mask  # (B, T+P, C), (B, T+P)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], pixel_values: torch.Tensor,
                decoder_input_ids: torch.Tensor, decoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """-> decoder logits (B, T_answer, vocab)."""
        enc, enc_mask = self.encode(input_ids, attention_mask, pixel_values)
        return self.decoder(decoder_input_ids, attention_mask=decoder_attention_mask, encoder_hidden_states=enc,
                            encoder_attention_mask=enc_mask)

    # ---- freezing ----
    def freeze(self, mode: str = "nothing") -> None:
        """Set which parameters train. 'nothing': all; 'encoders': both encoders frozen; 'decoder': every
        decoder parameter whose name lacks 'crossattention' frozen (the book's rule: ln_cross_attn, whose name
        lacks it, is frozen too); 'all': both. The projections always train. Each call sets the full state."""
        if mode not in FREEZE_MODES:
            raise ValueError(f"freeze mode must be one of {FREEZE_MODES}, got {mode!r}")
        for p in self.parameters():
            p.requires_grad_(True)
        if mode in ("encoders", "all"):
            for p in list(self.text_encoder.parameters()) + list(self.image_encoder.parameters()):
                p.requires_grad_(False)
        if mode in ("decoder", "all"):
            for name, p in self.decoder.named_parameters():
                if "crossattention" not in name:
                    p.requires_grad_(False)


# ---- answering ----
@torch.no_grad()
def greedy_answer(model: MultiModalModel, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                  pixel_values: torch.Tensor, bos_token_id: int, eos_token_id: int,
                  max_new_tokens: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding from bos, cross-attending to the encoded question and image.

    -> (tokens (B, 1 + n) starting with bos; rows that stopped early are filled with eos,
        probability (B,): the product of the chosen tokens' probabilities up to and including the first eos).
    The tokens come from minillm.generation.generate (KV cache, encoder states passed at every step);
    the probabilities from one teacher-forced decoder pass over them."""
    from minillm.generation import generate

    was_training = model.training
    model.eval()
    enc, enc_mask = model.encode(input_ids, attention_mask, pixel_values)
    B = input_ids.shape[0]
    start = torch.full((B, 1), bos_token_id, dtype=torch.long, device=input_ids.device)
    tokens = generate(model.decoder, start, max_new_tokens=max_new_tokens, do_sample=False,
                      eos_token_id=eos_token_id, pad_token_id=eos_token_id, encoder_hidden_states=enc,
                      encoder_attention_mask=enc_mask)  # (B, 1 + n)
    logp = torch.log_softmax(model.decoder(tokens, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
                             .float(), dim=-1)  # (B, 1 + n, V)
    chosen = logp[:, :-1].gather(2, tokens[:, 1:, None]).squeeze(2)  # (B, n): log p of each new token
    is_eos = (tokens[:, 1:] == eos_token_id).long()
    counted = (is_eos.cumsum(1) - is_eos) == 0  # up to and including the first eos
    model.train(was_training)
    return tokens, (chosen * counted).sum(1).exp()


def answer_texts(tokens: torch.Tensor, decoder_tokenizer, eos_token_id: int) -> list[str]:
    """Decode greedy_answer's tokens: drop the leading bos, stop at the first eos."""
    out = []
    for row in tokens[:, 1:].tolist():
        if eos_token_id in row:
            row = row[:row.index(eos_token_id)]
        out.append(decoder_tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def format_prediction(answer: str, probability: float) -> str:
    """'cat 66%': the answer and its aggregated token probability, as the book prints them."""
    return f"{answer} {100 * probability:.0f}%"
