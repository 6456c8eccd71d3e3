"""Val mIoU against wall time for the demo's old and new training recipes (JSON and a PNG).

Both recipes train with the real trainer (`cris_model.training.loop.train`, tracking off) on
one prepared folder, one after the other on the same machine and thread count, so their
times compare as a ratio. "new" is params.yaml as committed; "old" is params.yaml with
OLD_RECIPE applied (the demo recipe before issue 13). Each point is one epoch's validation:
seconds since the run started (data loading, training and validation included) and val mIoU.

    .venv/bin/python bench/recipe_curve.py --data demo/assets/prepared \
        [--png docs/recipe_curve.png --out result.json --threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from bench_common import emit, machine  # noqa: E402

from cris_model.baselines import language_blind_report  # noqa: E402
from cris_model.data.manifest import read_manifest  # noqa: E402
from cris_model.params import load_params  # noqa: E402
from cris_model.training.loop import train  # noqa: E402

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
OLD_RECIPE = [  # the demo's model and train settings before issue 13
    "model.input_size=128", "model.neck_stride=16", "model.fpn_out=[64,128,128]",
    "model.vis_dim=128", "model.dim_ffn=256", "model.num_layers=2", "model.neck_film=false",
    "train.epochs=7",
    "train.loss_size=logits", "train.text_lr_scale=0.0", "train.warmup_steps=0",
    "train.freeze_token_embedding=false", "train.cache_images=false",
    "train.phrases_per_image=1", "train.precision=fp32", "train.memory_format=contiguous",
    "train.fused_optimizer=false", "train.batch_size=16",
]
RECIPES = {"old": OLD_RECIPE, "new": []}
GOAL_MIOU = 0.75  # issue 13's target for the demo's val mIoU


class CurveTracker:
    """A Tracker that keeps (seconds since start, val mIoU) for each validation."""

    run_id = None  # no tracking server: the trainer records no run id

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.points: list[dict[str, float]] = []

    def start(self, run_name: str, params: Mapping[str, Any], run_id: str | None = None) -> None:
        """Nothing to open; the clock started when the tracker was made."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Keep val mIoU and oIoU with the time they arrived."""
        if "val/mIoU" in metrics:
            self.points.append({"seconds": round(time.perf_counter() - self.t0, 1),
                                "step": step, "mIoU": round(metrics["val/mIoU"], 4),
                                "oIoU": round(metrics["val/oIoU"], 4)})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Artifacts are not kept."""

    def end(self, status: str = "FINISHED") -> None:
        """Nothing to close."""


def run_recipe(overrides: list[str], data: Path, out: Path) -> list[dict[str, float]]:
    """Train one recipe on `data` into `out`; -> its validation points."""
    params = load_params(PARAMS, [*overrides, "train.tracking=false", "train.progress=false",
                                  "train.gallery_size=0", "train.device=cpu"])
    tracker = CurveTracker()
    train(params, data, out, tracker=tracker)
    return tracker.points


def reference_lines(data: Path) -> list[tuple[float, str]]:
    """(val mIoU, label) drawn across the plot: the blind oracle of `data`'s val split (the
    best single object per image, phrase ignored) and the goal."""
    blind = language_blind_report(read_manifest(data / "val.parquet"))
    return [(round(blind["blind_oracle_mIoU"], 3), "language-blind oracle"), (GOAL_MIOU, "goal")]


def plot(curves: dict[str, list[dict[str, float]]], png: Path, title: str,
         lines: list[tuple[float, str]]) -> None:
    """One line per recipe: val mIoU against minutes of wall time, with dashed `lines`
    (temp file + rename)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, points in curves.items():
        ax.plot([p["seconds"] / 60 for p in points], [p["mIoU"] for p in points], marker="o",
                label=f"{name} recipe (best {max(p['mIoU'] for p in points):.3f})")
    for level, label in lines:
        ax.axhline(level, color="grey", linestyle="--", linewidth=0.8)
        ax.text(0.01, level + 0.01, f"{label} ({level})", transform=ax.get_yaxis_transform(),
                fontsize=7, color="grey")
    ax.set_xlabel("wall time (minutes, training and per-epoch validation)")
    ax.set_ylabel("val mIoU")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = png.with_name(f".{png.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train each recipe, plot, print and return the JSON result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="prepared folder (cris data prepare)")
    ap.add_argument("--png", type=Path, default=Path("docs/recipe_curve.png"))
    ap.add_argument("--out", help="also write the JSON result here")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="params overrides for every recipe (e.g. train.epochs=2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            curves[name] = run_recipe([*RECIPES[name], *args.set], args.data, Path(tmp) / name)
    info, lines = machine(), reference_lines(args.data)
    plot(curves, args.png, f"demo data, {info['device']}, {args.threads} threads, "
                           f"{info['date']}", lines)
    result = {"bench": "recipe_curve", "machine": info, "threads": args.threads,
              "overrides": args.set, "curves": curves, "png": str(args.png),
              "reference_lines": [{"mIoU": level, "label": label} for level, label in lines]}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
