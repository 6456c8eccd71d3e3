"""Fault injection for the reliability tests: processes that SIGKILL themselves at named points.

A `cris` subprocess started with `kill_env(tmp, point, n)` imports this module at start-up
(through a generated `sitecustomize.py` on PYTHONPATH) and patches the library so that the
n-th time (1-based, counted in that process) it reaches `point` it sends itself SIGKILL:

    step      inside an optimizer step: after forward and backward, before the update
    weights   while writing a checkpoint's model.safetensors (half the bytes are on disk)
    swap      while renaming a finished checkpoint into place (the old copy moved aside,
              the new one not yet renamed in)
    eval      during the end-of-epoch validation (after its first prediction)

Nothing in `cris_model` knows about this: the patches wrap library functions from outside,
so the product code runs unchanged up to the kill. Also here: checks that a checkpoint
directory is complete, the loopback `mlflow server` used by the tracking tests, and the
environment that makes MLflow clients fail fast.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fetch_servers

KILL_ENV = "CRIS_TEST_KILL"  # "<point>@<n>": die at the n-th arrival at <point>
ONCE_ENV = "CRIS_TEST_KILL_ONCE"  # a file: kill only while it is absent; created on the kill
PAUSE_ENV = "CRIS_TEST_PAUSE"  # "<folder>:<step>,<step>": wait for the test at those steps
POINTS = ("step", "weights", "swap", "eval")
TESTS = Path(__file__).resolve().parent
CHECKPOINT_FILES = ("model.safetensors", "config.json", "tokenizer.json", "metrics.json",
                    "extra.json", "train_state.safetensors", "train_state.json")
# MLflow's own HTTP retries would wait minutes on a stopped server; the tests want seconds.
FAST_MLFLOW = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}

_SITE = f"""import os
if os.environ.get({KILL_ENV!r}) or os.environ.get({PAUSE_ENV!r}):
    import reliability_support
    reliability_support.arm_from_env()
