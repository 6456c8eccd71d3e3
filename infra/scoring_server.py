"""MLflow's scoring server for a registered model, and a client for its /invocations route.

`ScoringServer` runs `mlflow models serve -m <model uri> --env-manager local` (this
environment's mlflow, no conda or virtualenv) on loopback; `invoke` posts one JSON request
and returns the HTTP status with the decoded answer, whatever the status.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from infra.process import HOST, Service, free_port

REQUEST_TIMEOUT_S = 120.0  # bound on one /invocations answer


class ScoringServer(Service):
    """`mlflow models serve` of `model_uri` (e.g. models:/cris@champion) from `tracking_uri`."""

    name = "scoring"

    def __init__(self, root: Path, model_uri: str, tracking_uri: str, *,
                 port: int | None = None, host: str = HOST) -> None:
        super().__init__(root, host)
        self.model_uri, self.tracking_uri = model_uri, tracking_uri
        self.port = port or free_port(host)

    @property
    def url(self) -> str:
        """Base URL of the server, http://host:port."""
        return f"http://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        mlflow = Path(sys.executable).parent / "mlflow"
        return [str(mlflow), "models", "serve", "-m", self.model_uri, "--env-manager", "local",
                "-h", self.host, "-p", str(self.port)]

    def _env(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)  # the uvicorn mlflow starts is this env's
        return {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri,
                "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False


def invoke(url: str, payload: dict[str, Any],
           timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, dict[str, Any]]:
    """POST `payload` as JSON to `url`/invocations -> (HTTP status, decoded JSON body)."""
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return int(e.code), json.loads(body)
        except ValueError:
            return int(e.code), {"message": body.decode("utf-8", "replace")}
