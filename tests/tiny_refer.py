"""A tiny prepared folder (what `cris data prepare` writes) built in a test's tmp_path.

Each image holds a red and a blue square side by side (order random); each square is one
referred object with two sentences: its colour, and its side ("left"/"right").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from cris_model.data.manifest import MANIFEST_SCHEMA
from cris_model.data.masks import rle_from_mask

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
# One untracked epoch of random-init cris_tiny: a trained checkpoint in seconds.
TINY_TRAINING = {"model": {"preset": "cris_tiny", "random_init": True},
                 "train": {"epochs": 1, "batch_size": 4, "tracking": False, "progress": False,
                           "gallery_size": 0}}


def _image(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, dict[str, np.ndarray],
                                                              dict[str, str]]:
    pixels = np.full((h, w, 3), 200, dtype=np.uint8)
    masks, sides = {}, {}
    names = list(COLOURS)
    rng.shuffle(names)
    for i, name in enumerate(names):
        side = rng.integers(12, 20)
        top = rng.integers(0, h - side)
        left = rng.integers(i * w // 2, (i + 1) * w // 2 - side)
        mask = np.zeros((h, w), dtype=bool)
        mask[top : top + side, left : left + side] = True
        pixels[mask] = COLOURS[name]
        masks[name], sides[name] = mask, ("left" if i == 0 else "right")
    return pixels, masks, sides


def make_prepared(root: Path, splits: dict[str, int], seed: int = 0, size: tuple[int, int] = (
        48, 64)) -> Path:
    """Write `root/prepared/<split>.parquet` + summary.json and images; return the folder.

    `splits` maps a split name to its number of images (two referred objects each).
    """
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    out = root / "prepared"
    out.mkdir(parents=True, exist_ok=True)
    ref_id = sent_id = image_id = 0
    for split, count in splits.items():
        rows = []
        for _ in range(count):
            image_id += 1
            pixels, masks, sides = _image(rng, *size)
            file_name = f"img_{image_id:05d}.png"
            Image.fromarray(pixels).save(images / file_name)
            for name, mask in masks.items():
                ref_id += 1
                for sentence in (f"{name} square", f"square on the {sides[name]}"):
                    sent_id += 1
                    rows.append({
                        "dataset": "refcoco", "split": split, "ref_id": ref_id,
                        "sent_id": sent_id, "image_id": image_id, "file_name": file_name,
                        "height": size[0], "width": size[1], "sentence": sentence,
                        "raw": sentence, "tokens": sentence.split(), "ann_ids": [ref_id],
                        "category_id": 1, "mask_rle": rle_from_mask(mask),
                        "bbox": [0.0, 0.0, 1.0, 1.0], "no_target": False,
                    })
        pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA),
                       out / f"{split}.parquet")
    (out / "summary.json").write_text(json.dumps({"image_dir": str(images.resolve())}))
    return out


def tiny_training(root: Path, splits: dict[str, int]) -> tuple[list[str], Path]:
    """(`cris train` arguments less --out for TINY_TRAINING on a prepared folder of `splits`
    written under `root`; that prepared folder)."""
    data = make_prepared(root / "refer", splits)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(TINY_TRAINING))
    return ["train", "--params", str(params), "--data", str(data)], data
