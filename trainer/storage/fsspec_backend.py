"""The backend for every other URL scheme fsspec knows (memory://, s3://, gs://, ...).

`fsspec` is imported inside `_fs` so importing this module stays fast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from imlt.trainer.storage.errors import StorageError, StorageNotFoundError
from imlt.trainer.storage.redact import scrub


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise StorageError(f"{url}: no filesystem for this URL scheme ({e})") from None


@contextlib.contextmanager
def _fs_errors(url: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageNotFoundError(f"{url}: not found") from None
    except OSError as e:
        raise StorageError(f"{url}: {type(e).__name__}: {scrub(str(e))}") from None


def _fs_list_relative(url: str) -> list[str]:
    fs, path = _fs(url)
    root = path.rstrip("/")
    with _fs_errors(url):
        if not fs.isdir(path):
            return []
        found = fs.find(path)
    return sorted(p[len(root) + 1 :] for p in found if p.startswith(root + "/"))
