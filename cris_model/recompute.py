"""Activation checkpointing: keep a region's inputs and recompute its activations in backward.

Recomputing trades arithmetic for memory. A region with BatchNorm would update its running
statistics twice per step; `recompute` undoes the second update, so a checkpointed model
trains to the same weights and statistics as one that is not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _still_bn(module: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics and batch counts under `module` put back as they were
    once the region has been recomputed, so they move once per step. (Restoring the
    buffers, rather than zeroing the momentum, leaves every module attribute unchanged, so
    compiled blocks inside the region are not recompiled for the second pass.)"""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var, m.num_batches_tracked)
               if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        for b, value in zip(buffers, saved, strict=True):
            b.copy_(value)


def recompute(owner: nn.Module, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """fn(*args), its activations recomputed in backward when `owner` trains with gradients
    enabled (otherwise a plain call). `owner` holds the BatchNorms that fn runs.

    Inside a compiled region the compiler's partitioner does the recomputing, from the
    forward graph whose statistics update already ran once, so no BatchNorm guard is needed.
    """
    if not (owner.training and torch.is_grad_enabled()):
        return fn(*args)
    if torch.compiler.is_compiling():
        return checkpoint(fn, *args, use_reentrant=False)
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _still_bn(owner)))
