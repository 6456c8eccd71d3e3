"""Torch dataset over a prepared manifest folder (`cris data prepare`) and its batch sampler.

Training draws one random sentence per referred object per epoch, as the reference does; the
draw (and the optional flip) comes from a generator seeded by (seed, epoch, ref index), so a
resumed run and every DDP rank see exactly the same samples. Evaluation visits every sentence.
Images travel as uint8 (normalised on the device, where it is cheap).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, default_collate

from cris_model.backbone import tokenize
from cris_model.data.manifest import read_manifest
from cris_model.data.masks import mask_from_rle
from cris_model.imaging import (
    Letterbox,
    letterbox_image,
    letterbox_mask_u8,
    load_image,
    mask_to_float,
)

_SIDE = re.compile(r"\b(left|right)", flags=re.IGNORECASE)


def swap_left_right(sentence: str) -> str:
    """The phrase as seen in a horizontally flipped image: 'left' <-> 'right' (keeps case)."""

    def _swap(m: re.Match[str]) -> str:
        word = m.group(1)
        other = "right" if word.lower() == "left" else "left"
        return other.capitalize() if word[0].isupper() else other

    return _SIDE.sub(_swap, sentence)


def open_split(data_dir: Path, split: str) -> tuple[pd.DataFrame, Path]:
    """(rows of `<data_dir>/<split>.parquet`, absolute image folder from summary.json)."""
    summary = data_dir / "summary.json"
    if not summary.is_file():
        raise FileNotFoundError(f"{summary}: prepared folder has no summary.json")
    try:
        image_dir = Path(json.loads(summary.read_text(encoding="utf-8"))["image_dir"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{summary}: no 'image_dir' entry") from e
    rows = read_manifest(data_dir / f"{split}.parquet")
    if rows.empty:
        raise ValueError(f"{data_dir / f'{split}.parquet'}: manifest is empty")
    return rows.reset_index(drop=True), image_dir


def read_image(image_dir: Path, row: Any) -> Image.Image:
    """A manifest row's image as 8-bit RGB, in the frame whose size the manifest records.

    Decoded by `cris_model.imaging.load_image` (its mode and EXIF policy): as stored, unless
    only the upright frame has the recorded height x width. Raises FileNotFoundError when the
    file is missing, ValueError when it cannot be decoded, is larger than PIL's
    decompression-bomb limit, or its size differs from the manifest's height x width.
    """
    path = Path(image_dir) / str(row["file_name"])
    h, w = int(row["height"]), int(row["width"])
    image = load_image(path, recorded=(h, w))
    if (image.height, image.width) != (h, w):
        raise ValueError(f"{path}: image is {image.height}x{image.width}, manifest says {h}x{w}")
    return image


def load_canvas(image_dir: Path, row: Any, size: int) -> tuple[np.ndarray, Letterbox]:
    """A manifest row's image, letterboxed: (size x size x 3 uint8, geometry)."""
    return letterbox_image(read_image(image_dir, row), size)


