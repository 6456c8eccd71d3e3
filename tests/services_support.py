"""Helpers for tests/test_services.py: the real services on loopback and what they hold.

`running_stack` starts a SeaweedFS S3 store and an MLflow server (SQLite backend, artifacts
proxied into the store) on free ports under one folder, writes the `stack.json` that
`CRIS_STACK=services` reads, and stops both on exit; `postgres_root` gives a PostgreSQL
cluster a folder its server account can reach. `upload_dataset` puts a dataset folder
into a bucket with the `SHA256SUMS` manifest `cris data fetch` requires; `dvc` runs the DVC
command of `.venv-dvc` (never imported beside Dagster).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from file_trees import put_tree, tree_bytes

from infra.mlflow_server import MlflowServer
from infra.process import group_alive, port_is_free
from infra.s3 import DATA_BUCKET, S3Store
from infra.stack import Stack, write_stack

REPO = Path(__file__).resolve().parents[1]
DVC = REPO / ".venv-dvc" / "bin" / "dvc"
ACCESS_KEY = "cris-test-key"  # the store's only identity in these tests
SECRET_KEY = "cris-test-secret-0123456789"


@dataclass
class RunningStack:
    """The started services and the stack file that describes them."""

    s3: S3Store
    mlflow: MlflowServer
    state: Path  # the folder holding stack.json (what $CRIS_SERVICES_DIR names)
    stack: Stack

    def ports(self) -> list[int]:
        """Every port either service listens on."""
        return [self.s3.port, *self.s3.weed_ports().values(), self.mlflow.port]


@contextmanager
def running_stack(root: Path, data_source: str = "",
                  backend_uri: str | None = None) -> Iterator[RunningStack]:
    """Both services started under `root` (MLflow on `backend_uri`, default SQLite), the stack
    file written; both stopped on exit."""
    s3 = S3Store(root / "s3", access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    s3.start()
    mlflow = MlflowServer(root / "mlflow", s3=s3, backend_uri=backend_uri)
    try:
        s3.ensure_bucket(DATA_BUCKET)
        mlflow.start()
        home = root / "dagster"
        home.mkdir()
        (home / "dagster.yaml").write_text((REPO / "infra/dagster/dagster.yaml").read_text())
        stack = Stack(tracking_uri=mlflow.url, s3_endpoint_url=s3.endpoint_url,
                      storage_remote=f"s3://{DATA_BUCKET}/assets",
                      dvc_remote=f"s3://{DATA_BUCKET}/dvc", dagster_home=str(home),
                      data_source=data_source,
                      pids={"s3": s3.pid or 0, "mlflow": mlflow.pid or 0},
                      logs={"s3": str(s3.log_path), "mlflow": str(mlflow.log_path)})
        write_stack(root, stack)
        yield RunningStack(s3=s3, mlflow=mlflow, state=root, stack=stack)
    finally:
        mlflow.stop()
        s3.stop()


@contextmanager
def postgres_root() -> Iterator[Path]:
    """A fresh folder (0755) for PostgreSQL clusters, removed on exit. Under root the server
    runs as `postgres`, which cannot enter pytest's private (0700) tmp folders, so this one
    sits in the world-searchable system temp folder."""
    folder = Path(tempfile.mkdtemp(prefix="cris-pg-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def assert_stopped(pids: list[int], ports: list[int]) -> None:
    """No process of the given groups is alive and every port can be bound again."""
    assert not [pid for pid in pids if group_alive(pid)], "a service process survived stop"
    assert [p for p in ports if not port_is_free(p)] == [], "a service port is still taken"


def upload_dataset(client: Any, folder: Path, bucket: str, prefix: str) -> dict[str, bytes]:
    """Upload `folder` plus a SHA256SUMS to `s3://bucket/prefix/`; {relative path: bytes}."""
    files = tree_bytes(folder)
    put_tree(client, bucket, prefix, files)
    return files


def bucket_keys(client: Any, bucket: str, prefix: str = "") -> list[str]:
    """Every object key under `prefix` in `bucket`."""
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    return keys


def dvc(cwd: Path, *args: str, env: dict[str, str]) -> str:
    """Run `.venv-dvc/bin/dvc ARGS` in `cwd`; its stdout, or AssertionError with its output."""
    done = subprocess.run([str(DVC), *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout
