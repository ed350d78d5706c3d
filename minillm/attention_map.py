"""Look inside an encoder: the attention weights one head of one layer gives a sentence.

Row i of the map is query token i's distribution over the keys, softmax(q_i Kᵀ/√d) — it sums
to 1. The book (ch. 9) reads "I like cats" this way: the query "like" attends 22% to "I",
42% to itself and 36% to "cats". `attention_map` runs a BERT or DistilBERT checkpoint (e.g. the
real all-MiniLM-L6-v2) with the written-out attention and returns the tokens and the (T, T)
weights; `format_table` prints them; `save_heatmap` draws them (needs matplotlib, the `plots` extra).

Source: the book, ch. 9 ("I like cats"); Vig, "A Multiscale Visualization of Attention in the
Transformer Model" (BertViz, 2019).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from minillm.hub import CheckpointError
from minillm.models.auto import load_model, model_type

TEXT_ENCODERS = ("bert", "distilbert", "roberta")


def load_text_encoder(name_or_path: str):
    """The encoder a checkpoint's model_type names (BERT, DistilBERT, ...), in eval mode, and its directory."""
    d, mt = model_type(name_or_path)
    if mt not in TEXT_ENCODERS:
        raise CheckpointError(f"{d / 'config.json'}: model_type '{mt}' has no attention map here "
                              f"(one of {sorted(TEXT_ENCODERS)})")
    return load_model(str(d), "encoder").eval(), d


@torch.no_grad()
def attention_map(name_or_path: str, text: str, layer: int, head: int,
                  add_special_tokens: bool = True) -> tuple[list[str], torch.Tensor]:
    """Tokens of `text` and the (T, T) attention weights of `head` in `layer` (0-based; negative counts
    from the end). Row i: how query token i spreads its attention over the tokens."""
    from minillm.tokenizer import Tokenizer
    model, d = load_text_encoder(name_or_path)
    tok = Tokenizer.from_pretrained(d)
    cfg = model.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layers  # BERT's name, DistilBERT's name
    n_heads = getattr(cfg, "num_attention_heads", None) or cfg.n_heads
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    if not 0 <= head < n_heads:
        raise ValueError(f"head {head} out of range: the model has {n_heads} heads per layer (0..{n_heads - 1})")
    ids = tok.encode(text, add_special_tokens=add_special_tokens)
    if not ids:
        raise ValueError("the text has no tokens")
    tokens = [tok.id_to_token(i) for i in ids]
    out = model(torch.tensor([ids]), output_attentions=True)
    return tokens, out.attentions[layer][0, head].float()  # (T, T)


def format_table(tokens: Sequence[str], weights: torch.Tensor, percent: bool = True) -> str:
    """A token × token table: rows are queries, columns keys."""
    width = max(6, max(len(t) for t in tokens) + 1)
    lines = ["query \\ key".ljust(width) + "".join(t.rjust(width) for t in tokens)]
    for t, row in zip(tokens, weights.tolist()):
        cells = [f"{100 * w:.0f}%" if percent else f"{w:.3f}" for w in row]
        lines.append(t.ljust(width) + "".join(c.rjust(width) for c in cells))
    return "\n".join(lines)


def save_heatmap(tokens: Sequence[str], weights: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Write a heatmap PNG of the weights (needs matplotlib: pip install 'minillm[plots]')."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--png needs matplotlib: pip install 'minillm[plots]'") from None
    n = len(tokens)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 1.0 + 0.6 * n))
    im = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), tokens, rotation=90)
    ax.set_yticks(range(n), tokens)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{100 * weights[i, j]:.0f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def show_attention(name_or_path: str, text: str, layer: int, head: int, add_special_tokens: bool = True,
                   png: str | None = None) -> None:
    """Print the attention table (and write a heatmap when `png` is given): `minillm attention`."""
    tokens, weights = attention_map(name_or_path, text, layer, head, add_special_tokens=add_special_tokens)
    print(f"{name_or_path}: layer {layer}, head {head} (row = query, column = key; rows sum to 100%)")
    print(format_table(tokens, weights))
    if png:
        path = save_heatmap(tokens, weights, png, title=f"{name_or_path} layer {layer} head {head}")
        print(f"wrote {path}")
