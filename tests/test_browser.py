"""End to end in a real browser: `dagster-webserver` and the MLflow UI run on loopback, and
headless Chromium (Debian packages, driven by Selenium) finds the global asset graph with
every asset, and the registered model's version carrying the `champion` alias.

The registry holds one cris_tiny (random init) version, registered and promoted through
cris_model.registry against a temporary SQLite store. Screenshots go to the test's tmp
folder. Nothing here writes into the repository or reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from browser_support import Server, chromium, require_browser, wait_until
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from cris_model.checkpoint import save_checkpoint
from cris_model.config import get_preset
from cris_model.model import build_model
from cris_model.registry import CHAMPION, RegistryConfig, promote, register
from infra.process import free_port
from pipelines.definitions import ASSETS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: dagster-webserver and mlflow live here
MODEL_NAME = "cris-browser"
PAGE_TIMEOUT = 60.0  # seconds a page may take to show what the test looks for
START_TIMEOUT = 60.0  # seconds a server may take to answer HTTP 200
ASSET_NAMES = sorted(a.key.to_user_string() for a in ASSETS)
GROUP_NAMES = sorted({a.group_names_by_key[a.key] for a in ASSETS})

pytestmark = pytest.mark.slow


def _register_champion(root: Path, uri: str) -> dict:
    """Register a random-init cris_tiny checkpoint with val metrics and promote it."""
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "ckpt", build_model(get_preset("cris_tiny", random_init=True)),
                           metrics={"mIoU": 0.5})
    metrics = root / "metrics.json"
    metrics.write_text(json.dumps({"mIoU": 0.5, "oIoU": 0.45, "split": "val", "count": 4}))
    config = RegistryConfig(model_name=MODEL_NAME, tracking_uri=uri, experiment="browser")
    register(ckpt, config, metrics_path=metrics)
    return promote(config)


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Both UIs on free loopback ports over a registry holding a champion; on teardown both
    process groups are stopped and must be gone."""
    require_browser()
    tmp = tmp_path_factory.mktemp("ui")
    home = tmp / "dagster"
    home.mkdir()
    shutil.copy(REPO / "infra" / "dagster" / "dagster.yaml", home / "dagster.yaml")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "DAGSTER_HOME": str(home), "MLFLOW_TRACKING_URI": uri,
           "CRIS_STORAGE_ROOT": str(tmp / "assets"),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job workers
    dagster_port, mlflow_port = free_port(), free_port()
    servers: list[Server] = []
    try:
        # Dagster starts while the model is registered (the store must exist before MLflow).
        servers.append(Server([str(BIN / "dagster-webserver"), "-m", "pipelines.definitions",
                               "-h", "127.0.0.1", "-p", str(dagster_port)],
                              cwd=REPO, env=env, log=tmp / "dagster.log"))
        promoted = _register_champion(tmp, uri)
        servers.append(Server([str(BIN / "mlflow"), "ui", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(mlflow_port),
                               "--workers", "1"], cwd=tmp, env=env, log=tmp / "mlflow.log"))
        dagster, mlflow = (f"http://127.0.0.1:{p}" for p in (dagster_port, mlflow_port))
        servers[0].wait_http(f"{dagster}/server_info", START_TIMEOUT)
        servers[1].wait_http(f"{mlflow}/health", START_TIMEOUT)
        yield {"dagster": dagster, "mlflow": mlflow, "promoted": promoted}
    finally:
        stopped = {s.program: s.stop() for s in servers}
    assert not [s.pgid for s in servers if s.alive()], "server processes left running"
    assert all(stopped.values()), f"a server outlived SIGTERM and was killed: {stopped}"


@pytest.fixture(scope="module")
def browser(ui: dict) -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


def _svg_texts(driver: WebDriver, names: list[str]) -> list[str]:
    """Those of `names` that some element inside an SVG graph shows as its whole text."""
    return [n for n in names if driver.find_elements(
        By.XPATH, f"//*[local-name()='svg']//*[normalize-space(text())='{n}']")]


def _page_text(driver: WebDriver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text[-1500:]


def _expand_all_groups(driver: WebDriver) -> None:
    """Expand every group of the asset graph with Alt+E, the graph's own shortcut. A press
    that lands before the graph listens is repeated after 10 s, but never once an asset
    shows (a second press would collapse the groups again)."""
    deadline = time.monotonic() + PAGE_TIMEOUT
    while not _svg_texts(driver, ASSET_NAMES) and time.monotonic() < deadline:
        ActionChains(driver).key_down(Keys.ALT).send_keys("e").key_up(Keys.ALT).perform()
        pressed = time.monotonic()
        while not _svg_texts(driver, ASSET_NAMES) and time.monotonic() - pressed < 10:
            time.sleep(0.5)


def test_dagster_global_asset_graph_shows_every_asset(
    ui: dict, browser: WebDriver, tmp_path: Path
) -> None:
    browser.get(f"{ui['dagster']}/asset-groups")
    # The global lineage graph opens with its groups collapsed: group nodes, no asset names.
    wait_until(lambda: _svg_texts(browser, GROUP_NAMES) == GROUP_NAMES, PAGE_TIMEOUT,
               lambda: f"graph shows groups {_svg_texts(browser, GROUP_NAMES)} of "
                       f"{GROUP_NAMES}:\n{_page_text(browser)}")
    assert "Global asset lineage" in _page_text(browser)
    _expand_all_groups(browser)
    wait_until(lambda: _svg_texts(browser, ASSET_NAMES) == ASSET_NAMES, PAGE_TIMEOUT,
               lambda: f"graph shows {_svg_texts(browser, ASSET_NAMES)} of {ASSET_NAMES}:\n"
                       f"{_page_text(browser)}")
    browser.save_screenshot(str(tmp_path / "dagster_asset_graph.png"))
    assert (tmp_path / "dagster_asset_graph.png").stat().st_size > 10_000


def _alias_cells(driver: WebDriver, version: int) -> str:
    """Text of the model page's table row for `version` ("" while it is not shown)."""
    rows = driver.find_elements(By.XPATH, f"//*[@role='row'][.//a[normalize-space()="
                                          f"'Version {version}']]")
    return " ".join(r.text for r in rows)


def test_mlflow_model_page_shows_champion_alias(
    ui: dict, browser: WebDriver, tmp_path: Path
) -> None:
    version = ui["promoted"]["version"]
    assert ui["promoted"]["promoted"] and CHAMPION in ui["promoted"]["aliases"]
    browser.get(f"{ui['mlflow']}/#/models/{MODEL_NAME}")
    wait_until(lambda: CHAMPION in _alias_cells(browser, version), PAGE_TIMEOUT,
               lambda: f"no '{CHAMPION}' in the row of version {version}:\n"
                       f"{_page_text(browser)}")
    assert MODEL_NAME in _page_text(browser) or MODEL_NAME in browser.title
    browser.save_screenshot(str(tmp_path / "mlflow_model.png"))
    assert (tmp_path / "mlflow_model.png").stat().st_size > 10_000
