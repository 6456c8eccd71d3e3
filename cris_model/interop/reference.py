"""`cris import reference`: a CRIS.pytorch train.py checkpoint -> one of our checkpoint directories.

The reference's train.py saves `{epoch, cur_iou, best_iou, prec, state_dict, optimizer,
scheduler}` with DDP's `module.` prefix on every weight. It is read with
`torch.load(weights_only=True)` only, so a pickle that would run code is refused unread.
The architecture is inferred from the tensors' shapes (RN50 and RN101 become our presets
`cris_r50` / `cris_r101`; another ResNet CLIP an inline open_clip config); what shapes do
not hold (text length, input size, decoder heads, dropout) comes from the reference's YAML
config when given (`TRAIN.word_len`, `TRAIN.input_size`, `TRAIN.num_head`, `TRAIN.dropout`;
defaults 17, 416, 8, 0.1). Every tensor must map to one of ours with the right shape, and
every one of ours must be present: anything else is a ValueError naming the file, and
nothing is written.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch

from cris_model.checkpoint import save_checkpoint
from cris_model.config import ModelConfig, get_preset
from cris_model.data.fetch_checksums import sha256_file
from cris_model.interop.clip_archive import is_torchscript_archive
from cris_model.interop.reference_names import (
    DROPPED,
    from_reference,
    ours_to_reference,
)
from cris_model.interop.state_check import state_mismatch
from cris_model.model import CRIS, build_untrained
from cris_model.params import load_params
from cris_model.tracking import first_line

FORMAT = "CRIS.pytorch train.py checkpoint"
NAMED_PRESETS = ("cris_r50", "cris_r101")  # presets whose CLIP an import can recognise
_INFO_KEYS = ("epoch", "cur_iou", "best_iou", "prec")  # what train.py saves beside weights


@dataclass(frozen=True)
class ReferenceSettings:
    """What the reference's YAML config says beyond the tensors (its TRAIN section)."""

    word_len: int = 17  # TRAIN.word_len: text tokens incl. start and end
    input_size: int = 416  # TRAIN.input_size: square input side in pixels
    num_heads: int = 8  # TRAIN.num_head: decoder attention heads
    dropout: float = 0.1  # TRAIN.dropout: decoder dropout (no effect in evaluation)
    train: dict[str, Any] = field(default_factory=dict)  # the whole TRAIN section read


