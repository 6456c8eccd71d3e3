"""Training data loader throughput on COCO-sized JPEGs: samples/s by num_workers (prints JSON).

The bench makes its own data: the synthetic generator (`cris_model.data.synth`) at COCO image
sizes (640x480 and the like, JPEG quality 90, grain so that files weigh about what COCO's
do), prepared by `prepare_dataset`. The train manifest is then repeated under fresh ref and
sentence ids up to --samples referred objects, so a few hundred images serve a few thousand
samples (RefCOCO too has about 2.5 referred objects per image). The loader is built as
training builds it (`cris_model.training.loop._loader`: RefDataset sample="ref" with flips, collate,
ShardedBatchSampler); samples/s are counted after a warm-up of one batch per worker. A
per-sample breakdown, timed in this process, shows where a sample's time goes.

    .venv/bin/python bench/loader_throughput.py [--workers 0,4,8,16 --samples 4096 --out F]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from bench_common import emit, machine
from PIL import features

from cris_model.atomic import staged_file, write_text
from cris_model.backbone import tokenize
from cris_model.data.dataset import RefDataset, ShardedBatchSampler, collate, read_image
from cris_model.data.manifest import prepare_dataset
from cris_model.data.synth import SynthConfig, generate
from cris_model.imaging import letterbox_image, letterbox_mask
from cris_model.training.config import TrainConfig
from cris_model.training.loop import _loader

COCO_SIZES = ((640, 480), (640, 480), (640, 427), (480, 640), (500, 375))  # (width, height)
_STAGES = ("read_image", "letterbox_image", "mask_decode", "letterbox_mask", "tokenize")


def _synth_config(grain: float) -> SynthConfig:
    """Shapes scaled with the 5x larger images (radius 40-95 px instead of 8-19)."""
    return SynthConfig(min_radius=40.0, max_radius=95.0, image_sizes=COCO_SIZES,
                       pixel_noise=grain)


def _repeat_train(prepared: Path, refs: int) -> dict[str, int]:
    """Rewrite `prepared/train.parquet` as copies of itself (ids shifted) holding `refs` refs."""
    path = prepared / "train.parquet"
    table = pq.read_table(path)
    stride = max(pc.max(table["ref_id"]).as_py(), pc.max(table["sent_id"]).as_py()) + 1
    have = len(pc.unique(table["ref_id"]))
    copies = []
    for k in range(math.ceil(refs / have)):
        shifted = table
        for col in ("ref_id", "sent_id"):
            shifted = shifted.set_column(shifted.schema.get_field_index(col), col,
                                         pc.add(table[col], k * stride))
        copies.append(shifted)
    tiled = pa.concat_tables(copies)
    keep = pc.unique(tiled["ref_id"])[:refs]
    tiled = tiled.filter(pc.is_in(tiled["ref_id"], value_set=keep))
    with staged_file(path) as tmp:
        pq.write_table(tiled, tmp)
    summary_path = prepared / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    counts = {"refs": refs, "sentences": tiled.num_rows, "distinct_refs": have}
    summary["splits"]["train"].update(refs=refs, sentences=tiled.num_rows)
    write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    return counts


def make_data(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Generate, prepare and repeat the train split under `root`; reuse a matching earlier run."""
    settings = {"images": args.images, "samples": args.samples, "seed": args.seed,
                "grain": args.grain, "sizes": [list(s) for s in COCO_SIZES]}
    marker = root / "bench.json"
    if marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        if done.get("settings") == settings:
            return {**done["data"], "reused": True}
    tick = time.perf_counter()
    generate(root / "synth", images=args.images, seed=args.seed,
             config=_synth_config(args.grain))
    generate_s = time.perf_counter() - tick
    prepare_dataset(root / "synth", "refcoco", "unc", root / "prepared")
    counts = _repeat_train(root / "prepared", args.samples)
    jpegs = list((root / "synth" / "images").rglob("*.jpg"))
    data = {"root": str(root), "images": len(jpegs),
            "jpeg_kb_mean": round(sum(p.stat().st_size for p in jpegs) / len(jpegs) / 1e3, 1),
            "train": counts, "generate_s": round(generate_s, 2),
            "total_s": round(time.perf_counter() - tick, 2)}
    write_text(marker, json.dumps({"settings": settings, "data": data}, indent=2) + "\n")
    return {**data, "reused": False}


