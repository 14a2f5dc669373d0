"""Shared fixtures. The OSS-dialect test server lives in tests/oss_server.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.oss_server import OssTestServer

OSS_TEST_ACCESS_KEY_ID = "test-access-key-id"
OSS_TEST_ACCESS_KEY_SECRET = "test-access-key-secret"
OSS_TEST_BUCKET = "test-bucket"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on 2 shared cores, OpenMP barriers make 2 threads several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def oss_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[OssTestServer]:
    """A running in-memory OSS with bucket `test-bucket`; OSS_* env vars point trainer.storage at it.

    `oss_server.url("a/b.txt")` -> "oss://test-bucket/a/b.txt"; `.endpoint`; `.fail_next(...)`,
    `.reset_next(...)`, `.max_keys_cap`, `.calls`, `.uploads`, `.keys()` for assertions.
    """
    from imlt.trainer import storage

    with OssTestServer(OSS_TEST_ACCESS_KEY_ID, OSS_TEST_ACCESS_KEY_SECRET) as server:
        server.create_bucket(OSS_TEST_BUCKET)
        server.default_bucket = OSS_TEST_BUCKET
        monkeypatch.setenv("OSS_ENDPOINT", server.endpoint)
        monkeypatch.setenv("OSS_ACCESS_KEY_ID", OSS_TEST_ACCESS_KEY_ID)
        monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", OSS_TEST_ACCESS_KEY_SECRET)
        monkeypatch.delenv("OSS_SESSION_TOKEN", raising=False)
        monkeypatch.delenv("OSS_REGION", raising=False)
        storage.configure_oss(None)
        try:
            yield server
        finally:
            storage.configure_oss(None)
            storage.reset_clients()
