"""Transports for `cris data fetch`: a local folder, an S3 prefix, an http(s) object.

Every download appends to a `.part` file from its current length (a local seek, an S3
ranged GET, an HTTP `Range` request), so an interrupted transfer continues where it
stopped. Failures worth another try (connection errors, timeouts, truncated bodies, HTTP
5xx/408/429, S3 throttling) raise `TransientError`; `with_retries` repeats those with
exponential backoff and jitter. Anything else (404, 403, a bad request) fails at once.
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

_LOG = logging.getLogger(__name__)
_T = TypeVar("_T")
ProgressFn = Callable[[int], object]
ENDPOINT_ENV = "CRIS_S3_ENDPOINT_URL"
_CHUNK = 1 << 20
_RETRY_HTTP = {408, 429}
_RETRY_S3_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded",
}


class TransientError(RuntimeError):
    """A failure that another attempt may not hit (network, timeout, 5xx, throttling)."""


class NoSuchSourceError(FileNotFoundError):
    """The source container itself (an S3 bucket, a local folder) does not exist."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failing transfer is tried again."""

    retries: int = 4  # further attempts after the first failure (0: no retry)
    backoff_s: float = 1.0  # delay before the first retry; doubles on each retry
    max_backoff_s: float = 30.0  # ceiling of one delay
    timeout_s: float = 60.0  # socket connect/read timeout of one request

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based): capped doubling, jittered."""
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)


def with_retries(action: Callable[[], _T], what: str, policy: RetryPolicy) -> _T:
    """Run `action`, repeating it on TransientError up to `policy.retries` more times.

    Raises RuntimeError naming `what` and the last failure once the attempts are spent.
    """
    if policy.retries < 0:
        raise ValueError(f"retries must be >= 0, got {policy.retries}")
    for attempt in range(policy.retries + 1):
        try:
            return action()
        except TransientError as e:
            last = e
            if attempt < policy.retries:
                wait = policy.delay(attempt)
                _LOG.warning("%s: %s; retrying in %.2fs", what, e, wait)
                time.sleep(wait)
    raise RuntimeError(f"{what}: gave up after {policy.retries + 1} attempts: {last}") from last


def part_length(part: Path, size: int | None) -> int:
    """Bytes already in `part`; a part longer than the expected size is discarded (0)."""
    if not part.exists():
        return 0
    done = part.stat().st_size
    if size is not None and done > size:
        part.unlink()
        return 0
    return done


class Store(Protocol):
    """A folder-like source of files addressed by relative POSIX paths."""

    def name(self, rel: str) -> str:
        """Human-readable address of one file, for messages."""
        ...

    def read_bytes(self, rel: str) -> bytes:
        """Whole content of a small file; FileNotFoundError if it is absent."""
        ...

    def list_sizes(self) -> dict[str, int]:
        """{relative path: size in bytes} of every file under the source."""
        ...

    def download(self, rel: str, part: Path, size: int, progress: ProgressFn) -> None:
        """Append the rest of file `rel` (`size` bytes in all) to `part`."""
        ...


class LocalStore:
    """A dataset folder on a local or mounted file system."""

    def __init__(self, root: Path, chunk_bytes: int = _CHUNK) -> None:
        if not root.is_dir():
            raise NoSuchSourceError(f"{root}: source folder not found")
        self.root = root
        self.chunk_bytes = chunk_bytes

    def name(self, rel: str) -> str:
        return str(self.root / rel)

    def read_bytes(self, rel: str) -> bytes:
        path = self.root / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found")
        return path.read_bytes()

    def list_sizes(self) -> dict[str, int]:
        sizes = {}
        for dirpath, _dirs, files in os.walk(self.root):
            for fname in files:
                path = Path(dirpath) / fname
                sizes[path.relative_to(self.root).as_posix()] = path.stat().st_size
        return sizes

    def download(self, rel: str, part: Path, size: int, progress: ProgressFn) -> None:
        done = part_length(part, size)
        with open(self.root / rel, "rb") as src, open(part, "ab") as dst:
            src.seek(done)
            while block := src.read(self.chunk_bytes):
                dst.write(block)
                progress(len(block))


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix") (prefix may be "")."""
    match = re.match(r"^s3://([^/]+)/?(.*)$", url)
    if match is None:
        raise ValueError(f"{url!r} is not an s3://bucket/prefix URL")
    return match.group(1), match.group(2).strip("/")


def s3_client(endpoint_url: str | None, policy: RetryPolicy) -> Any:
    """A boto3 S3 client; endpoint from the argument, else $CRIS_S3_ENDPOINT_URL, else boto3's.

    boto3's own retries are off (our policy retries whole transfers, resuming them). Each
    client comes from a fresh session, so it reads the credentials in the environment now,
    not those boto3's default session cached at its first use.
    """
    import boto3
    from botocore.config import Config

    url = endpoint_url or os.environ.get(ENDPOINT_ENV) or None
    config = Config(
        retries={"total_max_attempts": 1},
        connect_timeout=policy.timeout_s,
        read_timeout=policy.timeout_s,
        s3={"addressing_style": "path"} if url else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=url, config=config)