def timed_pass(dataset: Any, cfg: TrainConfig, args: argparse.Namespace,
               on_batch: Callable[[Any], None] | None = None) -> tuple[dict[str, Any], Any]:
    """One epoch-0 pass through the loader training builds (`cris_model.training.loop._loader` with
    `cfg`), timed from the end of the warm-up (one batch per worker, 2 at least) for up to
    args.seconds, each timed batch handed to `on_batch` first. -> (figures, the last warm-up
    batch)."""
    sampler = ShardedBatchSampler(len(dataset), args.batch_size, seed=args.seed)
    warm = max(2, cfg.num_workers)
    if len(sampler) <= warm:
        raise ValueError(f"--samples {args.samples} gives {len(sampler)} batches of "
                         f"{args.batch_size}, not more than the {warm} warm-up batches")
    dataset.set_epoch(0)  # RefDataset, FeatureDataset or a wrapper with set_epoch
    sampler.set_epoch(0)
    tick = time.perf_counter()
    batches = iter(_loader(dataset, sampler, cfg))
    first_s, batch = 0.0, None
    for _ in range(warm):
        batch = next(batches)
        first_s = first_s or time.perf_counter() - tick
    start, count = time.perf_counter(), 0
    for timed_batch in batches:
        if on_batch is not None:
            on_batch(timed_batch)
        count += 1
        if time.perf_counter() - start >= args.seconds:
            break
    seconds = time.perf_counter() - start
    del batches
    samples = count * args.batch_size
    return {"workers": cfg.num_workers, "pin_memory": torch.device(cfg.device).type == "cuda",
            "first_batch_s": round(first_s, 3), "batches": count, "samples": samples,
            "seconds": round(seconds, 3), "samples_per_s": round(samples / seconds, 1)}, batch


def _throughput(dataset: RefDataset, workers: int, args: argparse.Namespace,
                pin_memory: bool = False) -> dict[str, Any]:
    """Samples/s of one pass through the training loader (pinned memory: a CUDA device)."""
    cfg = TrainConfig(batch_size=args.batch_size, seed=args.seed, num_workers=workers,
                      device="cuda" if pin_memory else "cpu")
    return timed_pass(dataset, cfg, args)[0]


def timed(fn: Any, n: int, repeats: int = 3) -> tuple[float, list[Any]]:
    """(ms per call of fn(i), mean over i < n, best of `repeats` passes; the results).

    The best pass is the least disturbed by other processes on a shared machine.
    """
    best, out = math.inf, []
    for _ in range(repeats):
        tick = time.perf_counter()
        out = [fn(i) for i in range(n)]
        best = min(best, (time.perf_counter() - tick) / n * 1e3)
    return best, out


