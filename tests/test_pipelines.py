"""The Dagster definitions, run in process on a tiny synthetic dataset.

One module-scoped run materializes every asset (each evaluation partition separately),
registers and promotes the model; the tests then read what it left behind. Training runs
as a real `cris train` subprocess through Dagster Pipes, MLflow in a temporary SQLite file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, cast

import pandas as pd
import pytest
import torch
from dagster import (
    AssetKey,
    DagsterInstance,
    MaterializeResult,
    PipesSubprocessClient,
    asset,
    materialize,
)
from tiny_refer import make_prepared

from cris_model.checkpoint import save_checkpoint
from cris_model.config import get_preset
from cris_model.model import build_model
from cris_model.params import load_params
from cris_model.pipes_report import PIPES_ENV, report_training, training_metadata
from pipelines.definitions import ASSETS, defs
from pipelines.defs.checks import CHECK_GROUPS, prepared_data_checks
from pipelines.defs.jobs import PROMOTION_FILE, last_json_line, promote_model
from pipelines.defs.params import eval_splits
from pipelines.defs.resources import (
    ComputeResource,
    MlflowResource,
    ParamsResource,
    StorageResource,
)

TINY = ["data.synth_images=24", "train.epochs=1", "train.max_steps=2", "train.batch_size=8",
        "train.log_every=1", "train.progress=false"]
FROZEN = ["train.freeze_backbone=true", "train.flip=false"]  # train from the feature cache
SPLITS = ("val", "testA", "testB")
REPO = Path(__file__).resolve().parents[1]


def _resources(root: Path, tracking_uri: str, extra: list[str] | None = None) -> dict[str, Any]:
    return {
        "params": ParamsResource(overrides=TINY + (extra or [])),
        "storage": StorageResource(root=str(root)),
        "mlflow": MlflowResource(tracking_uri=tracking_uri, experiment="pipeline-test"),
        "compute": ComputeResource(device="cpu"), "pipes": PipesSubprocessClient(),
    }


def _metadata(result: Any, name: str, partition: str | None = None) -> dict[str, Any]:
    events = [e.materialization for e in result.get_asset_materialization_events()
              if e.asset_key == AssetKey(name) and e.materialization.partition == partition]
    assert len(events) == 1, f"{name} materialized {len(events)} times"
    return {k: v.value for k, v in events[0].metadata.items()}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Materialize the whole graph once (training from the CLIP feature cache), then run the
    promote_model job."""
    tmp = tmp_path_factory.mktemp("pipeline")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    resources = _resources(tmp / "assets", uri, FROZEN)
    instance = DagsterInstance.ephemeral()
    runs = {"upstream": materialize([*ASSETS, prepared_data_checks], resources=resources,
                                    instance=instance, selection="*trained_model")}
    for split in SPLITS:
        runs[split] = materialize(ASSETS, resources=resources, instance=instance,
                                  selection="evaluation", partition_key=split)
    runs["register"] = materialize(ASSETS, resources=resources, instance=instance,
                                   selection="registered_model")
    runs["promote"] = promote_model.execute_in_process(resources=resources, instance=instance)
    return {"root": tmp / "assets", "uri": uri, "runs": runs}


@pytest.mark.slow
def test_every_asset_materializes_and_the_data_checks_pass(pipeline: dict[str, Any]) -> None:
    runs, root = pipeline["runs"], pipeline["root"]
    assert all(r.success for r in runs.values())
    checks = runs["upstream"].get_asset_check_evaluations()
    assert sorted(c.check_name for c in checks) == sorted(f"data_{g}" for g in CHECK_GROUPS)
    assert all(c.passed for c in checks)

    raw = _metadata(runs["upstream"], "raw_dataset")
    assert raw["source"] == "synth" and raw["summary"]["images"] == 24
    prepared = _metadata(runs["upstream"], "prepared_splits")
    counts = {p.stem: len(pd.read_parquet(p)) for p in (root / "prepared").glob("*.parquet")}
    assert prepared["rows_per_split"] == counts
    assert prepared["dagster/row_count"] == sum(counts.values())
    features = _metadata(runs["upstream"], "clip_features")
    assert features["used_by_training"] is True
    assert features["dagster/row_count"] == counts["train"]
    assert (Path(features["path"]) / "meta.json").is_file()
    saved = json.loads((root / "train" / "best" / "train_state.json").read_text())
    assert saved["config"]["train"]["features_dir"] == str(root / "features")


