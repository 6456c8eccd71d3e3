"""A small experiment-tracking interface: MLflow behind it, or nothing at all.

The training loop only calls `start / log_metrics / log_artifact / end`, so tests and
non-zero DDP ranks use `NullTracker`. The default MLflow store is a SQLite file in the
working directory with artifacts in a folder beside it; any server works by setting the
URI (`train.tracking_uri` or the MLFLOW_TRACKING_URI environment variable).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

DEFAULT_DB = "mlruns.db"
_MAX_PARAM_CHARS = 6000
_NOT_IN_NAMES = re.compile(r"[^\w\-. :/]")  # characters MLflow refuses in metric names


class Tracker(Protocol):
    """What the training loop needs from a tracker."""

    run_id: str | None

    def start(self, run_name: str, params: Mapping[str, Any], run_id: str | None = None) -> None:
        """Open a new run (logging params), or reopen `run_id` to continue it."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar metrics at a global step."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or a whole directory under `artifact_path`."""

    def end(self, status: str = "FINISHED") -> None:
        """Close the run: FINISHED, FAILED or KILLED."""


class NullTracker:
    """Records nothing (tracking disabled, or a non-zero DDP rank)."""

    run_id: str | None = None

    def start(self, run_name: str, params: Mapping[str, Any], run_id: str | None = None) -> None:
        """Keep `run_id` so it still reaches the checkpoint; log nothing."""
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Drop the metrics."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Drop the artifact."""

    def end(self, status: str = "FINISHED") -> None:
        """Nothing to close."""


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": "0.001"} (values as strings, clipped for MLflow)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = str(value)[:_MAX_PARAM_CHARS]
    return out


def default_tracking_uri(cwd: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI when set, else `sqlite:///<cwd>/mlruns.db`."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env:
        return env
    return f"sqlite:///{(cwd or Path.cwd()).resolve() / DEFAULT_DB}"


class MlflowTracker:
    """Tracker writing to an MLflow tracking server or store (`tracking_uri`)."""

    def __init__(self, tracking_uri: str = "", experiment: str = "cris") -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.run_id: str | None = None

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return str(found.experiment_id)
        location = None
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            location = (db.parent / "mlartifacts").resolve().as_uri()
        return str(self.client.create_experiment(self.experiment, artifact_location=location))

    def start(self, run_name: str, params: Mapping[str, Any], run_id: str | None = None) -> None:
        """Open a run named `run_name` with flattened params, or continue `run_id`."""
        from mlflow.entities import Param

        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        run = self.client.create_run(self._experiment_id(), run_name=run_name)
        self.run_id = run.info.run_id
        flat = [Param(k, v) for k, v in sorted(flatten_params(params).items())]
        for i in range(0, len(flat), 100):
            self.client.log_batch(self.run_id, params=flat[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log every metric at `step` in one request; characters MLflow refuses in a name
        become "_" (val/prec@0.5 -> val/prec_0.5)."""
        from mlflow.entities import Metric

        if self.run_id is None:
            raise RuntimeError("log_metrics called before start")
        now = int(time.time() * 1000)
        batch = [Metric(_NOT_IN_NAMES.sub("_", k), float(v), now, step)
                 for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents, into the run's artifacts."""
        if self.run_id is None:
            raise RuntimeError("log_artifact called before start")
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run terminated with `status`."""
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
