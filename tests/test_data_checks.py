"""Data validation (data_checks): a clean prepared folder passes; each broken input fails the
expectation that names its problem, through the real `cris data validate` command."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from cris_model.cli import main
from cris_model.data.masks import rle_run_lengths
from data_checks import ValidationConfig, ValidationReport, check_specs, validate_prepared
from data_checks.images import probe_images

H, W = 24, 32  # every fixture image is H x W
SPLIT_IMAGES = {"train": [1, 2, 3, 4], "val": [5, 6], "testA": [7], "testB": [8]}


def _rle(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def _box_mask(x: int, y: int, w: int, h: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y : y + h, x : x + w] = 1
    return mask


def _image_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def _rows(split: str, image_ids: list[int]) -> pd.DataFrame:
    """Two referred objects per image, two sentences each (RefCOCO-like rows)."""
    rows = []
    for image_id in image_ids:
        for k in range(2):
            ref_id = image_id * 10 + k
            x, y, w, h = 2 + 10 * k, 3, 8, 12
            for s in range(2):
                sentence = ["man on the left", "red shirt guy"][s] if k == 0 else f"object {s}"
                rows.append({
                    "ref_id": ref_id, "sent_id": ref_id * 10 + s, "image_id": image_id,
                    "file_name": _image_name(image_id), "height": H, "width": W,
                    "sentence": sentence, "ann_ids": [ref_id], "category_id": 1,
                    "mask_rle": _rle(_box_mask(x, y, w, h)),
                    "bbox": [float(x), float(y), float(w), float(h)], "no_target": False,
                    "split": split, "dataset": "refcoco", "raw": sentence.capitalize(),
                })
    return pd.DataFrame(rows)


def _write_jpeg(path: Path, height: int = H, width: int = W) -> None:
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


def _write_folder(root: Path, frames: dict[str, pd.DataFrame], *,
                  dataset: str = "refcoco", split_by: str = "unc") -> Path:
    """Write D/<split>.parquet, D/summary.json and the images the frames name."""
    out, images = root / "prepared", root / "images"
    out.mkdir(parents=True)
    images.mkdir(exist_ok=True)
    for split, frame in frames.items():
        frame.to_parquet(out / f"{split}.parquet")
        for name in frame["file_name"].dropna().unique():
            if not (images / name).exists():
                _write_jpeg(images / name)
    summary = {"dataset": dataset, "split_by": split_by, "root": str(root),
               "image_dir": str(images), "splits": {s: {"rows": len(f)} for s, f in frames.items()}}
    (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return out


def _clean_frames() -> dict[str, pd.DataFrame]:
    return {split: _rows(split, ids) for split, ids in SPLIT_IMAGES.items()}


def _validate_cli(folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["data", "validate", str(folder)])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def _set(split: str, row: int, column: str, value: object) -> Callable[[dict], None]:
    def edit(frames: dict[str, pd.DataFrame]) -> None:
        frame = frames[split]
        if isinstance(value, (list, tuple)):
            frame[column] = frame[column].astype(object)
            frame.at[row, column] = list(value)
        else:
            frame.loc[row, column] = value
    return edit


def _set_column(split: str, column: str, value: object) -> Callable[[dict], None]:
    def edit(frames: dict[str, pd.DataFrame]) -> None:
        frames[split][column] = value
    return edit


def _drop_column(column: str) -> Callable[[dict], None]:
    def edit(frames: dict[str, pd.DataFrame]) -> None:
        frames["val"] = frames["val"].drop(columns=[column])
    return edit


def _share_image(frames: dict[str, pd.DataFrame]) -> None:
    frames["val"].loc[0, ["image_id", "file_name"]] = [1, _image_name(1)]


def _rename_split(frames: dict[str, pd.DataFrame]) -> None:
    frame = frames.pop("testB")
    frame["split"] = "bogus"
    frames["bogus"] = frame


def _null_image_id(frames: dict[str, pd.DataFrame]) -> None:
    frames["train"]["image_id"] = frames["train"]["image_id"].astype("Int64")
    frames["train"].loc[3, "image_id"] = pd.NA


FRAME_CASES = {
    "bbox_outside_image": (_set("train", 0, "bbox", [20.0, 3.0, 30.0, 12.0]), "bbox_inside_image"),
    "empty_target_mask": (_set("val", 1, "mask_rle", _rle(np.zeros((H, W)))),
                          "mask_area_positive_for_targets"),
    "mask_rle_of_other_size": (_set("val", 2, "mask_rle", _rle(np.ones((H, W + 1)))),
                               "mask_rle_valid"),
    "empty_sentence": (_set("testA", 0, "sentence", ""), "sentence_not_empty"),
    "blank_sentence": (_set("testA", 1, "sentence", "   "), "sentence_not_empty"),
    "null_in_required_column": (_null_image_id, "image_id_not_null"),
    "null_mask_rle": (_set("train", 2, "mask_rle", None), "mask_rle_not_null"),
    "unknown_split_name": (_set("val", 0, "split", "validation"), "split_names_expected"),
    "unknown_split_file": (_rename_split, "split_files_expected"),
    "image_shared_train_val": (_share_image, "no_image_shared_with_train"),
    "sentence_over_token_limit": (_set("train", 1, "sentence", "word " * 80),
                                  "sentence_within_token_limit"),
    "missing_required_column": (_drop_column("mask_rle"), "required_columns_present"),
    "duplicate_sent_id": (_set("val", 1, "sent_id", 500), "sent_id_unique"),
    "wrong_recorded_size": (_set("val", 0, "height", H + 8), "image_size_matches"),
    "sentence_not_text": (_set_column("val", "sentence", 7), "sentence_type"),
    "fractional_height": (_set_column("testB", "height", 24.5), "height_type"),
    "file_name_escapes_image_dir": (_set("val", 0, "file_name", f"../{_image_name(5)}"),
                                    "file_name_relative"),
}


@pytest.mark.parametrize("case", sorted(FRAME_CASES))
def test_broken_manifest_is_rejected(case: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    edit, check = FRAME_CASES[case]
    frames = _clean_frames()
    edit(frames)
    rc, out = _validate_cli(_write_folder(tmp_path, frames), capsys)
    assert rc == 1
    assert f"FAIL  {check} " in out
    assert "Traceback" not in out


def _missing_image(folder: Path) -> None:
    (folder.parent / "images" / _image_name(6)).unlink()


def _corrupt_jpeg(folder: Path) -> None:
    (folder.parent / "images" / _image_name(2)).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 20)


def _truncated_jpeg(folder: Path) -> None:
    path = folder.parent / "images" / _image_name(3)
    _write_jpeg(path, 240, 320)
    path.write_bytes(path.read_bytes()[:2000])


def _wrong_size_image(folder: Path) -> None:
    _write_jpeg(folder.parent / "images" / _image_name(7), H, W + 4)


def _no_summary(folder: Path) -> None:
    (folder / "summary.json").unlink()


def _no_parquet(folder: Path) -> None:
    for path in folder.glob("*.parquet"):
        path.unlink()


def _corrupt_parquet(folder: Path) -> None:
    (folder / "val.parquet").write_bytes(b"PAR1 garbage")


def _summary_without_image_dir(folder: Path) -> None:
    summary = json.loads((folder / "summary.json").read_text())
    del summary["image_dir"]
    (folder / "summary.json").write_text(json.dumps(summary))


def _image_dir_gone(folder: Path) -> None:
    summary = json.loads((folder / "summary.json").read_text())
    summary["image_dir"] = str(folder.parent / "nowhere")
    (folder / "summary.json").write_text(json.dumps(summary))


FOLDER_CASES = {
    "missing_image_file": (_missing_image, "image_exists", _image_name(6)),
    "corrupt_jpeg": (_corrupt_jpeg, "image_decodes", _image_name(2)),
    "truncated_jpeg": (_truncated_jpeg, "image_decodes", "truncated"),
    "image_of_other_size": (_wrong_size_image, "image_size_matches", f"{H}x{W + 4}"),
    "no_summary_json": (_no_summary, "summary_present", "summary.json"),
    "summary_without_image_dir": (_summary_without_image_dir, "summary_present", "image_dir"),
    "no_parquet": (_no_parquet, "manifests_present", "no *.parquet"),
    "corrupt_parquet": (_corrupt_parquet, "manifests_present", "val.parquet"),
    "image_dir_missing": (_image_dir_gone, "image_dir_exists", "nowhere"),
}


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_broken_folder_is_rejected(case: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    edit, check, detail = FOLDER_CASES[case]
    folder = _write_folder(tmp_path, _clean_frames())
    edit(folder)
    rc, out = _validate_cli(folder, capsys)
    assert rc == 1
    assert f"FAIL  {check} " in out
    assert detail in out
    assert "Traceback" not in out


def test_clean_folder_passes_every_check(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _validate_cli(_write_folder(tmp_path, _clean_frames()), capsys)
    assert rc == 0, out
    assert "FAIL" not in out and "SKIP" not in out
    assert "PASSED" in out


def test_relative_image_dir_resolves_against_the_folder(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path, _clean_frames())
    summary = json.loads((folder / "summary.json").read_text())
    summary["image_dir"] = "../images"
    (folder / "summary.json").write_text(json.dumps(summary))
    report = validate_prepared(folder)
    assert report.success, report.render()
    assert report.check("image_exists").observed == {"unexpected_count": 0, "element_count": 32}


def test_report_exposes_every_spec_with_metadata(tmp_path: Path) -> None:
    frames = _clean_frames()
    _set("train", 0, "bbox", [20.0, 3.0, 30.0, 12.0])(frames)
    report = validate_prepared(_write_folder(tmp_path, frames))
    spec_names = [s.name for s in check_specs()]
    names = [c.name for c in report.checks]
    assert len(set(spec_names)) == len(spec_names)
    assert names == ["summary_present", "manifests_present", "image_dir_exists", *spec_names]
    assert [c.name for c in report.failed] == ["bbox_inside_image"]
    failed = report.check("bbox_inside_image")
    meta = failed.metadata()
    assert meta["actual"] == {"unexpected_count": 1, "element_count": 32}
    assert meta["expected"] == "overflow <= 1.0 px"
    assert failed.examples == [{"row": "train.parquet#0", "bbox_overflow": 18.0,
                                "bbox": [20.0, 3.0, 30.0, 12.0], "width": W, "height": H}]
    assert json.loads(json.dumps(report.to_dict()))["success"] is False
    assert report.info["rows"] == {"testA": 4, "testB": 4, "train": 16, "val": 8}


def test_missing_column_names_the_column_and_file(tmp_path: Path) -> None:
    frames = _clean_frames()
    _drop_column("bbox")(frames)
    report = validate_prepared(_write_folder(tmp_path, frames))
    check = report.check("required_columns_present")
    assert check.status == "failed"
    assert check.observed["missing"] == ["bbox"]
    assert check.examples == [{"file": "val.parquet", "missing": ["bbox"]}]
    skipped = report.check("bbox_inside_image")
    assert skipped.status == "skipped"
    assert skipped.observed == "not evaluated: needs column 'bbox' (unavailable)"
    assert report.check("image_exists").status == "passed"


def test_token_limit_is_a_parameter_and_truncation_is_info(tmp_path: Path) -> None:
    frames = _clean_frames()
    sentence = "the tall man standing on the far left of the picture"
    _set("train", 0, "sentence", sentence)(frames)
    folder = _write_folder(tmp_path, frames)
    report = validate_prepared(folder, ValidationConfig(word_len=8))
    assert report.success
    assert report.info["truncated_at_word_len"] == "1 sentences exceed word_len 8"
    strict = validate_prepared(folder, ValidationConfig(token_limit=10))
    assert [c.name for c in strict.failed] == ["sentence_within_token_limit"]
    reference = int((open_clip.tokenize([sentence]) != 0).sum())  # with start/end tokens
    assert reference == 13
    assert strict.check("sentence_within_token_limit").examples[0]["token_count"] == reference


def _grefcoco_frames(no_target_mask: np.ndarray) -> dict[str, pd.DataFrame]:
    frames = _clean_frames()
    row = frames["val"].iloc[0].to_dict() | {
        "sent_id": 999, "ref_id": 99, "sentence": "the giraffe", "ann_ids": [-1],
        "category_id": None, "bbox": None, "no_target": True, "mask_rle": _rle(no_target_mask),
    }
    frames["val"] = pd.concat([frames["val"], pd.DataFrame([row])], ignore_index=True)
    return frames


def test_no_target_rows_need_an_empty_mask(tmp_path: Path) -> None:
    ok = validate_prepared(_write_folder(tmp_path / "a", _grefcoco_frames(np.zeros((H, W))),
                                         dataset="grefcoco"))
    assert ok.success, ok.render()
    bad = validate_prepared(_write_folder(tmp_path / "b", _grefcoco_frames(_box_mask(0, 0, 4, 4)),
                                          dataset="grefcoco"))
    assert [c.name for c in bad.failed] == ["mask_empty_for_no_target"]


def test_refcocog_umd_rejects_unc_split_names(tmp_path: Path) -> None:
    report = validate_prepared(_write_folder(tmp_path, _clean_frames(), dataset="refcocog",
                                             split_by="umd"))
    failed = {c.name for c in report.failed}
    assert failed == {"split_names_expected", "split_files_expected"}
    assert report.check("split_files_expected").observed == {"unexpected_count": 8,
                                                             "element_count": 32}


def test_missing_folder_is_one_error_line(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _validate_cli(tmp_path / "absent", capsys)
    assert rc == 1
    assert out.strip() == f"cris: error: {tmp_path / 'absent'}: prepared folder not found"


@pytest.mark.parametrize("shape,seed", [((24, 32), 0), ((7, 5), 1), ((64, 48), 2), ((1, 1), 3)])
def test_rle_run_lengths_agree_with_pycocotools(shape: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = (rng.random(shape) < rng.random()).astype(np.uint8)
    counts = _rle(mask)
    runs = rle_run_lengths(counts)
    assert runs.sum() == mask.size
    assert runs[1::2].sum() == mask_utils.area({"size": list(shape), "counts": counts.encode()})
    values = np.repeat(np.arange(runs.size) % 2, runs).astype(np.uint8)
    np.testing.assert_array_equal(values.reshape(shape[::-1]).T, mask)


@pytest.mark.parametrize("counts", ["ab\x7f", "0`", "é1"])
def test_rle_run_lengths_rejects_malformed_counts(counts: str) -> None:
    with pytest.raises(ValueError):
        rle_run_lengths(counts)


def test_probe_images_reports_each_problem(tmp_path: Path) -> None:
    _write_jpeg(tmp_path / "ok.jpg", 10, 12)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    table = probe_images(tmp_path, ["ok.jpg", "bad.jpg", "gone.jpg", "ok.jpg"], workers=2)
    assert list(table.index) == ["bad.jpg", "gone.jpg", "ok.jpg"]
    assert table.loc["ok.jpg", ["image_exists", "image_decodes", "image_height", "image_width"]
                     ].tolist() == [True, True, 10, 12]
    assert table.loc["bad.jpg", "image_decodes"] is False
    assert "UnidentifiedImageError" in table.loc["bad.jpg", "image_error"]
    assert not table.loc["gone.jpg", "image_exists"]
    assert table.loc["gone.jpg", "image_decodes"] is None


def test_render_lists_failures_with_examples(tmp_path: Path) -> None:
    frames = _clean_frames()
    _set("testB", 2, "sentence", "")(frames)
    report: ValidationReport = validate_prepared(_write_folder(tmp_path, frames))
    text = report.render()
    assert "FAIL  sentence_not_empty" in text
    assert '"row": "testB.parquet#2"' in text
    assert text.splitlines()[-1].startswith("FAILED: ")
