"""Predict masks for referring expressions: encode an image once, answer many phrases.

Shaped like segment-anything's predictor, but with the per-request state kept out of the
shared object: `embed` letterboxes and encodes an image into an `ImageEmbedding` (a value the
caller holds), and `segment` / `segment_probs` score any number of expressions against it
and return maps at the original image size. One `Predictor` can serve many threads at once
(the scoring server runs each request in its own thread). `set_image` / `predict` keep one
embedding on the object for interactive use by a single caller. Images are decoded and
letterboxed by `cris_model.imaging` (`load_image` and `decode_image` are re-exported here), the
same way training and evaluation read them.
"""

from __future__ import annotations

import copy
import math
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Number
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cris_model.accel import CapturedCall, prepare_for_inference
from cris_model.backbone import tokenize
from cris_model.checkpoint import load_checkpoint
from cris_model.imaging import (
    Letterbox,
    canvas_batch,
    decode_image,
    letterbox_image,
    load_image,
    normalize,
    to_rgb,
    undo_letterbox,
)
from cris_model.model import CRIS

__all__ = ["HEAD_GRAPHS", "ImageEmbedding", "Predictor", "check_text", "check_texts",
           "decode_image", "load_image"]

HEAD_GRAPHS = 8  # expression counts a fast Predictor keeps a captured graph for (others: eager)


def check_text(value: object) -> str:
    """One phrase, stripped; ValueError naming the problem unless it is a string with a
    non-space character (null, NaN, numbers, empty and whitespace-only are refused)."""
    problem = "text must be a non-empty string"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{problem}, got null")
    if isinstance(value, Number):
        raise ValueError(f"{problem}, got the number {value!r}")
    if not isinstance(value, str):
        raise ValueError(f"{problem}, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{problem}, got an empty string")
    if not value.strip():
        raise ValueError(f"{problem}, got only whitespace")
    return value.strip()


def check_texts(texts: str | Sequence[str]) -> list[str]:
    """Normalise one phrase or a list of phrases to a list (`check_text` on each);
    ValueError naming the phrase's index on bad input."""
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items:
        raise ValueError("no referring expression given")
    out = []
    for i, t in enumerate(items):
        try:
            out.append(check_text(t))
        except ValueError as e:
            raise ValueError(f"referring expression {i}: {e}") from e
    return out


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


