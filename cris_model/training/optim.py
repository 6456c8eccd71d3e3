"""The optimizer: Adam over CLIP's and the new layers' parameter groups, and their LRs per step.

The LR schedule is a pure function of the global step (`lr_factor`), so the step counter in
the checkpoint is the whole scheduler state. A new per-part rate is a group here and a
`TrainConfig` field.
"""

from __future__ import annotations

import math

import torch

from cris_model.model import CRIS
from cris_model.training.config import TrainConfig


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base LRs at global `step`: step decay by epoch, or cosine to zero."""
    if cfg.schedule == "cosine":
        total = cfg.epochs * steps_per_epoch
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    epoch = step // steps_per_epoch
    return cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)


def set_lr(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int, steps_per_epoch: int) -> None:
    """Set each group's LR for global `step`: `lr`, times `clip_lr_scale` for the backbone
    (but not in epoch 1 with `clip_full_lr_first_epoch`), times `lr_factor`."""
    factor = lr_factor(cfg, step, steps_per_epoch)
    first_epoch = step < steps_per_epoch
    for group in opt.param_groups:
        base = cfg.lr
        if group["name"] == "backbone" and not (cfg.clip_full_lr_first_epoch and first_epoch):
            base = cfg.lr * cfg.clip_lr_scale
        group["lr"] = base * factor


def build_optimizer(model: CRIS, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the trainable parameters in groups "backbone" (CLIP) and "head" (the rest);
    fused on a GPU with `fused_optimizer`. LRs are set per step by `set_lr`."""
    groups = [
        {"name": "backbone", "params": [p for p in model.backbone_parameters() if p.requires_grad]},
        {"name": "head", "params": [p for p in model.head_parameters() if p.requires_grad]},
    ]
    fused = cfg.fused_optimizer and next(model.parameters()).is_cuda
    return torch.optim.Adam([g for g in groups if g["params"]], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, fused=fused)
