"""The demo's concise view: steps, epoch bars and the failure tail, with every line logged."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from pipelines.progress import run, view

LINES = [
    "2026-12-04 18:55:45 +0000 - dagster - DEBUG - train_pipeline - 3d2d - 3929 - raw_dataset"
    ' - STEP_START - Started execution of step "raw_dataset".\n',
    "2026-12-04 18:55:46 +0000 - dagster - DEBUG - train_pipeline - 3d2d - 3929 - raw_dataset"
    " - ASSET_MATERIALIZATION - Materialized value raw_dataset.\n",
    "2026-12-04 18:56:04 +0000 - dagster - DEBUG - train_pipeline - 3d2d - 3929 - raw_dataset"
    ' - STEP_SUCCESS - Finished execution of step "raw_dataset" in 19.21s.\n',
    "cris: epoch 3/7: val mIoU 0.412 oIoU 0.380 (best); 52 s\n",
]


def test_view_shows_steps_and_epochs_and_logs_everything() -> None:
    log, out = io.StringIO(), io.StringIO()
    tail = view(LINES, log, out)
    assert log.getvalue() == "".join(LINES) and tail[-1] == LINES[-1].rstrip("\n")
    assert out.getvalue().splitlines() == [
        "  raw_dataset ...", "  raw_dataset done in 19.21s",
        "    epoch 3/7 [#########-----------] val mIoU 0.412 oIoU 0.380 (best); 52 s"]


def test_run_passes_the_status_on_and_shows_the_tail_of_a_failure(tmp_path: Path) -> None:
    log, out = tmp_path / "demo.log", io.StringIO()
    script = "import sys; print('working'); print('boom', file=sys.stderr); sys.exit(3)"
    assert run([sys.executable, "-c", script], log, out) == 3
    assert "working\nboom\n" in log.read_text()
    shown = out.getvalue()
    assert "failed (exit status 3)" in shown and "    boom" in shown and str(log) in shown
    assert run([sys.executable, "-c", "print('fine')"], log, io.StringIO()) == 0
