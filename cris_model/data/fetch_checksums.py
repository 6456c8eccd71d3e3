"""SHA-256 manifests in `sha256sum` format: parsing, hashing, and the mismatch error.

A manifest (`SHA256SUMS`) has one line per file, `<64 hex>  <relative/posix/path>` (a `*`
instead of the second space, binary mode, is accepted too). Blank lines are ignored.
Paths must stay inside the dataset: no absolute paths, no `..`, no empty components.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

MANIFEST_NAME = "SHA256SUMS"
MARKER_NAME = ".cris-fetch.json"
_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_RESERVED = {MANIFEST_NAME, MARKER_NAME}


class ChecksumError(ValueError):
    """A file's SHA-256 differs from the one its manifest (or --sha256) promises."""


def safe_relpath(name: str, what: str) -> str:
    """Normalise a relative POSIX path, refusing absolute paths, `..` and empty parts.

    `what` names where the path came from, for the error message.
    """
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"{what}: path {name!r} is absolute or empty")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if not parts or any(p == ".." for p in parts):
        raise ValueError(f"{what}: path {name!r} leaves the dataset folder")
    return "/".join(parts)


def check_hex(value: str, what: str) -> str:
    """A 64-digit hex SHA-256, lower-cased; ValueError naming `what` otherwise."""
    value = value.strip()
    if not _HEX64.match(value):
        raise ValueError(f"{what}: {value[:80]!r} is not a 64-digit hex SHA-256")
    return value.lower()


def parse_manifest(text: str, where: str) -> dict[str, str]:
    """`sha256sum` text -> {relative path: lower-case hex digest}, in file order.

    Raises ValueError naming `where` and the line on malformed lines, unsafe or duplicate
    paths, and entries for the manifest or the fetch marker themselves.
    """
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _LINE.match(line)
        if match is None:
            raise ValueError(f"{where}:{number}: not a '<sha256>  <path>' line")
        rel = safe_relpath(match.group(2), f"{where}:{number}")
        if rel in _RESERVED:
            raise ValueError(f"{where}:{number}: {rel} may not be listed in the manifest")
        if rel in entries:
            raise ValueError(f"{where}:{number}: {rel} is listed twice")
        entries[rel] = match.group(1).lower()
    if not entries:
        raise ValueError(f"{where}: manifest lists no files")
    return entries


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of an in-memory byte string."""
    return hashlib.sha256(data).hexdigest()


def mismatch(name: str, expected: str, actual: str) -> ChecksumError:
    """The one-line error for a file whose digest is not the promised one."""
    return ChecksumError(
        f"{name}: SHA-256 mismatch (expected {expected[:16]}..., got {actual[:16]}...)"
    )
