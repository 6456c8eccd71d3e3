"""Folders as {relative path: bytes}, their SHA256SUMS, and their upload to an S3 bucket:
what the fetch, services and storage-fault tests all build their datasets from."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def tree_bytes(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `root`."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def sha256_sums(files: dict[str, bytes]) -> bytes:
    """A `sha256sum`-format manifest of `files`."""
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {rel}\n"
                   for rel, data in files.items()).encode()


def put_tree(client: Any, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    """Upload `files` and their SHA256SUMS under `s3://bucket/prefix/` with a boto3 client."""
    for rel, data in {**files, "SHA256SUMS": sha256_sums(files)}.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)
