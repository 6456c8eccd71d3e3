"""The CRIS training loop, readable top to bottom: CPU, one GPU, or many GPUs under torchrun.

`train(params, data_dir, out_dir)` builds the model from params `model:`, trains it with Adam
on the `train:` settings (`TrainConfig`, `training.config`), evaluates on the val split after
every epoch at the original image size, and writes checkpoint directories `out_dir/last`
(every epoch, and every `checkpoint_every_steps`) and `out_dir/best` (highest val mIoU; never
chosen on a test split).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Iterator, Sized
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cris_model.accel import compile_regions
from cris_model.atomic import write_text
from cris_model.data.dataset import RefDataset, ShardedBatchSampler, collate, read_image
from cris_model.data.manifest import data_version
from cris_model.eval_config import EvalConfig
from cris_model.evaluate import mlflow_metric_name, predict_split
from cris_model.gallery import GalleryCase, save_gallery
from cris_model.imaging import normalize
from cris_model.metrics import MaskMetrics
from cris_model.model import CRIS, create_model, cris_loss
from cris_model.params import section
from cris_model.tracking import SPOOL, MlflowTracker, NullTracker, Tracker
from cris_model.training import state as train_state
from cris_model.training.config import TrainConfig
from cris_model.training.distributed import (
    DistContext,
    close_distributed,
    init_distributed,
    sync_batchnorm,
)
from cris_model.training.optim import build_optimizer, set_lr

_ID_KEYS = ("mask", "index", "ref_id", "sent_id", "image_id")  # batch entries, not model inputs
HISTORY = "history.csv"  # per-window training loss (step,loss) in out_dir: DVC's loss plot


@dataclass
class TrainResult:
    """What a finished run reports (also printed by `cris train` as JSON)."""

    out_dir: str  # folder holding last/ and best/
    run_id: str | None  # MLflow run id (None when tracking is off)
    epochs: int  # epochs completed
    steps: int  # optimizer steps taken
    best_epoch: int  # epoch (1-based) whose val mIoU chose best/
    best_metrics: dict[str, float]  # val metrics of best/
    last_metrics: dict[str, float]  # val metrics of last/
    samples_per_s: float  # training throughput over the whole run (all ranks)


def _seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed training shapes: pick the fastest kernels


def _amp(cfg: TrainConfig, device: torch.device) -> tuple[Any, bool]:
    """(autocast context or nullcontext, whether fp16 needs the grad scaler)."""
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return nullcontext(), False
    if precision == "bf16" and device.type == "cpu" and not _native_cpu_bf16():
        print("cris: train.precision bf16 on a CPU without avx512_bf16 or AMX is emulated and "
              "slower than fp32; set train.precision=fp32 here", file=sys.stderr)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), precision == "fp16"


def _native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (avx512_bf16 or AMX tiles), where bf16
    autocast makes convolutions faster instead of slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


class _Net(torch.nn.Module):
    """Batch dict -> Bx1xhxw logits; the module DDP wraps, so both input paths sync gradients.

    A batch holds either images + tokens, or cached CLIP features (the keys of
    `CRIS.encode`) from the feature cache. With `share_images`, each run of items of one
    image (`image_id`) is encoded once and its features serve every phrase of the run.
    """

    def __init__(
        self, model: CRIS, freeze_backbone: bool, memory_format: torch.memory_format,
        share_images: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.freeze_backbone = model, freeze_backbone
        self.memory_format, self.share_images = memory_format, share_images

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "image" not in batch:  # cached features arrive in the cache's dtype (float16 too)
            dtype = next(self.model.head_parameters()).dtype
            return self.model.head({k: self._layout(v, dtype) for k, v in batch.items()
                                    if k not in _ID_KEYS})
        image = self._layout(normalize(batch["image"]))
        if not self.freeze_backbone:
            if self.share_images:
                return self.model.head(self._encode_shared(image, batch))
            return self.model(image, batch["tokens"])
        with torch.no_grad():
            feats = (self._encode_shared(image, batch) if self.share_images
                     else self.model.encode(image, batch["tokens"]))
        return self.model.head(feats)

    def _encode_shared(
        self, image: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """`CRIS.encode`, with the first image of each run of equal `image_id`s encoded for
        the whole run (the items of a run carry the same pixels: see `flip_by_image`)."""
        _, inverse, counts = torch.unique_consecutive(batch["image_id"], return_inverse=True,
                                                      return_counts=True)
        firsts = torch.cumsum(counts, 0) - counts
        once = self.model.encode_image(image[firsts].contiguous(memory_format=self.memory_format))
        return {**{k: v[inverse] for k, v in once.items()},
                **self.model.encode_text(batch["tokens"])}

    def _layout(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """x in the memory format (4-d maps) and, given `dtype`, floats cast to it, in one copy
        on x's device (a float16 value cast there equals one cast on the host)."""
        if dtype is None or not x.is_floating_point():
            dtype = x.dtype
        if x.ndim != 4:
            return x.to(dtype)
        fmt = self.memory_format
        return x.to(dtype=dtype, memory_format=fmt).contiguous(memory_format=fmt)


