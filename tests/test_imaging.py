"""Letterbox geometry: forward and inverse agree at the original size."""

import numpy as np
import pytest
import torch
from PIL import Image

from cris_model.imaging import (
    CLIP_MEAN,
    Letterbox,
    letterbox_image,
    letterbox_mask,
    normalize,
    undo_letterbox,
)


@pytest.mark.parametrize(("h", "w"), [(97, 150), (150, 97), (64, 64), (1, 300), (480, 640)])
def test_fit_keeps_aspect_and_centres(h: int, w: int) -> None:
    box = Letterbox.fit(h, w, 96)
    assert max(box.new_h, box.new_w) == 96
    assert abs(box.new_h / box.new_w - h / w) < 0.05 or min(box.new_h, box.new_w) <= 2
    assert box.top == (96 - box.new_h) // 2 and box.left == (96 - box.new_w) // 2


def test_padding_is_clip_mean_and_image_is_inside() -> None:
    img = Image.new("RGB", (150, 75), (255, 0, 0))
    canvas, box = letterbox_image(img, 96)
    assert canvas.shape == (96, 96, 3) and canvas.dtype == np.uint8
    fill = [round(m * 255) for m in CLIP_MEAN]
    assert canvas[0, 0].tolist() == fill and canvas[-1, -1].tolist() == fill
    assert canvas[box.top + box.new_h // 2, 48].tolist() == [255, 0, 0]


def test_mask_round_trip_recovers_original_mask() -> None:
    mask = np.zeros((97, 150), dtype=bool)
    mask[20:70, 30:110] = True
    box = Letterbox.fit(97, 150, 128)
    boxed = letterbox_mask(mask, box)
    assert boxed.shape == (128, 128)
    assert boxed[: box.top].sum() == 0
    back = undo_letterbox(torch.from_numpy(boxed), box) > 0.5
    assert back.shape == (97, 150)
    iou = (back.numpy() & mask).sum() / (back.numpy() | mask).sum()
    assert iou > 0.95


def test_undo_from_quarter_resolution_logits() -> None:
    box = Letterbox.fit(60, 120, 96)
    out = undo_letterbox(torch.ones(24, 24), box)
    assert out.shape == (60, 120)
    assert torch.allclose(out, torch.ones_like(out))


def test_normalize_maps_mean_to_zero() -> None:
    canvas = torch.tensor([round(m * 255) for m in CLIP_MEAN], dtype=torch.uint8)
    x = normalize(canvas.view(3, 1, 1).expand(3, 4, 4))
    assert x.abs().max() < 0.01


def test_fit_rejects_empty_image() -> None:
    with pytest.raises(ValueError, match="positive"):
        Letterbox.fit(0, 10, 96)
