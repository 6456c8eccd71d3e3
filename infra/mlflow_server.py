"""The MLflow server of the services: `mlflow server` with proxied artifact serving.

Its backend is SQLite (or any SQLAlchemy URL); with an `S3Store` its artifacts go to
`s3://mlflow/artifacts` there.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infra.process import HOST, START_TIMEOUT_S, Service, free_port, started
from infra.s3 import MLFLOW_BUCKET, S3Store


class MlflowServer(Service):
    """`mlflow server` at `url`: runs and models in `backend_uri`, artifacts proxied to
    `artifacts_destination` (default: `s3://mlflow/artifacts` in `s3`, else `root/artifacts`)."""

    name = "mlflow"

    def __init__(self, root: Path, *, backend_uri: str | None = None,
                 artifacts_destination: str | None = None, s3: S3Store | None = None,
                 port: int | None = None, host: str = HOST) -> None:
        super().__init__(root, host)
        self.s3 = s3
        self.backend_uri = backend_uri or f"sqlite:///{self.root / 'mlflow.db'}"
        if artifacts_destination is None:
            artifacts_destination = (f"s3://{MLFLOW_BUCKET}/artifacts" if s3 is not None
                                     else str(self.root / "artifacts"))
        self.artifacts_destination = artifacts_destination
        self.port = port or free_port(host)

    @property
    def url(self) -> str:
        """The tracking URI, http://host:port."""
        return f"http://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                self.backend_uri, "--artifacts-destination", self.artifacts_destination,
                "--serve-artifacts", "--host", self.host, "--port", str(self.port),
                "--workers", "1"]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        return env | (self.s3.env() if self.s3 is not None else {})

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Create the artifact bucket when it lives in `s3`, then start the server."""
        if self.s3 is not None and self.artifacts_destination.startswith("s3://"):
            self.s3.ensure_bucket(self.artifacts_destination[5:].split("/", 1)[0])
        super().start(timeout)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2.0) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def env(self) -> dict[str, str]:
        """Variables that point MLflow clients (and `cris`) at this server."""
        return {"MLFLOW_TRACKING_URI": self.url}


@contextmanager
def mlflow_server(root: Path, *, backend_uri: str | None = None,
                  artifacts_destination: str | None = None, s3: S3Store | None = None,
                  port: int | None = None) -> Iterator[MlflowServer]:
    """A started MlflowServer, stopped on exit."""
    with started(MlflowServer(root, backend_uri=backend_uri,
                               artifacts_destination=artifacts_destination, s3=s3,
                               port=port)) as server:
        yield server
