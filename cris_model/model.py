"""The CRIS model (CLIP encoders + text-conditioned FPN + VL decoder + projector) and its loss.

The forward pass splits in two so a frozen backbone can be cached and a predictor can encode
one image for many expressions: `encode` runs only CLIP's own weights; `head` runs every new,
trainable part and returns logits at stride s = `config.mask_stride` (4 for the paper's
stride-16 neck).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cris_model.backbone import ClipBackbone, create_clip
from cris_model.config import CHECKPOINT_PARTS, ModelConfig, get_preset
from cris_model.layers import Projector, ResNetLevels, TextFPN, ViTLevels, VLDecoder
from cris_model.params import section

DEFAULT_PRESET = "cris_tiny"  # what params without model.preset build


class CRIS(nn.Module):
    """CLIP-Driven Referring Image Segmentation, composed from its parts.

    Feature dict keys (see `ClipBackbone`): image `img_c3`, `img_c4`, `img_c5` (ResNet only),
    `img_pool`; text `words` BxLxCw, `sentence` BxE, `pad_mask` BxL bool (True = padding).
    """

    def __init__(
        self, config: ModelConfig, backbone: ClipBackbone, levels: nn.Module, neck: TextFPN,
        decoder: VLDecoder, projector: Projector,
    ) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.levels = levels
        self.neck = neck
        self.decoder = decoder
        self.projector = projector

    @property
    def image_keys(self) -> tuple[str, ...]:
        """Keys encode_image returns (what a feature cache stores per image)."""
        return self.backbone.image_keys

    @property
    def text_keys(self) -> tuple[str, ...]:
        """Keys encode_text returns (what a feature cache stores per sentence)."""
        return self.backbone.text_keys

    def encode_image(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Bx3xHxW CLIP-normalised image -> CLIP image feature maps (no new layer involved)."""
        return self.backbone.encode_image(image)

    def encode_text(self, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """BxL token ids -> words BxLxCw, sentence BxE, pad_mask BxL (True = pad)."""
        return self.backbone.encode_text(text)

    def encode(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Image and text features from the CLIP encoders only (encode_image | encode_text)."""
        return {**self.encode_image(image), **self.encode_text(text)}

    def head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Features from `encode` -> Bx1x(H/s)x(W/s) logits through every new layer.

        Image features of batch 1 with text features of batch N score one image against N
        expressions (the image part is expanded, not copied).
        """
        missing = [k for k in (*self.image_keys, *self.text_keys) if k not in feats]
        if missing:
            raise ValueError(f"head needs features {', '.join(missing)}")
        n = feats["sentence"].shape[0]
        image = {k: _expand_batch(k, feats[k], n) for k in self.image_keys}
        sentence = feats["sentence"]
        fq = self.neck(self.levels(image), sentence)
        fq = self.decoder(fq, feats["words"], feats["pad_mask"])
        return self.projector(fq, sentence)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Bx3xHxW image, BxL tokens -> Bx1x(H/s)x(W/s) logits."""
        return self.head(self.encode(image, text))

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """CLIP's own parameters (usually trained at a lower learning rate, or frozen)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Every new parameter: level adapter, neck, decoder, projector."""
        for part in (self.levels, self.neck, self.decoder, self.projector):
            yield from part.parameters()

    def set_activation_checkpointing(self, parts: Iterable[str]) -> None:
        """Recompute these parts' activations in backward instead of keeping them (see
        CHECKPOINT_PARTS); the others keep theirs. The same weights and BatchNorm statistics
        result, for one more forward pass of those parts."""
        chosen = set(parts)
        unknown = sorted(chosen - set(CHECKPOINT_PARTS))
        if unknown:
            raise ValueError(f"unknown activation checkpointing parts {', '.join(unknown)}; "
                             f"choose from {', '.join(CHECKPOINT_PARTS)}")
        self.backbone.set_checkpointing("backbone" in chosen)
        self.decoder.checkpoint = "decoder" in chosen
        self.projector.checkpoint = "projector" in chosen

    def train(self, mode: bool = True) -> CRIS:
        """Set train/eval mode; with config.freeze_backbone_bn the CLIP BatchNorm stays in eval."""
        super().train(mode)
        if mode and self.config.freeze_backbone_bn:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


def _expand_batch(key: str, x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[0] == n:
        return x
    if x.shape[0] == 1:
        return x.expand(n, *x.shape[1:])
    raise ValueError(f"feature {key} has batch {x.shape[0]}; expected 1 or {n} (the text batch)")


def cris_loss(
    logits: torch.Tensor, mask: torch.Tensor, dice_weight: float = 0.0,
    at_mask_size: bool = False,
) -> torch.Tensor:
    """Mean binary cross-entropy of Bx1xhxw logits against a Bx1xHxW mask in [0, 1].

    The mask is resized (nearest) to the logits' size first, as the reference does; with
    `at_mask_size` the logits are resized (bilinear) to the mask's size instead, so the loss
    sees the boundary the evaluation thresholds (it upsamples the same way). With
    `dice_weight` > 0, that multiple of the mean soft Dice loss (1 - Dice per sample, +1
    smoothing) is added: it keeps small objects from drowning in background pixels. The
    paper's loss is dice_weight = 0.
    """
    if logits.ndim != 4 or mask.ndim != 4 or logits.shape[:2] != mask.shape[:2]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and mask {tuple(mask.shape)} must both be Bx1xHxW"
        )
    target = mask.to(logits.dtype)
    if target.shape[-2:] != logits.shape[-2:]:
        if at_mask_size:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear",
                                   align_corners=False)
        else:
            target = F.interpolate(target, size=logits.shape[-2:], mode="nearest")
    loss = F.binary_cross_entropy_with_logits(logits, target)
    if dice_weight:
        prob, truth = logits.sigmoid().flatten(1), target.flatten(1)
        dice = (2 * (prob * truth).sum(1) + 1) / (prob.sum(1) + truth.sum(1) + 1)
        loss = loss + dice_weight * (1 - dice).mean()
    return loss


def build_model(config: ModelConfig) -> CRIS:
    """A CRIS for `config`: CLIP weights from config.pretrained (tag or file), or random
    when config.random_init; new layers randomly initialised."""
    config.validate()
    clip = create_clip(config.clip_model, config.clip_config, config.pretrained,
                       config.random_init)
    return _assemble(config, clip)


def create_model(params: Mapping[str, Any], seed: int | None = None) -> CRIS:
    """The model factory (open_clip's `create_model`): params.yaml's `model:` section (a
    preset name, DEFAULT_PRESET when absent, and overrides of its fields) -> CRIS.

    Training, the feature cache and the CLI build through here. With `seed`, torch is seeded
    first, so a random-init CLIP gets the weights it gets in training (which seeds with
    `train.seed`).
    """
    model_params = dict(section(dict(params), "model"))
    config = get_preset(model_params.pop("preset", DEFAULT_PRESET), **model_params)
    if seed is not None:
        torch.manual_seed(seed)
    return build_model(config)


def _assemble(config: ModelConfig, clip: nn.Module) -> CRIS:
    backbone = ClipBackbone(clip, config.vit_layers)
    dims = backbone.image_channels()
    if backbone.is_vit:
        levels: nn.Module = ViTLevels(dims["img_c3"], dims["img_pool"], config.fpn_in)
    else:
        found = (dims["img_c3"], dims["img_c4"], dims["img_pool"])
        if tuple(config.fpn_in) != found:
            raise ValueError(f"fpn_in {list(config.fpn_in)} does not match the CLIP ResNet "
                             f"levels {list(found)} of {config.clip_model or 'clip_config'}")
        levels = ResNetLevels(dims["img_c5"], dims["img_pool"])
    if backbone.word_dim % 2:
        raise ValueError(f"the text width must be even for sine positions, got "
                         f"{backbone.word_dim}")
    neck = TextFPN(config.fpn_in, config.fpn_out, backbone.sentence_dim, config.neck_stride,
                   config.neck_film)
    decoder = VLDecoder(config.num_layers, config.vis_dim, config.num_heads, config.dim_ffn,
                        config.dropout, backbone.word_dim)
    projector = Projector(config.vis_dim, backbone.sentence_dim, config.kernel_size,
                          config.dynamic_conv)
    return CRIS(config, backbone, levels, neck, decoder, projector)


def build_untrained(config: ModelConfig) -> CRIS:
    """The architecture of `config` with random CLIP weights and config unchanged.

    For loading a checkpoint (its weights replace everything) and for summaries.
    """
    config.validate()
    clip = create_clip(config.clip_model, config.clip_config, "", True)
    return _assemble(config, clip)


def summarize(preset: str, word_len: int | None = None, input_size: int = 416) -> dict[str, Any]:
    """Parameter count and output shape of a preset at a square input (no weights loaded).

    Built on the meta device, so nothing is allocated or computed: -> {"preset", "params",
    "output_shape", "word_len", "input_size"}.
    """
    config = get_preset(preset, word_len=word_len, input_size=input_size, pretrained="",
                        random_init=True)
    with torch.device("meta"):
        model = build_model(config).eval()
        image = torch.zeros(1, 3, input_size, input_size)
        text = torch.ones(1, config.word_len, dtype=torch.long)
        with torch.no_grad():
            out = model(image, text)
    return {
        "preset": preset,
        "params": sum(p.numel() for p in model.parameters()),
        "output_shape": list(out.shape),
        "word_len": config.word_len,
        "input_size": input_size,
    }
