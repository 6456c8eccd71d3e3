"""Training epoch time with a frozen CLIP: from images vs from the feature cache (prints JSON).

Both runs call the real trainer (`cris_model.training.loop.train`) on the same synthetic data with
`train.freeze_backbone: true`; the second also sets `train.features_dir` to a cache built
first by `build_feature_cache` (its one-off cost is reported apart). Epoch seconds are
training time only (per-epoch validation excluded), averaged over the epochs.

    .venv/bin/python bench/feature_cache_speedup.py [--preset cris_r50 --input-size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cris_model.data.manifest import prepare_dataset
from cris_model.data.synth import generate
from cris_model.features import build_feature_cache
from cris_model.model import create_model
from cris_model.training.loop import train


def _params(args: argparse.Namespace, features_dir: str) -> dict[str, Any]:
    model: dict[str, Any] = {"preset": args.preset, "random_init": True, "pretrained": ""}
    if args.input_size:
        model["input_size"] = args.input_size
    return {
        "model": model,
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 1e-3,
                  "device": args.device, "seed": 0, "freeze_backbone": True,
                  "features_dir": features_dir, "tracking": False, "progress": False,
                  "gallery_size": 0, "num_workers": args.num_workers},
        "eval": {"threshold": 0.35},
    }


def _epoch_seconds(params: dict[str, Any], data: Path, out: Path) -> float:
    result = train(params, data, out)
    samples = result.steps * params["train"]["batch_size"]
    return samples / result.samples_per_s / result.epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cris_tiny")
    parser.add_argument("--input-size", type=int, default=0, help="0: the preset's")
    parser.add_argument("--images", type=int, default=120, help="synthetic images generated")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cris-bench-") as tmp:
        root = Path(tmp)
        generate(root / "synth", images=args.images, seed=0)
        summary = prepare_dataset(root / "synth", "refcoco", "unc", root / "prepared")
        data = root / "prepared"
        model = create_model(_params(args, ""), seed=0)  # train.seed, as training seeds
        tick = time.perf_counter()
        cache = build_feature_cache(model, data, "train", root / "features", device=args.device)
        cache_seconds = time.perf_counter() - tick
        from_images = _epoch_seconds(_params(args, ""), data, root / "run-images")
        from_cache = _epoch_seconds(_params(args, str(root / "features")), data,
                                    root / "run-cache")
    print(json.dumps({
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": args.device},
        "preset": args.preset, "input_size": model.config.input_size,
        "train_refs": summary.get("splits", {}).get("train", {}).get("refs"),
        "train_sentences": cache["sentences"], "batch_size": args.batch_size,
        "epochs": args.epochs, "cache_build_seconds": round(cache_seconds, 3),
        "epoch_seconds_images_frozen": round(from_images, 3),
        "epoch_seconds_cache": round(from_cache, 3),
        "ratio": round(from_images / from_cache, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
