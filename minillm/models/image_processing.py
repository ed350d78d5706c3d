"""Turn images into the pixel_values a ViT reads: resize, rescale, normalize, as the checkpoint says.

    x = resize(img, (H, W))                 bilinear (resample=2) or bicubic (3), antialiased when shrinking
    x = x · rescale_factor                  uint8 0..255 -> 0..1 (rescale_factor = 1/255)
    x = (x − mean_c) / std_c                per channel c

The settings come from the checkpoint's `preprocessor_config.json` (do_resize, size,
resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std). Resampling is
Pillow's separable resampling written out (bilinear or
bicubic with a = −0.5, the filter widened by the shrink factor, 22-bit fixed-point weights,
an 8-bit image between the width and the height pass), since transformers' ViTImageProcessor
(without torchvision) resizes uint8 images with Pillow; on uint8 input the two agree exactly
(tests/test_vit.py). Float input is resized with the same weights, unrounded. Input: a uint8 HWC numpy array
or tensor (or a list of them), a CHW float tensor already scaled 0..1, a PIL image, or a file
path (Pillow is imported only then).

Source: transformers' ViTImageProcessor (image_processing_backends.py); Pillow's resampling filters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minillm import hub
from minillm.configs import as_config_dict, config_from_dict

RESAMPLE = {2: "bilinear", 3: "bicubic"}  # Pillow's codes: BILINEAR=2, BICUBIC=3


@dataclass
class ImageProcessor:
    do_resize: bool = True
    size: dict = field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = 2
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    num_channels: int = 3

    def __post_init__(self):
        if isinstance(self.size, int):  # old configs: "size": 224
            self.size = {"height": self.size, "width": self.size}
        if self.resample not in RESAMPLE:
            raise ValueError(f"preprocessor: resample={self.resample} not supported (one of {RESAMPLE})")
        if self.do_resize and not {"height", "width"} <= set(self.size):
            raise ValueError(f"preprocessor: size must give height and width, got {self.size}")

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "ImageProcessor":
        """Read preprocessor_config.json of a checkpoint directory (or weights/<name>, or hub id)."""
        path = hub.resolve(name_or_path) / "preprocessor_config.json"
        if not path.is_file():
            raise hub.CheckpointError(f"{path}: missing preprocessor_config.json")
        return config_from_dict(cls, json.loads(path.read_text()), str(path))

    def save_pretrained(self, directory: str) -> None:
        d = as_config_dict(self)
        d.pop("num_channels")
        d["image_processor_type"] = "ViTImageProcessor"
        hub.save_json(d, Path(directory) / "preprocessor_config.json")

    def to_chw(self, image) -> tuple[torch.Tensor, bool]:
        """One image -> float (C, H, W) on the 0..255 or 0..1 scale, and whether it came as uint8."""
        if isinstance(image, (str, Path)):
            from PIL import Image  # optional: only to open files
            image = Image.open(image).convert("RGB")
        if type(image).__module__.startswith("PIL."):
            image = np.array(image.convert("RGB"))  # a writable copy
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image))
        if not torch.is_tensor(image):
            raise TypeError(f"image must be an array, tensor, PIL image or path, got {type(image).__name__}")
        was_uint8 = image.dtype == torch.uint8
        if image.dim() == 2:
            image = image[..., None].expand(-1, -1, self.num_channels)  # grey -> RGB
        if image.dim() != 3:
            raise ValueError(f"image must be HWC or CHW, got shape {tuple(image.shape)}")
        channels_last = image.shape[-1] in (1, 3, 4) and not (image.shape[0] in (1, 3) and not was_uint8)
        if channels_last:
            image = image.permute(2, 0, 1)  # (C, H, W)
        C = image.shape[0]
        if C == 1 and self.num_channels == 3:
            image = image.expand(3, -1, -1)
        elif C != self.num_channels:
            raise ValueError(f"image has {C} channels (shape {tuple(image.shape)}), expected {self.num_channels} "
                             f"(convert RGBA/CMYK to RGB first)")
        return image.float(), was_uint8

    def resize(self, chw: torch.Tensor, was_uint8: bool) -> torch.Tensor:
        """Resize to size["height"] x size["width"] in two 1-D passes with an 8-bit image in between, as
        Pillow does."""
        H, W = int(self.size["height"]), int(self.size["width"])
        if tuple(chw.shape[-2:]) == (H, W):
            return chw
        x = chw.double()
        h_in, w_in = x.shape[-2:]
        # Pillow (Resample.c): the height pass goes first when the height shrinks more than twice as much
        # as the width does; otherwise the width pass goes first.
        height_first = (h_in - H) > 0 and (h_in - H) > (w_in - W) * 2
        order = ("h", "w") if height_first else ("w", "h")
        for axis in order:
            if axis == "w" and w_in != W:
                Wx = resample_weights(w_in, W, self.resample, fixed_point=was_uint8)  # (W, w_in)
                x = torch.einsum("chw,ow->cho", x, Wx)  # (C, h, W)
            elif axis == "h" and h_in != H:
                Wy = resample_weights(h_in, H, self.resample, fixed_point=was_uint8)  # (H, h_in)
                x = torch.einsum("chw,oh->cow", x, Wy)  # (C, H, w)
            else:
                continue
            if was_uint8:
                x = round_uint8(x)
        return x.float()

    def __call__(self, images, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        """An image or a list of images -> {"pixel_values": (B, C, H, W) float32}."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        out = []
        for img in images:
            x, was_uint8 = self.to_chw(img)
            if self.do_resize:
                x = self.resize(x, was_uint8)
            if self.do_rescale and was_uint8:  # float input is taken as already on the 0..1 scale
                x = x * self.rescale_factor
            if self.do_normalize:
                mean = torch.tensor(self.image_mean, dtype=x.dtype)[:, None, None]
                std = torch.tensor(self.image_std, dtype=x.dtype)[:, None, None]
                x = (x - mean) / std
            out.append(x)
        sizes = {tuple(x.shape) for x in out}
        if len(sizes) > 1:
            raise ValueError(f"images differ in size after preprocessing ({sorted(sizes)}); enable do_resize")
        return {"pixel_values": torch.stack(out)}


