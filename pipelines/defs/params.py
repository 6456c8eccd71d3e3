"""params.yaml as seen by Dagster: where it is, and the values that shape the definitions.

params.yaml is the single source of parameters for Dagster and DVC alike; resource defaults
and the evaluation partitions are read from it when the definitions load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cris_model.eval_config import EvalConfig
from cris_model.params import load_params, section

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding params.yaml, dvc.yaml
PARAMS_ENV = "CRIS_PARAMS"  # environment variable naming another params.yaml


def params_path() -> Path:
    """$CRIS_PARAMS when set, else the repository's params.yaml."""
    return Path(os.environ.get(PARAMS_ENV) or REPO_ROOT / "params.yaml")


def default_params() -> dict[str, Any]:
    """The parsed params.yaml that the definitions' defaults come from."""
    return load_params(params_path())


def eval_splits(params: dict[str, Any] | None = None) -> list[str]:
    """`eval.splits` (the evaluation partitions), e.g. ["val", "testA", "testB"]."""
    values = section(default_params() if params is None else params, "eval")
    try:
        return EvalConfig.from_params(values).splits
    except ValueError as e:
        raise ValueError(f"{params_path()}: {e}") from e


def require(params: dict[str, Any], dotted: str) -> Any:
    """The value at `section.key` (e.g. "data.synth_images"); ValueError naming it if absent."""
    name, key = dotted.split(".", 1)
    values = section(params, name)
    if key not in values:
        raise ValueError(f"params: {dotted} is missing (see params.yaml)")
    return values[key]
