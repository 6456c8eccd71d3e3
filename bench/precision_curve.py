"""Does bf16 training follow the fp32 loss curve? Three real training runs compared (prints JSON).

Runs the real trainer (`cris_model.training.loop.train`, tracking off) three times on one synthetic
data set (learnable coloured shapes and phrases, `cris_model.data.synth`), with the demo's
settings from params.yaml (Adam at 3e-3, cosine decay, Dice loss, flips) and only precision
or seed changed:

- bf16_seed0: `train.precision: bf16` (autocast), seed 0;
- fp32_seed0: fp32, seed 0: the same initial weights and the same batches as bf16_seed0,
  since `train` seeds python, numpy and torch from `train.seed` before building the model,
  `ShardedBatchSampler` draws each epoch's order from (seed, epoch) alone, and `RefDataset`
  draws each sentence and flip from (seed, epoch, ref index);
- fp32_seed1: fp32, seed 1 (other weights and batches): the yardstick. Two fp32 runs from
  different seeds show how far curves of equally good training drift apart.

Each curve is the trainer's own `history.csv` (mean loss over each window of --log-every
steps). Gaps are |a - b| / b per window, their max and mean over the whole curve and over its
last third. Verdict: bf16 follows fp32 when its mean gap to fp32 from the same seed is no
larger than the fp32 seed-to-seed mean gap. Val metrics after the last step and training
samples/s come from each run's `TrainResult`.

    .venv/bin/python bench/precision_curve.py [--steps 300 --device cuda --out result.json]
"""

from __future__ import annotations

import argparse
import csv
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import emit, machine

from cris_model.data.manifest import prepare_dataset
from cris_model.data.synth import generate
from cris_model.training.loop import HISTORY, train

RUNS: dict[str, dict[str, Any]] = {  # run name -> the train: settings that differ
    "bf16_seed0": {"precision": "bf16", "seed": 0},
    "fp32_seed0": {"precision": "fp32", "seed": 0},
    "fp32_seed1": {"precision": "fp32", "seed": 1},
}
RULE = ("bf16_within_seed_spread: mean over windows of |bf16_seed0 - fp32_seed0| / fp32_seed0 "
        "<= mean over windows of |fp32_seed1 - fp32_seed0| / fp32_seed0")


def _params(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, Any]:
    """params.yaml's demo model and train settings, tracking off, ended by max_steps."""
    return {
        "model": {"preset": args.preset, "pretrained": "", "random_init": True, "word_len": 17},
        "train": {"epochs": args.steps, "max_steps": args.steps, "batch_size": args.batch_size,
                  "lr": 3e-3, "schedule": "cosine", "clip_lr_scale": 0.1, "dice_weight": 1.0,
                  "flip": True, "log_every": args.log_every, "device": args.device,
                  "num_workers": args.num_workers, "tracking": False, "progress": False,
                  "gallery_size": 0, **run},
        "eval": {"threshold": 0.35},
    }


def read_history(path: Path) -> list[tuple[int, float]]:
    """The (step, loss) rows of a trainer's `history.csv` (header `step,loss`)."""
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        return [(int(r["step"]), float(r["loss"])) for r in rows]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise RuntimeError(f"{path}: not a readable step,loss history: {e}") from e


def gaps(a: list[float], b: list[float]) -> dict[str, float]:
    """Relative gaps |a-b|/b per window: max and mean over all windows and the last third."""
    if len(a) != len(b) or not a:
        raise ValueError(f"curves of {len(a)} and {len(b)} windows cannot be compared")
    rel = [abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)]
    tail = rel[len(rel) - max(1, len(rel) // 3):]
    return {"max_rel": round(max(rel), 4), "mean_rel": round(sum(rel) / len(rel), 4),
            "last_third_max_rel": round(max(tail), 4),
            "last_third_mean_rel": round(sum(tail) / len(tail), 4)}


def _run(args: argparse.Namespace, name: str, data: Path, out: Path) -> dict[str, Any]:
    tick = time.perf_counter()
    result = train(_params(args, RUNS[name]), data, out)
    seconds = time.perf_counter() - tick
    history = read_history(out / HISTORY)
    if result.steps != args.steps:
        raise RuntimeError(f"run {name} stopped after {result.steps} of {args.steps} steps")
    return {"steps": [s for s, _ in history], "curve": [loss for _, loss in history],
            "val": {k: round(v, 4) for k, v in result.last_metrics.items()},
            "samples_per_s": round(result.samples_per_s, 2), "wall_s": round(seconds, 1)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Generate and prepare the data, train the three runs, and compare their curves."""
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cris-precision-") as tmp:
        root = Path(tmp)
        generate(root / "synth", images=args.images, seed=0)
        summary = prepare_dataset(root / "synth", "refcoco", "unc", root / "prepared")
        for name in RUNS:
            runs[name] = _run(args, name, root / "prepared", root / name)
    steps = runs["fp32_seed0"]["steps"]
    if any(r["steps"] != steps for r in runs.values()):
        raise RuntimeError("the runs logged their losses at different steps")
    curves = {name: r.pop("curve") for name, r in runs.items()}
    for name, curve in curves.items():
        if not all(math.isfinite(x) for x in curve):
            raise RuntimeError(f"run {name}: non-finite training loss")
    bf16 = gaps(curves["bf16_seed0"], curves["fp32_seed0"])
    seeds = gaps(curves["fp32_seed1"], curves["fp32_seed0"])
    return {
        "machine": {**machine(), "run_device": args.device},
        "preset": args.preset, "images": args.images,
        "train_refs": summary.get("splits", {}).get("train", {}).get("refs"),
        "steps": args.steps, "batch_size": args.batch_size, "log_every": args.log_every,
        "window_steps": steps,
        "curves": {name: [round(x, 4) for x in c] for name, c in curves.items()},
        "bf16_vs_fp32_seed0": bf16, "fp32_seed0_vs_seed1": seeds,
        "runs": {name: {k: v for k, v in r.items() if k != "steps"} for name, r in runs.items()},
        "rule": RULE,
        "bf16_within_seed_spread": bf16["mean_rel"] <= seeds["mean_rel"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cris_tiny")
    parser.add_argument("--images", type=int, default=160, help="synthetic images generated")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--log-every", type=int, default=10, help="steps per loss window")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args()
    if args.steps < 1 or args.log_every < 1 or args.steps < args.log_every:
        parser.error("need 1 <= --log-every <= --steps")
    emit(measure(args), args.out or None)


if __name__ == "__main__":
    main()
