"""CRIS (CLIP-Driven Referring Image Segmentation) as a library: model, data, training, metrics.

The public API is the names below; they load lazily so `cris --help` and the data verbs do not
pay for importing torch and open_clip until they need them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "cris_model.config",
    "get_preset": "cris_model.config",
    "list_presets": "cris_model.config",
    "tokenize": "cris_model.backbone",
    "CRIS": "cris_model.model",
    "build_model": "cris_model.model",
    "create_model": "cris_model.model",
    "cris_loss": "cris_model.model",
    "summarize": "cris_model.model",
    "save_checkpoint": "cris_model.checkpoint",
    "load_checkpoint": "cris_model.checkpoint",
    "read_checkpoint_meta": "cris_model.checkpoint",
    "Predictor": "cris_model.predict",
    "evaluate_masks": "cris_model.metrics",
    "MaskMetrics": "cris_model.metrics",
    "TrainConfig": "cris_model.training.config",
    "evaluate_split": "cris_model.evaluate",
    "load_params": "cris_model.params",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import the module that holds a public name on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cris_model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
