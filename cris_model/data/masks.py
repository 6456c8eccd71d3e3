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
_MAX_GROUP_CHARS = 11  # 55 bits: far beyond any image, and safe in int64


def rle_run_lengths(counts: str) -> np.ndarray:
    """COCO compressed RLE counts string -> int64 run lengths (alternating 0s and 1s from 0).

    Reads the same format as pycocotools' `rleFrString`, but in numpy with every step
    checked, so a malformed string raises ValueError instead of reaching pycocotools' C
    decoder (which trusts the runs to fit height x width).
    """
    try:
        codes = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    except UnicodeEncodeError as e:
        raise ValueError("RLE counts string has an invalid character (non-ASCII)") from e
    if codes.size == 0:
        return np.zeros(0, dtype=np.int64)
    if codes.min() < 0 or codes.max() > 63:
        raise ValueError("RLE counts string has an invalid character (outside its alphabet)")
    more = (codes & 0x20) != 0
    if more[-1]:
        raise ValueError("RLE counts string ends inside a run length")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_GROUP_CHARS:
        raise ValueError("RLE counts string has a run length too long for any image")
    shift = 5 * (np.arange(codes.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((codes & 0x1F) << shift, starts)
    negative = (codes[ends] & 0x10) != 0
    values = values - negative * (np.int64(1) << (5 * lengths))
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def _check_runs(runs: np.ndarray, height: int, width: int) -> None:
    if runs.size and runs.min() < 0:
        raise ValueError("RLE has a negative run length")
    if int(runs.sum()) != height * width:
        raise ValueError(f"RLE runs cover {int(runs.sum())} pixels, expected {height}x{width}")


def check_rle(counts: str, height: int, width: int) -> None:
    """Raise ValueError unless `counts` is a valid COCO RLE string of a height x width mask."""
    _check_runs(rle_run_lengths(counts), height, width)


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
        check_rle(counts, height, width)
        return {"size": [height, width], "counts": counts.encode("ascii")}
    if isinstance(counts, list) and all(
        isinstance(c, int) and not isinstance(c, bool) for c in counts
    ):
        _check_runs(np.asarray(counts, dtype=np.int64), height, width)
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
    check_rle(rle_counts, height, width)
    rle = {"size": [height, width], "counts": rle_counts.encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def rle_from_mask(mask: np.ndarray) -> str:
    """Bool (or 0/1) HxW array -> compressed RLE counts string (size is the array's shape)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (HxW), got shape {mask.shape}")
    fortran = np.asfortranarray((mask > 0).astype(np.uint8)[:, :, None])
    return mask_utils.encode(fortran)[0]["counts"].decode("ascii")
