"""Inference speed levers that keep the function: BatchNorm folding, low-precision weights,
channels-last layout, and CUDA-graph replay of fixed-shape calls.

At batch 1 a CRIS forward pass is a few hundred small kernels, so its time is launch overhead,
not arithmetic; replaying a captured CUDA graph launches them all at once, and folding each
eval-mode BatchNorm into the convolution before it removes a third of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a Conv2d (or Linear) into it,
    in place; the BatchNorm becomes Identity. -> the number folded.

    Pairs are consecutive children of an nn.Sequential, or sibling attributes `convN` and
    `bnN` that a forward applies as bnN(convN(x)) (CLIP's ModifiedResNet and its
    bottlenecks). RuntimeError when the model is in training mode: batch statistics
    cannot be folded.
    """
    if model.training:
        raise RuntimeError("fold_batchnorm needs a model in eval mode (call .eval() first)")
    folded = 0
    for module in list(model.modules()):
        for conv_name, bn_name in _pairs(module):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                fused: nn.Module = fuse_conv_bn_eval(conv, bn)
            elif isinstance(conv, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
                fused = fuse_linear_bn_eval(conv, bn)
            else:
                continue
            setattr(module, conv_name, fused)
            setattr(module, bn_name, nn.Identity())
            folded += 1
    return folded


def _pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(layer name, BatchNorm name) candidates among a module's direct children."""
    names = [name for name, _ in module.named_children()]
    if isinstance(module, nn.Sequential):
        return list(zip(names, names[1:], strict=False))
    return [(n, "bn" + n.removeprefix("conv")) for n in names
            if n.startswith("conv") and "bn" + n.removeprefix("conv") in names]


def prepare_for_inference(
    model: nn.Module, dtype: torch.dtype = torch.float32, channels_last: bool = False,
    fold: bool = True,
) -> nn.Module:
    """Eval mode, BatchNorm folded (with `fold`), weights cast to `dtype`, optionally
    channels-last, in place. For serving only: the result can no longer be trained."""
    model.eval()
    if fold:
        fold_batchnorm(model)
    model.to(dtype=dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


class CapturedCall:
    """A function of fixed-shape CUDA tensors, captured once as a CUDA graph and replayed.

    Each call copies its inputs into the captured input buffers, replays the graph, and
    returns the captured output (a tensor, or a dict of them), which the next call
    overwrites (clone what you keep). Shapes, dtypes and devices must match the example inputs.
    Those buffers make one instance a one-caller-at-a-time object: threads each capture
    their own (capture is thread-local, so other threads may run CUDA work meanwhile).
    """

    def __init__(
        self, fn: Callable[..., Any], example_inputs: Sequence[torch.Tensor],
        warmup: int = 3,
    ) -> None:
        if not all(x.is_cuda for x in example_inputs):
            raise ValueError("CapturedCall needs CUDA tensors")
        self._inputs = [x.clone() for x in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmup):
                fn(*self._inputs)
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph, capture_error_mode="thread_local"), \
                torch.inference_mode():
            self._output = fn(*self._inputs)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) != len(self._inputs):
            raise ValueError(f"expected {len(self._inputs)} inputs, got {len(inputs)}")
        for buffer, x in zip(self._inputs, inputs, strict=True):
            if buffer.shape != x.shape:
                raise ValueError(f"input shape {tuple(x.shape)} differs from the captured "
                                 f"{tuple(buffer.shape)}")
            buffer.copy_(x)
        self._graph.replay()
        return self._output


RECOMPILE_LIMIT = 256  # compiled graphs kept: block shapes x train/eval x batch sizes seen


def _region_types() -> tuple[type[nn.Module], ...]:
    from open_clip.modified_resnet import Bottleneck
    from open_clip.transformer import ResidualAttentionBlock

    from cris_model.layers import DecoderLayer, Projector, ResNetLevels, TextFPN, ViTLevels

    return (Bottleneck, ResidualAttentionBlock, DecoderLayer, ResNetLevels, ViTLevels, TextFPN,
            Projector)


def compile_regions(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """torch.compile each block of a CRIS model in place: CLIP's ResNet bottlenecks and
    transformer blocks, the decoder layers, the level adapter, the neck and the projector.
    -> the number of modules compiled.

    Each region becomes one fused graph, forward and backward (BatchNorm, ReLU and the
    residual add in one kernel); blocks of the same shape share one compilation, so this
    compiles in a fraction of a whole-model compile's time. The glue between regions, the
    loss and the optimizer stay eager. Weights and state-dict keys do not change. Shapes are
    specialised (no dynamic shapes): each new batch size or train/eval switch compiles once
    more, so the compiled-graph limit is raised to RECOMPILE_LIMIT. Compile after any deep
    copy: a copy would call the original's compiled blocks.
    """
    types = _region_types()
    regions = [m for m in model.modules() if isinstance(m, types)]
    config = torch._dynamo.config  # recompile_limit; cache_size_limit in older torch
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    for region in regions:
        region.compile(backend=backend, mode=mode, fullgraph=True, dynamic=False)
    return len(regions)
