"""Training memory of CRIS per activation-checkpointing plan, estimated on the CPU (prints JSON).

The model runs one training forward pass (train mode, loss included) on the meta device, where
nothing is allocated or computed, so cris_r50 at batch 64 costs a fraction of a second. Every
tensor autograd keeps for backward passes through a saved-tensors hook and is counted once per
storage (views and in-place results share theirs), charged to the innermost module running
when it was saved and rolled up to the model's parts. Under non-reentrant activation
checkpointing a region saves only its inputs during forward, so the hook sees what a GPU keeps.

Two emulations of a GPU training step under autocast:
- the weights are cast to --dtype, so activations have the autocast dtype (autocast itself
  has no meta backend; ops it runs in fp32, such as layer norm, are counted in --dtype);
- with --attention flash (default), scaled_dot_product_attention keeps what flash /
  memory-efficient attention keeps (q, k, v, the output, an fp32 per-row logsumexp, the
  mask) instead of the math path's full attention matrix (--attention math).

Fixed memory is added per parameter: fp32 weights, fp32 gradients, Adam's two fp32 moments and
the low-precision weight copies autocast makes (bf16 / fp16 only).

    python bench/activation_memory.py [--preset cris_r50 --batch-size 64 --dtype bf16]
        [--plans "none;backbone;backbone,decoder"] [--checkpoint backbone]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import emit, machine
from torch import nn

from cris_model.config import get_preset
from cris_model.model import CHECKPOINT_PARTS, CRIS, build_model, cris_loss

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_PLANS = "none;backbone;backbone,decoder;backbone,decoder,projector"
GB = 1e9
_SDPA = F.scaled_dot_product_attention  # the original, restored after each measurement
NOTE = ("estimate: bytes saved for backward in one meta-device forward (weights cast to the "
        "dtype in place of autocast) plus parameters, gradients, Adam moments and autocast "
        "weight copies; backward transients, allocator fragmentation and the input batch "
        "are not included")


class _FlashAttentionCount(torch.autograd.Function):
    """scaled_dot_product_attention that saves what GPU flash / memory-efficient attention
    saves: q, k, v, the output, an fp32 logsumexp of q's shape without the last dim, the mask.
    For counting saved bytes only: it has no backward."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None, options: dict[str, Any]) -> torch.Tensor:
        out = _SDPA(q, k, v, attn_mask=mask, **options)  # grad is off inside forward
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *([] if mask is None else [mask]))
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        raise NotImplementedError("_FlashAttentionCount only counts saved bytes; it has no "
                                  "backward")


def _flash_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
    options = {"dropout_p": dropout_p, "is_causal": is_causal, "scale": scale,
               "enable_gqa": enable_gqa}
    return _FlashAttentionCount.apply(query, key, value, attn_mask, options)


@contextlib.contextmanager
def flash_attention_emulated() -> Iterator[None]:
    """torch.nn.functional.scaled_dot_product_attention replaced by the flash-like counter
    (F.multi_head_attention_forward and open_clip look it up there at call time)."""
    F.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


def part_of(scope: str | None) -> str:
    """Module name (None: outside the model) -> the part it is reported under."""
    if scope is None:
        return "loss"
    if not scope:
        return "other"
    names = scope.split(".")
    if scope.startswith("backbone.visual.layer"):
        return ".".join(names[:3])
    if scope.startswith("backbone.visual"):
        return "backbone.visual"
    if names[0] == "backbone":
        return "backbone.text"
    return names[0]


