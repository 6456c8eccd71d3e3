"""Language-blind baselines: what a predictor that never reads the phrase can score.

Both see an image's ground-truth masks but not the sentence:
- every object: the union of all masks referred to in the image, for every sentence;
- blind oracle: per image, the one candidate mask (any of the image's distinct ground-truth
  masks, the empty one included when it is a target) with the largest summed IoU over the
  image's sentences. Nothing that ignores the phrase and outputs one of those masks beats it.
A dataset needs language when the blind oracle scores far below the ground truth (1.0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cris_model.data.masks import mask_from_rle
from cris_model.metrics import evaluate_masks

_COLUMNS = ("image_id", "mask_rle", "height", "width")


def _check(manifest: pd.DataFrame) -> None:
    missing = [c for c in _COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest lacks column(s) {missing} needed by the blind baselines")
    if manifest.empty:
        raise ValueError("manifest has no rows to score")


def ground_truth_masks(manifest: pd.DataFrame) -> list[np.ndarray]:
    """Bool HxW target mask per row, in row order (rows sharing an RLE share one array)."""
    _check(manifest)
    cache: dict[tuple[str, int, int], np.ndarray] = {}
    out = []
    for rle, h, w in zip(manifest["mask_rle"], manifest["height"], manifest["width"],
                         strict=True):
        key = (str(rle), int(h), int(w))
        if key not in cache:
            cache[key] = mask_from_rle(*key)
        out.append(cache[key])
    return out


def _rows_by_image(manifest: pd.DataFrame) -> list[np.ndarray]:
    """Row positions of each image, images in order of first appearance."""
    codes, _ = pd.factorize(manifest["image_id"])
    order = np.argsort(codes, kind="stable")
    return np.split(order, np.cumsum(np.bincount(codes))[:-1])


def every_object_masks(manifest: pd.DataFrame, gts: list[np.ndarray] | None = None,
                       ) -> list[np.ndarray]:
    """Per row, the union of every target mask of the row's image."""
    gts = ground_truth_masks(manifest) if gts is None else gts
    preds: list[np.ndarray] = [np.zeros(0, dtype=bool)] * len(gts)
    for rows in _rows_by_image(manifest):
        union = np.logical_or.reduce([gts[i] for i in rows])
        for i in rows:
            preds[i] = union
    return preds


def blind_oracle_masks(manifest: pd.DataFrame, gts: list[np.ndarray] | None = None,
                       ) -> list[np.ndarray]:
    """Per row, its image's single best phrase-independent mask (see the module docstring).

    Ties go to the candidate seen first; IoU of empty against empty counts as 1.
    """
    gts = ground_truth_masks(manifest) if gts is None else gts
    rles = manifest["mask_rle"].astype(str).to_numpy()
    preds: list[np.ndarray] = [np.zeros(0, dtype=bool)] * len(gts)
    for rows in _rows_by_image(manifest):
        first = {rles[i]: i for i in rows[::-1]}
        cands = sorted(first.values())
        g = np.stack([gts[i].ravel() for i in rows]).astype(np.int64)
        c = np.stack([gts[i].ravel() for i in cands]).astype(np.int64)
        inter = c @ g.T
        union = c.sum(1)[:, None] + g.sum(1)[None, :] - inter
        iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
        best = gts[cands[int(np.argmax(iou.sum(axis=1)))]]
        for i in rows:
            preds[i] = best
    return preds


def language_blind_report(manifest: pd.DataFrame) -> dict[str, Any]:
    """Scores of the blind predictors on a prepared manifest (one row per sentence).

    Returns `every_object_mIoU`, `blind_oracle_mIoU` (fractions in [0, 1]), the full
    metric dicts under `every_object` and `blind_oracle`, and the sentence/image counts.
    """
    gts = ground_truth_masks(manifest)
    every = evaluate_masks(every_object_masks(manifest, gts), gts)
    oracle = evaluate_masks(blind_oracle_masks(manifest, gts), gts)
    return {
        "sentences": len(gts), "images": int(manifest["image_id"].nunique()),
        "every_object_mIoU": every["mIoU"], "blind_oracle_mIoU": oracle["mIoU"],
        "every_object": every, "blind_oracle": oracle,
    }