@dataclass(frozen=True)
class ImageEmbedding:
    """One image encoded by `Predictor.embed`: what scoring phrases against it needs."""

    features: dict[str, torch.Tensor]  # CRIS.encode_image maps, batch 1, on the device
    box: Letterbox  # where the original image sits in the model's input canvas

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the original image: the size of every map scored against it."""
        return self.box.orig_h, self.box.orig_w


class Predictor:
    """One image, many referring expressions, against a CRIS model in eval mode.

    `embed` and `segment` share nothing between calls but the model's weights, so any
    number of threads may call them at once. On a GPU (`fast`, the default there) it serves
    a copy of the model with BatchNorm folded, bf16 weights and channels-last layout, and
    replays CUDA graphs: one for the image encoder (the letterboxed input never changes
    shape) and one per number of expressions, captured per thread, because a graph's input
    and output buffers are reused by every replay. On the CPU the model runs as given, in
    float32.
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
        self._graphs = threading.local()  # .calls: this thread's {key: CapturedCall}
        self._current: ImageEmbedding | None = None

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "cpu", threshold: float | None = None
    ) -> Predictor:
        """Load a checkpoint directory written by `save_checkpoint` and wrap it."""
        return cls(load_checkpoint(Path(path), str(device)), threshold=threshold, device=device)

    @classmethod
    def from_registry(
        cls, model_uri: str, tracking_uri: str = "", device: str | torch.device = "cpu",
        threshold: float | None = None,
    ) -> Predictor:
        """Load a registered model (e.g. models:/cris@champion) through a temporary folder
        that is removed once the weights are in memory."""
        from cris_model.registry import download_checkpoint

        with tempfile.TemporaryDirectory(prefix="cris-model-") as tmp:
            path = download_checkpoint(model_uri, Path(tmp), tracking_uri)
            return cls.from_checkpoint(path, device=device, threshold=threshold)

    def embed(self, image: Image.Image | np.ndarray) -> ImageEmbedding:
        """Encode an image (PIL, or uint8 HxW / HxWx3 / HxWx4 RGB array): made RGB by
        `imaging.to_rgb` (upright, transparency on white), letterboxed, normalised."""
        rgb = to_rgb(_to_pil(image))
        canvas, box = letterbox_image(rgb, self.model.config.input_size)
        x = normalize(canvas_batch([canvas]).to(self.device))
        if self.fast:
            calls = self._calls()
            if "encoder" not in calls:
                calls["encoder"] = CapturedCall(self.model.encode_image, [x])
            features = {k: v.clone() for k, v in calls["encoder"](x).items()}  # replays overwrite
        else:
            with torch.inference_mode():
                features = self.model.encode_image(x)
        return ImageEmbedding(features, box)

    def segment_probs(
        self, embedding: ImageEmbedding, texts: str | Sequence[str]
    ) -> list[np.ndarray]:
        """Per-expression float32 HxW probability maps in [0, 1] at the original image size."""
        items = check_texts(texts)
        tokens = tokenize(items, self.model.config.word_len).to(self.device)
        with torch.inference_mode():
            logits = self._logits(tokens, embedding.features)
            probs = torch.sigmoid(logits.float())
            maps = [undo_letterbox(p[0], embedding.box).clamp_(0.0, 1.0) for p in probs]
        return [m.cpu().numpy() for m in maps]

    def segment(self, embedding: ImageEmbedding, texts: str | Sequence[str]) -> list[np.ndarray]:
        """Per-expression boolean HxW masks at the original image size (prob > threshold)."""
        return [p > self.threshold for p in self.segment_probs(embedding, texts)]

    def _calls(self) -> dict[object, CapturedCall]:
        """This thread's captured calls: "encoder" and ("head", N) for N expressions."""
        calls: dict[object, CapturedCall] = self._graphs.__dict__.setdefault("calls", {})
        return calls

    def _logits(self, tokens: torch.Tensor, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """NxL tokens against the image features -> Nx1xhxw logits (graph replay when fast)."""
        keys = self.model.image_keys
        maps = [features[k] for k in keys]

        def head(text: torch.Tensor, *image_maps: torch.Tensor) -> torch.Tensor:
            image = dict(zip(keys, image_maps, strict=True))
            return self.model.head({**image, **self.model.encode_text(text)})

        if not self.fast:
            return head(tokens, *maps)
        calls, key = self._calls(), ("head", tokens.shape[0])
        if key not in calls:
            if sum(k != "encoder" for k in calls) >= HEAD_GRAPHS:
                return head(tokens, *maps)
            calls[key] = CapturedCall(head, [tokens, *maps])
        return calls[key](tokens, *maps)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the image set last; RuntimeError before `set_image`."""
        return self._embedding().size

    def set_image(self, image: Image.Image | np.ndarray) -> None:
        """Embed an image and keep it on the predictor for `predict` (one caller at a time)."""
        self._current = self.embed(image)

    def reset_image(self) -> None:
        """Forget the image kept by `set_image`."""
        self._current = None

    def predict_probs(self, texts: str | Sequence[str]) -> list[np.ndarray]:
        """`segment_probs` against the image kept by `set_image`."""
        return self.segment_probs(self._embedding(), texts)

    def predict(self, texts: str | Sequence[str]) -> list[np.ndarray]:
        """`segment` against the image kept by `set_image`."""
        return self.segment(self._embedding(), texts)

    def _embedding(self) -> ImageEmbedding:
        if self._current is None:
            raise RuntimeError("no image set: call set_image first")
        return self._current
