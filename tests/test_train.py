"""The training loop on cris_tiny and a tiny prepared folder, CPU only."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_refer import make_prepared

from cris_model.cli import main
from cris_model.config import get_preset
from cris_model.model import build_model
from cris_model.training.config import TrainConfig
from cris_model.training.loop import train
from cris_model.training.optim import lr_factor, param_groups
from cris_model.training.optim import set_lr as _set_lr

BASE: dict[str, Any] = {
    "model": {"preset": "cris_tiny", "random_init": True},
    "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "tracking": False, "progress": False,
              "log_every": 1, "gallery_size": 2},
    "eval": {"threshold": 0.35},
}


def _params(**train: Any) -> dict[str, Any]:
    return {**BASE, "train": {**BASE["train"], **train}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("refer"), {"train": 6, "val": 2})


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    assert TrainConfig.from_params({"lr": "1e-4"}).lr == 1e-4  # YAML reads 1e-4 as text
    with pytest.raises(ValueError, match="unknown train parameters: bogus"):
        TrainConfig.from_params({"bogus": 1})
    with pytest.raises(ValueError, match="train.epochs must be int"):
        TrainConfig.from_params({"epochs": "ten"})
    with pytest.raises(ValueError, match="test split"):
        TrainConfig.from_params({"val_split": "testA"})
    with pytest.raises(ValueError, match="freeze_backbone"):
        TrainConfig.from_params({"features_dir": "cache"})
    with pytest.raises(ValueError, match="train.loss_size must be logits or input"):
        TrainConfig.from_params({"loss_size": "full"})
    with pytest.raises(ValueError, match="phrases_per_image must be >= 1"):
        TrainConfig.from_params({"phrases_per_image": 0})


def test_schedules_and_clip_learning_rate() -> None:
    step = TrainConfig(epochs=50, lr=1e-4, lr_milestones=[35], lr_gamma=0.1)
    assert lr_factor(step, 34 * 10 + 9, 10) == 1.0
    assert lr_factor(step, 35 * 10, 10) == pytest.approx(0.1)
    cosine = TrainConfig(epochs=2, schedule="cosine")
    assert lr_factor(cosine, 0, 10) == 1.0
    assert lr_factor(cosine, 10, 10) == pytest.approx(0.5)
    assert lr_factor(cosine, 20, 10) == pytest.approx(0.0)
    warm = TrainConfig(epochs=2, schedule="cosine", warmup_steps=4)
    assert [lr_factor(warm, s, 10) for s in range(3)] == pytest.approx(
        [0.25 * lr_factor(cosine, 0, 10), 0.5 * lr_factor(cosine, 1, 10),
         0.75 * lr_factor(cosine, 2, 10)])
    assert lr_factor(warm, 10, 10) == pytest.approx(0.5)  # past the warm-up: the schedule's
    opt = torch.optim.Adam([{"name": name, "params": [torch.nn.Parameter(torch.zeros(1))]}
                            for name in ("visual", "text", "head")])
    _set_lr(opt, step, 0, 10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5, 1e-5, 1e-4])
    _set_lr(opt, TrainConfig(lr=1e-4, clip_lr_scale=0.2, text_lr_scale=0.5), 0, 10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-5, 5e-5, 1e-4])
    quirk = TrainConfig(epochs=50, lr=1e-4, clip_full_lr_first_epoch=True)
    _set_lr(opt, quirk, 9, 10)
    assert [g["lr"] for g in opt.param_groups[:2]] == pytest.approx([1e-4, 1e-4])  # epoch 1
    _set_lr(opt, quirk, 10, 10)
    assert [g["lr"] for g in opt.param_groups[:2]] == pytest.approx([1e-5, 1e-5])


@pytest.mark.parametrize("positional_lr", ["backbone", "head"])
def test_positional_embeddings_join_the_head_group_only_when_asked(positional_lr: str) -> None:
    model = build_model(get_preset("cris_tiny", random_init=True))
    groups = {g["name"]: g["params"] for g in
              param_groups(model, TrainConfig(positional_lr=positional_lr))}
    ids = {name: {id(p) for p in params} for name, params in groups.items()}
    named = dict(model.backbone.named_parameters())
    positional = {"positional_embedding": "text", "visual.attnpool.positional_embedding": "visual"}
    for name, encoder in positional.items():
        group = "head" if positional_lr == "head" else encoder
        assert id(named[name]) in ids[group]
        assert sum(id(named[name]) in members for members in ids.values()) == 1
    assert id(named["token_embedding.weight"]) in ids["text"]
    assert id(named["visual.conv1.weight"]) in ids["visual"]
    every = [id(p) for p in model.parameters()]
    assert sorted(every) == sorted(i for members in ids.values() for i in members)
    head_extra = len(groups["head"]) - len(list(model.head_parameters()))
    assert head_extra == (2 if positional_lr == "head" else 0)
    with pytest.raises(ValueError, match="positional_lr must be backbone or head"):
        TrainConfig.from_params({"positional_lr": "text"})


def test_cli_trains_writes_checkpoints_and_logs_to_mlflow(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_params(tracking=True, tracking_uri=uri,
                                                  experiment="test")))
    out = tmp_path / "run"
    rc = main(["train", "--params", str(params_file), "--data", str(prepared), "--out", str(out),
               "--set", "train.epochs=1"])
    assert rc == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    assert result["steps"] == 3 and result["epochs"] == 1  # 12 referred objects / batch 4
    assert re.search(r"^cris: epoch 1/1: val mIoU \d\.\d{3} oIoU \d\.\d{3} \(best\); ",
                     printed.err, re.M)
    for name in ("last", "best"):
        files = {p.name for p in (out / name).iterdir()}
        assert {"model.safetensors", "config.json", "tokenizer.json", "metrics.json",
                "train_state.safetensors", "train_state.json"} <= files
    state = json.loads((out / "last" / "train_state.json").read_text())
    assert state["progress"]["run_id"] == result["run_id"] is not None
    assert state["progress"]["step"] == 3 and state["config"]["train"]["epochs"] == 1
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0 and "oIoU" in metrics

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["model.random_init"]
    losses = client.get_metric_history(result["run_id"], "train/loss")
    assert [m.step for m in losses] == [1, 2, 3]
    history = (out / "history.csv").read_text().splitlines()
    assert history == ["step,loss"] + [f"{m.step},{m.value:.6g}" for m in losses]
    assert client.get_metric_history(result["run_id"], "val/mIoU")[0].value == metrics["mIoU"]
    assert client.get_metric_history(result["run_id"], "val/prec_at_0.5")[0].value == metrics[
        "prec@0.5"]
    assert client.get_metric_history(result["run_id"], "train/samples_per_s")[0].value > 0
    artifacts = {a.path for a in client.list_artifacts(result["run_id"])}
    assert {"best", "gallery.png"} <= artifacts
    assert "best/model.safetensors" in {a.path for a in client.list_artifacts(result["run_id"],
                                                                            "best")}


def test_frozen_backbone_trains_only_the_head_from_images_or_feature_cache(
    prepared: Path, tmp_path: Path
) -> None:
    from cris_model.features import build_feature_cache

    torch.manual_seed(0)  # what train() seeds before building the model
    model = build_model(get_preset("cris_tiny", random_init=True))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    build_feature_cache(model, prepared, "train", tmp_path / "cache")
    runs = {
        "images": _params(freeze_backbone=True, max_steps=1),
        "cache": _params(freeze_backbone=True, max_steps=1,
                         features_dir=str(tmp_path / "cache")),
    }
    weights, moments = {}, {}
    for name, params in runs.items():
        assert train(params, prepared, tmp_path / name).steps == 1
        weights[name] = load_file(str(tmp_path / name / "last" / "model.safetensors"))
        moments[name] = load_file(str(tmp_path / name / "last" / "train_state.safetensors"))
        moved = {k for k in initial if not torch.equal(initial[k], weights[name][k])}
        assert moved and all(not k.startswith("backbone.") for k in moved)
        assert any(k.startswith("neck.") for k in moved)
    # same samples, same masks: the gradients agree up to float noise
    keys = [k for k in moments["images"] if k.endswith(".exp_avg")]
    diff = sum(float((moments["images"][k] - moments["cache"][k]).norm() ** 2) for k in keys)
    norm = sum(float(moments["images"][k].norm() ** 2) for k in keys)
    assert (diff / norm) ** 0.5 < 1e-3


def test_resume_without_checkpoint_is_a_clear_error(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_params()))
    rc = main(["train", "--params", str(params_file), "--data", str(prepared),
               "--out", str(tmp_path / "none"), "--resume"])
    assert rc == 1
    assert "no training checkpoint to resume from" in capsys.readouterr().err


def test_phrases_per_image_encodes_each_image_once_for_the_same_logits(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cris_model.data.dataset import RefDataset, ShardedBatchSampler, collate
    from cris_model.training.loop import _Net

    torch.manual_seed(0)
    model = build_model(get_preset("cris_tiny", random_init=True)).eval()
    ds = RefDataset(prepared, "train", model.config.input_size, model.config.word_len,
                    flip=True, flip_by_image=True)
    sampler = ShardedBatchSampler(len(ds), 8, groups=ds.image_ids(), per_group=2, seed=0)
    batch = collate([ds[i] for i in next(iter(sampler))])
    encoded: list[int] = []
    encode_image = model.backbone.encode_image
    monkeypatch.setattr(model.backbone, "encode_image",
                        lambda image: encoded.append(len(image)) or encode_image(image))
    fmt = torch.contiguous_format
    with torch.no_grad():
        plain = _Net(model, False, fmt)(batch)
        shared = _Net(model, False, fmt, share_images=True)(batch)
    runs = len(torch.unique_consecutive(batch["image_id"]))
    assert encoded == [8, runs] and runs < 8  # 4 images with 2 objects each, in runs
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    assert train(_params(phrases_per_image=2, max_steps=2), prepared, tmp_path / "out").steps == 2


def test_cpu_bf16_autocast_warns_where_the_cpu_emulates_bf16(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cris_model.training import loop

    cpu, bf16 = torch.device("cpu"), TrainConfig(precision="bf16")
    for native, warned in ((True, False), (False, True)):
        monkeypatch.setattr(loop, "_native_cpu_bf16", lambda native=native: native)
        amp, scaled = loop._amp(bf16, cpu)
        assert isinstance(amp, torch.autocast) and not scaled
        assert ("emulated and slower than fp32" in capsys.readouterr().err) is warned
    loop._amp(TrainConfig(precision="fp32"), cpu)
    assert capsys.readouterr().err == ""
