"""params.yaml loading: the single source of tunables, with `--set key=value` overrides.

`parse_config` turns one section into its config dataclass (`TrainConfig`, `EvalConfig`,
`RegistryConfig`): each key names a field, each value is checked against the field's type,
and an unknown key or a value of the wrong type is a ValueError naming `section.key`. Those
dataclasses derive from `SectionConfig`, whose `from_params` parses and then validates.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

SECTIONS = ("data", "model", "train", "eval", "registry")
_Config = TypeVar("_Config")
_Section = TypeVar("_Section", bound="SectionConfig")


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


def parse_config(
    cls: type[_Config], values: Mapping[str, Any], name: str,
    keys: Collection[str] | None = None,
) -> _Config:
    """Dataclass `cls` from the params section `name` (`values`); absent keys keep defaults.

    `keys` limits the fields the section may set (default: all). Floats also accept ints and
    numeric strings (YAML 1.1 reads `1e-4` as a string); ints refuse bools; a field typed
    `X | None` also takes null. ValueError names the unknown keys or the bad value.
    """
    allowed = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if keys is not None:
        allowed &= set(keys)
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"unknown {name} parameters: {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()})


def _coerce(where: str, value: Any, hint: Any) -> Any:
    """`value` checked against the type `hint` of the field at `where`; ValueError if it differs."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    if value is None and type(None) in options:
        return None
    expected = next(o for o in options if o is not type(None))
    if expected is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where} {value!r} is not a number") from e
    base = typing.get_origin(expected) or expected
    if base is bool and not isinstance(value, bool):
        raise ValueError(f"{where} {value!r} must be true or false")
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ValueError(f"{where} must be {base.__name__}, got {value!r}")
    return value


class SectionConfig:
    """Base of a params section's dataclass: `from_params` = `parse_config`, then `validate`."""

    SECTION: ClassVar[str]  # the params section it holds, e.g. "train"
    KEYS: ClassVar[tuple[str, ...] | None] = None  # fields the section may set (None: all)

    @classmethod
    def from_params(cls: type[_Section], values: Mapping[str, Any]) -> _Section:
        """Build from the section's values; unknown keys and bad values raise ValueError."""
        config = parse_config(cls, values, cls.SECTION, cls.KEYS)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError naming the first value no run can use (override to check)."""
