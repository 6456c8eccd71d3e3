"""The pipeline on real services: SeaweedFS S3 and an MLflow server, on loopback.

One module-scoped stack (S3 store + MLflow server with SQLite backend and artifacts proxied
into the store, free ports) serves every test; one run materializes the whole synthetic
pipeline against it through the `CRIS_STACK=services` switch. The other tests read what it
left: `cris data fetch` from the bucket, DVC push/pull through the store, MLflow artifacts
in the bucket and `models:/cris@champion` loaded through the server, restarts and clean
stops. Select them with `pytest -m services`.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from botocore.exceptions import ClientError
from dagster import AssetKey, DagsterInstance, PipesSubprocessClient, materialize
from file_trees import tree_bytes
from mlflow.tracking import MlflowClient
from PIL import Image

from cris_model.data.synth import generate
from cris_model.tracking import fluent_uris
from infra.process import free_port
from infra.s3 import DATA_BUCKET, MLFLOW_BUCKET, S3Store
from infra.stack import Stack, active_stack, read_stack
from pipelines.definitions import ASSETS
from pipelines.defs.checks import prepared_data_checks
from pipelines.defs.jobs import PROMOTION_FILE, promote_model
from pipelines.defs.resources import (
    ComputeResource,
    MlflowResource,
    ParamsResource,
    StorageResource,
)
from tests.services_support import (
    ACCESS_KEY,
    SECRET_KEY,
    RunningStack,
    assert_stopped,
    bucket_keys,
    dvc,
    running_stack,
    upload_dataset,
)

pytestmark = pytest.mark.services
TINY = ["data.synth_images=24", "train.epochs=1", "train.max_steps=2", "train.batch_size=8",
        "train.log_every=1", "train.progress=false"]
DATASET = f"s3://{DATA_BUCKET}/datasets/tiny"
SPLITS = ("val", "testA", "testB")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
               "AWS_DEFAULT_REGION": "us-east-1"}


def _clean_env(**extra: str) -> dict[str, str]:
    """os.environ without AWS/MLflow/CRIS service variables, plus `extra`."""
    drop = ("AWS_", "MLFLOW_", "CRIS_S3", "CRIS_STACK", "CRIS_SERVICES")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)} | extra


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """The stack for this module, with a synthetic dataset in the bucket; on exit, stopped
    and checked: no process left, every port free."""
    root = tmp_path_factory.mktemp("services")
    with running_stack(root / "stack", data_source=DATASET) as stack:
        generate(root / "synth", images=24, seed=0)
        upload_dataset(stack.s3.client(), root / "synth", DATA_BUCKET, "datasets/tiny")
        yield stack
        pids, ports = [stack.s3.pid or 0, stack.mlflow.pid or 0], stack.ports()
    assert_stopped(pids, ports)


def _metadata(result: Any, name: str) -> dict[str, Any]:
    events = [e.materialization for e in result.get_asset_materialization_events()
              if e.asset_key == AssetKey(name)]
    assert len(events) == 1, f"{name} materialized {len(events)} times"
    return {k: v.value for k, v in events[0].metadata.items()}


@pytest.fixture(scope="module")
def pipeline(services: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The whole graph, evaluation per split, registration and promotion, with every
    resource left at its default under CRIS_STACK=services (only the sizes are tiny)."""
    assets = tmp_path_factory.mktemp("pipeline") / "assets"
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith(("AWS_", "MLFLOW_"))]:
            mp.delenv(key)
        for key, value in {**CREDENTIALS, "CRIS_STACK": "services",
                           "CRIS_SERVICES_DIR": str(services.state)}.items():
            mp.setenv(key, value)
        resources = {
            "params": ParamsResource(overrides=TINY), "storage": StorageResource(root=str(assets)),
            "mlflow": MlflowResource(experiment="services-test"),
            "compute": ComputeResource(device="cpu"), "pipes": PipesSubprocessClient(),
        }
        with DagsterInstance.from_config(services.stack.dagster_home) as instance:
            runs = {"upstream": materialize([*ASSETS, prepared_data_checks],
                                            resources=resources, instance=instance,
                                            selection="*trained_model")}
            for split in SPLITS:
                runs[split] = materialize(ASSETS, resources=resources, instance=instance,
                                          selection="evaluation", partition_key=split)
            runs["register"] = materialize(ASSETS, resources=resources, instance=instance,
                                           selection="registered_model")
            runs["promote"] = promote_model.execute_in_process(resources=resources,
                                                               instance=instance)
            run_ids = {r.run_id for r in instance.get_runs()}
    return {"assets": assets, "runs": runs, "resources": resources, "run_ids": run_ids}


