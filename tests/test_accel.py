"""Speed levers keep the function: matmul dynamic conv, BatchNorm folding, bf16 inference."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from cris_model.accel import (
    CapturedCall,
    compile_regions,
    fold_batchnorm,
    prepare_for_inference,
)
from cris_model.config import get_preset
from cris_model.layers import (
    MeanPool2d,
    grouped_dynamic_conv,
    matmul_dynamic_conv,
    use_mean_pooling,
)
from cris_model.model import CHECKPOINT_PARTS, build_model
from cris_model.predict import Predictor
from cris_model.training.config import TrainConfig
from cris_model.training.distributed import DistContext
from cris_model.training.loop import _build, memory_format


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_matmul_dynamic_conv_is_the_grouped_conv_forward_and_backward(
    channels_last: bool, kernel: int
) -> None:
    gen = torch.Generator().manual_seed(kernel)
    x = torch.randn(3, 6, 9, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, 6, kernel, kernel, dtype=torch.float64, generator=gen,
                    requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    want, got = grouped_dynamic_conv(xin, w, b), matmul_dynamic_conv(xin, w, b)
    assert got.shape == want.shape == (3, 1, 9, 7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    grad = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    for g_want, g_got in zip(torch.autograd.grad(want, (x, w, b), grad),
                             torch.autograd.grad(got, (x, w, b), grad), strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)


def _model_with_statistics(dynamic_conv: str = "matmul") -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(get_preset("cris_tiny", dynamic_conv=dynamic_conv)).eval()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return (torch.randn(batch, 3, 128, 128, generator=gen),
            torch.randint(1, 4000, (batch, 17), generator=gen))


def test_projector_implementations_give_the_same_logits() -> None:
    grouped = _model_with_statistics("grouped")
    matmul = copy.deepcopy(grouped)
    matmul.projector.dynamic_conv = "matmul"
    image, text = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(matmul(image, text), grouped(image, text), rtol=1e-5,
                                   atol=1e-5)


def test_dynamic_conv_is_validated() -> None:
    with pytest.raises(ValueError, match="dynamic_conv"):
        get_preset("cris_tiny", dynamic_conv="winograd")


def test_folding_batchnorm_keeps_the_logits_and_removes_the_norms() -> None:
    model = _model_with_statistics()
    folded = copy.deepcopy(model)
    image, text = _inputs()
    before = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    count = fold_batchnorm(folded)
    after = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert count >= 30 and after < before - 30
    with torch.no_grad():
        torch.testing.assert_close(folded(image, text), model(image, text), rtol=1e-4,
                                   atol=1e-4)


def test_folding_refuses_a_training_model() -> None:
    with pytest.raises(RuntimeError, match="eval mode"):
        fold_batchnorm(_model_with_statistics().train())


def test_bf16_channels_last_inference_stays_close_to_fp32() -> None:
    model = _model_with_statistics()
    fast = prepare_for_inference(copy.deepcopy(model), torch.bfloat16, channels_last=True)
    image, text = _inputs(4)
    with torch.no_grad():
        want, got = model(image, text), fast(image, text).float()
    assert ((got - want).norm() / want.norm()).item() < 0.05
    assert ((got > 0) == (want > 0)).float().mean().item() > 0.97


def test_fast_prediction_needs_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        Predictor(_model_with_statistics(), fast=True)
    with pytest.raises(ValueError, match="CUDA"):
        CapturedCall(lambda x: x, [torch.zeros(1)])


def test_memory_format_is_channels_last_only_on_the_gpu() -> None:
    cfg = TrainConfig()
    assert memory_format(cfg, torch.device("cpu")) == torch.contiguous_format
    assert memory_format(cfg, torch.device("cuda")) == torch.channels_last
    forced = replace(cfg, memory_format="channels_last")
    assert memory_format(forced, torch.device("cpu")) == torch.channels_last
    with pytest.raises(ValueError, match="memory_format"):
        TrainConfig.from_params({"memory_format": "nhwc"})


def _train_steps(parts: tuple[str, ...]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(get_preset("cris_tiny", dropout=0.1)).train()
    model.set_activation_checkpointing(parts)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    image, text = _inputs(4)
    torch.manual_seed(1)
    for _ in range(3):
        loss = model(image, text).sigmoid().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("parts", [("backbone",), ("decoder", "projector"), CHECKPOINT_PARTS])
def test_activation_checkpointing_changes_no_weight_and_no_running_statistic(
    parts: tuple[str, ...],
) -> None:
    plain, recomputed = _train_steps(()), _train_steps(parts)
    want, got = plain.state_dict(), recomputed.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_activation_checkpointing_recomputes_and_refuses_unknown_parts() -> None:
    model = build_model(get_preset("cris_tiny")).train()
    image, text = _inputs(2)
    calls = []
    model.projector.vis.register_forward_pre_hook(lambda *_: calls.append(1))
    model.set_activation_checkpointing(["projector"])
    model(image, text).sum().backward()
    assert len(calls) == 2  # forward, and again in backward
    with pytest.raises(ValueError, match="unknown activation checkpointing parts neck"):
        model.set_activation_checkpointing(["neck"])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel", [1, 2, 4])
def test_mean_pool_is_avgpool_forward_and_backward(channels_last: bool, kernel: int) -> None:
    gen = torch.Generator().manual_seed(kernel)
    x = torch.randn(2, 5, 8, 12, dtype=torch.float64, generator=gen, requires_grad=True)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    want, got = torch.nn.AvgPool2d(kernel)(xin), MeanPool2d(kernel)(xin)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if channels_last and kernel > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0],
                               torch.autograd.grad(want, x, grad)[0], rtol=0, atol=1e-12)


def test_clip_resnet_pools_are_swapped_both_ways_without_changing_the_logits() -> None:
    model = _model_with_statistics()
    assert not any(isinstance(m, torch.nn.AvgPool2d) for m in model.modules())
    image, text = _inputs()
    with torch.no_grad():
        fast = model(image, text)
        swapped = use_mean_pooling(model, False)
        plain = model(image, text)
    assert swapped >= 4
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in model.modules()) == swapped
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def _loss_and_grads(model: torch.nn.Module, image: torch.Tensor,
                    text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    loss = model(image, text).sigmoid().mean()
    loss.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return loss.detach(), torch.cat(grads)


@pytest.mark.parametrize("parts", [(), CHECKPOINT_PARTS])
def test_compiled_regions_train_and_infer_like_the_eager_model(parts: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    eager = build_model(get_preset("cris_tiny", dropout=0.1)).train()
    compiled = copy.deepcopy(eager)
    compiled.set_activation_checkpointing(parts)
    # aot_eager traces every region through Dynamo and AOT autograd as inductor would,
    # without inductor's code generation (minutes on a CPU); fullgraph: no region may break
    assert compile_regions(compiled, backend="aot_eager") == 11
    image, text = _inputs(4)
    torch.manual_seed(1)
    want_loss, want_grads = _loss_and_grads(eager, image, text)
    torch.manual_seed(1)  # the same dropout masks
    got_loss, got_grads = _loss_and_grads(compiled, image, text)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert ((got_grads - want_grads).norm() / want_grads.norm()).item() < 1e-3
    want, got = eager.state_dict(), compiled.state_dict()
    assert got.keys() == want.keys()
    for key in want:  # BatchNorm statistics moved once, recomputed regions included
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(image[:3], text[:3]), eager(image[:3], text[:3]),
                                   rtol=1e-4, atol=1e-4)


def test_training_compiles_regions_only_when_asked() -> None:
    params = {"model": {"preset": "cris_tiny"}}
    ctx = DistContext()
    for flag in (False, True):
        model = _build(params, TrainConfig(compile=flag), ctx)
        compiled = [m for m in model.modules() if m._compiled_call_impl is not None]
        assert len(compiled) == (11 if flag else 0)


def test_decoder_answers_in_its_input_dtype_under_autocast() -> None:
    model = build_model(get_preset("cris_tiny")).eval()
    image, text = _inputs(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.encode(image, text)
        fq = model.neck(model.levels({k: feats[k] for k in model.image_keys}),
                        feats["sentence"])
        out = model.decoder(fq, feats["words"], feats["pad_mask"])
    # bf16 in, bf16 out: the projector then upsamples half the bytes (it was float32)
    assert fq.dtype == out.dtype == torch.bfloat16


def test_decoder_runs_in_float32_under_cpu_bf16_autocast() -> None:
    model = build_model(get_preset("cris_tiny")).eval()
    image, text = _inputs(2)
    with torch.no_grad():
        feats = model.encode(image, text)
        fq = model.neck(model.levels({k: feats[k] for k in model.image_keys}),
                        feats["sentence"])
        exact = model.decoder(fq, feats["words"], feats["pad_mask"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = model.decoder(fq, feats["words"], feats["pad_mask"])
    # the CPU's bf16 attention backward is slow, so the decoder leaves autocast: float32 in,
    # float32 out, and the very numbers of the float32 decoder
    assert torch.equal(under, exact)
