"""Argument helpers shared by the verb groups."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_params(p: argparse.ArgumentParser) -> None:
    """Add `--params FILE` and repeated `--set key=value` to a verb."""
    p.add_argument("--params", default=None, help="params.yaml to read")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one parameter, e.g. --set train.lr=3e-3 (repeatable)",
    )


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Add `--threshold`, `--device` and `--tracking-uri` to a verb that loads a model."""
    p.add_argument("--threshold", type=float, default=None,
                   help="sigmoid threshold in (0, 1) (default: the model's config)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--tracking-uri", default="",
                   help="MLflow tracking/registry URI for models:/ URIs "
                        "(default: $MLFLOW_TRACKING_URI or sqlite:///./mlruns.db)")


def print_json(obj: Any) -> None:
    """Print an object as indented JSON on stdout."""
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))
