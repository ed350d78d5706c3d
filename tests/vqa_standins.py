"""Small stand-in encoders with the interface MultiModalModel needs (any module returning (B, T, H) with
.config.hidden_size): they let the VQA tests check the fusion model apart from the real ViT / DistilBERT."""

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class StandInConfig:
    hidden_size: int = 32
    num_hidden_layers: int = 1
    num_attention_heads: int = 4
    vocab_size: int = 64
    max_position_embeddings: int = 16
    image_size: int = 16
    patch_size: int = 4
    num_channels: int = 3


def _layers(cfg):
    layer = nn.TransformerEncoderLayer(cfg.hidden_size, cfg.num_attention_heads, 2 * cfg.hidden_size, dropout=0.0,
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, cfg.num_hidden_layers, enable_nested_tensor=False)


class StandInTextEncoder(nn.Module):
    def __init__(self, cfg: StandInConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.encoder = _layers(cfg)

    def forward(self, input_ids, attention_mask=None):
        T = input_ids.shape[1]
        x = self.embeddings(input_ids) + self.position(torch.arange(T, device=input_ids.device))[None]
        pad = None if attention_mask is None else attention_mask == 0
        return self.encoder(x, src_key_padding_mask=pad)  # (B, T, H)


class StandInImageEncoder(nn.Module):
    def __init__(self, cfg: StandInConfig):
        super().__init__()
        self.config = cfg
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.patch = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position = nn.Parameter(torch.randn(1, 1 + n, cfg.hidden_size) * 0.02)
        self.encoder = _layers(cfg)

    def forward(self, pixel_values):
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)  # (B, P, H)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        return self.encoder(x)  # (B, 1+P, H)
