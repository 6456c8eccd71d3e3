"""Images as the model sees them: one decode, one letterbox, one normalisation for every path.

Training, the feature cache, evaluation, `Predictor` and the MLflow pyfunc all turn a file
into the model's input through this module, so one file gives one input tensor wherever it
runs. Decoding (`decode_image`, `load_image`, `to_rgb`) follows one policy:

- 8-bit RGB is used as stored.
- Transparency (RGBA, LA, PA, or a palette / grey / RGB image with a transparent colour) is
  composited onto white, as a viewer shows it on a page; the hidden colour of a transparent
  pixel (often black) never reaches the model.
- 16-bit and 32-bit integer grey (I;16*, I) is scaled by the 16-bit range, 0..65535 -> 0..255
  (the high byte, as PIL reads 16-bit RGB), not clipped at 255.
- Grey, palette, CMYK and every other mode are converted to RGB by PIL.
- EXIF orientation: an image alone (`cris predict`, serving) is turned upright, as a viewer
  shows it. An image whose size a manifest records is read in the frame that has that size:
  upright when only the upright frame has it; as stored otherwise, which is COCO's case (its
  annotations were drawn on the pixels as stored). `cris data validate` lists the images
  this concerns (`data_checks`).
- More pixels than PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) are refused
  from the header, before decoding.

Letterboxing scales an image to fit `size`x`size` keeping its aspect ratio, centred on a
canvas filled with the CLIP mean colour; `undo_letterbox` maps a map at input resolution
back to the original image size.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 upright, 2-8 flipped and/or rotated
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # orientations whose upright frame is W x H
_TRANSPARENT_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = (255, 255, 255, 255)


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened image, 1 (upright) when absent or out of range."""
    value = image.getexif().get(ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(stored: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(height, width) of an image stored as `stored` once its EXIF orientation is applied."""
    return (stored[1], stored[0]) if orientation in _SWAPS_AXES else stored


def reads_upright(
    stored: tuple[int, int], orientation: int, recorded: tuple[int, int] | None
) -> bool:
    """Whether decoding applies the EXIF orientation (see the module's policy).

    `stored` is the file's (height, width) as stored, `recorded` the manifest's (None for an
    image alone, which is always turned upright).
    """
    if orientation == 1:
        return False
    if recorded is None:
        return True
    return recorded == upright_size(stored, orientation) and recorded != stored


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _TRANSPARENT_MODES or "transparency" in image.info


def mode_conversion(image: Image.Image) -> str | None:
    """What decoding does to an opened image's mode, in words; None for plain 8-bit RGB."""
    if _has_alpha(image):
        return f"{image.mode} with transparency: composited onto white"
    if image.mode.startswith("I"):
        return f"{image.mode}: 16-bit grey scaled to 8 bits"
    if image.mode == "RGB":
        return None
    return f"{image.mode}: converted to RGB"


def to_rgb(image: Image.Image, recorded: tuple[int, int] | None = None) -> Image.Image:
    """An opened, loaded PIL image -> 8-bit RGB by the module's policy.

    `recorded` is the (height, width) a manifest records for it (None for an image alone).
    """
    stored = (image.height, image.width)
    if reads_upright(stored, exif_orientation(image), recorded):
        image = ImageOps.exif_transpose(image)
    if _has_alpha(image):
        white = Image.new("RGBA", image.size, _WHITE)
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    if image.mode.startswith("I"):
        grey = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        image = Image.fromarray(grey.astype(np.uint8))
    return image.convert("RGB")


def decode_image(
    source: bytes | BinaryIO, name: str = "image", recorded: tuple[int, int] | None = None
) -> Image.Image:
    """Image file bytes (or an open binary file) -> 8-bit RGB PIL image (`to_rgb`).

    ValueError starting with `name` when the data cannot be decoded or has more pixels than
    PIL's decompression-bomb limit (read before decoding).
    """
    stream = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as img:
                img.load()
                return to_rgb(img, recorded)
    except Image.UnidentifiedImageError as e:
        raise ValueError(f"{name}: not a readable image (unknown or corrupt format)") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ValueError(f"{name}: not a readable image ({e})") from e


def load_image(path: str | Path, recorded: tuple[int, int] | None = None) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image (see `decode_image`).

    Raises FileNotFoundError when the file is missing and ValueError naming the file when
    it cannot be decoded or is too large.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: image file not found")
    with p.open("rb") as f:
        return decode_image(f, str(p), recorded)


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


def letterbox_mask_u8(mask: np.ndarray, box: Letterbox) -> np.ndarray:
    """Boolean/uint8 HxW mask -> size x size uint8 mask in [0, 255] (bilinear, zero padding):
    a quarter of the float mask's bytes, for caches."""
    src = Image.fromarray((mask > 0).astype(np.uint8) * 255)
    resized = np.asarray(src.resize((box.new_w, box.new_h), Image.Resampling.BILINEAR))
    out = np.zeros((box.size, box.size), dtype=np.uint8)
    out[box.top : box.top + box.new_h, box.left : box.left + box.new_w] = resized
    return out


def mask_to_float(mask_u8: np.ndarray) -> np.ndarray:
    """A `letterbox_mask_u8` mask as float32 in [0, 1]."""
    return (mask_u8 / 255.0).astype(np.float32)


def letterbox_mask(mask: np.ndarray, box: Letterbox) -> np.ndarray:
    """Boolean/uint8 HxW mask -> size x size float32 mask in [0, 1] (bilinear, zero padding)."""
    return mask_to_float(letterbox_mask_u8(mask, box))


def canvas_batch(canvases: list[np.ndarray]) -> torch.Tensor:
    """SxSx3 uint8 canvases -> Bx3xSxS uint8 tensor (what `normalize` takes)."""
    return torch.from_numpy(np.stack(canvases)).permute(0, 3, 1, 2)


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
