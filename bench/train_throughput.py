"""Training throughput of CRIS on one GPU: the reference's settings against ours (prints JSON).

Every mode runs the project's own training step (`cris_model.training.loop`: the module DDP wraps,
the optimizer groups, autocast, the loss) on the same random-tensor batches already on the
device (no data loading), from the same random initial weights:

- reference: fp16 autocast + GradScaler, NCHW, the grouped dynamic convolution, per-tensor
  Adam, AvgPool2d: the reference CRIS's settings, the in-run baseline of every ratio;
- fast: bf16 autocast, channels-last, the matmul dynamic convolution, fused Adam, the
  reshape-mean 2x2 pooling in CLIP's ResNet (the project's defaults on a GPU);
- fast_avgpool: fast with CLIP's own AvgPool2d (isolates the pooling lever);
- fast_ckpt: fast with the CLIP ResNet stages recomputed in backward
  (`train.activation_checkpointing: [backbone]`); fast_ckpt_decoder also recomputes the
  decoder layers, fast_ckpt_all the projector's upsampling stack too: the memory levers;
- cached: fast with a frozen CLIP, the head trained from CLIP features (the feature-cache
  path, features resident on the device);
- fast_compiled: fast with every block compiled (`train.compile`,
  `cris_model.accel.compile_regions`), compilation included in the time to the last step
  and reported alone as the first step's time; fast_compiled_ckpt_decoder adds the
  backbone and decoder recomputation.

Then the loss curves of fast (bf16) and of the reference settings in fp32 on the same
batches over --curve-steps steps (dropout off so that only arithmetic differs), from
--curve-seeds initialisations: the bf16-to-fp32 gap is set against the gap between fp32
runs from two seeds. With --profile, the GPU kernels that take the most time in a few
fast steps.

    python bench/train_throughput.py [--preset cris_r50 --batch-size 64 --steps 100]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import emit, failure, machine, save, sync
from precision_curve import gaps

from cris_model.accel import compile_regions
from cris_model.backbone import tokenize
from cris_model.config import get_preset
from cris_model.imaging import normalize
from cris_model.layers import use_mean_pooling
from cris_model.model import CHECKPOINT_PARTS, CRIS, build_model
from cris_model.training.config import TrainConfig
from cris_model.training.loop import _amp, _Net, _step, memory_format
from cris_model.training.optim import build_optimizer, set_lr

MODES: dict[str, dict[str, Any]] = {
    "reference": {"precision": "fp16", "memory_format": "contiguous", "fused_optimizer": False,
                  "dynamic_conv": "grouped", "mean_pool": False},
    "fast": {"precision": "bf16", "memory_format": "channels_last", "fused_optimizer": True,
             "dynamic_conv": "matmul"},
    "fast_avgpool": {"precision": "bf16", "memory_format": "channels_last",
                     "fused_optimizer": True, "dynamic_conv": "matmul", "mean_pool": False},
    "fast_ckpt": {"precision": "bf16", "memory_format": "channels_last",
                  "fused_optimizer": True, "dynamic_conv": "matmul",
                  "activation_checkpointing": ["backbone"]},
    "fast_ckpt_decoder": {"precision": "bf16", "memory_format": "channels_last",
                          "fused_optimizer": True, "dynamic_conv": "matmul",
                          "activation_checkpointing": ["backbone", "decoder"]},
    "fast_ckpt_all": {"precision": "bf16", "memory_format": "channels_last",
                      "fused_optimizer": True, "dynamic_conv": "matmul",
                      "activation_checkpointing": list(CHECKPOINT_PARTS)},
    "cached": {"precision": "bf16", "memory_format": "channels_last", "fused_optimizer": True,
               "dynamic_conv": "matmul", "freeze_backbone": True},
    "fast_compiled": {"precision": "bf16", "memory_format": "channels_last",
                      "fused_optimizer": True, "dynamic_conv": "matmul", "compile": True},
    "fast_compiled_ckpt_decoder": {"precision": "bf16", "memory_format": "channels_last",
                                   "fused_optimizer": True, "dynamic_conv": "matmul",
                                   "compile": True,
                                   "activation_checkpointing": ["backbone", "decoder"]},
    "fp32": {"precision": "fp32", "memory_format": "contiguous", "fused_optimizer": False,
             "dynamic_conv": "grouped", "mean_pool": False},
}
PHRASES = ["the dog on the left", "man in a red shirt", "second car from the right",
           "small white cup", "the tallest tree behind the fence", "woman holding an umbrella"]


def make_batches(
    count: int, batch: int, size: int, word_len: int, device: torch.device, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """`count` batches of smooth random uint8 images, phrases and masks that follow the
    image (so the loss can fall), on the device."""
    gen = torch.Generator().manual_seed(seed)
    tokens = tokenize(PHRASES, word_len)
    out = []
    for _ in range(count):
        low = torch.rand(batch, 3, 13, 13, generator=gen)
        image = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        pick = torch.randint(len(PHRASES), (batch,), generator=gen)
        out.append({
            "image": (image * 255).to(torch.uint8).to(device),
            "tokens": tokens[pick].to(device),
            "mask": (image[:, 0] > 0.5).float().to(device),
        })
    return out


def _model(preset: str, mode: dict[str, Any], device: torch.device, cfg: TrainConfig,
           dropout: float | None, seed: int) -> CRIS:
    torch.manual_seed(seed)
    config = get_preset(preset, random_init=True, pretrained="",
                        dynamic_conv=mode["dynamic_conv"], dropout=dropout)
    model = build_model(config)
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    use_mean_pooling(model, mode.get("mean_pool", True))
    if mode.get("freeze_backbone"):
        model.backbone.requires_grad_(False)
    model = model.to(device, memory_format=memory_format(cfg, device))
    if cfg.compile:
        compile_regions(model)
    return model


def _config(mode: dict[str, Any], batch: int) -> TrainConfig:
    keys = ("precision", "memory_format", "fused_optimizer", "freeze_backbone",
            "activation_checkpointing", "compile")
    return replace(TrainConfig(), batch_size=batch, **{k: mode[k] for k in keys if k in mode})


def _cache_features(model: CRIS, batches: list[dict[str, torch.Tensor]],
                    layout: torch.memory_format) -> list[dict[str, torch.Tensor]]:
    """What the feature cache hands the trainer: CLIP features (bf16) plus the mask."""
    out = []
    device = batches[0]["image"].device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for b in batches:
            image = normalize(b["image"]).contiguous(memory_format=layout)
            feats = model.encode(image, b["tokens"])
            out.append({**{k: v.to(torch.bfloat16) if v.is_floating_point() else v
                           for k, v in feats.items()}, "mask": b["mask"]})
    return out


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _bytes(batches: list[dict[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for b in batches for t in b.values())


def run_mode(name: str, args: argparse.Namespace, batches: list[dict[str, torch.Tensor]],
             steps: int, dropout: float | None = None, seed: int = 0,
             profile: int = 0) -> dict[str, Any]:
    """Train `steps` steps in mode `name`; -> timings, peak memory and the loss per step.
    With `profile` > 0, that many more steps run under the profiler (-> "top_kernels")."""
    mode, device = MODES[name], torch.device(args.device)
    cfg = _config(mode, args.batch_size)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    base = _allocated(device)  # the input batches, held in every mode
    model = _model(args.preset, mode, device, cfg, dropout, seed)
    if mode.get("freeze_backbone"):
        batches = _cache_features(model, batches, memory_format(cfg, device))
        base += _bytes(batches)
    model.train()
    if mode.get("freeze_backbone"):
        model.backbone.eval()
    net = _Net(model, cfg.freeze_backbone, memory_format(cfg, device))
    opt = build_optimizer(model, cfg)
    set_lr(opt, cfg, 0, 1)  # the first step's LRs, held
    amp, fp16 = _amp(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    losses, marks = [], {}
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        losses.append(_step(net, batches[i % len(batches)], opt, scaler, amp, 0.0))
        if i + 1 in (1, args.warmup, steps):
            sync(device)
            marks[i + 1] = time.perf_counter()
    done = marks[steps] - start
    steady = (steps - args.warmup) * args.batch_size / (marks[steps] - marks[args.warmup])
    result = {
        "mode": name, **{k: v for k, v in mode.items()}, "steps": steps,
        "seconds_to_last_step": round(done, 2),
        "first_step_s": round(marks[1] - start, 2),
        "steady_samples_per_s": round(steady, 1),
        "peak_memory_gb": round((torch.cuda.max_memory_allocated(device) - base) / 1e9, 2)
        if device.type == "cuda" else None,
        "losses": [round(x, 5) for x in torch.stack(losses).float().tolist()],
    }
    if profile:
        result["top_kernels"] = top_kernels(
            lambda: _step(net, batches[0], opt, scaler, amp, 0.0), profile, device)
    return result


def top_kernels(fn: Callable[[], Any], calls: int, device: torch.device,
                count: int = 15) -> list[list[Any]]:
    """[kernel name, ms per call, % of GPU time] of the `count` costliest kernels of fn."""
    cuda = device.type == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    if cuda:  # the kernels themselves, not the CPU-side ops that launched them
        rows = [(e.key, e.self_device_time_total) for e in prof.key_averages()
                if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in rows) or 1.0
    rows.sort(key=lambda r: -r[1])
    return [[name[:90], round(t / calls / 1e3, 3), round(100 * t / total, 1)]
            for name, t in rows[:count]]


def _windows(xs: list[float], width: int) -> list[float]:
    return [sum(xs[i:i + width]) / width for i in range(0, len(xs) - width + 1, width)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cris_r50")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100, help="steps per mode (timed)")
    parser.add_argument("--warmup", type=int, default=30, help="steps before steady state")
    parser.add_argument("--modes", default="reference,fast,fast_ckpt,cached")
    parser.add_argument("--curve-steps", type=int, default=150, help="0 skips the loss curves")
    parser.add_argument("--curve-batch-size", type=int, default=8)
    parser.add_argument("--curve-seeds", type=int, default=2)
    parser.add_argument("--profile", type=int, default=0, help="profiled fast steps (0: none)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    size = get_preset(args.preset).input_size
    word_len = get_preset(args.preset).word_len
    batches = make_batches(4, args.batch_size, size, word_len, torch.device(args.device))
    runs: dict[str, dict[str, Any]] = {}
    for name in args.modes.split(","):
        try:
            runs[name] = run_mode(name, args, batches, args.steps,
                                  profile=args.profile if name == "fast" else 0)
        except RuntimeError as e:  # a mode that fails (compile, memory) is reported, not fatal
            runs[name] = {"mode": name, **failure(e)}
        if args.out:
            save(_summary(args, size, runs), args.out)
    result = _summary(args, size, runs)
    if args.curve_steps:
        del batches
        result["loss_curve"] = loss_curves(args, size, word_len)
    emit(result, args.out or None)


def _summary(args: argparse.Namespace, size: int,
             runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON of the modes run so far, with their ratios to the reference mode."""
    result: dict[str, Any] = {
        "bench": "train_throughput", "machine": machine(), "preset": args.preset,
        "batch_size": args.batch_size, "input_size": size, "steps": args.steps,
        "warmup": args.warmup, "data": "random tensors on the device, no loader",
        "modes": {n: {k: v for k, v in r.items() if k not in ("losses", "top_kernels")}
                  for n, r in runs.items()},
    }
    if "top_kernels" in runs.get("fast", {}):
        result["top_kernels_fast"] = runs["fast"]["top_kernels"]
    ref = runs.get("reference", {})
    if "steady_samples_per_s" in ref:
        result["ratios_vs_reference"] = {
            n: {"samples_per_s": round(r["steady_samples_per_s"] / ref["steady_samples_per_s"], 2),
                "peak_memory": round(r["peak_memory_gb"] / ref["peak_memory_gb"], 2)
                if ref["peak_memory_gb"] else None,
                "time_to_last_step": round(r["seconds_to_last_step"]
                                           / ref["seconds_to_last_step"], 2)}
            for n, r in runs.items() if n != "reference" and "error" not in r}
    return result


