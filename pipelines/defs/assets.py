"""The asset graph: raw_dataset -> prepared_splits -> clip_features -> trained_model ->
evaluation (one partition per split) -> registered_model.

Each asset is a folder under the storage root, written by one `cris_model` call or one
`cris` verb; upstream assets are found at their fixed paths (as DVC's stages find theirs).
Training runs as its own process through Dagster Pipes so it can move to a GPU pod.
"""

from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    PipesSubprocessClient,
    RetryPolicy,
    StaticPartitionsDefinition,
    asset,
)

from cris_model.eval_config import EvalConfig
from cris_model.params import section
from pipelines.defs.metadata import breakdown_table, image_markdown, metrics_table, plot_curve
from pipelines.defs.params import eval_splits, require
from pipelines.defs.resources import (
    ComputeResource,
    MlflowResource,
    ParamsResource,
    StorageResource,
)

SPLIT_PARTITIONS = StaticPartitionsDefinition(eval_splits())  # from params.yaml eval.splits
RAW, PREPARED, FEATURES, TRAIN, EVAL = "raw", "prepared", "features", "train", "eval"
LOSS_METRIC = "train/loss"  # the MLflow metric drawn as the loss curve
# A killed or crashed training process is tried again; with train.auto_resume the retry
# continues from train/last instead of starting over.
TRAIN_RETRY = RetryPolicy(max_retries=2, delay=1.0)


def _published(storage: StorageResource, name: str) -> dict[str, Any]:
    """Mirror asset folder `name` to the remote store; its URI as metadata (if any)."""
    uri = storage.publish(name)
    return {"remote": MetadataValue.url(uri)} if uri else {}


@asset(group_name="data", kinds={"python"})
def raw_dataset(params: ParamsResource, storage: StorageResource) -> MaterializeResult:
    """The dataset in the original refer layout: synthetic (data.source = synth) or fetched
    from a folder, s3:// prefix or http(s) archive."""
    p = params.load()
    out = storage.path(RAW)
    source = str(require(p, "data.source"))
    if source == "synth":
        from cris_model.data.synth import generate

        summary = generate(out, images=int(require(p, "data.synth_images")),
                           seed=int(require(p, "data.synth_seed")))
    else:
        from cris_model.data.fetch import FetchConfig, fetch

        summary = fetch(source, out, FetchConfig(endpoint_url=storage.endpoint_url or None))
    return MaterializeResult(metadata={
        "source": source, "path": MetadataValue.path(str(out)),
        "summary": MetadataValue.json(summary), **_published(storage, RAW),
    })


@asset(group_name="data", deps=[raw_dataset], kinds={"parquet"})
def prepared_splits(params: ParamsResource, storage: StorageResource) -> MaterializeResult:
    """One Parquet manifest per split (one row per referring sentence) + summary.json."""
    from cris_model.data.manifest import data_version, prepare_dataset

    p = params.load()
    out = storage.path(PREPARED)
    summary = prepare_dataset(storage.path(RAW), str(require(p, "data.dataset")),
                              str(require(p, "data.split_by")), out)
    counts = {split: c["sentences"] for split, c in summary["splits"].items()}
    rows = metrics_table({s: {k: float(v) for k, v in c.items()}
                          for s, c in summary["splits"].items()})
    return MaterializeResult(metadata={
        "dagster/row_count": sum(counts.values()), "rows_per_split": MetadataValue.json(counts),
        "counts": rows, "data_version": data_version(out), "path": MetadataValue.path(str(out)),
        **_published(storage, PREPARED),
    })


@asset(group_name="model", deps=[prepared_splits], kinds={"pytorch"})
def clip_features(
    params: ParamsResource, storage: StorageResource, compute: ComputeResource
) -> MaterializeResult:
    """Frozen-CLIP features of the train split, for training with train.freeze_backbone.

    When the backbone trains (freeze_backbone false) training reads images and the cache
    would go unused, so nothing is computed and the metadata says so.
    """
    p = params.load()
    if not section(p, "train").get("freeze_backbone", False):
        return MaterializeResult(metadata={
            "used_by_training": False,
            "reason": "train.freeze_backbone is false: training encodes images itself",
        })
    from cris_model.features import cache_features

    meta = cache_features(p, storage.path(PREPARED), "train", storage.path(FEATURES),
                          device=compute.device)
    return MaterializeResult(metadata={
        "used_by_training": True, "dagster/row_count": int(meta["sentences"]),
        "images": int(meta["images"]), "key": str(meta["key"]), "reused": bool(meta["reused"]),
        "path": MetadataValue.path(str(meta["path"])), **_published(storage, FEATURES),
    })


def _train_args(params: ParamsResource, storage: StorageResource, mlflow: MlflowResource,
                freeze_backbone: bool) -> list[str]:
    args = [*params.cli_args(), *mlflow.overrides(), "--set", "train.auto_resume=true",
            "--data", str(storage.path(PREPARED)), "--out", str(storage.path(TRAIN))]
    if freeze_backbone:
        args += ["--features", str(storage.path(FEATURES))]
    return args


