"""Storage faults beyond tests/test_fetch.py: the S3 store process itself SIGKILLed in the
middle of a download, then restarted on the same port and data.

The store is a real SeaweedFS (`infra.s3.S3Store`). The kill comes from the fetch's
own progress callback once the first megabyte has arrived, so it always lands mid-file.
The interrupted fetch gives up with a clear error and leaves nothing at the output path;
the next fetch after the restart continues the partial file and verifies it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from file_trees import put_tree

from cris_model.data import fetch as fetch_module
from cris_model.data.fetch import FetchConfig, RetryPolicy, fetch
from infra.process import group_alive
from infra.s3 import S3Store

BIG = "images/train2014/big.bin"
SIZE = 24 << 20  # larger than the socket buffers, so the kill really cuts the body
KEY, SECRET = "reliability-key", "reliability-secret-0123"


class _KillAt:
    """A progress bar stand-in that SIGKILLs the store's process group after `after` bytes."""

    def __init__(self, store: S3Store, after: int) -> None:
        self.store, self.after, self.seen = store, after, 0

    def __enter__(self) -> _KillAt:
        return self

    def __exit__(self, *exc: object) -> None:
        """Nothing to close."""

    def update(self, n: int) -> None:
        self.seen += n
        if self.seen >= self.after and self.store.pid and group_alive(self.store.pid):
            os.killpg(self.store.pid, signal.SIGKILL)
            while group_alive(self.store.pid):
                time.sleep(0.01)


@pytest.mark.slow
def test_store_killed_mid_download_then_restarted_resumes_and_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = S3Store(tmp_path / "s3", access_key=KEY, secret_key=SECRET)
    if not Path(store.weed).is_file():
        pytest.skip("SeaweedFS (weed) is not installed")
    for name, value in store.env().items():
        monkeypatch.setenv(name, value)
    files = {BIG: os.urandom(SIZE), "refcoco/instances.json": b'{"images": []}'}
    out, part = tmp_path / "data", tmp_path / "data.partial" / "parts" / BIG
    store.start()
    try:
        store.ensure_bucket("datasets")
        put_tree(store.client(), "datasets", "refcoco", files)
        cfg = FetchConfig(endpoint_url=store.endpoint_url, progress=False, chunk_bytes=1 << 16,
                          retry=RetryPolicy(retries=1, backoff_s=0.05, timeout_s=5.0))
        killer = _KillAt(store, after=1 << 20)

        def bar(*args: Any) -> _KillAt:
            return killer

        with monkeypatch.context() as patch:
            patch.setattr(fetch_module, "_bar", bar)
            with pytest.raises(RuntimeError, match=f"{BIG}: gave up after 2 attempts"):
                fetch("s3://datasets/refcoco", out, cfg)
        assert killer.seen >= 1 << 20 and not store.running
        assert not out.exists()  # nothing half-fetched at the output path
        kept = part.stat().st_size
        assert 0 < kept < SIZE and part.read_bytes() == files[BIG][:kept]

        store.stop()
        store.start()  # same port, same data folder
        result = fetch("s3://datasets/refcoco", out, cfg)
    finally:
        store.stop()
    assert result["status"] == "fetched" and result["resumed"] == 1
    assert all((out / rel).read_bytes() == data for rel, data in files.items())
    assert not (tmp_path / "data.partial").exists()
