"""Referring segmentation metrics over boolean HxW masks: LAVT's and ReLA's definitions.

Every sample reduces to four integer pixel counts (`SampleStats`); every figure is derived
from those integers, so streaming and batch evaluation agree exactly, in any order.

How no-target samples (all-false ground truth) are scored, following DESIGN.md:
- per-sample IoU of an empty prediction against an empty ground truth is 1; against a
  non-empty prediction it is 0. That IoU counts in `mIoU` and in `prec@X` like any other.
- `oIoU` is total intersection / total union; an empty-vs-empty sample adds 0 to both, so
  it leaves `oIoU` unchanged, while a false alarm adds its predicted area to the union.
- When any ground truth is empty, ReLA's generalised figures are added: `gIoU` (mean
  per-sample IoU under the rule above, hence equal to `mIoU`), `cIoU` (cumulative
  intersection / cumulative union, hence equal to `oIoU`), `N-acc` (fraction of no-target
  samples predicted empty) and `T-acc` (fraction of target samples predicted non-empty;
  absent when the set has no target sample, where it is undefined).
Unlike ReLA's `Pr@X`, which only counts target samples, `prec@X` counts every sample.
A set whose total union is 0 (all samples empty vs empty) has `oIoU` = `cIoU` = 1.

`breakdown` splits a set into groups (the phrase kind of each sentence, or the size of its
target) and reports mIoU, oIoU and count per group. Size buckets go by the fraction of the
image the true mask covers (`SIZE_BUCKETS`): small below 2%, medium from 2% to below 5%,
large from 5%. They are fractions, not COCO's pixel areas (32^2 and 96^2 px, about 0.3% and
3% of a 640x480 image), so that images of any size compare; on RefCOCO most targets are large
by them, on the synthetic shapes about a quarter are small and a fifth large. No-target
samples have no size and are left out of the size buckets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

SIZE_BUCKETS = (("small", 0.02), ("medium", 0.05), ("large", math.inf))  # (name, upper
# bound, exclusive, of the true mask's area as a fraction of the image)
PREC_THRESHOLDS = (Fraction(5, 10), Fraction(6, 10), Fraction(7, 10), Fraction(8, 10),
                   Fraction(9, 10))


@dataclass(frozen=True)
class SampleStats:
    """Pixel counts of one (prediction, ground truth) pair; the row the evaluation CSV writes."""

    intersection: int  # pixels true in both masks
    union: int  # pixels true in either mask
    pred_area: int  # pixels true in the prediction
    gt_area: int  # pixels true in the ground truth

    @property
    def no_target(self) -> bool:
        """True when the ground truth is empty (a no-target expression)."""
        return self.gt_area == 0

    @property
    def pred_empty(self) -> bool:
        """True when the prediction is empty (the model answers "no target")."""
        return self.pred_area == 0

    @property
    def iou(self) -> float:
        """Intersection over union in [0, 1]; 1.0 for an empty prediction on an empty truth."""
        return 1.0 if self.union == 0 else self.intersection / self.union

    def iou_at_least(self, threshold: Fraction) -> bool:
        """Exact test IoU >= threshold in integer arithmetic (no float rounding at the edge)."""
        if self.union == 0:
            return True
        return self.intersection * threshold.denominator >= threshold.numerator * self.union


def _as_mask(x: np.ndarray, name: str) -> np.ndarray:
    """Check a mask is a 2-D boolean or integer array and return it as bool (nonzero = true)."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D HxW mask, got shape {arr.shape}")
    if arr.dtype != np.bool_ and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be boolean or integer, got {arr.dtype}; threshold it first")
    return arr.astype(bool, copy=False)


def sample_stats(pred: np.ndarray, gt: np.ndarray) -> SampleStats:
    """Pixel counts of a boolean HxW prediction against a boolean HxW ground truth.

    Integer arrays are read as nonzero = true; float arrays and mismatched shapes raise
    ValueError.
    """
    p = _as_mask(pred, "prediction")
    g = _as_mask(gt, "ground truth")
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground truth shape {g.shape}")
    inter = int(np.count_nonzero(p & g))
    pred_area = int(np.count_nonzero(p))
    gt_area = int(np.count_nonzero(g))
    return SampleStats(inter, pred_area + gt_area - inter, pred_area, gt_area)


