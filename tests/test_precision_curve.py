"""bench/precision_curve.py: three real training runs, their loss curves and the verdict."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from bench_support import import_bench, run_bench

RUNS = ("bf16_seed0", "fp32_seed0", "fp32_seed1")


def test_three_runs_on_the_same_batches_give_comparable_curves(tmp_path: Path) -> None:
    printed = run_bench("precision_curve", "--images", "24", "--steps", "6", "--log-every",
                        "1", "--batch-size", "4", out=tmp_path / "precision_curve.json")
    curves = printed["curves"]
    assert set(curves) == set(RUNS) and printed["window_steps"] == [1, 2, 3, 4, 5, 6]
    for curve in curves.values():
        assert len(curve) == 6 and all(math.isfinite(x) and x > 0 for x in curve)
    bf16, fp32, seed1 = curves["bf16_seed0"], curves["fp32_seed0"], curves["fp32_seed1"]
    assert bf16 != fp32, "bf16 autocast gave fp32's exact losses: it did not run"
    # the first step has the same weights and batch, so only rounding separates the two (at
    # batch 4 and no warm-up the trajectories part within a few steps)
    assert abs(bf16[0] - fp32[0]) <= 0.01 * fp32[0], "same weights and batch, first step"
    assert seed1 != fp32
    assert printed["bf16_within_seed_spread"] == (
        printed["bf16_vs_fp32_seed0"]["mean_rel"] <= printed["fp32_seed0_vs_seed1"]["mean_rel"])
    for run in printed["runs"].values():
        assert run["samples_per_s"] > 0 and 0 <= run["val"]["mIoU"] <= 1


def test_gaps_over_the_whole_curve_and_its_last_third(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = import_bench("precision_curve", monkeypatch)
    got = bench.gaps([1.1, 2.0, 3.0, 2.0, 1.0, 0.5], [1.0, 2.0, 2.0, 2.0, 1.0, 1.0])
    assert got == {"max_rel": 0.5, "mean_rel": round((0.1 + 0.5 + 0.5) / 6, 4),
                   "last_third_max_rel": 0.5, "last_third_mean_rel": 0.25}
    with pytest.raises(ValueError, match="3 and 2 windows"):
        bench.gaps([1.0, 2.0, 3.0], [1.0, 2.0])


def test_read_history_names_a_broken_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = import_bench("precision_curve", monkeypatch)
    good = tmp_path / "history.csv"
    good.write_text("step,loss\n10,1.5\n20,0.75\n", encoding="utf-8")
    assert bench.read_history(good) == [(10, 1.5), (20, 0.75)]
    bad = tmp_path / "bad.csv"
    bad.write_text("step,loss\n10,oops\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="bad.csv"):
        bench.read_history(bad)
