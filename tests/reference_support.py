"""A small CRIS the reference CRIS.pytorch can also build, with seeded weights, and its
checkpoint written the way the reference's train.py writes one.

Shared by tests/test_interop_reference.py and tests/data/make_reference_fixture.py (which
runs the real reference code on the same weights and pins its logits).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.optim.lr_scheduler import MultiStepLR

from cris_model.backbone import tokenize
from cris_model.config import ModelConfig, get_preset
from cris_model.interop.reference_names import to_reference
from cris_model.model import CRIS, build_untrained

PHRASES = ["the red circle on the left", "a small green square"]
INPUT_SIZE = 96  # not CLIP's 128: the attention pool's position grid is resized (4x4 -> 3x3)


def reference_tiny_config() -> ModelConfig:
    """cris_tiny changed where the reference is fixed: OpenAI's 64-wide attention heads
    (vision 8 heads, text 2) and a text width equal to the decoder width (128)."""
    tiny = get_preset("cris_tiny").clip_config
    clip = {**tiny, "vision_cfg": {**tiny["vision_cfg"], "head_width": 64},
            "text_cfg": {**tiny["text_cfg"], "width": 128, "heads": 2}}
    return get_preset("cris_tiny", clip_config=clip, random_init=True)


def seeded(model: CRIS, seed: int = 0) -> CRIS:
    """Fill every floating tensor from one seeded generator, in sorted key order (so the
    weights do not depend on open_clip's or torch's initialisers); -> the model, eval."""
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    with torch.no_grad():
        for key in sorted(state):
            tensor = state[key]
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if key.endswith("running_var"):
                noise = 0.5 + noise.abs()
            elif tensor.ndim >= 2:
                noise = noise / math.sqrt(tensor[0].numel())
            elif key.endswith("weight"):
                noise = 1 + 0.1 * noise
            else:
                noise = 0.1 * noise
            tensor.copy_(noise)
    return model.eval()


def tiny_model() -> CRIS:
    """The seeded reference-compatible tiny CRIS."""
    return seeded(build_untrained(reference_tiny_config()))


def fixture_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The pinned logits' inputs: 2 seeded images at INPUT_SIZE and PHRASES' tokens."""
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, INPUT_SIZE, INPUT_SIZE, generator=generator)
    return image, tokenize(PHRASES, 17)


def reference_state(model: CRIS) -> dict[str, torch.Tensor]:
    """`model`'s weights under the reference's names, with its CLIP logit scale, un-prefixed."""
    state = to_reference(model.state_dict())
    state["backbone.logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return state


def train_py_checkpoint(state: dict[str, torch.Tensor], epoch: int = 50) -> dict[str, Any]:
    """What the reference's train.py saves: DDP-prefixed weights plus Adam and MultiStepLR
    states, the epoch and the val IoU figures it logged."""
    weights = {f"module.{k}": v for k, v in state.items()}
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=1e-4)
    scheduler = MultiStepLR(optimizer, milestones=[35], gamma=0.1)
    return {"epoch": epoch, "cur_iou": 0.7012, "best_iou": 0.7034,
            "prec": {"Pr@50": 0.81, "Pr@90": 0.19}, "state_dict": weights,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}


def write_train_py_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """torch.save a train.py-style checkpoint of `state` (reference names) to `path`."""
    torch.save(train_py_checkpoint(state), path)
    return path


def write_reference_files(root: Path, model: CRIS) -> dict[str, Path]:
    """`model` as the reference's best_model.pth, and a reference YAML config that names its
    decoder heads, text length and input size: {"checkpoint": ..., "config": ...}."""
    config = root / "cris_tiny.yaml"
    config.write_text(yaml.safe_dump({"TRAIN": {
        "clip_pretrain": "pretrain/tiny.pt", "input_size": INPUT_SIZE, "word_len": 17,
        "fpn_in": [128, 256, 128], "fpn_out": [64, 128, 128], "vis_dim": 128,
        "num_layers": 2, "num_head": 4, "dim_ffn": 256, "dropout": 0.0}}))
    checkpoint = write_train_py_checkpoint(root / "best_model.pth", reference_state(model))
    return {"checkpoint": checkpoint, "config": config}