def _prec_key(threshold: Fraction) -> str:
    return f"prec@{float(threshold):.1f}"


class MaskMetrics:
    """Streaming accumulator: `update` one pair at a time, `compute` the metric dict."""

    def __init__(self) -> None:
        self._stats: list[SampleStats] = []

    @property
    def count(self) -> int:
        """Number of samples seen."""
        return len(self._stats)

    @property
    def stats(self) -> tuple[SampleStats, ...]:
        """Per-sample counts in the order they were added."""
        return tuple(self._stats)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> float:
        """Add one (prediction, ground truth) pair of boolean HxW masks; return its IoU."""
        s = sample_stats(pred, gt)
        self._stats.append(s)
        return s.iou

    def compute(self) -> dict[str, float]:
        """Metric dict (see the module docstring); raises ValueError when no sample was added."""
        if not self._stats:
            raise ValueError("no samples to evaluate")
        n = len(self._stats)
        total_i = sum(s.intersection for s in self._stats)
        total_u = sum(s.union for s in self._stats)
        miou = math.fsum(s.iou for s in self._stats) / n
        oiou = 1.0 if total_u == 0 else total_i / total_u
        out: dict[str, float] = {"mIoU": miou, "oIoU": oiou}
        for t in PREC_THRESHOLDS:
            out[_prec_key(t)] = sum(s.iou_at_least(t) for s in self._stats) / n
        no_target = [s for s in self._stats if s.no_target]
        if no_target:
            target = [s for s in self._stats if not s.no_target]
            out["gIoU"] = miou
            out["cIoU"] = oiou
            out["N-acc"] = sum(s.pred_empty for s in no_target) / len(no_target)
            if target:
                out["T-acc"] = sum(not s.pred_empty for s in target) / len(target)
        return out


def evaluate_masks(
    preds: Iterable[np.ndarray], gts: Iterable[np.ndarray]
) -> dict[str, float]:
    """Metrics over paired boolean HxW masks (each pair may have its own size).

    Returns `mIoU`, `oIoU`, `prec@0.5` ... `prec@0.9` and, when any ground truth is empty,
    `gIoU`, `cIoU`, `N-acc`, `T-acc`; all fractions in [0, 1]. Raises ValueError on a
    length mismatch, an empty set or a malformed mask.
    """
    metrics = MaskMetrics()
    try:
        for pred, gt in zip(preds, gts, strict=True):
            metrics.update(pred, gt)
    except ValueError as e:
        raise ValueError(f"cannot evaluate masks after {metrics.count} pairs: {e}") from e
    return metrics.compute()


def size_bucket(stats: SampleStats, image_pixels: int) -> str | None:
    """The SIZE_BUCKETS name of a sample's true mask in an image of `image_pixels` pixels;
    None for a no-target sample."""
    if stats.no_target:
        return None
    fraction = stats.gt_area / image_pixels
    return next(name for name, upper in SIZE_BUCKETS if fraction < upper)


def breakdown(stats: Iterable[SampleStats], groups: Iterable[str | None],
              ) -> dict[str, dict[str, float]]:
    """{group: {"mIoU", "oIoU", "count"}} over the samples of each group (None: in no group),
    groups sorted by name. mIoU and oIoU follow the module's rules."""
    members: dict[str, list[SampleStats]] = {}
    for s, group in zip(stats, groups, strict=True):
        if group is not None:
            members.setdefault(group, []).append(s)
    out = {}
    for group, items in sorted(members.items()):
        union = sum(s.union for s in items)
        out[group] = {"mIoU": math.fsum(s.iou for s in items) / len(items),
                      "oIoU": 1.0 if union == 0 else sum(s.intersection for s in items) / union,
                      "count": len(items)}
    return out