def memory_format(cfg: TrainConfig, device: torch.device) -> torch.memory_format:
    """Layout of images, feature maps and conv weights: channels-last (NHWC) lets the GPU's
    matrix units run convolutions without transposing every activation."""
    name = cfg.memory_format
    if name == "auto":
        name = "channels_last" if device.type == "cuda" else "contiguous"
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def _build(params: dict[str, Any], cfg: TrainConfig, ctx: DistContext) -> CRIS:
    """The model from params `model:`, with the train-time freezes applied, on the device."""
    model = create_model(params, cfg.seed)  # torch seeded again: the same draws
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    if cfg.freeze_backbone:
        model.backbone.requires_grad_(False)
    elif cfg.freeze_token_embedding:
        frozen = [p for n, p in model.backbone.named_parameters() if "token_embedding" in n]
        if not frozen:
            raise ValueError("train.freeze_token_embedding: the backbone has no token_embedding")
        for p in frozen:
            p.requires_grad_(False)
    sync_batchnorm(model, ctx)
    model = model.to(ctx.device).to(memory_format=memory_format(cfg, ctx.device))
    if cfg.compile:
        compile_regions(model)
    return model


def _train_mode(model: CRIS, cfg: TrainConfig) -> None:
    model.train()
    if cfg.freeze_backbone:
        model.backbone.eval()


def _train_data(
    cfg: TrainConfig, data_dir: Path, model: CRIS, ctx: DistContext
) -> tuple[Dataset, ShardedBatchSampler]:
    if cfg.features_dir:
        from cris_model.features import FeatureDataset

        dataset: Dataset = FeatureDataset(Path(cfg.features_dir), cfg.train_split, model=model,
                                          seed=cfg.seed)
    else:
        dataset = RefDataset(
            data_dir, cfg.train_split, model.config.input_size, model.config.word_len,
            sample="ref", flip=cfg.flip, seed=cfg.seed, blind=cfg.language_blind,
            cache=cfg.cache_images, flip_by_image=cfg.groups_by_image,
        )
    grouped = cfg.groups_by_image and isinstance(dataset, RefDataset)
    groups = cast(RefDataset, dataset).image_ids() if grouped else None
    sampler = ShardedBatchSampler(len(cast(Sized, dataset)), cfg.batch_size,
                                  world_size=ctx.world_size, rank=ctx.rank, seed=cfg.seed,
                                  groups=groups, per_group=cfg.phrases_per_image)
    return dataset, sampler