def _training_metadata(out: Path, mlflow: MlflowResource) -> dict[str, Any]:
    """Best val metrics, MLflow link, loss curve and val gallery of a finished training run."""
    from cris_model.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(out / "best")
    run_id = meta["extra"].get("run_id")
    metadata: dict[str, Any] = {
        "checkpoint": MetadataValue.path(str(out / "best")),
        "val_metrics": metrics_table({"val (best)": meta["metrics"]}),
    }
    if (out / "gallery.png").is_file():
        metadata["gallery"] = image_markdown(out / "gallery.png", "val predictions")
    if run_id:
        metadata["mlflow_run"] = mlflow.run_link(run_id)
        points = mlflow.metric_history(run_id, LOSS_METRIC)
        if points:
            curve = plot_curve(points, out / "loss_curve.png", "training loss", "loss")
            metadata["loss_curve"] = image_markdown(curve, "training loss")
    return metadata


@asset(group_name="model", deps=[prepared_splits, clip_features], kinds={"pytorch", "mlflow"},
       retry_policy=TRAIN_RETRY)
def trained_model(
    context: AssetExecutionContext, params: ParamsResource, storage: StorageResource,
    mlflow: MlflowResource, compute: ComputeResource, pipes: PipesSubprocessClient,
) -> MaterializeResult:
    """Checkpoints `train/best` (chosen on val) and `train/last`, from `cris train` run as its
    own process through Dagster Pipes (under torchrun when compute.gpus > 1).

    Training runs with train.auto_resume: a retry (TRAIN_RETRY) or a re-run after a kill
    continues an unfinished run of the same params and data from `train/last`."""
    freeze = bool(section(params.load(), "train").get("freeze_backbone", False))
    command = compute.train_command(_train_args(params, storage, mlflow, freeze))
    context.log.info("training: %s", " ".join(command))
    reported = pipes.run(context=context, command=command, env=mlflow.env())
    result = reported.get_materialize_result()
    out = storage.path(TRAIN)
    return MaterializeResult(metadata={**(result.metadata or {}),
                                       **_training_metadata(out, mlflow),
                                       **_published(storage, TRAIN)})


@asset(group_name="model", deps=[trained_model, prepared_splits], partitions_def=SPLIT_PARTITIONS,
       kinds={"pytorch"})
def evaluation(
    context: AssetExecutionContext, params: ParamsResource, storage: StorageResource,
    mlflow: MlflowResource, compute: ComputeResource,
) -> MaterializeResult:
    """metrics.json, per-sentence CSV and gallery of the best checkpoint on one split."""
    from cris_model.checkpoint import read_checkpoint_meta
    from cris_model.evaluate import evaluate_split

    split = context.partition_key
    best = storage.path(TRAIN) / "best"
    run_id = read_checkpoint_meta(best)["extra"].get("run_id")
    settings = EvalConfig.from_params(section(params.load(), "eval"))
    out = storage.path(f"{EVAL}/{split}")
    result = evaluate_split(best, storage.path(PREPARED), split, out,
                            threshold=settings.threshold, device=compute.device,
                            run_id=run_id, tracking_uri=mlflow.tracking_uri,
                            precision=settings.precision)
    scores = {k: v for k, v in result.items() if isinstance(v, float) and k != "threshold"}
    metadata: dict[str, Any] = {
        "metrics": metrics_table({split: scores}), "mIoU": float(result["mIoU"]),
        "oIoU": float(result["oIoU"]), "dagster/row_count": int(result["count"]),
        "breakdown": breakdown_table(result["breakdown"]), "path": MetadataValue.path(str(out)),
    }
    if (out / "gallery.png").is_file():
        metadata["gallery"] = image_markdown(out / "gallery.png", f"{split}: best and worst")
    return MaterializeResult(metadata={**metadata, **_published(storage, f"{EVAL}/{split}")})


@asset(group_name="registry", deps=[evaluation, trained_model, prepared_splits],
       kinds={"mlflow"})
def registered_model(
    params: ParamsResource, storage: StorageResource, mlflow: MlflowResource
) -> MaterializeResult:
    """The best checkpoint as a new MLflow model version with alias `challenger`, tagged with
    its val metrics (promotion to `champion` is the `promote_model` job)."""
    import json

    from cris_model.registry import register, registry_config

    p = params.load()
    val = storage.path(f"{EVAL}/{require(p, 'train.val_split')}") / "metrics.json"
    found = register(storage.path(TRAIN) / "best", registry_config(p, mlflow.tracking_uri),
                     metrics_path=val, data_dir=storage.path(PREPARED),
                     dataset=str(require(p, "data.dataset")))
    splits = {s: json.loads((storage.path(f"{EVAL}/{s}") / "metrics.json").read_text())
              for s in eval_splits(p)}
    scores = {s: {k: v for k, v in m.items() if isinstance(v, float) and k != "threshold"}
              for s, m in splits.items()}
    return MaterializeResult(metadata={
        "model_name": found["model_name"], "version": int(found["version"]),
        "aliases": MetadataValue.json(found["aliases"]), "model_uri": found["model_uri"],
        "reused": bool(found["reused"]), "metrics": metrics_table(scores),
        "mlflow_run": mlflow.run_link(found["run_id"]),
        **({"try_it": MetadataValue.url(mlflow.app_url)} if mlflow.app_url else {}),
    })
