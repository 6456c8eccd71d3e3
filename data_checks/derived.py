"""Columns computed in pandas from the manifest rows, so expectations can check them.

Each derived column is added only when the manifest columns it reads exist; a value is null
where its input is null (that input's own not-null check reports it, once).

    token_count     CLIP tokens of `sentence`, start/end included
    mask_area       foreground pixels of `mask_rle` (pycocotools), null if the RLE is invalid
    mask_rle_error  why `mask_rle` is not a valid RLE of a height x width mask, else null
    bbox_error      why `bbox` is not [x, y, w, h] with w, h > 0 (target rows), else null
    bbox_overflow   pixels the box sticks out of the image (<= 0 when inside; target rows)
    image_in_train  (rows outside train) whether their image_id also appears in train
    image_exists, image_decodes, image_error, recorded_size ("HxW")
    image_size      "HxW" of the image as training reads it: in the frame `cris_model.imaging`
                    picks for the recorded size (as stored, or upright by its EXIF orientation)
    image_conversion  what decoding does to the image's mode (null for 8-bit RGB)
    image_orientation its EXIF orientation (1 = upright)
    image_read_upright whether training applies that orientation (the recorded size is the
                    upright one, and not the stored one)
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pycocotools.mask as mask_utils

from cris_model.data.masks import check_rle
from data_checks.images import probe_images

IMAGE_FOLDER = "the image folder"  # stands for image_dir among the inputs below

DERIVED_FROM: dict[str, tuple[str, ...]] = {
    "token_count": ("sentence",),
    "mask_area": ("mask_rle", "height", "width"),
    "mask_rle_error": ("mask_rle", "height", "width"),
    "bbox_error": ("bbox", "height", "width", "no_target"),
    "bbox_overflow": ("bbox", "height", "width", "no_target"),
    "image_in_train": ("image_id",),
    "image_exists": ("file_name", IMAGE_FOLDER),
    "image_decodes": ("file_name", IMAGE_FOLDER),
    "image_error": ("file_name", IMAGE_FOLDER),
    "image_size": ("file_name", IMAGE_FOLDER, "height", "width"),
    "recorded_size": ("file_name", IMAGE_FOLDER, "height", "width"),
    "image_conversion": ("file_name", IMAGE_FOLDER),
    "image_orientation": ("file_name", IMAGE_FOLDER),
    "image_read_upright": ("file_name", IMAGE_FOLDER, "height", "width"),
}  # derived column -> the manifest columns (or image folder) it is computed from


def _pixels(value: Any) -> int | None:
    """A positive whole number of pixels, or None (the height/width checks report it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return int(value) if np.isfinite(value) and value >= 1 and value == int(value) else None


def _mask_columns(rle: Any, height: Any, width: Any) -> tuple[float | None, str | None]:
    """(mask_area, mask_rle_error) of one row."""
    h, w = _pixels(height), _pixels(width)
    if rle is None or h is None or w is None or (isinstance(rle, float) and np.isnan(rle)):
        return None, None
    if not isinstance(rle, str):
        return None, f"mask_rle is {type(rle).__name__}, not a string"
    try:
        check_rle(rle, h, w)
    except ValueError as e:
        return None, str(e)
    area = mask_utils.area({"size": [h, w], "counts": rle.encode("ascii")})
    return float(area), None


def _bbox_columns(bbox: Any, height: Any, width: Any) -> tuple[str | None, float | None]:
    """(bbox_error, bbox_overflow) of one target row."""
    h, w = _pixels(height), _pixels(width)
    if bbox is None or h is None or w is None:
        return None, None
    try:
        box = np.asarray(bbox, dtype=np.float64)
    except (TypeError, ValueError):
        return f"bbox {bbox!r} is not numeric", None
    if box.shape != (4,):
        return f"bbox has shape {box.shape}, not [x, y, w, h]", None
    if not np.isfinite(box).all() or box[2] <= 0 or box[3] <= 0:
        return f"bbox {box.tolist()} is not finite with w, h > 0", None
    x, y, bw, bh = box.tolist()
    return None, max(-x, -y, x + bw - w, y + bh - h)


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    """CLIP's BPE tokenizer (bundled vocabulary, no network)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def token_counts(sentences: pd.Series) -> pd.Series:
    """CLIP token count of each sentence, start and end tokens included (null for non-strings)."""
    tok = _tokenizer()
    unique = {s for s in sentences if isinstance(s, str)}
    counts = {s: len(tok.encode(s)) + 2 for s in unique}
    return pd.Series([counts.get(s) if isinstance(s, str) else None for s in sentences],
                     index=sentences.index, dtype="Int64")


def _is_target(rows: pd.DataFrame) -> pd.Series:
    return rows["no_target"].eq(False) if "no_target" in rows else pd.Series(True, rows.index)


def add_derived_columns(
    rows: pd.DataFrame, image_dir: Path | None, image_workers: int = 4
) -> pd.DataFrame:
    """Copy of `rows` with the derived columns above that its columns allow.

    Image columns need `image_dir` (None: not added). Rows' index is kept.
    """
    out = rows.copy()
    has = set(out.columns).issuperset
    if has({"sentence"}):
        out["token_count"] = token_counts(out["sentence"])
    if has({"mask_rle", "height", "width"}):
        cols = [_mask_columns(*t) for t in zip(
            out["mask_rle"], out["height"], out["width"], strict=True)]
        out["mask_area"] = pd.Series([c[0] for c in cols], index=out.index, dtype="Float64")
        out["mask_rle_error"] = pd.Series([c[1] for c in cols], index=out.index, dtype=object)
    if has({"bbox", "height", "width", "no_target"}):
        target = _is_target(out)
        boxes = [_bbox_columns(b, h, w) if t else (None, None)
                 for b, h, w, t in zip(
                     out["bbox"], out["height"], out["width"], target, strict=True)]
        out["bbox_error"] = pd.Series([c[0] for c in boxes], index=out.index, dtype=object)
        out["bbox_overflow"] = pd.Series([c[1] for c in boxes], index=out.index, dtype="Float64")
    if has({"image_id"}):
        in_train = out["source_split"] == "train"
        train_ids = set(out.loc[in_train, "image_id"].dropna())
        shared = out["image_id"].isin(train_ids)
        out["image_in_train"] = shared.astype(object).where(~in_train, None)
    if image_dir is not None and has({"file_name"}):
        _add_image_columns(out, image_dir, image_workers)
    return out


def _add_image_columns(out: pd.DataFrame, image_dir: Path, workers: int) -> None:
    names = out["file_name"].where(out["file_name"].map(lambda v: isinstance(v, str)), None)
    probes = probe_images(image_dir, names.dropna(), workers)
    for col in ("image_exists", "image_decodes", "image_error", "image_conversion",
                "image_orientation"):
        out[col] = names.map(probes[col]).astype(object).where(names.notna(), None)
    recorded: list[tuple[int, int] | None] = [None] * len(out)
    if {"height", "width"}.issubset(out.columns):
        sizes = [(_pixels(h), _pixels(w)) for h, w in zip(
            out["height"], out["width"], strict=True)]
        recorded = [(h, w) if h and w else None for h, w in sizes]
        out["recorded_size"] = pd.Series([f"{s[0]}x{s[1]}" if s else None for s in recorded],
                                         index=out.index, dtype=object)
    decoded = probes[probes["image_decodes"].eq(True)]
    stored = {name: ((int(r.image_height), int(r.image_width)), int(r.image_orientation))
              for name, r in decoded.iterrows()}
    frames = [_frame(stored.get(n), size) for n, size in zip(names, recorded, strict=True)]
    out["image_size"] = pd.Series([f[0] for f in frames], index=out.index, dtype=object)
    out["image_read_upright"] = pd.Series([f[1] for f in frames], index=out.index, dtype=object)


def _frame(stored: tuple[tuple[int, int], int] | None,
           recorded: tuple[int, int] | None) -> tuple[str | None, bool | None]:
    """("HxW" as training reads the image, whether upright) given its stored size and EXIF
    orientation and the recorded size; (None, None) for an image that did not decode."""
    from cris_model.imaging import reads_upright, upright_size  # torch: load it late

    if stored is None:
        return None, None
    size, orientation = stored
    upright = reads_upright(size, orientation, recorded) if recorded else False
    h, w = upright_size(size, orientation) if upright else size
    return f"{h}x{w}", upright
