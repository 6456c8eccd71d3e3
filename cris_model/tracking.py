"""A small experiment-tracking interface: MLflow behind it, or nothing at all.

The training loop only calls `start / log_metrics / log_artifact / end`, so tests and
non-zero DDP ranks use `NullTracker`. The default MLflow store is a SQLite file in the
working directory with artifacts in a folder beside it; any server works by setting the
URI (`train.tracking_uri` or the MLFLOW_TRACKING_URI environment variable).

A tracking server that stops answering mid-run does not stop training: `MlflowTracker`,
given a spool file (as training gives it), keeps the metrics and artifacts it could not
deliver, says so once on stderr, tries again every `retry_s` seconds and delivers them in
order when the server is back. If it is still down when the run ends, they go to that
JSON-lines spool file (named on stderr), which the next `start` of the same run (`cris train
--resume`) delivers first. Nothing is dropped silently. Without a spool a failure raises.
How long one request may take is MLflow's own setting (MLFLOW_HTTP_REQUEST_MAX_RETRIES,
MLFLOW_HTTP_REQUEST_TIMEOUT).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from cris_model.atomic import write_text

DEFAULT_DB = "mlruns.db"
SPOOL = "mlflow_pending.jsonl"  # undelivered tracking records, in the training output folder
_BATCH_METRICS = 1000  # most metrics MLflow accepts in one log_batch request
# MLflow error codes of a server that is down, restarting or overloaded (worth another try)
_UNREACHABLE_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
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


def unreachable(error: BaseException | None) -> bool:
    """Whether an MLflow client failure (or the one it was raised from) is the server being
    unreachable or overloaded, worth another try, rather than a request it refuses."""
    import requests
    from mlflow.exceptions import MlflowException

    while error is not None:
        if isinstance(error, requests.RequestException | ConnectionError | TimeoutError):
            return True
        if isinstance(error, MlflowException) and error.error_code in _UNREACHABLE_CODES:
            return True
        error = error.__cause__
    return False


def client_errors() -> tuple[type[BaseException], ...]:
    """The exception types an MLflow client call raises when a request fails."""
    import requests
    from mlflow.exceptions import MlflowException

    return MlflowException, requests.RequestException, OSError


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when empty), at most 300 characters."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def default_tracking_uri(cwd: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI when set, else `sqlite:///<cwd>/mlruns.db`."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env:
        return env
    return f"sqlite:///{(cwd or Path.cwd()).resolve() / DEFAULT_DB}"


class MlflowTracker:
    """Tracker writing to an MLflow tracking server or store (`tracking_uri`).

    With a `spool` file (training), records that cannot be delivered because the server is
    unreachable are kept in order and retried every `retry_s` seconds; at `end` whatever is
    still undelivered goes to `spool` for the next `start` of the same run. Without one, a
    failed delivery raises at once.
    """

    def __init__(self, tracking_uri: str = "", experiment: str = "cris",
                 spool: Path | None = None, retry_s: float = 30.0) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.run_id: str | None = None
        self.spool = Path(spool) if spool is not None else None
        self.retry_s = retry_s
        self._pending: list[dict[str, Any]] = []  # undelivered records, oldest first
        self._down = False  # the last delivery attempt found the server unreachable
        self._next_try = 0.0  # time.monotonic() before which no delivery is attempted

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return str(found.experiment_id)
        location = None
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri.removeprefix("sqlite:///"))
            location = (db.parent / "mlartifacts").resolve().as_uri()
        try:
            return str(self.client.create_experiment(self.experiment,
                                                     artifact_location=location))
        except MlflowException as e:  # another process created it since the lookup above
            again = self.client.get_experiment_by_name(self.experiment)
            if e.error_code != "RESOURCE_ALREADY_EXISTS" or again is None:
                raise
            return str(again.experiment_id)

    def start(self, run_name: str, params: Mapping[str, Any], run_id: str | None = None) -> None:
        """Open a run named `run_name` with flattened params, or continue `run_id` (first
        delivering what an earlier session of it left in the spool). RuntimeError naming the
        URI when the server cannot be reached."""
        from mlflow.entities import Param

        try:
            if run_id is not None:
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                self._load_spool()
                self._deliver(force=True)
                return
            run = self.client.create_run(self._experiment_id(), run_name=run_name)
            self.run_id = run.info.run_id
            flat = [Param(k, v) for k, v in sorted(flatten_params(params).items())]
            for i in range(0, len(flat), 100):
                self.client.log_batch(self.run_id, params=flat[i : i + 100])
        except client_errors() as e:
            if not unreachable(e):
                raise
            raise RuntimeError(f"{self.tracking_uri}: MLflow unreachable at the start of the "
                               f"run ({first_line(e)}); start it or set train.tracking: "
                               "false") from e

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log every metric at `step` in one request; characters MLflow refuses in a name
        become "_" (val/prec@0.5 -> val/prec_0.5). Buffered while the server is down."""
        if self.run_id is None:
            raise RuntimeError("log_metrics called before start")
        self._pending.append({
            "kind": "metrics", "step": int(step), "time": int(time.time() * 1000),
            "metrics": {_NOT_IN_NAMES.sub("_", k): float(v) for k, v in metrics.items()}})
        self._deliver()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents, into the run's artifacts (later, from
        the same path, while the server is down)."""
        if self.run_id is None:
            raise RuntimeError("log_artifact called before start")
        self._pending.append({"kind": "artifact", "path": str(Path(path).resolve()),
                              "artifact_path": artifact_path})
        self._deliver()

    def end(self, status: str = "FINISHED") -> None:
        """Deliver what is pending and mark the run terminated with `status`; when the server
        is still unreachable, write it all to the spool file and say where on stderr."""
        if self.run_id is None:
            return
        self._pending.append({"kind": "end", "status": status})
        if self._deliver(force=True) or self.spool is None:
            return
        lines = "".join(json.dumps(r) + "\n" for r in self._pending)
        write_text(self.spool, lines)
        print(f"cris: warning: MLflow at {self.tracking_uri} still unreachable at the end of "
              f"run {self.run_id}: {len(self._pending)} record(s) saved to {self.spool}; "
              "`cris train --resume` with the same --out delivers them", file=sys.stderr)

    def _load_spool(self) -> None:
        """Queue a spool file's records (its run-end record dropped: this session ends the
        run) ahead of anything new."""
        if self.spool is None or not self.spool.is_file():
            return
        try:
            records = [json.loads(line) for line in
                       self.spool.read_text(encoding="utf-8").splitlines() if line.strip()]
        except ValueError as e:
            raise ValueError(f"{self.spool}: unreadable tracking spool ({e})") from e
        self._pending[:0] = [r for r in records if r.get("kind") != "end"]
        self._next_try = 0.0

    def _deliver(self, force: bool = False) -> bool:
        """Send pending records in order; False (and keep them) when the server is down and
        there is a spool to fall back on, else the failure is raised."""
        if not self._pending or (not force and time.monotonic() < self._next_try):
            return not self._pending
        try:
            while self._pending:
                self._send_first()
        except client_errors() as e:
            if self.spool is None or not unreachable(e):
                self._pending.clear()
                raise
            if not self._down:
                print(f"cris: warning: MLflow at {self.tracking_uri} unreachable "
                      f"({first_line(e)}); keeping metrics and artifacts, retrying every "
                      f"{self.retry_s:g} s", file=sys.stderr)
            self._down, self._next_try = True, time.monotonic() + self.retry_s
            return False
        if self._down:
            print(f"cris: MLflow at {self.tracking_uri} reachable again; kept records "
                  "delivered", file=sys.stderr)
            self._down = False
        if self.spool is not None:
            self.spool.unlink(missing_ok=True)
        return True

    def _send_first(self) -> None:
        """Deliver the oldest pending record (consecutive metric records in one request)."""
        from mlflow.entities import Metric

        assert self.run_id is not None, "records are only queued after start"
        head = self._pending[0]
        if head["kind"] == "metrics":
            batch: list[Metric] = []
            taken = 0
            for record in self._pending:
                if record["kind"] != "metrics" or (
                        batch and len(batch) + len(record["metrics"]) > _BATCH_METRICS):
                    break
                batch += [Metric(k, v, record["time"], record["step"])
                          for k, v in record["metrics"].items()]
                taken += 1
            self.client.log_batch(self.run_id, metrics=batch)
            del self._pending[:taken]
            return
        if head["kind"] == "artifact":
            path = Path(head["path"])
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), head["artifact_path"])
            else:
                self.client.log_artifact(self.run_id, str(path), head["artifact_path"])
        else:
            self.client.set_terminated(self.run_id, status=head["status"])
        del self._pending[0]


@contextmanager
def fluent_uris(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs set to `uri` for the fluent API, then
    unset again, with the environment variables MLflow mirrors them into put back: a library
    call must not redirect its caller's later MLflow clients."""
    import mlflow

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {name: os.environ.get(name) for name in names}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # MLflow treats None as unset
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
