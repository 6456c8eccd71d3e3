"""Checkpoint directories: weights as safetensors plus JSON metadata; loading runs no pickle.

Layout of a checkpoint directory:
    model.safetensors  the CRIS state dict (CLIP and new layers)
    config.json        ModelConfig.to_dict(): the architecture and how CLIP was initialised
    tokenizer.json     tokenizer name, word_len, special token ids
    metrics.json       the metrics the checkpoint was selected on ({} when none)
    extra.json         free-form JSON the caller adds (e.g. epoch, params), {} when none
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cris_model.atomic import staged_dir
from cris_model.backbone import tokenizer_info
from cris_model.config import ModelConfig
from cris_model.model import CRIS, build_untrained

WEIGHTS = "model.safetensors"
META_FILES = ("config.json", "tokenizer.json", "metrics.json", "extra.json")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_checkpoint(
    path: Path, model: CRIS, *, metrics: dict | None = None, extra: dict | None = None
) -> Path:
    """Write `model` as a checkpoint directory at `path` (replacing one that exists).

    Everything is written into a temporary sibling directory first and renamed into place,
    so a reader never sees a half-written checkpoint. Returns `path`.
    """
    path = Path(path)
    with staged_dir(path) as tmp:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / "config.json", model.config.to_dict())
        _write_json(tmp / "tokenizer.json", tokenizer_info(model.config.word_len))
        _write_json(tmp / "metrics.json", metrics or {})
        _write_json(tmp / "extra.json", extra or {})
    return path


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e.__class__.__name__}: {e})") from e


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """{"config", "tokenizer", "metrics", "extra"} of a checkpoint, without building a model."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    meta = {name[: -len(".json")]: _read_json(path / name) for name in META_FILES}
    for key, value in meta.items():
        if not isinstance(value, dict):
            raise ValueError(f"{path / (key + '.json')}: expected a JSON object")
    return meta


def load_checkpoint(path: Path, device: str = "cpu") -> CRIS:
    """Rebuild the model of a checkpoint directory and load its weights, in eval mode.

    The CLIP weights come from the checkpoint, never from config.pretrained (which only
    records how training started). Raises FileNotFoundError / ValueError naming the path
    when a file is missing, corrupt or does not fit the recorded architecture.
    """
    path = Path(path)
    meta = read_checkpoint_meta(path)
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path / 'config.json'}: invalid model config ({e})") from e
    if meta["tokenizer"].get("word_len") != config.word_len:
        raise ValueError(
            f"{path / 'tokenizer.json'}: word_len {meta['tokenizer'].get('word_len')} "
            f"disagrees with config.json word_len {config.word_len}"
        )
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: checkpoint file missing")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights}: unreadable safetensors file ({e})") from e
    model = build_untrained(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        raise ValueError(f"{weights}: weights do not fit config.json ({lines[-1]})") from e
    return model.to(torch.device(device)).eval()
