"""Benchmark scripts under bench/ run end to end at tiny sizes and report what they promise."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from bench_support import import_bench, run_bench

from cris_model.data.dataset import RefDataset, ShardedBatchSampler
from cris_model.training.config import TrainConfig
from cris_model.training.loop import _loader


@pytest.fixture
def loader_bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/loader_throughput.py as a module."""
    return import_bench("loader_throughput", monkeypatch)


def test_loader_throughput_reports_json_and_builds_coco_sized_data(
        loader_bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = loader_bench
    out = tmp_path / "figures" / "loader.json"
    result = bench.main([
        "--images", "4", "--samples", "40", "--batch-size", "8", "--input-size", "64",
        "--workers", "0,1", "--seconds", "0.3", "--profile-items", "4",
        "--data-dir", str(tmp_path / "data"), "--out", str(out),
    ])
    printed = json.loads(capsys.readouterr().out)
    assert printed == result == json.loads(out.read_text())
    assert {"machine", "settings", "data", "per_sample_ms", "throughput", "best"} <= set(result)
    assert {"platform", "cpu_count", "cpu_model", "torch", "device"} <= set(result["machine"])
    assert result["machine"]["torch"] == torch.__version__
    assert result["settings"]["workers"] == [0, 1] and result["settings"]["batch_size"] == 8
    assert [r["workers"] for r in result["throughput"] if not r["pin_memory"]] == [0, 1]
    for run in result["throughput"]:
        assert run["batches"] >= 1 and run["samples"] == 8 * run["batches"]
        assert run["samples_per_s"] > 0
    assert set(bench._STAGES) <= set(result["per_sample_ms"])
    assert result["per_sample_ms"]["item"] > result["per_sample_ms"]["read_image"] > 0
    # 4 images give a handful of train refs; the manifest repeats them up to 40 samples
    train = pd.read_parquet(tmp_path / "data" / "prepared" / "train.parquet")
    assert train["ref_id"].nunique() == 40 == result["data"]["train"]["refs"]
    assert train["sent_id"].is_unique and len(train) == result["data"]["train"]["sentences"]
    assert result["data"]["train"]["distinct_refs"] < 40
    ds = RefDataset(tmp_path / "data" / "prepared", "train", 64, 17)
    assert len(ds) == 40
    sizes = {(int(h), int(w)) for h, w in zip(train["height"], train["width"], strict=True)}
    assert sizes <= {(h, w) for w, h in bench.COCO_SIZES}
    # a second run with the same settings reuses the data it built
    again = bench.main(["--images", "4", "--samples", "40", "--batch-size", "8",
                        "--input-size", "64", "--workers", "0", "--seconds", "0.1",
                        "--profile-items", "2", "--data-dir", str(tmp_path / "data")])
    assert again["data"]["reused"] and again["data"]["train"] == result["data"]["train"]


def test_loader_throughput_builds_the_loader_training_builds(
        loader_bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tiny_refer import make_prepared

    bench = loader_bench
    ds = RefDataset(make_prepared(tmp_path, {"train": 4, "val": 2}), "train", 64, 17)
    built = []

    def spy(dataset: object, sampler: ShardedBatchSampler, cfg: TrainConfig) -> object:
        built.append(cfg)
        return _loader(dataset, sampler, cfg)  # type: ignore[arg-type]

    monkeypatch.setattr(bench, "_loader", spy)
    args = SimpleNamespace(batch_size=1, seed=3, samples=len(ds), seconds=60.0)
    figures = bench._throughput(ds, 0, args)
    assert [(c.num_workers, c.seed, c.batch_size) for c in built] == [(0, 3, 1)]
    assert figures["batches"] == figures["samples"] == len(ds) - 2  # after 2 warm-up batches
    assert figures["pin_memory"] is False


def test_loader_throughput_worker_counts_are_capped_and_checked(
        loader_bench: ModuleType) -> None:
    bench = loader_bench
    cpus = os.cpu_count() or 1
    assert bench.worker_counts(f"0,1,{cpus},{cpus + 8}") == list(dict.fromkeys(
        [0, min(1, cpus), cpus]))
    for bad in ("", "4,x", "-1"):
        with pytest.raises(ValueError, match="--workers"):
            bench.worker_counts(bad)


def test_recipe_curve_trains_both_recipes_and_plots_them(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tiny_refer import make_prepared

    bench = import_bench("recipe_curve", monkeypatch)
    data = make_prepared(tmp_path / "refer", {"train": 4, "val": 2})
    png = tmp_path / "curve.png"
    result = bench.main(["--data", str(data), "--png", str(png), "--threads", "1", "--set",
                         "train.epochs=2", "train.batch_size=4", "train.warmup_steps=2"])
    assert set(result["curves"]) == {"old", "new"}
    for points in result["curves"].values():
        assert [p["step"] for p in points] == [2, 4]  # 8 refs / batch 4, validated per epoch
        assert points[0]["seconds"] < points[1]["seconds"]
        assert all(0.0 <= p["mIoU"] <= 1.0 for p in points)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_cpu_train_step_times_the_trainers_step_per_mode(tmp_path: Path) -> None:
    result = run_bench("cpu_train_step", "--threads", "1", "--rounds", "1", "--steps", "1",
                       "--modes", "fp32,bf16_channels_last_batch32", out=tmp_path / "step.json")
    assert result["machine"]["device"].startswith("cpu")
    fp32, bf16 = result["modes"]["fp32"], result["modes"]["bf16_channels_last_batch32"]
    assert (fp32["batch_size"], bf16["batch_size"]) == (16, 32)
    assert fp32["samples_per_s_ratio"] == 1.0 and fp32["ms_per_step"] > 0
    assert bf16["samples_per_s"] == pytest.approx(32 / bf16["ms_per_step"] * 1000, rel=0.01)


def test_feature_probe_separates_informative_from_constant_features(
        monkeypatch: pytest.MonkeyPatch) -> None:
    bench = import_bench("feature_probe", monkeypatch)
    y_train, y_val = np.array([0, 1, 2, 0, 1, 2, 0, 0]), np.array([0, 1, 2, 0, 0])
    told = bench.probe(np.eye(3)[y_train], y_train, np.eye(3)[y_val], y_val)
    assert told["train"] == told["val"] == 1.0 and told["chance"] == 0.6
    blind = bench.probe(np.ones((8, 3)), y_train, np.ones((5, 3)), y_val)
    assert blind["val"] == blind["chance"] == 0.6  # the majority class, nothing more


def test_feature_probe_reads_a_checkpoint_and_synthetic_data(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cris_model.checkpoint import save_checkpoint
    from cris_model.data.manifest import prepare_dataset
    from cris_model.data.synth import generate
    from cris_model.data.synth_grammar import SHAPES
    from cris_model.model import create_model

    bench = import_bench("feature_probe", monkeypatch)
    generate(tmp_path / "raw", images=40, seed=1)
    prepare_dataset(tmp_path / "raw", "refcoco", "unc", tmp_path / "prepared")
    model = create_model({"model": {"preset": "cris_tiny", "input_size": 64}}, seed=0)
    save_checkpoint(tmp_path / "ckpt", model)
    out = tmp_path / "probe.json"
    result = bench.main(["--checkpoint", str(tmp_path / "ckpt"), "--data",
                         str(tmp_path / "prepared"), "--out", str(out)])
    assert set(result["image_category"]) == {"img_c3", "img_c4", "img_pool"}
    for figures in [*result["image_category"].values(), result["sentence_names"]]:
        assert figures["n_train"] > figures["n_val"] > 0
        assert 0.0 < figures["chance"] <= figures["train"] <= 1.0
    assert result["sentence_names"]["words"] == list(SHAPES)
    with pytest.raises(ValueError, match="names one of"):
        bench.main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "prepared"),
                    "--words", "zebra"])
