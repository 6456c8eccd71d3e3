"""The training dataset over a prepared folder, its sharded batch sampler and collate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_refer import make_prepared

from cris_model.backbone import tokenize
from cris_model.data.dataset import RefDataset, ShardedBatchSampler, collate, swap_left_right


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("refer"), {"train": 4, "val": 2})


@pytest.mark.parametrize(("text", "expected"), [
    ("man on the left", "man on the right"),
    ("Right dog, left cat", "Left dog, right cat"),
    ("leftmost chair", "rightmost chair"),
    ("bright light", "bright light"),
])
def test_swap_left_right(text: str, expected: str) -> None:
    assert swap_left_right(text) == expected


def test_items_have_documented_shapes_and_types(prepared: Path) -> None:
    ds = RefDataset(prepared, "train", 96, 17)
    assert len(ds) == 8  # 4 images x 2 referred objects
    item = ds[0]
    assert item["image"].shape == (3, 96, 96) and item["image"].dtype == torch.uint8
    assert item["tokens"].shape == (17,) and item["tokens"].dtype == torch.int64
    assert item["mask"].shape == (96, 96) and item["mask"].dtype == torch.float32
    assert 0.0 <= float(item["mask"].min()) and float(item["mask"].max()) <= 1.0
    row = ds.rows.iloc[item["index"]]
    assert (row["ref_id"], row["sent_id"]) == (item["ref_id"], item["sent_id"])
    assert torch.equal(item["tokens"], tokenize([row["sentence"]], 17)[0])
    # the 48x64 image fills the width: mask area scales by (96/64)^2
    area = ds.original_mask(item["index"]).sum() * (96 / 64) ** 2
    assert abs(float(item["mask"].sum()) - area) < 0.1 * area


def test_one_sentence_per_ref_is_seeded_by_epoch(prepared: Path) -> None:
    ds = RefDataset(prepared, "train", 96, 17, seed=3)
    chosen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        first = [ds[i]["sent_id"] for i in range(len(ds))]
        assert first == [ds[i]["sent_id"] for i in range(len(ds))]  # same epoch, same draw
        for i, sent in enumerate(first):
            assert ds.rows.iloc[ds.groups[i]]["sent_id"].tolist().count(sent) == 1
        chosen.update(first)
    assert chosen == set(ds.rows["sent_id"])  # over epochs every sentence is drawn


def test_flip_mirrors_image_and_mask_and_swaps_sides(prepared: Path) -> None:
    plain = RefDataset(prepared, "train", 96, 17, seed=1)
    flip = RefDataset(prepared, "train", 96, 17, seed=1, flip=True)
    flipped = kept = 0
    for epoch in range(3):
        plain.set_epoch(epoch)
        flip.set_epoch(epoch)
        for i in range(len(plain)):
            a, b = plain[i], flip[i]
            assert a["index"] == b["index"]
            if torch.equal(a["image"], b["image"]):
                kept += 1
                continue
            flipped += 1
            assert torch.equal(b["image"], a["image"].flip(-1))
            assert torch.equal(b["mask"], a["mask"].flip(-1))
            sentence = swap_left_right(plain.rows.iloc[a["index"]]["sentence"])
            assert torch.equal(b["tokens"], tokenize([sentence], 17)[0])
    assert flipped > 0 and kept > 0


def test_sentence_mode_visits_every_row_and_blind_drops_text(prepared: Path) -> None:
    ds = RefDataset(prepared, "val", 96, 17, sample="sentence", blind=True)
    assert len(ds) == len(ds.rows) == 8
    assert [ds[i]["index"] for i in range(len(ds))] == list(range(8))
    assert torch.equal(ds[0]["tokens"], tokenize([""], 17)[0])
    assert ds.original_mask(0).shape == (48, 64)


def test_shards_of_ranks_make_the_single_process_batches() -> None:
    single = list(ShardedBatchSampler(10, 4, seed=5))
    ranks = [list(ShardedBatchSampler(10, 4, world_size=2, rank=r, seed=5)) for r in range(2)]
    assert len(single) == 2  # the incomplete last batch is dropped
    for b, batch in enumerate(single):
        assert ranks[0][b] + ranks[1][b] == batch
    sampler = ShardedBatchSampler(10, 4, seed=5)
    sampler.set_epoch(0, skip=1)
    assert list(sampler) == single[1:] and len(sampler) == 1
    sampler.set_epoch(1)
    assert list(sampler) != single
    assert sorted(sum(ShardedBatchSampler(10, 4, shuffle=False, drop_last=False), [])) == list(
        range(10))


def _stretches(order: list[int], groups: list[int]) -> list[int]:
    """Lengths of the maximal stretches of `order` whose items share a group."""
    lengths = [1]
    for a, b in zip(order, order[1:], strict=False):
        if groups[a] == groups[b]:
            lengths[-1] += 1
        else:
            lengths.append(1)
    return lengths


def test_grouped_sampler_lines_up_runs_of_one_group() -> None:
    groups = [i % 5 for i in range(23)]  # five images with 4 or 5 referred objects each
    sampler = ShardedBatchSampler(23, 4, seed=3, drop_last=False, groups=groups, per_group=3)
    order = sum(list(sampler), [])
    assert sorted(order) == list(range(23))  # each object once per epoch
    # runs of up to 3: two per group, ten in all (fewer stretches where two runs of a group meet)
    assert len(_stretches(order, groups)) <= 10
    plain = sum(list(ShardedBatchSampler(23, 4, seed=3, drop_last=False)), [])
    assert len(_stretches(plain, groups)) > 15
    again = ShardedBatchSampler(23, 4, seed=3, drop_last=False, groups=groups, per_group=3)
    assert sum(list(again), []) == order  # seeded by (seed, epoch)
    sampler.set_epoch(1)
    assert sum(list(sampler), []) != order
    ones = ShardedBatchSampler(23, 4, seed=3, drop_last=False, groups=groups, per_group=1)
    assert sum(list(ones), []) == plain  # per_group 1 is the independent order
    with pytest.raises(ValueError, match="groups has 3 entries for 23 items"):
        ShardedBatchSampler(23, 4, groups=[0, 1, 2], per_group=2)


def test_flip_by_image_flips_every_object_of_an_image_alike(prepared: Path) -> None:
    ds = RefDataset(prepared, "train", 96, 17, seed=1, flip=True, flip_by_image=True)
    plain = RefDataset(prepared, "train", 96, 17, seed=1)
    images = ds.image_ids()
    assert len(set(images)) == 4 and len(images) == 8
    flips = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        plain.set_epoch(epoch)
        by_image: dict[int, set[bool]] = {}
        for i in range(len(ds)):
            item, ref = ds[i], plain[i]
            assert item["image_id"] == images[i]
            flipped = not torch.equal(item["image"], ref["image"])
            by_image.setdefault(item["image_id"], set()).add(flipped)
        assert all(len(f) == 1 for f in by_image.values())
        flips |= {f for fs in by_image.values() for f in fs}
    assert flips == {True, False}


def test_sampler_rejects_uneven_or_empty_batches() -> None:
    with pytest.raises(ValueError, match="multiple of world size"):
        ShardedBatchSampler(10, 3, world_size=2)
    with pytest.raises(ValueError, match="no full batch"):
        ShardedBatchSampler(3, 4)


def test_collate_stacks(prepared: Path) -> None:
    ds = RefDataset(prepared, "train", 96, 17)
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 96, 96) and batch["mask"].shape == (2, 96, 96)
    assert batch["ref_id"].dtype == torch.int64 and batch["ref_id"].shape == (2,)


def test_missing_or_wrong_files_are_named(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="testB.parquet"):
        RefDataset(prepared, "testB", 96, 17)
    broken = tmp_path / "prepared"
    broken.mkdir()
    (broken / "train.parquet").write_bytes((prepared / "train.parquet").read_bytes())
    with pytest.raises(FileNotFoundError, match="summary.json"):
        RefDataset(broken, "train", 96, 17)
    images = tmp_path / "images"
    images.mkdir()
    (broken / "summary.json").write_text(json.dumps({"image_dir": str(images)}))
    ds = RefDataset(broken, "train", 96, 17)
    with pytest.raises(FileNotFoundError, match="img_"):
        ds._load(0, False)
    name = ds.rows.iloc[0]["file_name"]
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(images / name)
    with pytest.raises(ValueError, match="manifest says 48x64"):
        ds._load(0, False)


def _plain_collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Reference: stack tensors, ids to int64 vectors."""
    return {k: torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k])
            else torch.tensor([it[k] for it in items], dtype=torch.int64) for k in items[0]}


