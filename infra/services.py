"""`python -m infra.services start|stop|status`: the real services behind `make services`.

- `infra.s3.S3Store`: SeaweedFS (`weed mini`) serving S3, its data under `root/data`, its
  credentials the ones given (the store refuses any other key); its internal ports are picked
  free at first start and kept, so a restart comes back on the same addresses and objects.
- `infra.mlflow_server.MlflowServer`: `mlflow server` with a SQLite (or any SQLAlchemy)
  backend and proxied artifact serving; with an `S3Store` its artifacts go to
  `s3://mlflow/artifacts` there.
- `infra.postgres.PostgresServer`: a PostgreSQL cluster of its own (Debian's binaries, `initdb`
  on first start) with the databases MLflow and Dagster use. Run as `postgres` under root.

Each service runs in its own process group (`infra.process`), binds 127.0.0.1 unless told
otherwise, logs to `root/<name>.log`, and is stopped with SIGTERM (PostgreSQL: SIGINT, its
fast shutdown), then SIGKILL, until no process of its group is left.

`start` runs them in the background (state, logs and data under `.services/`; `--postgres`
adds the cluster and moves MLflow's runs and the Dagster instance into it); `infra.stack`
reads what it leaves there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from infra.mlflow_server import MlflowServer
from infra.postgres import PostgresServer, stop_postgres
from infra.process import HOST, Service, group_alive, stop_group
from infra.s3 import DATA_BUCKET, S3Store
from infra.stack import STATE_NAME, Stack, read_stack, services_dir, write_stack

DAGSTER_CONFIGS = {  # the services' Dagster instance config, by "PostgreSQL is on"
    False: Path(__file__).resolve().parent / "dagster" / "dagster.yaml",
    True: Path(__file__).resolve().parent / "dagster" / "dagster-postgres.yaml",
}


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
    started: list[Service] = []
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
