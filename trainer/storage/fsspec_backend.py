"""The backend for every other URL scheme fsspec knows (memory://, s3://, gs://, ...).

`fsspec` is imported inside `filesystem` so importing this module stays fast.
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imlt.trainer.storage.errors import StorageError, StorageNotFoundError
from imlt.trainer.storage.redact import scrub


def filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise StorageError(f"{url}: no filesystem for this URL scheme ({e})") from None


@contextlib.contextmanager
def fs_errors(url: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageNotFoundError(f"{url}: not found") from None
    except OSError as e:
        raise StorageError(f"{url}: {type(e).__name__}: {scrub(str(e))}") from None


class FsspecBackend:
    remote = True

    def read(self, url: str, byte_range: tuple[int, int] | None) -> bytes:
        fs, path = filesystem(url)
        with fs_errors(url):
            if byte_range is None:
                return fs.cat_file(path)
            return fs.cat_file(path, start=byte_range[0], end=byte_range[1] + 1)

    def write(self, url: str, data: bytes) -> None:
        fs, path = filesystem(url)  # object stores behind fsspec create objects in one PUT
        with fs_errors(url):
            parent = posixpath.dirname(path.rstrip("/"))
            if parent and parent != path:
                fs.makedirs(parent, exist_ok=True)  # hierarchical filesystems need it; stores ignore it
            fs.pipe_file(path, bytes(data))

    def create_exclusive(self, url: str, data: bytes) -> bool:
        # fsspec has no portable conditional create: check-then-write, with a small race window.
        if self.exists(url):
            return False
        self.write(url, data)
        return True

    def exists(self, url: str) -> bool:
        fs, path = filesystem(url)
        with fs_errors(url):
            return fs.exists(path)

    def list_relative(self, url: str) -> list[str]:
        fs, path = filesystem(url)
        root = path.rstrip("/")
        with fs_errors(url):
            if not fs.isdir(path):
                return []
            found = fs.find(path)
        return sorted(p[len(root) + 1 :] for p in found if p.startswith(root + "/"))

    def delete(self, url: str) -> None:
        fs, path = filesystem(url)
        with fs_errors(url):
            if fs.exists(path):
                fs.rm(path, recursive=True)

    def download(self, url: str, dest: Path) -> None:
        fs, path = filesystem(url)
        with fs_errors(url):
            fs.get_file(path, str(dest))


BACKEND = FsspecBackend()
