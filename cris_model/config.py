"""Model configuration and presets: a CRIS variant is data (a JSON file), not a code branch.

Presets live in `cris_model/presets/<name>.json`; each holds `ModelConfig` fields. A config
names the CLIP model (an open_clip model name, or an inline open_clip model config) and the
sizes of the new parts (neck, decoder, projector).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from typing import Any

_TUPLE_FIELDS = ("fpn_in", "fpn_out", "vit_layers")
CHECKPOINT_PARTS = ("backbone", "decoder", "projector")  # parts that can recompute in backward


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a CRIS model (the checkpoint stores it as config.json)."""

    preset: str = ""  # preset this config came from ("" when built by hand)
    clip_model: str = "RN50-quickgelu"  # open_clip model name (used when clip_config is empty)
    clip_config: dict[str, Any] = field(default_factory=dict)  # inline open_clip model config
    pretrained: str = ""  # open_clip pretrained tag or local weights file; "" = none
    random_init: bool = False  # build CLIP with random weights; must be asked for explicitly
    word_len: int = 17  # text tokens incl. start/end: 17 RefCOCO/RefCOCO+, 22 RefCOCOg
    input_size: int = 416  # square letterboxed input side in pixels (multiple of 32)
    fpn_in: tuple[int, int, int] = (512, 1024, 1024)  # neck input channels at strides 8/16/32
    fpn_out: tuple[int, int, int] = (256, 512, 1024)  # neck internal channels per level
    vis_dim: int = 512  # decoder width (d_model); equals fpn_out[1]
    neck_stride: int = 16  # stride the neck aggregates at: 16 (paper) | 8 (4x the decoder's
    # tokens, logits at stride 2: finer masks for small inputs)
    neck_film: bool = False  # also condition the stride-16 and stride-8 neck levels on the
    # sentence (FiLM: scale and shift); the paper conditions only the coarsest level
    num_layers: int = 3  # vision-language decoder layers
    num_heads: int = 8  # attention heads in the decoder
    dim_ffn: int = 2048  # decoder feed-forward width
    dropout: float = 0.1  # decoder dropout
    kernel_size: int = 3  # side of the dynamic kernel the projector makes from the sentence
    dynamic_conv: str = "matmul"  # how that kernel is applied: matmul (fast) | grouped (reference)
    vit_layers: tuple[int, int, int] = (4, 8, 12)  # ViT blocks (1-based) feeding strides 8/16/32
    freeze_backbone_bn: bool = False  # keep CLIP ResNet BatchNorm in eval mode during training
    threshold: float = 0.35  # sigmoid threshold that turns probabilities into a mask

    @property
    def mask_stride(self) -> int:
        """Input pixels per logit: the projector upsamples the neck's map 4x."""
        return self.neck_stride // 4

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists)."""
        out = asdict(self)
        for key in _TUPLE_FIELDS:
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of to_dict; unknown keys are a ValueError (a typo must not pass silently)."""
        if not isinstance(data, dict):
            raise ValueError(f"model config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        values = copy.deepcopy(data)
        for key in _TUPLE_FIELDS:
            if key in values:
                values[key] = _int_triple(key, values[key])
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError on values no model can be built from."""
        if self.word_len < 2:
            raise ValueError(f"word_len must be >= 2 (start and end tokens), got {self.word_len}")
        if self.input_size <= 0 or self.input_size % 32:
            raise ValueError(f"input_size must be a positive multiple of 32, got {self.input_size}")
        if self.vis_dim != self.fpn_out[1]:
            raise ValueError(f"vis_dim {self.vis_dim} must equal fpn_out[1] {self.fpn_out[1]}")
        if self.neck_stride not in (8, 16):
            raise ValueError(f"neck_stride must be 8 or 16, got {self.neck_stride}")
        if self.vis_dim % 4 or self.vis_dim % self.num_heads:
            raise ValueError(
                f"vis_dim {self.vis_dim} must be divisible by 4 and by num_heads {self.num_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if self.dynamic_conv not in ("matmul", "grouped"):
            raise ValueError(f"dynamic_conv must be matmul or grouped, got {self.dynamic_conv!r}")
        if not self.clip_model and not self.clip_config:
            raise ValueError("model config names no CLIP: set clip_model or clip_config")
        if self.random_init and self.pretrained:
            raise ValueError(
                f"random_init=True contradicts pretrained={self.pretrained!r}: choose one"
            )


def _int_triple(key: str, value: Any) -> tuple[int, int, int]:
    """A list/tuple of three ints, else ValueError naming the key."""
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise ValueError(f"model config {key} must be a list of 3 integers, got {value!r}")
    try:
        a, b, c = (int(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model config {key} must be a list of 3 integers, got {value!r}") from e
    return (a, b, c)


def _presets_dir() -> Any:
    return resources.files("cris_model") / "presets"


def list_presets() -> list[str]:
    """Names of the shipped presets (the JSON files in cris_model/presets), sorted."""
    return sorted(
        entry.name[: -len(".json")]
        for entry in _presets_dir().iterdir()
        if entry.name.endswith(".json")
    )


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name` with field overrides applied (e.g. word_len=22, random_init=True).

    Overrides whose value is None are ignored, so optional CLI flags pass straight through.
    """
    if name not in list_presets():
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(list_presets())}")
    path = _presets_dir() / f"{name}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: preset is not valid JSON ({e})") from e
    data["preset"] = name
    data.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig.from_dict(data)
