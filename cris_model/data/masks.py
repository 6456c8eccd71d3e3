"""COCO segmentations -> binary masks, through pycocotools.

Masks travel as COCO compressed RLE: a `counts` string (column-major run lengths in COCO's
6-bit text code) plus the image `height, width`. pycocotools does not check that a string's
runs cover the image, so every RLE read here is checked first (`rle_run_lengths`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

MIN_POLYGON_POINTS = 3


def rle_run_lengths(counts: str) -> list[int]:
    """COCO compressed RLE counts string -> its run lengths (0s first, then 1s, alternating).

    Raises ValueError when the text is not a well-formed COCO RLE string.
    """
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                raise ValueError("RLE counts string ends inside a run length")
            code = ord(counts[pos]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"RLE counts string has an invalid character {counts[pos]!r}")
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            pos += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _check_runs(runs: Sequence[int], height: int, width: int) -> None:
    if any(r < 0 for r in runs):
        raise ValueError("RLE has a negative run length")
    if sum(runs) != height * width:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels, expected {height}x{width}")


def _polygon_rle(parts: list[Any], height: int, width: int) -> tuple[dict, int]:
    valid: list[list[float]] = []
    for part in parts:
        if not isinstance(part, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in part
        ):
            raise ValueError("polygon part is not a list of numbers")
        if len(part) % 2:
            raise ValueError(f"polygon part has an odd number of coordinates ({len(part)})")
        if len(part) >= 2 * MIN_POLYGON_POINTS:
            valid.append([float(v) for v in part])
    if not valid:
        raise ValueError(f"no polygon part has at least {MIN_POLYGON_POINTS} points")
    rle = mask_utils.merge(mask_utils.frPyObjects(valid, height, width))
    return rle, len(parts) - len(valid)


def _dict_rle(seg: dict, height: int, width: int) -> dict:
    if "counts" not in seg or "size" not in seg:
        raise ValueError("RLE segmentation needs 'counts' and 'size'")
    if list(seg["size"]) != [height, width]:
        raise ValueError(f"RLE size {seg['size']} differs from image size [{height}, {width}]")
    counts = seg["counts"]
    if isinstance(counts, str):
        _check_runs(rle_run_lengths(counts), height, width)
        return {"size": [height, width], "counts": counts.encode("ascii")}
    if isinstance(counts, list) and all(
        isinstance(c, int) and not isinstance(c, bool) for c in counts
    ):
        _check_runs(counts, height, width)
        return mask_utils.frPyObjects(seg, height, width)
    raise ValueError("RLE counts must be a string or a list of integers")


def segmentation_rle(segmentation: Any, height: int, width: int) -> tuple[dict, int]:
    """One COCO `segmentation` -> (pycocotools compressed RLE dict, polygon parts skipped).

    Accepts polygon lists (parts unioned; parts with fewer than 3 points are skipped and
    counted), uncompressed RLE (`counts` a list) and compressed RLE (`counts` a string).
    Raises ValueError on anything malformed, or when no polygon part is usable.
    """
    if isinstance(segmentation, list) and segmentation:
        return _polygon_rle(segmentation, height, width)
    if isinstance(segmentation, dict):
        return _dict_rle(segmentation, height, width), 0
    raise ValueError("segmentation must be a non-empty polygon list or an RLE dict")


def union_rle(rles: Sequence[dict], height: int, width: int) -> str:
    """Union of pycocotools RLE dicts (an empty mask when none) -> compressed counts string."""
    if not rles:
        empty = np.zeros((height, width, 1), dtype=np.uint8, order="F")
        return mask_utils.encode(empty)[0]["counts"].decode("ascii")
    merged = mask_utils.merge(list(rles), intersect=False)
    return merged["counts"].decode("ascii")


def mask_from_rle(rle_counts: str, height: int, width: int) -> np.ndarray:
    """Compressed RLE counts string of a height x width mask -> bool HxW array."""
    _check_runs(rle_run_lengths(rle_counts), height, width)
    rle = {"size": [height, width], "counts": rle_counts.encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def rle_from_mask(mask: np.ndarray) -> str:
    """Bool (or 0/1) HxW array -> compressed RLE counts string (size is the array's shape)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (HxW), got shape {mask.shape}")
    fortran = np.asfortranarray((mask > 0).astype(np.uint8)[:, :, None])
    return mask_utils.encode(fortran)[0]["counts"].decode("ascii")
