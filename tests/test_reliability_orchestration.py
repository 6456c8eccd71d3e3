"""Orchestration faults: the Dagster training asset whose `cris train` process is SIGKILLed
mid-run is retried (the asset's RetryPolicy) and continues from `train/last`, not step 0.

The process is really killed (it sends itself SIGKILL inside its 4th optimizer step, see
`reliability_support`); the retry's own log line, its MLflow run and its metric history
show where it started.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance, PipesSubprocessClient, materialize
from mlflow.tracking import MlflowClient
from reliability_support import kill_env

from pipelines.definitions import ASSETS
from pipelines.defs.resources import (
    ComputeResource,
    MlflowResource,
    ParamsResource,
    StorageResource,
)

OVERRIDES = ["data.synth_images=24", "train.epochs=1", "train.max_steps=6",
             "train.batch_size=4", "train.log_every=1", "train.progress=false",
             "train.checkpoint_every_steps=1", "train.gallery_size=0", "train.flip=false",
             "train.deterministic=true"]


@pytest.mark.slow
def test_a_killed_training_run_is_retried_from_its_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    once = tmp_path / "killed"
    for key, value in kill_env(tmp_path, "step", 4, once=once).items():
        monkeypatch.setenv(key, value)  # the Pipes subprocess inherits this environment
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    resources = {
        "params": ParamsResource(overrides=OVERRIDES),
        "storage": StorageResource(root=str(tmp_path / "assets")),
        "mlflow": MlflowResource(tracking_uri=uri, experiment="retry"),
        "compute": ComputeResource(device="cpu"), "pipes": PipesSubprocessClient(),
    }
    result = materialize(ASSETS, resources=resources, instance=DagsterInstance.ephemeral(),
                         selection="*trained_model")

    assert result.success and once.exists()  # the first attempt really was killed
    retries = [e for e in result.all_events
               if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
    assert [e.step_key for e in retries] == ["trained_model"]
    last = tmp_path / "assets" / "train" / "last"
    err = capfd.readouterr().err
    assert f"cris: resume: from {last} at epoch 1, batch 3, step 3" in err
    (event,) = [e.materialization for e in result.get_asset_materialization_events()
                if e.asset_key.to_user_string() == "trained_model"]
    assert event.metadata["steps"].value == 6

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("retry").experiment_id])
    assert run.info.status == "FINISHED"  # one run, continued by the retry
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
