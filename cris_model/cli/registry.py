"""`cris register` and `cris promote`: the MLflow model registry.

Both print their result as one JSON object on the last stdout line (tracking_uri,
model_name, version, aliases, mIoU, ...), so scripts and `make demo` can read it with
`tail -n 1`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cris_model.cli.common import add_params


def _print_line(obj: dict[str, Any]) -> None:
    """Print an object as compact JSON on a single stdout line."""
    print(json.dumps(obj, sort_keys=True, default=str), flush=True)


def _config(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    from cris_model.params import load_params
    from cris_model.registry import registry_config

    params = load_params(args.params, args.overrides)
    return params, registry_config(params, tracking_uri=args.tracking_uri)


def _register(args: argparse.Namespace) -> int:
    from cris_model.params import section
    from cris_model.registry import register

    params, config = _config(args)
    result = register(
        Path(args.checkpoint), config,
        metrics_path=Path(args.metrics) if args.metrics else None,
        run_id=args.run_id, data_dir=Path(args.data) if args.data else None,
        dataset=str(section(params, "data").get("dataset") or ""),
    )
    _print_line(result)
    return 0


def _promote(args: argparse.Namespace) -> int:
    from cris_model.registry import promote, rollback

    _, config = _config(args)
    _print_line(rollback(config) if args.rollback else promote(config))
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    add_params(p)
    p.add_argument("--tracking-uri", default="",
                   help="MLflow tracking/registry URI (default: train.tracking_uri, else "
                        "$MLFLOW_TRACKING_URI or sqlite:///./mlruns.db)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `register` and `promote` verbs."""
    p = sub.add_parser("register", help="log a checkpoint as an MLflow model version "
                                        "(alias challenger)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. O/best)")
    p.add_argument("--metrics", default=None,
                   help="val metrics.json from `cris evaluate` (default: the checkpoint's)")
    p.add_argument("--run-id", default=None,
                   help="training run to log the model into (default: the checkpoint's, "
                        "else a new run)")
    p.add_argument("--data", default=None,
                   help="prepared folder: dataset and data_version tags "
                        "(registry.data_version overrides the latter)")
    _add_common(p)
    p.set_defaults(func=_register)

    p = sub.add_parser("promote", help="move champion to the challenger if it wins on val "
                                       "mIoU by registry.promote_margin")
    p.add_argument("--rollback", action="store_true",
                   help="instead, move champion back to the previous champion")
    _add_common(p)
    p.set_defaults(func=_promote)
