"""Feature-cache training loader throughput: samples/s and GB/s of CLIP features by workers,
cache in RAM or memory-mapped, features kept in the stored dtype or converted to float32
(prints JSON).

Frozen-backbone training reads CLIP features from the cache (`cris features cache`,
`train.features_dir`) instead of images; at 754 samples/s on an H100 (BENCHMARKS.md, cached)
the loader must then move about 5.2 MB of float16 features per sample (RN50 at 416 px). The
bench makes the data as bench/loader_throughput.py does (synthetic COCO-sized images, the
train manifest repeated up to --samples referred objects), builds a cache of --preset with
random CLIP weights (no download) and times the loader as training builds it: FeatureDataset
with the arguments `cris_model.training.loop._train_data` gives it (plus `in_memory`, which training
picks by size: IN_MEMORY_BYTES), ShardedBatchSampler, `cris_model.training.loop._loader`. Each
setting is timed twice: with items as the cache stores them (float16 kept, cast on the device
by the trainer) and with every float feature converted to float32 in the item, as
FeatureDataset did before. With --pin (CUDA), the loader pins memory as training on a GPU
does, and every batch is copied to the device and cast there as `_Net` does. A per-sample
breakdown, timed in this process on one thread, shows where a sample's time goes.

    .venv/bin/python bench/feature_loader_throughput.py [--preset cris_r50 --images 60
        --samples 1024 --workers 0,1,2 --storage ram,mmap --pin --out F]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import emit, save
from loader_throughput import loader_machine, make_data, timed, timed_pass, worker_counts
from safetensors import safe_open
from torch.utils.data import Dataset

from cris_model.data.dataset import collate
from cris_model.features import (
    IN_MEMORY_BYTES,
    FeatureDataset,
    build_feature_cache,
)
from cris_model.model import CRIS, create_model
from cris_model.training.config import TrainConfig
from cris_model.training.loop import _ID_KEYS, _to

STORAGES = {"ram": True, "mmap": False}  # --storage name -> FeatureDataset in_memory
TARGET_SAMPLES_PER_S = 754.5  # cached training on an H100, features already on the GPU


class _Float32Items(Dataset):
    """A FeatureDataset whose items carry float32 features: the loader before this change."""

    def __init__(self, dataset: FeatureDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """As FeatureDataset.set_epoch."""
        self.dataset.set_epoch(epoch)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return _float32(self.dataset[item])


def _float32(item: dict[str, Any]) -> dict[str, Any]:
    """The item with every floating tensor converted to float32 (ids and bools as they are)."""
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in item.items()}


def _params(args: argparse.Namespace) -> dict[str, Any]:
    model: dict[str, Any] = {"preset": args.preset, "random_init": True, "pretrained": ""}
    if args.input_size:
        model["input_size"] = args.input_size
    return {"model": model, "train": {"seed": args.seed}}


def _build_cache(root: Path, args: argparse.Namespace) -> tuple[CRIS, dict[str, Any]]:
    """The random-init model and its cache of the prepared train split (reused when it fits)."""
    model = create_model(_params(args), seed=args.seed)
    tick = time.perf_counter()
    meta = build_feature_cache(model, root / "prepared", "train", root / "features",
                               dtype=args.dtype, device=args.device,
                               batch_size=args.cache_batch_size)
    folder = Path(meta["path"])
    disk = sum((folder / s).stat().st_size for s in meta["shards"])
    shapes: dict[str, list[Any]] = {}
    with safe_open(str(folder / meta["shards"][0]), framework="pt") as f:
        for name in f.keys():
            part = f.get_slice(name)
            shapes[name] = [part.get_shape()[1:], part.get_dtype()]
    cache = {"key": meta["key"], "dtype": meta["dtype"], "input_size": meta["input_size"],
             "images": meta["images"], "sentences": meta["sentences"],
             "shards": len(meta["shards"]), "disk_mb": round(disk / 1e6, 1),
             "training_storage": "ram" if disk <= IN_MEMORY_BYTES else "mmap",
             "build_s": round(time.perf_counter() - tick, 2), "reused": meta["reused"],
             "per_row_shapes": shapes}
    return model, cache


def _bytes_per_sample(batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes one sample adds to a collated batch: float features, the rest, in all."""
    n = len(batch["mask"])
    floats = sum(v.nbytes for k, v in batch.items()
                 if k not in _ID_KEYS and v.is_floating_point())
    total = sum(v.nbytes for v in batch.values())
    assert floats % n == 0 and total % n == 0, "a batch of equal samples"
    return {"features": floats // n, "other": (total - floats) // n, "total": total // n}


def _device_step(batch: dict[str, torch.Tensor], device: torch.device) -> None:
    """What training does with a batch before the head: copy it (`_to`), cast the float
    features to float32 on the device (`_Net`), wait for the copy."""
    moved = _to(batch, device)
    for k, v in moved.items():
        if k not in _ID_KEYS and v.is_floating_point():
            moved[k] = v.float()
    torch.cuda.synchronize(device)


def _throughput(dataset: FeatureDataset | _Float32Items, workers: int, args: argparse.Namespace
                ) -> dict[str, Any]:
    """Samples/s and bytes/s of one pass through the training loader (`timed_pass`); with
    --pin every timed batch also goes to the device as training sends it."""
    cfg = TrainConfig(batch_size=args.batch_size, seed=args.seed, num_workers=workers,
                      device="cuda" if args.pin else "cpu", freeze_backbone=True)
    device = torch.device(args.device)
    on_batch = (lambda batch: _device_step(batch, device)) if args.pin else None
    figures, warm_batch = timed_pass(dataset, cfg, args, on_batch)
    nbytes = _bytes_per_sample(warm_batch)
    samples, seconds = figures["samples"], figures["seconds"]
    return {**figures,
            "feature_gb_per_s": round(samples * nbytes["features"] / seconds / 1e9, 3),
            "total_gb_per_s": round(samples * nbytes["total"] / seconds / 1e9, 3),
            "bytes_per_sample": nbytes}


def _stack_into(items: list[dict[str, Any]], into: dict[str, torch.Tensor]) -> None:
    """Collate's copy alone: stack the items' tensors into batch buffers already touched (no
    fresh pages to fault in, which `collate` pays for every batch)."""
    for k, out in into.items():
        if torch.is_tensor(items[0][k]):
            torch.stack([item[k] for item in items], out=out)


def _breakdown(dataset: FeatureDataset, n: int) -> dict[str, float]:
    """Ms per sample of each step of an item and its collation, in this process on one thread
    (as in a loader worker): read features, letterbox mask (RLE decode included), the whole
    item, collate (into fresh memory, as the loader does) and its copy alone (into buffers
    already touched); then the float32 conversion and collating float32 items."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [int(dataset.groups[i][0]) for i in range(min(n, len(dataset)))]
        n = len(rows)
        ms: dict[str, float] = {}
        ms["read_features"], _ = timed(lambda i: dataset.features(rows[i]), n)
        ms["letterbox_mask"], _ = timed(lambda i: dataset.mask(rows[i]), n)
        ms["item"], items = timed(lambda i: dataset[i], n)
        ms["collate"] = timed(lambda _: collate(items), 1, repeats=7)[0] / n
        into = {k: v.clone() for k, v in collate(items).items()}
        ms["copy_into_reused"] = timed(lambda _: _stack_into(items, into), 1, repeats=7)[0] / n
        ms["to_float32"], wide = timed(lambda i: _float32(items[i]), n)
        ms["collate_float32"] = timed(lambda _: collate(wide), 1, repeats=7)[0] / n
    finally:
        torch.set_num_threads(threads)
    ms["kept_total"] = ms["item"] + ms["collate"]
    ms["float32_total"] = ms["item"] + ms["to_float32"] + ms["collate_float32"]
    return {k: round(v, 3) for k, v in ms.items()}


def _summary(runs: list[dict[str, Any]], per_sample: dict[str, dict[str, float]]
             ) -> dict[str, Any]:
    """What the GPU needs (TARGET_SAMPLES_PER_S) against what one core delivers (the in-process
    breakdown: item + collate, no inter-process copy) and one loader worker (measured, the
    shared-memory hand-over included), and the cores or workers that rate would take."""
    out: dict[str, Any] = {"target_samples_per_s": TARGET_SAMPLES_PER_S}
    for storage, ms in per_sample.items():
        for path in ("kept", "float32"):
            rate = 1e3 / ms[f"{path}_total"]
            out[f"{storage}_{path}_one_core_samples_per_s"] = round(rate, 1)
            out[f"{storage}_{path}_cores_for_target"] = math.ceil(TARGET_SAMPLES_PER_S / rate)
    for run in runs:
        if run["workers"] == 1:
            name = f"{run['storage']}_{run['items']}_one_worker"
            out[f"{name}_samples_per_s"] = run["samples_per_s"]
            out[f"{name}_fraction_of_target"] = round(
                run["samples_per_s"] / TARGET_SAMPLES_PER_S, 3)
            out[f"{name}_workers_for_target"] = math.ceil(
                TARGET_SAMPLES_PER_S / run["samples_per_s"])
    best = max(runs, key=lambda r: r["samples_per_s"])
    out["best"] = {k: best[k] for k in ("storage", "items", "workers", "pin_memory",
                                        "samples_per_s", "feature_gb_per_s")}
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cris_r50", help="model preset (random CLIP init)")
    parser.add_argument("--input-size", type=int, default=0, help="0: the preset's")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                        help="cache dtype")
    parser.add_argument("--workers", default="0,1,2", help="num_workers values, capped at the "
                        "CPU count (GPU machine: 0,4,8,16)")
    parser.add_argument("--storage", default="ram,mmap", help="ram (in_memory) and/or mmap")
    parser.add_argument("--pin", action="store_true", help="pin memory and copy each batch to "
                        "the GPU as training does (needs CUDA)")
    parser.add_argument("--device", default="cpu", help="where the cache is built and, with "
                        "--pin, where batches go")
    parser.add_argument("--images", type=int, default=60, help="distinct synthetic images")
    parser.add_argument("--samples", type=int, default=1024, help="train refs (one per sample)")
    parser.add_argument("--grain", type=float, default=20.0, help="pixel noise std (JPEG size)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache-batch-size", type=int, default=16, help="images per CLIP call "
                        "while building the cache")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per setting "
                        "at most (one epoch at most)")
    parser.add_argument("--profile-items", type=int, default=64, help="items in the breakdown")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None, help="build (or reuse) data and "
                        "cache here and keep them; default: a temporary folder")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return parser


def _storages(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STORAGES]
    if not names or unknown:
        raise ValueError(f"--storage must list {' and/or '.join(STORAGES)}, got {text!r}")
    return list(dict.fromkeys(names))


def _run(root: Path, args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Fill `result` (data, cache, bytes, breakdown, throughput, summary), saving as it goes."""
    result["data"] = make_data(root, args)
    model, result["cache"] = _build_cache(root, args)
    per_sample: dict[str, dict[str, float]] = {}
    runs: list[dict[str, Any]] = result.setdefault("throughput", [])
    for storage in _storages(args.storage):
        dataset = FeatureDataset(root / "features", "train", model=model, seed=args.seed,
                                 in_memory=STORAGES[storage])
        per_sample[storage] = _breakdown(dataset, args.profile_items)
        result["per_sample_ms"] = per_sample
        variants: dict[str, FeatureDataset | _Float32Items] = {
            "kept": dataset, "float32": _Float32Items(dataset)}
        for items, data in variants.items():
            for workers in worker_counts(args.workers):
                runs.append({"storage": storage, "items": items,
                             **_throughput(data, workers, args)})
                if args.out is not None:
                    save(result, args.out)
    first = {r["items"]: r["bytes_per_sample"] for r in runs if r["storage"] == runs[0]["storage"]}
    result["bytes_per_sample"] = first
    result["summary"] = _summary(runs, per_sample)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the bench; print its JSON on one line to stdout (and to --out) and return it."""
    args = _parser().parse_args(argv)
    _storages(args.storage)
    if args.pin and not (torch.cuda.is_available() and args.device.startswith("cuda")):
        raise ValueError("--pin needs CUDA and --device cuda")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "data_dir")}
    result: dict[str, Any] = {"bench": "feature_loader_throughput", "machine": loader_machine(),
                              "settings": {**settings, "sample": "ref",
                                           "persistent_workers": False}}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    if args.data_dir is not None:
        _run(args.data_dir.absolute(), args, result)
    else:
        with tempfile.TemporaryDirectory(prefix="cris-feature-loader-bench-") as tmp:
            _run(Path(tmp), args, result)
    result["wall_s"] = round(time.perf_counter() - tick, 1)
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