"""


def _die() -> None:
    once = os.environ.get(ONCE_ENV)
    if once:
        Path(once).touch()
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # SIGKILL is asynchronous; never return into the code under test


def _counter(n: int) -> Callable[[], bool]:
    """A function that returns True on its n-th call (1-based) and only then."""
    seen = [0]

    def hit() -> bool:
        seen[0] += 1
        return seen[0] == n

    return hit


def _arm_step(n: int) -> None:
    import cris_model.training.loop as train

    original, hit = train._step, _counter(n)

    def step(net: Any, batch: Any, opt: Any, *args: Any) -> Any:
        if hit():
            opt.step = lambda *a, **k: _die()  # the update itself is where it dies
        return original(net, batch, opt, *args)

    train._step = step  # type: ignore[assignment]  # the kill point wraps the step


def _arm_weights(n: int) -> None:
    import cris_model.checkpoint as checkpoint

    original, hit = checkpoint.save_file, _counter(n)

    def save_file(tensors: Any, filename: str, *args: Any, **kwargs: Any) -> None:
        original(tensors, filename, *args, **kwargs)
        if hit():
            size = os.path.getsize(filename)
            os.truncate(filename, size // 2)
            _die()

    checkpoint.save_file = save_file  # type: ignore[assignment]  # the kill point wraps it


def _arm_swap(n: int) -> None:
    import cris_model.atomic as atomic

    original, hit = atomic.replace_dir, _counter(n)

    def replace_dir(tmp: Path, dest: Path) -> None:
        if hit():
            if dest.exists():
                dest.rename(atomic._sibling(dest, "old"))
            _die()
        original(tmp, dest)

    atomic.replace_dir = replace_dir


def _arm_eval(n: int) -> None:
    import cris_model.training.loop as train

    original, hit = train.predict_split, _counter(n)

    def predict_split(*args: Any, **kwargs: Any) -> Iterator[Any]:
        dying = hit()
        for i, item in enumerate(original(*args, **kwargs)):
            if dying and i == 1:
                _die()
            yield item

    train.predict_split = predict_split


def _arm_pauses(folder: Path, steps: set[int]) -> None:
    """Before each listed step (1-based in this process) create `folder/paused-<step>`, then
    wait until the test creates `folder/go-<step>`."""
    import cris_model.training.loop as train

    original, seen = train._step, [0]

    def step(*args: Any) -> Any:
        seen[0] += 1
        if seen[0] in steps:
            (folder / f"paused-{seen[0]}").touch()
            deadline = time.monotonic() + 300
            while not (folder / f"go-{seen[0]}").exists():
                if time.monotonic() > deadline:
                    _die()
                time.sleep(0.05)
        return original(*args)

    train._step = step  # type: ignore[assignment]  # the kill point wraps the step


def pause(proc: subprocess.Popen, folder: Path, step: int, then: Callable[[], None],
          timeout_s: float = 300) -> None:
    """Wait until `proc`, armed by `pause_env(.., folder, ..)`, waits before `step`; run
    `then`; release it. AssertionError with its stderr if it exits first."""
    def paused() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}: {proc.communicate()[1]}")
        return (folder / f"paused-{step}").exists()

    wait_for(paused, timeout_s, f"training to reach step {step}")
    then()
    (folder / f"go-{step}").touch()


def pause_env(tmp: Path, folder: Path, steps: list[int]) -> dict[str, str]:
    """Environment for a `cris train` subprocess that waits for the test before `steps`."""
    folder.mkdir(parents=True, exist_ok=True)
    env = kill_env(tmp, None)
    env[PAUSE_ENV] = f"{folder}:{','.join(str(s) for s in steps)}"
    return env


def arm_from_env() -> None:
    """Install the pauses of $CRIS_TEST_PAUSE and the kill of $CRIS_TEST_KILL
    (`<point>@<n>`) in this process."""
    if os.environ.get(PAUSE_ENV):
        folder, _, steps = os.environ[PAUSE_ENV].rpartition(":")
        _arm_pauses(Path(folder), {int(s) for s in steps.split(",")})
    if not os.environ.get(KILL_ENV):
        return
    once = os.environ.get(ONCE_ENV)
    if once and Path(once).exists():
        return
    point, _, n = os.environ[KILL_ENV].partition("@")
    arm = {"step": _arm_step, "weights": _arm_weights, "swap": _arm_swap, "eval": _arm_eval}
    arm[point](int(n))


def kill_env(tmp: Path, point: str | None, n: int = 1, once: Path | None = None
             ) -> dict[str, str]:
    """Environment for a subprocess that dies at the n-th `point` (None: no kill); with
    `once`, only the first process to get there dies (it creates that file)."""
    site = tmp / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITE, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in (KILL_ENV, ONCE_ENV, PAUSE_ENV)}
    env.update(CI="1", PYTHONPATH=os.pathsep.join([str(site), str(TESTS)]))
    if point is not None:
        if point not in POINTS:
            raise ValueError(f"unknown kill point {point!r}")
        env[KILL_ENV] = f"{point}@{n}"
    if once is not None:
        env[ONCE_ENV] = str(once)
    return env


def checkpoint_problems(path: Path) -> list[str]:
    """Why checkpoint directory `path` is not complete and readable ([] when it is)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        return [f"{path}: missing {', '.join(missing)}"]
    problems = []
    for name in CHECKPOINT_FILES:
        try:
            if name.endswith(".safetensors"):
                load_file(str(path / name))
            else:
                json.loads((path / name).read_text(encoding="utf-8"))
        except (SafetensorError, ValueError) as e:
            problems.append(f"{path / name}: {e}")
    return problems


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str,
             interval_s: float = 0.05) -> None:
    """Poll `predicate` until it is true; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def cris(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """`cris ARGS` in a subprocess of this interpreter, output captured as text."""
    script = "import sys; from cris_model.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class _Handler(fetch_servers._Handler):
    do_PATCH = fetch_servers._Handler._handle  # MLflow updates logged models with PATCH


class MlflowFaultProxy(fetch_servers.FaultProxy):
    """`fetch_servers.FaultProxy` that also forwards PATCH, for an MLflow server upstream."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self._httpd.RequestHandlerClass = _Handler

    def __enter__(self) -> MlflowFaultProxy:
        super().__enter__()
        return self