@contextmanager
def _s3_errors(name: str) -> Iterator[None]:
    """Map botocore failures to TransientError / FileNotFoundError / PermissionError."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
        NoCredentialsError,
    )

    try:
        yield
    except ClientError as e:
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        text = f"{name}: {code or 'error'} (HTTP {status}) {error.get('Message', '')}".strip()
        if status >= 500 or status in _RETRY_HTTP or code in _RETRY_S3_CODES:
            raise TransientError(text) from e
        if code == "NoSuchBucket":
            raise NoSuchSourceError(text) from e
        if status == 404 or code in {"NoSuchKey", "404"}:
            raise FileNotFoundError(text) from e
        if status == 403:
            raise PermissionError(text) from e
        raise RuntimeError(text) from e
    except NoCredentialsError as e:
        raise RuntimeError(
            f"{name}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        ) from e
    except (ConnectionError, HTTPClientError, IncompleteReadError) as e:
        raise TransientError(f"{name}: {e}") from e


class S3Store:
    """Files under `s3://bucket/prefix/` of S3 or an S3-compatible store."""

    def __init__(self, url: str, client: Any, chunk_bytes: int = _CHUNK) -> None:
        self.bucket, self.prefix = split_s3_url(url)
        self.client = client
        self.chunk_bytes = chunk_bytes

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def name(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self._key(rel)}"

    def read_bytes(self, rel: str) -> bytes:
        with _s3_errors(self.name(rel)):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"]
            return bytes(body.read())

    def list_sizes(self) -> dict[str, int]:
        start = f"{self.prefix}/" if self.prefix else ""
        sizes = {}
        with _s3_errors(f"s3://{self.bucket}/{start}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        sizes[obj["Key"][len(start):]] = int(obj["Size"])
        return sizes

    def download(self, rel: str, part: Path, size: int, progress: ProgressFn) -> None:
        done = part_length(part, size)
        if done == size:
            return
        extra = {"Range": f"bytes={done}-"} if done else {}
        got = 0
        with _s3_errors(self.name(rel)):
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(rel), **extra)
            if done and not response.get("ContentRange"):
                done = 0
            with open(part, "ab" if done else "wb") as dst:
                for block in response["Body"].iter_chunks(self.chunk_bytes):
                    dst.write(block)
                    got += len(block)
                    progress(len(block))
        if done + got != size:
            raise TransientError(f"{self.name(rel)}: body ended after {done + got} of {size} bytes")


def _http_error(url: str, e: urllib.error.HTTPError) -> Exception:
    """Classify an HTTP error status: transient (5xx, 408, 429) or final."""
    text = f"{url}: HTTP {e.code} {e.reason}"
    e.close()
    if e.code >= 500 or e.code in _RETRY_HTTP:
        return TransientError(text)
    if e.code in (404, 410):
        return FileNotFoundError(text)
    return RuntimeError(text)


_NET_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)


def _open(url: str, headers: dict[str, str], timeout: float) -> Any:
    """urlopen with errors classified; the caller closes the response."""
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        raise _http_error(url, e) from e
    except _NET_ERRORS as e:
        raise TransientError(f"{url}: {e}") from e


def http_read(url: str, timeout: float) -> bytes:
    """Whole body of a small http(s) resource (a checksum sidecar)."""
    with _open(url, {}, timeout) as response:
        try:
            return bytes(response.read())
        except _NET_ERRORS as e:
            raise TransientError(f"{url}: {e}") from e


def _range_start(content_range: str | None) -> int | None:
    """First byte of a `Content-Range: bytes a-b/n` header, None when absent or unparsable."""
    match = re.match(r"^bytes (\d+)-\d+/(\d+|\*)$", (content_range or "").strip())
    return int(match.group(1)) if match else None


def http_download(url: str, part: Path, timeout: float, progress: ProgressFn,
                  chunk_bytes: int = _CHUNK) -> None:
    """Append the rest of an http(s) object to `part`, resuming with a `Range` request.

    A server that ignores the range (200) restarts the part; a body shorter than its
    Content-Length raises TransientError so the retry resumes from what arrived.
    """
    done = part_length(part, None)
    headers = {"Range": f"bytes={done}-"} if done else {}
    try:
        response = _open(url, headers, timeout)
    except RuntimeError as e:
        cause = e.__cause__
        if done and isinstance(cause, urllib.error.HTTPError) and cause.code == 416:
            total = re.match(r"^bytes \*/(\d+)$", cause.headers.get("Content-Range") or "")
            if total and int(total.group(1)) == done:
                return
            part.unlink()
            raise TransientError(f"{url}: range {done}- not satisfiable; restarting") from e
        raise
    with response:
        if response.status == 206 and _range_start(response.headers.get("Content-Range")) != done:
            part.unlink()
            raise TransientError(f"{url}: server answered a different range; restarting")
        mode = "ab" if response.status == 206 else "wb"
        length = response.headers.get("Content-Length")
        got = 0
        with open(part, mode) as dst:
            try:
                while block := response.read(chunk_bytes):
                    dst.write(block)
                    got += len(block)
                    progress(len(block))
            except _NET_ERRORS as e:
                raise TransientError(f"{url}: {e}") from e
    if length is not None and got < int(length):
        raise TransientError(f"{url}: connection closed after {got} of {length} bytes")