class RefDataset(Dataset):
    """Items of one split: dict(image 3xSxS uint8, tokens L int64, mask SxS float32 in [0,1],
    index, ref_id, sent_id, image_id), S = input_size.

    `sample="ref"` (training): one item per referred object, a random sentence each epoch
    (call `set_epoch`), optional flip with probability 0.5, drawn per image with
    `flip_by_image` (so the objects of one image can share its encoding).
    `sample="sentence"` (evaluation): one item per manifest row, no randomness. `blind`
    replaces every phrase by "" (the language-blind baseline). `cache` keeps each image's
    letterboxed pixels, each referred object's mask (uint8) and each phrase's tokens in
    memory after their first use, so later epochs decode nothing; items are the same either
    way (S x S x 4 bytes per image and S x S per object: 80 MB for the demo's train split at
    128 px).
    """

    def __init__(
        self, data_dir: Path, split: str, input_size: int, word_len: int, *,
        sample: str = "ref", flip: bool = False, seed: int = 0, blind: bool = False,
        cache: bool = False, flip_by_image: bool = False,
    ) -> None:
        if sample not in ("ref", "sentence"):
            raise ValueError(f"sample must be 'ref' or 'sentence', got {sample!r}")
        self.rows, self.image_dir = open_split(Path(data_dir), split)
        self.records = self.rows.to_dict("records")  # plain rows: far cheaper than .iloc
        self.cache = cache
        self._images: dict[str, tuple[np.ndarray, Letterbox]] = {}
        self._masks: dict[int, np.ndarray] = {}
        self._tokens: dict[str, torch.Tensor] = {}
        self.split, self.input_size, self.word_len = split, input_size, word_len
        self.sample, self.flip, self.seed, self.blind, self.epoch = sample, flip, seed, blind, 0
        self.flip_by_image = flip_by_image
        if sample == "ref":
            groups = self.rows.groupby("ref_id", sort=False).indices
            self.groups = [np.asarray(ix) for ix in groups.values()]
        else:
            self.groups = [np.asarray([i]) for i in range(len(self.rows))]
        tokenize([""], word_len)  # load the BPE vocabulary once: forked workers inherit it

    def __len__(self) -> int:
        return len(self.groups)

    def set_epoch(self, epoch: int) -> None:
        """Choose which sentence each referred object shows this epoch."""
        self.epoch = epoch

    def letterbox(self, index: int) -> Letterbox:
        """Geometry of manifest row `index` inside the input canvas."""
        row = self.records[index]
        return Letterbox.fit(int(row["height"]), int(row["width"]), self.input_size)

    def original_mask(self, index: int) -> np.ndarray:
        """Ground truth of manifest row `index` at the original image size (HxW bool)."""
        row = self.records[index]
        return mask_from_rle(row["mask_rle"], int(row["height"]), int(row["width"])).astype(bool)

    def __getitem__(self, item: int) -> dict[str, Any]:
        rows = self.groups[item]
        flip = False
        index = int(rows[0])
        if self.sample == "ref":
            rng = np.random.default_rng([self.seed, self.epoch, item])
            index = int(rows[rng.integers(len(rows))])
            if self.flip_by_image:  # one draw per image, shared by its referred objects
                image_id = int(self.records[index]["image_id"])
                rng = np.random.default_rng([self.seed, self.epoch, image_id, 1])
            flip = self.flip and bool(rng.random() < 0.5)
        return self._load(index, flip)

    def image_ids(self) -> list[int]:
        """The image of each item (what `ShardedBatchSampler` groups by)."""
        return [int(self.records[int(rows[0])]["image_id"]) for rows in self.groups]

    def _pixels(self, index: int, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(letterboxed image SxSx3 uint8, its object's mask SxS uint8), cached with `cache`."""
        name, ref = str(row["file_name"]), int(row["ref_id"])
        image = self._images.get(name) or load_canvas(self.image_dir, row, self.input_size)
        mask = self._masks.get(ref)
        if mask is None:
            mask = letterbox_mask_u8(self.original_mask(index), image[1])
        if self.cache:
            self._images[name], self._masks[ref] = image, mask
        return image[0], mask

    def _tokenize(self, sentence: str) -> torch.Tensor:
        tokens = self._tokens.get(sentence)
        if tokens is None:
            tokens = tokenize([sentence], self.word_len)[0]
            if self.cache:
                self._tokens[sentence] = tokens
        return tokens.clone()

    def _load(self, index: int, flip: bool) -> dict[str, Any]:
        row = self.records[index]
        canvas, mask8 = self._pixels(index, row)
        sentence = "" if self.blind else str(row["sentence"])
        if flip:
            canvas, mask8 = canvas[:, ::-1], mask8[:, ::-1]
            sentence = swap_left_right(sentence)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1))),
            "tokens": self._tokenize(sentence),
            "mask": torch.from_numpy(mask_to_float(mask8)),
            "index": index,
            "ref_id": int(row["ref_id"]),
            "sent_id": int(row["sent_id"]),
            "image_id": int(row["image_id"]),
        }


class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches of a shuffled epoch, each split into equal per-rank slices.

    Rank r gets items [r*b, (r+1)*b) of every global batch (b = batch_size / world_size), so
    N ranks together see exactly the batches one process would. The order depends only on
    (seed, epoch); `set_epoch(epoch, skip=k)` starts past the first k batches (resume).
    The last incomplete global batch is dropped when `drop_last`. Given `groups` (each item's
    group, e.g. its image) and `per_group` > 1, a shuffled epoch lines items up in runs of up
    to `per_group` items of one group, the runs in random order.
    """

    def __init__(
        self, num_items: int, batch_size: int, *, world_size: int = 1, rank: int = 0,
        seed: int = 0, shuffle: bool = True, drop_last: bool = True,
        groups: Sequence[int] | None = None, per_group: int = 1,
    ) -> None:
        if batch_size <= 0 or batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} must be a positive multiple of world size {world_size}"
            )
        if drop_last and num_items < batch_size:
            raise ValueError(f"{num_items} items make no full batch of {batch_size}")
        self.num_items, self.batch_size, self.world_size, self.rank = (
            num_items, batch_size, world_size, rank)
        if groups is not None and len(groups) != num_items:
            raise ValueError(f"groups has {len(groups)} entries for {num_items} items")
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.groups, self.per_group = groups, per_group
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order and how many of its leading batches to skip."""
        self.epoch, self.skip = epoch, skip

    def _in_runs(self, order: list[int], gen: torch.Generator) -> list[int]:
        """`order` regrouped: runs of up to per_group items of one group, in random order."""
        assert self.groups is not None
        by_group: dict[int, list[int]] = {}
        for i in order:
            by_group.setdefault(int(self.groups[i]), []).append(i)
        k = self.per_group
        runs = [items[j:j + k] for items in by_group.values() for j in range(0, len(items), k)]
        return [i for r in torch.randperm(len(runs), generator=gen).tolist() for i in runs[r]]

    def _num_global(self) -> int:
        full, rest = divmod(self.num_items, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __len__(self) -> int:
        return max(0, self._num_global() - self.skip)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_items, generator=gen).tolist()
            if self.groups is not None and self.per_group > 1:
                order = self._in_runs(order, gen)
        else:
            order = list(range(self.num_items))
        per_rank = self.batch_size // self.world_size
        for b in range(self.skip, self._num_global()):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            shard = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
            if shard:
                yield shard


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack a list of dataset items into a batch dict of tensors (ids as int64 vectors).

    torch's `default_collate` does exactly this, and inside a loader worker it stacks straight
    into shared memory, which saves copying every batch (~75 MB at 64 x 416 px) once more.
    """
    for key, value in items[0].items():
        if not (torch.is_tensor(value) or isinstance(value, int)):
            raise ValueError(f"collate: item field {key!r} is a {type(value).__name__}, "
                             "expected a tensor or an int")
    return default_collate(items)
