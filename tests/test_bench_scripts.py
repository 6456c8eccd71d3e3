"""The GPU benchmark scripts run end to end on the CPU with a tiny preset and print JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench_support import run_bench

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    return run_bench(script, "--preset", "cris_tiny", "--device", "cpu", *args,
                     out=tmp_path / f"{script}.json")


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
                  "--blocks", "1", "--variants", "nofold", tmp_path=tmp_path)
    figures = result["figures"]
    for key in ("reference_b1_fp32_ms", "fast_b1_eager_ms", "3_single_calls_ms",
                "1_image_3_expressions_ms", "reference_b2_fp16_samples_per_s",
                "fast_b2_samples_per_s"):
        assert figures[key] > 0, key
    assert result["agreement_vs_fp32"]["mask_pixel_agreement"] > 0.9
    variants = result["variants"]
    assert variants["fast_nofold_b1_ms"] > 0 and variants["fast_nofold_b2_samples_per_s"] > 0
    refused = subprocess.run([sys.executable, str(ROOT / "bench" / "infer_latency.py"),
                              "--variants", "nofold,nosuch"], capture_output=True, text=True,
                             cwd=ROOT, timeout=60)
    assert refused.returncode == 2 and "unknown variants nosuch" in refused.stderr


def test_gpu_suite_runs_the_named_benchmarks_and_keeps_their_json(tmp_path: Path) -> None:
    tiny = "--preset cris_tiny --device cpu --batch-size 2"
    env = {**os.environ, "OUT": str(tmp_path), "BENCHES": "train warm infer",
           "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels"),
           "TRAIN_ARGS": f"{tiny} --modes fast,fast_ckpt_all --steps 3 --warmup 1 "
                         "--curve-steps 0",
           "WARM_ARGS": f"{tiny} --modes fast --steps 2 --warmup 1 --curve-steps 0",
           "INFER_ARGS": f"{tiny} --expressions 2 --calls 1 --blocks 1"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert "== train_throughput: exit 0" in proc.stdout, proc.stdout[-2000:]
    assert "== infer_latency: exit 0" in proc.stdout, proc.stdout[-2000:]
    warm = json.loads((tmp_path / "train_throughput_warm.json").read_text())
    assert set(warm["modes"]) == {"fast"} and warm["steps"] == 2
    train = json.loads((tmp_path / "train_throughput.json").read_text())
    assert set(train["modes"]) == {"fast", "fast_ckpt_all"}
    assert json.loads((tmp_path / "infer_latency.json").read_text())["figures"]
    env["BENCHES"] = "nosuch"
    refused = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh")], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "unknown benchmark nosuch" in refused.stderr