def _breakdown(dataset: RefDataset, n: int) -> dict[str, float]:
    """Ms per sample of each step of `RefDataset` item loading, in this process (one thread
    of work, as in a loader worker); `other` is the item's time not in the named steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _stage_times(dataset, min(n, len(dataset)))
    finally:
        torch.set_num_threads(threads)


def _stage_times(dataset: RefDataset, n: int) -> dict[str, float]:
    rows = [dataset.rows.iloc[int(dataset.groups[i][0])] for i in range(n)]
    index = [int(dataset.groups[i][0]) for i in range(n)]
    ms: dict[str, float] = {}
    ms["read_image"], images = timed(lambda i: read_image(dataset.image_dir, rows[i]), n)
    ms["letterbox_image"], boxed = timed(lambda i: letterbox_image(images[i],
                                                                     dataset.input_size), n)
    ms["mask_decode"], masks = timed(lambda i: dataset.original_mask(index[i]), n)
    ms["letterbox_mask"], _ = timed(lambda i: letterbox_mask(masks[i], boxed[i][1]), n)
    ms["tokenize"], _ = timed(lambda i: tokenize([str(rows[i]["sentence"])],
                                                  dataset.word_len), n)
    ms["item"], items = timed(lambda i: dataset[i], n)
    ms["collate"] = timed(lambda _: collate(items), 1)[0] / n
    ms["other"] = ms["item"] - sum(ms[s] for s in _STAGES)
    return {k: round(v, 3) for k, v in ms.items()}


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def loader_machine() -> dict[str, Any]:
    """The shared machine record, plus what decides decoding speed: CPU model and Pillow."""
    return {**machine(), "platform": platform.platform(), "cpu_model": _cpu_model(),
            "torch_threads": torch.get_num_threads(), "numpy": np.__version__,
            "pillow": PIL.__version__,
            "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo"))}


def worker_counts(text: str) -> list[int]:
    """'0,4,8,16' -> [0, 4, 8, 16], each capped at the CPU count, duplicates dropped."""
    try:
        asked = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"--workers must be comma-separated integers, got {text!r}") from e
    if not asked or min(asked) < 0:
        raise ValueError(f"--workers must list counts >= 0, got {text!r}")
    cpus = os.cpu_count() or 1
    return list(dict.fromkeys(min(w, cpus) for w in asked))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="0,4,8,16", help="num_workers values, capped at "
                        "the CPU count")
    parser.add_argument("--samples", type=int, default=4096, help="train refs (one per sample)")
    parser.add_argument("--images", type=int, default=0, help="distinct synthetic images; 0: "
                        "samples/10 within 4-320 (about 56 ms each to make on one core)")
    parser.add_argument("--grain", type=float, default=20.0, help="pixel noise std: sets the "
                        "JPEG size (20: about 145 KB at 640x480)")
    parser.add_argument("--input-size", type=int, default=416)
    parser.add_argument("--word-len", type=int, default=17)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per setting "
                        "at most (one epoch at most)")
    parser.add_argument("--profile-items", type=int, default=64, help="items in the breakdown")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None, help="build (or reuse) the data "
                        "here and keep it; default: a temporary folder")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return parser


def _run(root: Path, args: argparse.Namespace, workers: list[int]) -> dict[str, Any]:
    data = make_data(root, args)
    dataset = RefDataset(root / "prepared", "train", args.input_size, args.word_len,
                         sample="ref", flip=True, seed=args.seed)
    per_sample = _breakdown(dataset, args.profile_items)
    runs = [_throughput(dataset, w, args) for w in workers]
    if torch.cuda.is_available():
        runs.append(_throughput(dataset, max(workers), args, pin_memory=True))
    best = max(runs, key=lambda r: r["samples_per_s"])
    return {"data": data, "per_sample_ms": per_sample,
            "samples_per_s_per_core": round(1e3 / (per_sample["item"] + per_sample["collate"]),
                                            1),
            "throughput": runs,
            "best": {k: best[k] for k in ("workers", "pin_memory", "samples_per_s")}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the bench; print its JSON on one line to stdout (and to --out) and return it."""
    args = _parser().parse_args(argv)
    args.images = args.images or min(320, max(4, math.ceil(args.samples / 10)))
    workers = worker_counts(args.workers)
    tick = time.perf_counter()
    if args.data_dir is not None:
        figures = _run(args.data_dir.absolute(), args, workers)
    else:
        with tempfile.TemporaryDirectory(prefix="cris-loader-bench-") as tmp:
            figures = _run(Path(tmp), args, workers)
    settings = {"workers": workers, **{k: v for k, v in vars(args).items()
                                       if k not in ("workers", "out", "data_dir")},
                "sample": "ref", "flip": True, "persistent_workers": False}
    result = {"bench": "loader_throughput", "machine": loader_machine(), "settings": settings,
              **figures, "wall_s": round(time.perf_counter() - tick, 1)}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
