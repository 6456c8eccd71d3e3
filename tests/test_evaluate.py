"""Per-split evaluation: batched prediction, the letterbox/undo chain, files, CLI and MLflow."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from cris_model.backbone import tokenize
from cris_model.checkpoint import load_checkpoint, save_checkpoint
from cris_model.cli import main
from cris_model.config import get_preset
from cris_model.data.dataset import open_split
from cris_model.data.manifest import MANIFEST_SCHEMA
from cris_model.data.masks import mask_from_rle, rle_from_mask
from cris_model.evaluate import (
    CSV_COLUMNS,
    _Extremes,
    evaluate_split,
    mlflow_metric_name,
    predict_split,
)
from cris_model.gallery import ALPHA, BOTH_COLOUR, GT_COLOUR, PRED_COLOUR, overlay_masks
from cris_model.imaging import CLIP_MEAN, CLIP_STD
from cris_model.metrics import evaluate_masks
from cris_model.model import build_model
from cris_model.predict import Predictor

SIZE = 96  # cris_tiny input size
COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}
# (height, width): letterbox scales 2, 2, 1 and 4, so the round trip is exact per pixel.
SHAPES = [(48, 32), (32, 48), (96, 96), (24, 24)]


def _scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Black image with a red box in the top half and a blue box in the bottom half."""
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    masks = {name: np.zeros((h, w), dtype=bool) for name in COLOURS}
    for name, (lo, hi) in (("red", (0, h // 2 - 2)), ("blue", (h // 2 + 1, h))):
        top = int(rng.integers(lo, lo + (hi - lo) // 2))
        bottom = int(rng.integers(top + 2, hi + 1))
        left = int(rng.integers(0, w // 2))
        right = int(rng.integers(left + 2, w + 1))
        masks[name][top:bottom, left:right] = True
        pixels[masks[name]] = COLOURS[name]
    return pixels, masks


def _prepare(root: Path, shapes: list[tuple[int, int]], seed: int = 0) -> Path:
    """A prepared folder with split `val`: per image three refs (red, blue, green = none)."""
    rng = np.random.default_rng(seed)
    images, out = root / "images", root / "prepared"
    images.mkdir(parents=True)
    out.mkdir()
    rows, sent_id = [], 0
    for image_id, (h, w) in enumerate(shapes, start=1):
        pixels, masks = _scene(rng, h, w)
        name = f"img_{image_id}.png"
        Image.fromarray(pixels).save(images / name)
        for k, colour in enumerate(COLOURS):
            ref_id = image_id * 10 + k
            for sentence in (f"{colour} box", f"{colour} thing"):
                sent_id += 1
                empty = not masks[colour].any()
                rows.append({
                    "dataset": "refcoco", "split": "val", "ref_id": ref_id, "sent_id": sent_id,
                    "image_id": image_id, "file_name": name, "height": h, "width": w,
                    "sentence": sentence, "raw": sentence, "tokens": sentence.split(),
                    "ann_ids": [] if empty else [ref_id], "category_id": -1 if empty else 1,
                    "mask_rle": rle_from_mask(masks[colour]), "bbox": [0.0, 0.0, 1.0, 1.0],
                    "no_target": empty, "kind": "no-target" if empty else "attribute",
                })
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), out / "val.parquet")
    (out / "summary.json").write_text(json.dumps({"image_dir": str(images.resolve())}))
    return out


class _ColourOracle(nn.Module):
    """Stands in for CRIS: segments the canvas pixels of the colour the phrase names.

    It sees only what predict_split feeds a real model (normalised canvas, token ids), so a
    perfect score proves the image routing, letterbox, undo and compare-at-original chain.
    """

    image_keys = ("rgb",)

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(input_size=SIZE, word_len=8, threshold=0.5)
        ids = tokenize(list(COLOURS), 8)[:, 1].tolist()
        self.channel = {tok: i for tok, i in zip(ids, (0, 2, 1), strict=True)}
        self.calls: Counter[str] = Counter()

    def encode_image(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls["images"] += image.shape[0]
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return {"rgb": image * std + mean}

    def encode_text(self, text: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls["texts"] += text.shape[0]
        return {"channel": torch.tensor([self.channel[int(t)] for t in text[:, 1]])}

    def head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls["heads"] += 1
        rgb, channel = feats["rgb"], feats["channel"]
        assert rgb.shape[0] == channel.shape[0]
        named = rgb[torch.arange(len(channel)), channel]
        pure = (named > 0.75) & (rgb.sum(1) - named < 0.25)
        return torch.where(pure, 12.0, -12.0)[:, None]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(tmp_path_factory.mktemp("eval"), SHAPES)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model(get_preset("cris_tiny", random_init=True))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best", model)


def test_oracle_scores_one_at_original_size(data: Path) -> None:
    rows, image_dir = open_split(data, "val")
    oracle = _ColourOracle()
    preds, gts = [], []
    seen = []
    for row, prob in predict_split(oracle, rows, image_dir, batch_size=4):
        assert not torch.is_inference_mode_enabled()  # the caller's code runs in normal mode
        assert prob.shape == (row["height"], row["width"]) and prob.dtype == np.float32
        assert 0.0 <= prob.min() and prob.max() <= 1.0
        preds.append(prob > 0.5)
        gts.append(mask_from_rle(row["mask_rle"], int(row["height"]), int(row["width"])))
        seen.append(row.name)
    assert sorted(seen) == list(range(len(rows)))
    metrics = evaluate_masks(preds, gts)
    assert metrics["mIoU"] == 1.0 and metrics["oIoU"] == 1.0
    assert metrics["N-acc"] == 1.0 and metrics["T-acc"] == 1.0
    assert oracle.calls["images"] == len(SHAPES)  # each image encoded exactly once
    assert oracle.calls["texts"] == len(rows)
    assert oracle.calls["heads"] == 8  # per image 6 sentences: head batches of 4 and 2


def test_oracle_breaks_when_a_box_is_misplaced(data: Path) -> None:
    rows, image_dir = open_split(data, "val")
    rows = rows.copy()
    rows.loc[0, "mask_rle"] = rows.loc[2, "mask_rle"]  # red sentence scored against blue box
    (row, prob), *_ = predict_split(_ColourOracle(), rows, image_dir)
    gt = mask_from_rle(row["mask_rle"], int(row["height"]), int(row["width"]))
    assert not np.any((prob > 0.5) & gt)


def test_predict_split_matches_predictor(data: Path, checkpoint: Path) -> None:
    rows, image_dir = open_split(data, "val")
    rows = rows[rows["image_id"] <= 2]  # two images: 12 sentences in head batches of 5
    predictor = Predictor.from_checkpoint(checkpoint)
    got = {row.name: prob for row, prob in
           predict_split(predictor.model, rows, image_dir, batch_size=5)}
    for _, group in rows.groupby("image_id"):
        predictor.set_image(Image.open(image_dir / group["file_name"].iloc[0]))
        expected = predictor.predict_probs(list(group["sentence"]))
        for index, want in zip(group.index, expected, strict=True):
            np.testing.assert_allclose(got[index], want, atol=1e-5)


def test_evaluate_split_writes_files(data: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = evaluate_split(checkpoint, data, "val", out, threshold=0.5, batch_size=7,
                            gallery_size=3)
    written = json.loads((out / "metrics.json").read_text())
    assert written == result
    assert written["split"] == "val" and written["threshold"] == 0.5
    assert written["count"] == 24 and written["checkpoint"] == str(checkpoint.absolute())
    keys = {"mIoU", "oIoU", "gIoU", "cIoU", "N-acc", "T-acc",
            *(f"prec@0.{i}" for i in range(5, 10))}
    assert keys <= set(written)
    assert all(0.0 <= written[k] <= 1.0 for k in keys)
    parts, no_target = written["breakdown"], 8  # green has no target: 2 sentences per image
    assert {k: g["count"] for k, g in parts["kind"].items()} == {"attribute": 16, "no-target": 8}
    assert parts["kind"]["no-target"]["mIoU"] == pytest.approx(written["N-acc"])
    assert sum(g["count"] for g in parts["size"].values()) == 24 - no_target
    table = pd.read_csv(out / "sentences.csv")
    assert tuple(table.columns) == CSV_COLUMNS and len(table) == 24
    assert sorted(table["sent_id"]) == list(range(1, 25))
    assert table["iou"].mean() == pytest.approx(written["mIoU"])
    assert table["intersection"].sum() / table["union"].sum() == pytest.approx(written["oIoU"])
    assert (table["union"] >= table[["pred_area", "gt_area"]].max(axis=1)).all()
    with Image.open(out / "gallery.png") as img:
        assert img.format == "PNG" and img.width >= 3 * 192
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_cli_threshold_from_params_and_flag(data: Path, checkpoint: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("eval:\n  threshold: 0.2\n")
    base = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--split", "val",
            "--gallery-size", "0"]
    assert main([*base, "--out", str(tmp_path / "a"), "--params", str(params)]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == 0.2
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["threshold"] == 0.2
    assert not (tmp_path / "a" / "gallery.png").exists()
    assert main([*base, "--out", str(tmp_path / "b"), "--params", str(params),
                 "--set", "eval.threshold=0.3"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == 0.3
    assert main([*base, "--out", str(tmp_path / "b"), "--params", str(params),
                 "--threshold", "0.6"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == 0.6
    assert main([*base, "--out", str(tmp_path / "c"), "--threshold", "1.5"]) == 1
    assert "threshold must be in (0, 1)" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "d"), "--split", "nope"]) == 1
    assert "nope.parquet: manifest not found" in capsys.readouterr().err


def test_bf16_evaluation_stays_close_to_fp32(data: Path, checkpoint: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    exact = evaluate_split(checkpoint, data, "val", tmp_path / "fp32", threshold=0.5,
                           gallery_size=0)
    fast = evaluate_split(checkpoint, data, "val", tmp_path / "bf16", threshold=0.5,
                          gallery_size=0, precision="bf16")
    assert (exact["precision"], fast["precision"]) == ("fp32", "bf16")
    assert fast["count"] == exact["count"] and abs(fast["mIoU"] - exact["mIoU"]) < 0.05
    rows, image_dir = open_split(data, "val")
    model = load_checkpoint(checkpoint)
    want = [p for _, p in predict_split(model, rows, image_dir)]
    got = [p for _, p in predict_split(model, rows, image_dir, precision="bf16")]
    gaps = [float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)]
    assert 0.0 < max(gaps) < 0.05  # autocast really ran, and only rounding moved
    with pytest.raises(ValueError, match="precision must be fp32 or bf16"):
        next(predict_split(model, rows, image_dir, precision="fp16"))
    params = tmp_path / "params.yaml"
    params.write_text("eval:\n  precision: bf16\n")
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--split",
                 "val", "--gallery-size", "0", "--out", str(tmp_path / "cli"), "--params",
                 str(params)]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "bf16"


@pytest.mark.slow
def test_logs_metrics_and_files_to_mlflow_run(data: Path, checkpoint: Path,
                                              tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("cris", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    client.set_terminated(run.info.run_id)
    evaluate_split(checkpoint, data, "val", tmp_path / "e", run_id=run.info.run_id,
                   tracking_uri=uri, gallery_size=1)
    logged = client.get_run(run.info.run_id)
    assert logged.data.metrics[mlflow_metric_name("val", "prec@0.5")] >= 0.0
    assert "val/mIoU" in logged.data.metrics and "val/N-acc" in logged.data.metrics
    assert logged.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(run.info.run_id, "eval/val")}
    assert names == {"eval/val/metrics.json", "eval/val/sentences.csv", "eval/val/gallery.png"}
    with pytest.raises(RuntimeError, match="MLflow run"):
        evaluate_split(checkpoint, data, "val", tmp_path / "f", run_id="0" * 32,
                       tracking_uri=uri, gallery_size=0)


def test_extremes_keep_best_and_worst_in_order() -> None:
    keep = _Extremes(2)
    for seq, iou in enumerate([0.5, 0.9, 0.1, 0.9, 0.0, 0.7], start=1):
        keep.add(iou, seq, f"case{seq}")
    assert keep.rows() == [("best", ["case2", "case4"]), ("worst", ["case5", "case3"])]


def test_overlay_colours_pred_truth_and_both() -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    pred, gt = np.zeros((8, 8), dtype=bool), np.zeros((8, 8), dtype=bool)
    pred[0:6, 0:6] = True
    gt[2:8, 2:8] = True
    out = overlay_masks(image, pred, gt)
    tint = ALPHA * np.array([PRED_COLOUR, GT_COLOUR, BOTH_COLOUR])
    np.testing.assert_allclose(out[[1, 6, 3], [1, 6, 3]], tint, atol=0.51)  # inner fills
    assert out[0, 3].tolist() == list(PRED_COLOUR)  # prediction outline
    assert out[7, 3].tolist() == list(GT_COLOUR)  # truth outline
    assert out[7, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="must match the image size"):
        overlay_masks(image, pred[:1], gt)
