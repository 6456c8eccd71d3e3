"""Crash safety: `cris train` SIGKILLed during a step, a checkpoint write, a checkpoint swap
and evaluation, resumed each time, ends bit-identical to an uninterrupted run.

The kills are real SIGKILLs sent by the training process to itself at named points
(`reliability_support`); which step, write or swap is hit is drawn from a seeded RNG, so the
test is the same on every run. Deterministic CPU mode with dropout on, so the restored RNG
state matters too.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from reliability_support import checkpoint_problems, cris, kill_env
from safetensors.torch import load_file
from tiny_refer import make_prepared

from cris_model.training import state as train_state
from cris_model.training.loop import _history_step

PARAMS: dict[str, Any] = {
    "model": {"preset": "cris_tiny", "random_init": True, "dropout": 0.2},
    "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "tracking": False, "progress": False,
              "log_every": 1, "gallery_size": 0, "deterministic": True,
              "checkpoint_every_steps": 1},
    "eval": {"threshold": 0.35},
}
STEPS = 6  # 12 referred objects / batch 4 = 3 steps per epoch, 2 epochs


def _kill_plan(seed: int) -> list[tuple[str, int]]:
    """(point, n) for each interrupted process, in order; every n is reachable in its run."""
    rng = random.Random(seed)
    return [("step", rng.randint(2, 3)), ("weights", rng.randint(1, 2)), ("eval", 1),
            ("swap", rng.randint(1, 3))]


def _assert_nothing_half_written(out: Path) -> None:
    for name in ("last", "best"):
        if (out / name).exists():
            assert checkpoint_problems(out / name) == []
    train_state.find_resumable(out)  # last/ or the copy a cut swap left aside


@pytest.mark.slow
def test_sigkill_at_step_write_swap_and_eval_resumes_to_the_same_weights(tmp_path: Path) -> None:
    data = make_prepared(tmp_path / "refer", {"train": 6, "val": 2})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    common = ["train", "--params", str(params), "--data", str(data)]
    whole = cris(*common, "--out", str(tmp_path / "whole"), env=kill_env(tmp_path, None))
    out = tmp_path / "killed"
    for i, (point, n) in enumerate(_kill_plan(seed=2024)):
        resume = ["--resume"] if i else []
        proc = cris(*common, "--out", str(out), *resume, env=kill_env(tmp_path, point, n))
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, f"{point}@{n} not reached: {err}"
        _assert_nothing_half_written(out)
    final = cris(*common, "--out", str(out), "--resume", env=kill_env(tmp_path, None))
    for proc in (whole, final):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert "cris: resume: from" in err

    for name in ("last", "best"):
        a = load_file(str(tmp_path / "whole" / name / "model.safetensors"))
        b = load_file(str(out / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert (out / name / "metrics.json").read_text() == (
            tmp_path / "whole" / name / "metrics.json").read_text()
    assert train_state.read_progress(out / "last").step == STEPS
    assert (out / "history.csv").read_text() == (tmp_path / "whole" / "history.csv").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["best", "history.csv", "last"]


def test_recover_puts_back_a_checkpoint_whose_swap_was_cut(tmp_path: Path) -> None:
    old = tmp_path / ".best.old-1234abcd"
    old.mkdir()
    (old / "metrics.json").write_text("{}")
    (tmp_path / ".best.tmp-99999999").mkdir()
    (tmp_path / "..last.tmp-1.tmp-2").mkdir()
    (tmp_path / "last").mkdir()
    (tmp_path / ".last.old-00000000").mkdir()
    changes = train_state.recover(tmp_path)
    assert (tmp_path / "best" / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "last"]
    assert len(changes) == 4
    assert "restored best from the copy a cut-short swap left aside" in changes


def test_history_rows_cut_short_by_a_kill_are_dropped_on_resume() -> None:
    assert _history_step("12,0.25") == 12
    assert all(_history_step(row) > 10**9 for row in ("", "12", "12,", "12,0.2x", "1"))