# ---- Pillow's separable resampling, written out ----
PRECISION_BITS = 22  # Pillow's fixed-point weights for 8-bit images: 32 - 8 - 2 bits


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    return (1 - x.abs()).clamp(min=0)


def _bicubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


FILTERS = {2: (_bilinear, 1.0), 3: (_bicubic, 2.0)}


def resample_weights(n_in: int, n_out: int, resample: int, fixed_point: bool = False) -> torch.Tensor:
    """(n_out, n_in) matrix: output pixel i = Σ_j w[i, j] · input pixel j (Pillow's precompute_coeffs).

    Output pixel i is centred at c = (i + 0.5)·s in input coordinates, s = n_in / n_out; when shrinking
    (s > 1) the filter is stretched by s (antialiasing) so every input pixel contributes. Weights in a
    row sum to 1; with fixed_point they are rounded to multiples of 2^-22 as Pillow does for uint8."""
    kernel, support = FILTERS[resample]
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = support * fscale
    W = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        c = (i + 0.5) * scale
        lo = max(int(c - support + 0.5), 0)
        hi = min(int(c + support + 0.5), n_in)
        j = torch.arange(lo, hi, dtype=torch.float64)
        w = kernel((j - c + 0.5) / fscale)
        total = w.sum()
        W[i, lo:hi] = w / total if total != 0 else w
    if fixed_point:
        W = torch.where(W < 0, (W * 2**PRECISION_BITS - 0.5).ceil(), (W * 2**PRECISION_BITS + 0.5).floor())
        W = W / 2**PRECISION_BITS
    return W


def round_uint8(x: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8: round half up to an integer grey level in 0..255."""
    return (x + 0.5).floor().clamp(0, 255)
