"""The optimizer: Adam over CLIP's and the new layers' parameter groups, and their LRs per step.

The LR schedule is a pure function of the global step (`lr_factor`), so the step counter in
the checkpoint is the whole scheduler state. A new per-part rate is a group here and a
`TrainConfig` field.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cris_model.model import CRIS
from cris_model.training.config import TrainConfig


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base LRs at global `step`: the linear warm-up times step decay by
    epoch or cosine to zero."""
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "cosine":
        total = cfg.epochs * steps_per_epoch
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        return warmup * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    epoch = step // steps_per_epoch
    return warmup * cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)


def set_lr(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int, steps_per_epoch: int) -> None:
    """Set each group's LR for global `step`: `lr`, times `clip_lr_scale` for CLIP's image
    encoder and `text_lr_scale` (or `clip_lr_scale`) for its text encoder (both at `lr` in
    epoch 1 with `clip_full_lr_first_epoch`), times `lr_factor`."""
    factor = lr_factor(cfg, step, steps_per_epoch)
    full_lr = cfg.clip_full_lr_first_epoch and step < steps_per_epoch
    scales = {"visual": cfg.clip_lr_scale, "text": cfg.text_lr_scale or cfg.clip_lr_scale}
    for group in opt.param_groups:
        scale = 1.0 if full_lr else scales.get(group["name"], 1.0)
        group["lr"] = cfg.lr * scale * factor


def param_groups(model: CRIS, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Adam's groups of trainable parameters: "visual" (CLIP's image encoder), "text" (the
    rest of CLIP) and "head" (the new layers); with `positional_lr: head` CLIP's
    positional_embedding tensors join the head, as in the reference."""
    named = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
    moved = [p for n, p in named
             if cfg.positional_lr == "head" and n.split(".")[-1] == "positional_embedding"]
    kept = [(n, p) for n, p in named if all(p is not m for m in moved)]
    groups = [
        {"name": "visual", "params": [p for n, p in kept if n.startswith("visual.")]},
        {"name": "text", "params": [p for n, p in kept if not n.startswith("visual.")]},
        {"name": "head", "params": [p for p in model.head_parameters() if p.requires_grad]
         + moved},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: CRIS, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over `param_groups`, torch's fused kernel with `fused_optimizer` (GPU and CPU).
    LRs are set per step by `set_lr`."""
    return torch.optim.Adam(param_groups(model, cfg), lr=cfg.lr,
                            weight_decay=cfg.weight_decay, fused=cfg.fused_optimizer)
