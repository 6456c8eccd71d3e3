"""A concise view of Dagster runs for `make demo`: stages, an epoch bar, val mIoU per epoch.

`python -m pipelines.progress --log FILE -- COMMAND...` runs a Dagster command, appends all it
prints (stdout and stderr) to FILE, and shows only what a person follows: each step as it
starts and ends (with its time), each training epoch as a bar with its val mIoU (from the
lines `cris train` prints, `cris: epoch 3/7: val mIoU 0.412 ...`), and, when the command
fails, its last lines and where the rest is; it exits with the command's status.
`python -m pipelines.progress --summary ASSETS` prints the demo's result: mIoU and oIoU per
evaluated split, the language-blind baselines on val and the val breakdown by phrase kind
and target size.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

BAR_WIDTH = 20  # characters of the epoch bar
TAIL_LINES = 25  # log lines shown when a step fails
_STEP = re.compile(r' - (?P<step>[\w\[\].-]+) - (?P<event>STEP_START|STEP_SUCCESS|STEP_FAILURE)'
                   r' - (?P<text>.*)')
_TOOK = re.compile(r' in (?P<took>[\d.]+m?s)\.?$')
_EPOCH = re.compile(r'cris: epoch (?P<done>\d+)/(?P<total>\d+): (?P<rest>.*)')


def _bar(done: int, total: int) -> str:
    filled = round(BAR_WIDTH * done / max(total, 1))
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]"


def view(lines: Iterable[str], log: TextIO, out: TextIO) -> list[str]:
    """Copy `lines` to `log`, print the concise view to `out`; -> the last TAIL_LINES lines."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    for line in lines:
        log.write(line)
        tail.append(line.rstrip("\n"))
        step, epoch = _STEP.search(line), _EPOCH.search(line)
        if step and step["event"] == "STEP_START":
            print(f"  {step['step']} ...", file=out, flush=True)
        elif step and step["event"] == "STEP_SUCCESS":
            took = _TOOK.search(step["text"])
            print(f"  {step['step']} done{' in ' + took['took'] if took else ''}", file=out,
                  flush=True)
        elif epoch:
            done, total = int(epoch["done"]), int(epoch["total"])
            print(f"    epoch {done}/{total} {_bar(done, total)} {epoch['rest']}", file=out,
                  flush=True)
    log.flush()
    return list(tail)


def run(command: list[str], log_path: Path, out: TextIO) -> int:
    """Run `command` with its output through `view`; -> its exit status."""
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        assert proc.stdout is not None
        tail = view(proc.stdout, log, out)
        status = proc.wait()
    if status:
        print(f"  failed (exit status {status}); the last lines of {log_path}:", file=out)
        for row in tail:
            print(f"    {row}", file=out)
    return status


def summary(assets: Path, out: TextIO) -> None:
    """The demo's figures from `assets/eval/<split>/metrics.json` and the prepared val split."""
    from cris_model.baselines import language_blind_report
    from cris_model.data.manifest import read_manifest

    splits = sorted((assets / "eval").glob("*/metrics.json"),
                    key=lambda p: (p.parent.name != "val", p.parent.name))
    print("Result (model selected on val only):", file=out)
    for path in splits:
        m = json.loads(path.read_text(encoding="utf-8"))
        print(f"  {m['split']:<6} mIoU {m['mIoU']:.3f}  oIoU {m['oIoU']:.3f}  "
              f"prec@0.5 {m['prec@0.5']:.3f}  ({m['count']} sentences)", file=out)
    blind = language_blind_report(read_manifest(assets / "prepared" / "val.parquet"))
    print(f"  language-blind on val: every object {blind['every_object_mIoU']:.3f}, "
          f"best single object per image {blind['blind_oracle_mIoU']:.3f}", file=out)
    val = assets / "eval" / "val" / "metrics.json"
    if val.is_file():
        parts = json.loads(val.read_text(encoding="utf-8")).get("breakdown", {})
        for by, groups in parts.items():
            cells = [f"{g} {m['mIoU']:.2f} ({m['count']})" for g, m in groups.items()]
            if cells:
                print(f"  val mIoU by {by}: " + ", ".join(cells), file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--log", help="file that receives all the command prints (appended)")
    group.add_argument("--summary", help="the demo's asset folder: print its figures")
    parser.add_argument("command", nargs="*", help="with --log: the command to run, after --")
    args = parser.parse_args(argv)
    if args.summary:
        summary(Path(args.summary), sys.stdout)
        return 0
    if not args.command:
        parser.error("--log needs a command after --")
    return run(args.command, Path(args.log), sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
