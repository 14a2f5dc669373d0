"""Shared fixtures. The fakes and data builders behind them live in tests/support."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.images import image_bytes
from tests.support.oss_server import OSS_TEST_ACCESS_KEY_ID, OSS_TEST_ACCESS_KEY_SECRET, OSS_TEST_BUCKET, OssTestServer


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, give each worker its own share of the CPUs.

    The trainer sizes its torch threads from the CPUs it may use (affinity), and so do the
    training processes the tests start; without a share each worker would take every core and
    OpenMP oversubscription would make both several times slower.
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= count:
        os.sched_setaffinity(0, cpus[int(worker.removeprefix("gw")) % count :: count])


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


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """make_image("img/a.png", size=..., mode=..., fmt=...) -> the written path (under tmp_path)."""

    def make(rel: str, size: tuple[int, int] = (16, 16), mode: str = "RGB", fmt: str | None = None, seed: int = 0) -> Path:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = fmt or ("JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
        path.write_bytes(image_bytes(size, mode, fmt, seed))
        return path

    return make
