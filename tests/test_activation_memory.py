"""bench/activation_memory.py: saved-for-backward bytes per part and plan, on the meta device."""

from __future__ import annotations

import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from bench_support import import_bench, run_bench
from torch import nn

from cris_model.config import get_preset
from cris_model.model import build_model

LAYERS_1_TO_3 = ("backbone.visual.layer1", "backbone.visual.layer2", "backbone.visual.layer3")


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/activation_memory.py as a module."""
    return import_bench("activation_memory", monkeypatch)


def _run(tmp_path: Path, *args: str) -> dict[str, Any]:
    return run_bench("activation_memory", *args, out=tmp_path / "memory.json", timeout=120)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """cris_tiny at batch 2 (two plans) and 4, flash attention, and batch 2 math attention."""
    tmp = tmp_path_factory.mktemp("memory")
    common = ("--preset", "cris_tiny", "--dtype", "bf16")
    return {
        "b2": _run(tmp, *common, "--batch-size", "2", "--plans", "none;backbone"),
        "b4": _run(tmp, *common, "--batch-size", "4", "--plans", "none"),
        "math": _run(tmp, *common, "--batch-size", "2", "--checkpoint", "",
                     "--attention", "math"),
    }


def _total(plan: dict[str, Any]) -> int:
    return sum(plan["activations_bytes"].values())


def test_activations_scale_linearly_with_the_batch(tiny: dict[str, dict[str, Any]]) -> None:
    b2, b4 = tiny["b2"]["plans"]["none"], tiny["b4"]["plans"]["none"]
    assert 1.8 <= _total(b4) / _total(b2) <= 2.2
    assert b2["checkpoint"] == [] and tiny["b2"]["batch_size"] == 2


def test_backbone_plan_drops_the_resnet_stages(tiny: dict[str, dict[str, Any]]) -> None:
    plans = tiny["b2"]["plans"]
    none = sum(plans["none"]["activations_bytes"][k] for k in LAYERS_1_TO_3)
    kept = sum(plans["backbone"]["activations_bytes"].get(k, 0) for k in LAYERS_1_TO_3)
    assert none > 0 and kept < 0.2 * none
    assert plans["backbone"]["checkpoint"] == ["backbone"]
    for part in ("decoder", "projector", "neck"):  # parts outside the plan keep theirs
        assert plans["backbone"]["activations_bytes"][part] == \
            plans["none"]["activations_bytes"][part]
    assert tiny["b2"]["ratio_vs_none"]["backbone"] < 1.0
    assert plans["backbone"]["estimated_peak_gb"] < plans["none"]["estimated_peak_gb"]


def test_flash_emulation_keeps_less_than_the_math_path(tiny: dict[str, dict[str, Any]]) -> None:
    flash, math = tiny["b2"]["plans"]["none"], tiny["math"]
    assert math["attention"] == "math" and tiny["b2"]["attention"] == "flash"
    assert _total(flash) < _total(math)
    assert flash["activations_bytes"]["decoder"] < math["activations_bytes"]["decoder"]
    assert flash["activations_bytes"]["backbone.visual.layer1"] == \
        math["activations_bytes"]["backbone.visual.layer1"]  # no attention there


def test_fixed_memory_follows_the_parameter_count(tiny: dict[str, dict[str, Any]]) -> None:
    with torch.device("meta"):
        model = build_model(get_preset("cris_tiny", random_init=True, pretrained=""))
    count = sum(p.numel() for p in model.parameters())
    fixed = tiny["b2"]["fixed_bytes"]
    assert fixed == {"parameters": 4 * count, "gradients": 4 * count,
                     "adam_moments": 8 * count, "autocast_weight_copies": 2 * count}
    assert tiny["b2"]["params"] == count
    plan = tiny["math"]  # one plan: its figures sit at the top level
    assert plan["estimated_peak_gb"] == pytest.approx(
        (sum(fixed.values()) + _total(plan)) / 1e9, abs=1e-3)
    assert list(plan["activations_gb"].values()) == \
        sorted(plan["activations_gb"].values(), reverse=True)


def test_cris_r50_at_batch_64_is_estimated_in_seconds(tmp_path: Path) -> None:
    start = time.perf_counter()
    result = _run(tmp_path, "--preset", "cris_r50", "--batch-size", "64")
    assert time.perf_counter() - start < 60
    none = result["plans"]["none"]
    assert 8 <= none["activations_total_gb"] <= 40
    assert set(result["plans"]) == {"none", "backbone", "backbone,decoder",
                                    "backbone,decoder,projector"}
    ratios = list(result["ratio_vs_none"].values())
    assert ratios[0] == 1.0 and ratios == sorted(ratios, reverse=True) and ratios[-1] < 0.5


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.act = nn.ReLU(inplace=True)  # saves its result: the linear output's storage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.act(self.fc(x)).view(-1)
        return (flat * flat).sum()  # mul saves both factors: views of that same storage


def test_each_storage_is_counted_once_and_charged_to_its_module(bench: ModuleType) -> None:
    with torch.device("meta"):
        toy = _Toy()
        x = torch.empty(4, 8, requires_grad=True)
    counter = bench.SavedBytes(toy, (x,))
    with counter.active():
        toy(x)
    # the linear keeps x (excluded) and its weight (a parameter); one 4x16 fp32 storage
    # remains, saved first inside `act`; the top level adds nothing new
    assert dict(counter.by_scope) == {"act": 4 * 16 * 4}
    with counter.active():
        (x * 3).exp()  # exp saves its result, outside any module
    assert counter.by_scope[None] == 4 * 8 * 4


def test_flash_emulation_computes_attention_and_refuses_backward(bench: ModuleType) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, requires_grad=True) for _ in range(3))
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[..., -2:] = False
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    with bench.flash_attention_emulated():
        out = bench._flash_sdpa(q, k, v, attn_mask=keep)
        attn = nn.MultiheadAttention(8, 2, batch_first=True).train()
        routed = attn(q[0], q[0], q[0], need_weights=False)[0]
    assert F.scaled_dot_product_attention is bench._SDPA
    torch.testing.assert_close(out, expected)
    with pytest.raises(NotImplementedError):
        routed.sum().backward()  # nn.MultiheadAttention went through the counter
    saved = out.grad_fn.saved_tensors
    assert [t.shape for t in saved] == [q.shape, k.shape, v.shape, q.shape, q.shape[:-1],
                                        keep.shape]
    assert saved[4].dtype == torch.float32


def test_plans_name_unknown_parts(bench: ModuleType) -> None:
    assert bench.parse_plan("none") == [] and bench.parse_plan("") == []
    assert bench.parse_plan("backbone, decoder") == ["backbone", "decoder"]
    with pytest.raises(ValueError, match="neck"):
        bench.parse_plan("backbone,neck")