def test_the_switch_points_every_resource_at_the_services(
    services: RunningStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CRIS_SERVICES_DIR", str(services.state))
    monkeypatch.setenv("CRIS_STACK", "embedded")
    assert active_stack() == Stack()
    assert StorageResource().remote == "" and MlflowResource().tracking_uri.startswith("sqlite")
    assert ParamsResource().load()["data"]["source"] == "synth"
    monkeypatch.setenv("CRIS_STACK", "services")
    assert StorageResource().endpoint_url == services.s3.endpoint_url
    assert StorageResource().remote == f"s3://{DATA_BUCKET}/assets"
    assert MlflowResource().tracking_uri == services.mlflow.url
    assert ParamsResource(overrides=["train.epochs=2"]).load()["data"]["source"] == DATASET
    words = subprocess.run([sys.executable, "-m", "infra.stack", "env"], capture_output=True,
                           text=True, check=True).stdout.split()
    assert f"MLFLOW_TRACKING_URI={services.mlflow.url}" in words
    assert f"DAGSTER_HOME={services.stack.dagster_home}" in words
    monkeypatch.setenv("CRIS_STACK", "cloud")
    with pytest.raises(ValueError, match="CRIS_STACK='cloud'"):
        active_stack()


@pytest.mark.slow
def test_the_pipeline_runs_on_the_services(services: RunningStack,
                                           pipeline: dict[str, Any]) -> None:
    runs = pipeline["runs"]
    assert all(r.success for r in runs.values())
    raw = _metadata(runs["upstream"], "raw_dataset")
    assert raw["source"] == DATASET and raw["summary"]["files"] > 0
    assert raw["remote"] == f"s3://{DATA_BUCKET}/assets/raw"
    keys = bucket_keys(services.s3.client(), DATA_BUCKET, "assets/")
    for name in ("raw/refcoco/instances.json", "prepared/val.parquet",
                 "train/best/metrics.json", "eval/val/metrics.json"):
        assert f"assets/{name}" in keys
    client = MlflowClient(services.mlflow.url)
    experiment = client.get_experiment_by_name("services-test")
    assert experiment is not None
    assert client.search_runs([experiment.experiment_id])
    with DagsterInstance.from_config(services.stack.dagster_home) as instance:
        assert {r.run_id for r in instance.get_runs()} == pipeline["run_ids"]
        assert {r.run_id for r in runs.values()} <= pipeline["run_ids"]
    promotion = json.loads((pipeline["assets"] / PROMOTION_FILE).read_text())
    assert promotion["promoted"] is True and promotion["tracking_uri"] == services.mlflow.url


def _png(size: int = 64) -> bytes:
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[8:40, 8:40] = (220, 30, 30)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.slow
def test_mlflow_artifacts_land_in_the_bucket_and_the_champion_loads_through_the_server(
    services: RunningStack, pipeline: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = bucket_keys(services.s3.client(), MLFLOW_BUCKET, "artifacts/")
    assert any(k.endswith("/MLmodel") for k in keys)
    assert any(k.endswith(".safetensors") for k in keys)
    for key in [k for k in os.environ if k.startswith(("AWS_", "MLFLOW_"))]:
        monkeypatch.delenv(key)  # no S3 credentials: artifacts must come through the server
    with fluent_uris(services.mlflow.url):
        model = mlflow.pyfunc.load_model("models:/cris@champion")
    frame = pd.DataFrame({"image": [base64.b64encode(_png()).decode()],
                          "text": ["the red square"]})
    out = model.predict(frame)
    assert list(out.columns) == ["mask", "height", "width", "area"]
    assert (int(out["height"][0]), int(out["width"][0])) == (64, 64)


def test_cris_data_fetch_reads_the_bucket_with_standard_aws_variables(
    services: RunningStack, tmp_path: Path
) -> None:
    expected = tree_bytes(services.state.parent / "synth")
    cris = str(Path(sys.executable).with_name("cris"))
    env = _clean_env(**CREDENTIALS, AWS_ENDPOINT_URL=services.s3.endpoint_url, CI="1")
    done = subprocess.run([cris, "data", "fetch", "--source", DATASET, "--out",
                           str(tmp_path / "raw")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    got = tree_bytes(tmp_path / "raw")
    assert got.pop(".cris-fetch.json") and got.pop("SHA256SUMS")
    assert got == expected
    wrong = {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    refused = subprocess.run([cris, "data", "fetch", "--source", DATASET, "--out",
                              str(tmp_path / "denied")], env=wrong, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 1 and refused.stderr.startswith("cris: error:")
    assert "403" in refused.stderr and not (tmp_path / "denied").exists()


@pytest.mark.slow
def test_dvc_pushes_and_pulls_prepared_data_and_checkpoints_through_the_store(
    services: RunningStack, pipeline: dict[str, Any], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(pipeline["assets"] / "prepared", repo / "data" / "prepared")
    shutil.copytree(pipeline["assets"] / "train" / "best", repo / "runs" / "best")
    expected = {d: tree_bytes(repo / d) for d in ("data/prepared", "runs/best")}
    env = _clean_env(**CREDENTIALS, DVC_NO_ANALYTICS="1", GIT_CONFIG_NOSYSTEM="1")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q", env=env)
    dvc(repo, "add", "data/prepared", "runs/best", env=env)
    dvc(repo, "remote", "add", "-d", "store", f"s3://{DATA_BUCKET}/dvc-test", env=env)
    dvc(repo, "remote", "modify", "--local", "store", "endpointurl", services.s3.endpoint_url,
        env=env)
    dvc(repo, "push", env=env)
    tracked = (repo / ".dvc" / "config").read_text()
    assert "endpointurl" not in tracked and SECRET_KEY not in tracked
    assert services.s3.endpoint_url in (repo / ".dvc" / "config.local").read_text()
    assert "config.local" in (repo / ".dvc" / ".gitignore").read_text()
    keys = bucket_keys(services.s3.client(), DATA_BUCKET, "dvc-test/")
    assert len(keys) >= sum(len(files) for files in expected.values())
    for folder in ("data/prepared", "runs/best", ".dvc/cache"):
        shutil.rmtree(repo / folder)
    dvc(repo, "pull", env=env)
    assert {d: tree_bytes(repo / d) for d in expected} == expected


def test_s3_store_refuses_a_wrong_secret_and_keeps_objects_across_a_restart(
    services: RunningStack
) -> None:
    s3 = services.s3
    s3.client().put_object(Bucket=DATA_BUCKET, Key="restart/probe.txt", Body=b"still here")
    bad = S3Store(s3.root, access_key=ACCESS_KEY, secret_key="wrong-secret", port=s3.port)
    with pytest.raises(ClientError) as refused:
        bad.client().list_buckets()
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    old_pid, ports = s3.pid or 0, [s3.port, *s3.weed_ports().values()]
    s3.stop()
    assert_stopped([old_pid], ports)
    s3.start()
    assert s3.pid != old_pid and [s3.port, *s3.weed_ports().values()] == ports
    body = s3.client().get_object(Bucket=DATA_BUCKET, Key="restart/probe.txt")["Body"].read()
    assert body == b"still here"


@pytest.mark.slow
def test_mlflow_server_restarts_on_its_port_with_its_registry(
    services: RunningStack, pipeline: dict[str, Any]
) -> None:
    server = services.mlflow
    old_pid = server.pid or 0
    server.stop()
    assert_stopped([old_pid], [server.port])
    server.start()
    assert server.pid != old_pid
    found = MlflowClient(server.url, registry_uri=server.url).get_model_version_by_alias(
        "cris", "champion")
    assert int(found.version) >= 1


def test_a_service_that_cannot_bind_fails_naming_its_log_and_leaves_nothing(
    tmp_path: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        store = S3Store(tmp_path / "s3", access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                        port=port)
        with pytest.raises(RuntimeError, match=r"see .*s3\.log"):
            store.start(timeout=20)
    assert store.pid is None
    assert_stopped([], list(store.weed_ports().values()))
    with pytest.raises(ValueError, match="non-empty"):
        S3Store(tmp_path, access_key="", secret_key="x")


@pytest.mark.slow
def test_make_services_cli_starts_reports_and_stops_both(tmp_path: Path) -> None:
    state = tmp_path / "state"
    base = [sys.executable, "-m", "infra.services"]
    where = ["--dir", str(state)]
    env = _clean_env(**CREDENTIALS)
    missing = subprocess.run([*base, "start", *where], env=_clean_env(), capture_output=True,
                             text=True)
    assert missing.returncode == 1 and "AWS_ACCESS_KEY_ID" in missing.stderr
    started = subprocess.run([*base, "start", *where, "--s3-port", "0", "--mlflow-port", "0"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr
    stack = json.loads(started.stdout)
    try:
        status = subprocess.run([*base, "status", *where], env=env, capture_output=True,
                                text=True)
        assert status.returncode == 0 and json.loads(status.stdout)["running"] is True
        assert MlflowClient(stack["tracking_uri"]).search_experiments()
        yaml.safe_load((Path(stack["dagster_home"]) / "dagster.yaml").read_text())
    finally:
        stopped = subprocess.run([*base, "stop", *where], env=env, capture_output=True,
                                 text=True, timeout=120)
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["stopped"] == ["mlflow", "s3"]
    ports = [int(stack[k].rsplit(":", 1)[1]) for k in ("tracking_uri", "s3_endpoint_url")]
    assert_stopped(list(stack["pids"].values()), ports)
    status = subprocess.run([*base, "status", *where], env=env, capture_output=True, text=True)
    assert status.returncode == 1 and json.loads(status.stdout)["running"] is False


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


K8S = Path(__file__).resolve().parents[1] / "infra" / "k8s"


def _k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """{(kind, name): manifest} of every document under infra/k8s/."""
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs if d}


def test_k8s_manifests_pass_the_kubernetes_schema_strictly() -> None:
    import kubernetes_validate

    docs = _k8s()
    assert {kind for kind, _ in docs} == {"ConfigMap", "Deployment", "Service", "Job"}
    version = kubernetes_validate.latest_version()
    for doc in docs.values():
        kubernetes_validate.validate(doc, version, strict=True)
    broken = json.loads(json.dumps(docs["Job", "cris-train"]))
    broken["spec"]["template"]["spec"]["containers"][0]["gpus"] = 8
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_training_job_is_torchrun_over_indexed_gpu_pods_meeting_at_pod_zero() -> None:
    docs = _k8s()
    job, service = docs["Job", "cris-train"], docs["Service", "cris-train"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = dict(a.lstrip("-").split("=", 1) for a in container["args"] if a.startswith("--")
                and "=" in a)
    assert spec["completionMode"] == "Indexed"
    assert int(args["nnodes"]) == spec["completions"] == spec["parallelism"] >= 2
    assert args["node_rank"] == "$(JOB_COMPLETION_INDEX)"
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"][
        "name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    host, port = args["rdzv_endpoint"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(port) == service["spec"]["ports"][0]["port"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) == int(args["nproc_per_node"]) == int(
        container["resources"]["requests"]["nvidia.com/gpu"])
    module = container["args"][container["args"].index("-m") + 1:]
    assert module[:2] == ["cris_model.cli", "train"] and "train.device=cuda" in module
    assert importlib.util.find_spec("cris_model.cli") is not None


def test_user_code_deployment_serves_the_definitions_on_the_services_stack(
    tmp_path: Path
) -> None:
    docs = _k8s()
    deployment, service = docs["Deployment", "cris-user-code"], docs["Service", "cris-user-code"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:3] == ["dagster", "api", "grpc"]
    module = command[command.index("-m") + 1]
    assert importlib.util.find_spec(module) is not None and module == "pipelines.definitions"
    port = int(command[command.index("-p") + 1])
    assert container["ports"][0]["containerPort"] == port == service["spec"]["ports"][0]["port"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"][
        "labels"].items()
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CRIS_STACK"] == "services"
    config = docs["ConfigMap", "cris-stack"]["data"]
    (tmp_path / "stack.json").write_text(config["stack.json"])
    stack = read_stack(tmp_path)
    assert stack.dagster_home == env["CRIS_SERVICES_DIR"] == env["DAGSTER_HOME"]
    assert "postgres" in yaml.safe_load(config["dagster.yaml"])["storage"]


def test_stack_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no services started"):
        read_stack(tmp_path)
    (tmp_path / "stack.json").write_text('{"tracking_uri": "x", "password": "y"}')
    with pytest.raises(ValueError, match=r"stack\.json: unknown keys \['password'\]"):
        read_stack(tmp_path)
