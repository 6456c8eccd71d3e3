"""Per-split evaluation: every sentence of every referred object, scored at the original size.

`predict_split` encodes each image once and scores all of its sentences in batched head
calls; its probability maps are taken out of the letterbox and resized to the image's own
height x width. `evaluate_split` thresholds them, compares with the manifest's masks through
`cris_model.metrics`, and writes into `out`:

    metrics.json    mIoU, oIoU, prec@0.5..prec@0.9 (+ gIoU, cIoU, N-acc, T-acc when any truth
                    is empty) as fractions in [0, 1], and split, count, checkpoint, threshold,
                    precision; "breakdown": {"kind": {...}, "size": {...}} holds mIoU, oIoU
                    and count per phrase kind (the manifest's `kind`; {} when it has none)
                    and per size bucket of the target (`cris_model.metrics.SIZE_BUCKETS`)
    sentences.csv   one row per sentence: ids, sentence, iou, pred/gt area, intersection, union
    gallery.png     the best and worst cases, predicted and true masks over the image

and, given an MLflow run id, logs the metrics as `<split>/<name>` and the files as artifacts.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cris_model.atomic import write_text
from cris_model.backbone import tokenize
from cris_model.checkpoint import load_checkpoint
from cris_model.data.dataset import load_canvas, open_split, read_image
from cris_model.data.masks import mask_from_rle
from cris_model.eval_config import PRECISIONS
from cris_model.gallery import GalleryCase, save_gallery
from cris_model.imaging import Letterbox, normalize, undo_letterbox
from cris_model.metrics import MaskMetrics, breakdown, size_bucket
from cris_model.model import CRIS

CSV_COLUMNS = ("ref_id", "sent_id", "image_id", "sentence", "iou", "pred_area", "gt_area",
               "intersection", "union")
GALLERY_SIZE = 4  # cases in each of the gallery's best and worst rows


def _chunks(rows: pd.DataFrame, batch_size: int) -> Iterator[list[np.ndarray]]:
    """Groups of consecutive images (row indices per image) holding >= batch_size sentences
    (or batch_size images), the last one possibly smaller."""
    chunk: list[np.ndarray] = []
    count = 0
    for ix in rows.groupby("image_id", sort=False).indices.values():
        chunk.append(np.asarray(ix))
        count += len(ix)
        if count >= batch_size or len(chunk) >= batch_size:
            yield chunk
            chunk, count = [], 0
    if chunk:
        yield chunk


@torch.inference_mode()
def _score_chunk(
    model: CRIS, pixels: torch.Tensor, boxes: list[Letterbox], texts: list[str],
    owner: np.ndarray, batch_size: int, dev: torch.device,
) -> list[np.ndarray]:
    """Encode Bx3xSxS uint8 canvases once; score text i against image owner[i] -> HxW maps."""
    image = model.encode_image(normalize(pixels.to(dev)))
    maps = []
    for start in range(0, len(texts), batch_size):
        sel = slice(start, start + batch_size)
        text = model.encode_text(tokenize(texts[sel], model.config.word_len).to(dev))
        pick = torch.as_tensor(owner[sel], device=dev)
        feats = {**{k: image[k].index_select(0, pick) for k in model.image_keys}, **text}
        probs = torch.sigmoid(model.head(feats).float())
        for prob, j in zip(probs, owner[sel], strict=True):
            maps.append(undo_letterbox(prob[0], boxes[j]).clamp_(0.0, 1.0).cpu().numpy())
    return maps


def predict_split(
    model: CRIS, rows: pd.DataFrame, image_dir: Path, *, device: str | torch.device = "cpu",
    batch_size: int = 32, precision: str = "fp32",
) -> Iterator[tuple[pd.Series, np.ndarray]]:
    """Yield (manifest row, HxW float32 probability map in [0, 1] at the row's original size).

    Rows come grouped by image (first-appearance order); `row.name` is the row's index in
    `rows`. Each image is letterboxed and encoded once; sentences go through the head in
    batches of up to `batch_size`. The model is put in eval mode on `device`. `precision`
    bf16 runs encoders and head under bf16 autocast: faster on a GPU, and the maps move by
    bf16 rounding; fp32 gives the exact figures.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be {' or '.join(PRECISIONS)}, got {precision!r}")
    dev = torch.device(device)
    model = model.to(dev).eval()
    sentences = rows["sentence"].astype(str).to_numpy()
    for chunk in _chunks(rows, batch_size):
        loaded = [load_canvas(image_dir, rows.iloc[int(ix[0])], model.config.input_size)
                  for ix in chunk]
        pixels = torch.from_numpy(np.stack([c for c, _ in loaded])).permute(0, 3, 1, 2)
        order = np.concatenate(chunk)
        owner = np.concatenate([np.full(len(ix), i) for i, ix in enumerate(chunk)])
        amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16"
               else nullcontext())
        with amp:
            maps = _score_chunk(model, pixels, [box for _, box in loaded],
                                list(sentences[order]), owner, batch_size, dev)
        for i, prob in zip(order, maps, strict=True):
            yield rows.iloc[int(i)], prob