def loss_curves(args: argparse.Namespace, size: int, word_len: int) -> dict[str, Any]:
    """Windowed loss of fast (bf16) and fp32 reference settings from the same weights and
    batches, per seed; the fp32 seed-to-seed gap is the yardstick for the bf16 gap."""
    curve_args = argparse.Namespace(**{**vars(args), "batch_size": args.curve_batch_size,
                                       "warmup": 1})
    small = make_batches(8, args.curve_batch_size, size, word_len, torch.device(args.device),
                         seed=1)
    width = max(args.curve_steps // 10, 1)
    curves: dict[str, list[float]] = {}
    for seed in range(args.curve_seeds):
        for name, mode in (("bf16_fast", "fast"), ("fp32_reference", "fp32")):
            losses = run_mode(mode, curve_args, small, args.curve_steps, dropout=0.0,
                              seed=seed)["losses"]
            curves[f"{name}_seed{seed}"] = [round(x, 4) for x in _windows(losses, width)]
    out: dict[str, Any] = {"steps": args.curve_steps, "batch_size": args.curve_batch_size,
                           "window": width, "curves": curves}
    for seed in range(args.curve_seeds):
        out[f"bf16_vs_fp32_max_rel_seed{seed}"] = gaps(
            curves[f"bf16_fast_seed{seed}"], curves[f"fp32_reference_seed{seed}"])["max_rel"]
    if args.curve_seeds > 1:
        out["fp32_seed0_vs_seed1_max_rel"] = gaps(curves["fp32_reference_seed0"],
                                                  curves["fp32_reference_seed1"])["max_rel"]
    return out


if __name__ == "__main__":
    main()
