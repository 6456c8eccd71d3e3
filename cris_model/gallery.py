"""Drawing masks: overlay galleries, single-mask overlays, and mask PNGs written atomically.

A gallery is one PNG of labelled rows of cases: each tile shows the image at its own aspect
ratio with the predicted mask tinted red, the true mask green and their overlap yellow, and a
caption (phrase, IoU) under it. Evaluation and training's validation draw their cases this
way; `cris predict` draws one mask over its image with `overlay_mask` and writes masks with
`mask_image` and `save_png`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cris_model.atomic import staged_file

PRED_COLOUR = (230, 40, 40)  # RGB tint of predicted-only pixels
GT_COLOUR = (40, 200, 60)  # RGB tint of true-only pixels
BOTH_COLOUR = (240, 220, 40)  # RGB tint where prediction and truth agree
ALPHA = 0.55  # opacity of the tints, in [0, 1]
OVERLAY_COLOUR = (255, 40, 40)  # RGB of the mask tint `overlay_mask` draws by default
OVERLAY_ALPHA = 0.5  # opacity of that tint over masked pixels, in [0, 1]
_BACKGROUND = (255, 255, 255)
_TILE_FILL = (64, 64, 64)
_TEXT = (0, 0, 0)
_LINE_H = 12  # pixels per caption line with PIL's default font
_CAPTION_LINES = 3
_PAD = 4


@dataclass(frozen=True)
class GalleryCase:
    """One tile: an image at its original size, two masks over it, and a caption."""

    image: np.ndarray  # HxWx3 uint8 RGB
    pred: np.ndarray  # HxW bool, the predicted mask
    gt: np.ndarray  # HxW bool, the true mask
    caption: str  # e.g. the phrase and its IoU


def overlay_masks(image: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 image with pred-only red, gt-only green and both yellow -> HxWx3 uint8.

    Each mask's outline is drawn opaque in its colour (truth green, prediction red on top).
    """
    rgb = np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8, got {rgb.dtype} {rgb.shape}")
    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if p.shape != rgb.shape[:2] or g.shape != rgb.shape[:2]:
        raise ValueError(
            f"masks {p.shape} / {g.shape} must match the image size {rgb.shape[:2]}"
        )
    out = rgb.astype(np.float32)
    for region, colour in ((p & ~g, PRED_COLOUR), (g & ~p, GT_COLOUR), (p & g, BOTH_COLOUR)):
        out[region] = (1.0 - ALPHA) * out[region] + ALPHA * np.asarray(colour, np.float32)
    out[_outline(g)] = GT_COLOUR
    out[_outline(p)] = PRED_COLOUR
    return out.round().astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a boolean HxW mask with a 4-neighbour outside it (or on the image border)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _tile(case: GalleryCase, size: int) -> Image.Image:
    """The overlay scaled to fit size x size (aspect kept), centred, with the caption below."""
    over = Image.fromarray(overlay_masks(case.image, case.pred, case.gt))
    scale = size / max(over.width, over.height)
    w, h = max(1, round(over.width * scale)), max(1, round(over.height * scale))
    tile = Image.new("RGB", (size, size + _CAPTION_LINES * _LINE_H + _PAD), _BACKGROUND)
    tile.paste(Image.new("RGB", (size, size), _TILE_FILL), (0, 0))
    tile.paste(over.resize((w, h), Image.Resampling.NEAREST), ((size - w) // 2, (size - h) // 2))
    draw = ImageDraw.Draw(tile)
    lines = textwrap.wrap(case.caption, width=max(8, size // 6))[:_CAPTION_LINES]
    for i, line in enumerate(lines):
        draw.text((2, size + 2 + i * _LINE_H), line, fill=_TEXT)
    return tile


def render_gallery(
    rows: Sequence[tuple[str, Sequence[GalleryCase]]], tile_size: int = 192
) -> Image.Image:
    """Labelled rows of tiles -> one RGB image; a legend line on top, each row titled.

    `rows` is [(title, cases), ...]; rows may differ in length (empty rows are skipped).
    """
    if tile_size < 16:
        raise ValueError(f"tile_size must be >= 16 pixels, got {tile_size}")
    kept = [(title, list(cases)) for title, cases in rows if cases]
    if not kept:
        raise ValueError("gallery has no case to draw")
    tile_h = tile_size + _CAPTION_LINES * _LINE_H + _PAD
    cols = max(len(cases) for _, cases in kept)
    width = max(cols * (tile_size + _PAD) + _PAD, 360)
    height = _LINE_H + 2 * _PAD + len(kept) * (_LINE_H + tile_h + _PAD)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((_PAD, _PAD), "red: predicted only   green: true only   yellow: both", fill=_TEXT)
    y = _LINE_H + 2 * _PAD
    for title, cases in kept:
        draw.text((_PAD, y), title, fill=_TEXT)
        y += _LINE_H
        for i, case in enumerate(cases):
            canvas.paste(_tile(case, tile_size), (_PAD + i * (tile_size + _PAD), y))
        y += tile_h + _PAD
    return canvas


def save_gallery(
    rows: Sequence[tuple[str, Sequence[GalleryCase]]], path: Path, tile_size: int = 192
) -> Path:
    """Render `rows` (see `render_gallery`) and write the PNG atomically; returns `path`."""
    return save_png(render_gallery(rows, tile_size), path)


def overlay_mask(
    image: Image.Image, mask: np.ndarray, caption: str = "",
    colour: tuple[int, int, int] = OVERLAY_COLOUR,
) -> Image.Image:
    """RGB image with the boolean HxW mask tinted in `colour` and outlined opaque in it (as
    the galleries outline theirs), and a caption on top."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from image size {rgb.shape[:2]}")
    tint = np.asarray(colour, dtype=np.float32)
    rgb[mask] = (1.0 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * tint
    rgb[_outline(mask)] = tint
    out = Image.fromarray(rgb.round().astype(np.uint8))
    if caption:
        draw = ImageDraw.Draw(out)
        left, top, right, bottom = draw.textbbox((2, 2), caption)
        draw.rectangle((0, 0, right + 2, bottom + 2), fill=(0, 0, 0))
        draw.text((2, 2), caption, fill=(255, 255, 255))
    return out


def mask_image(mask: np.ndarray) -> Image.Image:
    """Boolean HxW mask -> 8-bit grayscale PIL image with values 0 and 255."""
    return Image.fromarray(mask.astype(np.uint8) * 255)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically: to a temporary file beside `path`, then rename over it."""
    dest = Path(path)
    with staged_file(dest) as tmp:
        image.save(tmp, format="PNG")
    return dest
