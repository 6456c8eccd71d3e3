"""MLflow registry: register (tags, idempotence, no pickled code), promote, rollback, and
predicting through `models:/` URIs, against a temporary SQLite store and cris_tiny.

The store is shared by the module (creating its tables takes seconds); each test that
changes aliases works on its own registered model name.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from cris_model.checkpoint import save_checkpoint
from cris_model.cli import main
from cris_model.config import get_preset
from cris_model.data.manifest import data_version
from cris_model.data.masks import mask_from_rle
from cris_model.model import CRIS, build_model
from cris_model.predict import Predictor
from cris_model.registry import (
    RegistryConfig,
    download_checkpoint,
    promote,
    read_metrics,
    register,
    registry_config,
    rollback,
)
from cris_model.tracking import fluent_uris

W, H = 75, 52  # test image size (non-square)
PHRASE = "the red square on the left"


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    arr[10:30, 5:25] = (220, 30, 30)
    return Image.fromarray(arr)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh SQLite tracking store (artifacts beside it), tables created once."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    store = f"sqlite:///{db}"
    MlflowClient(store).search_experiments()
    return store


def _training_run(uri: str, experiment: str) -> str:
    """A run standing in for a training run, in `experiment` (artifacts beside the store)."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        where = Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / experiment
        exp_id = client.create_experiment(experiment, artifact_location=where.as_uri())
    else:
        exp_id = found.experiment_id
    return client.create_run(exp_id).info.run_id


@pytest.fixture(scope="module")
def model() -> CRIS:
    """cris_tiny (random init) whose threshold splits the test image's map in two."""
    torch.manual_seed(0)
    net = build_model(get_preset("cris_tiny", random_init=True)).eval()
    predictor = Predictor(net)
    predictor.set_image(_image())
    median = float(np.median(predictor.predict_probs(PHRASE)[0]))
    net.config = dataclasses.replace(net.config, threshold=median)
    return net


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


def _checkpoint(model: CRIS, root: Path, variant: int) -> Path:
    """A checkpoint of `model` whose weights differ per variant (so its hash does)."""
    path = root / f"v{variant}"
    if not path.is_dir():
        with torch.no_grad():
            first = next(model.parameters())
            saved = first.view(-1)[0].item()
            first.view(-1)[0] += variant * 1e-6
            save_checkpoint(path, model, metrics={"mIoU": 0.1})
            first.view(-1)[0] = saved
    return path


def _metrics(root: Path, miou: float) -> Path:
    path = root / f"metrics_{miou}.json"
    path.write_text(json.dumps({"mIoU": miou, "oIoU": miou - 0.05, "prec@0.5": 0.5,
                                "split": "val", "count": 12, "checkpoint": "x"}))
    return path


