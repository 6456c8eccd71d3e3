"""CLIP encoders from open_clip, read out densely for segmentation, and the tokenizer.

`ClipBackbone` holds open_clip's own modules (no copy of CLIP code) and runs them so that
they give multi-level image features and per-word text features:

- ModifiedResNet (RN50, RN101, ...): layer2 / layer3 / layer4 at strides 8 / 16 / 32, and
  the attention pool applied at every layer4 position (its positional embedding resized to
  the grid), without the class token.
- VisionTransformer (ViT-B-16, ...): the token maps after three chosen blocks (stride 16);
  the last goes through ln_post and the projection into CLIP's joint space.
- Text: per-word features after ln_final (unprojected) and the sentence feature (the
  end-of-text token through the text projection).

Nothing here is new or trainable beyond CLIP's own weights, so a frozen backbone's outputs can
be cached (see `CRIS.encode`).
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import VisionTransformer
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from cris_model.layers import use_mean_pooling
from cris_model.recompute import recompute

TOKENIZER_NAME = "openai-clip-bpe"  # open_clip's SimpleTokenizer over the BPE vocab it ships
PAD_ID = 0  # padding token id; the pad mask is tokens == PAD_ID

RESNET_IMAGE_KEYS = ("img_c3", "img_c4", "img_c5", "img_pool")
VIT_IMAGE_KEYS = ("img_c3", "img_c4", "img_pool")
TEXT_KEYS = ("words", "sentence", "pad_mask")


@functools.lru_cache(maxsize=1)
def _tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def tokenizer_info(word_len: int) -> dict[str, Any]:
    """Tokenizer settings a checkpoint records next to its weights (tokenizer.json)."""
    tok = _tokenizer()
    return {
        "name": TOKENIZER_NAME,
        "word_len": word_len,
        "vocab_size": tok.vocab_size,
        "sot_id": tok.sot_token_id,
        "eot_id": tok.eot_token_id,
        "pad_id": PAD_ID,
        "lowercase": True,
    }


def tokenize(texts: list[str], word_len: int) -> torch.Tensor:
    """Sentences -> BxL int64 CLIP token ids, L = word_len, padded with 0.

    Each row is start-of-text, the BPE tokens, end-of-text. A sentence longer than word_len
    keeps its first word_len-1 tokens and ends with end-of-text, so the sentence feature
    (read at the end-of-text token) always exists.
    """
    if word_len < 2:
        raise ValueError(f"word_len must be >= 2 (start and end tokens), got {word_len}")
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("tokenize expects a list of strings")
    return _tokenizer()(list(texts), context_length=word_len)


def token_count(text: str) -> int:
    """BPE tokens of one sentence without start and end of text: `tokenize` keeps at most
    word_len - 2 of them, so a larger count means the model reads only the sentence's start."""
    return len(_tokenizer().encode(text))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A CLIP state dict from safetensors, an OpenAI TorchScript archive (read as tensors,
    see interop.clip_archive) or a torch file (weights only); never runs code."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained weights file not found")
    from cris_model.interop import clip_archive

    if clip_archive.is_torchscript_archive(path):
        return clip_archive.read_clip_archive(path)
    try:
        state: Any
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, ValueError,
            EOFError) as e:
        raise ValueError(f"{path}: cannot read weights ({e.__class__.__name__}: {e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def create_clip(
    clip_model: str, clip_config: dict[str, Any], pretrained: str, random_init: bool
) -> nn.Module:
    """An open_clip CLIP: named (`clip_model`) or inline (`clip_config`), weights as asked.

    `pretrained` is an open_clip tag of a named model (open_clip fetches it, which may need
    the network) or a path to a local CLIP state dict; random weights only when
    `random_init` is True.
    """
    if random_init == bool(pretrained):
        raise ValueError(
            "CLIP weights: give exactly one of pretrained (tag or file) and random_init=True "
            f"(got pretrained={pretrained!r}, random_init={random_init})"
        )
    tags: list[str] = []
    config = clip_config
    if not config:
        config = open_clip.get_model_config(clip_model) or {}
        if not config:
            raise ValueError(f"unknown open_clip model {clip_model!r}")
        tags = open_clip.list_pretrained_tags_by_model(clip_model)
        if pretrained in tags:
            return open_clip.create_model(clip_model, pretrained=pretrained)
    try:
        clip = open_clip.CLIP(**config)
    except TypeError as e:
        raise ValueError(
            f"{clip_model or 'inline clip_config'} is not a plain open_clip CLIP config: {e}"
        ) from e
    if pretrained:
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained {pretrained!r} is neither a local file nor an open_clip tag of "
                f"{clip_model or 'the inline config'} (tags: {', '.join(tags) or 'none'})"
            )
        _load_into(clip, path)
    return clip


