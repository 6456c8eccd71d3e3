"""Import a bench/ script as a module, the way it runs: with bench/ on sys.path."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def import_bench(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/<name>.py as a fresh module (its `bench_common` import resolves)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
