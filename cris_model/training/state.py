"""Training state inside a checkpoint directory, without pickle.

A training checkpoint is a `save_checkpoint` directory (weights, model config, tokenizer,
metrics; extra.json holds epoch, step and the MLflow run id) plus two files written into
it before it is renamed into place:
- `train_state.safetensors`: optimizer tensors (`optimizer.<param index>.<name>`) and the
  torch / CUDA RNG states (`rng.torch`, `rng.cuda.<i>`);
- `train_state.json`: optimizer param groups, grad-scaler state, numpy and python RNG
  states, the `Progress` record (epoch, step, best metrics, MLflow run id) and the
  resolved configuration.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cris_model.atomic import staged_dir
from cris_model.checkpoint import WEIGHTS, save_checkpoint
from cris_model.model import CRIS

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


@dataclass
class Progress:
    """Where training stands; saved in train_state.json so `--resume` continues from it."""

    epoch: int = 0  # epoch in progress, 0-based (equals train.epochs when done)
    batch: int = 0  # batches of that epoch already trained (a resume skips them)
    step: int = 0  # optimizer steps taken in total
    samples: int = 0  # training samples seen, all ranks together
    train_seconds: float = 0.0  # wall time spent in training epochs (throughput)
    best_epoch: int = 0  # 1-based epoch whose val mIoU is the best so far (0 = none)
    best_metrics: dict[str, float] = field(default_factory=dict)  # val metrics of best/
    last_metrics: dict[str, float] = field(default_factory=dict)  # latest val metrics
    run_id: str | None = None  # MLflow run id (None when tracking is off)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return tensors, {
        "numpy": {"kind": kind, "keys": np.asarray(keys).tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss_next": py_gauss},
    }


def set_rng_state(path: Path) -> None:
    """Restore the python, numpy, torch and CUDA RNG states saved in checkpoint `path`."""
    tensors = _load_tensors(path / STATE_TENSORS)
    rng = _read_json(path)["rng"]
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    n = rng["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (read without pickle); ValueError naming it if unreadable."""
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: unreadable safetensors file ({e})") from e


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def write_checkpoint(
    path: Path, model: CRIS, opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, progress: Progress, config: dict[str, Any],
    metrics: dict[str, float],
) -> Path:
    """Write a full training checkpoint directory at `path`, replacing it atomically.

    Everything goes into a temporary sibling folder which is then renamed over `path`; a
    crash leaves either the old or the new directory (see `find_resumable`).
    """
    path = Path(path)
    with staged_dir(path) as tmp:
        save_checkpoint(tmp, model, metrics=metrics, extra={
            "epoch": progress.epoch, "step": progress.step, "run_id": progress.run_id})
        opt_tensors, opt_meta = _optimizer_state(opt)
        rng_tensors, rng_meta = _rng_state()
        save_file({**opt_tensors, **rng_tensors}, str(tmp / STATE_TENSORS))
        meta = {"progress": asdict(progress), "optimizer": opt_meta,
                "scaler": scaler.state_dict(), "rng": rng_meta, "config": config}
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
    return path


def recover(out_dir: Path, names: tuple[str, ...] = ("last", "best")) -> list[str]:
    """Undo what a kill mid-write left in `out_dir`; returns what it changed, as text.

    A checkpoint `name` whose swap was cut between moving the old copy aside and renaming
    the new one in is missing; its newest `.name.old-*` copy is put back (the state the
    training progress in `last` refers to). Stale `.name.tmp-*` folders (a write cut short,
    `..name.tmp-*` for the weights staged inside one) and older `.name.old-*` copies are
    removed.
    """
    out_dir, done = Path(out_dir), []
    for name in names:
        aside = sorted(out_dir.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
        if aside and not (out_dir / name).exists():
            aside.pop().rename(out_dir / name)
            done.append(f"restored {name} from the copy a cut-short swap left aside")
        staged = [*out_dir.glob(f".{name}.tmp-*"), *out_dir.glob(f"..{name}.tmp-*")]
        for stale in [*aside, *staged]:
            shutil.rmtree(stale, ignore_errors=True)
            done.append(f"removed {stale.name}")
    return done


def find_resumable(out_dir: Path) -> Path:
    """`out_dir/last`, or the previous copy a crash mid-swap left beside it."""
    last = Path(out_dir) / "last"
    if (last / STATE_JSON).is_file():
        return last
    aside = sorted(Path(out_dir).glob(".last.old-*/" + STATE_JSON), key=lambda p: p.stat().st_mtime)
    if aside:
        return aside[-1].parent
    raise FileNotFoundError(f"{last}: no training checkpoint to resume from")


def _read_json(path: Path) -> dict[str, Any]:
    file = path / STATE_JSON
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{file}: unreadable training state ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return meta


def read_config(path: Path) -> dict[str, Any]:
    """The configuration a training checkpoint was written with: {"train", "params",
    "data_version"} ({} for checkpoints that recorded none)."""
    config = _read_json(path).get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path / STATE_JSON}: 'config' is not an object")
    return config


def read_progress(path: Path) -> Progress:
    """The `Progress` record of checkpoint directory `path`."""
    known = {f.name for f in fields(Progress)}
    saved = _read_json(path).get("progress")
    if not isinstance(saved, dict):
        raise ValueError(f"{path / STATE_JSON}: no 'progress' object")
    return Progress(**{k: v for k, v in saved.items() if k in known})


def restore(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> Progress:
    """Load weights, optimizer and scaler state from checkpoint `path`; return its progress.

    RNG states are restored separately (`set_rng_state`), right before training resumes.
    """
    meta = _read_json(path)
    weights, tensors = _load_tensors(path / WEIGHTS), _load_tensors(path / STATE_TENSORS)
    try:
        model.load_state_dict(weights)
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        for key, value in meta["optimizer"]["scalars"].items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: checkpoint does not match this model/optimizer ({e})") from e
    if scaler.is_enabled() and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return read_progress(path)