def _config(uri: str, name: str, **kw: float | str) -> RegistryConfig:
    return RegistryConfig(model_name=name, tracking_uri=uri, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def registered(uri: str, model: CRIS, ckpt_root: Path) -> list[dict]:
    """Two versions of `shared`: v1 (mIoU 0.5, logged into a training run), v2 (0.6)."""
    run_id = _training_run(uri, "training")
    cfg = _config(uri, "shared", data_version="dvc-md5-abc")
    first = register(_checkpoint(model, ckpt_root, 1), cfg,
                     metrics_path=_metrics(ckpt_root, 0.5), run_id=run_id, dataset="refcoco")
    second = register(_checkpoint(model, ckpt_root, 2), cfg,
                      metrics_path=_metrics(ckpt_root, 0.6), dataset="refcoco")
    return [first, second, {"training_run": run_id}]


# ---- pure helpers ---------------------------------------------------------------------------


def test_registry_config_from_params() -> None:
    cfg = registry_config({"registry": {"model_name": "m", "promote_margin": "0.02"},
                           "train": {"tracking_uri": "sqlite:///x.db", "experiment": "e"}})
    assert cfg == RegistryConfig("m", 0.02, "", "sqlite:///x.db", "e")
    assert registry_config({}, tracking_uri="http://h:5000").tracking_uri == "http://h:5000"
    with pytest.raises(ValueError, match="promote_marign"):
        registry_config({"registry": {"promote_marign": 0.1}})
    with pytest.raises(ValueError, match="not a number"):
        registry_config({"registry": {"promote_margin": "big"}})
    with pytest.raises(ValueError, match="valid model name"):
        registry_config({"registry": {"model_name": "a'b"}})
    assert registry_config({"registry": {"export_onnx": True}}).export_onnx is True
    with pytest.raises(ValueError, match="export_onnx 'yes' must be true or false"):
        registry_config({"registry": {"export_onnx": "yes"}})


def test_read_metrics_wants_val_miou(tmp_path: Path) -> None:
    good = _metrics(tmp_path, 0.7)
    assert read_metrics(good) == {"mIoU": 0.7, "oIoU": pytest.approx(0.65), "prec@0.5": 0.5}
    (tmp_path / "test.json").write_text(json.dumps({"mIoU": 0.7, "split": "testA"}))
    with pytest.raises(ValueError, match="testA"):
        read_metrics(tmp_path / "test.json")
    (tmp_path / "none.json").write_text(json.dumps({"oIoU": 0.7}))
    with pytest.raises(ValueError, match="no numeric mIoU"):
        read_metrics(tmp_path / "none.json")
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "missing.json")


def test_data_version_follows_manifest_bytes_only(tmp_path: Path) -> None:
    (tmp_path / "val.parquet").write_bytes(b"rows")
    (tmp_path / "summary.json").write_text('{"created": "today"}')
    before = data_version(tmp_path)
    (tmp_path / "summary.json").write_text('{"created": "tomorrow"}')
    assert data_version(tmp_path) == before and len(before) == 16
    (tmp_path / "val.parquet").write_bytes(b"rows!")
    assert data_version(tmp_path) != before
    with pytest.raises(FileNotFoundError, match="parquet"):
        data_version(tmp_path / "empty")


# ---- register -------------------------------------------------------------------------------


def test_register_creates_tagged_versions_and_moves_challenger(
    uri: str, registered: list[dict]
) -> None:
    first, second, info = registered
    assert (first["version"], second["version"]) == (1, 2)
    assert first["reused"] is False and second["reused"] is False
    assert second["aliases"] == ["challenger"] and second["mIoU"] == 0.6
    client = MlflowClient(uri, uri)
    v1, v2 = client.get_model_version("shared", "1"), client.get_model_version("shared", "2")
    assert v1.aliases == [] and v2.aliases == ["challenger"]
    assert v1.run_id == info["training_run"] and first["run_id"] == info["training_run"]
    assert v2.run_id not in (None, info["training_run"])
    assert v1.tags["train_run_id"] == info["training_run"]
    assert v2.tags["train_run_id"] == "none"
    assert v1.tags["val_mIoU"] == "0.5" and v1.tags["val_prec_0.5"] == "0.5"
    assert float(v1.tags["val_oIoU"]) == pytest.approx(0.45)
    assert {k: v1.tags[k] for k in ("dataset", "preset", "data_version")} == {
        "dataset": "refcoco", "preset": "cris_tiny", "data_version": "dvc-md5-abc"}
    assert len(v1.tags["git_commit"]) in (40, len("unknown"))
    assert v1.tags["checkpoint_sha256"] != v2.tags["checkpoint_sha256"]


def test_logged_model_is_code_and_safetensors_without_pickle(
    uri: str, registered: list[dict], tmp_path: Path
) -> None:
    ckpt = download_checkpoint("models:/shared/1", tmp_path / "m", tracking_uri=uri)
    root = tmp_path / "m"
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert "mlflow_model.py" in files and "MLmodel" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth"))]
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json", "extra.json", "metrics.json", "model.safetensors", "tokenizer.json"]
    flavor = mlflow.models.Model.load(str(root)).flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert mlflow.models.Model.load(str(root)).signature.inputs.input_names() == ["image", "text"]