def _loader(dataset: Dataset, sampler: Any, cfg: TrainConfig) -> DataLoader:
    """A loader whose own generator keeps worker seeding off the global torch RNG."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                      collate_fn=collate, generator=torch.Generator().manual_seed(cfg.seed),
                      persistent_workers=False, pin_memory=torch.device(cfg.device).type == "cuda")


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def validate(
    model: CRIS, dataset: RefDataset, threshold: float, device: torch.device, batch_size: int,
    gallery_size: int = 0,
) -> tuple[dict[str, float], list[tuple[int, np.ndarray, float]]]:
    """Val metrics at the original image size, and up to `gallery_size` (row, mask, IoU).

    Predictions come from `cris_model.evaluate.predict_split` (the same maps `cris evaluate`
    scores), thresholded at `threshold` and scored with `cris_model.metrics` (mIoU, oIoU,
    prec@X). A language-blind dataset is scored on empty phrases.
    """
    rows = dataset.rows.assign(sentence="") if dataset.blind else dataset.rows
    metrics = MaskMetrics()
    shown: list[tuple[int, np.ndarray, float]] = []
    for row, prob in predict_split(model, rows, dataset.image_dir, device=device,
                                   batch_size=batch_size):
        pred = prob > threshold
        iou = metrics.update(pred, dataset.original_mask(int(row.name)))
        if len(shown) < gallery_size:
            shown.append((int(row.name), pred, iou))
    return metrics.compute(), shown


def _gallery(
    dataset: RefDataset, shown: list[tuple[int, np.ndarray, float]], path: Path
) -> Path:
    """A PNG of val images with predicted and true masks, phrase and IoU under each.

    Images are read as stored (no EXIF rotation), the pixel grid the masks index.
    """
    cases = []
    for index, pred, iou in shown:
        row = dataset.rows.iloc[index]
        image = np.asarray(read_image(dataset.image_dir, row))
        cases.append(GalleryCase(image, pred, dataset.original_mask(index),
                                 f"{row['sentence']} (IoU {iou:.2f})"))
    return save_gallery([(f"val predictions ({dataset.split})", cases)], path)


def _tracker(cfg: TrainConfig, ctx: DistContext, given: Tracker | None, out_dir: Path) -> Tracker:
    if given is not None and ctx.is_main:
        return given
    if not (cfg.tracking and ctx.is_main):
        return NullTracker()
    return MlflowTracker(cfg.tracking_uri, cfg.experiment, spool=out_dir / SPOOL,
                         retry_s=cfg.tracking_retry_s)


def _batches(loader: DataLoader, desc: str, disable: bool) -> Iterator[dict[str, torch.Tensor]]:
    yield from tqdm(loader, desc=desc, leave=False, disable=disable, dynamic_ncols=True)


def _step(
    net: torch.nn.Module, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, amp: Any, dice_weight: float, at_mask_size: bool = False,
) -> torch.Tensor:
    """One optimizer step on a batch dict; returns the detached loss."""
    with amp:
        logits = net(batch)
    loss = cris_loss(logits.float(), batch["mask"].unsqueeze(1).float(), dice_weight,
                     at_mask_size)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()


@dataclass
class _Run:
    """Everything one training run holds, so the loop functions take one argument."""

    cfg: TrainConfig
    ctx: DistContext
    model: CRIS  # the unwrapped model (saved, evaluated)
    net: torch.nn.Module  # what the step calls: _Net, DDP-wrapped when world_size > 1
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: Any
    loader: DataLoader
    sampler: ShardedBatchSampler
    train_set: Dataset
    val_set: RefDataset
    threshold: float
    tracker: Tracker
    out_dir: Path
    params: dict[str, Any]
    progress: train_state.Progress
    steps_per_epoch: int
    data_version: str  # hash of the training data's manifests (what auto_resume compares)

    @property
    def show(self) -> bool:
        """Draw progress bars: main process, asked for, and not under CI."""
        return self.ctx.is_main and self.cfg.progress and not os.environ.get("CI")


def _log_window(run: _Run, losses: list[torch.Tensor], seconds: float) -> None:
    loss = torch.stack(losses).mean()
    if run.ctx.world_size > 1:
        torch.distributed.all_reduce(loss)
        loss /= run.ctx.world_size
    lrs = {f"train/lr_{g['name']}": g["lr"] for g in run.opt.param_groups}
    rate = len(losses) * run.cfg.batch_size / max(seconds, 1e-9)
    run.tracker.log_metrics({"train/loss": loss.item(), **lrs, "train/samples_per_s": rate},
                            step=run.progress.step)
    if run.ctx.is_main:
        with (run.out_dir / HISTORY).open("a", encoding="utf-8") as f:
            f.write(f"{run.progress.step},{loss.item():.6g}\n")


def _history_step(row: str) -> int:
    """The step of a `step,loss` row; a row a kill cut short counts as later than any step."""
    step, _, loss = row.partition(",")
    try:
        float(loss)
        return int(step)
    except ValueError:
        return 1 << 62


def _start_history(path: Path, resumed_step: int | None) -> None:
    """Start the loss curve file anew, or on resume keep only the rows up to the resumed step."""
    rows: list[str] = []
    if resumed_step is not None and path.is_file():
        rows = [r for r in path.read_text(encoding="utf-8").splitlines()[1:]
                if _history_step(r) <= resumed_step]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(f"{r}\n" for r in ["step,loss", *rows]))


def _train_epoch(run: _Run, epoch: int) -> bool:
    """Train until the epoch ends (True) or max_steps is reached (False)."""
    cfg, prog = run.cfg, run.progress
    _train_mode(run.model, cfg)
    losses: list[torch.Tensor] = []
    tick = time.perf_counter()
    for batch in _batches(run.loader, f"epoch {epoch + 1}", not run.show):
        set_lr(run.opt, cfg, prog.step, run.steps_per_epoch)
        losses.append(_step(run.net, _to(batch, run.ctx.device), run.opt, run.scaler, run.amp,
                            cfg.dice_weight, cfg.loss_size == "input"))
        prog.step += 1
        prog.batch += 1
        prog.samples += len(batch["mask"]) * run.ctx.world_size
        if prog.step % cfg.log_every == 0:
            now = time.perf_counter()
            prog.train_seconds += now - tick
            _log_window(run, losses, now - tick)
            losses, tick = [], now
        if cfg.checkpoint_every_steps and prog.step % cfg.checkpoint_every_steps == 0:
            _save(run, "last", prog.last_metrics)
        if cfg.max_steps and prog.step >= cfg.max_steps:
            break
    prog.train_seconds += time.perf_counter() - tick
    return prog.batch >= run.steps_per_epoch


def _save(run: _Run, name: str, metrics: dict[str, float]) -> None:
    """Write checkpoint `out_dir/<name>` from the main process (the others carry on)."""
    if run.ctx.is_main:
        train_state.write_checkpoint(
            run.out_dir / name, run.model, run.opt, run.scaler, run.progress,
            config={"train": asdict(run.cfg), "params": run.params,
                    "data_version": run.data_version}, metrics=metrics,
        )


def _end_epoch(run: _Run, epoch: int) -> None:
    """Validate on the main process, log, and write `last` (and `best` on a new best mIoU)."""
    prog = run.progress
    if run.ctx.is_main:
        per_rank = run.cfg.batch_size // run.ctx.world_size
        metrics, shown = validate(run.model, run.val_set, run.threshold, run.ctx.device,
                                  per_rank, run.cfg.gallery_size)
        run.tracker.log_metrics({mlflow_metric_name(run.val_set.split, k): v
                                 for k, v in metrics.items()}, step=prog.step)
        prog.last_metrics = metrics
        is_best = metrics["mIoU"] > prog.best_metrics.get("mIoU", -1.0)
        if is_best:
            prog.best_metrics, prog.best_epoch = metrics, epoch + 1
            if shown:
                _gallery(run.val_set, shown, run.out_dir / "gallery.png")
        if is_best:  # best before last: a kill between them resumes before this epoch's end
            _save(run, "best", metrics)
        _save(run, "last", metrics)
        tqdm.write(f"cris: epoch {epoch + 1}/{run.cfg.epochs}: val mIoU {metrics['mIoU']:.3f} "
                   f"oIoU {metrics['oIoU']:.3f}{' (best)' if is_best else ''}; "
                   f"{prog.train_seconds:.0f} s training", file=sys.stderr)
    if run.ctx.world_size > 1:
        torch.distributed.barrier()


def _loop(run: _Run) -> TrainResult:
    cfg, prog = run.cfg, run.progress
    epochs = range(prog.epoch, cfg.epochs)
    for epoch in tqdm(epochs, desc="epochs", disable=not run.show, dynamic_ncols=True):
        if hasattr(run.train_set, "set_epoch"):
            run.train_set.set_epoch(epoch)
        run.sampler.set_epoch(epoch, skip=prog.batch)
        finished = _train_epoch(run, epoch)
        if finished:
            prog.epoch, prog.batch = epoch + 1, 0
        _end_epoch(run, epoch)
        if not finished or (cfg.max_steps and prog.step >= cfg.max_steps):
            break
    if run.ctx.is_main and (run.out_dir / "best").is_dir():
        run.tracker.log_artifact(run.out_dir / "best", "best")
        if (run.out_dir / "gallery.png").is_file():
            run.tracker.log_artifact(run.out_dir / "gallery.png")
    return TrainResult(
        out_dir=str(run.out_dir), run_id=prog.run_id, epochs=prog.epoch, steps=prog.step,
        best_epoch=prog.best_epoch, best_metrics=prog.best_metrics,
        last_metrics=prog.last_metrics,
        samples_per_s=prog.samples / max(prog.train_seconds, 1e-9),
    )


def _setup(
    params: dict[str, Any], cfg: TrainConfig, ctx: DistContext, data_dir: Path, out_dir: Path,
    resume: bool, tracker: Tracker | None,
) -> _Run:
    """Model, data, optimizer, tracker and (with `resume`) the state of `out_dir/last`."""
    _seed_everything(cfg.seed, cfg.deterministic)
    model = _build(params, cfg, ctx)
    train_set, sampler = _train_data(cfg, data_dir, model, ctx)
    val_set = RefDataset(data_dir, cfg.val_split, model.config.input_size, model.config.word_len,
                         sample="sentence", blind=cfg.language_blind, cache=cfg.cache_images)
    opt = build_optimizer(model, cfg)
    amp, fp16 = _amp(cfg, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=fp16)
    if resume and ctx.is_main:
        for change in train_state.recover(out_dir):
            print(f"cris: resume: {change}", file=sys.stderr)
    if resume and ctx.world_size > 1:
        torch.distributed.barrier()
    source = train_state.find_resumable(out_dir) if resume else None
    progress = train_state.Progress()
    if source is not None:
        progress = train_state.restore(source, model, opt, scaler)
        if ctx.is_main:
            print(f"cris: resume: from {source} at epoch {progress.epoch + 1}, batch "
                  f"{progress.batch}, step {progress.step}", file=sys.stderr)
    if ctx.is_main:
        _start_history(out_dir / HISTORY, progress.step if source is not None else None)
    net: torch.nn.Module = _Net(model, cfg.freeze_backbone, memory_format(cfg, ctx.device),
                                share_images=cfg.groups_by_image)
    if ctx.world_size > 1:
        net = DistributedDataParallel(
            net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )
    track = _tracker(cfg, ctx, tracker, out_dir)
    resolved = {**params, "train": asdict(cfg), "model": model.config.to_dict(),
                "world_size": ctx.world_size}
    name = cfg.run_name or f"{model.config.preset or 'cris'}-{time.strftime('%Y%m%d-%H%M%S')}"
    track.start(name, resolved, run_id=progress.run_id)
    progress.run_id = track.run_id
    if source is not None:
        train_state.set_rng_state(source)
    threshold = EvalConfig.from_params(section(params, "eval")).threshold or model.config.threshold
    loader = _loader(train_set, sampler, cfg)
    return _Run(cfg=cfg, ctx=ctx, model=model, net=net, opt=opt, scaler=scaler, amp=amp,
                loader=loader, sampler=sampler, train_set=train_set, val_set=val_set,
                threshold=threshold, tracker=track, out_dir=out_dir, params=params,
                progress=progress, steps_per_epoch=len(sampler),
                data_version=data_version(data_dir))


def _unfinished_run(params: dict[str, Any], cfg: TrainConfig, data_dir: Path,
                    out_dir: Path) -> bool:
    """Whether `out_dir` holds a checkpoint of an unfinished run with exactly these params and
    this data (train.auto_resume); says on stderr why it starts afresh when there is one."""
    try:
        source = train_state.find_resumable(out_dir)
    except FileNotFoundError:
        return False
    saved, progress = train_state.read_config(source), train_state.read_progress(source)
    if saved.get("params") != json.loads(json.dumps(params, default=str)):
        why = "its parameters differ"
    elif saved.get("data_version") != data_version(data_dir):
        why = "its training data differ"
    elif progress.epoch >= cfg.epochs or (cfg.max_steps and progress.step >= cfg.max_steps):
        why = "that run had finished"
    else:
        return True
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"cris: auto_resume: not resuming {source}: {why}; training from the start",
              file=sys.stderr)
    return False


def train(
    params: dict[str, Any], data_dir: Path, out_dir: Path, *, resume: bool = False,
    tracker: Tracker | None = None,
) -> TrainResult:
    """Train CRIS on the prepared folder `data_dir`; write `out_dir/last` and `out_dir/best`.

    `params` is the whole params.yaml dict (sections model, train, eval). Under torchrun
    every process calls this; only rank 0 logs, validates and writes. `resume` continues
    from `out_dir/last` (same weights, optimizer, RNG, epoch and batch); with
    `train.auto_resume` it does so whenever `out_dir/last` is an unfinished run of the same
    params and data (how a retried orchestrator step continues). `tracker` replaces the one
    `train.tracking` selects (tests).
    """
    cfg = TrainConfig.from_params(section(params, "train"))
    if cfg.auto_resume and not resume:
        resume = _unfinished_run(params, cfg, Path(data_dir), Path(out_dir))
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    ctx = init_distributed(cfg.device)
    try:
        run = _setup(params, cfg, ctx, Path(data_dir), Path(out_dir), resume, tracker)
        try:
            result = _loop(run)
        except BaseException as e:
            run.tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        run.tracker.end("FINISHED")
        return result
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        close_distributed()
