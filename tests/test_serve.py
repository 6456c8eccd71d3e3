"""`mlflow models serve -m models:/cris@champion --env-manager local` answers /invocations.

Registers and promotes a cris_tiny checkpoint in a temporary SQLite store, starts the
MLflow scoring server on loopback as a subprocess group, posts one image (base64) with
phrases, checks the returned RLE masks against the local predictor, and stops the group.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from cris_model.checkpoint import save_checkpoint
from cris_model.config import get_preset
from cris_model.data.masks import mask_from_rle
from cris_model.model import build_model
from cris_model.predict import Predictor
from cris_model.registry import RegistryConfig, promote, register
from infra.process import free_port

W, H = 64, 41  # test image size (non-square)
PHRASES = ["the red square", "the thing on the right"]
START_TIMEOUT_S = 150.0  # bound on the server's start-up (imports torch, loads the model)

pytestmark = pytest.mark.slow


def _image() -> Image.Image:
    arr = np.random.default_rng(3).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    arr[5:20, 30:50] = (230, 20, 20)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(tracking URI, checkpoint) with the checkpoint registered as models:/cris@champion."""
    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    torch.manual_seed(0)
    model = build_model(get_preset("cris_tiny", random_init=True)).eval()
    ckpt = save_checkpoint(root / "best", model, metrics={"mIoU": 0.42})
    cfg = RegistryConfig(model_name="cris", tracking_uri=uri)
    register(ckpt, cfg, dataset="synth")
    assert promote(cfg)["version"] == 1
    return uri, ckpt


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server's process group; kill it if it does not exit in time."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(champion: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a running `mlflow models serve` for models:/cris@champion."""
    uri, _ = champion
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow and uvicorn of this environment
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", "models:/cris@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up in {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        _stop(proc)


def _invoke(base: str, payload: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{base}/invocations", data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())["predictions"]


def test_served_champion_returns_masks_at_image_size(
    server: str, champion: tuple[str, Path]
) -> None:
    buf = io.BytesIO()
    _image().save(buf, format="PNG")
    encoded = base64.b64encode(buf.getvalue()).decode()
    split = {"dataframe_split": {"columns": ["image", "text"],
                                 "data": [[encoded, text] for text in PHRASES]}}
    records = {"dataframe_records": [{"image": encoded, "text": PHRASES[1]}]}
    predictions = _invoke(server, split)
    assert len(predictions) == 2 and _invoke(server, records) == predictions[1:]
    reference = Predictor.from_checkpoint(champion[1])
    reference.set_image(_image())
    for row, expected in zip(predictions, reference.predict(PHRASES), strict=True):
        assert (row["height"], row["width"]) == (H, W)
        mask = mask_from_rle(row["mask"], row["height"], row["width"])
        assert np.array_equal(mask, expected)
        assert row["area"] == pytest.approx(float(mask.mean()))


def test_served_model_rejects_input_without_text(server: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        _invoke(server, {"dataframe_records": [{"image": "aGVsbG8="}]})
    assert err.value.code == 400  # schema enforcement: the required `text` column is missing