def test_register_is_idempotent_per_training_run(
    uri: str, model: CRIS, ckpt_root: Path
) -> None:
    client = MlflowClient(uri, uri)
    run_id = _training_run(uri, "idem")
    cfg = _config(uri, "idem")
    ckpt, metrics = _checkpoint(model, ckpt_root, 1), _metrics(ckpt_root, 0.5)
    first = register(ckpt, cfg, metrics_path=metrics, run_id=run_id)
    client.delete_registered_model_alias("idem", "challenger")  # a retry after a half-done try
    again = register(ckpt, cfg, metrics_path=metrics, run_id=run_id)
    assert again["reused"] is True and again["version"] == first["version"] == 1
    assert again["aliases"] == ["challenger"]
    assert len(client.search_model_versions("name = 'idem'")) == 1
    other = _training_run(uri, "idem")
    assert register(ckpt, cfg, metrics_path=metrics, run_id=other)["version"] == 2


def test_recorded_run_missing_from_the_store_gets_a_new_run(
    uri: str, model: CRIS, tmp_path: Path
) -> None:
    recorded = "feedfacefeedfacefeedfacefeedface"
    ckpt = save_checkpoint(tmp_path / "best", model, metrics={"mIoU": 0.3},
                           extra={"run_id": recorded})
    out = register(ckpt, _config(uri, "elsewhere"))
    assert out["run_id"] != recorded and out["mIoU"] == 0.3
    tags = MlflowClient(uri, uri).get_model_version("elsewhere", "1").tags
    assert tags["train_run_id"] == recorded


def test_register_errors_name_the_problem(uri: str, model: CRIS, ckpt_root: Path,
                                          tmp_path: Path) -> None:
    cfg = _config(uri, "errors")
    with pytest.raises(FileNotFoundError, match="checkpoint directory"):
        register(tmp_path / "nope", cfg)
    with pytest.raises(RuntimeError, match="run"):
        register(_checkpoint(model, ckpt_root, 1), cfg, metrics_path=_metrics(ckpt_root, 0.5),
                 run_id="0123456789abcdef0123456789abcdef")


# ---- promote / rollback ---------------------------------------------------------------------


def test_promote_rules_and_rollback(uri: str, model: CRIS, ckpt_root: Path) -> None:
    name = "promo"
    with pytest.raises(ValueError, match="challenger"):
        promote(_config(uri, name))

    def reg(variant: int, miou: float) -> None:
        register(_checkpoint(model, ckpt_root, variant), _config(uri, name),
                 metrics_path=_metrics(ckpt_root, miou))

    reg(1, 0.5)
    out = promote(_config(uri, name))
    assert (out["promoted"], out["version"], out["mIoU"]) == (True, 1, 0.5)
    assert out["aliases"] == ["challenger", "champion"] and out["previous_champion"] is None
    assert promote(_config(uri, name))["promoted"] is False  # already champion

    reg(2, 0.45)  # worse: champion stays
    out = promote(_config(uri, name))
    assert (out["promoted"], out["version"], out["challenger"]) == (False, 1, 2)
    assert "champion stays" in out["reason"]

    reg(3, 0.55)  # better, but not by the margin
    assert promote(_config(uri, name, promote_margin=0.1))["version"] == 1
    out = promote(_config(uri, name, promote_margin=0.01))
    assert (out["promoted"], out["version"], out["previous_champion"]) == (True, 3, 1)
    assert out["aliases"] == ["challenger", "champion"] and out["mIoU"] == 0.55

    out = rollback(_config(uri, name))
    assert (out["version"], out["aliases"], out["previous_champion"]) == (1, ["champion"], None)
    client = MlflowClient(uri, uri)
    assert client.get_model_version(name, "3").tags["rolled_back"] == "true"
    out = promote(_config(uri, name))  # the rolled-back challenger is not reinstated
    assert (out["promoted"], out["version"]) == (False, 1) and "rolled back" in out["reason"]
    with pytest.raises(ValueError, match="no previous champion"):
        rollback(_config(uri, name))


