"""`cris data prepare`: original refer files -> one Parquet manifest per split + summary.json.

One row per referring sentence. Everything downstream (validation, features, training,
evaluation) reads these manifests, never the original files. Rules applied here:

- a ref's mask is the union of its annotations' masks; gRefCOCO no-target refs (`[-1]`) get
  an all-false mask, bbox [0, 0, 0, 0] and category_id -1;
- `category_id` is the first target annotation's category (for RefCOCO/+/g it must equal
  the ref's declared one);
- crowd annotations, ids pointing nowhere and malformed segmentations are rejected;
  polygon parts with fewer than 3 points are skipped with a warning and counted in
  summary.json (an annotation with no usable part is rejected);
- images are not opened (`cris data validate` decodes them) but must exist;
- each sentence's phrase kind (attribute, spatial, ...) comes from the optional side file
  `<root>/<dataset>/sentence_kinds.json` (the synthetic generator writes one); without it, or
  for a sentence it does not list, `kind` is null;
- split files are written into a temporary folder beside `out`, renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cris_model.atomic import staged_dir
from cris_model.data.masks import segmentation_rle, union_rle
from cris_model.data.refer import (
    KINDS_FILE,
    OFFICIAL_REF_COUNTS,
    Instances,
    Ref,
    read_instances,
    read_kinds,
    read_refs,
    refs_file,
)

MANIFEST_VERSION = 1
# A copy counts as "the full dataset" when every official split is present and it holds at
# least this fraction of the official number of refs; its split counts must then match.
FULL_DATASET_FRACTION = 0.9

MANIFEST_SCHEMA = pa.schema([
    ("dataset", pa.string()),            # refcoco | refcoco+ | refcocog | grefcoco
    ("split", pa.string()),              # train | val | testA | testB | test
    ("ref_id", pa.int64()),
    ("sent_id", pa.int64()),
    ("image_id", pa.int64()),
    ("file_name", pa.string()),          # image file, relative to summary.json's image_dir
    ("height", pa.int64()),
    ("width", pa.int64()),
    ("sentence", pa.string()),           # refer's `sent`: lower-cased, tokenised
    ("raw", pa.string()),                # the sentence as typed
    ("tokens", pa.list_(pa.string())),
    ("ann_ids", pa.list_(pa.int64())),   # empty for no-target
    ("category_id", pa.int64()),         # first target's category, -1 for no-target
    ("mask_rle", pa.string()),           # COCO compressed RLE counts, size [height, width]
    ("bbox", pa.list_(pa.float64())),    # [x, y, w, h] union box, [0, 0, 0, 0] for no-target
    ("no_target", pa.bool_()),
    ("kind", pa.string()),               # phrase kind from sentence_kinds.json, else null
])
OPTIONAL_COLUMNS = ("kind",)  # columns a manifest may lack (written before they existed)

_log = logging.getLogger(__name__)


def default_image_dir(root: Path) -> Path:
    """Where the refer layout keeps COCO train2014 images under a data root."""
    return Path(root) / "images" / "mscoco" / "images" / "train2014"


def check_official_counts(dataset: str, split_by: str, ref_counts: Mapping[str, int]) -> bool:
    """Compare refs per split with the published counts when the data looks complete.

    Returns True when checked and equal, False when skipped (no published counts, a split
    missing, or fewer than FULL_DATASET_FRACTION of the refs). Raises ValueError on mismatch.
    """
    official = OFFICIAL_REF_COUNTS.get((dataset, split_by))
    if official is None or any(split not in ref_counts for split in official):
        return False
    total = sum(ref_counts.values())
    if total < FULL_DATASET_FRACTION * sum(official.values()):
        return False
    wrong = [f"{s} {ref_counts[s]} != {n}" for s, n in official.items() if ref_counts[s] != n]
    if wrong:
        raise ValueError(
            f"{dataset} ({split_by}) looks complete ({total} refs) but its refs per split "
            f"differ from the official counts: {', '.join(wrong)}"
        )
    return True


def _ref_target(ref: Ref, inst: Instances, grouped: bool, refs_path: Path,
                inst_path: Path) -> tuple[dict, int]:
    """Mask (RLE string), bbox and category of one ref, plus the polygon parts skipped.

    `grouped` marks gRefCOCO, whose declared category list is not checked.
    """
    image = inst.images.get(ref.image_id)
    where = f"{refs_path}: ref_id {ref.ref_id}"
    if image is None:
        raise ValueError(f"{where}: image_id {ref.image_id} not found in {inst_path}")
    rles, boxes, skipped = [], [], 0
    for ann_id in ref.ann_ids:
        ann = inst.annotations.get(ann_id)
        if ann is None:
            raise ValueError(f"{where}: ann_id {ann_id} not found in {inst_path}")
        if ann.image_id != ref.image_id:
            raise ValueError(f"{where}: ann_id {ann_id} belongs to image {ann.image_id}, "
                             f"not to the ref's image {ref.image_id}")
        if ann.iscrowd:
            raise ValueError(f"{where}: ann_id {ann_id} is a crowd annotation, never a target")
        if ann.category_id not in inst.categories:
            raise ValueError(f"{inst_path}: annotation {ann_id}: unknown category_id "
                             f"{ann.category_id}")
        try:
            rle, n_skipped = segmentation_rle(ann.segmentation, image.height, image.width)
        except ValueError as e:
            raise ValueError(f"{inst_path}: annotation {ann_id}: {e}") from e
        if n_skipped:
            _log.warning("%s: annotation %d: skipped %d polygon part(s) with fewer than 3 "
                         "points", inst_path, ann_id, n_skipped)
        rles.append(rle)
        boxes.append(ann.bbox)
        skipped += n_skipped
    category = inst.annotations[ref.ann_ids[0]].category_id if ref.ann_ids else -1
    if not grouped and category != ref.category_id:
        raise ValueError(f"{where}: category_id {ref.category_id} differs from its "
                         f"annotation's category_id {category} in {inst_path}")
    target = {
        "image": image, "mask_rle": union_rle(rles, image.height, image.width),
        "bbox": _union_box(boxes), "category_id": category,
    }
    return target, skipped


def _union_box(boxes: list[tuple[float, float, float, float]]) -> list[float]:
    if not boxes:
        return [0.0, 0.0, 0.0, 0.0]
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)
    return [x0, y0, x1 - x0, y1 - y0]


def _rows(refs: list[Ref], inst: Instances, dataset: str, refs_path: Path,
          inst_path: Path, kinds: Mapping[int, str]) -> tuple[dict[str, list[dict]], int]:
    """Manifest rows grouped by split (file order kept), and the polygon parts skipped."""
    by_split: dict[str, list[dict]] = {}
    skipped = 0
    for ref in refs:
        target, n_skipped = _ref_target(ref, inst, dataset == "grefcoco", refs_path, inst_path)
        skipped += n_skipped
        image = target["image"]
        for s in ref.sentences:
            by_split.setdefault(ref.split, []).append({
                "dataset": dataset, "split": ref.split, "ref_id": ref.ref_id,
                "sent_id": s.sent_id, "image_id": image.image_id,
                "file_name": image.file_name, "height": image.height, "width": image.width,
                "sentence": s.sent, "raw": s.raw, "tokens": list(s.tokens),
                "ann_ids": list(ref.ann_ids), "category_id": target["category_id"],
                "mask_rle": target["mask_rle"], "bbox": target["bbox"],
                "no_target": ref.no_target, "kind": kinds.get(s.sent_id),
            })
    return by_split, skipped


def _check_images(by_split: dict[str, list[dict]], image_dir: Path) -> None:
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: images folder not found (see --image-dir)")
    names = sorted({row["file_name"] for rows in by_split.values() for row in rows})
    missing = [n for n in names if not (image_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{image_dir / missing[0]}: image not found ({len(missing)} of {len(names)} "
            f"referenced images missing)"
        )


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "summary.json").is_file():
        raise ValueError(f"{out}: refusing to replace a non-empty folder that holds no "
                         f"summary.json from an earlier prepare")


def _write(out: Path, tables: dict[str, pa.Table], summary: dict[str, Any]) -> None:
    """Write tables + summary.json into a temporary folder beside `out`, then swap it in."""
    with staged_dir(out) as tmp:
        for split, table in tables.items():
            pq.write_table(table, tmp / f"{split}.parquet")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def prepare_dataset(root: Path, dataset: str, split_by: str, out: Path,
                    image_dir: Path | None = None) -> dict[str, Any]:
    """Read `<root>/<dataset>/` in the refer layout and write `out/<split>.parquet` + summary.

    Returns the summary written to `out/summary.json`: dataset, split_by, root, image_dir
    (absolute), per-split counts of refs, sentences and images, whether the official counts
    were checked, skipped polygon parts, creation time (ISO, UTC) and manifest version.
    Raises FileNotFoundError/ValueError naming the file and the problem; `out` is untouched
    on failure.
    """
    root, out = Path(root).absolute(), Path(out).absolute()
    refs_path = refs_file(root, dataset, split_by)
    inst_path = root / dataset / "instances.json"
    images = Path(image_dir).absolute() if image_dir else default_image_dir(root)
    _check_out(out)
    refs = read_refs(refs_path, dataset, split_by)
    kinds_path = root / dataset / KINDS_FILE
    kinds = read_kinds(kinds_path) if kinds_path.is_file() else {}
    by_split, skipped = _rows(refs, read_instances(inst_path), dataset, refs_path, inst_path,
                              kinds)
    _check_images(by_split, images)
    splits = {
        split: {
            "refs": len({r["ref_id"] for r in rows}),
            "sentences": len(rows),
            "images": len({r["image_id"] for r in rows}),
            "no_target_sentences": sum(r["no_target"] for r in rows),
            "sentences_with_kind": sum(r["kind"] is not None for r in rows),
        }
        for split, rows in by_split.items()
    }
    checked = check_official_counts(dataset, split_by,
                                    {s: c["refs"] for s, c in splits.items()})
    summary = {
        "dataset": dataset, "split_by": split_by, "root": str(root), "image_dir": str(images),
        "splits": splits, "official_counts_checked": checked,
        "skipped_polygon_parts": skipped,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "manifest_version": MANIFEST_VERSION,
    }
    tables = {s: pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
              for s, rows in by_split.items()}
    _write(out, tables, summary)
    return summary


def read_manifest(path: Path) -> pd.DataFrame:
    """One `<split>.parquet` -> DataFrame with every MANIFEST_SCHEMA column.

    List columns (tokens, ann_ids, bbox) come back as numpy arrays; an optional column the
    file lacks (OPTIONAL_COLUMNS) comes back as nulls. Raises
    FileNotFoundError/ValueError naming the file when it is missing, unreadable or lacks
    a column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
    missing = [name for name in MANIFEST_SCHEMA.names
               if name not in table.column_names and name not in OPTIONAL_COLUMNS]
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {missing}")
    rows = table.to_pandas()
    for name in OPTIONAL_COLUMNS:
        if name not in rows.columns:
            rows[name] = None
    return rows


def data_version(data_dir: Path) -> str:
    """16 hex chars of the SHA-256 over a prepared folder's `*.parquet` manifests (names + bytes).

    summary.json is left out: it records paths and a creation time, not the data.
    """
    data_dir = Path(data_dir)
    files = sorted(data_dir.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{data_dir}: no *.parquet manifests (run `cris data prepare`)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(data_dir).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]
