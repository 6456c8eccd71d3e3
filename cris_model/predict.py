"""Predict masks for referring expressions: encode an image once, answer many phrases.

Shaped like segment-anything's predictor: `set_image` letterboxes and encodes the image a
single time, then `predict` / `predict_probs` segment any number of expressions against
the cached features and return maps at the original image size.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from cris_model.accel import CapturedCall, prepare_for_inference
from cris_model.atomic import staged_file
from cris_model.backbone import tokenize
from cris_model.checkpoint import load_checkpoint
from cris_model.imaging import Letterbox, letterbox_image, normalize, undo_letterbox
from cris_model.model import CRIS

OVERLAY_COLOUR = (255, 40, 40)  # RGB of the mask tint drawn by `overlay_mask`
OVERLAY_ALPHA = 0.5  # opacity of that tint over masked pixels, in [0, 1]
HEAD_GRAPHS = 8  # expression counts a fast Predictor keeps a captured graph for (others: eager)


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as an upright 8-bit RGB PIL image.

    Applies the EXIF orientation; grayscale, palette and CMYK images are converted to RGB;
    transparent pixels are composited onto white. Raises FileNotFoundError when the file
    is missing and ValueError naming the file when it cannot be decoded or has more pixels
    than PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, read before decoding).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: image file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                img.load()
                upright = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ValueError(f"{p}: not a readable image ({e})") from e
    if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
        rgba = upright.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if upright.mode == "I;16":
        upright = Image.fromarray((np.asarray(upright) >> 8).astype(np.uint8))
    return upright.convert("RGB")


def check_texts(texts: str | Sequence[str]) -> list[str]:
    """Normalise one phrase or a list of phrases to a list; ValueError on empty input."""
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items:
        raise ValueError("no referring expression given")
    for i, t in enumerate(items):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"referring expression {i} is empty: {t!r}")
    return [t.strip() for t in items]


def _to_pil(image: Image.Image | np.ndarray) -> Image.Image:
    """PIL image, or HxW / HxWx3 / HxWx4 uint8 array (RGB order) -> PIL image."""
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    ok_shape = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))
    if arr.dtype != np.uint8 or not ok_shape:
        raise ValueError(
            f"image array must be uint8 HxW, HxWx3 or HxWx4, got {arr.dtype} {arr.shape}"
        )
    return Image.fromarray(arr)


class Predictor:
    """One image, many referring expressions, against a CRIS model in eval mode.

    On a GPU (`fast`, the default there) it serves a copy of the model with BatchNorm
    folded, bf16 weights and channels-last layout, and replays CUDA graphs: one for the
    image encoder (the letterboxed input never changes shape) and one per number of
    expressions. On the CPU the model runs as given, in float32.
    """

    def __init__(
        self, model: CRIS, threshold: float | None = None, device: str | torch.device = "cpu",
        fast: bool | None = None,
    ) -> None:
        t = model.config.threshold if threshold is None else threshold
        if not 0.0 < t < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {t}")
        self.device = torch.device(device)
        self.fast = self.device.type == "cuda" if fast is None else fast
        if self.fast and self.device.type != "cuda":
            raise ValueError(f"fast inference needs a CUDA device, got {self.device}")
        if self.fast:
            model = copy.deepcopy(model)
            prepare_for_inference(model, torch.bfloat16, channels_last=True)
        self.model = model.to(self.device).eval()
        self.threshold = float(t)
        self._features: dict[str, torch.Tensor] | None = None
        self._box: Letterbox | None = None
        self._encoder: CapturedCall | None = None
        self._heads: dict[int, CapturedCall] = {}

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "cpu", threshold: float | None = None
    ) -> Predictor:
        """Load a checkpoint directory written by `save_checkpoint` and wrap it."""
        return cls(load_checkpoint(Path(path), str(device)), threshold=threshold, device=device)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the image set last; RuntimeError before `set_image`."""
        if self._box is None:
            raise RuntimeError("no image set: call set_image first")
        return self._box.orig_h, self._box.orig_w

    def set_image(self, image: Image.Image | np.ndarray) -> None:
        """Letterbox an image (PIL, or uint8 HxW / HxWx3 / HxWx4 RGB array) and encode it once."""
        canvas, box = letterbox_image(_to_pil(image), self.model.config.input_size)
        x = normalize(torch.tensor(canvas).permute(2, 0, 1)[None].to(self.device))
        if self.fast:
            if self._encoder is None:
                self._encoder = CapturedCall(self.model.encode_image, [x])
            self._features = self._encoder(x)
        else:
            with torch.inference_mode():
                self._features = self.model.encode_image(x)
        self._box = box

    def reset_image(self) -> None:
        """Forget the cached image features."""
        self._features = None
        self._box = None

    def predict_probs(self, texts: str | Sequence[str]) -> list[np.ndarray]:
        """Per-expression float32 HxW probability maps in [0, 1] at the original image size."""
        items = check_texts(texts)
        if self._features is None or self._box is None:
            raise RuntimeError("no image set: call set_image first")
        tokens = tokenize(items, self.model.config.word_len).to(self.device)
        with torch.inference_mode():
            logits = self._logits(tokens, self._features)
            probs = torch.sigmoid(logits.float())
            maps = [undo_letterbox(p[0], self._box).clamp_(0.0, 1.0) for p in probs]
        return [m.cpu().numpy() for m in maps]

    def _logits(self, tokens: torch.Tensor, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """NxL tokens against the image features -> Nx1xhxw logits (graph replay when fast)."""
        keys = self.model.image_keys
        maps = [features[k] for k in keys]

        def head(text: torch.Tensor, *image_maps: torch.Tensor) -> torch.Tensor:
            image = dict(zip(keys, image_maps, strict=True))
            return self.model.head({**image, **self.model.encode_text(text)})

        n = tokens.shape[0]
        if not self.fast or (n not in self._heads and len(self._heads) >= HEAD_GRAPHS):
            return head(tokens, *maps)
        if n not in self._heads:
            self._heads[n] = CapturedCall(head, [tokens, *maps])
        return self._heads[n](tokens, *maps)

    def predict(self, texts: str | Sequence[str]) -> list[np.ndarray]:
        """Per-expression boolean HxW masks at the original image size (prob > threshold)."""
        return [p > self.threshold for p in self.predict_probs(texts)]


def overlay_mask(image: Image.Image, mask: np.ndarray, caption: str = "") -> Image.Image:
    """RGB image with the boolean HxW mask tinted in `OVERLAY_COLOUR` and a caption on top."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from image size {rgb.shape[:2]}")
    tint = np.asarray(OVERLAY_COLOUR, dtype=np.float32)
    rgb[mask] = (1.0 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * tint
    out = Image.fromarray(rgb.round().astype(np.uint8))
    if caption:
        draw = ImageDraw.Draw(out)
        left, top, right, bottom = draw.textbbox((2, 2), caption)
        draw.rectangle((0, 0, right + 2, bottom + 2), fill=(0, 0, 0))
        draw.text((2, 2), caption, fill=(255, 255, 255))
    return out


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically: to a temporary file beside `path`, then rename over it."""
    dest = Path(path)
    with staged_file(dest) as tmp:
        image.save(tmp, format="PNG")
    return dest


def mask_image(mask: np.ndarray) -> Image.Image:
    """Boolean HxW mask -> 8-bit grayscale PIL image with values 0 and 255."""
    return Image.fromarray(mask.astype(np.uint8) * 255)