def read_reference_yaml(path: Path) -> ReferenceSettings:
    """ReferenceSettings from a CRIS.pytorch YAML config (e.g. config/refcoco/cris_r50.yaml)."""
    path = Path(path)
    train = load_params(path).get("TRAIN")  # the same YAML reader as params.yaml
    if not isinstance(train, dict):
        raise ValueError(f"{path}: no TRAIN section; not a CRIS.pytorch config")
    default = ReferenceSettings()
    try:
        return ReferenceSettings(
            word_len=int(train.get("word_len", default.word_len)),
            input_size=int(train.get("input_size", default.input_size)),
            num_heads=int(train.get("num_head", default.num_heads)),
            dropout=float(train.get("dropout", default.dropout)),
            train=train,
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: TRAIN values are not numbers ({e})") from e


def _plain_info(value: Any) -> Any:
    """A saved epoch / IoU / prec value as JSON data (one-element tensors become numbers)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _plain_info(v) for k, v in value.items()}
    return value if isinstance(value, int | float | str | bool) or value is None else repr(value)


def _load_error(path: Path, error: BaseException) -> ValueError:
    """One line for a torch.load failure: refused code, or a truncated / corrupt file."""
    text = str(error)
    if "Weights only load failed" in text:
        detail = next((line.strip() for line in text.splitlines()
                       if "WeightsUnpickler error" in line), first_line(error))
        return ValueError(f"{path}: refused: it would build more than tensors and plain data, "
                          f"nothing of it was run ({detail.split('. ')[0][:200]})")
    reason = first_line(error).split(". ")[0] or type(error).__name__
    return ValueError(f"{path}: unreadable, truncated or not a torch checkpoint ({reason})")


def read_reference_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict without `module.`, {epoch, cur_iou, best_iou, prec} found) of a train.py
    checkpoint; read with weights_only=True, memory-mapped when it is a zip archive."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference checkpoint not found")
    if is_torchscript_archive(path):
        raise ValueError(f"{path}: a TorchScript archive, not a {FORMAT} (for an OpenAI CLIP "
                         "file use `cris convert-clip`)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True,
                           mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, KeyError,
            TypeError, IndexError, AttributeError) as e:
        raise _load_error(path, e) from e
    state = saved.get("state_dict") if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        keys = [str(k) for k in saved][:4] if isinstance(saved, dict) else []
        found = ", ".join(keys) if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"{path}: not a {FORMAT}: no 'state_dict' (found {found or 'nothing'}"
                         f"{', ...' if isinstance(saved, dict) and len(saved) > 4 else ''})")
    bad = [str(k) for k, v in state.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: state_dict entry {bad[0][:80]} is not a named tensor")
    prefixed = [k.startswith("module.") for k in state]
    if any(prefixed) and not all(prefixed):
        raise ValueError(f"{path}: some state_dict keys carry DDP's 'module.' prefix, some not")
    info = {k: _plain_info(saved[k]) for k in _INFO_KEYS if k in saved}
    return {k.removeprefix("module."): v for k, v in state.items()}, info


def _shape(state: Mapping[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    """Shape of our tensor `key`; ValueError naming its reference name when it is missing."""
    if key not in state:
        raise ValueError(f"{path}: missing tensor {ours_to_reference(key) or key}")
    return tuple(state[key].shape)


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered children `prefix<N>.` the keys show (0 when none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return len(found)


def _clip_config(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """open_clip config of the ResNet CLIP the tensors hold (OpenAI's head-width rule)."""
    if "backbone.visual.proj" in state or "backbone.visual.class_embedding" in state:
        raise ValueError(f"{path}: a ViT CLIP; the reference CRIS has ResNet backbones only")
    v = "backbone.visual."
    grid = math.isqrt(max(_shape(state, v + "attnpool.positional_embedding", path)[0] - 1, 0))
    text_width = _shape(state, "backbone.ln_final.weight", path)[0]
    return {
        "embed_dim": _shape(state, "backbone.text_projection", path)[1],
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": grid * 32,
            "layers": [_count(state, f"{v}layer{i}.") for i in range(1, 5)],
            "width": _shape(state, v + "layer1.0.conv1.weight", path)[0],
            "head_width": 64,
        },
        "text_cfg": {
            "context_length": _shape(state, "backbone.positional_embedding", path)[0],
            "vocab_size": _shape(state, "backbone.token_embedding.weight", path)[0],
            "width": text_width,
            "heads": text_width // 64,
            "layers": _count(state, "backbone.transformer.resblocks."),
        },
    }


def _signature(config: Mapping[str, Any]) -> tuple[Any, ...]:
    """The parts of an open_clip ResNet config that decide its tensors and its function."""
    vision, text = config["vision_cfg"], config["text_cfg"]
    return (config["embed_dim"], bool(config.get("quick_gelu")), vision["image_size"],
            tuple(vision["layers"]), vision["width"], vision.get("head_width", 64),
            text["context_length"], text["vocab_size"], text["width"], text["heads"],
            text["layers"])


def _named_preset(clip: dict[str, Any]) -> str | None:
    """The preset (cris_r50, cris_r101) whose open_clip model is exactly `clip`, else None."""
    for name in NAMED_PRESETS:
        named = open_clip.get_model_config(get_preset(name).clip_model)
        if named and _signature(named) == _signature(clip):
            return name
    return None


def _head_config(state: Mapping[str, torch.Tensor], settings: ReferenceSettings,
                 clip: dict[str, Any], path: Path) -> dict[str, Any]:
    """ModelConfig fields of the neck, decoder and projector, from shapes and the YAML."""
    vis_dim = _shape(state, "decoder.norm.weight", path)[0]
    taps = (_shape(state, "projector.txt.weight", path)[0] - 1) // (vis_dim // 2)
    width = clip["vision_cfg"]["width"]
    return {
        "word_len": settings.word_len, "input_size": settings.input_size,
        "fpn_in": (width * 8, width * 16, clip["embed_dim"]),
        "fpn_out": tuple(_shape(state, f"neck.{n}.0.weight", path)[0]
                         for n in ("f3_proj", "f4_proj", "f5_proj")),
        "vis_dim": vis_dim, "num_layers": _count(state, "decoder.layers."),
        "num_heads": settings.num_heads, "dropout": settings.dropout,
        "dim_ffn": _shape(state, "decoder.layers.0.ffn.0.weight", path)[0],
        "kernel_size": math.isqrt(max(taps, 0)),
    }


def infer_config(
    state: Mapping[str, torch.Tensor], settings: ReferenceSettings, path: Path
) -> ModelConfig:
    """Our ModelConfig for reference tensors already under our names (see reference_names)."""
    try:
        clip = _clip_config(state, path)
        head = _head_config(state, settings, clip, path)
    except (IndexError, ZeroDivisionError) as e:  # tensors of too few dimensions, or zero
        raise ValueError(f"{path}: tensor shapes describe no CRIS ({e})") from e
    preset = _named_preset(clip)
    try:
        if preset is not None:
            return get_preset(preset, **head)
        return ModelConfig(clip_model="", clip_config=clip, **head)
    except ValueError as e:
        raise ValueError(f"{path}: the tensors describe no buildable CRIS ({e})") from e


def _meta_model(config: ModelConfig, path: Path) -> CRIS:
    """The architecture of `config` on the meta device (names and shapes, no memory)."""
    try:
        with torch.device("meta"):
            return build_untrained(config)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: the tensors describe no buildable CRIS ({e})") from e


def check_fits(state: Mapping[str, torch.Tensor], model: CRIS, path: Path) -> None:
    """ValueError naming `path` and the first reference tensor that is missing, extra or of
    the wrong shape for `model` (a meta-device model will do)."""
    problem = state_mismatch(model.state_dict(), state, lambda k: ours_to_reference(k) or k)
    if problem:
        raise ValueError(f"{path}: {problem}")


def _settings_agree(config: ModelConfig, settings: ReferenceSettings, path: Path) -> None:
    """ValueError when the YAML's architecture values contradict the checkpoint's tensors."""
    inferred = {"fpn_in": list(config.fpn_in), "fpn_out": list(config.fpn_out),
                "vis_dim": config.vis_dim, "num_layers": config.num_layers,
                "dim_ffn": config.dim_ffn}
    for key, value in inferred.items():
        if key in settings.train and settings.train[key] != value:
            raise ValueError(f"{path}: TRAIN.{key} {settings.train[key]!r} disagrees with the "
                             f"checkpoint's tensors ({value!r})")


def _weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Owned float32 copies of the floating tensors (the reference trains in float32 with
    fp16 autocast), other tensors (BatchNorm counters) as they are."""
    return {k: (v.to(torch.float32) if v.is_floating_point() else v).clone()
            for k, v in state.items()}


def import_reference(
    checkpoint: Path, out: Path, config_path: Path | None = None
) -> dict[str, Any]:
    """Convert a reference train.py checkpoint into our checkpoint directory `out`.

    `config_path` is the reference's YAML config (word_len, input size, decoder heads).
    extra.json records the source file and its SHA-256, the YAML, the epoch and the IoU
    figures the reference logged; metrics.json stays empty, so registration needs
    `cris evaluate` first. -> {out, preset, config, tensors, dropped, source}.
    """
    checkpoint = Path(checkpoint)
    settings = read_reference_yaml(config_path) if config_path else ReferenceSettings()
    ref_state, info = read_reference_checkpoint(checkpoint)
    state, unknown = from_reference(ref_state)
    if unknown:
        raise ValueError(f"{checkpoint}: {len(unknown)} unexpected tensor(s): "
                         f"{', '.join(unknown[:3])}")
    dropped = [k for k in DROPPED if k in ref_state]
    config = infer_config(state, settings, checkpoint)
    if config_path:
        _settings_agree(config, settings, Path(config_path))
    model = _meta_model(config, checkpoint)
    check_fits(state, model, checkpoint)
    model.load_state_dict(_weights(state), strict=True, assign=True)
    source = {"format": FORMAT, "file": str(checkpoint.resolve()),
              "sha256": sha256_file(checkpoint), "config": str(config_path or ""),
              "clip_pretrain": str(settings.train.get("clip_pretrain") or ""), **info}
    save_checkpoint(Path(out), model.eval(), metrics={},
                    extra={"source": source, "dropped": dropped})
    return {"out": str(out), "preset": config.preset or "inline", "config": config.to_dict(),
            "tensors": len(state), "dropped": dropped, "source": source}
