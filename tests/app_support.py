"""Driving the try-it page (`cris app`) in headless Chromium: start it as a server, upload an
image, type phrases, press Segment, wait for the overlays, and read them back.

Used by tests/test_app.py and by docs/screenshot_app.py (which redraws docs/app.png).
"""

from __future__ import annotations

import io
import os
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from browser_support import Server, wait_until
from PIL import Image
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

BIN = Path(sys.executable).parent  # the venv's bin, where `cris` lives
PAGE_TIMEOUT = 60.0  # seconds the page may take to show what is waited for
START_TIMEOUT = 120.0  # seconds `cris app` may take to load its models and answer HTTP 200


def start_app(args: Sequence[str], *, port: int, cwd: Path, log: Path,
              env: Mapping[str, str] | None = None) -> Server:
    """`cris app ARGS --port PORT` in its own process group, once it answers HTTP 200."""
    server = Server([str(BIN / "cris"), "app", *args, "--port", str(port)], cwd=cwd,
                    env={**os.environ, **(env or {})}, log=log)
    try:
        server.wait_http(f"http://127.0.0.1:{port}/", START_TIMEOUT)
    except RuntimeError:
        server.stop()
        raise
    return server


def _text(driver: WebDriver, css: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def status(driver: WebDriver) -> str:
    """The page's status line (what it says about the last request)."""
    return _text(driver, "#status")


def report(driver: WebDriver, column: int) -> str:
    """The text under model `column`'s overlays: timings and areas."""
    return _text(driver, f"#report-{column}")


def heading(driver: WebDriver, column: int) -> str:
    """The text of model `column`'s column: its version, aliases and val mIoU on top."""
    return _text(driver, f"#model-{column}")


def columns(driver: WebDriver) -> int:
    """How many model columns the page shows."""
    return len(driver.find_elements(By.CSS_SELECTOR, ".model-column"))


def overlay_urls(driver: WebDriver, column: int) -> list[str]:
    """The addresses of the overlay images shown in model `column`'s gallery."""
    images = driver.find_elements(By.CSS_SELECTOR, f"#overlays-{column} img")
    return [src for src in (e.get_attribute("src") for e in images) if src]


def fetch_image(url: str) -> Image.Image:
    """An image the page shows, read over HTTP as RGB."""
    with urllib.request.urlopen(url, timeout=30) as resp:
        return Image.open(io.BytesIO(resp.read())).convert("RGB")


def open_page(driver: WebDriver, url: str) -> None:
    """Load the page and wait until its Segment button shows."""
    driver.get(url)
    wait_until(lambda: bool(driver.find_elements(By.CSS_SELECTOR, "#segment")), PAGE_TIMEOUT,
               lambda: f"no Segment button at {url}")


def submit(driver: WebDriver, image: Path | None, phrases: str) -> None:
    """Upload `image` (None keeps the current one), replace the phrases, press Segment."""
    if image is not None:
        clear = driver.find_elements(By.CSS_SELECTOR, "#image-file button[aria-label='Clear']")
        if clear:
            clear[0].click()
        upload = driver.find_element(By.CSS_SELECTOR, "#image-file input[type=file]")
        upload.send_keys(str(image))
        wait_until(lambda: image.stem in _text(driver, "#image-file"), PAGE_TIMEOUT,
                   lambda: f"{image.name} not shown as uploaded: {_text(driver, '#image-file')}")
    box = driver.find_element(By.CSS_SELECTOR, "#phrases textarea")
    box.clear()
    box.send_keys(phrases)
    driver.find_element(By.CSS_SELECTOR, "#segment").click()


def wait_overlays(driver: WebDriver, count: int, n_columns: int) -> list[list[str]]:
    """Wait until every model column shows `count` overlays; their URLs per column."""
    def ready() -> bool:
        return all(len(overlay_urls(driver, c)) == count for c in range(n_columns))

    wait_until(ready, PAGE_TIMEOUT, lambda: f"overlays per column: "
               f"{[len(overlay_urls(driver, c)) for c in range(n_columns)]}, wanted {count}; "
               f"status: {status(driver)!r}")
    return [overlay_urls(driver, c) for c in range(n_columns)]


def wait_status(driver: WebDriver, words: str) -> str:
    """Wait until the status line contains `words`; the status line."""
    wait_until(lambda: words in status(driver), PAGE_TIMEOUT,
               lambda: f"status {status(driver)!r} lacks {words!r}")
    return status(driver)
