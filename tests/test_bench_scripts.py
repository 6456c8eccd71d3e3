"""The GPU benchmark scripts run end to end on the CPU with a tiny preset and print JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{script}.py"), "--preset", "cris_tiny",
         "--device", "cpu", "--out", str(out), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == printed
    return printed


def test_train_throughput_reports_modes_and_the_loss_curves(tmp_path: Path) -> None:
    result = _run("train_throughput", "--batch-size", "2", "--steps", "3", "--warmup", "1",
                  "--modes", "fast,fast_ckpt_all,cached", "--curve-steps", "4",
                  "--curve-batch-size", "2", "--profile", "1", tmp_path=tmp_path)
    assert result["machine"]["torch"] and result["machine"]["cpu_count"] >= 1
    assert set(result["modes"]) == {"fast", "fast_ckpt_all", "cached"}
    assert result["modes"]["fast_ckpt_all"]["activation_checkpointing"] == [
        "backbone", "decoder", "projector"]
    for mode in result["modes"].values():
        assert mode["steady_samples_per_s"] > 0 and mode["steps"] == 3
        assert 0 < mode["first_step_s"] <= mode["seconds_to_last_step"]
    assert result["top_kernels_fast"] and result["top_kernels_fast"][0][1] > 0
    curve = result["loss_curve"]
    assert set(curve["curves"]) == {"bf16_fast_seed0", "fp32_reference_seed0",
                                    "bf16_fast_seed1", "fp32_reference_seed1"}
    assert all(len(c) == 4 for c in curve["curves"].values())
    assert curve["fp32_seed0_vs_seed1_max_rel"] > 0


def test_infer_latency_reports_every_figure(tmp_path: Path) -> None:
    result = _run("infer_latency", "--batch-size", "2", "--expressions", "3", "--calls", "1",
                  "--blocks", "1", tmp_path=tmp_path)
    figures = result["figures"]
    for key in ("reference_b1_fp32_ms", "fast_b1_eager_ms", "3_single_calls_ms",
                "1_image_3_expressions_ms", "reference_b2_fp16_samples_per_s",
                "fast_b2_samples_per_s"):
        assert figures[key] > 0, key
    assert result["agreement_vs_fp32"]["mask_pixel_agreement"] > 0.9
