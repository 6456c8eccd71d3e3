"""Writes that never leave a half-written file or folder: stage beside the target, then rename.

A reader sees either the old content or the new, never a mix, and a failure (or a kill)
leaves at most a hidden `.name.tmp-*` sibling behind, never a partial target.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _sibling(dest: Path, tag: str) -> Path:
    return dest.parent / f".{dest.name}.{tag}-{uuid.uuid4().hex[:8]}"


def replace_dir(tmp: Path, dest: Path) -> None:
    """Rename the finished folder `tmp` to `dest`; an existing `dest` is moved aside, then removed.

    If the final rename fails, the old `dest` is put back and the error propagates.
    """
    old = _sibling(dest, "old")
    had_old = dest.exists()
    if had_old:
        dest.rename(old)
    try:
        tmp.rename(dest)
    except OSError:
        if had_old:
            old.rename(dest)
        raise
    if had_old:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty folder beside `dest`; it replaces `dest` on success, is removed on error."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(dest, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is renamed over `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(dest, "tmp")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(dest: Path, text: str) -> Path:
    """Write UTF-8 text to `dest` atomically; returns `dest`."""
    with staged_file(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)
