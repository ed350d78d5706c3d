"""ViT: an image as a sequence of 16×16 patches, read by a pre-LN transformer encoder.

    z_0 = [x_cls; P(x)_1; ...; P(x)_N] + E_pos       (P: a stride-p conv = one linear map per p×p patch)
    z'_l = z_{l-1} + Attn(LN_before(z_{l-1}))        (pre-LN: the norm comes before each sublayer)
    z_l  = z'_l + W_2 · gelu(W_1 LN_after(z'_l))
    y = LN(z_L);  pooler = tanh(W_p y[:, 0])          (only when the checkpoint has a pooler)

The position table E_pos has one row per patch of the training resolution. For another
image size the patch rows are laid out on their √N × √N grid and resized bicubically to the
new grid (as DINO and transformers' `interpolate_pos_encoding=True` do); the [CLS] row is kept.
Both hub layouts load: google/vit-base-patch16-224(-in21k) (`vit.` prefix + classifier, or a
pooler) and facebook/dino-vitb16 (no pooler). Names are the hub's (`encoder.layer.0.attention.
attention.query.weight`: the doubled `attention.attention` is the hub's).

Source: Dosovitskiy et al., "An Image is Worth 16x16 Words" (2021); Caron et al., "Emerging
Properties in Self-Supervised Vision Transformers" (DINO, 2021); transformers' modeling_vit.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm import hub
from minillm.configs import as_config_dict, validate_config
from minillm.linear import Linear
from minillm.models.layers import (ACTIVATIONS, Encoder, EncoderOutput, Intermediate, Pooler, SelfAttention,
                                   init_weights, load_base_model)

IGNORED = [r"^embeddings\.mask_token$"]  # masked-image-modeling checkpoints carry it; plain encoding never uses it


@dataclass
class ViTConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: Union[int, list] = 224
    patch_size: Union[int, list] = 16
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: Optional[int] = None
    pooler_act: str = "tanh"
    model_type: str = "vit"
    use_sdpa: bool = True  # minillm's flag: torch's fused attention kernel (True) or the written-out math

    def __post_init__(self):
        validate_config(self, heads=("hidden_size", "num_attention_heads"))  # types, ranges, head split: before any allocation
        for k, v in (("hidden_act", self.hidden_act), ("pooler_act", self.pooler_act)):
            if v not in ACTIVATIONS and v != "tanh":
                raise hub.CheckpointError(f"config: {k} '{v}' not supported (one of {sorted(ACTIVATIONS) + ['tanh']})")

    @property
    def image_hw(self) -> tuple[int, int]:
        s = self.image_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def patch_hw(self) -> tuple[int, int]:
        p = self.patch_size
        return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))

    def to_hub_dict(self, architecture: str = "ViTModel") -> dict:
        d = as_config_dict(self)
        d.pop("use_sdpa")
        d["architectures"] = [architecture]
        return d


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_hw, stride=cfg.patch_hw)

    def forward(self, pixel_values):
        return self.projection(pixel_values).flatten(2).transpose(1, 2)  # (B, H, h, w) -> (B, h*w, H)


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        (ih, iw), (ph, pw) = cfg.image_hw, cfg.patch_hw
        n_patches = (ih // ph) * (iw // pw)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, n_patches + 1, cfg.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position table (1, 1 + h*w, H) for an image of height×width: patch rows resized bicubically."""
        pos = self.position_embeddings
        n_old = pos.shape[1] - 1
        ph, pw = self.cfg.patch_hw
        h, w = height // ph, width // pw
        if h * w == n_old and height == width:
            return pos
        side = int(round(n_old ** 0.5))
        if side * side != n_old:
            raise ValueError(f"cannot interpolate {n_old} position embeddings: not a square grid")
        dim = pos.shape[-1]
        grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, H, side, side)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)  # (1, H, h, w)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)  # (1, h*w, H)
        return torch.cat([pos[:, :1], grid], dim=1)

    def forward(self, pixel_values, interpolate_pos_encoding: bool = False):
        B, C, Hi, Wi = pixel_values.shape
        x = self.patch_embeddings(pixel_values)  # (B, N, H)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1+N, H)
        pos = self.interpolate_pos_encoding(Hi, Wi) if interpolate_pos_encoding else self.position_embeddings
        return self.dropout(x + pos)


