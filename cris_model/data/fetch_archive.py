"""Safe extraction of dataset archives (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz, .zip).

Every member is checked before anything is written: absolute names, `..` components,
symbolic and hard links (wherever they point) and special files (devices, FIFOs) reject
the whole archive with a ValueError naming the member. Only regular files and folders are
written, each to a path built from its checked relative name under the destination.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from pathlib import Path
from typing import IO

from cris_model.data.fetch_checksums import safe_relpath

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def archive_kind(name: str) -> str:
    """"tar" or "zip" from a file name or URL path; ValueError for anything else."""
    lower = name.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith(_TAR_SUFFIXES):
        return "tar"
    raise ValueError(f"{name}: not a supported archive (.tar, .tar.gz, .tgz, .zip, ...)")


def _write_member(src: IO[bytes], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)


def _tar_members(tar: tarfile.TarFile, label: str) -> list[tuple[str, tarfile.TarInfo]]:
    checked = []
    for member in tar.getmembers():
        rel = safe_relpath(member.name, f"{label}: member")
        if member.issym() or member.islnk():
            raise ValueError(
                f"{label}: member {member.name!r} is a link to {member.linkname!r}; "
                "only files and folders are extracted"
            )
        if not (member.isfile() or member.isdir()):
            raise ValueError(f"{label}: member {member.name!r} is a special file")
        checked.append((rel, member))
    return checked


def _extract_tar(archive: Path, dest: Path, label: str) -> list[str]:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _tar_members(tar, label)
            files = []
            for rel, member in members:
                if member.isdir():
                    (dest / rel).mkdir(parents=True, exist_ok=True)
                    continue
                src = tar.extractfile(member)
                assert src is not None, "regular tar members always have content"
                with src:
                    _write_member(src, dest / rel)
                files.append(rel)
            return files
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"{label}: not a readable tar archive ({e})") from e


def _extract_zip(archive: Path, dest: Path, label: str) -> list[str]:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            checked = []
            for info in infos:
                rel = safe_relpath(info.filename, f"{label}: member")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise ValueError(f"{label}: member {info.filename!r} is a symbolic link")
                checked.append((rel, info))
            files = []
            for rel, info in checked:
                if info.is_dir():
                    (dest / rel).mkdir(parents=True, exist_ok=True)
                    continue
                with zf.open(info) as src:
                    _write_member(src, dest / rel)
                files.append(rel)
            return files
    except zipfile.BadZipFile as e:
        raise ValueError(f"{label}: not a readable zip archive ({e})") from e


def extract_archive(archive: Path, kind: str, dest: Path, label: str) -> list[str]:
    """Check every member of `archive`, then extract it into `dest` (an existing folder).

    `kind` is "tar" or "zip" (see `archive_kind`); `label` names the archive in errors.
    Returns the relative POSIX paths of the extracted regular files.
    """
    if kind == "tar":
        return _extract_tar(archive, dest, label)
    if kind == "zip":
        return _extract_zip(archive, dest, label)
    raise ValueError(f"{label}: unknown archive kind {kind!r}")