def test_registered_model_links_the_try_it_page(tmp_path: Path) -> None:
    root = tmp_path / "assets"
    make_prepared(root, {"val": 1})
    torch.manual_seed(0)
    save_checkpoint(root / "train" / "best",
                    build_model(get_preset("cris_tiny", random_init=True)))
    for split in eval_splits():
        (root / "eval" / split).mkdir(parents=True)
        (root / "eval" / split / "metrics.json").write_text(
            json.dumps({"split": split, "mIoU": 0.5, "count": 2}))
    resources = _resources(root, f"sqlite:///{tmp_path / 'mlflow.db'}")
    resources["mlflow"] = resources["mlflow"].model_copy(
        update={"app_url": "http://127.0.0.1:7860"})
    result = materialize(ASSETS, resources=resources, selection="registered_model")
    assert _metadata(result, "registered_model")["try_it"] == "http://127.0.0.1:7860"


def test_features_are_skipped_when_the_backbone_trains(tmp_path: Path) -> None:
    resources = _resources(tmp_path / "assets", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = materialize(ASSETS, resources=resources, selection="clip_features")
    meta = _metadata(result, "clip_features")
    assert meta["used_by_training"] is False and "freeze_backbone" in meta["reason"]
    assert not (tmp_path / "assets" / "features").exists()


@pytest.mark.slow
def test_training_reports_metrics_loss_curve_gallery_and_run(pipeline: dict[str, Any]) -> None:
    trained = _metadata(pipeline["runs"]["upstream"], "trained_model")
    best = pipeline["root"] / "train" / "best"
    run_id = json.loads((best / "extra.json").read_text())["run_id"]
    assert run_id and run_id in trained["mlflow_run"]
    stored = json.loads((best / "metrics.json").read_text())
    (row,) = trained["val_metrics"].records
    assert row.data["mIoU"] == pytest.approx(stored["mIoU"])
    for image in ("loss_curve", "gallery"):
        assert "data:image/png;base64," in trained[image]
    assert (pipeline["root"] / "train" / "loss_curve.png").stat().st_size > 1000


@pytest.mark.slow
def test_each_split_partition_is_evaluated_and_the_model_registered(
    pipeline: dict[str, Any],
) -> None:
    runs, root = pipeline["runs"], pipeline["root"]
    for split in SPLITS:
        meta = _metadata(runs[split], "evaluation", partition=split)
        written = json.loads((root / "eval" / split / "metrics.json").read_text())
        assert written["split"] == split
        assert meta["mIoU"] == pytest.approx(written["mIoU"])
        assert meta["dagster/row_count"] == written["count"]
        rows = {(r.data["by"], r.data["group"]): r.data for r in meta["breakdown"].records}
        for by, groups in written["breakdown"].items():
            for group, m in groups.items():
                assert rows.pop((by, group))["count"] == m["count"]
        assert not rows and written["breakdown"]["kind"], "synthetic phrases carry kinds"
    registered = _metadata(runs["register"], "registered_model")
    assert registered["version"] == 1 and registered["aliases"] == ["challenger"]
    assert [r.data["split"] for r in registered["metrics"].records] == list(SPLITS)

    from mlflow.tracking import MlflowClient

    version = MlflowClient(pipeline["uri"]).get_model_version_by_alias("cris", "challenger")
    assert int(version.version) == 1
    val = json.loads((root / "eval" / "val" / "metrics.json").read_text())
    assert float(version.tags["val_mIoU"]) == pytest.approx(val["mIoU"])


@pytest.mark.slow
def test_promote_model_job_makes_the_first_version_champion(pipeline: dict[str, Any]) -> None:
    answer = json.loads((pipeline["root"] / PROMOTION_FILE).read_text())
    val = json.loads((pipeline["root"] / "eval" / "val" / "metrics.json").read_text())
    assert answer["version"] == 1 and "champion" in answer["aliases"]
    assert answer["promoted"] is True and answer["tracking_uri"] == pipeline["uri"]
    assert answer["mIoU"] == pytest.approx(val["mIoU"])
    assert pipeline["runs"]["promote"].output_for_node("promote") == answer


def test_a_failing_blocking_check_stops_features_and_training(tmp_path: Path) -> None:
    resources = _resources(tmp_path / "assets", f"sqlite:///{tmp_path / 'mlflow.db'}")
    instance = DagsterInstance.ephemeral()
    assert materialize(ASSETS, resources=resources, instance=instance,
                       selection="raw_dataset").success
    image = sorted((tmp_path / "assets" / "raw").rglob("*.jpg"))[0]
    image.write_bytes(image.read_bytes()[:200])

    result = materialize([*ASSETS, prepared_data_checks], resources=resources,
                         instance=instance, selection="prepared_splits*", raise_on_error=False)

    assert not result.success
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()
            if e.asset_key is not None}
    assert done == {"prepared_splits"}
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    failed = {name for name, c in checks.items() if not c.passed}
    assert failed == {"data_images"}
    meta = checks["data_images"].metadata
    assert meta["failed"].value == ["image_decodes"]
    actual, expected = (cast(dict[str, Any], meta[k].value) for k in ("actual", "expected"))
    assert actual["image_decodes"]["unexpected_count"] >= 1
    assert expected["image_decodes"] is not None
    assert not (tmp_path / "assets" / "features").exists()
    assert not (tmp_path / "assets" / "train").exists()


