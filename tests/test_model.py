"""The CRIS model: presets, shapes, fidelity to the reference sizes, padding, gradient path."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math

import pytest
import torch

from cris_model.backbone import tokenize
from cris_model.cli import main
from cris_model.config import ModelConfig, get_preset, list_presets
from cris_model.layers import sine_positions_2d
from cris_model.model import CRIS, build_model, cris_loss, summarize

# Whole-model parameter counts of the reference implementation (word_len 17).
REFERENCE_PARAMS = {"cris_r50": 146_849_122, "cris_r101": 161_251_682}

TINY_VIT = ModelConfig(
    clip_model="",
    clip_config={
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "patch_size": 16,
                       "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1},
    },
    random_init=True, word_len=12, input_size=64, fpn_in=(32, 64, 32), fpn_out=(32, 64, 64),
    vis_dim=64, num_layers=1, num_heads=4, dim_ffn=128, vit_layers=(1, 2, 3),
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> CRIS:
    torch.manual_seed(0)
    return build_model(get_preset("cris_tiny")).eval()


def _texts(n: int) -> list[str]:
    pool = ["the red circle", "big blue square on the left", "green triangle", "small dot"]
    return [pool[i % len(pool)] for i in range(n)]


def test_presets_are_listed_and_valid() -> None:
    assert set(list_presets()) >= {"cris_r50", "cris_r101", "cris_vit_b16", "cris_tiny"}
    for name in list_presets():
        config = get_preset(name)
        assert config.preset == name
        assert ModelConfig.from_dict(config.to_dict()) == config
    assert get_preset("cris_r50").pretrained == "openai"
    assert get_preset("cris_r50", word_len=22).word_len == 22
    assert get_preset("cris_r50", word_len=None).word_len == 17


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("cris_r18")
    with pytest.raises(ValueError, match="unknown model config keys: wordlen"):
        get_preset("cris_tiny", wordlen=3)
    with pytest.raises(ValueError, match="input_size"):
        get_preset("cris_tiny", input_size=100)
    with pytest.raises(ValueError, match="random_init"):
        get_preset("cris_r50", random_init=True)
    with pytest.raises(ValueError, match="fpn_in"):
        ModelConfig.from_dict({"fpn_in": [1, 2]})
    with pytest.raises(ValueError, match="exactly one"):
        build_model(get_preset("cris_tiny", random_init=False))
    with pytest.raises(ValueError, match="does not match the CLIP ResNet"):
        build_model(get_preset("cris_tiny", fpn_in=[128, 256, 256]))


@pytest.mark.parametrize("preset", ["cris_r50", "cris_r101", "cris_vit_b16", "cris_tiny"])
def test_summary_shape_at_416_for_every_preset(preset: str) -> None:
    summary = summarize(preset)
    assert summary["output_shape"] == [1, 1, 104, 104]
    assert summary["word_len"] == 17 and summary["input_size"] == 416
    if preset == "cris_tiny":
        assert 2_000_000 < summary["params"] < 10_000_000
    if preset in REFERENCE_PARAMS:
        assert abs(summary["params"] / REFERENCE_PARAMS[preset] - 1) < 0.005


def test_cli_summary_reports_reference_size() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["model", "summary", "--preset", "cris_r50"]) == 0
    summary = json.loads(out.getvalue())
    assert abs(summary["params"] / 146_849_122 - 1) < 0.005
    assert summary["output_shape"] == [1, 1, 104, 104]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["model", "summary", "--preset", "nope"]) == 1
    assert err.getvalue().startswith("cris: error: unknown model preset 'nope'")


def _check_reference_size(model: CRIS, preset: str) -> None:
    total = sum(p.numel() for p in model.parameters())
    assert abs(total / REFERENCE_PARAMS[preset] - 1) < 0.005
    assert REFERENCE_PARAMS[preset] - total == 1  # only CLIP's unused logit scale is left out


def test_r50_real_build_has_reference_size_and_maps_416_to_stride_4() -> None:
    torch.manual_seed(0)
    model = build_model(get_preset("cris_r50", pretrained="", random_init=True)).eval()
    _check_reference_size(model, "cris_r50")
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 416, 416), tokenize(["the dog"], 17))
    assert logits.shape == (1, 1, 104, 104)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("preset", ["cris_r101", "cris_vit_b16"])
def test_large_presets_build_and_run_on_a_small_input(preset: str) -> None:
    model = build_model(get_preset(preset, pretrained="", random_init=True)).eval()
    if preset in REFERENCE_PARAMS:
        _check_reference_size(model, preset)
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 64), tokenize(["the cat"], 17))
    assert logits.shape == (1, 1, 16, 16)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("config", [get_preset("cris_tiny"), TINY_VIT,
                                    get_preset("cris_tiny", neck_stride=8),
                                    get_preset("cris_tiny", neck_film=True)],
                         ids=["resnet", "vit", "resnet-neck-stride-8", "resnet-neck-film"])
def test_every_parameter_gets_a_gradient(config: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_model(config).train()
    size = config.input_size
    logits = model(torch.randn(2, 3, size, size), tokenize(_texts(2), config.word_len))
    assert logits.shape == (2, 1, size // config.mask_stride, size // config.mask_stride)
    cris_loss(logits, torch.rand(2, 1, size, size).round()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_parameter_groups_split_the_model(tiny: CRIS) -> None:
    backbone = {id(p) for p in tiny.backbone_parameters()}
    head = {id(p) for p in tiny.head_parameters()}
    assert backbone and head and not backbone & head
    assert backbone | head == {id(p) for p in tiny.parameters()}
    assert id(tiny.levels.connect[0].weight) in head


def test_padding_positions_do_not_change_the_output(tiny: CRIS) -> None:
    image = torch.randn(2, 3, 96, 96)
    texts = ["the red circle", "a blue square"]
    with torch.no_grad():
        short = tiny(image, tokenize(texts, 8))
        long = tiny(image, tokenize(texts, 17))
        feats = tiny.encode(image, tokenize(texts, 17))
        pad = feats["pad_mask"].unsqueeze(-1)
        feats["words"] = torch.where(pad, torch.randn_like(feats["words"]) * 100, feats["words"])
        scrambled = tiny.head(feats)
    assert feats["pad_mask"].any()
    assert torch.allclose(short, long, atol=1e-4)
    assert torch.allclose(scrambled, long, atol=1e-4)


def test_the_text_changes_the_output(tiny: CRIS) -> None:
    image = torch.randn(1, 3, 96, 96).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = tiny(image, tokenize(["the red circle", "a large green square below"], 17))
    assert not torch.allclose(out[0], out[1], atol=1e-3)


def test_head_expands_one_image_over_many_expressions(tiny: CRIS) -> None:
    image = torch.randn(1, 3, 96, 96)
    tokens = tokenize(_texts(3), 17)
    with torch.no_grad():
        feats = {**tiny.encode_image(image), **tiny.encode_text(tokens)}
        shared = tiny.head(feats)
        repeated = tiny(image.repeat(3, 1, 1, 1), tokens)
        assert set(tiny.encode_image(image)) == set(tiny.image_keys)
        with pytest.raises(ValueError, match="batch 2"):
            tiny.head({**tiny.encode_image(image.repeat(2, 1, 1, 1)), **tiny.encode_text(tokens)})
        with pytest.raises(ValueError, match="needs features"):
            tiny.head(tiny.encode_text(tokens))
    assert shared.shape == (3, 1, 24, 24)
    assert torch.allclose(shared, repeated, atol=1e-5)


def test_frozen_backbone_batchnorm_stays_in_eval() -> None:
    config = dataclasses.replace(get_preset("cris_tiny"), freeze_backbone_bn=True)
    model = build_model(config).train()
    image = torch.randn(4, 3, 96, 96)
    with torch.no_grad():
        first = model.encode_image(image)["img_c5"]
        second = model.encode_image(image[:1])["img_c5"]
    assert torch.allclose(first[:1], second, atol=1e-5)
    assert model.neck.f5_norm[0].training and not model.backbone.visual.bn1.training


def test_loss_resizes_the_mask_and_matches_bce() -> None:
    logits = torch.randn(2, 1, 4, 4)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1.0
    small = mask[:, :, ::2, ::2]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, small)
    assert torch.allclose(cris_loss(logits, mask), expected)
    with pytest.raises(ValueError, match="Bx1xHxW"):
        cris_loss(logits, torch.zeros(3, 1, 8, 8))


def test_loss_at_mask_size_upsamples_the_logits_instead() -> None:
    logits = torch.randn(2, 1, 4, 4)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :, :3] = 1.0  # an edge between logit cells: only the mask's size sees it
    up = torch.nn.functional.interpolate(logits, size=(8, 8), mode="bilinear",
                                         align_corners=False)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(up, mask)
    assert torch.allclose(cris_loss(logits, mask, at_mask_size=True), expected)
    assert not torch.allclose(cris_loss(logits, mask), expected)


def test_neck_at_stride_8_keeps_the_parameters_and_halves_the_mask_stride() -> None:
    coarse, fine = get_preset("cris_tiny"), get_preset("cris_tiny", neck_stride=8)
    assert (coarse.mask_stride, fine.mask_stride) == (4, 2)
    torch.manual_seed(0)
    a = build_model(coarse).eval()
    b = build_model(fine).eval()
    b.load_state_dict(a.state_dict())  # the same parameters, names and shapes
    image, text = torch.randn(1, 3, 128, 128), tokenize(["the red circle"], 17)
    with torch.no_grad():
        assert a(image, text).shape == (1, 1, 32, 32)
        assert b(image, text).shape == (1, 1, 64, 64)
    with pytest.raises(ValueError, match="neck_stride"):
        get_preset("cris_tiny", neck_stride=4)


def test_neck_film_adds_only_its_maps_and_is_the_paper_neck_at_zero() -> None:
    paper, film = get_preset("cris_tiny"), get_preset("cris_tiny", neck_film=True)
    torch.manual_seed(0)
    a, b = build_model(paper).eval(), build_model(film).eval()
    added = set(b.state_dict()) - set(a.state_dict())
    assert added == {f"neck.film.{level}.{p}" for level in ("f3", "f4") for p in ("weight", "bias")}
    assert set(a.state_dict()) < set(b.state_dict())
    b.load_state_dict(a.state_dict(), strict=False)  # every other weight the paper model's
    image, text = torch.randn(2, 3, 128, 128), tokenize(["the red circle", "the star"], 17)
    with torch.no_grad():
        conditioned = b(image, text)
        for level in b.neck.film.values():
            level.weight.zero_()
            level.bias.zero_()
        # zero scale and shift: ReLU(x) of a ReLU output, so the paper's neck on its weights
        assert torch.equal(b(image, text), a(image, text))
    assert not torch.allclose(conditioned, a(image, text))


def test_dice_term_is_added_per_sample_and_vanishes_on_a_perfect_hard_prediction() -> None:
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :2] = 1.0
    logits = torch.randn(2, 1, 4, 4)
    prob, truth = logits.sigmoid().flatten(1), mask.flatten(1)
    dice = (2 * (prob * truth).sum(1) + 1) / (prob.sum(1) + truth.sum(1) + 1)
    expected = cris_loss(logits, mask) + 0.5 * (1 - dice).mean()
    assert torch.allclose(cris_loss(logits, mask, dice_weight=0.5), expected)
    sure = (mask * 2 - 1) * 50.0
    assert cris_loss(sure, mask, dice_weight=1.0) < 1e-6


def test_tiny_preset_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = build_model(get_preset("cris_tiny", input_size=64)).train()
    images = torch.rand(2, 3, 64, 64)
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, :, 8:32, 36:60] = 1.0
    masks[1, :, 30:62, 2:20] = 1.0
    tokens = tokenize(_texts(2), 17)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = cris_loss(model(images, tokens), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5


def test_sine_positions_match_the_plain_formula() -> None:
    dim, h, w = 8, 3, 5
    table = sine_positions_2d(dim, h, w)
    half = dim // 2
    for y in range(h):
        for x in range(w):
            for c in range(dim):
                coord, k = (x, c) if c < half else (y, c - half)
                angle = coord / 10000 ** ((k - k % 2) / half)
                expected = math.sin(angle) if k % 2 == 0 else math.cos(angle)
                assert table[y * w + x, c].item() == pytest.approx(expected, abs=1e-6)


def test_summary_on_meta_leaves_real_forwards_working(tiny: CRIS) -> None:
    summarize("cris_tiny", input_size=96)
    with torch.no_grad():
        out = tiny(torch.randn(1, 3, 96, 96), tokenize(["a dot"], 17))
    assert out.device.type == "cpu" and torch.isfinite(out).all()
