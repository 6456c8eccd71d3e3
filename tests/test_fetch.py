"""`cris data fetch` against real sources on loopback: a folder, an HTTP server, moto's S3."""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from fetch_servers import DROP, FaultProxy, FileServer
from file_trees import put_tree, sha256_sums, tree_bytes

from cris_model.cli import main
from cris_model.data.fetch import ChecksumError, FetchConfig, RetryPolicy, fetch
from cris_model.data.fetch_checksums import MARKER_NAME, parse_manifest
from cris_model.data.fetch_sources import S3Store, TransientError, s3_client, with_retries

FAST = RetryPolicy(retries=3, backoff_s=0.001, max_backoff_s=0.01, timeout_s=5.0)
FILES = {
    "refcoco/instances.json": b'{"images": []}\n',
    "refcoco/refs(unc).p": bytes(range(256)) * 40,
    "images/mscoco/images/train2014/COCO_train2014_000000000009.jpg": b"\xff\xd8" + b"x" * 5000,
}


def _cfg(**kw: object) -> FetchConfig:
    return FetchConfig(retry=kw.pop("retry", FAST), progress=False, **kw)  # type: ignore[arg-type]


def _write_tree(root: Path, files: dict[str, bytes], manifest: bool = True) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    if manifest:
        (root / "SHA256SUMS").write_bytes(sha256_sums(files))
    return root


def _targz(files: dict[str, bytes], with_sums: bool = False) -> bytes:
    buf = io.BytesIO()
    members = {**files, "SHA256SUMS": sha256_sums(files)} if with_sums else files
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for rel, data in members.items():
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- local folder ------------------------------------------------------------------------


def test_folder_fetch_then_up_to_date(tmp_path: Path) -> None:
    src = _write_tree(tmp_path / "src", FILES)
    out = tmp_path / "data"
    first = fetch(str(src), out, _cfg())
    assert first["status"] == "fetched" and first["downloaded"] == len(FILES)
    got = tree_bytes(out)
    assert {k: v for k, v in got.items() if k != MARKER_NAME} == tree_bytes(src)
    assert not (tmp_path / "data.partial").exists()
    second = fetch(str(src), out, _cfg())
    assert second["status"] == "up to date" and second["downloaded"] == 0
    assert second["sha256"] == first["sha256"] and second["files"] == len(FILES) + 1