def _load_into(clip: nn.Module, path: Path) -> None:
    state = _read_state_dict(path)
    try:
        clip.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1:2] or [str(e)]
        raise ValueError(f"{path}: weights do not fit the CLIP model ({first[0].strip()})") from e


def _resize_grid(pos: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(S*S)xC positional grid -> (h*w)xC, bicubic; unchanged when already h x w."""
    rows, size = int(pos.shape[0]), (int(size[0]), int(size[1]))  # ints, also when traced
    side = int(round(rows ** 0.5))
    if side * side != rows:
        raise RuntimeError(f"positional embedding of {rows} rows is not a square grid")
    if (side, side) == size:
        return pos
    resize = _bicubic_matrix((side, side), size, pos.device)
    return (resize @ pos.float()).to(pos.dtype)


@functools.lru_cache(maxsize=16)
def _bicubic_matrix(
    src: tuple[int, int], dst: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """(dst_h*dst_w) x (src_h*src_w) float32 matrix that resizes a row-major grid exactly as
    F.interpolate's bicubic (align_corners=False) does, cached on the device.

    Resizing is linear, so it is F.interpolate applied to the one-hot grids. As one matrix
    product it takes microseconds; the bicubic kernel itself walks every channel serially
    per output pixel, which cost 1.3 ms per forward on an H100 for CLIP RN50's 2048-channel
    attention-pool grid: a third of a batch-1 call.
    """
    cpu = torch.device("cpu")  # explicit: a cached tensor must not inherit a meta context
    n = src[0] * src[1]
    with torch.inference_mode(False):  # cached: must serve later autograd calls too
        basis = torch.eye(n, dtype=torch.float64, device=cpu).reshape(n, 1, *src)
        columns = F.interpolate(basis, size=dst, mode="bicubic", align_corners=False)
        return columns.reshape(n, -1).T.to(device, torch.float32)


class ClipBackbone(nn.Module):
    """open_clip's image and text towers, read out as feature maps and word features.

    Parameters and state-dict keys keep open_clip's names (`visual.*`, `transformer.*`,
    `token_embedding.*`, `positional_embedding`, `ln_final.*`, `text_projection`); the
    contrastive logit scale, unused here, is left out.
    """

    def __init__(self, clip: nn.Module, vit_layers: tuple[int, int, int] = (4, 8, 12)) -> None:
        super().__init__()
        src: Any = clip  # open_clip's modules carry no type information
        self.visual: Any = src.visual
        self.transformer: Any = src.transformer
        self.token_embedding: nn.Embedding = src.token_embedding
        self.positional_embedding: nn.Parameter = src.positional_embedding
        self.ln_final: nn.LayerNorm = src.ln_final
        self.text_projection: Any = src.text_projection
        self.is_vit = isinstance(self.visual, VisionTransformer)
        if not self.is_vit and not isinstance(self.visual, ModifiedResNet):
            raise ValueError(f"unsupported CLIP image tower {type(self.visual).__name__}")
        depth = len(self.visual.transformer.resblocks) if self.is_vit else 0
        if self.is_vit and not 1 <= vit_layers[0] < vit_layers[1] < vit_layers[2] <= depth:
            raise ValueError(f"vit_layers {vit_layers} must rise within 1..{depth}")
        self.vit_layers = vit_layers
        self.image_keys = VIT_IMAGE_KEYS if self.is_vit else RESNET_IMAGE_KEYS
        self.checkpoint_stages = False  # ResNet: recompute stem..layer3 in backward (memory)
        if not self.is_vit:
            use_mean_pooling(self.visual)  # same numbers, faster on channels-last GPUs
        self.text_keys = TEXT_KEYS

    @property
    def stride(self) -> int:
        """Input side must be a multiple of this (32: the coarsest ResNet level / ViT level)."""
        return 32

    def image_channels(self) -> dict[str, int]:
        """Channels of each image feature map encode_image returns."""
        if self.is_vit:
            width = self.visual.conv1.out_channels
            return {"img_c3": width, "img_c4": width, "img_pool": self.visual.proj.shape[1]}
        width = self.visual.layer1[0].conv1.in_channels
        return {
            "img_c3": width * 8,
            "img_c4": width * 16,
            "img_c5": width * 32,
            "img_pool": self.visual.attnpool.c_proj.out_features,
        }

    @property
    def word_dim(self) -> int:
        """Width of the per-word features (the text transformer width)."""
        return self.ln_final.normalized_shape[0]

    @property
    def sentence_dim(self) -> int:
        """Width of the sentence feature (CLIP's joint embedding width)."""
        proj = self.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def encode_image(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Bx3xHxW CLIP-normalised image (H, W multiples of 32) -> feature maps.

        ResNet: img_c3 Bx(8w)xH/8xW/8, img_c4 Bx(16w)xH/16xW/16, img_c5 Bx(32w)xH/32xW/32
        (layer2/3/4, w the stem width) and img_pool BxExH/32xW/32 (dense attention pool).
        ViT: img_c3, img_c4 BxWxH/16xW/16 (token maps after two blocks) and img_pool
        BxExH/16xW/16 (last chosen block through ln_post and the projection).
        """
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be Bx3xHxW, got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(f"image side {h}x{w} must be a multiple of {self.stride}")
        if self.is_vit:
            return self._encode_vit(image)
        return self._encode_resnet(image)

    def _encode_resnet(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        vis = self.visual
        x = self._stage(lambda t: vis.layer1(vis.stem(t)), image.to(vis.conv1.weight.dtype))
        c3 = self._stage(vis.layer2, x)
        c4 = self._stage(vis.layer3, c3)
        c5 = vis.layer4(c4)
        return {"img_c3": c3, "img_c4": c4, "img_c5": c5, "img_pool": self._dense_attnpool(c5)}

    def _stage(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """fn(x), its activations recomputed in backward when `checkpoint_stages` is set
        (the high-resolution stages hold most of a training step's memory)."""
        return recompute(self, fn, x) if self.checkpoint_stages else fn(x)

    def set_checkpointing(self, enabled: bool) -> None:
        """Recompute the image tower in backward: ResNet stem..layer3 (layer4 and the text
        tower are small), or every ViT block (open_clip's own switch)."""
        self.checkpoint_stages = enabled and not self.is_vit
        if self.is_vit:
            self.visual.transformer.grad_checkpointing = enabled

    def _dense_attnpool(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP's attention pool at every position of BxCxhxw -> BxExhxw (no class token)."""
        pool = self.visual.attnpool
        b, c, h, w = x.shape
        pos = _resize_grid(pool.positional_embedding[1:], (h, w))
        tokens = (x.flatten(2).transpose(1, 2) + pos.to(x.dtype)).transpose(0, 1)
        out, _ = F.multi_head_attention_forward(
            query=tokens, key=tokens, value=tokens,
            embed_dim_to_check=c,
            num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight,
            k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True,
            training=self.training,
            need_weights=False,
        )
        return out.permute(1, 2, 0).reshape(b, -1, h, w)

    def _encode_vit(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        vis = self.visual
        x = vis.conv1(image.to(vis.conv1.weight.dtype))
        b, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = vis.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
        pos = vis.positional_embedding
        pos = torch.cat([pos[:1], _resize_grid(pos[1:], (gh, gw))], dim=0)
        x = vis.ln_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype))
        indices = [i - 1 for i in self.vit_layers]
        _, levels = vis.transformer.forward_intermediates(x, indices=indices, stop_early=True)

        def grid(t: torch.Tensor) -> torch.Tensor:
            return t[:, 1:].transpose(1, 2).reshape(b, -1, gh, gw)

        pooled = vis.ln_post(levels[2]) @ vis.proj
        return {"img_c3": grid(levels[0]), "img_c4": grid(levels[1]), "img_pool": grid(pooled)}

    def encode_text(self, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """BxL token ids (from `tokenize`) -> words BxLxCw, sentence BxE, pad_mask BxL bool.

        words: every position after ln_final, unprojected; sentence: the end-of-text token
        (the highest id in each row) through the text projection; pad_mask: True = padding.
        """
        if text.ndim != 2:
            raise ValueError(f"text must be BxL token ids, got shape {tuple(text.shape)}")
        length = text.shape[1]
        context = self.positional_embedding.shape[0]
        if length > context:
            raise ValueError(f"text length {length} exceeds the CLIP context {context}")
        x = self.token_embedding(text) + self.positional_embedding[:length]
        causal = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype)
        x = self.transformer(x, attn_mask=causal.triu(1))
        words = self.ln_final(x)
        eot = words[torch.arange(words.shape[0], device=words.device), text.argmax(dim=-1)]
        proj = self.text_projection
        sentence = proj(eot) if isinstance(proj, nn.Linear) else eot @ proj
        return {"words": words, "sentence": sentence, "pad_mask": text == PAD_ID}
