"""Tracking faults against a real `mlflow server` on loopback that the test stops and starts.

- Down during training: training goes on; the metrics and artifacts it could not deliver
  are kept and delivered when the server is back, or, if it is still down at the end, saved
  to a spool file that `cris train --resume` delivers. Nothing is lost, nothing doubled.
- Down during registration: `register` retries with bounded waits and then fails in one
  clear line; a registration whose answer was lost after the server created the version
  is retried and still leaves exactly one version for that training run.

The training processes wait for the test at chosen steps (`reliability_support.pause_env`),
so the outage always falls at the same place. MLflow's own HTTP retries are turned down
(`FAST_MLFLOW`) so a stopped server fails a request in milliseconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from fetch_servers import DROP
from mlflow.tracking import MlflowClient
from reliability_support import (
    FAST_MLFLOW,
    MlflowFaultProxy,
    cris,
    pause,
    pause_env,
)
from tiny_refer import make_prepared

from cris_model.registry import RegistryConfig, register
from cris_model.tracking import SPOOL, MlflowTracker
from infra.mlflow_server import MlflowServer
from infra.process import free_port

STEPS = 6  # 12 referred objects / batch 4 = 3 steps per epoch, 2 epochs
CREATE_VERSION = "api/2.0/mlflow/model-versions/create"


def _params(uri: str) -> dict[str, Any]:
    return {
        "model": {"preset": "cris_tiny", "random_init": True},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "progress": False, "log_every": 1,
                  "gallery_size": 0, "tracking": True, "tracking_uri": uri,
                  "experiment": "outage", "tracking_retry_s": 0.2},
        "eval": {"threshold": 0.35},
    }


def _listening_hosts(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port` (from /proc/net/tcp{,6})."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                hosts.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0))
                          if len(address) == 8 else address)
    return hosts


def _history(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def _run_id(out: Path) -> str:
    return str(json.loads((out / "last" / "extra.json").read_text())["run_id"])


@pytest.mark.slow
def test_training_and_registration_survive_a_stopped_tracking_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in FAST_MLFLOW.items():
        monkeypatch.setenv(key, value)
    data = make_prepared(tmp_path / "refer", {"train": 6, "val": 2})
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    try:
        assert _listening_hosts(server.port) == {"127.0.0.1"}
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump(_params(server.url)))
        common = ["train", "--params", str(params), "--data", str(data)]
        env = {**pause_env(tmp_path, tmp_path / "a", [2, 5]), **FAST_MLFLOW}
        back = cris(*common, "--out", str(tmp_path / "back"), env=env)
        env = {**pause_env(tmp_path, tmp_path / "b", [2]), **FAST_MLFLOW}
        never = cris(*common, "--out", str(tmp_path / "never"), env=env)
        pause(never, tmp_path / "b", 2, lambda: pause(back, tmp_path / "a", 2, server.stop))

        _, err = never.communicate(timeout=300)  # the whole second half without a server
        assert never.returncode == 0, err
        assert "MLflow at" in err and "unreachable" in err
        spool = tmp_path / "never" / SPOOL
        assert f"saved to {spool}" in err
        kinds = [json.loads(line)["kind"] for line in spool.read_text().splitlines()]
        assert kinds.count("metrics") >= STEPS - 1 and kinds[-2:] == ["artifact", "end"]

        config = RegistryConfig(model_name="cris", tracking_uri=server.url, retries=1,
                                retry_backoff_s=0.1)
        with pytest.raises(RuntimeError, match=r"MLflow unreachable after 2 attempt\(s\)"):
            register(tmp_path / "never" / "best", config)

        pause(back, tmp_path / "a", 5, server.start)
        _, err = back.communicate(timeout=300)
        assert back.returncode == 0, err
        assert "unreachable" in err and "reachable again; kept records delivered" in err
        resumed = cris(*common, "--out", str(tmp_path / "never"), "--resume",
                       env={**pause_env(tmp_path, tmp_path / "c", []), **FAST_MLFLOW})
        _, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err
        assert not spool.exists()

        client = MlflowClient(server.url)
        for out in ("back", "never"):
            run_id = _run_id(tmp_path / out)
            assert client.get_run(run_id).info.status == "FINISHED"
            assert _history(client, run_id, "train/loss") == list(range(1, STEPS + 1)), out
            assert _history(client, run_id, "val/mIoU") == [3, 6], out
            assert "best" in {a.path for a in client.list_artifacts(run_id)}, out

        with MlflowFaultProxy(server.url) as proxy:
            proxy.faults[CREATE_VERSION] = [DROP]  # created, but the answer is lost
            through = RegistryConfig(model_name="cris", tracking_uri=proxy.url().rstrip("/"),
                                     retries=2, retry_backoff_s=0.1)
            first = register(tmp_path / "back" / "best", through)  # retried, then found
            again = register(tmp_path / "back" / "best", through)
            assert len(proxy.hits(CREATE_VERSION)) == 1
        assert first["version"] == again["version"] == 1 and again["reused"] is True
        versions = client.search_model_versions("name = 'cris'")
        assert [(v.version, v.run_id) for v in versions] == [("1", _run_id(tmp_path / "back"))]
    finally:
        server.stop()


def test_a_tracking_server_down_at_the_start_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in FAST_MLFLOW.items():
        monkeypatch.setenv(key, value)
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RuntimeError, match=rf"^{re.escape(uri)}: MLflow unreachable at the start"
                       r" of the run \(.*\); start it or set train.tracking: false$"):
        MlflowTracker(uri, "nowhere").start("run", {"train": {"lr": 1.0}})
