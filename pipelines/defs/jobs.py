"""Jobs: the training chain, per-split evaluation, registration, and `promote_model`.

`promote_model` runs `cris promote` (champion moves to the challenger only when it wins on
val mIoU by registry.promote_margin) and keeps its JSON answer as `promotion.json` in the
storage root, so scripts (and `make demo`) can print it.
"""

import json
import os
import subprocess
from typing import Any

from dagster import AssetSelection, OpExecutionContext, Output, define_asset_job, job, op

from cris_model.atomic import write_text
from pipelines.defs.assets import (
    SPLIT_PARTITIONS,
    clip_features,
    evaluation,
    prepared_splits,
    raw_dataset,
    registered_model,
    trained_model,
)
from pipelines.defs.resources import (
    MlflowResource,
    ParamsResource,
    StorageResource,
    cris_executable,
)

PROMOTION_FILE = "promotion.json"  # the last `cris promote` answer, in the storage root

train_pipeline = define_asset_job(
    "train_pipeline",
    selection=AssetSelection.assets(raw_dataset, prepared_splits, clip_features, trained_model),
    description="Data, blocking data checks, CLIP features and training (one run).",
)

evaluate_splits = define_asset_job(
    "evaluate_splits", selection=AssetSelection.assets(evaluation),
    partitions_def=SPLIT_PARTITIONS, description="Evaluate the best checkpoint on one split.",
)

register_model = define_asset_job(
    "register_model", selection=AssetSelection.assets(registered_model),
    description="Register the best checkpoint as the new challenger version.",
)


def last_json_line(stdout: str) -> dict[str, Any]:
    """The JSON object on the last non-empty line of a command's output."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError("cris promote printed nothing")
    try:
        value = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise RuntimeError(f"cris promote: last line is not JSON: {lines[-1][:200]!r}") from e
    if not isinstance(value, dict):
        raise RuntimeError(f"cris promote: last line is not a JSON object: {lines[-1][:200]!r}")
    return value


@op(description="Run `cris promote`: move `champion` to the challenger if it wins on val mIoU.")
def promote(
    context: OpExecutionContext, params: ParamsResource, storage: StorageResource,
    mlflow: MlflowResource,
) -> Output[dict[str, Any]]:
    command = [cris_executable(), "promote", *params.cli_args(), *mlflow.overrides()]
    context.log.info("promoting: %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, **mlflow.env()})
    if done.returncode != 0:
        raise RuntimeError(f"cris promote failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    answer = last_json_line(done.stdout)
    path = storage.path(PROMOTION_FILE)
    write_text(path, json.dumps(answer, sort_keys=True) + "\n")
    context.log.info(answer.get("reason", "promoted"))
    return Output(answer, metadata={
        "model_name": str(answer.get("model_name")), "version": str(answer.get("version")),
        "promoted": bool(answer.get("promoted")), "reason": str(answer.get("reason", "")),
        "answer": answer,
    })


@job(description="Promote the challenger to champion when it beats it (cris promote).")
def promote_model() -> None:
    promote()
