"""Server processes of the services: free ports, process groups and the `Service` base class.

A `Service` runs in its own process group, logs to `root/<name>.log`, is waited on until it
answers (RuntimeError naming the log otherwise), and is stopped with SIGTERM, then SIGKILL,
until no process of its group is left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

HOST = "127.0.0.1"  # default bind address of every service
START_TIMEOUT_S = 120.0  # how long a service may take to answer after its start
STOP_TIMEOUT_S = 20.0  # how long SIGTERM gets before SIGKILL


def free_port(host: str = HOST) -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = HOST) -> bool:
    """Whether a TCP listener could bind `host:port` now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process belongs to process group `pgid`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_group(pgid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM process group `pgid`, SIGKILL it after `timeout` s; returns once it is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                return
            time.sleep(0.1)
    raise RuntimeError(f"process group {pgid} survived SIGKILL")


class Service(ABC):
    """One server process: launched in its own group, health-checked, stopped by group."""

    name = "service"

    def __init__(self, root: Path, host: str) -> None:
        self.root = Path(root).resolve()
        self.host = host
        self.log_path = self.root / f"{self.name}.log"
        self.pid: int | None = None  # the group leader (= process group id) while running
        self._proc: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def _command(self) -> list[str]:
        """The server's command line."""

    @abstractmethod
    def _env(self) -> dict[str, str]:
        """The server's environment."""

    @abstractmethod
    def _healthy(self) -> bool:
        """Whether the server answers its health check now."""

    def _popen_kwargs(self) -> dict[str, Any]:
        """Extra `subprocess.Popen` arguments (e.g. the account to run as); none by default."""
        return {}

    @property
    def running(self) -> bool:
        """Whether the service's process group has a live process."""
        return self.pid is not None and group_alive(self.pid)

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Launch the server and wait until it answers; RuntimeError naming the log if not."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=self._env(),
                                          cwd=self.root, start_new_session=True,
                                          **self._popen_kwargs())
        self.pid = self._proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self._proc.poll()
            if status is not None:
                self.stop()
                raise RuntimeError(f"{self.name} exited with status {status}; "
                                   f"see {self.log_path}")
            if self._healthy():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {timeout:.0f} s; "
                           f"see {self.log_path}")

    def stop(self) -> None:
        """Terminate the whole process group (then kill it); a no-op when not running."""
        if self.pid is None:
            return
        stop_group(self.pid)
        if self._proc is not None:
            self._proc.wait(timeout=STOP_TIMEOUT_S)
        self.pid, self._proc = None, None

    def restart(self) -> None:
        """Stop, then start again on the same ports and data."""
        self.stop()
        self.start()


_S = TypeVar("_S", bound=Service)


@contextmanager
def started(service: _S) -> Iterator[_S]:
    """`service` started, stopped on exit."""
    service.start()
    try:
        yield service
    finally:
        service.stop()