class SavedBytes:
    """Bytes saved for backward per scope while active, each storage counted once; the
    model's own parameters and buffers and the `exclude` tensors (inputs) are not counted.

    The scope is the innermost running module's name (None outside the model); `methods`
    maps extra scope names to (object, method name) for code that runs no module of its own.
    """

    def __init__(self, model: nn.Module, exclude: tuple[torch.Tensor, ...] = (),
                 methods: dict[str, tuple[Any, str]] | None = None) -> None:
        self.model = model
        self.methods = methods or {}
        self.by_scope: dict[str | None, int] = defaultdict(int)
        self._stack: list[str] = []
        self._seen = {_key(t) for t in (*model.parameters(), *model.buffers(), *exclude)}
        self._held: list[torch.UntypedStorage] = []  # so no counted storage's id is reused

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in self._seen:
            self._seen.add(storage._cdata)
            self._held.append(storage)
            self.by_scope[self._stack[-1] if self._stack else None] += storage.nbytes()
        return t

    def _scoped(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            self._stack.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
        return run

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Count what autograd saves inside this block."""
        names = {module: name for name, module in self.model.named_modules()}

        def enter(module: nn.Module, _args: Any) -> None:
            self._stack.append(names[module])

        def leave(_module: nn.Module, _args: Any, _out: Any) -> None:
            self._stack.pop()

        handles = [h for m in names for h in (m.register_forward_pre_hook(enter),
                                               m.register_forward_hook(leave))]
        for scope, (owner, method) in self.methods.items():
            setattr(owner, method, self._scoped(scope, getattr(owner, method)))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield
        finally:
            for handle in handles:
                handle.remove()
            for owner, method in self.methods.values():
                delattr(owner, method)  # the instance attribute; the class's method shows again


def _key(t: torch.Tensor) -> int:
    """Identity of the storage behind t (shared by its views and in-place results)."""
    return t.untyped_storage()._cdata


def build_meta_model(preset: str, dtype: torch.dtype, dropout: float | None) -> CRIS:
    """The preset's CRIS on the meta device, in train mode, weights in `dtype`."""
    config = get_preset(preset, random_init=True, pretrained="", dropout=dropout)
    with torch.device("meta"):
        model = build_model(config)
    return model.to(dtype).train()


def activation_bytes(model: CRIS, batch: int, plan: list[str], attention: str) -> dict[str, int]:
    """Bytes saved for backward per part by one training forward of a batch (loss included)
    under checkpointing `plan`; -> {part: bytes}, largest first."""
    config = model.config
    size, length = config.input_size, config.word_len
    image = torch.empty(batch, 3, size, size, device="meta")  # normalised fp32, as in training
    tokens = torch.zeros(batch, length, dtype=torch.long, device="meta")
    mask = torch.empty(batch, 1, size, size, device="meta")
    model.set_activation_checkpointing(plan)
    counter = SavedBytes(model, (image, tokens, mask), methods={
        "backbone.visual": (model.backbone, "encode_image"),
        "backbone.text": (model.backbone, "encode_text"),
    })
    emulate = flash_attention_emulated() if attention == "flash" else contextlib.nullcontext()
    with emulate, counter.active():
        cris_loss(model(image, tokens).float(), mask)
    parts: dict[str, int] = defaultdict(int)
    for scope, nbytes in counter.by_scope.items():
        parts[part_of(scope)] += nbytes
    return dict(sorted(parts.items(), key=lambda kv: -kv[1]))


def fixed_bytes(model: CRIS, dtype: torch.dtype) -> dict[str, int]:
    """Memory a training step holds per trainable parameter, whatever the batch."""
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    copy = 0 if dtype == torch.float32 else count * torch.finfo(dtype).bits // 8
    return {"parameters": 4 * count, "gradients": 4 * count, "adam_moments": 8 * count,
            "autocast_weight_copies": copy}


def parse_plan(text: str) -> list[str]:
    """'backbone,decoder' -> ['backbone', 'decoder']; 'none' or '' -> []."""
    parts = [p.strip() for p in text.split(",") if p.strip() and p.strip() != "none"]
    unknown = [p for p in parts if p not in CHECKPOINT_PARTS]
    if unknown:
        raise ValueError(f"unknown checkpointing parts {unknown} in plan {text!r}; choose from "
                         f"{', '.join(CHECKPOINT_PARTS)}")
    return parts


def plan_figures(model: CRIS, batch: int, plan: list[str], attention: str,
                 fixed_total: int) -> dict[str, Any]:
    """One plan's activations per part (GB and bytes) and its estimated peak."""
    parts = activation_bytes(model, batch, plan, attention)
    total = sum(parts.values())
    return {
        "checkpoint": plan,
        "activations_gb": {k: round(v / GB, 3) for k, v in parts.items()},
        "activations_bytes": parts,
        "activations_total_gb": round(total / GB, 3),
        "estimated_peak_gb": round((fixed_total + total) / GB, 3),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `argv` (default sys.argv), estimate, print the JSON line; -> the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cris_r50")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="autocast dtype of the activations")
    parser.add_argument("--attention", choices=("flash", "math"), default="flash")
    parser.add_argument("--dropout", type=float, default=None, help="override the preset's")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", default=None,
                       help=f"one plan: comma list of {', '.join(CHECKPOINT_PARTS)} (may be '')")
    which.add_argument("--plans", default=DEFAULT_PLANS,
                       help="several plans, ';'-separated ('none' = no checkpointing)")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    model = build_meta_model(args.preset, dtype, args.dropout)
    fixed = fixed_bytes(model, dtype)
    fixed_total = sum(fixed.values())
    result: dict[str, Any] = {
        "bench": "activation_memory", "machine": machine(), "preset": args.preset,
        "batch_size": args.batch_size, "input_size": model.config.input_size,
        "word_len": model.config.word_len, "dtype": args.dtype, "attention": args.attention,
        "params": fixed["parameters"] // 4,
        **{f"{k}_gb": round(v / GB, 3) for k, v in fixed.items()},
        "fixed_bytes": fixed, "fixed_total_gb": round(fixed_total / GB, 3),
    }
    if args.checkpoint is not None:
        result.update(plan_figures(model, args.batch_size, parse_plan(args.checkpoint),
                                   args.attention, fixed_total))
    else:
        names = [n.strip() for n in args.plans.split(";")]
        plans = {n: plan_figures(model, args.batch_size, parse_plan(n), args.attention,
                                 fixed_total) for n in names}
        result["plans"] = plans
        if "none" in plans:
            base = plans["none"]["estimated_peak_gb"]
            result["ratio_vs_none"] = {n: round(p["estimated_peak_gb"] / base, 3)
                                       for n, p in plans.items()}
    result["note"] = NOTE
    emit(result, args.out or None)
    return result


if __name__ == "__main__":
    main()
