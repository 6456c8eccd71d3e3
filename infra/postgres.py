"""The PostgreSQL cluster of the services: Debian's binaries, `initdb` on first start.

`PostgresServer` keeps its cluster under `root`, bound to `host`, with the databases MLflow
and Dagster use; its `url` is a SQLAlchemy URL for MLflow's backend, its `env()` the
DAGSTER_PG_* variables of infra/dagster/dagster-postgres.yaml. It runs as `postgres` when
started by root, and is stopped with SIGINT (its fast shutdown), then as any `Service`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from stat import S_IXGRP, S_IXOTH, S_IXUSR
from typing import Any

from infra.process import (
    HOST,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Service,
    free_port,
    group_alive,
    started,
    stop_group,
)

PG_USER = "cris"  # superuser of the services' PostgreSQL cluster
PG_DATABASES = ("mlflow", "dagster")  # databases the cluster gets: MLflow's and Dagster's
PG_RUN_AS = "postgres"  # account the server runs as when started by root (Debian's)
PG_PASSWORD_ENV = "PGPASSWORD"  # libpq's own variable: the cluster's password, never in a file
PG_SCHEME = "postgresql+psycopg2"  # SQLAlchemy 2.1 reads bare postgresql:// as psycopg 3
PG_BIN_ENV = "CRIS_PG_BIN"  # folder of initdb/postgres/pg_isready, overriding the search
PG_DEBIAN_ROOT = "/usr/lib/postgresql"  # Debian's <version>/bin folders live here


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


class PostgresServer(Service):
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
def postgres_server(root: Path, *, user: str = PG_USER,
                    databases: tuple[str, ...] = PG_DATABASES,
                    port: int | None = None) -> Iterator[PostgresServer]:
    """A started PostgresServer, stopped (fast shutdown) on exit."""
    with started(PostgresServer(root, user=user, databases=databases, port=port)) as server:
        yield server
