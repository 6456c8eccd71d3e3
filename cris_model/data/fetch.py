"""`cris data fetch`: copy a dataset from a folder, an S3 prefix or an http(s) archive.

Sources:
- a local folder, or `s3://bucket/prefix` (S3 or an S3-compatible store; endpoint from
  `FetchConfig.endpoint_url`, else $CRIS_S3_ENDPOINT_URL, else boto3's own settings such
  as $AWS_ENDPOINT_URL; credentials from the usual AWS variables). The source root must
  hold a `SHA256SUMS` manifest (`sha256sum` format) listing every file; a listed file that
  is missing, a file that is not listed, or a source without a manifest is refused.
- an `http://` / `https://` archive (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz, .zip). Its
  SHA-256 comes from `FetchConfig.sha256`, else from the sidecar `<url>.sha256`; an
  archive with neither is refused. Members are checked before extraction (no absolute
  paths, `..`, links or special files); a `SHA256SUMS` at the archive root is verified too.

Safety: everything is written under the staging folder `<out>.partial/` (`parts/` for
transfers in progress, `tree/` for verified files, `archive*` for a downloaded archive),
and `tree/` is renamed to `<out>` only once every file is verified, so `<out>` is never
created or changed by a failed run. A checksum mismatch deletes the bad file and fails
with a ChecksumError naming it. The staging folder survives a failure, so a re-run
resumes: verified files are re-hashed locally instead of fetched again and partial files
continue with a ranged request. Staging from another source or version is discarded; a
lock (`<out>.partial/lock`) keeps two fetches from sharing it.

`<out>/.cris-fetch.json` records the source, its SHA-256 (of the manifest, or of the
archive) and the files; a re-run whose source has the same SHA-256 and whose files are all
present reports "up to date" without transferring anything. An existing `<out>` holding
anything else is refused, never overwritten.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cris_model.data.fetch_archive import archive_kind, extract_archive
from cris_model.data.fetch_checksums import (
    MANIFEST_NAME,
    MARKER_NAME,
    ChecksumError,
    check_hex,
    mismatch,
    parse_manifest,
    sha256_bytes,
    sha256_file,
)
from cris_model.data.fetch_sources import (
    LocalStore,
    NoSuchSourceError,
    RetryPolicy,
    S3Store,
    Store,
    http_download,
    http_read,
    s3_client,
    with_retries,
)

__all__ = ["ChecksumError", "FetchConfig", "RetryPolicy", "fetch"]


@dataclass(frozen=True)
class FetchConfig:
    """Options of one fetch; the defaults suit a real network."""

    sha256: str | None = None  # expected SHA-256 of an http(s) archive (else <url>.sha256)
    endpoint_url: str | None = None  # S3-compatible endpoint (else $CRIS_S3_ENDPOINT_URL)
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # retries, backoff, timeouts
    progress: bool | None = None  # byte progress bar; None: on a TTY when $CI is unset
    chunk_bytes: int = 1 << 20  # read/write block size of a transfer


def fetch(source: str, out: Path, config: FetchConfig | None = None) -> dict[str, Any]:
    """Fetch `source` (folder, s3://bucket/prefix or http(s) archive URL) into folder `out`.

    Returns a summary: source, out, status ("fetched" | "up to date"), files, bytes,
    sha256 (of the manifest or archive), and downloaded / resumed / reused file counts.
    Raises ChecksumError (a ValueError) on a mismatch, FileNotFoundError for a missing
    source or manifest, ValueError for a refused source, RuntimeError once retries run out.
    """
    cfg = config or FetchConfig()
    out = Path(os.path.abspath(out))
    staging = out.with_name(out.name + ".partial")
    if source.startswith(("http://", "https://")):
        return _fetch_archive(source, out, staging, cfg)
    if source.startswith("s3://"):
        store: Store = S3Store(source, s3_client(cfg.endpoint_url, cfg.retry), cfg.chunk_bytes)
    elif "://" in source:
        raise ValueError(f"{source}: unsupported source (a folder, s3:// or http(s):// URL)")
    else:
        store = LocalStore(Path(source), cfg.chunk_bytes)
    return _fetch_tree(store, source, out, staging, cfg)


def _summary(source: str, out: Path, status: str, record: dict[str, Any],
             counts: dict[str, int]) -> dict[str, Any]:
    return {"source": source, "out": str(out), "status": status, "files": len(record["files"]),
            "bytes": record["bytes"], "sha256": record["sha256"], **counts}


def _up_to_date(out: Path, digest: str) -> dict[str, Any] | None:
    """The fetch record of `out` when it holds the data with this digest, else None."""
    marker = out / MARKER_NAME
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{marker}: unreadable fetch record; remove {out} to fetch again") from e
    if record.get("sha256") != digest:
        return None
    if not all((out / rel).is_file() for rel in record.get("files", [])):
        return None
    return dict(record)


def _refuse_existing(out: Path) -> None:
    if os.path.lexists(out):
        raise FileExistsError(
            f"{out}: already exists and does not hold this source's data; "
            "remove it or choose another --out"
        )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextmanager
def _staging(staging: Path, source: str, digest: str) -> Iterator[None]:
    """Hold the lock on `staging`, discarding leftovers of a different source or version."""
    staging.mkdir(parents=True, exist_ok=True)
    fd = os.open(staging / "lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise RuntimeError(f"{staging}: another fetch is using this staging folder") from e
        state_path = staging / "state.json"
        state = {"source": source, "sha256": digest}
        if not state_path.is_file() or state_path.read_text(encoding="utf-8") != json.dumps(state):
            for child in staging.iterdir():
                if child.name != "lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            _write_atomic(state_path, json.dumps(state))
        yield
    finally:
        os.close(fd)


def _bar(total: int | None, cfg: FetchConfig, desc: str) -> tqdm:
    show = cfg.progress
    if show is None:
        show = sys.stderr.isatty() and not os.environ.get("CI")
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not show)


def _verify(path: Path, expected: str, name: str) -> None:
    """Hash `path`; on a mismatch delete it and raise ChecksumError naming `name`."""
    actual = sha256_file(path)
    if actual != expected:
        path.unlink()
        raise mismatch(name, expected, actual)


def _publish(tree: Path, out: Path, staging: Path, record: dict[str, Any]) -> None:
    """Write the fetch record into `tree`, rename it to `out`, drop the staging folder."""
    _write_atomic(tree / MARKER_NAME, json.dumps(record, indent=1))
    try:
        os.rename(tree, out)
    except OSError as e:
        raise RuntimeError(f"{out}: could not move the fetched data into place ({e})") from e
    shutil.rmtree(staging)


def _read_manifest(store: Store, cfg: FetchConfig) -> bytes:
    try:
        return with_retries(partial(store.read_bytes, MANIFEST_NAME),
                            store.name(MANIFEST_NAME), cfg.retry)
    except NoSuchSourceError:
        raise
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{store.name(MANIFEST_NAME)}: no manifest; refusing to fetch unverified data "
            f"(write one with `sha256sum` at the source root)"
        ) from e


def _check_listing(store: Store, entries: dict[str, str], sizes: dict[str, int]) -> None:
    missing = [rel for rel in entries if rel not in sizes]
    if missing:
        raise FileNotFoundError(
            f"{store.name(missing[0])}: listed in {MANIFEST_NAME} but missing at the source"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    extra = sorted(set(sizes) - set(entries) - {MANIFEST_NAME, MARKER_NAME})
    if extra:
        raise ValueError(
            f"{store.name(extra[0])}: not listed in {MANIFEST_NAME}; refusing unverified files"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )


def _fetch_tree(store: Store, source: str, out: Path, staging: Path,
                cfg: FetchConfig) -> dict[str, Any]:
    manifest = _read_manifest(store, cfg)
    try:
        text = manifest.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{store.name(MANIFEST_NAME)}: not UTF-8 text") from e
    entries = parse_manifest(text, store.name(MANIFEST_NAME))
    digest = sha256_bytes(manifest)
    counts = {"downloaded": 0, "resumed": 0, "reused": 0}
    record = _up_to_date(out, digest)
    if record is not None:
        return _summary(source, out, "up to date", record, counts)
    _refuse_existing(out)
    sizes = with_retries(store.list_sizes, store.name(""), cfg.retry)
    _check_listing(store, entries, sizes)
    total = sum(sizes[rel] for rel in entries)
    tree, parts = staging / "tree", staging / "parts"
    with _staging(staging, source, digest), _bar(total, cfg, "fetch") as bar:
        for rel, expected in entries.items():
            final, part = tree / rel, parts / rel
            if final.is_file() and sha256_file(final) == expected:
                counts["reused"] += 1
                bar.update(sizes[rel])
                continue
            final.unlink(missing_ok=True)
            part.parent.mkdir(parents=True, exist_ok=True)
            counts["resumed" if part.exists() else "downloaded"] += 1
            with_retries(partial(store.download, rel, part, sizes[rel], bar.update),
                         store.name(rel), cfg.retry)
            _verify(part, expected, store.name(rel))
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, final)
        tree.mkdir(parents=True, exist_ok=True)
        (tree / MANIFEST_NAME).write_bytes(manifest)
        record = {"source": source, "sha256": digest, "bytes": total + len(manifest),
                  "files": [*entries, MANIFEST_NAME]}
        _publish(tree, out, staging, record)
    return _summary(source, out, "fetched", record, counts)


def _archive_digest(url: str, cfg: FetchConfig) -> str:
    """The archive's expected SHA-256: FetchConfig.sha256, else the `<url>.sha256` sidecar."""
    if cfg.sha256:
        return check_hex(cfg.sha256, "--sha256")
    parts = urllib.parse.urlsplit(url)
    sidecar = urllib.parse.urlunsplit(parts._replace(path=parts.path + ".sha256"))
    try:
        body = with_retries(partial(http_read, sidecar, cfg.retry.timeout_s), sidecar, cfg.retry)
    except FileNotFoundError as e:
        raise ValueError(
            f"{url}: no checksum to verify against; pass --sha256 HEX or publish {sidecar}"
        ) from e
    words = body.decode("utf-8", errors="replace").split()
    return check_hex(words[0] if words else "", sidecar)


def _verify_members(tree: Path, files: list[str], label: str) -> None:
    """Check extracted files against the archive's own SHA256SUMS, when it has one."""
    manifest_path = tree / MANIFEST_NAME
    if not manifest_path.is_file():
        return
    where = f"{label}!{MANIFEST_NAME}"
    entries = parse_manifest(manifest_path.read_text(encoding="utf-8"), where)
    present = set(files) - {MANIFEST_NAME}
    missing = sorted(set(entries) - present)
    if missing:
        raise FileNotFoundError(f"{label}!{missing[0]}: listed in {MANIFEST_NAME}, not in archive")
    extra = sorted(present - set(entries))
    if extra:
        raise ValueError(f"{label}!{extra[0]}: not listed in {MANIFEST_NAME}; refusing it")
    for rel, expected in entries.items():
        _verify(tree / rel, expected, f"{label}!{rel}")


def _fetch_archive(url: str, out: Path, staging: Path, cfg: FetchConfig) -> dict[str, Any]:
    kind = archive_kind(urllib.parse.urlsplit(url).path)
    digest = _archive_digest(url, cfg)
    counts = {"downloaded": 0, "resumed": 0, "reused": 0}
    record = _up_to_date(out, digest)
    if record is not None:
        return _summary(url, out, "up to date", record, counts)
    _refuse_existing(out)
    archive, part, tree = staging / "archive", staging / "archive.part", staging / "tree"
    with _staging(staging, url, digest):
        if archive.is_file() and sha256_file(archive) == digest:
            counts["reused"] = 1
        else:
            archive.unlink(missing_ok=True)
            counts["resumed" if part.exists() else "downloaded"] = 1
            with _bar(None, cfg, "fetch") as bar:
                with_retries(partial(http_download, url, part, cfg.retry.timeout_s, bar.update,
                                     cfg.chunk_bytes), url, cfg.retry)
            _verify(part, digest, url)
            os.replace(part, archive)
        if tree.exists():
            shutil.rmtree(tree)
        tree.mkdir()
        try:
            files = extract_archive(archive, kind, tree, url)
            _verify_members(tree, files, url)
        except (ValueError, OSError):
            shutil.rmtree(tree)
            raise
        record = {"source": url, "sha256": digest, "bytes": archive.stat().st_size,
                  "files": sorted(files)}
        _publish(tree, out, staging, record)
    return _summary(url, out, "fetched", record, counts)