def _collate_reporting_shm(items: list[dict]) -> tuple[dict[str, torch.Tensor], bool]:
    batch = collate(items)
    return batch, all(t.is_shared() for k, t in batch.items() if k in ("image", "mask"))


def test_collate_matches_plain_stacking_and_fills_shared_memory_in_workers(
        prepared: Path) -> None:
    ds = RefDataset(prepared, "train", 96, 17, flip=True, seed=1)
    items = [ds[i] for i in range(4)]
    batch, plain = collate(items), _plain_collate(items)
    assert batch.keys() == plain.keys()
    for k in batch:
        assert batch[k].dtype == plain[k].dtype and torch.equal(batch[k], plain[k]), k
    assert not batch["image"].is_shared()  # in the main process: ordinary memory
    sampler = ShardedBatchSampler(len(ds), 4, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=1,
                                         collate_fn=_collate_reporting_shm)
    sampler_order = list(sampler)
    for (got, shared), indices in zip(loader, sampler_order, strict=True):
        assert shared  # stacked straight into shared memory inside the worker
        want = _plain_collate([ds[i] for i in indices])
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="'name' is a str"):
        collate([{"image": torch.zeros(2), "name": "x"}])


def test_dataset_loads_the_tokenizer_before_workers_fork(prepared: Path) -> None:
    from cris_model.backbone import _tokenizer

    _tokenizer.cache_clear()
    RefDataset(prepared, "val", 96, 17, sample="sentence")
    assert _tokenizer.cache_info().currsize == 1  # inherited by every forked worker


def test_cache_gives_the_same_items_and_reads_each_file_once(tmp_path: Path) -> None:
    data = make_prepared(tmp_path, {"train": 4, "val": 2})
    plain = RefDataset(data, "train", 96, 17, flip=True, seed=2)
    cached = RefDataset(data, "train", 96, 17, flip=True, seed=2, cache=True)
    expected = {}
    for epoch in range(3):
        plain.set_epoch(epoch)
        expected[epoch] = [plain[i] for i in range(len(plain))]
    cached.set_epoch(0)
    first = [cached[i] for i in range(len(cached))]
    image_dir = cached.image_dir
    for path in image_dir.iterdir():  # every later item must come from memory
        path.unlink()
    for epoch in range(3):
        cached.set_epoch(epoch)
        items = first if epoch == 0 else [cached[i] for i in range(len(cached))]
        for got, want in zip(items, expected[epoch], strict=True):
            assert got.keys() == want.keys()
            for key, value in want.items():
                same = torch.equal(got[key], value) if torch.is_tensor(value) else (
                    got[key] == value)
                assert same, (epoch, key)
    with pytest.raises(FileNotFoundError):
        plain[0]
