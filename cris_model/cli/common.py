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


def print_json(obj: Any) -> None:
    """Print an object as indented JSON on stdout."""
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))
