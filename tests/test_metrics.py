"""Metrics on hand-computed cases, streaming vs batch, and against a plain reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cris_model.metrics import (
    MaskMetrics,
    SampleStats,
    breakdown,
    evaluate_masks,
    sample_stats,
    size_bucket,
)

BASE_KEYS = {"mIoU", "oIoU", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9"}
NT_KEYS = {"gIoU", "cIoU", "N-acc", "T-acc"}


def _mask(h: int, w: int, *boxes: tuple[int, int, int, int]) -> np.ndarray:
    """HxW bool mask with the given (top, left, bottom, right) boxes set."""
    m = np.zeros((h, w), dtype=bool)
    for top, left, bottom, right in boxes:
        m[top:bottom, left:right] = True
    return m


def test_perfect_prediction_scores_one_everywhere() -> None:
    gt = _mask(8, 8, (2, 2, 6, 6))
    out = evaluate_masks([gt.copy()], [gt])
    assert set(out) == BASE_KEYS
    assert all(v == 1.0 for v in out.values())


def test_disjoint_prediction_scores_zero() -> None:
    out = evaluate_masks([_mask(8, 8, (0, 0, 2, 2))], [_mask(8, 8, (5, 5, 8, 8))])
    assert all(v == 0.0 for v in out.values())


def test_partial_overlap_known_numbers() -> None:
    # gt 4x4 = 16 px, pred shifted by two columns: intersection 8, union 24 -> IoU 1/3.
    s = sample_stats(_mask(8, 8, (0, 2, 4, 6)), _mask(8, 8, (0, 0, 4, 4)))
    assert s == SampleStats(intersection=8, union=24, pred_area=16, gt_area=16)
    assert s.iou == pytest.approx(1 / 3)


def test_oiou_and_miou_differ_on_a_crafted_set() -> None:
    # Sample A: big object, IoU 90/100; sample B: tiny object missed, IoU 0/1.
    gt_a = _mask(10, 10, (0, 0, 10, 10))
    pred_a = _mask(10, 10, (0, 0, 9, 10))
    gt_b = _mask(3, 3, (1, 1, 2, 2))
    pred_b = np.zeros((3, 3), dtype=bool)
    out = evaluate_masks([pred_a, pred_b], [gt_a, gt_b])
    assert out["mIoU"] == pytest.approx((0.9 + 0.0) / 2)
    assert out["oIoU"] == pytest.approx(90 / 101)
    assert out["prec@0.5"] == 0.5 and out["prec@0.9"] == 0.5
    assert set(out) == BASE_KEYS


def test_breakdown_by_kind_and_size_on_a_hand_made_set() -> None:
    """Four 10x10 samples: targets of 1, 3, 10 and 0 pixels (1%, 3%, 10%, no target)."""
    pairs = [(_mask(10, 10, (0, 0, 1, 1)), _mask(10, 10, (0, 0, 1, 1))),  # 1 px, IoU 1
             (_mask(10, 10, (0, 0, 1, 1)), _mask(10, 10, (0, 0, 1, 3))),  # 3 px, IoU 1/3
             (_mask(10, 10, (5, 0, 10, 2)), _mask(10, 10, (0, 0, 1, 10))),  # 10 px, IoU 0
             (_mask(10, 10), _mask(10, 10))]  # no target, predicted empty: IoU 1
    metrics = MaskMetrics()
    for pred, gt in pairs:
        metrics.update(pred, gt)
    stats = metrics.stats
    assert [size_bucket(s, 100) for s in stats] == ["small", "medium", "large", None]
    by_kind = breakdown(stats, ["spatial", "attribute", "spatial", None])
    assert by_kind == {"attribute": {"mIoU": pytest.approx(1 / 3), "oIoU": pytest.approx(1 / 3),
                                     "count": 1},
                       "spatial": {"mIoU": 0.5, "oIoU": pytest.approx(1 / 21), "count": 2}}
    by_size = breakdown(stats, [size_bucket(s, 100) for s in stats])
    assert list(by_size) == ["large", "medium", "small"]
    assert by_size["large"] == {"mIoU": 0.0, "oIoU": 0.0, "count": 1}
    assert by_size["small"] == {"mIoU": 1.0, "oIoU": 1.0, "count": 1}
    assert breakdown(stats, [None] * 4) == {}
    with pytest.raises(ValueError):
        breakdown(stats, ["spatial"])


def test_precision_threshold_is_inclusive_and_exact() -> None:
    # IoU exactly 7/10 counts for prec@0.7 but not prec@0.8.
    gt = _mask(1, 10, (0, 0, 1, 10))
    pred = _mask(1, 10, (0, 0, 1, 7))
    out = evaluate_masks([pred], [gt])
    assert out["prec@0.7"] == 1.0 and out["prec@0.8"] == 0.0


def test_empty_gt_empty_pred_is_a_hit() -> None:
    empty = np.zeros((5, 7), dtype=bool)
    out = evaluate_masks([empty], [empty.copy()])
    assert set(out) == BASE_KEYS | {"gIoU", "cIoU", "N-acc"}
    assert out["mIoU"] == out["gIoU"] == 1.0
    assert out["oIoU"] == out["cIoU"] == 1.0
    assert out["N-acc"] == 1.0 and out["prec@0.9"] == 1.0


def test_empty_gt_nonempty_pred_is_a_false_alarm() -> None:
    gt = np.zeros((4, 4), dtype=bool)
    pred = _mask(4, 4, (0, 0, 2, 3))
    s = sample_stats(pred, gt)
    assert (s.intersection, s.union, s.iou) == (0, 6, 0.0)
    out = evaluate_masks([pred], [gt])
    assert out["mIoU"] == out["gIoU"] == 0.0
    assert out["N-acc"] == 0.0 and "T-acc" not in out


def test_nonempty_gt_empty_pred_is_a_miss() -> None:
    gt = _mask(4, 4, (1, 1, 3, 3))
    out = evaluate_masks([np.zeros((4, 4), dtype=bool)], [gt])
    assert out["mIoU"] == 0.0 and out["oIoU"] == 0.0
    assert set(out) == BASE_KEYS


def test_mixed_set_with_no_target_samples() -> None:
    # 1) target hit IoU 1/2 (I=2, U=4); 2) target missed (I=0, U=3);
    # 3) no-target answered empty (I=0, U=0); 4) no-target false alarm (I=0, U=5).
    pairs = [
        (_mask(2, 4, (0, 0, 1, 4)), _mask(2, 4, (0, 0, 1, 2))),
        (np.zeros((3, 3), bool), _mask(3, 3, (0, 0, 1, 3))),
        (np.zeros((6, 2), bool), np.zeros((6, 2), bool)),
        (_mask(5, 5, (0, 0, 1, 5)), np.zeros((5, 5), bool)),
    ]
    out = evaluate_masks([p for p, _ in pairs], [g for _, g in pairs])
    assert set(out) == BASE_KEYS | NT_KEYS
    assert out["mIoU"] == out["gIoU"] == pytest.approx((0.5 + 0 + 1 + 0) / 4)
    assert out["oIoU"] == out["cIoU"] == pytest.approx(2 / (4 + 3 + 0 + 5))
    assert out["N-acc"] == 0.5
    assert out["T-acc"] == 0.5
    assert out["prec@0.5"] == 0.5 and out["prec@0.6"] == 0.25


def test_mixed_sizes_accumulate_pixel_counts() -> None:
    big = _mask(40, 30, (0, 0, 20, 30))
    small = _mask(3, 2, (0, 0, 3, 1))
    m = MaskMetrics()
    assert m.update(big, big) == 1.0
    assert m.update(np.zeros((3, 2), bool), small) == 0.0
    assert m.count == 2
    assert m.compute()["oIoU"] == pytest.approx(600 / 603)


def test_integer_masks_are_read_as_nonzero() -> None:
    gt = _mask(4, 4, (0, 0, 2, 2))
    assert sample_stats(gt.astype(np.uint8) * 255, gt).iou == 1.0


@pytest.mark.parametrize(
    ("pred", "gt", "match"),
    [
        (np.zeros((4, 4), bool), np.zeros((4, 5), bool), "differs from ground truth shape"),
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), bool), "threshold it first"),
        (np.zeros((1, 4, 4), bool), np.zeros((4, 4), bool), "2-D"),
    ],
)
def test_malformed_masks_raise(pred: np.ndarray, gt: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sample_stats(pred, gt)


def test_empty_set_and_length_mismatch_raise() -> None:
    with pytest.raises(ValueError, match="no samples"):
        evaluate_masks([], [])
    m = np.zeros((2, 2), bool)
    with pytest.raises(ValueError, match="after 1 pairs"):
        evaluate_masks([m, m], [m])


def _reference(preds: list[np.ndarray], gts: list[np.ndarray]) -> dict[str, float]:
    """Plain loop over the definitions, written independently of the library."""
    ious, inter, union = [], 0, 0
    for p, g in zip(preds, gts, strict=True):
        i = int(np.logical_and(p, g).sum())
        u = int(np.logical_or(p, g).sum())
        inter, union = inter + i, union + u
        ious.append(1.0 if u == 0 else i / u)
    out = {"mIoU": sum(ious) / len(ious), "oIoU": 1.0 if union == 0 else inter / union}
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        out[f"prec@{t}"] = sum(iou >= t - 1e-12 for iou in ious) / len(ious)
    nt = [i for i, g in enumerate(gts) if not g.any()]
    if nt:
        tg = [i for i, g in enumerate(gts) if g.any()]
        out["gIoU"], out["cIoU"] = out["mIoU"], out["oIoU"]
        out["N-acc"] = sum(not preds[i].any() for i in nt) / len(nt)
        if tg:
            out["T-acc"] = sum(bool(preds[i].any()) for i in tg) / len(tg)
    return out


@st.composite
def _pairs(draw: st.DrawFn) -> tuple[list[np.ndarray], list[np.ndarray]]:
    n = draw(st.integers(1, 6))
    preds, gts = [], []
    for _ in range(n):
        h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
        bits = st.lists(st.booleans(), min_size=h * w, max_size=h * w)
        preds.append(np.array(draw(bits), dtype=bool).reshape(h, w))
        gts.append(np.array(draw(bits), dtype=bool).reshape(h, w))
    return preds, gts


@settings(max_examples=150, deadline=None)
@given(_pairs())
def test_matches_reference_and_streaming_equals_batch(
    pairs: tuple[list[np.ndarray], list[np.ndarray]],
) -> None:
    preds, gts = pairs
    batch = evaluate_masks(preds, gts)
    ref = _reference(preds, gts)
    assert set(batch) == set(ref)
    for k, v in ref.items():
        assert batch[k] == pytest.approx(v, abs=1e-12), k
        assert 0.0 <= batch[k] <= 1.0
    stream = MaskMetrics()
    ious = [stream.update(p, g) for p, g in reversed(list(zip(preds, gts, strict=True)))]
    assert stream.compute() == batch
    assert sorted(ious) == sorted(s.iou for s in stream.stats)
