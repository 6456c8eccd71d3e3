"""`mlflow models serve -m models:/cris@champion --env-manager local` answers /invocations.

Registers and promotes a cris_tiny checkpoint in a temporary SQLite store, starts the
MLflow scoring server on loopback (infra/scoring_server.py), posts images (base64) with
phrases, checks the returned RLE masks against the local predictor, loads the server with
concurrent clients (every answer must equal the one the same request gets alone), checks
the input contract's 4xx answers, and stops the server's process group.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_support import import_bench
from mlflow.tracking import MlflowClient
from PIL import Image

from cris_model.checkpoint import save_checkpoint
from cris_model.config import get_preset
from cris_model.data.masks import mask_from_rle
from cris_model.model import build_model
from cris_model.predict import Predictor
from cris_model.registry import RegistryConfig, promote, register
from infra.process import port_is_free, started
from infra.scoring_server import ScoringServer, invoke

W, H = 64, 41  # test image size (non-square)
PHRASES = ["the red square", "the thing on the right"]
CLIENTS, PER_CLIENT = 6, 6  # the bounded load: 36 one-row requests in flight together

pytestmark = pytest.mark.slow


def _image(w: int = W, h: int = H, seed: int = 3) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    arr[5:20, 30:50] = (230, 20, 20)
    return Image.fromarray(arr)


def _b64(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


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


@pytest.fixture(scope="module")
def server(champion: tuple[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScoringServer]:
    """A running `mlflow models serve` for models:/cris@champion; stopped (group gone) after."""
    service = ScoringServer(tmp_path_factory.mktemp("serve-log"), "models:/cris@champion",
                            champion[0])
    with started(service):
        yield service
    assert not service.running and port_is_free(service.port)


def _predictions(server: ScoringServer, payload: dict) -> list[dict]:
    status, body = invoke(server.url, payload)
    assert status == 200, body
    return body["predictions"]


def test_served_champion_returns_masks_at_image_size(
    server: ScoringServer, champion: tuple[str, Path]
) -> None:
    encoded = _b64(_image())
    split = {"dataframe_split": {"columns": ["image", "text"],
                                 "data": [[encoded, text] for text in PHRASES]}}
    records = {"dataframe_records": [{"image": encoded, "text": PHRASES[1]}]}
    columns = {"inputs": {"image": [encoded], "text": [PHRASES[1]]}}
    predictions = _predictions(server, split)
    assert len(predictions) == 2
    assert _predictions(server, records) == _predictions(server, columns) == predictions[1:]
    reference = Predictor.from_checkpoint(champion[1])
    expected = reference.segment(reference.embed(_image()), PHRASES)
    for row, mask_expected in zip(predictions, expected, strict=True):
        assert (row["height"], row["width"]) == (H, W)
        mask = mask_from_rle(row["mask"], row["height"], row["width"])
        assert np.array_equal(mask, mask_expected)
        assert row["area"] == pytest.approx(float(mask.mean()))


def _mixed_requests() -> list[dict]:
    """One-row requests whose answers all differ: images of three sizes, JPEG and PNG."""
    sizes = [(128, 96), (96, 128), (112, 112)]
    out = []
    for i, phrase in enumerate(["the red square", "the circle on the left",
                                "object to the right of the orange object", "the star"]):
        w, h = sizes[i % len(sizes)]
        image = _b64(_image(w, h, seed=i), "JPEG" if i % 2 else "PNG")
        out.append({"dataframe_split": {"columns": ["image", "text"], "data": [[image, phrase]]}})
    return out


def test_concurrent_clients_each_get_their_own_answer(
    server: ScoringServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve_load = import_bench("serve_load", monkeypatch)
    requests = _mixed_requests()
    expected = serve_load.serial_answers(server.url, requests)
    assert len({(a[0]["height"], a[0]["width"], a[0]["mask"]) for a in expected}) == len(expected)
    result = serve_load.load(server.url, requests, expected, CLIENTS, PER_CLIENT)
    assert result["requests"] == CLIENTS * PER_CLIENT
    assert (result["wrong"], result["errors"]) == (0, 0), result["first_errors"]
    assert serve_load.serial_answers(server.url, requests) == expected  # alive, unchanged


def _refusal(server: ScoringServer, payload: dict) -> str:
    status, body = invoke(server.url, payload)
    assert 400 <= status < 500, (status, body)
    return str(body["message"])


@pytest.mark.parametrize(("text", "problem"), [
    (None, "got null"), (5, "got the number 5"), ("   ", "got only whitespace"),
    ("", "got an empty string")])
def test_bad_phrase_in_row_1_is_refused_naming_the_row(
    server: ScoringServer, text: object, problem: str
) -> None:
    encoded = _b64(_image())
    payload = {"dataframe_records": [{"image": encoded, "text": "the red square"},
                                     {"image": encoded, "text": text}]}
    message = _refusal(server, payload)
    assert f"row 1: text must be a non-empty string, {problem}" in message
    assert "Traceback" not in message and "/tmp" not in message


def test_bad_image_in_row_2_of_3_is_refused_naming_the_row(server: ScoringServer) -> None:
    good = _b64(_image())
    rows = [[good, "the red square"], [good, "the star"],
            [base64.b64encode(b"this is not an image").decode(), "the circle"]]
    message = _refusal(server, {"dataframe_split": {"columns": ["image", "text"], "data": rows}})
    assert "row 2: image: not a readable image (unknown or corrupt format)" in message
    assert "cris-image-" not in message and "Traceback" not in message
    message = _refusal(server, {"dataframe_split": {"columns": ["image", "text"],
                                                    "data": [rows[0], ["%%% no base64", "x"]]}})
    assert "row 1: image is not valid base64" in message
    assert _predictions(server, {"dataframe_split": {"columns": ["image", "text"],
                                                     "data": rows[:2]}})  # still serving


def test_served_model_rejects_input_without_text(server: ScoringServer) -> None:
    message = _refusal(server, {"dataframe_records": [{"image": "aGVsbG8="}]})
    assert "text" in message  # schema enforcement: the required `text` column is missing
