"""The `train:` section of params.yaml: `TrainConfig`, one field per setting, checked once.

Choices against the reference implementation (decided, and parameters):
- The reference builds Adam with the head's LR for every group and only applies the CLIP
  factor from epoch 2 on, so CLIP trains at the head LR in epoch 1. Default here: CLIP runs
  at `lr * clip_lr_scale` from the first step; `clip_full_lr_first_epoch: true` reproduces
  the reference.
- The reference builds its groups by module, and CLIP's `positional_embedding` tensors (text
  and attention pool) are not in CLIP's group: they train at the head LR. Default here: they
  are CLIP's, at CLIP's LR; `positional_lr: head` reproduces the reference.
- The reference means to freeze CLIP's token embedding but its assignment does nothing, so
  the embedding trains. Default here: it trains (the reference's effective behaviour);
  `freeze_token_embedding: true` freezes it for real.

Reading it needs no torch: the Dagster definitions read train defaults when they load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cris_model.config import CHECKPOINT_PARTS
from cris_model.params import SectionConfig


@dataclass
class TrainConfig(SectionConfig):
    """The `train:` section of params.yaml. Defaults follow the CRIS paper."""

    SECTION = "train"

    epochs: int = 50  # passes over the referred objects (one random sentence each)
    batch_size: int = 64  # global batch, split evenly across processes
    lr: float = 1e-4  # head learning rate (Adam)
    clip_lr_scale: float = 0.1  # CLIP backbone LR = lr * clip_lr_scale
    text_lr_scale: float = 0.0  # > 0: CLIP text encoder LR = lr * this (0 = clip_lr_scale)
    positional_lr: str = "backbone"  # backbone | head (reference quirk: CLIP's
    # positional_embedding tensors, text and attention pool, in the head group at the head LR)
    warmup_steps: int = 0  # linear LR warm-up from 0 over the first N optimizer steps
    clip_full_lr_first_epoch: bool = False  # reference quirk: CLIP at the head LR in epoch 1
    freeze_token_embedding: bool = False  # really freeze CLIP's token embedding (reference: no-op)
    schedule: str = "step"  # step: x lr_gamma at each milestone epoch | cosine: to 0 per step
    lr_milestones: list[int] = field(default_factory=lambda: [35])  # epochs where step LR drops
    lr_gamma: float = 0.1  # step schedule's LR factor at each milestone
    weight_decay: float = 0.0  # Adam L2 weight decay
    dice_weight: float = 0.0  # add this multiple of a soft Dice loss to the BCE (paper: 0)
    loss_size: str = "logits"  # logits: mask resized to the logits (paper) | input: logits
    # upsampled (bilinear) to the input's mask, as evaluation upsamples them
    device: str = "cpu"  # cpu | cuda | cuda:N (under torchrun: cuda -> cuda:LOCAL_RANK)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 (grad scaler) | fp32
    memory_format: str = "auto"  # auto (channels_last on GPU) | channels_last | contiguous
    fused_optimizer: bool = True  # fused Adam kernel: one call per step, not per op (GPU, CPU)
    activation_checkpointing: list[str] = field(default_factory=list)  # parts recomputed in
    # backward to save memory: backbone, decoder, projector (model.CHECKPOINT_PARTS)
    compile: bool = False  # torch.compile each block (accel.compile_regions); compiles first
    seed: int = 0  # seeds python, numpy and torch (same on every rank)
    deterministic: bool = False  # torch deterministic algorithms (exact resume; slower)
    num_workers: int = 0  # DataLoader worker processes per rank
    cache_images: bool = False  # keep decoded, letterboxed images and masks in memory (small
    # data sets: S*S*4 bytes per image and S*S per object; each worker keeps its own)
    flip: bool = False  # horizontal flip (p=0.5) swapping left/right in the phrase
    phrases_per_image: int = 1  # > 1: batches hold up to this many referred objects of one image
    # in a row, flipped as one, and the image is encoded once for them (paper: 1, independent;
    # the feature cache encodes nothing, so training from it ignores this)
    language_blind: bool = False  # train and evaluate on empty phrases (the no-language baseline)
    freeze_backbone: bool = False  # train only the head; CLIP in eval mode, no gradients
    features_dir: str = ""  # CLIP feature cache (`cris features cache`); needs freeze_backbone
    train_split: str = "train"  # manifest split to train on
    val_split: str = "val"  # split that picks `best` (must not be a test split)
    log_every: int = 10  # steps between logged train metrics
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = no limit)
    checkpoint_every_steps: int = 0  # also write `last` every N steps mid-epoch (0 = epoch ends)
    auto_resume: bool = False  # continue out/last if it is an unfinished run of these params+data
    find_unused_parameters: bool = False  # DDP option; only for models with unused parameters
    tracking: bool = True  # log to MLflow
    tracking_uri: str = ""  # MLflow URI; "" = $MLFLOW_TRACKING_URI or sqlite:///./mlruns.db
    experiment: str = "cris"  # MLflow experiment name
    tracking_retry_s: float = 30.0  # MLflow unreachable: seconds between retries (records kept)
    run_name: str = ""  # MLflow run name ("" = preset and time)
    gallery_size: int = 8  # val predictions drawn into the gallery PNG artifact
    progress: bool = True  # tqdm bars on the main process (off when $CI is set)

    @property
    def groups_by_image(self) -> bool:
        """Whether batches line up several phrases of one image, flipped as one and encoded
        once (phrases_per_image > 1)."""
        return self.phrases_per_image > 1

    def validate(self) -> None:
        """Raise ValueError naming the first value no run can use."""
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"train.schedule must be step or cosine, got {self.schedule!r}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"train.precision must be auto|bf16|fp16|fp32, got {self.precision!r}")
        if self.memory_format not in ("auto", "channels_last", "contiguous"):
            raise ValueError("train.memory_format must be auto|channels_last|contiguous, got "
                             f"{self.memory_format!r}")
        if self.loss_size not in ("logits", "input"):
            raise ValueError(f"train.loss_size must be logits or input, got {self.loss_size!r}")
        if self.positional_lr not in ("backbone", "head"):
            raise ValueError(f"train.positional_lr must be backbone or head, got "
                             f"{self.positional_lr!r}")
        if self.text_lr_scale < 0 or self.clip_lr_scale < 0 or self.warmup_steps < 0:
            raise ValueError("train.clip_lr_scale, train.text_lr_scale and train.warmup_steps "
                             "must not be negative")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("train.epochs, train.batch_size and train.lr must be positive")
        if self.val_split.startswith("test"):
            raise ValueError(f"train.val_split {self.val_split!r}: never select on a test split")
        unknown = [p for p in self.activation_checkpointing if p not in CHECKPOINT_PARTS]
        if unknown:
            raise ValueError(f"train.activation_checkpointing: unknown parts {unknown}; choose "
                             f"from {', '.join(CHECKPOINT_PARTS)}")
        if self.phrases_per_image < 1:
            raise ValueError(f"train.phrases_per_image must be >= 1, got {self.phrases_per_image}")
        if self.features_dir and not self.freeze_backbone:
            raise ValueError("train.features_dir needs train.freeze_backbone: true")
