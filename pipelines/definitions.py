"""The Dagster code location: `dagster dev -m pipelines.definitions`.

Runs use the in-process executor: training already runs in its own process (Pipes), and on
a small machine one step at a time is fastest. Resources default to the embedded setup
(local folders, MLflow in SQLite, CPU) read from params.yaml and the environment.
"""

from __future__ import annotations

from dagster import Definitions, PipesSubprocessClient, in_process_executor

from pipelines.defs.assets import (
    clip_features,
    evaluation,
    prepared_splits,
    raw_dataset,
    registered_model,
    trained_model,
)
from pipelines.defs.checks import prepared_data_checks
from pipelines.defs.jobs import evaluate_splits, promote_model, register_model, train_pipeline
from pipelines.defs.resources import (
    ComputeResource,
    MlflowResource,
    ParamsResource,
    StorageResource,
)

ASSETS = [raw_dataset, prepared_splits, clip_features, trained_model, evaluation,
          registered_model]


def build_resources() -> dict[str, object]:
    """Resources with their defaults (params.yaml and environment read now)."""
    return {
        "params": ParamsResource(), "storage": StorageResource(), "mlflow": MlflowResource(),
        "compute": ComputeResource(), "pipes": PipesSubprocessClient(),
    }


defs = Definitions(
    assets=ASSETS,
    asset_checks=[prepared_data_checks],
    jobs=[train_pipeline, evaluate_splits, register_model, promote_model],
    resources=build_resources(),
    executor=in_process_executor,
)
