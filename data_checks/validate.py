"""`validate_prepared`: the whole validation of a prepared folder, as one report."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from data_checks.config import ValidationConfig
from data_checks.derived import add_derived_columns
from data_checks.prepared import PreparedFolder, load_prepared
from data_checks.report import CheckResult, ValidationReport
from data_checks.suite import check_specs, run_suite


def validate_prepared(folder: Path, config: ValidationConfig | None = None) -> ValidationReport:
    """Check a folder written by `cris data prepare` (manifests, masks, boxes, images).

    Never raises for bad content: every problem is a failed check in the report. Raises
    FileNotFoundError only when `folder` is not a folder.
    """
    start = time.perf_counter()
    config = config or ValidationConfig()
    prepared = load_prepared(Path(folder), config)
    summary = prepared.summary or {}
    splits = config.splits_for(summary.get("dataset"), summary.get("split_by"))
    info: dict[str, Any] = {k: summary[k] for k in ("dataset", "split_by") if k in summary}
    if splits is None:
        splits = config.all_splits()
        info["split_names"] = f"dataset/split_by not known: any of {list(splits)} accepted"
    specs = check_specs(config, splits)
    if prepared.rows is None:
        checks = [CheckResult(s.name, s.group, s.description, "skipped",
                              "not evaluated: no readable manifest", s.expected) for s in specs]
        return ValidationReport(prepared.folder, prepared.checks + checks, info,
                                time.perf_counter() - start)
    image_dir = prepared.image_dir if prepared.image_dir and prepared.image_dir.is_dir() else None
    tick = time.perf_counter()
    frame = add_derived_columns(prepared.rows, image_dir, config.image_workers)
    derive_s = time.perf_counter() - tick
    tick = time.perf_counter()
    checks = [_with_file_detail(c, prepared) for c in run_suite(frame, specs, config.max_examples)]
    info |= _figures(frame, config)
    expect_s = time.perf_counter() - tick
    info["seconds"] = {"derive": round(derive_s, 3), "expectations": round(expect_s, 3)}
    return ValidationReport(prepared.folder, prepared.checks + checks, info,
                            time.perf_counter() - start)


def _with_file_detail(check: CheckResult, prepared: PreparedFolder) -> CheckResult:
    """Name, per manifest file, the required columns it lacks."""
    if check.name != "required_columns_present" or check.success:
        return check
    examples = [{"file": f, "missing": m} for f, m in prepared.missing_by_file.items() if m]
    return dataclasses.replace(check, examples=examples)


def _figures(frame: Any, config: ValidationConfig) -> dict[str, Any]:
    """Informational counts: rows per split, distinct images, sentences the model truncates."""
    out: dict[str, Any] = {
        "rows": {str(k): int(v) for k, v in frame["source_split"].value_counts(sort=False).items()},
    }
    if "file_name" in frame:
        out["images"] = int(frame["file_name"].nunique())
    if "token_count" in frame:
        over = int((frame["token_count"] > config.word_len).sum())
        out["truncated_at_word_len"] = f"{over} sentences exceed word_len {config.word_len}"
    if "image_conversion" in frame:
        out |= _image_notes(frame.drop_duplicates("file_name"), config.max_examples)
    return out


def _image_notes(files: Any, max_examples: int) -> dict[str, Any]:
    """Images whose mode decoding converts, and images carrying an EXIF orientation: which
    frame training reads them in, and those whose upright size is not the manifest's."""
    out: dict[str, Any] = {}
    converted = files[files["image_conversion"].notna()]
    if len(converted):
        out["images_converted"] = {
            "files": len(converted),
            "by_conversion": {str(k): int(v) for k, v in
                              converted["image_conversion"].value_counts().items()},
            "examples": converted["file_name"].head(max_examples).tolist(),
        }
    oriented = files[files["image_orientation"].notna() & files["image_orientation"].ne(1)]
    if len(oriented):
        upright = oriented["image_read_upright"].eq(True)
        oblong = oriented["image_size"].map(lambda s: isinstance(s, str) and len(set(
            s.split("x"))) == 2)
        turned = oriented[~upright & oblong & oriented["image_orientation"].isin([5, 6, 7, 8])]
        out["images_exif_oriented"] = {
            "files": len(oriented), "read_upright": int(upright.sum()),
            "read_as_stored": int((~upright).sum()),
            "upright_size_differs_from_manifest": {
                "files": len(turned), "examples": turned["file_name"].head(max_examples).tolist(),
                "meaning": "read as stored, the frame the manifest's size (and COCO's "
                           "annotations) index; a viewer and cris predict show them turned"},
        }
    return out
