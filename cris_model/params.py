"""params.yaml loading: the single source of tunables, with `--set key=value` overrides."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

SECTIONS = ("data", "model", "train", "eval", "registry")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as `3e-3` (YAML 1.1 sees a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_value(text: str) -> Any:
    """Read an override value the way YAML would (numbers, booleans, lists), else as a string."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        return text


def apply_overrides(params: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `params` with dotted `key=value` overrides applied (e.g. train.lr=3e-3)."""
    out = copy.deepcopy(params)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r} has an empty key part")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return out


def load_params(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load a params.yaml (or {} when path is None) and apply overrides.

    Raises FileNotFoundError / ValueError naming the file on a missing or malformed file.
    """
    params: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: params file not found")
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML ({e.__class__.__name__})") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{p}: top level must be a mapping of sections")
        params = loaded
    return apply_overrides(params, overrides or [])


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The named section of params ({} when absent)."""
    value = params.get(name, {}) or {}
    if not isinstance(value, dict):
        raise ValueError(f"params section {name!r} must be a mapping")
    return value
