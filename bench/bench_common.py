"""What every benchmark prints besides its figures: the machine, and one JSON object."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    """The machine a figure was measured on: host, CPUs, GPU (if any), library versions."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, device_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        info["device"] = f"cpu ({_cpu_model() or platform.processor() or platform.machine()})"
    return info


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none, as off Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines
                 if line.startswith("model name")), "")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a host clock can time it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def emit(result: dict[str, Any], out: str | Path | None = None) -> None:
    """Print `result` as one JSON line; with `out`, also write it there (temp file + rename)."""
    print(json.dumps(result, sort_keys=False))
    sys.stdout.flush()
    if out:
        save(result, out)


def save(result: dict[str, Any], out: str | Path) -> None:
    """Write `result` as one JSON line to `out` (temp file + rename): also the partial
    results a long benchmark keeps on disk in case its time limit ends it."""
    path = Path(out)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def failure(error: BaseException) -> dict[str, str]:
    """A figure that could not be measured: the error's type and first line, reported in
    place of the figure so the rest of the run still counts."""
    lines = str(error).strip().splitlines()
    return {"error": f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]}