class ViTDense(nn.Module):
    """A linear + dropout under the hub's names `attention.output.dense` / `output.dense`."""

    def __init__(self, d_in: int, d_out: int, p: float):
        super().__init__()
        self.dense = Linear(d_in, d_out)
        self.dropout = nn.Dropout(p)

    def forward(self, x):
        return self.dropout(self.dense(x))


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.attention = SelfAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.attention_probs_dropout_prob,
                                       cfg.use_sdpa, bias=cfg.qkv_bias)
        self.output = ViTDense(cfg.hidden_size, cfg.hidden_size, cfg.hidden_dropout_prob)

    def forward(self, x, return_weights: bool = False):
        y, w = self.attention(x, None, return_weights)
        return self.output(y), w


class ViTLayer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = ViTAttention(cfg)
        self.layernorm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate = Intermediate(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.output = ViTDense(cfg.intermediate_size, cfg.hidden_size, cfg.hidden_dropout_prob)

    def forward(self, x, mask=None, return_weights: bool = False):  # mask: unused (every patch is real)
        a, w = self.attention(self.layernorm_before(x), return_weights)
        x = x + a
        return x + self.output(self.intermediate(self.layernorm_after(x))), w


class ViTModel(nn.Module):
    """ViT encoder. forward(pixel_values (B, C, H, W)) -> last hidden state (B, 1 + patches, hidden).

    interpolate_pos_encoding=True accepts other image sizes (resized position table); with
    return_pooled / output_attentions it returns an EncoderOutput."""

    lora_targets = ("query", "key", "value", "output.dense", "intermediate.dense")  # every linear of the attention and MLP blocks

    def __init__(self, cfg: ViTConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = cfg
        self.embeddings = ViTEmbeddings(cfg)
        self.encoder = Encoder(ViTLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.pooler = Pooler(cfg.hidden_size, cfg.pooler_output_size or cfg.hidden_size, cfg.pooler_act) \
            if add_pooling_layer else None
        init_weights(self, cfg.initializer_range)
        nn.init.trunc_normal_(self.embeddings.position_embeddings, std=cfg.initializer_range)
        nn.init.trunc_normal_(self.embeddings.cls_token, std=cfg.initializer_range)

    def check_pixels(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> None:
        cfg = self.config
        if not torch.is_tensor(pixel_values) or not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a float tensor (B, C, H, W); got "
                            f"{pixel_values.dtype if torch.is_tensor(pixel_values) else type(pixel_values).__name__} "
                            f"(preprocess uint8 images with ImageProcessor first)")
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}")
        B, C, H, W = pixel_values.shape
        if C != cfg.num_channels:
            raise ValueError(f"pixel_values has {C} channels, the model expects {cfg.num_channels} "
                             f"(shape {tuple(pixel_values.shape)}; channels-first expected)")
        ph, pw = cfg.patch_hw
        if interpolate_pos_encoding:
            if H < ph or W < pw:
                raise ValueError(f"image {H}x{W} is smaller than one {ph}x{pw} patch")
        elif (H, W) != cfg.image_hw:
            raise ValueError(f"image size {H}x{W} does not match the model's {cfg.image_hw[0]}x{cfg.image_hw[1]}; "
                             f"resize it (ImageProcessor) or pass interpolate_pos_encoding=True")

    def forward(self, pixel_values, interpolate_pos_encoding: bool = False, return_pooled: bool = False,
                output_attentions: bool = False):
        self.check_pixels(pixel_values, interpolate_pos_encoding)
        x = self.embeddings(pixel_values.to(self.layernorm.weight.dtype), interpolate_pos_encoding)  # (B, 1+N, H)
        x, attentions = self.encoder(x, None, output_attentions)
        x = self.layernorm(x)
        if not (return_pooled or output_attentions):
            return x
        if return_pooled and self.pooler is None:
            raise ValueError("return_pooled=True, but this checkpoint has no pooler (pooler.dense.*)")
        return EncoderOutput(x, self.pooler(x) if return_pooled else None, attentions)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: Optional[torch.dtype] = None, device=None,
                        **overrides) -> "ViTModel":
        """Load a ViT checkpoint: ViTModel layout (pooler when present: in21k has one, DINO not) or
        ViTForImageClassification (`vit.` prefix; the classifier is skipped)."""
        return load_base_model(cls, ViTConfig, name_or_path, "vit", "vit.", IGNORED, dtype, device, **overrides)

    def save_pretrained(self, directory: str) -> Path:
        return hub.save_model(self, directory)
