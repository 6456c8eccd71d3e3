"""The try-it page (`cris app`) in a real browser, on models from a tiny training.

One epoch of cris_tiny is registered and promoted (`champion`, v1) in a temporary SQLite
store, a random-init cris_tiny beside it (`challenger`, v2). `cris app` runs as a subprocess
on loopback, with the champion and `--compare` the challenger and the prepared data's images
as examples; headless Chromium uploads an image, types two phrases and reads the overlays
back. Bad input must give a message on the page and leave the server up. When the app stops
(SIGTERM) its process group and port are gone, and no upload is left in its temporary folder
or its working directory.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from app_support import (
    columns,
    fetch_image,
    heading,
    open_page,
    report,
    start_app,
    status,
    submit,
    wait_overlays,
    wait_status,
)
from browser_support import Server, chromium, require_browser
from PIL import Image
from selenium.webdriver.chrome.webdriver import WebDriver
from tiny_refer import tiny_training

from cris_model.app import (
    PHRASE_COLOURS,
    build_page,
    dataset_examples,
    load_model,
    load_models,
    read_phrases,
    respond,
)
from cris_model.checkpoint import save_checkpoint
from cris_model.cli import main
from cris_model.config import get_preset
from cris_model.model import build_model
from cris_model.registry import RegistryConfig, promote, register
from infra.process import free_port, port_is_free

THRESHOLD = "0.3"  # the one-epoch model's probabilities stay under 0.5; at 0.3 it masks ~5%
PHRASES = ["red square", "square on the right"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """{uri, data, best, image}: the store holding champion v1 (trained) and challenger v2."""
    root = tmp_path_factory.mktemp("app")
    args, data = tiny_training(root, {"train": 4, "val": 2})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--out", str(root / "run")]) == 0
        uri = f"sqlite:///{root / 'mlflow.db'}"
        config = RegistryConfig(model_name="cris", tracking_uri=uri)
        register(root / "run" / "best", config, data_dir=data)
        assert promote(config)["version"] == 1
        torch.manual_seed(0)
        blind = save_checkpoint(root / "random", build_model(get_preset("cris_tiny",
                                random_init=True)), metrics={"mIoU": 0.0})
        assert register(blind, config)["version"] == 2
    finally:
        torch.set_num_threads(threads)
    image = root / "scene.png"
    shutil.copy(data.parent / "images" / "img_00001.png", image)
    return {"uri": uri, "data": data, "best": root / "run" / "best", "image": image}


def _leftovers(tmpdir: Path, cwd: Path) -> list[Path]:
    """Files the app left in its TMPDIR or working directory."""
    return [p for p in (*tmpdir.rglob("*"), *cwd.rglob("*")) if p.is_file()]


@pytest.fixture
def app(models: dict[str, Any], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A function that starts `cris app ARGS` on a free port; every app it started is stopped
    afterwards, and must end on SIGTERM leaving no process, port or file behind."""
    require_browser()
    started: list[tuple[Server, int]] = []
    tmpdir, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmpdir.mkdir()
    cwd.mkdir()

    def start(*args: str) -> str:
        port = free_port()
        env = {"MLFLOW_TRACKING_URI": models["uri"], "TMPDIR": str(tmpdir),
               "OMP_NUM_THREADS": "1"}
        started.append((start_app([*args, "--threshold", THRESHOLD], port=port, cwd=cwd,
                                  env=env, log=tmp_path / f"app-{port}.log"), port))
        return f"http://127.0.0.1:{port}/"

    yield {"start": start, **models}
    stopped = [server.stop() for server, _ in started]
    assert not [s.pgid for s, _ in started if s.alive()], "app processes left running"
    assert all(stopped), "an app outlived SIGTERM and was killed"
    assert all(port_is_free(port) for _, port in started)
    assert _leftovers(tmpdir, cwd) == []
    assert not list(tmpdir.glob("cris-app-*"))


@pytest.fixture(scope="module")
def browser(models: dict[str, Any]) -> Iterator[WebDriver]:
    require_browser()
    with chromium() as driver:
        yield driver


def _shows_mask(overlay: Image.Image, scene: Image.Image, colour: tuple[int, int, int]) -> bool:
    """Whether `overlay` differs from the scene drawn at its size below the caption, and
    has pixels of the phrase's colour (the mask's opaque outline)."""
    plain = np.asarray(scene.resize(overlay.size, Image.Resampling.BICUBIC), dtype=np.int16)
    drawn = np.asarray(overlay, dtype=np.int16)
    changed = np.abs(drawn - plain).max(axis=2)[20:] > 40
    return bool(changed.any()) and bool((drawn == colour).all(axis=2).any())


