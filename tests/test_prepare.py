"""`cris data prepare` on the hand-written fixture: counts, masks, summary, atomic output."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures.refer_fixture import ANNOTATIONS, EXPECTED_COUNTS, IMAGE_DIR, write_refer_fixture
from pycocotools import mask as mask_utils

from cris_model.cli import main
from cris_model.data.manifest import (
    MANIFEST_SCHEMA,
    check_official_counts,
    prepare_dataset,
    read_manifest,
)
from cris_model.data.masks import mask_from_rle
from cris_model.data.refer import OFFICIAL_REF_COUNTS

SPLIT_BY = {"refcoco": "unc", "refcocog": "umd", "grefcoco": "unc"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_refer_fixture(tmp_path_factory.mktemp("refer"))


@pytest.fixture(scope="module")
def prepared(root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("prepared")
    out = {}
    for dataset, split_by in SPLIT_BY.items():
        out[dataset] = base / dataset
        prepare_dataset(root, dataset, split_by, out[dataset])
    return out


def _frame(folder: Path) -> pd.DataFrame:
    return pd.concat([read_manifest(p) for p in sorted(folder.glob("*.parquet"))],
                     ignore_index=True)


def _reference_mask(ann_ids: list[int], h: int, w: int) -> np.ndarray:
    """The union of the annotations' masks, decoded by pycocotools part by part."""
    mask = np.zeros((h, w), bool)
    for ann_id in ann_ids:
        seg = ANNOTATIONS[ann_id][4]
        if isinstance(seg, list):
            parts = mask_utils.frPyObjects([p for p in seg if len(p) >= 6], h, w)
            mask |= np.any(mask_utils.decode(parts), axis=2)
        elif isinstance(seg["counts"], list):
            mask |= mask_utils.decode(mask_utils.frPyObjects(seg, h, w)).astype(bool)
        else:
            rle = {"size": [h, w], "counts": seg["counts"].encode()}
            mask |= mask_utils.decode(rle).astype(bool)
    return mask


