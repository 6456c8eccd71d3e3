"""Dagster resources: parameters, storage, MLflow and compute, as ConfigurableResources.

Defaults come from params.yaml and the environment, so the embedded setup (local folders,
MLflow in SQLite, CPU) needs no configuration; each field can be set per deployment.
`CRIS_STACK=services` (infra/stack.py) moves the defaults to the services `make services`
started: the MLflow server, assets mirrored to its S3 store, and its dataset, if it has one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource, MetadataValue
from pydantic import Field

from cris_model.params import load_params, section
from cris_model.tracking import default_tracking_uri
from infra.stack import active_stack
from pipelines.defs.params import REPO_ROOT, default_params, params_path

STORAGE_ENV = "CRIS_STORAGE_ROOT"  # environment variable naming the local asset folder


def _train_default(key: str, fallback: Any) -> Any:
    """params.yaml `train.<key>`, or `fallback` when it is absent or empty."""
    value = section(default_params(), "train").get(key)
    return fallback if value in (None, "") else value


def cris_executable() -> str:
    """The `cris` console script of the running interpreter's environment."""
    script = Path(sys.executable).with_name("cris")
    if not script.is_file():
        raise FileNotFoundError(f"{script}: the cris command is not installed (make setup)")
    return str(script)


class ParamsResource(ConfigurableResource):
    """params.yaml plus `--set key=value` overrides, passed the same way to every stage."""

    path: str = Field(default_factory=lambda: str(params_path()),
                      description="params.yaml to read (default: $CRIS_PARAMS or the repo's)")
    overrides: list[str] = Field(default_factory=list,
                                 description="dotted key=value overrides, e.g. train.epochs=1")
    data_source: str = Field(default_factory=lambda: active_stack().data_source,
                             description="data.source in place of params.yaml's ('' = keep "
                                         "it; default: the services stack's dataset)")

    def _all_overrides(self) -> list[str]:
        source = [f"data.source={self.data_source}"] if self.data_source else []
        return [*source, *self.overrides]

    def load(self) -> dict[str, Any]:
        """The parameters with the overrides applied."""
        return load_params(self.path, self._all_overrides())

    def cli_args(self) -> list[str]:
        """`--params FILE --set k=v ...` for a `cris` verb."""
        args = ["--params", str(Path(self.path).resolve())]
        for item in self._all_overrides():
            args += ["--set", item]
        return args


class StorageResource(ConfigurableResource):
    """Where assets live: a local folder, mirrored to S3 (`remote`) when one is given."""

    root: str = Field(default_factory=lambda: os.environ.get(STORAGE_ENV)
                      or str(REPO_ROOT / "runs" / "dagster"),
                      description="local folder holding one subfolder per asset")
    remote: str = Field(default_factory=lambda: active_stack().storage_remote,
                        description="s3://bucket/prefix to mirror outputs to; '' = off "
                                    "(default: the services stack's)")
    endpoint_url: str = Field(default_factory=lambda: active_stack().s3_endpoint_url,
                              description="S3-compatible endpoint ('' = AWS; default: the "
                                          "services stack's store)")

    def path(self, name: str) -> Path:
        """Absolute local path of asset folder `name` (its parent is created)."""
        out = Path(self.root).resolve() / name
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def publish(self, name: str) -> str:
        """Upload folder or file `name` to `<remote>/<name>`; returns that URI ('' when off)."""
        if not self.remote:
            return ""
        if not self.remote.startswith("s3://"):
            raise ValueError(f"storage remote {self.remote!r} must be an s3://bucket/prefix URL")
        import boto3

        bucket, _, prefix = self.remote.removeprefix("s3://").partition("/")
        local = self.path(name)
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        base = local.parent if local.is_file() else local
        s3 = boto3.client("s3", endpoint_url=self.endpoint_url or None)
        key_root = "/".join(p for p in (prefix.strip("/"), name) if p)
        for file in files:
            rel = file.relative_to(base).as_posix()
            key = key_root if local.is_file() else f"{key_root}/{rel}"
            s3.upload_file(str(file), bucket, key)
        return f"s3://{bucket}/{key_root}"


class MlflowResource(ConfigurableResource):
    """The MLflow tracking server (or store) and experiment that runs and models go to."""

    tracking_uri: str = Field(
        default_factory=lambda: str(_train_default("tracking_uri", ""))
        or active_stack().tracking_uri or default_tracking_uri(),
        description="MLflow tracking URI (default: train.tracking_uri, the services stack's "
                    "server, $MLFLOW_TRACKING_URI, or sqlite:///./mlruns.db)")
    experiment: str = Field(default_factory=lambda: str(_train_default("experiment", "cris")),
                            description="MLflow experiment (default: train.experiment)")
    ui_url: str = Field(default_factory=lambda: os.environ.get("CRIS_MLFLOW_UI_URL", ""),
                        description="MLflow UI address for links, e.g. http://127.0.0.1:5000")
    app_url: str = Field(default_factory=lambda: os.environ.get("CRIS_APP_URL", ""),
                         description="`cris app` (try-it page) address for links, e.g. "
                                     "http://127.0.0.1:7860")

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that talks to this MLflow."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri}

    def overrides(self) -> list[str]:
        """`--set` arguments pointing `cris train` at this tracking URI and experiment."""
        return ["--set", f"train.tracking_uri={self.tracking_uri}",
                "--set", f"train.experiment={self.experiment}"]

    def run_link(self, run_id: str) -> MetadataValue:
        """The run as asset metadata: a link into the MLflow UI when `ui_url` is set, else
        text naming the run and the tracking URI."""
        if not self.ui_url:
            return MetadataValue.text(f"run {run_id} at {self.tracking_uri}")
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(self.tracking_uri).get_run(run_id).info.experiment_id
        base = self.ui_url.rstrip("/")
        return MetadataValue.url(f"{base}/#/experiments/{experiment}/runs/{run_id}")

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs of metric `key` of run `run_id`, by step."""
        from mlflow.tracking import MlflowClient

        history = MlflowClient(self.tracking_uri).get_metric_history(run_id, key)
        return sorted((int(m.step), float(m.value)) for m in history)


class ComputeResource(ConfigurableResource):
    """Where training and evaluation run: the device, and how many GPU processes train."""

    device: str = Field(default_factory=lambda: str(_train_default("device", "cpu")),
                        description="cpu | cuda | cuda:N (default: train.device)")
    gpus: int = Field(default=1, description="training processes (torchrun when more than 1)")

    def train_command(self, args: list[str]) -> list[str]:
        """`cris train ARGS` for one process, or the same under torchrun for `gpus` processes."""
        if self.gpus < 1:
            raise ValueError(f"compute.gpus must be >= 1, got {self.gpus}")
        args = [*args, "--set", f"train.device={self.device}"]
        if self.gpus == 1:
            return [cris_executable(), "train", *args]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={self.gpus}", cris_executable(), "train", *args]