def test_champion_and_challenger_overlays_stand_side_by_side(
    app: dict[str, Any], browser: WebDriver
) -> None:
    open_page(browser, app["start"]("--compare", "models:/cris@challenger",
                                    "--data", str(app["data"])))
    assert columns(browser) == 2
    assert "cris v1 (champion)" in heading(browser, 0) and "val mIoU" in heading(browser, 0)
    assert "cris v2 (challenger)" in heading(browser, 1)
    assert "val mIoU 0.0000" in heading(browser, 1)
    assert "Images of the dataset" in browser.find_element("tag name", "body").text
    submit(browser, app["image"], "\n".join(PHRASES))
    urls = wait_overlays(browser, len(PHRASES), 2)
    scene = Image.open(app["image"]).convert("RGB")
    champion = [fetch_image(u) for u in urls[0]]
    assert all(_shows_mask(o, scene, c) for o, c in zip(champion, PHRASE_COLOURS, strict=False))
    challenger = [fetch_image(u) for u in urls[1]]
    assert all(o.size == champion[0].size for o in challenger)
    assert not np.array_equal(np.asarray(champion[0]), np.asarray(challenger[0]))
    for column in (0, 1):
        text = report(browser, column)
        assert "Image encoded once in" in text and "2 phrases in" in text
        assert all(p in text for p in PHRASES) and "%" in text, text
    assert status(browser) == "2 phrase(s) on a 64x48 image."


def _huge_png(path: Path) -> Path:
    """A small file of more pixels than PIL's decompression-bomb limit."""
    Image.new("1", (9500, 9500)).save(path)
    return path


def test_bad_input_gives_a_message_on_the_page_and_the_server_stays_up(
    app: dict[str, Any], browser: WebDriver, tmp_path: Path
) -> None:
    open_page(browser, app["start"]())
    assert columns(browser) == 1
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    submit(browser, text_file, "red square")
    assert "notes.png: not a readable image" in wait_status(browser, "Cannot segment")
    submit(browser, _huge_png(tmp_path / "huge.png"), "red square")
    assert "exceeds limit" in wait_status(browser, "Cannot segment: huge.png")
    submit(browser, app["image"], " \n  ")
    assert "got only whitespace" in wait_status(browser, "non-empty string")
    submit(browser, None, "red square " * 182)  # 2,002 characters
    wait_overlays(browser, 1, 1)
    assert "the model reads only the first 15" in report(browser, 0)
    submit(browser, None, "\n".join(PHRASES))
    wait_status(browser, "2 phrase(s)")
    assert "Phrase 1 has" not in report(browser, 0)


def test_a_checkpoint_serves_alone_in_one_column(app: dict[str, Any], browser: WebDriver) -> None:
    open_page(browser, app["start"]("--checkpoint", str(app["best"])))
    assert columns(browser) == 1 and "checkpoint best" in heading(browser, 0)
    submit(browser, app["image"], PHRASES[0])
    (urls,) = wait_overlays(browser, 1, 1)
    scene = Image.open(app["image"]).convert("RGB")
    assert _shows_mask(fetch_image(urls[0]), scene, PHRASE_COLOURS[0])


def test_no_champion_is_one_line_and_no_server(
    models: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["app", "--model-uri", "models:/nobody@champion", "--tracking-uri",
               models["uri"], "--port", str(free_port())])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert "no version of nobody has the alias 'champion'" in err and "cris promote" in err


def test_examples_are_the_prepared_images_with_their_sentences(
    models: dict[str, Any], tmp_path: Path
) -> None:
    examples = dataset_examples(models["data"], "val", tmp_path, count=5)
    assert len(examples) == 2  # the val split has two images
    for path, sentences in examples:
        assert Image.open(path).size == (64, 48)
        assert len(sentences.splitlines()) == 4 and "red square" in sentences


def test_too_many_phrases_and_no_image_are_messages(models: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="9 phrases: at most 8"):
        read_phrases("\n".join(["red square"] * 9))
    assert read_phrases("red square\n\n  blue square ") == ["red square", "blue square"]
    served = load_model(models["best"])
    status_line, gallery, text = respond([served], None, "red square")
    assert status_line.startswith("**Cannot segment:** no image") and gallery == [] and text == ""


def test_champion_and_challenger_on_one_version_make_one_column(models: dict[str, Any]) -> None:
    served = load_models(["models:/cris@champion", "models:/cris/1", "models:/cris@challenger"],
                         models["uri"])
    assert [m.title for m in served] == ["cris v1 (champion)", "cris v2 (challenger)"]


def test_the_preview_and_segment_share_one_queue(models: dict[str, Any]) -> None:
    """Both write the status line; in separate queues Gradio may answer a click before the
    upload's preview, which then overwrites the click's message (seen in CI)."""
    page = build_page([load_model(models["best"])], [])
    groups = [(fn.concurrency_id, fn.concurrency_limit) for fn in page.fns.values()]
    assert len(groups) == 2 and set(groups) == {("page", 1)}, groups
