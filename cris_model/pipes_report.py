"""Report a finished `cris train` to Dagster when it runs under Dagster Pipes.

The Dagster asset `trained_model` launches `cris train` as its own process (or under
torchrun) through Dagster Pipes, which sets DAGSTER_PIPES_CONTEXT. Outside Pipes this module
does nothing. `dagster_pipes` is a small standalone package (not Dagster itself), imported
only when Pipes is active.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

PIPES_ENV = "DAGSTER_PIPES_CONTEXT"  # set by a Dagster Pipes client for its subprocess


def under_pipes() -> bool:
    """True when this process was launched by a Dagster Pipes client."""
    return bool(os.environ.get(PIPES_ENV))


def training_metadata(result: Mapping[str, Any]) -> dict[str, float | int | str]:
    """Flat materialization metadata from a `TrainResult` dict: counts, run id, val metrics.

    Best-checkpoint val metrics become `val_<name>` (e.g. val_mIoU); None values are left out.
    """
    out: dict[str, float | int | str] = {}
    for key in ("epochs", "steps", "best_epoch", "samples_per_s", "run_id", "out_dir"):
        value = result.get(key)
        if value is not None:
            out[key] = value
    for name, value in (result.get("best_metrics") or {}).items():
        out[f"val_{name}"] = float(value)
    return out


def report_training(result: Mapping[str, Any]) -> bool:
    """Under Pipes, report `result` (a `TrainResult` as a dict) as the asset's materialization
    metadata and return True; otherwise do nothing and return False. Call on rank 0 only."""
    if not under_pipes():
        return False
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        pipes.report_asset_materialization(metadata=training_metadata(result))
    return True