# ---- CLI and models:/ URIs ------------------------------------------------------------------


def _last_json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_register_and_promote_end_with_one_json_line(
    uri: str, model: CRIS, ckpt_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "prepared"
    data.mkdir()
    (data / "val.parquet").write_bytes(b"manifest")
    (data / "summary.json").write_text(json.dumps({"dataset": "refcocog"}))
    common = ["--tracking-uri", uri, "--set", "registry.model_name=cli"]
    ckpt = str(_checkpoint(model, ckpt_root, 4))
    assert main(["register", "--checkpoint", ckpt, "--metrics", str(_metrics(ckpt_root, 0.6)),
                 "--data", str(data), *common]) == 0
    out = _last_json(capsys)
    assert (out["model_name"], out["version"], out["aliases"]) == ("cli", 1, ["challenger"])
    assert out["tracking_uri"] == uri and out["mIoU"] == 0.6
    tags = MlflowClient(uri, uri).get_model_version("cli", "1").tags
    assert (tags["dataset"], tags["data_version"]) == ("refcocog", data_version(data))

    assert main(["promote", *common, "--set", "registry.promote_margin=0.05"]) == 0
    out = _last_json(capsys)
    assert {"tracking_uri", "model_name", "version", "aliases", "mIoU"} <= set(out)
    assert (out["version"], out["promoted"], out["aliases"]) == (1, True,
                                                                 ["challenger", "champion"])
    assert main(["promote", "--rollback", *common]) == 1
    assert "no previous champion" in capsys.readouterr().err


def test_cli_predict_from_model_uri_equals_checkpoint(
    uri: str, registered: list[dict], ckpt_root: Path, tmp_path: Path
) -> None:
    image = tmp_path / "scene.png"
    _image().save(image)
    via_ckpt, via_uri = tmp_path / "a.png", tmp_path / "b.png"
    base = ["predict", "--image", str(image), "--text", PHRASE]
    assert main([*base, "--checkpoint", str(ckpt_root / "v1"), "--out", str(via_ckpt)]) == 0
    assert main([*base, "--model-uri", "models:/shared/1", "--tracking-uri", uri,
                 "--out", str(via_uri)]) == 0
    a, b = np.asarray(Image.open(via_ckpt)), np.asarray(Image.open(via_uri))
    assert a.shape == (H, W) and 0 < (a > 0).mean() < 1
    assert np.array_equal(a, b)
    assert main([*base, "--model-uri", "models:/shared@nothing", "--tracking-uri", uri,
                 "--out", str(via_uri)]) == 1


def test_pyfunc_predicts_rle_masks_for_dataframe_rows(
    uri: str, registered: list[dict], ckpt_root: Path
) -> None:
    with fluent_uris(uri):
        pyfunc = mlflow.pyfunc.load_model("models:/shared/1")
    first, second = _png_bytes(_image(0)), _png_bytes(_image(1))
    frame = pd.DataFrame({"image": [first, second, base64.b64encode(first).decode()],
                          "text": [PHRASE, PHRASE, "anything else"]})
    out = pyfunc.predict(frame)
    assert list(out.columns) == ["mask", "height", "width", "area"] and len(out) == 3
    reference = Predictor.from_checkpoint(ckpt_root / "v1")
    for row, (img, text) in zip(out.itertuples(), [(0, PHRASE), (1, PHRASE),
                                                   (0, "anything else")], strict=True):
        assert (row.height, row.width) == (H, W)
        mask = mask_from_rle(row.mask, row.height, row.width)
        reference.set_image(_image(img))
        assert np.array_equal(mask, reference.predict(text)[0])
        assert row.area == pytest.approx(mask.mean())
