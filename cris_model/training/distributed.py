"""Process-group setup for `torchrun` and synchronised BatchNorm on any device.

Under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) each process joins
one group: NCCL on CUDA, gloo on CPU. Without those variables training runs as a single
process. PyTorch's SyncBatchNorm only runs on accelerators, so on CPU the BatchNorm layers
become `GroupBatchNorm`, which all-reduces the batch sums instead: N processes then
normalise with the statistics of the whole global batch, as one process would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank within world_size processes, and its device."""

    rank: int = 0  # global rank of this process
    world_size: int = 1  # number of processes
    local_rank: int = 0  # rank on this host (picks the GPU)
    device: torch.device = torch.device("cpu")  # device this process computes on

    @property
    def is_main(self) -> bool:
        """True on the process that logs, evaluates and writes checkpoints."""
        return self.rank == 0


def init_distributed(device: str) -> DistContext:
    """Join the torchrun process group when launched by torchrun, and pick the device.

    `device` is "cpu", "cuda" or "cuda:N"; under torchrun "cuda" means cuda:LOCAL_RANK.
    """
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"train.device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {device!r} but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistContext(device=torch.device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cpu") if device == "cpu" else torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)


def close_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """Sum a tensor over all processes; the gradient is summed over processes too."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x)


class GroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span every process of the default group.

    The global mean, then the global sum of squared deviations from it (two passes: exact
    even when a channel barely varies), are all-reduced with a differentiable collective,
    so gradients flow across processes as with PyTorch's SyncBatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GroupBatchNorm expects at least 2-D input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """NxCx... -> NxCx..., normalised with the global batch's statistics in training."""
        synced = self.training and dist.is_initialized() and dist.get_world_size() > 1
        if not synced:
            return super().forward(input)
        self._check_input_dim(input)
        c = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, c] + [1] * (input.dim() - 2)
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        first = _all_sum(torch.cat([x.sum(dims), x.new_full((1,), x.numel() // c)]))
        n = first[-1]
        mean = first[:c] / n
        centred = x - mean.view(shape)
        var = _all_sum((centred * centred).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            self._update_running(mean.detach(), var.detach(), float(n.item()))
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked.item())
        else:
            factor = self.momentum
        unbiased = var * (n / max(n - 1.0, 1.0))
        self.running_mean.mul_(1 - factor).add_(factor * mean)
        self.running_var.mul_(1 - factor).add_(factor * unbiased)


def _to_group_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer under `module` by a GroupBatchNorm sharing its
    parameters and buffers (so requires_grad, dtype and device carry over)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        bn = GroupBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, device="meta")
        for name, param in module.named_parameters(recurse=False):
            setattr(bn, name, param)
        for name, buffer in module.named_buffers(recurse=False):
            bn.register_buffer(name, buffer)
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        module.add_module(name, _to_group_bn(child))
    return module


def sync_batchnorm(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Make BatchNorm statistics global when world_size > 1 (SyncBatchNorm on CUDA).

    Layers are replaced inside `model`, which is returned (unless `model` itself is a
    BatchNorm layer, when the replacement is).
    """
    if ctx.world_size == 1:
        return model
    if ctx.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_group_bn(model)
