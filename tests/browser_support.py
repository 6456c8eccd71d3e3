"""Helpers for the real-browser test: loopback servers in their own process groups, and
headless Chromium from the Debian packages driven by Selenium (no driver or browser
download: both paths are given explicitly and Selenium Manager is told to stay offline).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")  # Debian package `chromium`
CHROMEDRIVER = Path("/usr/bin/chromedriver")  # Debian package `chromium-driver`
SKIP_ENV = "CRIS_SKIP_BROWSER"  # "1" skips the browser tests; never set in CI
# Flags that keep Chromium headless, root-safe and off the (closed) network.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1600,1000")


def require_browser() -> None:
    """Skip when CRIS_SKIP_BROWSER=1; otherwise fail unless Chromium and its driver are
    installed (a missing browser must not pass silently)."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1")
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run `make setup-browser` (Debian packages "
                    f"chromium and chromium-driver) or set {SKIP_ENV}=1", pytrace=False)


def _log_tail(log: Path, chars: int = 2000) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-chars:] if log.is_file() else ""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


class Server:
    """A command started in its own process group (session), its output in `log`."""

    def __init__(self, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], log: Path):
        self.log = log
        self.program = Path(argv[0]).name  # for messages
        with log.open("wb") as out:
            self.proc = subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.pgid = self.proc.pid  # leader of a new session: its pid is the group id

    def wait_http(self, url: str, timeout: float) -> None:
        """Poll `url` until it answers HTTP 200; RuntimeError (with the log's tail) when the
        server exits or `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.program} exited with {self.proc.returncode} "
                                   f"before {url} answered:\n{_log_tail(self.log)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            time.sleep(0.5)
        raise RuntimeError(f"{url}: not ready after {timeout:.0f} s ({last}):\n"
                           f"{_log_tail(self.log)}")

    def stop(self, timeout: float = 20.0) -> bool:
        """SIGTERM the whole group and SIGKILL what is left after `timeout` s; True when
        SIGTERM alone ended every process. RuntimeError if any survives SIGKILL."""
        deadline = time.monotonic() + timeout
        clean = self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            clean = False
        if not (clean and _wait_group_gone(self.pgid, deadline - time.monotonic())):
            clean = False
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            if not _wait_group_gone(self.pgid, 10):
                raise RuntimeError(f"process group {self.pgid} ({self.program}) still "
                                   "has processes after SIGKILL")
        return clean

    def _signal(self, sig: signal.Signals) -> bool:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            return False
        return True

    def alive(self) -> bool:
        """Whether any process of the group still exists."""
        return _group_alive(self.pgid)


@contextmanager
def chromium() -> Iterator[WebDriver]:
    """A headless Chromium WebDriver with a fresh empty profile; quit on exit."""
    # The explicit driver path already bypasses Selenium Manager; offline mode makes sure
    # it could not fetch a driver or browser even if it ran.
    with (mock.patch.dict(os.environ, {"SE_OFFLINE": "true"}),
          tempfile.TemporaryDirectory(prefix="cris-chromium-") as profile):
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        try:
            driver.set_page_load_timeout(60)
            yield driver
        finally:
            driver.quit()


def wait_until(check: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    """Call `check` every 0.5 s until it returns True; AssertionError with `what()` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:.0f} s: {what()}")
        time.sleep(0.5)
