"""The one switch between the embedded defaults and the real services: `CRIS_STACK`.

`CRIS_STACK=embedded` (or unset): MLflow in a SQLite file, assets on local disk, Dagster's
instance wherever $DAGSTER_HOME says, data from `data.source` in params.yaml.
`CRIS_STACK=services`: the addresses `python -m infra.services start` (`make services`)
wrote to `<services dir>/stack.json` (the MLflow server, the S3 store for assets and raw
data, the Dagster instance, optionally a dataset in the store); `pipelines/defs/resources.py`
and the Makefile read them from here. No secrets are stored: S3 credentials stay in the
standard AWS environment variables.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

STACK_ENV = "CRIS_STACK"  # embedded | services
DIR_ENV = "CRIS_SERVICES_DIR"  # where `make services` keeps state, logs and data
STATE_NAME = "stack.json"  # the running services' addresses, inside the services dir
STACKS = ("embedded", "services")


@dataclass(frozen=True)
class Stack:
    """Addresses of the running services; empty strings mean "the embedded default"."""

    tracking_uri: str = ""  # MLflow tracking server, http://host:port
    s3_endpoint_url: str = ""  # S3-compatible endpoint for assets, raw data and DVC
    storage_remote: str = ""  # s3://bucket/prefix every asset is mirrored to
    dvc_remote: str = ""  # s3://bucket/prefix of the DVC remote
    dagster_home: str = ""  # folder holding the services' dagster.yaml
    data_source: str = ""  # data.source on this stack ("" = params.yaml's)
    pids: dict[str, int] = field(default_factory=dict)  # service name -> process group id
    logs: dict[str, str] = field(default_factory=dict)  # service name -> log file

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready dictionary."""
        return asdict(self)

    def env(self) -> dict[str, str]:
        """Environment that points MLflow, boto3, DVC, `cris` and Dagster at these services."""
        pairs = {"CRIS_STACK": "services", "MLFLOW_TRACKING_URI": self.tracking_uri,
                 "AWS_ENDPOINT_URL": self.s3_endpoint_url,
                 "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint_url,
                 "CRIS_S3_ENDPOINT_URL": self.s3_endpoint_url, "DAGSTER_HOME": self.dagster_home}
        return {k: v for k, v in pairs.items() if v}


def services_dir() -> Path:
    """$CRIS_SERVICES_DIR, else `.services` in the repository."""
    return Path(os.environ.get(DIR_ENV) or Path(__file__).resolve().parents[1] / ".services")


def write_stack(state: Path, stack: Stack) -> Path:
    """Write `state/stack.json` atomically; returns its path."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / STATE_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stack.to_dict(), indent=1) + "\n")
    tmp.replace(path)
    return path


def read_stack(state: Path) -> Stack:
    """The stack written by `python -m infra.services start` into `state`."""
    path = state / STATE_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no services started (make services)") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    known = {f.name for f in fields(Stack)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}")
    return Stack(**data)


def active_stack() -> Stack:
    """The stack `CRIS_STACK` selects: an empty Stack (embedded defaults) or the services'."""
    name = os.environ.get(STACK_ENV, "") or "embedded"
    if name not in STACKS:
        raise ValueError(f"{STACK_ENV}={name!r}: expected one of {', '.join(STACKS)}")
    return Stack() if name == "embedded" else read_stack(services_dir())


def main(argv: list[str] | None = None) -> int:
    """`python -m infra.stack env`: the active stack's variables as `K=V` words, for make."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["env"]:
        print("usage: python -m infra.stack env", file=sys.stderr)
        return 2
    try:
        env = active_stack().env()
    except (OSError, ValueError) as e:
        print(f"infra.stack: error: {e}", file=sys.stderr)
        return 1
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
