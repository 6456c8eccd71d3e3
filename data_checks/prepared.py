"""Reading a prepared folder (`D/summary.json`, `D/<split>.parquet`) and checking its files.

Problems with the folder itself (no summary, no or unreadable manifests, no image folder) are
reported as failed checks of the `files` group rather than raised, so a broken folder still
yields a report; only a folder that does not exist at all is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from data_checks.config import ValidationConfig
from data_checks.report import CheckResult, Status

SUMMARY_KEYS = ("dataset", "split_by", "image_dir")


@dataclass
class PreparedFolder:
    """What could be read of a prepared folder, and the `files` checks on it."""

    folder: Path
    summary: dict[str, Any] | None = None  # summary.json when present and well-formed
    image_dir: Path | None = None  # absolute images folder (relative entries resolve against D)
    rows: pd.DataFrame | None = None  # every manifest row; adds `source_split` and `row_id`
    checks: list[CheckResult] = field(default_factory=list)  # the `files` group
    missing_by_file: dict[str, list[str]] = field(default_factory=dict)  # file -> absent columns


def load_prepared(folder: Path, config: ValidationConfig) -> PreparedFolder:
    """Read `folder`'s summary and manifests; raises FileNotFoundError if it is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: prepared folder not found")
    out = PreparedFolder(folder=folder)
    out.checks.append(_read_summary(out))
    out.checks.append(_read_manifests(out, config))
    out.checks.append(_image_dir_check(out))
    return out


def _read_summary(out: PreparedFolder) -> CheckResult:
    path = out.folder / "summary.json"
    desc = "summary.json exists and names dataset, split_by and image_dir"
    expected = {"file": "summary.json", "keys": list(SUMMARY_KEYS)}
    if not path.is_file():
        return CheckResult("summary_present", "files", desc, "failed", f"{path}: missing", expected)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        observed = f"{path}: unreadable ({e.__class__.__name__}: {e})"
        return CheckResult("summary_present", "files", desc, "failed", observed, expected)
    if not isinstance(summary, dict):
        observed = f"{path}: top level is {type(summary).__name__}, not an object"
        return CheckResult("summary_present", "files", desc, "failed", observed, expected)
    absent = [k for k in SUMMARY_KEYS if not isinstance(summary.get(k), str) or not summary[k]]
    if absent:
        observed = f"{path}: missing or empty keys {absent}"
        return CheckResult("summary_present", "files", desc, "failed", observed, expected)
    out.summary = summary
    image_dir = Path(summary["image_dir"])
    out.image_dir = image_dir if image_dir.is_absolute() else out.folder / image_dir
    found = {k: summary[k] for k in SUMMARY_KEYS}
    return CheckResult("summary_present", "files", desc, "passed", found, expected)


def _read_manifests(out: PreparedFolder, config: ValidationConfig) -> CheckResult:
    desc = "at least one <split>.parquet, each readable and non-empty"
    expected = "one or more readable, non-empty <split>.parquet files"
    files = sorted(out.folder.glob("*.parquet"))
    if not files:
        observed = f"{out.folder}: no *.parquet manifest"
        return CheckResult("manifests_present", "files", desc, "failed", observed, expected)
    frames, problems = [], []
    for path in files:
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError) as e:
            problems.append({"file": path.name, "problem": f"unreadable ({e.__class__.__name__})"})
            continue
        if frame.empty:
            problems.append({"file": path.name, "problem": "no rows"})
            continue
        frame = frame.reset_index(drop=True)
        frame["source_split"] = path.stem
        frame["row_id"] = [f"{path.name}#{i}" for i in range(len(frame))]
        out.missing_by_file[path.name] = [c for c in config.required_columns if c not in frame]
        frames.append(frame)
    if frames:
        rows = pd.concat(frames, ignore_index=True, sort=False)
        partial = {c for missing in out.missing_by_file.values() for c in missing}
        out.rows = rows.drop(columns=[c for c in partial if c in rows])
    found = {"files": [p.name for p in files], "rows": 0 if out.rows is None else len(out.rows)}
    status: Status = "failed" if problems else "passed"
    return CheckResult("manifests_present", "files", desc, status, found, expected, problems)


def _image_dir_check(out: PreparedFolder) -> CheckResult:
    desc = "the image folder named in summary.json exists"
    if out.image_dir is None:
        return CheckResult("image_dir_exists", "files", desc, "skipped",
                           "not evaluated: no usable summary.json", "an existing folder")
    status: Status = "passed" if out.image_dir.is_dir() else "failed"
    return CheckResult("image_dir_exists", "files", desc, status, str(out.image_dir),
                       "an existing folder")