@pytest.mark.parametrize("dataset", sorted(SPLIT_BY))
def test_cli_counts_per_split(root: Path, tmp_path: Path, dataset: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["data", "prepare", "--root", str(root), "--dataset", dataset,
               "--split-by", SPLIT_BY[dataset], "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert printed == summary
    expected = EXPECTED_COUNTS[dataset]
    assert sorted(p.stem for p in out.glob("*.parquet")) == sorted(expected)
    for split, (refs, sentences, images) in expected.items():
        df = read_manifest(out / f"{split}.parquet")
        assert (df["ref_id"].nunique(), len(df), df["image_id"].nunique()) == (
            refs, sentences, images)
        assert set(df["split"]) == {split} and set(df["dataset"]) == {dataset}
        counts = summary["splits"][split]
        assert (counts["refs"], counts["sentences"], counts["images"]) == expected[split]
    assert summary["dataset"] == dataset and summary["split_by"] == SPLIT_BY[dataset]
    assert summary["root"] == str(root.absolute())
    assert summary["image_dir"] == str((root / IMAGE_DIR).absolute())
    assert summary["official_counts_checked"] is False
    assert summary["manifest_version"] == 1 and summary["created"].startswith("20")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("dataset", sorted(SPLIT_BY))
def test_masks_equal_pycocotools_decode(prepared: dict[str, Path], dataset: str) -> None:
    df = _frame(prepared[dataset])
    for row in df.itertuples():
        mask = mask_from_rle(row.mask_rle, row.height, row.width)
        expected = _reference_mask(list(row.ann_ids), row.height, row.width)
        np.testing.assert_array_equal(mask, expected, err_msg=f"sent_id {row.sent_id}")
        assert row.no_target == (len(row.ann_ids) == 0)
        assert row.no_target or mask.any()


def test_rows_of_refcoco(prepared: dict[str, Path]) -> None:
    df = _frame(prepared["refcoco"]).set_index("sent_id")
    row = df.loc[11]
    assert (row.ref_id, row.image_id, row.height, row.width) == (1, 101, 30, 40)
    assert row.file_name == "COCO_train2014_000000000101.jpg"
    assert (row.sentence, row.raw) == ("man on the left", "Man on the LEFT.")
    assert list(row.tokens) == ["man", "on", "the", "left"]
    assert list(row.ann_ids) == [1001] and row.category_id == 1
    assert list(row.bbox) == [2.0, 2.0, 10.0, 25.0]
    assert df.loc[20, "category_id"] == 44 and df.loc[20, "split"] == "testB"


def test_rows_of_grefcoco(prepared: dict[str, Path]) -> None:
    df = _frame(prepared["grefcoco"]).set_index("sent_id")
    multi = df.loc[41]
    assert list(multi.ann_ids) == [1001, 1002] and multi.category_id == 1
    assert list(multi.bbox) == [2.0, 2.0, 34.0, 25.0]  # union of [2,2,10,25] and [20,8,16,16]
    assert not multi.no_target
    for sent_id, image_id, shape in ((43, 101, (30, 40)), (46, 103, (32, 32))):
        empty = df.loc[sent_id]
        assert empty.no_target and empty.category_id == -1 and list(empty.ann_ids) == []
        assert empty.image_id == image_id and (empty.height, empty.width) == shape
        assert list(empty.bbox) == [0.0, 0.0, 0.0, 0.0]
        assert not mask_from_rle(empty.mask_rle, empty.height, empty.width).any()
    summary = json.loads((prepared["grefcoco"] / "summary.json").read_text())
    assert summary["splits"]["train"]["no_target_sentences"] == 1
    assert summary["splits"]["val"]["no_target_sentences"] == 0


def test_sentence_kinds_side_file_fills_the_kind_column(root: Path, tmp_path: Path) -> None:
    prepare_dataset(root, "refcoco", "unc", tmp_path / "none")
    assert _frame(tmp_path / "none")["kind"].isna().all()
    copy = tmp_path / "root"
    shutil.copytree(root, copy)
    (copy / "refcoco" / "sentence_kinds.json").write_text(json.dumps({"11": "spatial",
                                                                       "20": "attribute"}))
    out = tmp_path / "kinds"
    summary = prepare_dataset(copy, "refcoco", "unc", out)
    df = _frame(out).set_index("sent_id")
    assert (df.loc[11, "kind"], df.loc[20, "kind"]) == ("spatial", "attribute")
    assert df.drop(index=[11, 20])["kind"].isna().all()
    assert sum(s["sentences_with_kind"] for s in summary["splits"].values()) == 2
    (copy / "refcoco" / "sentence_kinds.json").write_text(json.dumps({"x": 3}))
    with pytest.raises(ValueError, match=r"sentence_kinds.json: entry 'x'"):
        prepare_dataset(copy, "refcoco", "unc", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_schema_of_written_files(prepared: dict[str, Path]) -> None:
    import pyarrow.parquet as pq

    for path in prepared["refcoco"].glob("*.parquet"):
        assert pq.read_schema(path).remove_metadata() == MANIFEST_SCHEMA


def test_skipped_polygon_part_warns_and_is_counted(root: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cris_model.data.manifest"):
        summary = prepare_dataset(root, "refcocog", "umd", tmp_path / "g")
    assert summary["skipped_polygon_parts"] == 1
    assert "annotation 1007: skipped 1 polygon part(s)" in caplog.text


def test_rerun_replaces_earlier_output(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_dataset(root, "refcocog", "umd", out)
    (out / "stale.parquet").write_bytes(b"old")
    prepare_dataset(root, "refcoco", "unc", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "summary.json", "testA.parquet", "testB.parquet", "train.parquet", "val.parquet"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_refuses_to_replace_a_foreign_folder(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace"):
        prepare_dataset(root, "refcoco", "unc", out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_image_dir_option(root: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere"
    shutil.copytree(root / IMAGE_DIR, moved)
    copy_root = tmp_path / "root"
    shutil.copytree(root / "refcoco", copy_root / "refcoco")
    summary = prepare_dataset(copy_root, "refcoco", "unc", tmp_path / "out", image_dir=moved)
    assert summary["image_dir"] == str(moved.absolute())
    with pytest.raises(FileNotFoundError, match="images folder not found"):
        prepare_dataset(copy_root, "refcoco", "unc", tmp_path / "out2")


def test_official_counts_rule() -> None:
    full = dict(OFFICIAL_REF_COUNTS[("refcoco", "unc")])
    assert check_official_counts("refcoco", "unc", full) is True
    with pytest.raises(ValueError, match="train 42403 != 42404"):
        check_official_counts("refcoco", "unc", {**full, "train": 42403})
    assert check_official_counts("refcoco", "unc", {"train": 2, "val": 2, "testA": 1,
                                                    "testB": 1}) is False
    assert check_official_counts("refcoco", "unc", {"train": 42404, "val": 3811}) is False
    assert check_official_counts("grefcoco", "unc", {"train": 5}) is False
    umd = dict(OFFICIAL_REF_COUNTS[("refcocog", "umd")])
    assert check_official_counts("refcocog", "umd", umd) is True
    with pytest.raises(ValueError, match="test 5000 != 5023"):
        check_official_counts("refcocog", "umd", {**umd, "test": 5000})


def test_official_counts_applied_by_prepare(root: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    key = ("refcoco", "unc")
    monkeypatch.setitem(OFFICIAL_REF_COUNTS, key, {"train": 2, "val": 2, "testA": 1, "testB": 1})
    assert prepare_dataset(root, "refcoco", "unc", tmp_path / "a")["official_counts_checked"]
    monkeypatch.setitem(OFFICIAL_REF_COUNTS, key, {"train": 3, "val": 1, "testA": 1, "testB": 1})
    with pytest.raises(ValueError, match="train 2 != 3, val 2 != 1"):
        prepare_dataset(root, "refcoco", "unc", tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_read_manifest_errors(prepared: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "none.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        read_manifest(bad)
    partial = tmp_path / "partial.parquet"
    read_manifest(prepared["refcoco"] / "val.parquet").drop(columns=["mask_rle"]).to_parquet(
        partial)
    with pytest.raises(ValueError, match=r"lacks columns \['mask_rle'\]"):
        read_manifest(partial)
    older = tmp_path / "older.parquet"  # written before the optional `kind` column existed
    read_manifest(prepared["refcoco"] / "val.parquet").drop(columns=["kind"]).to_parquet(older)
    assert read_manifest(older)["kind"].isna().all()
