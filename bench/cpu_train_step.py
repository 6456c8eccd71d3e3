"""Time of the demo's training step on the CPU by precision, layout and batch (prints JSON).

Each mode runs the trainer's own step (`cris_model.training.loop`: `_Net` with shared image
encoding, the optimizer groups, autocast, the loss) on train_throughput's random batches,
laid out as training lays them out (runs of `phrases_per_image` phrases of one image), from
the same initial weights. Modes alternate round by round, so a machine that slows down
mid-run slows all of them alike; the figure is each mode's fastest round, and ratios are to
the first mode.

    .venv/bin/python bench/cpu_train_step.py [--threads 2 --rounds 5 --steps 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import emit, machine
from train_throughput import make_batches

from cris_model.params import load_params, section
from cris_model.training.config import TrainConfig
from cris_model.training.distributed import DistContext
from cris_model.training.loop import _amp, _build, _Net, _step, memory_format
from cris_model.training.optim import build_optimizer

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
MODES: dict[str, list[str]] = {  # params.yaml overrides per mode; the first is the baseline
    "fp32": ["train.precision=fp32", "train.memory_format=contiguous", "train.batch_size=16"],
    "fp32_channels_last": ["train.precision=fp32", "train.memory_format=channels_last",
                           "train.batch_size=16"],
    "bf16_channels_last": ["train.precision=bf16", "train.memory_format=channels_last",
                           "train.batch_size=16"],
    "bf16_channels_last_batch32": ["train.precision=bf16", "train.memory_format=channels_last",
                                   "train.batch_size=32"],
}


def run_mode(overrides: list[str], steps: int) -> tuple[Any, ...]:
    """(step function, samples per step) of one mode, built from params.yaml + overrides."""
    params = load_params(PARAMS, [*overrides, "train.device=cpu", "train.tracking=false"])
    cfg = TrainConfig.from_params(section(params, "train"))
    ctx = DistContext()
    model = _build(params, cfg, ctx)
    fmt = memory_format(cfg, ctx.device)
    net = _Net(model, False, fmt, share_images=cfg.groups_by_image)
    opt = build_optimizer(model, cfg)
    amp, fp16 = _amp(cfg, ctx.device)
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    batch = random_batch(cfg.batch_size, cfg.phrases_per_image, model.config.input_size,
                         model.config.word_len)

    def step() -> None:
        for _ in range(steps):
            _step(net, batch, opt, scaler, amp, cfg.dice_weight, cfg.loss_size == "input")

    return step, cfg.batch_size


def random_batch(size: int, per_image: int, side: int, word_len: int) -> dict[str, torch.Tensor]:
    """One of train_throughput's random batches, laid out as training lays it out: runs of
    `per_image` items share the first item's image and mask, and carry its `image_id`."""
    batch = make_batches(1, size, side, word_len, torch.device("cpu"))[0]
    image_id = torch.arange(size) // max(per_image, 1)
    first = image_id * max(per_image, 1)
    return {**batch, "image": batch["image"][first], "mask": batch["mask"][first],
            "image_id": image_id}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per mode")
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.modes.split(",")
    built = {name: run_mode(MODES[name], args.steps) for name in names}
    for step, _ in built.values():
        step()  # warm-up round
    best = dict.fromkeys(names, float("inf"))
    for _ in range(args.rounds):
        for name, (step, _) in built.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], (time.perf_counter() - start) / args.steps)
    base = built[names[0]][1] / best[names[0]]
    modes = {name: {"ms_per_step": round(best[name] * 1000, 1), "batch_size": built[name][1],
                    "samples_per_s": round(built[name][1] / best[name], 1),
                    "samples_per_s_ratio": round(built[name][1] / best[name] / base, 3)}
             for name in names}
    emit({"bench": "cpu_train_step", "machine": machine(), "threads": args.threads,
          "rounds": args.rounds, "steps_per_round": args.steps, "modes": modes}, args.out)


if __name__ == "__main__":
    main()
