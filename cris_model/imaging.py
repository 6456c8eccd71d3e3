"""Letterbox geometry shared by training, evaluation and prediction.

An image is scaled to fit `size`x`size` keeping its aspect ratio and centred on a canvas
filled with the CLIP mean colour; `undo_letterbox` maps a map at input resolution back to
the original image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Letterbox:
    """Where an original HxW image sits inside the square input canvas."""

    orig_h: int
    orig_w: int
    size: int
    new_h: int
    new_w: int
    top: int
    left: int

    @classmethod
    def fit(cls, orig_h: int, orig_w: int, size: int) -> Letterbox:
        """Geometry for scaling (orig_h, orig_w) into a size x size canvas, centred."""
        if orig_h <= 0 or orig_w <= 0:
            raise ValueError(f"image size must be positive, got {orig_h}x{orig_w}")
        scale = min(size / orig_h, size / orig_w)
        new_h = max(1, min(size, round(orig_h * scale)))
        new_w = max(1, min(size, round(orig_w * scale)))
        return cls(orig_h, orig_w, size, new_h, new_w, (size - new_h) // 2, (size - new_w) // 2)


def letterbox_image(image: Image.Image, size: int) -> tuple[np.ndarray, Letterbox]:
    """RGB PIL image -> (size x size x 3 uint8 canvas padded with the CLIP mean, geometry)."""
    rgb = image.convert("RGB")
    box = Letterbox.fit(rgb.height, rgb.width, size)
    resized = rgb.resize((box.new_w, box.new_h), Image.Resampling.BICUBIC)
    fill = tuple(int(round(m * 255)) for m in CLIP_MEAN)
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(resized, (box.left, box.top))
    return np.asarray(canvas, dtype=np.uint8), box


def letterbox_mask(mask: np.ndarray, box: Letterbox) -> np.ndarray:
    """Boolean/uint8 HxW mask -> size x size float32 mask in [0, 1] (bilinear, zero padding)."""
    src = Image.fromarray((mask > 0).astype(np.uint8) * 255)
    resized = np.asarray(src.resize((box.new_w, box.new_h), Image.Resampling.BILINEAR))
    out = np.zeros((box.size, box.size), dtype=np.float32)
    out[box.top : box.top + box.new_h, box.left : box.left + box.new_w] = resized / 255.0
    return out


def normalize(canvas: torch.Tensor) -> torch.Tensor:
    """Bx3xHxW (or 3xHxW) uint8 or [0,255] float -> CLIP-normalised float32."""
    x = canvas.float() / 255.0
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(-1, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def undo_letterbox(prob: torch.Tensor, box: Letterbox) -> torch.Tensor:
    """hxw map over the input canvas (any h=w resolution) -> orig_h x orig_w map.

    Upsamples bilinearly to the canvas size, crops the image region, and resizes it to the
    original size.
    """
    x = prob.reshape(1, 1, *prob.shape[-2:]).float()
    if x.shape[-1] != box.size or x.shape[-2] != box.size:
        x = F.interpolate(x, size=(box.size, box.size), mode="bilinear", align_corners=False)
    x = x[..., box.top : box.top + box.new_h, box.left : box.left + box.new_w]
    x = F.interpolate(x, size=(box.orig_h, box.orig_w), mode="bilinear", align_corners=False)
    return x[0, 0]