def test_pipes_report_carries_training_results_into_the_materialization() -> None:
    result = {"out_dir": "/o", "run_id": "abc", "epochs": 2, "steps": 10, "best_epoch": 2,
              "best_metrics": {"mIoU": 0.5, "oIoU": 0.4}, "samples_per_s": 12.5}
    script = ("import json, sys; from cris_model.pipes_report import report_training; "
              f"assert report_training(json.loads({json.dumps(json.dumps(result))}))")

    @asset
    def reported(context, pipes: PipesSubprocessClient) -> MaterializeResult:
        return pipes.run(context=context, command=[sys.executable, "-c", script],
                         ).get_materialize_result()

    run = materialize([reported], resources={"pipes": PipesSubprocessClient()})
    meta = {k: v.value for k, v in _first(run).metadata.items()}
    assert meta == training_metadata(result)
    assert meta["val_mIoU"] == 0.5 and meta["run_id"] == "abc"


def _first(run: Any) -> Any:
    (event,) = run.get_asset_materialization_events()
    return event.materialization


def test_pipes_report_does_nothing_outside_pipes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PIPES_ENV, raising=False)
    assert report_training({"steps": 1}) is False


def test_training_metadata_drops_missing_values() -> None:
    meta = training_metadata({"run_id": None, "steps": 3, "best_metrics": {"mIoU": 1}})
    assert meta == {"steps": 3, "val_mIoU": 1.0}


def test_train_command_uses_torchrun_for_several_gpus() -> None:
    one = ComputeResource(device="cuda", gpus=1).train_command(["--data", "D"])
    assert one[1:] == ["train", "--data", "D", "--set", "train.device=cuda"]
    assert Path(one[0]).name == "cris"
    many = ComputeResource(device="cuda", gpus=4).train_command(["--data", "D"])
    assert many[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=4"]
    assert many[5] == one[0] and many[6:] == one[1:]
    with pytest.raises(ValueError, match="gpus"):
        ComputeResource(gpus=0).train_command([])


def test_storage_mirrors_an_asset_folder_to_s3(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from moto import mock_aws

    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    storage = StorageResource(root=str(tmp_path), remote="s3://bucket/cris")
    (storage.path("prepared") / "sub").mkdir(parents=True)
    (storage.path("prepared") / "summary.json").write_text("{}")
    (storage.path("prepared") / "sub" / "val.parquet").write_bytes(b"PAR1")
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="bucket")
        assert storage.publish("prepared") == "s3://bucket/cris/prepared"
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="bucket")["Contents"])
    assert keys == ["cris/prepared/sub/val.parquet", "cris/prepared/summary.json"]
    assert StorageResource(root=str(tmp_path)).publish("prepared") == ""
    with pytest.raises(ValueError, match="s3://"):
        StorageResource(root=str(tmp_path), remote="gs://x").publish("prepared")


def test_last_json_line_reads_the_answer_and_rejects_other_output() -> None:
    assert last_json_line('log line\n{"version": 3}\n\n') == {"version": 3}
    with pytest.raises(RuntimeError, match="not JSON"):
        last_json_line('{"version": 3}\ndone')
    with pytest.raises(RuntimeError, match="printed nothing"):
        last_json_line("\n")


def test_definitions_load_with_jobs_and_params_driven_partitions() -> None:
    jobs = {j.name for j in defs.resolve_all_job_defs()}
    assert {"train_pipeline", "evaluate_splits", "register_model", "promote_model"} <= jobs
    graph = defs.resolve_asset_graph()
    partitions = graph.get(AssetKey("evaluation")).partitions_def
    assert partitions is not None
    params = load_params(REPO / "params.yaml")
    assert partitions.get_partition_keys() == params["eval"]["splits"]
