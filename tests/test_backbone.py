"""CLIP backbone wrapper: tokenizer, dense read-out consistent with open_clip, weight loading."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cris_model.backbone import (
    ClipBackbone,
    _bicubic_matrix,
    _resize_grid,
    create_clip,
    tokenize,
    tokenizer_info,
)

SOT, EOT = 49406, 49407

TINY_RN = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rn_clip() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_clip("", TINY_RN, "", True).eval()


@pytest.fixture(scope="module")
def vit_clip() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_clip("", TINY_VIT, "", True).eval()


def test_tokenize_pads_with_zero_and_frames_with_start_and_end() -> None:
    tokens = tokenize(["a red ball", "the dog"], 10)
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 10)
    for row in tokens:
        n = int((row != 0).sum())
        assert row[0] == SOT and row[n - 1] == EOT
        assert (row[n:] == 0).all()
    assert tokens[0].tolist()[:5] == open_clip.tokenize(["a red ball"])[0].tolist()[:5]


def test_tokenize_truncation_keeps_end_of_text() -> None:
    long = "the small man in the blue shirt standing far to the left of the tall red car"
    full = tokenize([long], 77)[0]
    assert int((full != 0).sum()) > 17
    cut = tokenize([long], 17)[0]
    assert cut.shape == (17,)
    assert cut[-1] == EOT and (cut != 0).all()
    assert cut[:16].tolist() == full[:16].tolist()
    assert int(cut.argmax()) == 16


def test_tokenize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="word_len"):
        tokenize(["x"], 1)
    with pytest.raises(ValueError, match="list of strings"):
        tokenize("not a list", 8)  # type: ignore[arg-type]


def test_tokenizer_info_records_settings() -> None:
    info = tokenizer_info(22)
    assert info["word_len"] == 22 and info["eot_id"] == EOT and info["pad_id"] == 0
    assert info["vocab_size"] == 49408


def test_resnet_levels_match_open_clip_intermediates(rn_clip: torch.nn.Module) -> None:
    backbone = ClipBackbone(rn_clip).eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone.encode_image(image)
        ref = rn_clip.visual.forward_intermediates(image, indices=[2, 3, 4],
                                                   intermediates_only=True)
    c3, c4, c5 = ref["image_intermediates"]
    assert torch.allclose(feats["img_c3"], c3, atol=1e-5)
    assert torch.allclose(feats["img_c4"], c4, atol=1e-5)
    assert torch.allclose(feats["img_c5"], c5, atol=1e-5)
    assert feats["img_c3"].shape == (2, 64, 8, 8)
    assert feats["img_pool"].shape == (2, 32, 2, 2)
    assert backbone.image_channels() == {k: v.shape[1] for k, v in feats.items()}


def test_dense_attnpool_resizes_its_grid_to_any_input(rn_clip: torch.nn.Module) -> None:
    backbone = ClipBackbone(rn_clip).eval()
    with torch.no_grad():
        feats = backbone.encode_image(torch.randn(1, 3, 160, 96))
    assert feats["img_pool"].shape == (1, 32, 5, 3)
    assert torch.isfinite(feats["img_pool"]).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        backbone.encode_image(torch.randn(1, 3, 80, 64))


def test_vit_levels_match_open_clip_at_native_size(vit_clip: torch.nn.Module) -> None:
    backbone = ClipBackbone(vit_clip, (1, 2, 3)).eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone.encode_image(image)
        ref = vit_clip.visual.forward_intermediates(image, indices=[0, 1],
                                                    intermediates_only=True)
    c3, c4 = ref["image_intermediates"]
    assert torch.allclose(feats["img_c3"], c3, atol=1e-5)
    assert torch.allclose(feats["img_c4"], c4, atol=1e-5)
    assert feats["img_pool"].shape == (2, 32, 4, 4)
    with torch.no_grad():
        bigger = backbone.encode_image(torch.randn(1, 3, 96, 128))
    assert bigger["img_c3"].shape == (1, 64, 6, 8)


def test_vit_layers_are_checked(vit_clip: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="vit_layers"):
        ClipBackbone(vit_clip, (2, 1, 3))
    with pytest.raises(ValueError, match="vit_layers"):
        ClipBackbone(vit_clip, (1, 2, 4))


def test_text_features_match_open_clip(rn_clip: torch.nn.Module) -> None:
    backbone = ClipBackbone(rn_clip).eval()
    texts = ["the left zebra", "a man holding a blue umbrella near the door"]
    tokens = tokenize(texts, 17)
    with torch.no_grad():
        feats = backbone.encode_text(tokens)
        ref = rn_clip.encode_text(tokenize(texts, 77))
    assert feats["words"].shape == (2, 17, 32)
    assert feats["sentence"].shape == (2, 32)
    assert torch.allclose(feats["sentence"], ref, atol=1e-5)
    assert torch.equal(feats["pad_mask"], tokens == 0)


def test_create_clip_demands_an_explicit_weight_source() -> None:
    with pytest.raises(ValueError, match="random_init"):
        create_clip("", TINY_RN, "", False)
    with pytest.raises(ValueError, match="exactly one"):
        create_clip("", TINY_RN, "openai", True)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        create_clip("RN-nonexistent", {}, "", True)
    with pytest.raises(FileNotFoundError, match="neither a local file"):
        create_clip("RN50", {}, "no-such-tag", False)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_create_clip_loads_a_local_state_dict(
    tmp_path: Path, rn_clip: torch.nn.Module, suffix: str
) -> None:
    path = tmp_path / f"clip{suffix}"
    state = {k: v.contiguous() for k, v in rn_clip.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = create_clip("", TINY_RN, str(path), False)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_create_clip_rejects_bad_weight_files(tmp_path: Path, rn_clip: torch.nn.Module) -> None:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        create_clip("", TINY_RN, str(corrupt), False)
    wrong = tmp_path / "wrong.safetensors"
    state = {k: v.contiguous() for k, v in rn_clip.state_dict().items()}
    state.pop("ln_final.weight")
    save_file(state, str(wrong))
    with pytest.raises(ValueError, match="do not fit"):
        create_clip("", TINY_RN, str(wrong), False)
    pickled = tmp_path / "code.pt"
    torch.save({"fn": print}, pickled)
    with pytest.raises(ValueError, match="code.pt"):
        create_clip("", TINY_RN, str(pickled), False)


@pytest.mark.parametrize(("side", "size"), [(7, (13, 13)), (7, (10, 14)), (14, (26, 26)),
                                            (7, (4, 4))])
def test_positional_grid_resize_is_bicubic_interpolation_forward_and_backward(
    side: int, size: tuple[int, int],
) -> None:
    gen = torch.Generator().manual_seed(side)
    pos = torch.randn(side * side, 48, dtype=torch.float64, generator=gen, requires_grad=True)
    grid = pos.T.reshape(1, 48, side, side)
    want = F.interpolate(grid, size=size, mode="bicubic", align_corners=False)
    want = want.flatten(2)[0].T
    got = _resize_grid(pos, size)
    assert got.dtype == pos.dtype and got.shape == (size[0] * size[1], 48)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # float32 matrix, float64 grid
    weights = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(torch.autograd.grad(got, pos, weights)[0],
                               torch.autograd.grad(want, pos, weights)[0], rtol=0, atol=1e-5)
    assert _resize_grid(pos, (side, side)) is pos


def test_cached_resize_made_under_inference_mode_still_trains() -> None:
    _bicubic_matrix.cache_clear()
    pos = torch.randn(25, 8, requires_grad=True)
    with torch.inference_mode():
        _resize_grid(pos.detach(), (9, 9))  # the first call builds and caches the matrix
    _resize_grid(pos, (9, 9)).sum().backward()  # autograd refuses inference tensors
    assert pos.grad is not None and pos.grad.abs().sum() > 0