@dataclass
class _Extremes:
    """The k best and k worst cases seen so far (ties keep the earlier sentence)."""

    k: int
    best: list[tuple[float, int, Any]] = field(default_factory=list)  # min-heap on iou
    worst: list[tuple[float, int, Any]] = field(default_factory=list)  # min-heap on -iou

    def add(self, iou: float, seq: int, case: Any) -> None:
        """Offer one case; keeps at most k in each list."""
        if self.k == 0:
            return
        for heap, score in ((self.best, iou), (self.worst, -iou)):
            item = (score, -seq, case)
            if len(heap) < self.k:
                heapq.heappush(heap, item)
            elif item[:2] > heap[0][:2]:
                heapq.heapreplace(heap, item)

    def rows(self) -> list[tuple[str, list[Any]]]:
        """[("best", cases by falling IoU), ("worst", cases by rising IoU)]."""
        best = [c for _, _, c in sorted(self.best, key=lambda t: t[:2], reverse=True)]
        worst = [c for _, _, c in sorted(self.worst, key=lambda t: t[:2], reverse=True)]
        return [("best", best), ("worst", worst)]


def _gallery_rows(
    extremes: _Extremes, image_dir: Path
) -> list[tuple[str, list[GalleryCase]]]:
    out = []
    for title, cases in extremes.rows():
        tiles = []
        for row, pred, gt, iou in cases:
            image = np.asarray(read_image(image_dir, row))
            tiles.append(GalleryCase(image, pred, gt, f"{row['sentence']} (IoU {iou:.2f})"))
        out.append((f"{title} {len(tiles)}", tiles))
    return out


def mlflow_metric_name(split: str, key: str) -> str:
    """`<split>/<key>` in MLflow's allowed alphabet ('@' is not: prec@0.5 -> prec_at_0.5)."""
    return f"{split}/{key.replace('@', '_at_')}"


def log_to_mlflow(
    run_id: str, split: str, metrics: dict[str, float], files: list[Path],
    tracking_uri: str = "",
) -> None:
    """Add `<split>/<metric>` values and `files` (under `eval/<split>/`) to an existing run.

    The run's status is left as it is. `tracking_uri` "" means $MLFLOW_TRACKING_URI or the
    default local store of `cris_model.tracking`.
    """
    from mlflow.exceptions import MlflowException

    from cris_model.tracking import MlflowTracker

    tracker = MlflowTracker(tracking_uri)
    tracker.run_id = run_id
    try:
        tracker.client.get_run(run_id)
        tracker.log_metrics({mlflow_metric_name(split, k): v for k, v in metrics.items()}, 0)
        for path in files:
            tracker.log_artifact(path, f"eval/{split}")
    except MlflowException as e:
        raise RuntimeError(f"MLflow run {run_id} at {tracker.tracking_uri}: {e.message}") from e


def evaluate_split(
    checkpoint: Path, data: Path, split: str, out: Path, *, threshold: float | None = None,
    device: str = "cpu", batch_size: int = 32, run_id: str | None = None,
    tracking_uri: str = "", gallery_size: int = GALLERY_SIZE, precision: str = "fp32",
) -> dict[str, Any]:
    """Evaluate checkpoint directory `checkpoint` on `data/<split>.parquet`; write `out/`.

    `threshold` None uses the checkpoint's config threshold; `precision` is that of
    `predict_split` (bf16 also lays a GPU model out channels-last). Returns the metrics.json
    dict.
    """
    if gallery_size < 0:
        raise ValueError(f"gallery_size must be >= 0, got {gallery_size}")
    model = load_checkpoint(Path(checkpoint), device)
    if precision == "bf16" and torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    t = model.config.threshold if threshold is None else float(threshold)
    if not 0.0 < t < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {t}")
    rows, image_dir = open_split(Path(data), split)
    metrics, extremes, ids = MaskMetrics(), _Extremes(gallery_size), []
    kinds, pixels = [], []
    for row, prob in predict_split(model, rows, image_dir, device=device, batch_size=batch_size,
                                   precision=precision):
        h, w = int(row["height"]), int(row["width"])
        gt = mask_from_rle(str(row["mask_rle"]), h, w)
        pred = prob > t
        iou = metrics.update(pred, gt)
        ids.append((int(row["ref_id"]), int(row["sent_id"]), int(row["image_id"]),
                    str(row["sentence"])))
        kinds.append(row["kind"] if isinstance(row["kind"], str) else None)
        pixels.append(h * w)
        extremes.add(iou, len(ids), (row, pred, gt, iou))
    scores = metrics.compute()
    sizes = [size_bucket(s, n) for s, n in zip(metrics.stats, pixels, strict=True)]
    result: dict[str, Any] = {
        **scores, "split": split, "count": metrics.count,
        "checkpoint": str(Path(checkpoint).absolute()), "threshold": t, "precision": precision,
        "breakdown": {"kind": breakdown(metrics.stats, kinds),
                      "size": breakdown(metrics.stats, sizes)},
    }
    records = [(*i, s.iou, s.pred_area, s.gt_area, s.intersection, s.union)
               for i, s in zip(ids, metrics.stats, strict=True)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame.from_records(records, columns=list(CSV_COLUMNS))
    write_text(out / "sentences.csv", table.to_csv(index=False))
    files = [out / "metrics.json", out / "sentences.csv"]
    if gallery_size > 0:
        files.append(save_gallery(_gallery_rows(extremes, image_dir), out / "gallery.png"))
    write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    if run_id:
        log_to_mlflow(run_id, split, scores, files, tracking_uri)
    return result