def test_tampered_file_fails_via_cli_and_resume_reuses_verified(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _write_tree(tmp_path / "src", FILES)
    bad = "refcoco/refs(unc).p"
    (src / bad).write_bytes(b"tampered")
    out = tmp_path / "data"
    rc = main(["data", "fetch", "--source", str(src), "--out", str(out), "--retries", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert err.startswith("cris: error:") and bad in err and "mismatch" in err
    assert not out.exists()
    staged = tmp_path / "data.partial"
    assert not (staged / "tree" / bad).exists() and not (staged / "parts" / bad).exists()
    (src / bad).write_bytes(FILES[bad])
    result = fetch(str(src), out, _cfg())
    assert result["reused"] == 1 and result["downloaded"] == 2  # stopped at the bad file
    assert (out / bad).read_bytes() == FILES[bad]


def test_folder_without_manifest_is_refused(tmp_path: Path) -> None:
    src = _write_tree(tmp_path / "src", FILES, manifest=False)
    with pytest.raises(FileNotFoundError, match="SHA256SUMS: no manifest"):
        fetch(str(src), tmp_path / "data", _cfg())
    assert not (tmp_path / "data").exists()


def test_unlisted_and_missing_files_are_refused(tmp_path: Path) -> None:
    src = _write_tree(tmp_path / "src", FILES)
    (src / "extra.bin").write_bytes(b"sneaky")
    with pytest.raises(ValueError, match=r"extra\.bin: not listed"):
        fetch(str(src), tmp_path / "a", _cfg())
    (src / "extra.bin").unlink()
    (src / "refcoco/instances.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances.json: listed in SHA256SUMS"):
        fetch(str(src), tmp_path / "b", _cfg())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_partial_file_resumes_from_its_length(tmp_path: Path) -> None:
    src = _write_tree(tmp_path / "src", FILES)
    out = tmp_path / "data"
    rel = "refcoco/refs(unc).p"
    (src / rel).write_bytes(b"x")
    with pytest.raises(ChecksumError):
        fetch(str(src), out, _cfg())
    (src / rel).write_bytes(FILES[rel])
    part = tmp_path / "data.partial" / "parts" / rel
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(FILES[rel][:1000])
    result = fetch(str(src), out, _cfg())
    assert result["resumed"] == 1 and (out / rel).read_bytes() == FILES[rel]


def test_existing_foreign_out_is_not_touched(tmp_path: Path) -> None:
    src = _write_tree(tmp_path / "src", FILES)
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="already exists"):
        fetch(str(src), out, _cfg())
    assert tree_bytes(out) == {"mine.txt": b"keep"}


def test_second_fetch_into_same_staging_is_locked_out(tmp_path: Path) -> None:
    src = _write_tree(tmp_path / "src", FILES)
    staging = tmp_path / "data.partial"
    staging.mkdir()
    fd = os.open(staging / "lock", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another fetch"):
            fetch(str(src), tmp_path / "data", _cfg())
    finally:
        os.close(fd)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("line", [
    "0" * 64 + "  ../escape", "0" * 64 + "  /etc/passwd", "0" * 63 + "  short", "not a line",
])
def test_manifest_rejects_bad_lines(line: str) -> None:
    with pytest.raises(ValueError, match="SHA256SUMS:1"):
        parse_manifest(line + "\n", "SHA256SUMS")


def test_retry_gives_up_after_bounded_attempts() -> None:
    calls = []

    def flaky() -> None:
        calls.append(1)
        raise TransientError("boom")

    with pytest.raises(RuntimeError, match="gave up after 3 attempts: boom"):
        with_retries(flaky, "thing", RetryPolicy(retries=2, backoff_s=0.001))
    assert len(calls) == 3
    policy = RetryPolicy(backoff_s=1.0, max_backoff_s=5.0)
    assert all(0.5 * min(5.0, 2**a) <= policy.delay(a) <= min(5.0, 2**a) for a in range(6))


# --- http(s) archives ----------------------------------------------------------------------


def test_http_archive_with_sidecar_and_inner_manifest(tmp_path: Path) -> None:
    blob = _targz(FILES, with_sums=True)
    with FileServer({"ds.tar.gz": blob, "ds.tar.gz.sha256": f"{_sha(blob)}  ds.tar.gz\n".encode()}
                    ) as srv:
        result = fetch(srv.url("ds.tar.gz"), tmp_path / "data", _cfg())
        assert result["status"] == "fetched" and result["sha256"] == _sha(blob)
        again = fetch(srv.url("ds.tar.gz"), tmp_path / "data", _cfg())
        assert again["status"] == "up to date"
        assert srv.hits("ds.tar.gz") == [None]
    got = tree_bytes(tmp_path / "data")
    assert all(got[rel] == data for rel, data in FILES.items())


def test_http_zip_with_explicit_sha(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for rel, data in FILES.items():
            zf.writestr(rel, data)
    blob = buf.getvalue()
    with FileServer({"ds.zip": blob}) as srv:
        fetch(srv.url("ds.zip"), tmp_path / "data", _cfg(sha256=_sha(blob).upper()))
    assert (tmp_path / "data" / "refcoco/instances.json").read_bytes() == FILES[
        "refcoco/instances.json"]


def test_http_archive_checksum_mismatch_leaves_nothing(tmp_path: Path) -> None:
    blob = _targz(FILES)
    with FileServer({"ds.tar.gz": blob}) as srv, pytest.raises(ChecksumError, match="ds.tar.gz"):
        fetch(srv.url("ds.tar.gz"), tmp_path / "data", _cfg(sha256="ab" * 32))
    assert not (tmp_path / "data").exists()
    assert not any((tmp_path / "data.partial").glob("archive*"))


def test_http_archive_inner_manifest_mismatch_names_member(tmp_path: Path) -> None:
    buf = io.BytesIO()
    sums = sha256_sums(FILES).replace(_sha(FILES["refcoco/instances.json"]).encode(), b"0" * 64)
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel, data in {**FILES, "SHA256SUMS": sums}.items():
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    with FileServer({"ds.tar": blob}) as srv, pytest.raises(ChecksumError, match="instances.json"):
        fetch(srv.url("ds.tar"), tmp_path / "data", _cfg(sha256=_sha(blob)))
    assert not (tmp_path / "data").exists() and not (tmp_path / "data.partial" / "tree").exists()


def test_http_archive_without_checksum_is_refused(tmp_path: Path) -> None:
    with FileServer({"ds.tar.gz": _targz(FILES)}) as srv:
        with pytest.raises(ValueError, match="no checksum"):
            fetch(srv.url("ds.tar.gz"), tmp_path / "data", _cfg())
        assert srv.hits("ds.tar.gz") == []


def test_dropped_connection_resumes_with_range(tmp_path: Path) -> None:
    blob = _targz({"big.bin": os.urandom(200_000)})
    with FileServer({"ds.tgz": blob}) as srv:
        srv.faults["ds.tgz"] = [DROP]
        result = fetch(srv.url("ds.tgz"), tmp_path / "data", _cfg(sha256=_sha(blob)))
        hits = srv.hits("ds.tgz")
    assert result["status"] == "fetched"
    assert hits == [None, f"bytes={len(blob) // 2}-"]


def test_dropped_connection_resumes_on_next_run(tmp_path: Path) -> None:
    blob = _targz({"big.bin": os.urandom(100_000)})
    once = _cfg(sha256=_sha(blob), retry=RetryPolicy(retries=0, timeout_s=5.0))
    with FileServer({"ds.tgz": blob}) as srv:
        srv.faults["ds.tgz"] = [DROP]
        with pytest.raises(RuntimeError, match="connection closed after"):
            fetch(srv.url("ds.tgz"), tmp_path / "data", once)
        assert not (tmp_path / "data").exists()
        result = fetch(srv.url("ds.tgz"), tmp_path / "data", once)
        assert srv.hits("ds.tgz")[-1] == f"bytes={len(blob) // 2}-"
    assert result["resumed"] == 1


def test_server_errors_are_retried(tmp_path: Path) -> None:
    blob = _targz(FILES)
    with FileServer({"ds.tgz": blob}) as srv:
        srv.faults["ds.tgz"] = [500, 503]
        fetch(srv.url("ds.tgz"), tmp_path / "data", _cfg(sha256=_sha(blob)))
        assert len(srv.hits("ds.tgz")) == 3
        srv.faults["ds.tgz"] = [500] * 10
        with pytest.raises(RuntimeError, match="gave up after 4 attempts.*HTTP 500"):
            fetch(srv.url("ds.tgz"), tmp_path / "other", _cfg(sha256=_sha(blob)))


@pytest.mark.parametrize("status,error", [(404, FileNotFoundError), (403, RuntimeError)])
def test_client_errors_fail_at_once(tmp_path: Path, status: int, error: type) -> None:
    with FileServer({"ds.tgz": b""}) as srv:
        srv.faults["ds.tgz"] = [status]
        with pytest.raises(error, match=f"HTTP {status}"):
            fetch(srv.url("ds.tgz"), tmp_path / "data", _cfg(sha256="ab" * 32))
        assert len(srv.hits("ds.tgz")) == 1


def _evil_tar(kind: str, outside: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        ok = tarfile.TarInfo("ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        if kind == "symlink":
            info = tarfile.TarInfo("link")
            info.type, info.linkname = tarfile.SYMTYPE, str(outside)
            tar.addfile(info)
            target = tarfile.TarInfo("link/evil")
        else:
            target = tarfile.TarInfo("../evil" if kind == "dotdot" else str(outside / "evil"))
        target.size = 4
        tar.addfile(target, io.BytesIO(b"evil"))
    return buf.getvalue()


@pytest.mark.parametrize("kind,message", [
    ("dotdot", "'../evil' leaves"), ("absolute", "is absolute"), ("symlink", "'link' is a link"),
])
def test_tar_path_traversal_is_rejected(tmp_path: Path, kind: str, message: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    blob = _evil_tar(kind, outside)
    with FileServer({"ds.tgz": blob}) as srv, pytest.raises(ValueError, match=message):
        fetch(srv.url("ds.tgz"), tmp_path / "work" / "data", _cfg(sha256=_sha(blob)))
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "work" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not (tmp_path / "work" / "data").exists()
    assert not (tmp_path / "work" / "data.partial" / "tree").exists()


def test_zip_path_traversal_is_rejected(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok.txt", b"ok")
        zf.writestr("../evil", b"evil")
    blob = buf.getvalue()
    with FileServer({"ds.zip": blob}) as srv, pytest.raises(ValueError, match="leaves"):
        fetch(srv.url("ds.zip"), tmp_path / "work" / "data", _cfg(sha256=_sha(blob)))
    assert not (tmp_path / "work" / "evil").exists()


# --- S3 (moto's server on loopback) --------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():  # type: ignore[no-untyped-def]
    """moto's S3 server on loopback with fake credentials, shared by this module's tests."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
                    "CRIS_S3_ENDPOINT_URL"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            client = s3_client(f"http://{host}:{port}", FAST)
            client.create_bucket(Bucket="bucket")
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def _upload(endpoint: str, files: dict[str, bytes], prefix: str) -> str:
    """Put `files` and their SHA256SUMS under s3://bucket/<prefix>/; returns that URL."""
    put_tree(s3_client(endpoint, FAST), "bucket", prefix, files)
    return f"s3://bucket/{prefix}"


def test_s3_prefix_fetch_then_up_to_date(tmp_path: Path, s3_endpoint: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    url = _upload(s3_endpoint, FILES, "happy/refcoco")
    out = tmp_path / "data"
    result = fetch(url + "/", out, _cfg(endpoint_url=s3_endpoint))
    assert result["status"] == "fetched" and result["downloaded"] == len(FILES)
    assert all((out / rel).read_bytes() == data for rel, data in FILES.items())
    monkeypatch.setenv("CRIS_S3_ENDPOINT_URL", s3_endpoint)
    assert main(["data", "fetch", "--source", url, "--out", str(out)]) == 0
    assert main(["data", "fetch", "--source", url, "--out", str(tmp_path / "again")]) == 0
    again = tree_bytes(tmp_path / "again")
    assert again == {**tree_bytes(out), MARKER_NAME: again[MARKER_NAME]}


def test_s3_ranged_resume_and_missing_sources(tmp_path: Path, s3_endpoint: str) -> None:
    rel = "refcoco/refs(unc).p"
    url = _upload(s3_endpoint, FILES, "ranged")
    store = S3Store(url, s3_client(s3_endpoint, FAST), chunk_bytes=1000)
    part = tmp_path / "part"
    part.write_bytes(FILES[rel][:3000])
    seen: list[int] = []
    store.download(rel, part, len(FILES[rel]), seen.append)
    assert part.read_bytes() == FILES[rel] and sum(seen) == len(FILES[rel]) - 3000
    with pytest.raises(FileNotFoundError, match="no manifest"):
        fetch("s3://bucket/other", tmp_path / "a", _cfg(endpoint_url=s3_endpoint))
    with pytest.raises(FileNotFoundError, match="NoSuchBucket"):
        fetch("s3://nobucket/x", tmp_path / "b", _cfg(endpoint_url=s3_endpoint))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("status,code,error", [
    (503, "SlowDown", TransientError), (500, "InternalError", TransientError),
    (403, "AccessDenied", PermissionError), (404, "NoSuchKey", FileNotFoundError),
])
def test_s3_error_classes(status: int, code: str, error: type) -> None:
    from botocore.exceptions import ClientError

    from cris_model.data.fetch_sources import _s3_errors

    response = {"Error": {"Code": code, "Message": "m"},
                "ResponseMetadata": {"HTTPStatusCode": status}}
    with pytest.raises(error, match=code), _s3_errors("s3://b/k"):
        raise ClientError(response, "GetObject")  # type: ignore[arg-type]


def test_s3_dropped_body_resumes_with_range(tmp_path: Path, s3_endpoint: str) -> None:
    url = _upload(s3_endpoint, FILES, "drop")
    key = "bucket/drop/refcoco/refs(unc).p"
    with FaultProxy(s3_endpoint) as proxy:
        proxy.faults[key] = [DROP]
        cfg = FetchConfig(endpoint_url=proxy.url(), retry=FAST, progress=False, chunk_bytes=512)
        result = fetch(url, tmp_path / "data", cfg)
        hits = proxy.hits(key)
    assert result["status"] == "fetched"
    assert (tmp_path / "data" / "refcoco/refs(unc).p").read_bytes() == FILES["refcoco/refs(unc).p"]
    assert len(hits) == 2 and hits[0] is None
    resumed_at = int((hits[1] or "").removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(FILES["refcoco/refs(unc).p"]) // 2


def test_s3_errors_retry_or_fail_at_once(tmp_path: Path, s3_endpoint: str) -> None:
    url = _upload(s3_endpoint, FILES, "flaky")
    key, manifest = "bucket/flaky/refcoco/refs(unc).p", "bucket/flaky/SHA256SUMS"
    with FaultProxy(s3_endpoint) as proxy:
        proxy.faults[key] = [503, 500]
        fetch(url, tmp_path / "a", _cfg(endpoint_url=proxy.url()))
        assert len(proxy.hits(key)) == 3
        proxy.faults[manifest] = [403]
        before = len(proxy.hits(manifest))
        with pytest.raises(PermissionError, match="403"):
            fetch(url, tmp_path / "b", _cfg(endpoint_url=proxy.url()))
        assert len(proxy.hits(manifest)) == before + 1
    assert not (tmp_path / "b").exists()
