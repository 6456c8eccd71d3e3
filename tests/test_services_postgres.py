"""The PostgreSQL option of the services: a local cluster, MLflow's backend and Dagster's storage.

One module-scoped `python -m infra.services start --postgres` (free ports, a folder the
server's account can reach) serves the MLflow and Dagster tests; they check what they wrote
by reading PostgreSQL itself. Stopping it is checked on exit: no process left, every port
free. Smaller tests start bare clusters: restart with data, password auth, errors.
Select them with `pytest -m services`.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import mlflow
import psycopg2
import pytest
import yaml
from dagster import DagsterInstance, asset, job, materialize, op
from dagster._core.errors import DagsterInvalidConfigError
from mlflow.tracking import MlflowClient

import infra.postgres as pg
from cris_model.tracking import fluent_uris
from infra.postgres import PostgresServer, postgres_bin_dir
from infra.s3 import MLFLOW_BUCKET
from tests.services_support import (
    ACCESS_KEY,
    SECRET_KEY,
    assert_stopped,
    bucket_keys,
    postgres_root,
)

pytestmark = pytest.mark.services
REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "infra.services"]


def _env(**extra: str) -> dict[str, str]:
    """os.environ without AWS/MLflow/PostgreSQL/Dagster-PG variables, plus S3 keys and `extra`."""
    drop = ("AWS_", "MLFLOW_", "PG", "DAGSTER_PG_", "CRIS_STACK", "CRIS_SERVICES")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)} | {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY} | extra


def _query(port: int, database: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of `statement` run on the services' cluster as its superuser."""
    with psycopg2.connect(host="127.0.0.1", port=port, user="cris", dbname=database) as conn:
        with conn.cursor() as cursor:
            cursor.execute(statement, params)
            rows = cursor.fetchall()
    conn.close()
    return rows


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, Any]]:
    """`infra.services start --postgres` on free ports; on exit `stop`, then checked."""
    with postgres_root() as root:
        state = root / "state"
        where = ["--dir", str(state)]
        started = subprocess.run([*CLI, "start", *where, "--postgres", "--postgres-port", "0",
                                  "--s3-port", "0", "--mlflow-port", "0"], env=_env(),
                                 capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stderr
        info = json.loads(started.stdout)
        config = yaml.safe_load((Path(info["dagster_home"]) / "dagster.yaml").read_text())
        info["pg_port"] = config["storage"]["postgres"]["postgres_db"]["port"]
        try:
            yield info
        finally:
            stopped = subprocess.run([*CLI, "stop", *where], env=_env(), capture_output=True,
                                     text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert json.loads(stopped.stdout)["stopped"] == ["mlflow", "postgres", "s3"]
        ports = [int(info[k].rsplit(":", 1)[1]) for k in ("tracking_uri", "s3_endpoint_url")]
        assert_stopped(list(info["pids"].values()), [*ports, info["pg_port"]])
        assert not list((state / "postgres" / "run").glob(".s.PGSQL.*"))


def test_mlflow_runs_and_model_versions_live_in_postgres_artifacts_in_the_bucket(
    stack: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith(("AWS_", "MLFLOW_"))]:
        monkeypatch.delenv(key)  # artifacts go through the server, not straight to S3
    client = MlflowClient(stack["tracking_uri"])
    experiment_id = client.create_experiment("pg-test")
    run = client.create_run(experiment_id)
    client.log_param(run.info.run_id, "lr", "0.003")
    client.log_metric(run.info.run_id, "val_mIoU", 0.625)
    client.log_text(run.info.run_id, "weights", "model/weights.txt")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("cris-pg")
    version = client.create_model_version("cris-pg", f"runs:/{run.info.run_id}/model",
                                          run_id=run.info.run_id)
    client.set_registered_model_alias("cris-pg", "champion", version.version)

    again = MlflowClient(stack["tracking_uri"])
    champion = again.get_model_version_by_alias("cris-pg", "champion")
    assert (champion.version, champion.run_id) == ("1", run.info.run_id)
    assert again.get_run(run.info.run_id).data.metrics == {"val_mIoU": 0.625}
    with fluent_uris(stack["tracking_uri"]):
        text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/model/weights.txt")
    assert text == "weights"

    port = stack["pg_port"]
    assert _query(port, "mlflow", "SELECT value FROM metrics WHERE run_uuid = %s",
                  run.info.run_id) == [(0.625,)]
    assert _query(port, "mlflow", "SELECT name, version, run_id FROM model_versions") == [
        ("cris-pg", 1, run.info.run_id)]
    s3 = boto3.client("s3", endpoint_url=stack["s3_endpoint_url"], region_name="us-east-1",
                      aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    assert any(k.endswith(f"{run.info.run_id}/artifacts/model/weights.txt")
               for k in bucket_keys(s3, MLFLOW_BUCKET))


@asset
def answer() -> int:
    """A trivial asset for the instance tests."""
    return 42


@op
def noop() -> None:
    """A trivial op."""


@job
def trivial() -> None:
    """A one-op job for the instance tests."""
    noop()


def test_the_services_dagster_instance_keeps_runs_in_postgres(
    stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith(("DAGSTER_PG_", "PG"))]:
        monkeypatch.delenv(key)  # the written dagster.yaml holds the address itself
    with DagsterInstance.from_config(stack["dagster_home"]) as instance:
        result = materialize([answer], instance=instance)
    assert result.success
    assert _query(stack["pg_port"], "dagster", "SELECT status FROM runs WHERE run_id = %s",
                  result.run_id) == [("SUCCESS",)]
    with DagsterInstance.from_config(stack["dagster_home"]) as reopened:
        record = reopened.get_asset_records([answer.key])[0]
        assert record.asset_entry.last_materialization is not None
        assert record.asset_entry.last_materialization.run_id == result.run_id


def test_checked_in_postgres_instance_config_reads_the_dagster_pg_variables(
    stack: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        (REPO / "infra" / "dagster" / "dagster-postgres.yaml").read_text())
    monkeypatch.delenv("DAGSTER_PG_PORT", raising=False)
    with pytest.raises(DagsterInvalidConfigError, match="DAGSTER_PG_PORT"):
        DagsterInstance.from_config(str(home))
    cluster = PostgresServer(tmp_path / "unused", port=stack["pg_port"])
    for key, value in cluster.env().items():
        monkeypatch.setenv(key, value)
    with DagsterInstance.from_config(str(home)) as instance:
        result = trivial.execute_in_process(instance=instance)
        assert instance.get_run_by_id(result.run_id) is not None
    assert result.success
    assert _query(stack["pg_port"], "dagster", "SELECT pipeline_name FROM runs WHERE "
                  "run_id = %s", result.run_id) == [("trivial",)]


def _uid(pid: int) -> int:
    """The real uid of process `pid`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def test_cluster_runs_unprivileged_on_loopback_restarts_with_its_data_and_stops_cleanly(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with postgres_root() as root:
        server = PostgresServer(root / "pg", databases=("app",))
        server.start()
        try:
            pid, port = server.pid or 0, server.port
            expected = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.getuid()
            assert _uid(pid) == expected != 0
            assert server.url == f"postgresql+psycopg2://cris@127.0.0.1:{port}/app"
            assert _query(port, "app", "SHOW listen_addresses") == [("127.0.0.1",)]
            assert (root / "pg" / "run" / f".s.PGSQL.{port}").exists()
            _query(port, "app", "CREATE TABLE kept (v int); INSERT INTO kept VALUES (7); "
                   "SELECT 1")
            server.stop()
            assert_stopped([pid], [port])
            assert not (root / "pg" / "run" / f".s.PGSQL.{port}").exists()
            server.start()
            assert server.port == port and server.pid != pid
            assert _query(port, "app", "SELECT v FROM kept") == [(7,)]
            log = server.log_path.read_text()
            assert log.count("Success. You can now start the database server") == 1
        finally:
            pid = server.pid or 0
            server.stop()
        assert_stopped([pid], [port])
        assert server.pid is None and not server.running


def test_pgpassword_at_first_start_makes_loopback_ask_for_it(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSWORD", "cris-pg-secret-42")
    with postgres_root() as root:
        server = PostgresServer(root / "pg", databases=("app",))
        server.start()
        try:
            assert "secret" not in server.url
            hba = [line.split() for line in (root / "pg" / "data" / "pg_hba.conf").read_text()
                   .splitlines() if line and not line.startswith("#")]
            assert [h[-1] for h in hba if h[0] == "host"] == ["scram-sha-256"] * 2
            assert {h[3] for h in hba if h[0] == "host"} == {"127.0.0.1/32", "::1/128"}
            assert _query(server.port, "app", "SELECT current_user") == [("cris",)]
            with pytest.raises(psycopg2.OperationalError, match="password authentication"):
                psycopg2.connect(host="127.0.0.1", port=server.port, user="cris",
                                 dbname="app", password="wrong")
        finally:
            server.stop()


def test_server_binaries_are_found_by_version_and_missing_ones_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (postgres_bin_dir() / "initdb").is_file()
    monkeypatch.delenv("CRIS_PG_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for version in ("9.6", "15", "16", "notes"):
        folder = tmp_path / "lib" / version / "bin"
        folder.mkdir(parents=True)
        for program in ("initdb", "postgres"):
            (folder / program).write_text("")
    monkeypatch.setattr(pg, "PG_DEBIAN_ROOT", str(tmp_path / "lib"))
    assert postgres_bin_dir() == tmp_path / "lib" / "16" / "bin"
    monkeypatch.setenv("CRIS_PG_BIN", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*make setup-postgres"):
        postgres_bin_dir()
    with pytest.raises(FileNotFoundError, match="make setup-postgres"):
        PostgresServer(tmp_path / "pg").start()


@pytest.mark.skipif(os.geteuid() != 0, reason="the account switch happens only under root")
def test_under_root_a_folder_the_server_account_cannot_reach_is_named(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    server = PostgresServer(private / "pg")
    with pytest.raises(ValueError, match=rf"{private}: not searchable by 'postgres'"):
        server.start()
    assert server.pid is None and not (private / "pg" / "data" / "PG_VERSION").exists()


def test_cli_refuses_postgres_with_another_backend(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "start", "--dir", str(tmp_path), "--postgres",
                           "--backend-uri", "sqlite:///x.db"], env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert "--postgres and --backend-uri both choose" in done.stderr
    assert not (tmp_path / "postgres").exists()
