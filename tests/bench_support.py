"""Bench scripts in tests: imported as a module the way they run (bench/ on sys.path), or run
as a script and their JSON read back."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

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


def run_bench(script: str, *args: str, out: Path, timeout: int = 300) -> dict[str, Any]:
    """Run bench/<script>.py with `args` and `--out out` as a script; it must exit 0, print
    its JSON as the last stdout line, and write the same JSON to `out`. -> that JSON."""
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == printed
    return printed
